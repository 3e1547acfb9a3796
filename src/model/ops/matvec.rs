//! A few rows against a frozen weight matrix, y = x · Wᵀ, with W streamed from memory once:
//! the linear layers and the output matrix of decoding, where x is one row per sequence.
//!
//! A general GEMM packs its operands into cache-sized panels, which for a single row costs as
//! much as the product and leaves one thread reading the weights. Here the output rows are split
//! between the threads and each weight row is read once, straight from the tensor (f32 or
//! bf16, widened in registers), against every x row. The inner loop is compiled for AVX-512
//! and AVX2+FMA and chosen at run time; other CPUs get the portable build of the same loop.

use half::bf16;
use rayon::prelude::*;

/// Rows of x up to which [`rows_times_wt`] is used instead of a GEMM.
pub const MAX_ROWS: usize = 8;

/// Lanes of the accumulators: one AVX-512 register of f32, two AVX2 ones.
const LANES: usize = 16;

/// Weight rows per parallel task: enough to amortise the task, few enough to split a
/// 128-row projection between two threads.
const ROWS_PER_TASK: usize = 32;

/// The weight matrix [n, k], row-major, as stored.
#[derive(Clone, Copy)]
pub enum Weights<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

trait Widen: Copy + Sync {
    fn widen(self) -> f32;
}

impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Widen for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

/// y [m, n] = x [m, k] · W [n, k]ᵀ, for 1 ≤ m ≤ [`MAX_ROWS`].
pub fn rows_times_wt(x: &[f32], m: usize, w: Weights, n: usize, k: usize) -> Vec<f32> {
    debug_assert!((1..=MAX_ROWS).contains(&m) && x.len() == m * k);
    // Computed transposed ([n, m]: each task owns a contiguous block), then laid out [m, n].
    let mut yt = vec![0f32; n * m];
    match w {
        Weights::F32(w) => by_rows(x, m, w, k, &mut yt),
        Weights::Bf16(w) => by_rows(x, m, w, k, &mut yt),
    }
    if m == 1 {
        return yt;
    }
    let mut y = vec![0f32; m * n];
    for (j, row) in yt.chunks_exact(m).enumerate() {
        for (i, v) in row.iter().enumerate() {
            y[i * n + j] = *v;
        }
    }
    y
}

/// The row count as a constant, so that the accumulators live in registers.
fn by_rows<T: Widen>(x: &[f32], m: usize, w: &[T], k: usize, yt: &mut [f32]) {
    match m {
        1 => split::<T, 1>(x, w, k, yt),
        2 => split::<T, 2>(x, w, k, yt),
        3 => split::<T, 3>(x, w, k, yt),
        4 => split::<T, 4>(x, w, k, yt),
        5 => split::<T, 5>(x, w, k, yt),
        6 => split::<T, 6>(x, w, k, yt),
        7 => split::<T, 7>(x, w, k, yt),
        _ => split::<T, 8>(x, w, k, yt),
    }
}

/// Blocks of weight rows, in parallel.
fn split<T: Widen, const M: usize>(x: &[f32], w: &[T], k: usize, yt: &mut [f32]) {
    yt.par_chunks_mut(ROWS_PER_TASK * M)
        .enumerate()
        .for_each(|(task, out)| {
            let first = task * ROWS_PER_TASK;
            let rows = &w[first * k..(first + out.len() / M) * k];
            block::<T, M>(x, rows, k, out);
        });
}

fn block<T: Widen, const M: usize>(x: &[f32], w: &[T], k: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, checked just above.
            unsafe { block_avx512::<T, M>(x, w, k, out) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA, checked just above.
            unsafe { block_avx2::<T, M>(x, w, k, out) };
            return;
        }
    }
    block_body::<T, M, false>(x, w, k, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,fma")]
unsafe fn block_avx512<T: Widen, const M: usize>(x: &[f32], w: &[T], k: usize, out: &mut [f32]) {
    block_body::<T, M, true>(x, w, k, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2<T: Widen, const M: usize>(x: &[f32], w: &[T], k: usize, out: &mut [f32]) {
    block_body::<T, M, true>(x, w, k, out);
}

/// out [rows, M] = (W rows) · xᵀ. `FMA` uses fused multiply-adds, only where the CPU has them
/// (elsewhere `mul_add` is a library call).
#[inline(always)]
fn block_body<T: Widen, const M: usize, const FMA: bool>(x: &[f32], w: &[T], k: usize, out: &mut [f32]) {
    let body = k - k % LANES;
    for (wr, o) in w.chunks_exact(k).zip(out.chunks_exact_mut(M)) {
        let mut acc = [[0f32; LANES]; M];
        for c in (0..body).step_by(LANES) {
            let mut wv = [0f32; LANES];
            for (d, s) in wv.iter_mut().zip(&wr[c..c + LANES]) {
                *d = s.widen();
            }
            for (i, a) in acc.iter_mut().enumerate() {
                let xv = &x[i * k + c..i * k + c + LANES];
                for l in 0..LANES {
                    a[l] = if FMA {
                        wv[l].mul_add(xv[l], a[l])
                    } else {
                        a[l] + wv[l] * xv[l]
                    };
                }
            }
        }
        for (i, (a, oi)) in acc.iter().zip(o.iter_mut()).enumerate() {
            let mut s: f32 = a.iter().sum();
            for c in body..k {
                s += wr[c].widen() * x[i * k + c];
            }
            *oi = s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k).map(|c| x[i * k + c] as f64 * w[j * k + c] as f64).sum::<f64>() as f32;
            }
        }
        y
    }

    #[test]
    fn matches_the_plain_product_for_every_row_count_and_ragged_sizes() {
        let mut rng = crate::rng::Rng::new(7);
        for (m, n, k) in [(1, 1, 1), (1, 70, 37), (3, 33, 64), (8, 129, 100), (2, 5, 15)] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.next_normal() as f32).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rng.next_normal() as f32).collect();
            let want = reference(&x, m, &w, n, k);
            let got = rows_times_wt(&x, m, Weights::F32(&w), n, k);
            for (g, e) in got.iter().zip(&want) {
                assert!(
                    (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                    "f32 m={m} n={n} k={k}: {g} vs {e}"
                );
            }
            let wb: Vec<bf16> = w.iter().map(|v| bf16::from_f32(*v)).collect();
            let wr: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
            let want = reference(&x, m, &wr, n, k);
            let got = rows_times_wt(&x, m, Weights::Bf16(&wb), n, k);
            for (g, e) in got.iter().zip(&want) {
                assert!(
                    (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                    "bf16 m={m} n={n} k={k}: {g} vs {e}"
                );
            }
        }
    }
}
