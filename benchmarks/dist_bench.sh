#!/usr/bin/env bash
# Data-parallel DPO on one machine: 2 MPI ranks × 1 thread against 1 process × 2 threads, the
# same global batch (4 pairs × 2), on the `lorafold bench` model (33.5M Llama, random weights)
# with the quickstart data; then the time of one step's all-reduce at the Qwen2.5-0.5B LoRA r8
# shape (4,399,104 floats). Needs a `--features mpi` build and mpirun:
#   cargo build --release --features mpi --bins --examples && bash benchmarks/dist_bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/lorafold}
M=${1:-/tmp/lorafold-bench-model}
STEPS=${STEPS:-12}
MPIRUN=(mpirun --oversubscribe -np 2 -x RAYON_NUM_THREADS=1)
[ "$(id -u)" = 0 ] && MPIRUN+=(--allow-run-as-root)
if [ ! -f "$M/model.safetensors" ]; then
    "$BIN" bench --model_dir "$M" --steps 1 --warmup 0 --decode_tokens 0 --skip_merge > /dev/null
fi
# The bench model has no tokenizer: the fixture's (ids below the model's vocabulary) serves.
cp tests/fixtures/models/qwen2/tokenizer.json tests/fixtures/models/qwen2/tokenizer_config.json "$M/"
run_args=(dpo --model "$M" --dataset tests/fixtures/data/quickstart/train.jsonl --max_steps "$STEPS"
    --batch_size 4 --max_length 128 --max_prompt_length 96 --logging_steps 1 --report_to none
    --save_strategy no --eval_strategy no --overwrite_output_dir true)
out=$(mktemp -d)
RAYON_NUM_THREADS=2 "$BIN" "${run_args[@]}" --gradient_accumulation_steps 2 --output_dir "$out/one" 2> "$out/one.log"
"${MPIRUN[@]}" "$BIN" "${run_args[@]}" --gradient_accumulation_steps 1 --output_dir "$out/two" 2> "$out/two.log"
python3 - "$out" <<'PY'
import json, statistics, sys
out = sys.argv[1]
def summary(name):
    rows = [json.loads(l) for l in open(f"{out}/{name}/metrics.jsonl")]
    tps = [r["tokens_per_second"] for r in rows[2:]]  # 2 warm-up steps left out
    return statistics.median(tps), max(r["peak_rss_mib"] for r in rows), rows[-1]["loss"]
one, two = summary("one"), summary("two")
print(f"1 process x 2 threads: {one[0]:8.1f} tokens/s, peak RSS {one[1]:.0f} MiB, last loss {one[2]:.6f}")
print(f"2 ranks x 1 thread:    {two[0]:8.1f} tokens/s, peak RSS {two[1]:.0f} MiB per rank, last loss {two[2]:.6f}")
print(f"ratio (2 ranks / 1 process): {two[0] / one[0]:.2f}x tokens/s")
PY
"${MPIRUN[@]}" target/release/examples/allreduce 4399104 20
rm -rf "$out"
