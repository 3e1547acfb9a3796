"""Golden files for PEFT's LoRA options beyond plain LoRA (tests/it/peft_extras.rs).

    /work/venv/bin/python tests/golden/peft_extras.py build
    /work/venv/bin/python tests/golden/peft_extras.py verify   # after the Rust test wrote its adapters

``build`` writes, from the fixture models of generate.py (run that first):

* ``tests/fixtures/adapters/<name>/`` -- adapters saved by PEFT 0.21:
  - ``llama_dora``, ``phi3_dora``: DoRA (``use_dora``) on every linear layer, r 4, alpha 8, with
    random A and B and magnitudes moved off their initial row norms (so each term matters);
  - ``llama_patterns``: ``layers_to_transform`` [1], ``rank_pattern`` {q_proj: 2, down_proj: 6},
    ``alpha_pattern`` {k_proj: 3}, ``exclude_modules`` [up_proj];
  - ``llama_regex``: ``target_modules`` as a regex string (q/v of layer 0 and o_proj everywhere).
* ``tests/golden/peft_extras.safetensors`` -- per adapter: logits on generate.py's golden batch;
  for the DoRA adapters also the gradients of a DPO loss (row 0 chosen, row 1 rejected, the
  adapter off as reference, beta 0.1) for every A, B and magnitude, and the weights
  ``merge_and_unload`` gives; and a 5-step LoRA+ run (``create_loraplus_optimizer``, AdamW, lr
  1e-2, ratio 16, weight decay 0.1 on both groups) on that loss from ``llama_dora``: the adapter
  after the 5 steps and the loss of each step.
* ``tests/fixtures/adapters/llama_{pissa,olora}/`` and ``llama_{pissa,olora}_converted/`` --
  PiSSA and OLoRA (r 4, alpha 8, all linear layers) initialised by PEFT, A and B then moved
  (as training would) by 0.05·N(0, 1), saved unconverted (relative to the residual base PEFT
  rebuilds) and converted with ``path_initial_model_for_weight_conversion`` (a plain rank-8 LoRA
  of the untouched base). Goldens: the residual base weights right after initialisation, the
  logits with the moved adapter, and the weights ``merge_and_unload`` gives.
* ``tests/fixtures/adapters/{llama_modules_to_save, qwen2_modules_to_save_tied, llama_tokens}/`` --
  ``modules_to_save`` [lm_head, embed_tokens] on llama, [lm_head] with ``ensure_weight_tying``
  on the tied qwen2, and ``trainable_token_indices`` on llama, each with LoRA on q/v, the fully
  trained tensors moved off the base by 0.05·N(0, 1). Goldens: logits, the DPO gradients of
  every trainable tensor, merge_and_unload's weights.
* ``tests/golden/peft_extras.json`` -- what was made, with the settings.

``verify`` loads the adapters lorafold wrote (``tests/fixtures/lorafold_adapters/extras/<name>``,
written by ``LORAFOLD_WRITE_FIXTURES=1 cargo test --release --test it peft_extras``) in PEFT and
checks they give lorafold's logits (``lorafold_logits.safetensors`` next to each), writing
``tests/golden/peft_extras_check.json``.
"""

import json
import math
import os
import shutil
import sys
import warnings
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "tests/fixtures/models"
ADAPTERS = REPO / "tests/fixtures/adapters"
LORAFOLD = REPO / "tests/fixtures/lorafold_adapters/extras"
GOLDEN = REPO / "tests/golden"
BETA = 0.1
# Trainable token ids: three that occur in the golden batch and one that does not.
TOKEN_IDS = None
LORAPLUS = dict(lr=1e-2, loraplus_lr_ratio=16.0, weight_decay=0.1, steps=5)
TOL = 1e-4


def log(msg):
    print(msg, flush=True)


def load_base(arch):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(f"tests/fixtures/models/{arch}", attn_implementation="eager", dtype=torch.float32)
    return m.eval()


def inputs():
    g = load_file(str(GOLDEN / "llama.safetensors"))
    return {k: g[k] for k in ("input_ids", "attention_mask", "labels")}


def sequence_logps(logits, labels):
    logits = logits[:, :-1, :].float()
    labels = labels[:, 1:].clone()
    mask = labels != -100
    labels[~mask] = 0
    per_token = torch.gather(logits.log_softmax(-1), 2, labels.unsqueeze(2)).squeeze(2)
    return (per_token * mask).sum(-1)


def dpo_loss(pm, inp):
    """Sigmoid DPO loss with row 0 as chosen and row 1 as rejected; the reference is the base."""
    with torch.no_grad(), pm.disable_adapter():
        ref = sequence_logps(pm(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"]).logits, inp["labels"])
    pol = sequence_logps(pm(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"]).logits, inp["labels"])
    margin = (pol[0] - ref[0]) - (pol[1] - ref[1])
    return -F.logsigmoid(BETA * margin)


def disk_key(name):
    """In-memory parameter name -> the key PEFT writes (magnitudes lose their `.weight`)."""
    name = name.replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector")
    return name.replace(".modules_to_save.default", "").replace(".default", "")


def configs():
    from peft import LoraConfig

    common = dict(lora_dropout=0.0, task_type="CAUSAL_LM", bias="none")
    return {
        "llama_dora": ("llama", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True, **common)),
        "phi3_dora": ("phi3", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True, **common)),
        "llama_patterns": (
            "llama",
            LoraConfig(
                r=4,
                lora_alpha=8,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                layers_to_transform=[1],
                rank_pattern={"q_proj": 2, "down_proj": 6},
                alpha_pattern={"k_proj": 3},
                exclude_modules=["up_proj"],
                **common,
            ),
        ),
        "llama_modules_to_save": (
            "llama",
            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                       modules_to_save=["lm_head", "embed_tokens"], **common),
        ),
        "qwen2_modules_to_save_tied": (
            "qwen2",
            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
                       ensure_weight_tying=True, **common),
        ),
        "llama_tokens": (
            "llama",
            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                       trainable_token_indices={"embed_tokens": TOKEN_IDS}, **common),
        ),
        "llama_regex": (
            "llama",
            LoraConfig(
                r=4,
                lora_alpha=8,
                target_modules=r"model\.layers\.0\.self_attn\.(q|v)_proj|.*\.o_proj",
                **common,
            ),
        ),
    }


@torch.no_grad()
def randomise(pm, seed):
    torch.manual_seed(seed)
    for name, p in pm.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            p.copy_(0.3 * torch.randn_like(p))
    # Magnitudes start at the row norms of W + sBA for the A and B they were made with; move them
    # off, so that both terms of the DoRA output depend on them.
    for name, p in pm.named_parameters():
        if "lora_magnitude_vector" in name:
            p.mul_(1.0 + 0.2 * torch.randn_like(p))
        elif p.requires_grad and ("modules_to_save" in name or "trainable_tokens_delta" in name):
            p.add_(0.05 * torch.randn_like(p))


def build_one(name, arch, cfg, seed, inp, tensors, info):
    from peft import PeftModel, get_peft_model

    pm = get_peft_model(load_base(arch), cfg)
    randomise(pm, seed)
    out = ADAPTERS / name
    if out.exists():
        shutil.rmtree(out)
    pm.save_pretrained(str(out))
    (out / "README.md").unlink(missing_ok=True)
    c = json.loads((out / "adapter_config.json").read_text())
    if isinstance(c.get("target_modules"), list):
        c["target_modules"] = sorted(c["target_modules"])
    for key in ("exclude_modules",):
        if isinstance(c.get(key), list):
            c[key] = sorted(c[key])
    (out / "adapter_config.json").write_text(json.dumps(c, indent=2) + "\n")
    keys = sorted(load_file(str(out / "adapter_model.safetensors")))

    # Reload from disk: the goldens come from the saved files.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(load_base(arch), str(out), is_trainable=True)
    pm.eval()
    with torch.no_grad():
        base = load_base(arch)(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"]).logits
        logits = pm(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"]).logits
    effect = float((logits - base).abs().max())
    assert effect > 0.1, (name, effect)
    tensors[f"{name}/logits"] = logits.contiguous()
    entry = {"arch": arch, "keys": keys, "adapter_effect": effect}
    if cfg.use_dora or cfg.modules_to_save or cfg.trainable_token_indices:
        loss = dpo_loss(pm, inp)
        loss.backward()
        n = 0
        for pname, p in pm.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and p.grad.abs().max() > 0, pname
                tensors[f"{name}/grad/{disk_key(pname)}"] = p.grad.detach().clone().contiguous()
                n += 1
        entry["dpo_loss"] = float(loss.detach())
        entry["gradients"] = n
        if cfg.use_dora:
            # Magnitudes must matter for the gradient check to mean anything.
            entry["magnitude_keys"] = sum("lora_magnitude_vector" in k for k in keys)
            assert entry["magnitude_keys"] > 0
        base_sd = load_base(arch).state_dict()
        merged = pm.merge_and_unload().state_dict()
        changed = sorted(k for k in merged if k in base_sd and not torch.equal(merged[k], base_sd[k]))
        for k in changed:
            tensors[f"{name}/merged/{k}"] = merged[k].clone().contiguous()
        entry["merged_tensors"] = len(changed)
    info[name] = entry
    log(f"[{name}] {len(keys)} tensors; adapter effect {effect:.3f}; {entry.get('gradients', 0)} gradients")


def principal_one(kind, inp, tensors, info):
    """PiSSA / OLoRA on llama, saved both ways."""
    from peft import LoraConfig, PeftModel, get_peft_model

    name = f"llama_{kind}"
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=kind,
                     lora_dropout=0.0, task_type="CAUSAL_LM", bias="none")
    pm = get_peft_model(load_base("llama"), cfg)
    for mod_name, mod in pm.base_model.model.named_modules():
        if hasattr(mod, "lora_A") and "default" in mod.lora_A:
            tensors[f"{name}/residual/{mod_name}.weight"] = (
                mod.base_layer.weight.detach().clone().contiguous())
    init_dir = ADAPTERS / f"{name}_init"
    if init_dir.exists():
        shutil.rmtree(init_dir)
    pm.peft_config["default"].init_lora_weights = True
    pm.save_pretrained(str(init_dir))
    pm.peft_config["default"].init_lora_weights = kind
    torch.manual_seed(9300 + len(kind))
    with torch.no_grad():
        for pname, p in pm.named_parameters():
            if ".lora_A." in pname or ".lora_B." in pname:
                p.add_(0.05 * torch.randn_like(p))
    with torch.no_grad():
        logits = pm(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"]).logits
    tensors[f"{name}/logits"] = logits.contiguous()
    for folder, kw in [(ADAPTERS / name, {}), (ADAPTERS / f"{name}_converted",
                                               {"path_initial_model_for_weight_conversion": str(init_dir)})]:
        if folder.exists():
            shutil.rmtree(folder)
        pm.save_pretrained(str(folder), **kw)
        (folder / "README.md").unlink(missing_ok=True)
        c = json.loads((folder / "adapter_config.json").read_text())
        c["base_model_name_or_path"] = "tests/fixtures/models/llama"
        if isinstance(c.get("target_modules"), list):
            c["target_modules"] = sorted(c["target_modules"])
        (folder / "adapter_config.json").write_text(json.dumps(c, indent=2) + "\n")
    shutil.rmtree(init_dir)
    # Both forms give the moved adapter's logits when PEFT loads them on the untouched base.
    diffs = {}
    for folder in (name, f"{name}_converted"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            re = PeftModel.from_pretrained(load_base("llama"), str(ADAPTERS / folder)).eval()
        with torch.no_grad():
            got = re(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"]).logits
        diffs[folder] = float((got - logits).abs().max())
        assert diffs[folder] < 1e-4, (folder, diffs[folder])
        if folder == name:
            base_sd = load_base("llama").state_dict()
            merged = re.merge_and_unload().state_dict()
            for k in sorted(merged):
                if k in base_sd and not torch.equal(merged[k], base_sd[k]):
                    tensors[f"{name}/merged/{k}"] = merged[k].clone().contiguous()
    conv = json.loads((ADAPTERS / f"{name}_converted" / "adapter_config.json").read_text())
    info[name] = {"init": kind, "reload_logit_diff": diffs, "converted_r": conv["r"],
                  "converted_alpha": conv["lora_alpha"], "converted_init": conv["init_lora_weights"]}
    log(f"[{name}] reload diffs {diffs}; converted r {conv['r']} alpha {conv['lora_alpha']}")


def loraplus_run(inp, tensors, info):
    from peft import PeftModel
    from peft.optimizers import create_loraplus_optimizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(load_base("llama"), str(ADAPTERS / "llama_dora"), is_trainable=True)
    pm.eval()
    opt = create_loraplus_optimizer(
        pm,
        torch.optim.AdamW,
        lr=LORAPLUS["lr"],
        loraplus_lr_ratio=LORAPLUS["loraplus_lr_ratio"],
        loraplus_weight_decay=LORAPLUS["weight_decay"],
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    groups = [
        {"lr": g["lr"], "weight_decay": g["weight_decay"], "params": len(g["params"])} for g in opt.param_groups
    ]
    losses = []
    for _ in range(LORAPLUS["steps"]):
        opt.zero_grad()
        loss = dpo_loss(pm, inp)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    for pname, p in pm.named_parameters():
        if p.requires_grad:
            tensors[f"loraplus/final/{disk_key(pname)}"] = p.detach().clone().contiguous()
    info["loraplus"] = {"adapter": "llama_dora", **LORAPLUS, "groups": groups, "losses": losses}
    log(f"[loraplus] groups {groups}; losses {losses}")


def cmd_build():
    import peft

    global TOKEN_IDS
    inp = inputs()
    TOKEN_IDS = [int(t) for t in inp["input_ids"][0, 2:5]] + [7]
    tensors, info = {}, {}
    for i, (name, (arch, cfg)) in enumerate(configs().items()):
        build_one(name, arch, cfg, 9100 + i, inp, tensors, info)
    loraplus_run(inp, tensors, info)
    for kind in ("pissa", "olora"):
        principal_one(kind, inp, tensors, info)
    save_file(tensors, str(GOLDEN / "peft_extras.safetensors"))
    doc = {"versions": {"torch": torch.__version__, "peft": peft.__version__}, "beta": BETA, "adapters": info}
    (GOLDEN / "peft_extras.json").write_text(json.dumps(doc, indent=1) + "\n")
    log("build done")


def cmd_verify():
    from peft import PeftModel

    inp = inputs()
    results, ok = {}, True
    for folder in sorted(p for p in LORAFOLD.iterdir() if p.is_dir()):
        arch = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"].split("/")[-1]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pm = PeftModel.from_pretrained(load_base(arch), str(folder))
        pm.eval()
        bad = [str(w.message) for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
        with torch.no_grad():
            logits = pm(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"]).logits
        want = load_file(str(folder / "lorafold_logits.safetensors"))["logits"]
        diff = float((logits - want).abs().max())
        passed = diff <= TOL and not bad
        ok &= passed
        results[folder.name] = {"max_abs_logit_diff": diff, "load_warnings": bad, "passed": passed}
        log(f"[{folder.name}] {'PASS' if passed else 'FAIL'}: diff {diff:.3e} {bad}")
    (GOLDEN / "peft_extras_check.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0 if ok else 1


def main():
    os.chdir(REPO)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    cmd = sys.argv[1] if len(sys.argv) > 1 else "build"
    if cmd == "build":
        cmd_build()
        return 0
    if cmd == "verify":
        return cmd_verify()
    raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    sys.exit(main())
