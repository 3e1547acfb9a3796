//! Shared pieces of the CPU kernels: f32 views of tensors and storages, and the `gemm` crate's
//! product (the kernels candle's CPU matmul uses) called directly, so that a product can read
//! strided operands and accumulate into an existing buffer.

use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};

use super::frozen::strided_offsets;

/// A row-major view of a matrix inside a slice: element (i, j) at `i·rs + j·cs`.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// The contiguous [rows, cols] matrix in `data`.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Mat<'a> {
        Mat {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The same elements read as the transpose.
    pub fn t(self) -> Mat<'a> {
        Mat {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    fn fits(&self) -> bool {
        self.rows == 0 || self.cols == 0 || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// dst [m, n] (contiguous) = (dst if `accumulate`) + beta · lhs [m, k] · rhs [k, n], on every
/// rayon thread.
pub fn gemm_into(dst: &mut [f32], lhs: Mat, rhs: Mat, beta: f32, accumulate: bool) -> Result<()> {
    let threads = rayon::current_num_threads();
    gemm_on(dst, lhs, rhs, beta, accumulate, threads)
}

/// [`gemm_into`] on the calling thread alone: for products inside a parallel loop.
pub fn gemm_seq(dst: &mut [f32], lhs: Mat, rhs: Mat, beta: f32, accumulate: bool) -> Result<()> {
    gemm_on(dst, lhs, rhs, beta, accumulate, 1)
}

/// Seconds and FLOPs of the products since the last [`take_product_stats`]: those on every
/// thread (of them, those with a side of at most 16, the rank-r products of LoRA, again
/// apart) and those on one thread inside a parallel loop (attention's per-head products),
/// whose seconds add up over the threads.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ProductStats {
    pub threaded_s: f64,
    pub threaded_flops: f64,
    pub skinny_s: f64,
    pub skinny_flops: f64,
    pub per_thread_s: f64,
    pub per_thread_flops: f64,
}

/// Nanoseconds and FLOPs, in [`ProductStats`]' order.
static COUNTERS: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];

/// The products' time and FLOPs since the last call, and starts counting again.
pub fn take_product_stats() -> ProductStats {
    let v: Vec<f64> = COUNTERS.iter().map(|c| c.swap(0, Ordering::Relaxed) as f64).collect();
    ProductStats {
        threaded_s: v[0] / 1e9,
        threaded_flops: v[1],
        skinny_s: v[2] / 1e9,
        skinny_flops: v[3],
        per_thread_s: v[4] / 1e9,
        per_thread_flops: v[5],
    }
}

fn gemm_on(dst: &mut [f32], lhs: Mat, rhs: Mat, beta: f32, accumulate: bool, threads: usize) -> Result<()> {
    let start = std::time::Instant::now();
    let out = gemm_uncounted(dst, lhs, rhs, beta, accumulate, threads);
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    let kind = if threads == 1 { 4 } else { 0 };
    let ns = start.elapsed().as_nanos() as u64;
    let flops = 2 * (m * k * n) as u64;
    COUNTERS[kind].fetch_add(ns, Ordering::Relaxed);
    COUNTERS[kind + 1].fetch_add(flops, Ordering::Relaxed);
    if threads > 1 && m.min(k).min(n) <= 16 {
        COUNTERS[2].fetch_add(ns, Ordering::Relaxed);
        COUNTERS[3].fetch_add(flops, Ordering::Relaxed);
    }
    out
}

fn gemm_uncounted(dst: &mut [f32], lhs: Mat, rhs: Mat, beta: f32, accumulate: bool, threads: usize) -> Result<()> {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    if rhs.rows != k || dst.len() != m * n || !lhs.fits() || !rhs.fits() {
        candle_core::bail!(
            "cpu kernel: a [{m}, {k}]·[{}, {n}] product into {} elements",
            rhs.rows,
            dst.len()
        );
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return Ok(());
    }
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every index the product reads or writes lies inside its slice (checked above by
    // `fits` and the length of dst), and dst does not alias lhs or rhs (it is borrowed mutably).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            par,
        );
    }
    Ok(())
}

/// The f32 elements of a CPU tensor in row-major order, borrowed when contiguous, handed to `f`.
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (st, l) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(v)) = &*st else {
        candle_core::bail!("cpu kernel: expected an f32 CPU tensor")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => f(&v[a..b]),
        None => {
            let owned: Vec<f32> = strided_offsets(l).into_iter().map(|i| v[i]).collect();
            f(&owned)
        }
    }
}

pub fn storage_f32<'a>(s: &'a CpuStorage, l: &Layout) -> Result<std::borrow::Cow<'a, [f32]>> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("cpu kernel: expected f32")
    };
    Ok(match l.contiguous_offsets() {
        Some((a, b)) => std::borrow::Cow::Borrowed(&v[a..b]),
        None => std::borrow::Cow::Owned(strided_offsets(l).into_iter().map(|i| v[i]).collect()),
    })
}
