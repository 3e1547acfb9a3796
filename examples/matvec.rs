//! Read bandwidth of decoding's one-row products against the machine's: streams an f32 and a
//! bf16 weight of the given shape (default Qwen2.5-0.5B's output matrix, 151936 × 896) through
//! `lorafold::model::ops::matvec` and prints GB/s of weights read, next to a plain parallel sum.
//!
//!     cargo run --release --example matvec [-- N K]
use std::time::Instant;

use lorafold::model::ops::matvec::{rows_times_wt, Weights};

fn best<F: FnMut()>(mut f: F) -> f64 {
    f();
    (0..5)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (n, k) = (*args.first().unwrap_or(&151936), *args.get(1).unwrap_or(&896));
    let w: Vec<f32> = (0..n * k).map(|i| (i % 7) as f32 * 0.1).collect();
    let wb: Vec<half::bf16> = w.iter().map(|v| half::bf16::from_f32(*v)).collect();
    let x: Vec<f32> = (0..k).map(|i| (i % 5) as f32).collect();
    for (name, weights, bytes) in [("f32 ", Weights::F32(&w), 4), ("bf16", Weights::Bf16(&wb), 2)] {
        let t = best(|| {
            std::hint::black_box(rows_times_wt(&x, 1, weights, n, k));
        });
        let gbs = (n * k * bytes) as f64 / t / 1e9;
        println!("{name} [{n} x {k}] one row: {:.2} ms, {gbs:.1} GB/s", t * 1e3);
    }
    println!(
        "read bandwidth (parallel sum): {:.1} GB/s",
        lorafold::bench::read_bandwidth() / 1e9
    );
}
