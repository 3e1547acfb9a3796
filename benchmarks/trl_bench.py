"""The lorafold benchmark's DPO step in TRL + PEFT, for a side-by-side comparison.

Same model (the random model written by `lorafold bench [--preset NAME] --model_dir DIR`), same preference batch
(`--dump_pairs DIR/pairs.json`), same settings: LoRA r 8, alpha 16, all linear layers, fp32,
batch 4 pairs, online reference (the base with the adapter disabled), 2 threads. Reports the median
seconds per step after warm-up, tokens/s (real tokens, chosen + rejected) and peak RSS; then greedy
decode tokens/s of `generate` with the trained adapter on (KV cache, prefill excluded), and the time
of PEFT's merge_and_unload + save_pretrained against copying the model files.

    ./target/release/lorafold bench --model_dir /tmp/lfbench --dump_pairs /tmp/lfbench/pairs.json
    python benchmarks/trl_bench.py --model_dir /tmp/lfbench

Needs torch, transformers, peft, trl and datasets (tests/golden/requirements.txt).
"""

import argparse
import json
import os
import resource
import statistics
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model_dir", required=True)
    ap.add_argument("--pairs", default=None, help="default: MODEL_DIR/pairs.json")
    ap.add_argument("--tokenizer", default="tests/fixtures/models/llama", help="any tokenizer with pad id 0")
    ap.add_argument("--steps", type=int, default=10, help="0: decode (and merge) only, with an untrained adapter")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precompute_ref_log_probs", action="store_true")
    ap.add_argument("--gradient_checkpointing", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="TRL's default mixed precision (bf16 autocast, fp32 master weights)")
    ap.add_argument("--decode_tokens", type=int, default=128, help="0 skips the decode measurement")
    ap.add_argument("--skip_merge", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    pairs = json.load(open(a.pairs or os.path.join(a.model_dir, "pairs.json")))
    n_pairs = len(pairs)
    tokens = sum(len(p["prompt"]) * 2 + len(p["chosen"]) + len(p["rejected"]) for p in pairs)
    total = a.warmup + a.steps
    rows = [{"prompt_ids": p["prompt"], "chosen_ids": p["chosen"], "rejected_ids": p["rejected"]} for p in pairs] * total

    class Pretokenized(DPOTrainer):
        # TRL cannot take tokenised pairs; they are exactly the columns its tokeniser writes.
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    class Timer(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t)

    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    params = sum(p.numel() for p in model.parameters())
    timer = Timer()
    args = DPOConfig(
        output_dir="/tmp/trl-bench-out", per_device_train_batch_size=n_pairs, gradient_accumulation_steps=1,
        max_steps=total, learning_rate=1e-4, beta=0.1, loss_type="sigmoid", max_length=4096,
        precompute_ref_log_probs=a.precompute_ref_log_probs, gradient_checkpointing=a.gradient_checkpointing, bf16=a.bf16, fp16=False,
        use_cpu=True, logging_steps=1000, save_strategy="no", eval_strategy="no", report_to="none",
        disable_tqdm=True, train_sampling_strategy="sequential", dataloader_num_workers=0, seed=0,
    )
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    if a.steps == 0:
        # Decode (and merge) only, as `lorafold bench --steps 0`: the untrained adapter on the model.
        from peft import get_peft_model
        peft_model = get_peft_model(model, lora)
        out = {"variant": "PEFT, no training", "params": params, "threads": a.threads}
    else:
        trainer = Pretokenized(
            model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(a.tokenizer),
            peft_config=lora, callbacks=[timer],
        )
        trainer.train()
        step = statistics.median(timer.times[a.warmup:])
        rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        out = {
            "variant": "TRL+PEFT " + ("precomputed reference" if a.precompute_ref_log_probs else "online reference") + (", bf16 autocast" if a.bf16 else ""),
            "params": params, "tokens_per_step": tokens, "median_step_s": step, "tokens_per_s": tokens / step,
            "peak_rss_mib": rss_mib, "threads": a.threads,
            "versions": {"torch": torch.__version__, "trl": __import__("trl").__version__, "peft": __import__("peft").__version__},
        }
        peft_model = trainer.model
    peft_model.eval()
    if a.decode_tokens > 0:
        prompt = torch.tensor([pairs[0]["prompt"]])
        gen = dict(do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)
        with torch.no_grad():
            peft_model.generate(input_ids=prompt, max_new_tokens=4, min_new_tokens=4, **gen)  # warm-up
            t0 = time.perf_counter()
            peft_model.generate(input_ids=prompt, max_new_tokens=1, min_new_tokens=1, **gen)
            prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            out_ids = peft_model.generate(input_ids=prompt, max_new_tokens=a.decode_tokens, min_new_tokens=a.decode_tokens, **gen)
            total_s = time.perf_counter() - t0
        new = out_ids.shape[1] - prompt.shape[1]
        out["decode"] = {"prompt_tokens": prompt.shape[1], "prefill_s": prefill, "new_tokens": new,
                         "decode_tokens_per_s": (new - 1) / max(total_s - prefill, 1e-9)}
    if not a.skip_merge:
        import shutil
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            merged = peft_model.merge_and_unload()
            merged.save_pretrained(os.path.join(tmp, "merged"), safe_serialization=True)
            merge_s = time.perf_counter() - t0
            os.makedirs(os.path.join(tmp, "copied"))
            t0 = time.perf_counter()
            for f in ("config.json", "model.safetensors"):
                shutil.copy(os.path.join(a.model_dir, f), os.path.join(tmp, "copied", f))
            copy_s = time.perf_counter() - t0
        out["merge"] = {"merge_s": merge_s, "copy_s": copy_s}
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{out['variant']}: {params} parameters, {tokens} real tokens/step, {a.threads} threads")
        if "median_step_s" in out:
            print(f"  median {out['median_step_s']:.3f} s/step, {out['tokens_per_s']:.1f} tokens/s, peak RSS {out['peak_rss_mib']:.0f} MiB")
        if "decode" in out:
            d = out["decode"]
            print(f"  decode (greedy, KV cache, adapter on): prompt {d['prompt_tokens']} tokens prefilled in {d['prefill_s']:.3f}s;"
                  f" {d['new_tokens']} new tokens at {d['decode_tokens_per_s']:.1f} tokens/s")
        if "merge" in out:
            m = out["merge"]
            print(f"  merge_and_unload + save_pretrained: {m['merge_s']:.3f}s; copying the model files: {m['copy_s']:.3f}s")


if __name__ == "__main__":
    main()
