"""Golden-file generator for lorafold's Rust tests.

What it makes (all deterministic: fixed seeds, CPU, float32, eager attention):

* ``tests/fixtures/models/{llama,mistral,qwen2,qwen3,gemma2,gemma3,phi3}/`` -- seven tiny
  causal LMs laid out like Hugging Face hub snapshots (config.json, generation_config.json,
  tokenizer.json, tokenizer_config.json, safetensors weights written by
  ``save_pretrained``; llama is sharded with ``model.safetensors.index.json``).
  The first four share one byte-level BPE tokenizer trained here on a synthetic corpus; the
  Gemma and Phi models share a second one, trained on the same corpus with their chat tokens
  added. Every family feature of the three (soft caps, sliding layers, local rope, q/k norms,
  fused projections, partial rotary, longrope) is set, and shown to change the logits.
* ``tests/fixtures/adapters/<arch>_peft/`` and ``<arch>_peft_rslora/`` -- LoRA
  adapters written by PEFT (random non-zero A and B).
* ``tests/golden/<arch>.safetensors`` -- inputs, base / adapter logits, TRL-style
  summed response log-probs and the gradients of every LoRA parameter.
* ``tests/golden/meta.json`` -- library versions and per-arch numbers.

Run it from anywhere (it chdirs to the repository root):

    /work/venv/bin/python tests/golden/generate.py build

The second stage checks adapters written by lorafold itself (the Rust tests put
them in ``tests/fixtures/lorafold_adapters/<arch>/`` together with
``lorafold_logits.safetensors``) by loading them with PEFT:

    /work/venv/bin/python tests/golden/generate.py verify-lorafold

It writes ``tests/golden/lorafold_adapter_check.json`` and exits non-zero if any
check fails. Library versions used are pinned in tests/golden/requirements.txt.
"""

import argparse
import json
import math
import os
import random
import shutil
import sys
import warnings
from pathlib import Path

# Determinism / small-machine settings; must be set before tokenizers is imported.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"]
# Families added later get their own tokenizer, so the goldens of the first four stay as they were.
NEW_ARCHS = {"gemma2", "gemma3", "phi3"}
MODELS_REL = "tests/fixtures/models"
ADAPTERS_REL = "tests/fixtures/adapters"
LORAFOLD_REL = "tests/fixtures/lorafold_adapters"
GOLDEN_REL = "tests/golden"

TOKENIZER_VOCAB = 400
MODEL_VOCAB = 512
T = 16
# Half-open [start, end) response ranges per batch row (label positions).
RESPONSE_RANGES = [(8, 16), (6, 11)]
ROW1_LEN = 11
VERIFY_TOL = 1e-4
# Phi-3 fixture: longrope switches to its long factors once a call reaches this many positions
# (the golden batch has 16, so the full forward uses them; decoding crosses it).
PHI3_ORIGINAL_MAX_POS = 12
# 64 rather than 32: with head_dim 16 and theta 5e5 the rotary wavelengths are 6.3, 32.4, 167, ...;
# with 32 the smooth-interpolation band [orig/4, orig] = [8, 32] would contain none of them, with 64
# ([16, 64]) the three llama3 branches (keep / interpolate / divide by factor) are all exercised.
LLAMA3_ORIGINAL_MAX_POS = 64

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
]
EXTRA_SPECIAL_TOKENS = [
    "<bos>",
    "<eos>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
]

SEEDS = {"llama": 101, "mistral": 202, "qwen2": 303, "qwen3": 404, "gemma2": 505, "gemma3": 606, "phi3": 707}

# ----------------------------------------------------------------------------
# Chat templates
# ----------------------------------------------------------------------------

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}"
    "{{- '[INST] ' + message['content'] + ' [/INST]' }}"
    "{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- ' ' + message['content'] + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
)


def chatml_template(default_system):
    if default_system is None:
        head = (
            "{%- if messages[0]['role'] == 'system' %}"
            "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
            "{%- endif %}"
        )
    else:
        head = (
            "{%- if messages[0]['role'] == 'system' %}"
            "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
            "{%- else %}"
            "{{- '<|im_start|>system\\n" + default_system + "<|im_end|>\\n' }}"
            "{%- endif %}"
        )
    return head + (
        "{%- for message in messages %}"
        "{%- if message['role'] != 'system' or not loop.first %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}"
        "{{- '<|im_start|>assistant\\n' }}"
        "{%- endif %}"
    )


# Gemma 2: no system role (the template raises), the assistant is "model".
GEMMA2_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- raise_exception('System role not supported') }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<start_of_turn>model\\n' }}"
    "{%- endif %}"
)

# Gemma 3: a system turn is folded into the first user turn.
GEMMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set first_user_prefix = '' %}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{- message['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<start_of_turn>model\\n' }}"
    "{%- endif %}"
)

# Phi-3 / Phi-3.5: <|role|> turns closed by <|end|>, and <|endoftext|> after the last one when
# no generation prompt follows.
PHI3_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] in ['system', 'user', 'assistant'] %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|assistant|>\\n' }}"
    "{%- else %}"
    "{{- eos_token }}"
    "{%- endif %}"
)

# Per-arch tokenizer/special-token settings.
TOKEN_SPEC = {
    "llama": dict(bos="<|begin_of_text|>", eos="<|eot_id|>", template=LLAMA3_TEMPLATE),
    "mistral": dict(bos="<s>", eos="</s>", template=MISTRAL_TEMPLATE),
    "qwen2": dict(
        bos=None,
        eos="<|im_end|>",
        template=chatml_template("You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
    ),
    "qwen3": dict(bos=None, eos="<|im_end|>", template=chatml_template(None)),
    "gemma2": dict(bos="<bos>", eos="<eos>", template=GEMMA2_TEMPLATE),
    "gemma3": dict(bos="<bos>", eos="<end_of_turn>", template=GEMMA3_TEMPLATE),
    "phi3": dict(bos=None, eos="<|endoftext|>", template=PHI3_TEMPLATE),
}

# Extra end-of-turn tokens of generation_config.json.
GEN_EOS = {"llama": ["<|eot_id|>", "<|endoftext|>"], "gemma2": ["<eos>", "<end_of_turn>"],
           "gemma3": ["<eos>", "<end_of_turn>"], "phi3": ["<|end|>", "<|endoftext|>"]}

# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------


def log(msg):
    print(msg, flush=True)


def write_json(path, obj):
    path = Path(path)
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def versions():
    import peft
    import transformers
    import trl

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "trl": trl.__version__,
    }


# ----------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------

WORDS = (
    "the a an and or but if then when while of to in on at by for with from "
    "model train learn rate loss step batch token layer adapter weight bias "
    "cat dog bird fish tree river stone cloud rain sun moon star light dark "
    "red green blue small large quick slow happy sad old new good bad "
    "run walk jump read write think speak listen see open close make take give "
    "I you he she we they it this that these those is are was were be been "
    "hello world question answer assistant user system please thanks yes no"
).split()
PUNCT = [".", ",", "!", "?", ";", ":", "-", "(", ")", "\"", "'"]


def make_corpus(n_sentences=3000, seed=1234):
    rng = random.Random(seed)
    lines = []
    for _ in range(n_sentences):
        n = rng.randint(4, 14)
        parts = []
        for _ in range(n):
            r = rng.random()
            if r < 0.1:
                parts.append(str(rng.randint(0, 9999)))
            elif r < 0.15:
                parts.append(rng.choice(PUNCT))
            else:
                w = rng.choice(WORDS)
                if rng.random() < 0.1:
                    w = w.capitalize()
                parts.append(w)
        sent = " ".join(parts) + rng.choice([".", "!", "?", "\n"])
        lines.append(sent[0].upper() + sent[1:])
    return lines


def build_tokenizer(specials=SPECIAL_TOKENS):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    SPECIAL_TOKENS = specials  # noqa: N806 (the list this tokenizer is built with)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(make_corpus(), trainer=trainer)
    assert tok.get_vocab_size() == TOKENIZER_VOCAB, tok.get_vocab_size()
    for s in SPECIAL_TOKENS:
        assert tok.token_to_id(s) is not None, s
    added = tok.get_added_tokens_decoder()
    assert sorted(a.content for a in added.values()) == sorted(SPECIAL_TOKENS)
    assert all(a.special for a in added.values())
    assert max(tok.token_to_id(s) for s in SPECIAL_TOKENS) < 20, "special ids must stay below 20"
    return tok


def tokenizer_config(tok, arch):
    spec = TOKEN_SPEC[arch]
    added = tok.get_added_tokens_decoder()
    decoder = {}
    for idx in sorted(added):
        a = added[idx]
        decoder[str(idx)] = {
            "content": a.content,
            "lstrip": a.lstrip,
            "normalized": a.normalized,
            "rstrip": a.rstrip,
            "single_word": a.single_word,
            "special": a.special,
        }
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "bos_token": spec["bos"],
        "chat_template": spec["template"],
        "clean_up_tokenization_spaces": False,
        "eos_token": spec["eos"],
        "errors": "replace",
        "model_max_length": 256,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


def check_tokenizer(model_dir, arch, tok):
    from transformers import AutoTokenizer

    ht = AutoTokenizer.from_pretrained(model_dir)
    assert len(ht) == TOKENIZER_VOCAB, len(ht)
    assert ht.pad_token == "<|endoftext|>" and ht.pad_token_id == tok.token_to_id("<|endoftext|>")
    assert ht.eos_token == TOKEN_SPEC[arch]["eos"]
    msgs = [
        {"role": "system", "content": "You are a small model."},
        {"role": "user", "content": "Hello world, 42 cats?"},
        {"role": "assistant", "content": "Yes. The cat is happy!"},
        {"role": "user", "content": "Thanks."},
    ]
    if arch == "gemma2":
        msgs = msgs[1:]
    if arch == "mistral":
        text = ht.apply_chat_template(msgs, tokenize=False)
    else:
        text = ht.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = ht(text, add_special_tokens=False)["input_ids"]
    for s in SPECIAL_TOKENS + EXTRA_SPECIAL_TOKENS:
        if s in text:
            assert tok.token_to_id(s) in ids, (arch, s)
    assert ht.decode(ids) == text, (arch, text)
    return text


# ----------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------


def make_config(arch, pad_id, bos_id, eos_id):
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    common = dict(
        vocab_size=MODEL_VOCAB,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        hidden_act="silu",
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        use_cache=True,
        dtype="float32",
    )
    if arch == "llama":
        return LlamaConfig(
            **common,
            rms_norm_eps=1e-5,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": LLAMA3_ORIGINAL_MAX_POS,
            },
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
        )
    if arch == "mistral":
        return MistralConfig(
            **common,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            sliding_window=6,
            tie_word_embeddings=False,
        )
    if arch == "qwen2":
        return Qwen2Config(
            **common,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            tie_word_embeddings=True,
            use_sliding_window=False,
        )
    if arch == "qwen3":
        return Qwen3Config(
            **common,
            head_dim=32,
            attention_bias=False,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            tie_word_embeddings=True,
            use_sliding_window=False,
        )
    if arch == "gemma2":
        gemma = {k: v for k, v in common.items() if k != "hidden_act"}
        return Gemma2Config(
            **gemma,
            head_dim=24,
            query_pre_attn_scalar=20,
            hidden_act="gelu_pytorch_tanh",
            hidden_activation="gelu_pytorch_tanh",
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            sliding_window=6,
            attn_logit_softcapping=3.0,
            final_logit_softcapping=2.5,
            tie_word_embeddings=True,
        )
    if arch == "gemma3":
        gemma = {k: v for k, v in common.items() if k not in ("hidden_act", "num_hidden_layers")}
        return Gemma3TextConfig(
            **gemma,
            num_hidden_layers=3,
            head_dim=32,
            query_pre_attn_scalar=24,
            hidden_activation="gelu_pytorch_tanh",
            rms_norm_eps=1e-6,
            sliding_window=5,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
            },
            tie_word_embeddings=True,
        )
    if arch == "phi3":
        # max_position_embeddings 128 over an original 12: longrope's attention factor
        # sqrt(1 + ln(128/12) / ln 12) = 1.40.
        return Phi3Config(
            **{**common, "max_position_embeddings": 128},
            rms_norm_eps=1e-5,
            original_max_position_embeddings=PHI3_ORIGINAL_MAX_POS,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "short_factor": [1.0, 1.2, 1.5, 2.5],
                "long_factor": [1.5, 3.0, 6.0, 12.0],
            },
            tie_word_embeddings=False,
        )
    raise ValueError(arch)


# Each family feature of the new fixtures, turned off or changed through a config override: the
# logits must change, or matching them would prove nothing about the feature.
FEATURE_CHECKS = {
    "gemma2": {
        "attn_logit_softcapping": {"attn_logit_softcapping": None},
        "final_logit_softcapping": {"final_logit_softcapping": None},
        "sliding_window": {"layer_types": ["full_attention", "full_attention"]},
        "query_pre_attn_scalar": {"query_pre_attn_scalar": 24},
    },
    "gemma3": {
        "local_rope": {
            "rope_parameters": {
                "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
            }
        },
        "rope_scaling": {
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            }
        },
        "sliding_window": {"layer_types": ["full_attention"] * 3},
    },
    "phi3": {
        "longrope_long_factors": {"original_max_position_embeddings": 64},
        "partial_rotary_factor": {
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 1.0,
                "short_factor": [1.0, 1.2, 1.5, 2.5, 1.0, 1.0, 1.0, 1.0],
                "long_factor": [1.5, 3.0, 6.0, 12.0, 1.0, 1.0, 1.0, 1.0],
                "original_max_position_embeddings": PHI3_ORIGINAL_MAX_POS,
            }
        },
    },
}


@torch.no_grad()
def reinit_weights(model, seed):
    """Re-initialise with larger weights so that logits are far from zero."""
    torch.manual_seed(seed)
    emb = model.get_input_embeddings()
    hidden = emb.weight.shape[1]
    touched = set()
    for name, mod in model.named_modules():
        if type(mod).__name__.endswith("RMSNorm"):
            # Gemma's norms scale by (1 + w), so their weights sit around 0.
            # Gemma's final norm at about 8 keeps its logits (through the smaller tied
            # embeddings, below) at the spread of the other fixtures.
            centre = 0.0 if type(mod).__name__.startswith("Gemma") else 1.0
            if type(mod).__name__.startswith("Gemma") and name == "model.norm":
                centre = 7.0
            mod.weight.copy_(centre + 0.2 * torch.randn_like(mod.weight))
            touched.add(id(mod.weight))
        elif isinstance(mod, nn.Embedding):
            # Gemma multiplies embeddings by sqrt(hidden): smaller rows keep the tiny model from
            # only copying its input token through the tied head.
            std = 0.125 if "Gemma" in type(mod).__name__ else 1.0
            mod.weight.copy_(std * torch.randn_like(mod.weight) / math.sqrt(hidden))
            touched.add(id(mod.weight))
        elif isinstance(mod, nn.Linear):
            if id(mod.weight) in touched:  # tied lm_head shares the embedding matrix
                continue
            fan_in = mod.weight.shape[1]
            mod.weight.copy_(torch.randn_like(mod.weight) / math.sqrt(fan_in))
            touched.add(id(mod.weight))
            if mod.bias is not None:
                mod.bias.copy_(0.1 * torch.randn_like(mod.bias))
                touched.add(id(mod.bias))
    for name, p in model.named_parameters():
        assert id(p) in touched, f"parameter not re-initialised: {name}"


def load_base(arch, **overrides):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        f"{MODELS_REL}/{arch}", attn_implementation="eager", dtype=torch.float32, **overrides
    )
    model.eval()
    return model


@torch.no_grad()
def run_logits(model, inputs):
    return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.float()


def make_inputs(pad_id):
    g = torch.Generator().manual_seed(2024)
    input_ids = torch.randint(20, TOKENIZER_VOCAB, (2, T), generator=g, dtype=torch.int64)
    attention_mask = torch.ones(2, T, dtype=torch.int64)
    input_ids[1, ROW1_LEN:] = pad_id
    attention_mask[1, ROW1_LEN:] = 0
    labels = torch.full((2, T), -100, dtype=torch.int64)
    for row, (s, e) in enumerate(RESPONSE_RANGES):
        labels[row, s:e] = input_ids[row, s:e]
    assert (attention_mask[labels != -100] == 1).all()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def sequence_logps(logits, labels):
    """TRL-style summed log-probs of the response tokens (labels != -100)."""
    logits = logits[:, :-1, :].float()
    labels = labels[:, 1:].clone()
    mask = labels != -100
    labels[~mask] = 0
    per_token = torch.gather(logits.log_softmax(-1), 2, labels.unsqueeze(2)).squeeze(2)
    return (per_token * mask).sum(-1)


def build_model(arch, tok, inputs_for_check):
    from transformers import AutoModelForCausalLM, GenerationConfig

    spec = TOKEN_SPEC[arch]
    pad_id = tok.token_to_id("<|endoftext|>")
    eos_id = tok.token_to_id(spec["eos"])
    bos_id = tok.token_to_id(spec["bos"]) if spec["bos"] is not None else pad_id
    cfg = make_config(arch, pad_id, bos_id, eos_id)
    torch.manual_seed(SEEDS[arch])
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    reinit_weights(model, SEEDS[arch])
    model.eval()
    gen_eos = [tok.token_to_id(t) for t in GEN_EOS[arch]] if arch in GEN_EOS else eos_id
    model.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=gen_eos, pad_token_id=pad_id)

    out = REPO / MODELS_REL / arch
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    save_kwargs = dict(safe_serialization=True)
    if arch == "llama":
        save_kwargs["max_shard_size"] = "300KB"
    model.save_pretrained(str(out), **save_kwargs)
    tok.save(str(out / "tokenizer.json"))
    write_json(out / "tokenizer_config.json", tokenizer_config(tok, arch))

    files = sorted(p.name for p in out.iterdir())
    if arch == "llama":
        assert "model.safetensors.index.json" in files, files
        shards = [f for f in files if f.startswith("model-") and f.endswith(".safetensors")]
        assert len(shards) >= 2, files
    else:
        assert "model.safetensors" in files, files

    # Reload from disk: the golden numbers always come from the on-disk model.
    mem_logits = run_logits(model, inputs_for_check)
    reloaded = load_base(arch)
    disk_logits = run_logits(reloaded, inputs_for_check)
    assert torch.equal(mem_logits, disk_logits), (arch, (mem_logits - disk_logits).abs().max())
    info = {"files": files, "logit_std": float(disk_logits.std()), "max_abs_logit": float(disk_logits.abs().max())}
    log(f"[{arch}] files: {files}")
    log(f"[{arch}] logits std {info['logit_std']:.4f}, max |logit| {info['max_abs_logit']:.4f}")
    assert 0.5 <= info["logit_std"] <= 3.0, info

    # Tied-embedding handling on save.
    weight_keys = set()
    for f in files:
        if f.endswith(".safetensors"):
            with safe_open(str(out / f), "pt") as fh:
                weight_keys |= set(fh.keys())
    info["lm_head_saved"] = "lm_head.weight" in weight_keys
    log(f"[{arch}] tie_word_embeddings={cfg.tie_word_embeddings}, lm_head.weight on disk: {info['lm_head_saved']}")

    # Architecture-specific sanity checks.
    if arch == "mistral":
        nowin = load_base(arch, sliding_window=None)
        d = float((run_logits(nowin, inputs_for_check) - disk_logits).abs().max())
        log(f"[{arch}] max |logits(sliding_window=6) - logits(sliding_window=None)| = {d:.4f}")
        assert d > 1e-3, d
        info["sliding_window_effect"] = d
    if arch == "llama":
        plain = load_base(arch, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
        assert plain.config.rope_parameters["rope_type"] == "default"
        d = float((run_logits(plain, inputs_for_check) - disk_logits).abs().max())
        log(f"[{arch}] max |logits(llama3 rope scaling) - logits(no scaling)| = {d:.4f}")
        assert d > 1e-3, d
        info["rope_scaling_effect"] = d
        rp = reloaded.config.rope_parameters
        hi_wl = rp["original_max_position_embeddings"] / rp["high_freq_factor"]
        lo_wl = rp["original_max_position_embeddings"] / rp["low_freq_factor"]
        head_dim = reloaded.config.head_dim
        wl = [2 * math.pi * rp["rope_theta"] ** (k / head_dim) for k in range(0, head_dim, 2)]
        branches = ["keep" if w < hi_wl else "divide" if w > lo_wl else "smooth" for w in wl]
        log(f"[{arch}] llama3 rope branches per frequency: {branches}")
        assert {"keep", "smooth", "divide"} <= set(branches), branches
    if arch == "qwen3":
        sd = reloaded.state_dict()
        assert sd["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 32, 64)
        assert sd["model.layers.0.self_attn.q_norm.weight"].shape == (32,)
    if arch == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in reloaded.state_dict()
    for key, overrides in FEATURE_CHECKS.get(arch, {}).items():
        changed = load_base(arch, **overrides)
        d = float((run_logits(changed, inputs_for_check) - disk_logits).abs().max())
        log(f"[{arch}] max |logits - logits with {key} changed ({overrides})| = {d:.4f}")
        assert d > 1e-3, (arch, key, d)
        info[f"{key}_effect"] = d

    rendered = check_tokenizer(str(out), arch, tok)
    log(f"[{arch}] chat template renders: {rendered!r}")
    return info


# ----------------------------------------------------------------------------
# Adapters
# ----------------------------------------------------------------------------


def lora_configs(arch):
    from peft import LoraConfig

    rslora_targets = ["q_proj", "v_proj", "o_proj", "down_proj"]
    if arch == "phi3":
        rslora_targets = ["qkv_proj", "o_proj", "down_proj"]
    return {
        "peft": LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            target_modules="all-linear",
            use_rslora=False,
            task_type="CAUSAL_LM",
            bias="none",
        ),
        "peft_rslora": LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            target_modules=rslora_targets,
            use_rslora=True,
            task_type="CAUSAL_LM",
        ),
    }


def disk_key(param_name):
    """In-memory PEFT parameter name -> key in adapter_model.safetensors."""
    return param_name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


def build_adapter(arch, kind, cfg, seed):
    from peft import get_peft_model

    base = load_base(arch)
    pm = get_peft_model(base, cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(0.3 * torch.randn_like(p))
    out = REPO / ADAPTERS_REL / f"{arch}_{kind}"
    if out.exists():
        shutil.rmtree(out)
    pm.save_pretrained(str(out))
    # PEFT turns "all-linear" into a python set, whose order depends on the hash seed.
    cfg_path = out / "adapter_config.json"
    adapter_cfg = json.loads(cfg_path.read_text())
    if isinstance(adapter_cfg.get("target_modules"), list):
        adapter_cfg["target_modules"] = sorted(adapter_cfg["target_modules"])
    write_json(cfg_path, adapter_cfg)
    return out


def load_peft(arch, folder, trainable=False):
    from peft import PeftModel

    base = load_base(arch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(base, str(folder), is_trainable=trainable)
    pm.eval()
    return pm, [str(w.message) for w in caught]


def check_loaded_weights(pm, folder):
    """Every tensor in the file must be in the model (exactly), and every LoRA param must come from the file."""
    problems = []
    file_sd = load_file(str(Path(folder) / "adapter_model.safetensors"))
    model_lora = {disk_key(n): p for n, p in pm.named_parameters() if ".lora_" in n}
    missing = sorted(set(model_lora) - set(file_sd))
    unexpected = sorted(set(file_sd) - set(model_lora))
    if missing:
        problems.append(f"LoRA params not in file (left at init): {missing[:5]}{'...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"file keys not used by the model: {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for k in sorted(set(model_lora) & set(file_sd)):
        if model_lora[k].shape != file_sd[k].shape:
            problems.append(f"shape mismatch {k}: model {tuple(model_lora[k].shape)} file {tuple(file_sd[k].shape)}")
        elif not torch.equal(model_lora[k].detach().float(), file_sd[k].float()):
            problems.append(f"value mismatch after load: {k}")
    return problems


def build_golden(arch, inputs, model_info):
    adapters = {}
    for i, (kind, cfg) in enumerate(lora_configs(arch).items()):
        adapters[kind] = build_adapter(arch, kind, cfg, SEEDS[arch] * 10 + i)

    base = load_base(arch)
    logits_base = run_logits(base, inputs)
    logps_base = sequence_logps(logits_base, inputs["labels"])

    tensors = {
        "input_ids": inputs["input_ids"],
        "attention_mask": inputs["attention_mask"],
        "labels": inputs["labels"],
        "logits_base": logits_base,
    }
    effect = {}
    for kind, folder in adapters.items():
        pm, warns = load_peft(arch, folder)
        bad = [w for w in warns if "missing" in w.lower() or "unexpected" in w.lower()]
        assert not bad, bad
        problems = check_loaded_weights(pm, folder)
        assert not problems, problems
        logits = run_logits(pm, inputs)
        tensors[f"logits_{kind}"] = logits
        effect[kind] = float((logits - logits_base).abs().max())
        log(f"[{arch}] adapter {kind}: max |logits_{kind} - logits_base| = {effect[kind]:.4f}")
        assert effect[kind] > 0.1, effect
    tensors["logps_base"] = logps_base
    tensors["logps_peft"] = sequence_logps(tensors["logits_peft"], inputs["labels"])

    # Gradients of loss = sum over the batch of summed response log-probs.
    pm, _ = load_peft(arch, adapters["peft"], trainable=True)
    pm.eval()
    out = pm(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    logps = sequence_logps(out.logits, inputs["labels"])
    torch.testing.assert_close(logps.detach(), tensors["logps_peft"], rtol=0, atol=1e-5)
    logps.sum().backward()
    file_keys = set(load_file(str(adapters["peft"] / "adapter_model.safetensors")).keys())
    grads = {}
    for name, p in pm.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            assert p.requires_grad and p.grad is not None, name
            assert p.grad.abs().max() > 0, f"zero gradient: {name}"
            key = disk_key(name)
            assert key in file_keys, key
            grads["grad." + key] = p.grad.detach().clone().contiguous()
        else:
            assert not p.requires_grad and p.grad is None, f"base param has grad: {name}"
    assert {k[len("grad."):] for k in grads} == file_keys
    tensors.update(grads)

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(REPO / GOLDEN_REL / f"{arch}.safetensors"))
    log(f"[{arch}] logps_base {tensors['logps_base'].tolist()}, logps_peft {tensors['logps_peft'].tolist()}")
    log(f"[{arch}] {len(grads)} LoRA gradients stored")

    return {
        "T": T,
        "vocab_size": MODEL_VOCAB,
        "tokenizer_vocab_size": TOKENIZER_VOCAB,
        "pad_token_id": int(base.config.pad_token_id),
        "response_ranges": [list(r) for r in RESPONSE_RANGES],
        "response_ranges_note": "half-open [start, end) label positions per batch row",
        "max_abs_logits": float(logits_base.abs().max()),
        "logits_std": model_info["logit_std"],
        "max_abs_logits_peft_minus_base": effect["peft"],
        "max_abs_logits_peft_rslora_minus_base": effect["peft_rslora"],
        "lm_head_saved": model_info["lm_head_saved"],
        **{k: v for k, v in model_info.items() if k.endswith("_effect")},
    }


def cmd_build():
    tok = build_tokenizer()
    tok_new = build_tokenizer(SPECIAL_TOKENS + EXTRA_SPECIAL_TOKENS)
    pad_id = tok.token_to_id("<|endoftext|>")
    assert tok_new.token_to_id("<|endoftext|>") == pad_id
    inputs = make_inputs(pad_id)
    (REPO / GOLDEN_REL).mkdir(parents=True, exist_ok=True)
    meta = {"versions": versions(), "archs": {}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for arch in ARCHS:
            info = build_model(arch, tok_new if arch in NEW_ARCHS else tok, inputs)
            meta["archs"][arch] = build_golden(arch, inputs, info)
    seen = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    for w in seen:
        log(f"warning seen during build: {w[:300]}")
    write_json(REPO / GOLDEN_REL / "meta.json", meta)
    log("build done")


# ----------------------------------------------------------------------------
# verify-lorafold
# ----------------------------------------------------------------------------


def check_adapter_config(cfg, ref_cfg, file_shapes):
    problems = []

    def expect(key, pred, desc):
        if key not in cfg:
            problems.append(f"missing key {key}")
        elif not pred(cfg[key]):
            problems.append(f"{key}={cfg[key]!r}, expected {desc}")

    expect("peft_type", lambda v: v == "LORA", "'LORA'")
    expect("task_type", lambda v: v == "CAUSAL_LM", "'CAUSAL_LM'")
    expect("bias", lambda v: v == "none", "'none'")
    expect("use_dora", lambda v: v is False, "false")
    expect("fan_in_fan_out", lambda v: v is False, "false")
    expect("inference_mode", lambda v: v is True, "true")
    expect("use_rslora", lambda v: isinstance(v, bool), "a bool")
    expect("lora_dropout", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0, "a number")
    expect("lora_alpha", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, "> 0")
    expect("base_model_name_or_path", lambda v: isinstance(v, str) and v != "", "a non-empty string")
    a_ranks = {shape[0] for k, shape in file_shapes.items() if ".lora_A." in k}
    expect("r", lambda v: isinstance(v, int) and not isinstance(v, bool) and a_ranks == {v}, f"the lora_A rank {a_ranks}")
    # Module paths as PEFT matches them, e.g. "model.layers.0.self_attn.q_proj".
    modules = {k.split(".lora_")[0].removeprefix("base_model.model.") for k in file_shapes}

    def targets_ok(v):
        # PEFT semantics: a list entry matches a module if it equals its path or is a "."-suffix of it
        # (so both ["q_proj", ...] and the full paths PEFT itself writes for "all-linear" are fine).
        if v == "all-linear":
            return True
        if not isinstance(v, list) or not all(isinstance(t, str) for t in v):
            return False

        def hit(t, m):
            return m == t or m.endswith("." + t)

        return all(any(hit(t, m) for t in v) for m in modules) and all(any(hit(t, m) for m in modules) for t in v)

    expect("target_modules", targets_ok, "'all-linear' or a list matching exactly the adapted modules")
    # Same hyper-parameters as the PEFT-made reference adapter (r 4, alpha 8, all-linear).
    for key in ("r", "lora_alpha", "use_rslora"):
        if key in cfg and cfg[key] != ref_cfg[key]:
            problems.append(f"{key}={cfg[key]!r} differs from the reference adapter ({ref_cfg[key]!r})")
    return problems


def shapes_of(path):
    with safe_open(str(path), "pt") as fh:
        return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}


def verify_one(arch, folder, golden):
    import peft

    res = {
        "max_abs_logit_diff": None,
        "max_abs_logit_diff_incl_padding": None,
        "keys_match": False,
        "config_ok": False,
        "load_ok": False,
        "peft_version": peft.__version__,
        "problems": [],
    }
    problems = res["problems"]
    for f in ("adapter_config.json", "adapter_model.safetensors", "lorafold_logits.safetensors"):
        if not (folder / f).is_file():
            problems.append(f"missing file {f}")
    if problems:
        return res

    ref_folder = REPO / ADAPTERS_REL / f"{arch}_peft"
    ref_shapes = shapes_of(ref_folder / "adapter_model.safetensors")
    got_shapes = shapes_of(folder / "adapter_model.safetensors")
    res["keys_match"] = got_shapes == ref_shapes
    if not res["keys_match"]:
        only_ref = sorted(set(ref_shapes) - set(got_shapes))
        only_got = sorted(set(got_shapes) - set(ref_shapes))
        diff_shape = sorted(k for k in set(ref_shapes) & set(got_shapes) if ref_shapes[k] != got_shapes[k])
        problems.append(f"keys only in reference: {only_ref[:5]} ({len(only_ref)})")
        problems.append(f"keys only in lorafold: {only_got[:5]} ({len(only_got)})")
        problems.append(f"shape differences: {[(k, ref_shapes[k], got_shapes[k]) for k in diff_shape[:5]]}")

    try:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        ref_cfg = json.loads((ref_folder / "adapter_config.json").read_text())
        cfg_problems = check_adapter_config(cfg, ref_cfg, got_shapes)
    except Exception as e:  # malformed json etc.
        cfg_problems = [f"adapter_config.json unreadable: {e!r}"]
    res["config_ok"] = not cfg_problems
    problems.extend(cfg_problems)

    try:
        pm, warns = load_peft(arch, folder)
    except Exception as e:
        problems.append(f"PeftModel.from_pretrained failed: {e!r}")
        return res
    bad = [w for w in warns if "missing" in w.lower() or "unexpected" in w.lower()]
    load_problems = [f"load warning: {w}" for w in bad] + check_loaded_weights(pm, folder)
    res["load_ok"] = not load_problems
    problems.extend(load_problems)

    logits = run_logits(pm, golden)
    theirs = load_file(str(folder / "lorafold_logits.safetensors"))
    if "logits" not in theirs:
        problems.append("lorafold_logits.safetensors has no 'logits' tensor")
        return res
    theirs = theirs["logits"]
    if tuple(theirs.shape) != tuple(logits.shape):
        problems.append(f"logits shape {tuple(theirs.shape)}, expected {tuple(logits.shape)}")
        return res
    diff = (theirs.float() - logits).abs()
    # Gate on real (attention_mask == 1) positions; padded query positions are reported only.
    real = golden["attention_mask"].bool()
    res["max_abs_logit_diff"] = float(diff[real].max())
    res["max_abs_logit_diff_incl_padding"] = float(diff.max())
    if not math.isfinite(res["max_abs_logit_diff"]) or res["max_abs_logit_diff"] > VERIFY_TOL:
        problems.append(f"max abs logit diff {res['max_abs_logit_diff']:.3e} > {VERIFY_TOL}")
    return res


def cmd_verify():
    results = {}
    ok = True
    for arch in ARCHS:
        folder = REPO / LORAFOLD_REL / arch
        if not folder.is_dir():
            continue
        golden = load_file(str(REPO / GOLDEN_REL / f"{arch}.safetensors"))
        try:
            res = verify_one(arch, folder, golden)
        except Exception as e:
            res = {"keys_match": False, "config_ok": False, "problems": [f"exception: {e!r}"]}
        passed = not res["problems"]
        res["passed"] = passed
        ok &= passed
        results[arch] = res
        log(f"[{arch}] {'PASS' if passed else 'FAIL'}: diff={res.get('max_abs_logit_diff')}, "
            f"keys_match={res['keys_match']}, config_ok={res['config_ok']}")
        for p in res["problems"]:
            log(f"    - {p}")
    if not results:
        log(f"no adapters found under {LORAFOLD_REL}/<arch>/; nothing verified")
        ok = False
    write_json(REPO / GOLDEN_REL / "lorafold_adapter_check.json", results)
    return 0 if ok else 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", default="build", choices=["build", "verify-lorafold"])
    args = parser.parse_args()
    os.chdir(REPO)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    if args.command == "build":
        cmd_build()
        return 0
    return cmd_verify()


if __name__ == "__main__":
    sys.exit(main())
