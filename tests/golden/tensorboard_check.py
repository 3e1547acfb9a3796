"""Read a lorafold run's TensorBoard event files with TensorBoard's own reader and check them
against its metrics.jsonl (every value, at its step, under transformers' tag names).

    ./target/release/lorafold dpo --recipe recipes/quickstart.yaml --max_steps 4 --logging_steps 2 \
        --eval_steps 2 --report_to tensorboard --output_dir /tmp/tb
    python tests/golden/tensorboard_check.py /tmp/tb        # needs: pip install tensorboard
"""

import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main(run_dir):
    ea = EventAccumulator(f"{run_dir}/runs")
    ea.Reload()
    seen = {(tag, e.step): e.value for tag in ea.Tags()["scalars"] for e in ea.Scalars(tag)}
    checked = 0
    with open(f"{run_dir}/metrics.jsonl") as f:
        for line in f:
            row = json.loads(line)
            step = row.pop("step")
            for key, value in row.items():
                tag = "eval/" + key[5:] if key.startswith("eval_") else "train/" + key
                got = seen[(tag, step)]
                assert abs(got - value) <= 1e-6 * max(1.0, abs(value)), (tag, step, got, value)
                checked += 1
    print(f"{checked} values of metrics.jsonl found in the event files by TensorBoard's reader")


if __name__ == "__main__":
    main(sys.argv[1])
