"""Golden values for `lorafold infer` (tests/it/infer.rs), from transformers' `generate` and its
logits processors. Deterministic: CPU, float32, eager attention.

    /work/venv/bin/python tests/golden/infer.py

writes ``tests/golden/infer.json``:

* ``archs.<arch>``: a chat prompt (messages, the text the model's chat template renders, its
  token ids) and the tokens greedy ``generate`` adds to it
  - ``greedy_base`` / ``greedy_peft``: 32 new tokens with every stop token disabled
    (``eos_token_id`` cleared in the generation config, so all 32 are generated), base model and
    with the ``<arch>_peft`` adapter (PEFT);
  - ``greedy_base_rep``: the same with ``repetition_penalty`` = ``REP_PENALTY``;
  - ``chat_base``: at most 32 new tokens, stopping at the model's EOS tokens
    (generation_config.json), as ``lorafold infer`` does by default (the tiny models never emit
    them, so this equals ``greedy_base``);
  - ``stop_base``: generation that stops: ``stop_token`` (a token greedy decoding first emits at
    step ``STOP_STEP`` or later) is made the only EOS; the tokens up to and including it;
  - ``short_prompt_ids`` / ``greedy_base_short``: the first ``SHORT_PROMPT`` prompt tokens and 32
    greedy tokens after them. For phi3 the decode crosses longrope's original context (12
    positions), where transformers switches from the short to the long factors.
  Gemma 2's template has no system role, so its prompt is the user turn alone.
* ``processors``: one logits vector, a context of token ids, and what transformers'
  RepetitionPenalty / Temperature / TopK / TopP processors (alone and chained in generate's
  order) make of it; ``null`` stands for -inf.
"""

import json
import os
import warnings
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"]
SHORT_PROMPT = 5
NEW_TOKENS = 32
REP_PENALTY = 1.5
STOP_STEP = 5
MESSAGES = [
    {"role": "system", "content": "You are a small model."},
    {"role": "user", "content": "Hello world, is the cat happy?"},
]


def load_base(arch):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(
        REPO / "tests/fixtures/models" / arch, attn_implementation="eager", dtype=torch.float32
    )
    return m.eval()


def load_peft(arch):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(load_base(arch), str(REPO / "tests/fixtures/adapters" / f"{arch}_peft"))
    return pm.eval()


@torch.no_grad()
def greedy(model, ids, stop, eos=None, **kw):
    """New tokens of greedy generate; with stop=False no token ends generation; `eos` replaces
    the model's EOS ids."""
    from transformers import GenerationConfig

    base_cfg = model.generation_config
    cfg = GenerationConfig(
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        eos_token_id=(eos if eos is not None else base_cfg.eos_token_id) if stop else None,
        pad_token_id=base_cfg.pad_token_id,
        bos_token_id=base_cfg.bos_token_id,
        **kw,
    )
    x = torch.tensor([ids])
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=cfg)
    new = out[0, len(ids):].tolist()
    if not stop:
        assert len(new) == NEW_TOKENS, (len(new), new)
    return new


def eos_ids(model):
    e = model.generation_config.eos_token_id
    return e if isinstance(e, list) else [e]


def arch_golden(arch):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(REPO / "tests/fixtures/models" / arch)
    msgs = MESSAGES[1:] if arch == "gemma2" else MESSAGES
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    base = load_base(arch)
    peft = load_peft(arch)
    out = {
        "messages": msgs,
        "prompt_text": text,
        "prompt_ids": ids,
        "eos_token_ids": eos_ids(base),
        "greedy_base": greedy(base, ids, stop=False),
        "greedy_peft": greedy(peft, ids, stop=False),
        "greedy_base_rep": greedy(base, ids, stop=False, repetition_penalty=REP_PENALTY),
        "chat_base": greedy(base, ids, stop=True),
    }
    g = out["greedy_base"]
    # The first new token at STOP_STEP or later (earlier when decoding repeats itself from there).
    k = next((i for i in range(STOP_STEP, NEW_TOKENS) if g[i] not in g[:i]), None)
    if k is None:
        k = max(i for i in range(1, NEW_TOKENS) if g[i] not in g[:i])
    out["stop_base"] = {"stop_token": g[k], "tokens": greedy(base, ids, stop=True, eos=[g[k]])}
    assert out["stop_base"]["tokens"] == g[: k + 1], (arch, out["stop_base"])
    out["short_prompt_ids"] = ids[:SHORT_PROMPT]
    out["greedy_base_short"] = greedy(base, ids[:SHORT_PROMPT], stop=False)
    out["chat_base_text"] = tok.decode(out["chat_base"], skip_special_tokens=True)
    assert out["greedy_base"] != out["greedy_peft"], arch
    assert out["greedy_base"] != out["greedy_base_rep"], arch
    print(arch, {k: v for k, v in out.items() if k.startswith(("greedy", "chat"))}, flush=True)
    return out


def processors():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(1, 24, generator=g) * 3.0).float()
    # Ties at the top-k boundary: keep both, as transformers does.
    logits[0, 20] = logits[0, 21] = torch.sort(logits[0], descending=True).values[4]
    ctx = torch.tensor([[1, 3, 3, 7, 20, 11]])
    p = dict(repetition_penalty=1.3, temperature=0.7, top_k=5, top_p=0.8)
    rep = RepetitionPenaltyLogitsProcessor(p["repetition_penalty"])
    temp = TemperatureLogitsWarper(p["temperature"])
    topk = TopKLogitsWarper(p["top_k"])
    topp = TopPLogitsWarper(p["top_p"])

    def run(*procs):
        s = logits.clone()
        for f in procs:
            s = f(ctx, s)
        return [None if v == float("-inf") else v for v in s[0].tolist()]

    return {
        "logits": logits[0].tolist(),
        "context": ctx[0].tolist(),
        **p,
        "after_repetition_penalty": run(rep),
        "after_temperature": run(temp),
        "after_top_k": run(topk),
        "after_top_p": run(topp),
        # generate's order: processors (repetition penalty), then warpers: temperature, top-k, top-p.
        "after_all": run(rep, temp, topk, topp),
    }


def main():
    import peft
    import transformers

    torch.manual_seed(0)
    doc = {
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "new_tokens": NEW_TOKENS,
        "repetition_penalty": REP_PENALTY,
        "archs": {arch: arch_golden(arch) for arch in ARCHS},
        "processors": processors(),
    }
    path = REPO / "tests/golden/infer.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print("wrote", path.relative_to(REPO))


if __name__ == "__main__":
    main()
