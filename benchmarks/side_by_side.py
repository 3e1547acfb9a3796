"""lorafold against TRL+PEFT on the same batch, alternately, several rounds in one sitting.

The 2-core machines this runs on change speed by a quarter or more from one minute to the next
(host load), so a ratio of one lorafold run to one TRL run taken minutes apart says little.
Here each round runs `lorafold bench` and then `benchmarks/trl_bench.py` on the same model and
pairs, straight after each other, and the script reports every round's ratio of tokens/s and of
peak RSS, and their median over the rounds. Nothing else may run meanwhile.

    ./target/release/lorafold bench --model_dir /tmp/lfbench --dump_pairs /tmp/lfbench/pairs.json --steps 0 --decode_tokens 0 --skip_merge
    python benchmarks/side_by_side.py --model_dir /tmp/lfbench --rounds 3
    python benchmarks/side_by_side.py --model_dir /tmp/qwenbench --rounds 2 --steps 2 --warmup 1 -- --preset qwen2.5-0.5b

Arguments after `--` go to `lorafold bench` only (its preset, --prompt_len, ...); the pairs file
(--pairs, default MODEL_DIR/pairs.json, written by `lorafold bench --dump_pairs`) fixes the batch
TRL trains on, so it must come from the same lorafold arguments.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys


def last_json(text, what):
    """The last top-level JSON object printed on stdout (TRL may log before it)."""
    at = text.rfind("\n{\n")
    if at >= 0:
        start = at + 1
    elif text.startswith("{"):
        start = 0
    else:
        sys.exit(f"side_by_side: {what} printed no JSON object; its output ends with:\n{text[-2000:]}")
    return json.loads(text[start:])


def run(cmd, what):
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"side_by_side: {what} failed ({' '.join(cmd)}):\n{done.stderr[-4000:]}")
    return last_json(done.stdout, what)


def main():
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_dir", required=True)
    ap.add_argument("--pairs", default=None, help="default: MODEL_DIR/pairs.json")
    ap.add_argument("--lorafold", default="./target/release/lorafold")
    ap.add_argument("--python", default=sys.executable, help="the interpreter with torch, transformers, peft and trl")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    a = ap.parse_args(argv)
    pairs = a.pairs or os.path.join(a.model_dir, "pairs.json")
    if not os.path.exists(pairs):
        sys.exit(f"side_by_side: {pairs} does not exist; write it with `lorafold bench --dump_pairs {pairs}`")
    common = ["--steps", str(a.steps), "--warmup", str(a.warmup), "--decode_tokens", "0", "--skip_merge", "--json"]
    lf_cmd = [a.lorafold, "bench", "--model_dir", a.model_dir, *common, *extra]
    trl_cmd = [a.python, os.path.join(os.path.dirname(__file__), "trl_bench.py"), "--model_dir", a.model_dir, "--pairs", pairs, *common]
    speed, memory = [], []
    print("round  lorafold s/step  RSS MiB   TRL s/step  RSS MiB   speed ratio  RSS ratio")
    for r in range(a.rounds):
        lf = run(lf_cmd, "lorafold bench")["train"][0]
        trl = run(trl_cmd, "trl_bench.py")
        if lf["tokens_per_step"] != trl["tokens_per_step"]:
            sys.exit(
                f"side_by_side: lorafold trained {lf['tokens_per_step']} tokens per step and TRL "
                f"{trl['tokens_per_step']}: {pairs} does not hold lorafold's batch"
            )
        speed.append(lf["tokens_per_s"] / trl["tokens_per_s"])
        memory.append(lf["peak_rss_mib"] / trl["peak_rss_mib"])
        print(
            f"{r + 1:5}  {lf['median_step_s']:15.3f}  {lf['peak_rss_mib']:7.0f}  {trl['median_step_s']:11.3f}  "
            f"{trl['peak_rss_mib']:7.0f}  {speed[-1]:10.2f}x  {memory[-1]:8.2f}x",
            flush=True,
        )
    print(
        f"median over {a.rounds} rounds: {statistics.median(speed):.2f}x TRL+PEFT fp32 tokens/s "
        f"(range {min(speed):.2f}-{max(speed):.2f}x), {statistics.median(memory):.2f}x its peak RSS"
    )


if __name__ == "__main__":
    main()
