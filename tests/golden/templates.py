"""Golden chat-template renderings for lorafold's data tests.

For each fixture model (tests/fixtures/models/*) this renders a few conversations with
transformers' ``apply_chat_template`` (with and without ``add_generation_prompt``) and records
the text and its token ids (``add_special_tokens=False``), using

* the model's own template (from tokenizer_config.json), for all seven models (a template that
  raises, as Gemma 2's does for a system turn, is recorded with its message as `"error"`);
* lorafold's named fallback templates (src/data/templates/*.jinja) and a template exercising
  Jinja features (tests/fixtures/data/templates/features.jinja), with the llama tokenizer (which
  has a BOS token) and the qwen3 one (which has none).

The Rust tests render the same cases with minijinja and must produce the same text and ids.

Token ids come from the model's tokenizer.json through the `tokenizers` library, which is what
lorafold (and transformers 4.x's fast tokenizers) use. transformers 5 rebuilds some tokenizers
from their class instead of tokenizer.json: for the qwen2 fixture, Qwen2Tokenizer applies Qwen2's
own pre-tokenizer regex (digits split one by one), so its ids differ for text with numbers; such
cases carry `"transformers_ids": [...]` for reference.

    /work/venv/bin/python tests/golden/templates.py

Writes tests/golden/templates.json.
"""

import json
import os
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jinja2  # noqa: E402
import tokenizers  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MODELS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"]
NAMED = ["chatml", "llama3", "mistral", "raw"]


def m(role, content):
    return {"role": role, "content": content}


CONVERSATIONS = {
    # The conversation of the data fixtures (tests/fixtures/data/make_fixtures.py).
    "multi": [
        m("system", "You are a helpful assistant."),
        m("user", "What color is the sky?"),
        m("assistant", "The sky is blue."),
        m("user", "And at night?"),
    ],
    "multi_chosen": [
        m("system", "You are a helpful assistant."),
        m("user", "What color is the sky?"),
        m("assistant", "The sky is blue."),
        m("user", "And at night?"),
        m("assistant", "At night the sky is dark."),
    ],
    # "multi" and "multi_chosen" with the system message folded into the first user message, as
    # lorafold's --fold_system does (for Gemma 2, whose template refuses a system turn).
    "multi_folded": [
        m("user", "You are a helpful assistant.\n\nWhat color is the sky?"),
        m("assistant", "The sky is blue."),
        m("user", "And at night?"),
    ],
    "multi_chosen_folded": [
        m("user", "You are a helpful assistant.\n\nWhat color is the sky?"),
        m("assistant", "The sky is blue."),
        m("user", "And at night?"),
        m("assistant", "At night the sky is dark."),
    ],
    "single": [m("user", "Hello world, 42 cats?")],
    "spaces_unicode": [
        m("user", "  Hi there, caf\u00e9 \u65e5\u672c?  "),
        m("assistant", "  Yes.\nA \"quoted\" line\\n.  "),
    ],
}


def cases_for(tok, fast, model, template_name, source):
    out = []
    for conv_name, conv in CONVERSATIONS.items():
        for gen in (True, False):
            kwargs = {} if source is None else {"chat_template": source}
            case = {
                "model": model,
                "template": template_name,
                "conversation": conv_name,
                "add_generation_prompt": gen,
            }
            try:
                text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen, **kwargs)
            except jinja2.exceptions.TemplateError as e:
                out.append({**case, "error": str(e)})
                continue
            ids = fast.encode(text, add_special_tokens=False).ids
            case.update(text=text, ids=ids)
            hf_ids = tok(text, add_special_tokens=False)["input_ids"]
            if hf_ids != ids:
                case["transformers_ids"] = hf_ids
            out.append(case)
    return out


def main():
    cases = []
    toks = {a: AutoTokenizer.from_pretrained(REPO / "tests/fixtures/models" / a) for a in MODELS}
    fast = {a: Tokenizer.from_file(str(REPO / "tests/fixtures/models" / a / "tokenizer.json")) for a in MODELS}
    for a in MODELS:
        cases += cases_for(toks[a], fast[a], a, None, None)
    extra = {n: (REPO / "src/data/templates" / f"{n}.jinja").read_text() for n in NAMED}
    extra["features"] = (REPO / "tests/fixtures/data/templates/features.jinja").read_text()
    for a in ["llama", "qwen3"]:
        for name, src in extra.items():
            cases += cases_for(toks[a], fast[a], a, name, src)
    doc = {
        "versions": {
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "jinja2": jinja2.__version__,
        },
        "conversations": CONVERSATIONS,
    }
    path = REPO / "tests/golden/templates.json"
    with open(path, "w", encoding="utf-8") as f:
        head = json.dumps(doc, ensure_ascii=False, indent=1)
        f.write(head[:-2] + ',\n "cases": [\n')
        f.write(",\n".join("  " + json.dumps(c, ensure_ascii=False) for c in cases))
        f.write("\n ]\n}\n")
    json.loads(path.read_text())
    print(f"wrote {len(cases)} cases to {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
