"""The best f32 GEMM this machine offers (torch's, else numpy's BLAS), on the shapes of a
`lorafold bench` step, for the bench's "of peak" column.

    python benchmarks/sgemm.py --threads 2
    ./target/release/lorafold bench --reference_peak_gflops <best GFLOP/s printed above>

Shapes: the forward products of the bench model (hidden 512, intermediate 1376, vocab 16000) at
the bench's ~1931 tokens per step, their two backward products (dX = dY·W, dW = dYᵀ·X), and a
1024³ square product. Prints GFLOP/s per shape and the best, or one JSON object with --json.
"""

import argparse
import json
import os
import time


def shapes(tokens, hidden, inter, vocab):
    """(name, M, K, N) of C[M, N] = A[M, K] · B[K, N]."""
    fwd = [
        ("attn proj", tokens, hidden, hidden),
        ("mlp up", tokens, hidden, inter),
        ("mlp down", tokens, inter, hidden),
        ("lm_head", tokens, hidden, vocab),
    ]
    out = []
    for name, m, k, n in fwd:
        out.append((name + " fwd", m, k, n))
        out.append((name + " dX", m, n, k))
        out.append((name + " dW", n, m, k))
    out.append(("square 1024³", 1024, 1024, 1024))
    return out


def timer(backend, m, k, n, reps):
    if backend == "torch":
        import torch

        a = torch.randn(m, k, dtype=torch.float32)
        b = torch.randn(k, n, dtype=torch.float32)
        torch.mm(a, b)
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t)
        return best
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1931)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1376)
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    try:
        import torch

        torch.set_num_threads(args.threads)
        backend = "torch"
    except ImportError:
        backend = "numpy"
    rows = []
    for name, m, k, n in shapes(args.tokens, args.hidden, args.intermediate, args.vocab):
        secs = timer(backend, m, k, n, args.reps)
        rows.append({"shape": name, "m": m, "k": k, "n": n, "gflops": 2.0 * m * k * n / secs / 1e9})
    best = max(r["gflops"] for r in rows)
    if args.json:
        print(json.dumps({"backend": backend, "threads": args.threads, "shapes": rows, "best_gflops": best}))
        return
    print(f"{backend} sgemm, {args.threads} threads")
    for r in rows:
        print(f"  {r['shape']:<18} [{r['m']:>5} x {r['k']:>5}] x [{r['k']:>5} x {r['n']:>5}]  {r['gflops']:8.1f} GFLOP/s")
    print(f"best: {best:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
