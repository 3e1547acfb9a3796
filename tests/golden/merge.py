"""Golden files for ``lorafold merge`` (tests/it/merge.rs), from transformers + PEFT.

Two stages, run from anywhere (the script chdirs to the repository root):

    /work/venv/bin/python tests/golden/merge.py build
    /work/venv/bin/python tests/golden/merge.py verify

``build`` makes

* ``tests/fixtures/merge_adapters/<arch>_b/`` -- a second PEFT adapter per combination arch
  (r 4 like ``<arch>_peft``, rsLoRA, alpha 6, targets q/k/v/o/up), so ``linear`` and ``ties``
  (which need equal ranks) and modules adapted by only some adapters are exercised.
* ``tests/golden/merge_peft_rslora.safetensors`` -- PEFT ``merge_and_unload`` of every
  ``<arch>_peft_rslora`` adapter: the merged weight of each adapted module, keyed
  ``<arch>/<tensor name>``.
* ``tests/golden/merge_combos.safetensors`` + ``merge_combos.json`` -- PEFT
  ``add_weighted_adapter`` results (lora_A / lora_B of the new adapter, keyed
  ``<arch>/<combo>/<PEFT key>``) for the deterministic combinations, and the arguments used.

``verify`` checks the merged folders that the Rust test writes with
``LORAFOLD_WRITE_FIXTURES=1`` into ``tests/fixtures/merged/<arch>/`` (base + ``<arch>_peft``, llama
sharded): every tensor against PEFT's ``merge_and_unload`` (max abs diff, untouched tensors
bit-identical), the tensor names against the base checkpoint (tied lm_head not duplicated),
the shard index, and that transformers loads the folder (no missing / unexpected keys) and
gives PEFT's unmerged logits. It writes ``tests/golden/merge_check.json`` and exits non-zero
when a check fails.
"""

import argparse
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
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"]
COMBO_ARCHS = ["qwen2"]
MODELS = "tests/fixtures/models"
ADAPTERS = "tests/fixtures/adapters"
MERGE_ADAPTERS = "tests/fixtures/merge_adapters"
MERGED = "tests/fixtures/merged"
GOLDEN = "tests/golden"
SEEDS = {"llama": 111, "mistral": 222, "qwen2": 333, "qwen3": 444, "gemma2": 555, "gemma3": 666, "phi3": 777}
MERGE_TOL = 1e-6
LOGIT_TOL = 1e-4

# Deterministic combinations compared with PEFT. Adapter names: "peft", "peft_rslora" (the
# generate.py fixtures) and "b" (made here).
COMBOS = {
    "linear": dict(adapters=["peft", "b"], weights=[0.7, 0.3], combination_type="linear"),
    "linear_negative": dict(adapters=["peft", "b"], weights=[1.0, -0.5], combination_type="linear"),
    "cat": dict(adapters=["peft", "peft_rslora", "b"], weights=[0.6, 0.9, -0.4], combination_type="cat"),
    "svd": dict(adapters=["peft", "peft_rslora"], weights=[0.7, 0.3], combination_type="svd"),
    "svd_rank6": dict(adapters=["peft", "b"], weights=[1.0, 0.5], combination_type="svd", svd_rank=6),
    "ties": dict(adapters=["peft", "b"], weights=[0.7, 0.3], combination_type="ties", density=0.5),
    "ties_frequency": dict(
        adapters=["peft", "b"],
        weights=[0.7, 0.3],
        combination_type="ties",
        density=0.6,
        majority_sign_method="frequency",
    ),
    "ties_svd": dict(adapters=["peft", "peft_rslora"], weights=[0.7, 0.3], combination_type="ties_svd", density=0.5),
    "magnitude_prune": dict(adapters=["peft", "b"], weights=[0.5, 0.5], combination_type="magnitude_prune", density=0.3),
    "magnitude_prune_svd": dict(
        adapters=["peft", "b"], weights=[0.5, 0.5], combination_type="magnitude_prune_svd", density=0.5, svd_rank=4
    ),
}


def log(msg):
    print(msg, flush=True)


def write_json(path, obj):
    Path(path).write_text(json.dumps(obj, indent=2) + "\n")


def versions():
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def load_base(arch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(f"{MODELS}/{arch}", attn_implementation="eager", dtype=torch.float32)
    model.eval()
    return model


def adapter_dir(arch, name):
    if name == "b":
        return REPO / MERGE_ADAPTERS / f"{arch}_b"
    return REPO / ADAPTERS / f"{arch}_{name}"


def peft_model(arch, names):
    """Base + the named adapters (adapter names a0, a1, ...), eval mode."""
    from peft import PeftModel

    base = load_base(arch)
    pm = PeftModel.from_pretrained(base, str(adapter_dir(arch, names[0])), adapter_name="a0")
    for i, n in enumerate(names[1:], start=1):
        pm.load_adapter(str(adapter_dir(arch, n)), adapter_name=f"a{i}")
    pm.eval()
    return pm


def on_disk_names(folder):
    names = set()
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            names |= set(fh.keys())
    return names


def read_folder(folder):
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# ----------------------------------------------------------------------------
# build
# ----------------------------------------------------------------------------


def build_second_adapter(arch):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=4,
        lora_alpha=6,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"],
        use_rslora=True,
        task_type="CAUSAL_LM",
    )
    pm = get_peft_model(load_base(arch), cfg)
    torch.manual_seed(SEEDS[arch])
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(0.3 * torch.randn_like(p))
    out = adapter_dir(arch, "b")
    if out.exists():
        shutil.rmtree(out)
    pm.save_pretrained(str(out))
    (out / "README.md").unlink(missing_ok=True)
    cfg_path = out / "adapter_config.json"
    c = json.loads(cfg_path.read_text())
    c["target_modules"] = sorted(c["target_modules"])
    write_json(cfg_path, c)
    log(f"[{arch}] wrote {out.relative_to(REPO)}")


@torch.no_grad()
def build_rslora_merges():
    tensors = {}
    info = {}
    for arch in ARCHS:
        folder = adapter_dir(arch, "peft_rslora")
        adapted = {k.split(".lora_")[0].removeprefix("base_model.model.") + ".weight" for k in load_file(str(folder / "adapter_model.safetensors"))}
        base_sd = {k: v.clone() for k, v in load_base(arch).state_dict().items()}
        merged = peft_model(arch, ["peft_rslora"]).merge_and_unload().state_dict()
        changed = {k for k in merged if k in base_sd and not torch.equal(merged[k], base_sd[k])}
        assert changed == adapted, (arch, sorted(changed ^ adapted))
        for k in sorted(adapted):
            tensors[f"{arch}/{k}"] = merged[k].contiguous()
        info[arch] = {"adapted_tensors": len(adapted), "max_abs_delta": max(float((merged[k] - base_sd[k]).abs().max()) for k in adapted)}
        log(f"[{arch}] peft_rslora merge_and_unload: {len(adapted)} tensors changed")
    save_file(tensors, str(REPO / GOLDEN / "merge_peft_rslora.safetensors"))
    return info


@torch.no_grad()
def build_combos():
    from peft.tuners.lora import LoraLayer

    tensors = {}
    spec = {}
    for arch in COMBO_ARCHS:
        spec[arch] = {}
        for name, c in COMBOS.items():
            pm = peft_model(arch, c["adapters"])
            kwargs = {k: c[k] for k in ("svd_rank", "density", "majority_sign_method") if k in c}
            names = [f"a{i}" for i in range(len(c["adapters"]))]
            pm.add_weighted_adapter(names, c["weights"], "combo", combination_type=c["combination_type"], **kwargs)
            n = 0
            rank = None
            for mod_name, mod in pm.named_modules():
                if isinstance(mod, LoraLayer) and "combo" in mod.lora_A:
                    a = mod.lora_A["combo"].weight.detach().float().contiguous()
                    b = mod.lora_B["combo"].weight.detach().float().contiguous()
                    assert a.shape[0] == b.shape[1], (mod_name, a.shape, b.shape)
                    rank = a.shape[0]
                    tensors[f"{arch}/{name}/{mod_name}.lora_A.weight"] = a
                    tensors[f"{arch}/{name}/{mod_name}.lora_B.weight"] = b
                    n += 1
            cfg = pm.peft_config["combo"]
            spec[arch][name] = {
                **c,
                "r": int(cfg.r),
                "lora_alpha": cfg.lora_alpha,
                "modules": n,
                "peft_config_use_rslora": bool(cfg.use_rslora),
            }
            log(f"[{arch}] {name}: {n} modules, rank {rank}")
    save_file(tensors, str(REPO / GOLDEN / "merge_combos.safetensors"))
    return spec


def cmd_build():
    for arch in COMBO_ARCHS:
        build_second_adapter(arch)
    rslora = build_rslora_merges()
    combos = build_combos()
    write_json(
        REPO / GOLDEN / "merge_combos.json",
        {
            "versions": versions(),
            "note": "PEFT 0.21 add_weighted_adapter; lora_A/lora_B of the combined adapter per module. "
            "peft_config_use_rslora records PEFT's inherited use_rslora flag (lorafold writes false).",
            "rslora_merge": rslora,
            "combos": combos,
        },
    )
    log("build done")


# ----------------------------------------------------------------------------
# verify
# ----------------------------------------------------------------------------


@torch.no_grad()
def verify_one(arch, folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = {"problems": []}
    problems = res["problems"]
    base_dir = REPO / MODELS / arch
    ours = read_folder(folder)
    base_names = on_disk_names(base_dir)
    res["names_match_base"] = set(ours) == base_names
    if not res["names_match_base"]:
        problems.append(f"tensor names differ from the base: only ours {sorted(set(ours) - base_names)[:5]}, "
                        f"only base {sorted(base_names - set(ours))[:5]}")
    res["lm_head_saved"] = "lm_head.weight" in ours
    res["tie_word_embeddings"] = bool(json.loads((base_dir / "config.json").read_text()).get("tie_word_embeddings"))

    base_sd = read_folder(base_dir)
    peft_sd = peft_model(arch, ["peft"]).merge_and_unload().state_dict()
    adapted = {k.split(".lora_")[0].removeprefix("base_model.model.") + ".weight"
               for k in load_file(str(REPO / ADAPTERS / f"{arch}_peft" / "adapter_model.safetensors"))}
    max_merged, untouched_identical, dtypes_ok = 0.0, True, True
    for k, v in ours.items():
        if k not in peft_sd:
            problems.append(f"{k} not in PEFT's merged state dict")
            continue
        dtypes_ok &= v.dtype == base_sd[k].dtype
        if k in adapted:
            max_merged = max(max_merged, float((v.float() - peft_sd[k].float()).abs().max()))
        elif not torch.equal(v, base_sd[k]):
            untouched_identical = False
            problems.append(f"untouched tensor {k} differs from the base")
    res["merged_tensors"] = len(adapted)
    res["max_abs_diff_vs_peft_merge"] = max_merged
    res["untouched_identical"] = untouched_identical
    res["dtypes_match_base"] = dtypes_ok
    if not max_merged <= MERGE_TOL:
        problems.append(f"merged weights differ from PEFT merge_and_unload by {max_merged:.3e} > {MERGE_TOL}")

    index = folder / "model.safetensors.index.json"
    res["shards"] = len(list(folder.glob("*.safetensors")))
    if index.exists():
        idx = json.loads(index.read_text())
        wm = idx.get("weight_map", {})
        files = set(wm.values())
        ok = set(wm) == set(ours) and all((folder / f).is_file() for f in files)
        for f in files:
            ok &= set(wm[k] for k in on_disk_names_file(folder / f)) == {f}
        total = sum(v.numel() * v.element_size() for v in ours.values())
        ok &= idx.get("metadata", {}).get("total_size") == total
        res["index_ok"] = bool(ok)
        if not ok:
            problems.append("model.safetensors.index.json does not describe the shards")

    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        model, info = AutoModelForCausalLM.from_pretrained(
            str(folder), attn_implementation="eager", dtype=torch.float32, output_loading_info=True
        )
    model.eval()
    missing = list(info.get("missing_keys", []))
    unexpected = list(info.get("unexpected_keys", []))
    mismatched = list(info.get("mismatched_keys", []))
    res["transformers_load_ok"] = not (missing or unexpected or mismatched)
    if not res["transformers_load_ok"]:
        problems.append(f"transformers load: missing {missing[:5]}, unexpected {unexpected[:5]}, mismatched {mismatched[:5]}")
    if res["tie_word_embeddings"]:
        res["tied_in_transformers"] = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
        if not res["tied_in_transformers"]:
            problems.append("lm_head is not tied to embed_tokens after loading")
    g = load_file(str(REPO / GOLDEN / f"{arch}.safetensors"))
    logits = model(input_ids=g["input_ids"], attention_mask=g["attention_mask"]).logits.float()
    real = g["attention_mask"].bool()
    d = float((logits - g["logits_peft"]).abs()[real].max())
    res["max_abs_logit_diff_vs_peft_unmerged"] = d
    if not (math.isfinite(d) and d <= LOGIT_TOL):
        problems.append(f"logits differ from PEFT's unmerged logits by {d:.3e} > {LOGIT_TOL}")
    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
        res["tokenizer_ok"] = len(tok) > 0 and (folder / "tokenizer_config.json").exists()
    except Exception as e:  # noqa: BLE001
        res["tokenizer_ok"] = False
        problems.append(f"tokenizer does not load: {e!r}")
    return res


def on_disk_names_file(path):
    with safe_open(str(path), "pt") as fh:
        return list(fh.keys())


def cmd_verify():
    results = {"versions": versions()}
    ok = True
    for arch in ARCHS:
        folder = REPO / MERGED / arch
        if not folder.is_dir():
            log(f"[{arch}] {folder.relative_to(REPO)} missing; run the Rust test with LORAFOLD_WRITE_FIXTURES=1")
            ok = False
            continue
        try:
            res = verify_one(arch, folder)
        except Exception as e:  # noqa: BLE001
            res = {"problems": [f"exception: {e!r}"]}
        res["passed"] = not res["problems"]
        ok &= res["passed"]
        results[arch] = res
        log(f"[{arch}] {'PASS' if res['passed'] else 'FAIL'}: merge diff {res.get('max_abs_diff_vs_peft_merge')}, "
            f"logit diff {res.get('max_abs_logit_diff_vs_peft_unmerged')}, shards {res.get('shards')}")
        for p in res["problems"]:
            log(f"    - {p}")
    write_json(REPO / GOLDEN / "merge_check.json", results)
    return 0 if ok else 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["build", "verify"])
    args = parser.parse_args()
    os.chdir(REPO)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    if args.command == "build":
        cmd_build()
        return 0
    return cmd_verify()


if __name__ == "__main__":
    sys.exit(main())
