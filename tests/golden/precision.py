"""How exact the golden logits are: transformers (+ peft) in float32, as stored in
tests/golden/<arch>.safetensors, against the same model and adapter run in float64.

Prints, per fixture and adapter, the largest |float32 - float64| logit difference at the
positions the attention mask keeps and at the padded ones. With --lorafold DIR, also the
difference of lorafold's logits dumped there as <arch>_<kind>.safetensors (key "logits").

    python tests/golden/precision.py [--lorafold DIR] [ARCH ...]
"""

import argparse
import os
import sys
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

REPO = Path(__file__).resolve().parents[2]
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"]


def logits64(arch, kind, inputs):
    model = AutoModelForCausalLM.from_pretrained(
        REPO / "tests/fixtures/models" / arch, attn_implementation="eager", dtype=torch.float64
    )
    if kind != "base":
        model = PeftModel.from_pretrained(model, str(REPO / "tests/fixtures/adapters" / f"{arch}_{kind}"))
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def split_max(a, b, keep):
    d = (a.double() - b).abs()
    return d[keep].max().item(), (d[~keep].max().item() if (~keep).any() else 0.0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lorafold", help="folder of lorafold logit dumps")
    ap.add_argument("archs", nargs="*", default=ARCHS)
    args = ap.parse_args()
    for arch in args.archs:
        g = load_file(str(REPO / "tests/golden" / f"{arch}.safetensors"))
        inputs = {k: g[k] for k in ("input_ids", "attention_mask")}
        keep = inputs["attention_mask"].bool()
        for kind in ["base", "peft", "peft_rslora"]:
            ref = logits64(arch, kind, inputs)
            if torch.isnan(ref).any():
                print(f"{arch} {kind}: float64 run gives NaN, skipped")
                continue
            kept, padded = split_max(g[f"logits_{kind}"], ref, keep)
            line = f"{arch} {kind}: golden f32 vs f64 {kept:.2e} kept, {padded:.2e} padded"
            if args.lorafold:
                p = os.path.join(args.lorafold, f"{arch}_{kind}.safetensors")
                if os.path.exists(p):
                    kept, padded = split_max(load_file(p)["logits"], ref, keep)
                    line += f"; lorafold vs f64 {kept:.2e} kept, {padded:.2e} padded"
            print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
