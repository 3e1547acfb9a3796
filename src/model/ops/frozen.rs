//! Operations between a tracked tensor and a frozen constant whose backward flows only to the
//! tracked input.
//!
//! candle's backward computes a gradient for every operand of a tracked op, frozen or not, and
//! keeps it until the pass ends: for `x · Wᵀ` with a frozen base weight that is a full weight-sized
//! matmul per layer and per step, wasted, plus its memory; masks, norm weights and RoPE tables
//! get the same treatment. These ops do the same forward and return only dL/dx.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Storage, Tensor};

use super::matvec::{rows_times_wt, Weights};

enum Const {
    /// x [N, in] · Wᵀ with W [out, in].
    MatmulT(Tensor),
    /// x + c (broadcast).
    Add(Tensor),
    /// x * c (broadcast).
    Mul(Tensor),
}

impl Const {
    /// The frozen operand.
    fn constant(&self) -> &Tensor {
        match self {
            Const::MatmulT(t) | Const::Add(t) | Const::Mul(t) => t,
        }
    }

    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Const::MatmulT(w) => x.matmul(&w.t()?),
            Const::Add(c) => x.broadcast_add(c),
            Const::Mul(c) => x.broadcast_mul(c),
        }
    }
}

/// Element offsets of a strided layout, in row-major order.
pub(crate) fn strided_offsets(l: &Layout) -> Vec<usize> {
    let dims = l.dims();
    let strides = l.stride();
    let n: usize = dims.iter().product();
    let mut out = Vec::with_capacity(n);
    let mut idx = vec![0usize; dims.len()];
    for _ in 0..n {
        out.push(l.start_offset() + idx.iter().zip(strides).map(|(i, s)| i * s).sum::<usize>());
        for d in (0..dims.len()).rev() {
            idx[d] += 1;
            if idx[d] < dims[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

pub(crate) fn to_cpu_tensor(s: &CpuStorage, l: &Layout) -> Result<Tensor> {
    fn gather<T: Copy>(v: &[T], l: &Layout) -> Vec<T> {
        match l.contiguous_offsets() {
            Some((a, b)) => v[a..b].to_vec(),
            None => strided_offsets(l).into_iter().map(|i| v[i]).collect(),
        }
    }
    let shape = l.shape().clone();
    let dev = Device::Cpu;
    match s {
        CpuStorage::F32(v) => Tensor::from_vec(gather(v, l), shape, &dev),
        CpuStorage::BF16(v) => Tensor::from_vec(gather(v, l), shape, &dev),
        CpuStorage::F16(v) => Tensor::from_vec(gather(v, l), shape, &dev),
        CpuStorage::F64(v) => Tensor::from_vec(gather(v, l), shape, &dev),
        _ => candle_core::bail!("frozen-constant op: unsupported dtype"),
    }
}

pub(crate) fn into_cpu_storage(t: Tensor) -> Result<(CpuStorage, Shape)> {
    let t = t.contiguous()?;
    let shape = t.shape().clone();
    let (st, l) = t.storage_and_layout();
    let Storage::Cpu(cs) = &*st else {
        candle_core::bail!("frozen-constant op: expected CPU storage")
    };
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("non-contiguous result".into()))?;
    fn slice<T: Copy>(v: &[T], a: usize, b: usize) -> Vec<T> {
        v[a..b].to_vec()
    }
    let out = match cs {
        CpuStorage::F32(v) if a == 0 && b == v.len() => CpuStorage::F32(v.clone()),
        CpuStorage::F32(v) => CpuStorage::F32(slice(v, a, b)),
        CpuStorage::BF16(v) => CpuStorage::BF16(slice(v, a, b)),
        CpuStorage::F16(v) => CpuStorage::F16(slice(v, a, b)),
        CpuStorage::F64(v) => CpuStorage::F64(slice(v, a, b)),
        _ => candle_core::bail!("frozen-constant op: unsupported dtype"),
    };
    Ok((out, shape))
}

/// A linear layer with its adapter, for [`lora_product_no_grad`]: the frozen weight [n, k], its
/// bias [n] and (A [r, k], B [n, r], scale).
pub struct NoGradLinear<'a> {
    pub weight: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    pub adapter: Option<(&'a Tensor, &'a Tensor, f64)>,
}

/// x [m, k] · Wᵀ (+ bias) + scale · (x Aᵀ) Bᵀ computed straight on the CPU storages, with no
/// autograd node: for decoding, where a linear layer with an adapter is otherwise five tensor
/// ops, each dispatched to the thread pool for a single row. A few rows (decoding) stream the
/// weight once ([`super::matvec`]); more (a prompt's prefill) go through the GEMM, on f32 only.
/// `None` where it does not apply (not CPU, not 2-D, not f32 or bf16, adapter not f32).
pub fn lora_product_no_grad(x: &Tensor, lin: &NoGradLinear) -> Result<Option<Tensor>> {
    let dt = x.dtype();
    let cpu2 = |t: &Tensor| t.device().is_cpu() && t.rank() == 2;
    let base_ok = cpu2(x) && cpu2(lin.weight) && lin.weight.dtype() == dt && matches!(dt, DType::F32 | DType::BF16);
    let bias_ok = lin
        .bias
        .is_none_or(|b| b.device().is_cpu() && b.rank() == 1 && b.dtype() == dt);
    let ad_ok = lin
        .adapter
        .is_none_or(|(a, b, _)| [a, b].iter().all(|t| cpu2(t) && t.dtype() == DType::F32));
    let m = x.dims2()?.0;
    let few = m <= super::matvec::MAX_ROWS;
    if !(base_ok && bias_ok && ad_ok) || (!few && dt != DType::F32) {
        return Ok(None);
    }
    let n = lin.weight.dim(0)?;
    // A few rows are streamed from an f32 copy of x; more go through the GEMM on x itself.
    let xf = if few {
        Some(x.to_dtype(DType::F32)?.contiguous()?.flatten_all()?.to_vec1::<f32>()?)
    } else {
        None
    };
    let Some(mut y) = product_f32(x, xf.as_deref(), lin.weight)? else {
        return Ok(None);
    };
    if let Some((a, b, scale)) = lin.adapter {
        let r = a.dim(0)?;
        let Some(xa) = product_f32(x, xf.as_deref(), a)? else {
            return Ok(None);
        };
        let bv = b.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        for i in 0..m {
            let xr = &xa[i * r..(i + 1) * r];
            let yr = &mut y[i * n..(i + 1) * n];
            for (o, brow) in yr.iter_mut().zip(bv.chunks_exact(r)) {
                let d: f32 = xr.iter().zip(brow).map(|(p, q)| p * q).sum();
                *o += scale as f32 * d;
            }
        }
    }
    if let Some(bias) = lin.bias {
        let bv = bias.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        for row in y.chunks_exact_mut(n) {
            for (o, b) in row.iter_mut().zip(&bv) {
                *o += b;
            }
        }
    }
    Ok(Some(Tensor::from_vec(y, (m, n), x.device())?.to_dtype(dt)?))
}

/// x [m, k] · Wᵀ in f32 for [`lora_product_no_grad`]: streamed from `xf`, x's f32 rows, when
/// given (a few rows), else through the GEMM on the storages (x f32). `None` where the product
/// does not come out in f32.
fn product_f32(x: &Tensor, xf: Option<&[f32]>, w: &Tensor) -> Result<Option<Vec<f32>>> {
    let (m, k) = x.dims2()?;
    if let Some(xf) = xf {
        let w = w.contiguous()?;
        let (ws, wl) = w.storage_and_layout();
        let Storage::Cpu(wc) = &*ws else { return Ok(None) };
        return Ok(stream_rows(xf, m, k, wc, wl));
    }
    let (ls, ll) = x.storage_and_layout();
    let (rs, rl) = w.storage_and_layout();
    let (Storage::Cpu(lc), Storage::Cpu(rc)) = (&*ls, &*rs) else {
        candle_core::bail!("expected CPU storage")
    };
    Ok(match storage_matmul_t(lc, ll, rc, rl)? {
        CpuStorage::F32(y) => Some(y),
        _ => None,
    })
}

/// x [m, k] (f32, m ≤ [`super::matvec::MAX_ROWS`]) · Wᵀ streamed from a contiguous f32 or bf16
/// W [n, k]; `None` for other storages or a strided W.
fn stream_rows(x: &[f32], m: usize, k: usize, w: &CpuStorage, wl: &Layout) -> Option<Vec<f32>> {
    let (s, e) = wl.contiguous_offsets()?;
    let n = wl.dims()[0];
    Some(match w {
        CpuStorage::F32(v) => rows_times_wt(x, m, Weights::F32(&v[s..e]), n, k),
        CpuStorage::BF16(v) => rows_times_wt(x, m, Weights::Bf16(&v[s..e]), n, k),
        _ => return None,
    })
}

/// x [m, k] · Wᵀ for W [n, k], both 2-D, on CPU storages: W is read transposed in place. A few
/// contiguous rows of x stream W once ([`super::matvec`]) instead of going through the GEMM.
fn storage_matmul_t(x: &CpuStorage, xl: &Layout, w: &CpuStorage, wl: &Layout) -> Result<CpuStorage> {
    let (m, k) = (xl.dims()[0], xl.dims()[1]);
    if let (true, Some((xs, xe))) = (m <= super::matvec::MAX_ROWS, xl.contiguous_offsets()) {
        match (x, w) {
            (CpuStorage::F32(xv), CpuStorage::F32(_)) => {
                if let Some(y) = stream_rows(&xv[xs..xe], m, k, w, wl) {
                    return Ok(CpuStorage::F32(y));
                }
            }
            (CpuStorage::BF16(xv), CpuStorage::BF16(_)) => {
                let xf: Vec<f32> = xv[xs..xe].iter().map(|v| v.to_f32()).collect();
                if let Some(y) = stream_rows(&xf, m, k, w, wl) {
                    return Ok(CpuStorage::BF16(y.into_iter().map(half::bf16::from_f32).collect()));
                }
            }
            _ => {}
        }
    }
    let n = wl.dims()[0];
    if let (CpuStorage::F32(_), CpuStorage::F32(_)) = (x, w) {
        // Through the kernels' own product, W read transposed where it lies: every f32 product
        // of a step then goes through one place, which the bench times.
        let (xv, wv) = (super::cpu::storage_f32(x, xl)?, super::cpu::storage_f32(w, wl)?);
        let mut y = vec![0f32; m * n];
        let (lhs, rhs) = (super::cpu::Mat::new(&xv, m, k), super::cpu::Mat::new(&wv, n, k).t());
        super::cpu::gemm_into(&mut y, lhs, rhs, 1.0, false)?;
        return Ok(CpuStorage::F32(y));
    }
    x.matmul(w, (1, m, n, k), xl, &wl.transpose(0, 1)?)
}

impl CustomOp1 for Const {
    fn name(&self) -> &'static str {
        match self {
            Const::MatmulT(_) => "frozen-matmul",
            Const::Add(_) => "frozen-add",
            Const::Mul(_) => "frozen-mul",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        // Straight on the storages: no copy of the input or the output.
        let shape = l.shape();
        let (cst, cl) = self.constant().storage_and_layout();
        if let Storage::Cpu(cs) = &*cst {
            if cs.dtype() == s.dtype() {
                match self {
                    Const::MatmulT(_) if l.dims().len() == 2 && cl.dims().len() == 2 => {
                        let out = storage_matmul_t(s, l, cs, cl)?;
                        return Ok((out, Shape::from((l.dims()[0], cl.dims()[0]))));
                    }
                    Const::Add(_) => {
                        let out = s.binary_impl::<candle_core::op::Add>(cs, l, &cl.broadcast_as(shape)?)?;
                        return Ok((out, shape.clone()));
                    }
                    Const::Mul(_) => {
                        let out = s.binary_impl::<candle_core::op::Mul>(cs, l, &cl.broadcast_as(shape)?)?;
                        return Ok((out, shape.clone()));
                    }
                    _ => {}
                }
            }
        }
        drop(cst);
        let x = to_cpu_tensor(s, l)?;
        into_cpu_storage(self.apply(&x)?)
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(match self {
            Const::MatmulT(w) => grad.matmul(w)?,
            Const::Add(_) => grad.clone(),
            Const::Mul(c) => grad.broadcast_mul(c)?,
        }))
    }
}

/// Dispatch: the custom op on the CPU (it also runs untracked inputs, as its forward works on
/// the storages directly), the plain op where the constant itself is tracked or on devices
/// without a CPU-side implementation.
fn run(x: &Tensor, c: Const) -> Result<Tensor> {
    if x.device().is_cpu() && !c.constant().track_op() && x.dtype() != DType::U32 {
        x.apply_op1(c)
    } else {
        c.apply(x)
    }
}

/// x [N, in] · Wᵀ for a frozen W [out, in].
pub fn matmul_frozen_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    run(x, Const::MatmulT(w.clone()))
}

/// x + c for a frozen c (broadcast).
pub fn add_frozen(x: &Tensor, c: &Tensor) -> Result<Tensor> {
    run(x, Const::Add(c.clone()))
}

/// x * c for a frozen c (broadcast).
pub fn mul_frozen(x: &Tensor, c: &Tensor) -> Result<Tensor> {
    run(x, Const::Mul(c.clone()))
}
