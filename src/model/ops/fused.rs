//! Fused CPU kernels with a hand-written backward for the element-wise parts of the decoder:
//! RMSNorm, rotary embeddings, SiLU-gated product and per-token log-probs.
//!
//! Composed from candle primitives, each of these is a chain of 5–10 tensor ops, every one of
//! which allocates its output, walks memory once more and keeps its inputs for the backward
//! pass. Here each is one pass forward and one pass backward, parallel over rows, keeping only
//! its input. They apply to f32 tensors on the CPU; other dtypes and devices use the composed
//! versions in [`super`], which compute the same values.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{storage_f32 as f32_view, with_f32};
use super::simd::{self, log_sum_exp, softmax_row};

/// Rows per rayon task: enough work per task to amortise scheduling.
fn chunk_rows(row_len: usize) -> usize {
    (16384 / row_len.max(1)).max(1)
}

/// The f32 elements of a (CPU) tensor in row-major order.
fn tensor_f32(t: &Tensor) -> Result<Vec<f32>> {
    with_f32(t, |v| Ok(v.to_vec()))
}

fn fused_ok(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

// ---------------------------------------------------------------------------------------------
// RMSNorm: y = w · x / sqrt(mean(x²) + eps) over the last dimension, w frozen.

struct RmsNorm {
    weight: Vec<f32>,
    eps: f32,
}

fn inv_rms(x: &[f32], eps: f32) -> f32 {
    // Accumulated in f64: as accurate as PyTorch's pairwise f32 sum, whatever the row length.
    let ss: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    (1.0 / (ss / x.len() as f64 + eps as f64).sqrt()) as f32
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_view(s, l)?;
        let h = self.weight.len();
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(h * chunk_rows(h))
            .zip(x.par_chunks(h * chunk_rows(h)))
            .for_each(|(yc, xc)| {
                for (yr, xr) in yc.chunks_mut(h).zip(xc.chunks(h)) {
                    let r = inv_rms(xr, self.eps);
                    for ((o, &v), &w) in yr.iter_mut().zip(xr).zip(&self.weight) {
                        *o = v * r * w;
                    }
                }
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        with_f32(arg, |x| with_f32(grad, |g| self.backward(x, g)))
            .and_then(|dx| Tensor::from_vec(dx, arg.shape(), arg.device()))
            .map(Some)
    }
}

impl RmsNorm {
    fn backward(&self, x: &[f32], g: &[f32]) -> Result<Vec<f32>> {
        let h = self.weight.len();
        let mut dx = vec![0f32; x.len()];
        let rows = h * chunk_rows(h);
        dx.par_chunks_mut(rows)
            .zip(x.par_chunks(rows).zip(g.par_chunks(rows)))
            .for_each(|(dc, (xc, gc))| {
                for ((dr, xr), gr) in dc.chunks_mut(h).zip(xc.chunks(h)).zip(gc.chunks(h)) {
                    let r = inv_rms(xr, self.eps);
                    let dot = gr
                        .iter()
                        .zip(xr)
                        .zip(&self.weight)
                        .map(|((&g, &x), &w)| (g * w) as f64 * x as f64)
                        .sum::<f64>() as f32;
                    let c = r * r * r * dot / h as f32;
                    for (((d, &gv), &xv), &w) in dr.iter_mut().zip(gr).zip(xr).zip(&self.weight) {
                        *d = r * gv * w - xv * c;
                    }
                }
            });
        Ok(dx)
    }
}

/// RMSNorm over the last dimension with a frozen weight, fused when `x` is f32 on the CPU.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    if !fused_ok(x) || weight.dtype() != DType::F32 || weight.dims1()? != x.dim(candle_core::D::Minus1)? {
        return Ok(None);
    }
    let op = RmsNorm {
        weight: tensor_f32(weight)?,
        eps: eps as f32,
    };
    Ok(Some(x.apply_op1(op)?))
}

// ---------------------------------------------------------------------------------------------
// Rotary embeddings, "rotate half" layout: x [B, H, T, D] (any strides) with tables
// cos/sin [T, D/2] (shared by every row) or [B, T, D/2] (per-row positions). Output contiguous.

struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// Whether the tables have a batch dimension.
    per_row: bool,
    t: usize,
}

impl Rope {
    fn table_offset(&self, b: usize, t: usize, half: usize) -> usize {
        if self.per_row {
            (b * self.t + t) * half
        } else {
            t * half
        }
    }

    /// out = rope(x) when `sign` is 1, the inverse rotation (the backward) when it is -1.
    fn apply(&self, x: &[f32], dims: [usize; 4], strides: [usize; 4], sign: f32) -> Vec<f32> {
        let [_, nh, t, d] = dims;
        let half = d / 2;
        let mut out = vec![0f32; dims.iter().product()];
        out.par_chunks_mut(d).enumerate().for_each(|(row, o)| {
            let ti = row % t;
            let hi = (row / t) % nh;
            let bi = row / (t * nh);
            let base = bi * strides[0] + hi * strides[1] + ti * strides[2];
            let tab = self.table_offset(bi, ti, half);
            for i in 0..half {
                let x1 = x[base + i * strides[3]];
                let x2 = x[base + (i + half) * strides[3]];
                let (c, s) = (self.cos[tab + i], sign * self.sin[tab + i]);
                o[i] = x1 * c - x2 * s;
                o[i + half] = x2 * c + x1 * s;
            }
        });
        out
    }
}

fn dims4(l: &Layout) -> Result<([usize; 4], [usize; 4])> {
    let d = l.dims();
    let s = l.stride();
    if d.len() != 4 {
        candle_core::bail!("fused rope: expected a rank-4 input, got {:?}", d);
    }
    Ok(([d[0], d[1], d[2], d[3]], [s[0], s[1], s[2], s[3]]))
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(v) = s else {
            candle_core::bail!("fused rope: expected f32")
        };
        let (dims, strides) = dims4(l)?;
        let out = self.apply(&v[l.start_offset()..], dims, strides, 1.0);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dims = grad.dims();
        let dims = [dims[0], dims[1], dims[2], dims[3]];
        let strides = [dims[1] * dims[2] * dims[3], dims[2] * dims[3], dims[3], 1];
        let dx = with_f32(grad, |g| Ok(self.apply(g, dims, strides, -1.0)))?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// Rotary embeddings of x [B, H, T, D] with cos/sin [T, D/2] or [B, T, D/2], fused when every
/// operand is f32 on the CPU.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Option<Tensor>> {
    if !fused_ok(x) || !fused_ok(cos) || x.rank() != 4 {
        return Ok(None);
    }
    let (b, _, t, d) = x.dims4()?;
    let per_row = cos.rank() == 3;
    let want: Vec<usize> = if per_row { vec![b, t, d / 2] } else { vec![t, d / 2] };
    if cos.dims() != want.as_slice() || sin.dims() != want.as_slice() || d % 2 != 0 {
        return Ok(None);
    }
    let op = Rope {
        cos: tensor_f32(cos)?,
        sin: tensor_f32(sin)?,
        per_row,
        t,
    };
    Ok(Some(x.apply_op1(op)?))
}

// ---------------------------------------------------------------------------------------------
// SiLU-gated product: y = silu(g) · u, the Llama MLP's inner activation.

struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "fused-silu-mul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("fused silu-mul: shapes {:?} and {:?} differ", l1.shape(), l2.shape());
        }
        let (g, u) = (f32_view(s1, l1)?, f32_view(s2, l2)?);
        let mut y = vec![0f32; g.len()];
        silu_mul_into(&mut y, &g, &u);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, a1: &Tensor, a2: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = with_f32(a1, |g| {
            with_f32(a2, |u| with_f32(grad, |dy| Ok(silu_mul_backward(g, u, dy))))
        })?;
        let dev = a1.device();
        Ok((
            Some(Tensor::from_vec(dg, a1.shape(), dev)?),
            Some(Tensor::from_vec(du, a2.shape(), dev)?),
        ))
    }
}

/// y = silu(g) · u.
pub(super) fn silu_mul_into(y: &mut [f32], g: &[f32], u: &[f32]) {
    const C: usize = 16384;
    y.par_chunks_mut(C)
        .zip(g.par_chunks(C).zip(u.par_chunks(C)))
        .for_each(|(yc, (gc, uc))| simd::silu_mul(yc, gc, uc));
}

/// dg, du of y = silu(g) · u given dy.
pub(super) fn silu_mul_backward(g: &[f32], u: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut dg = vec![0f32; g.len()];
    let mut du = vec![0f32; g.len()];
    const C: usize = 16384;
    dg.par_chunks_mut(C)
        .zip(du.par_chunks_mut(C))
        .zip(g.par_chunks(C).zip(u.par_chunks(C)).zip(dy.par_chunks(C)))
        .for_each(|((dgc, duc), ((gc, uc), dyc))| simd::silu_mul_grad(dgc, duc, gc, uc, dyc));
    (dg, du)
}

/// silu(g) · u, fused when both are f32 on the CPU with the same shape.
pub fn silu_mul(g: &Tensor, u: &Tensor) -> Result<Option<Tensor>> {
    if !fused_ok(g) || !fused_ok(u) || g.shape() != u.shape() {
        return Ok(None);
    }
    Ok(Some(g.apply_op2(u, SiluMul)?))
}

// ---------------------------------------------------------------------------------------------
// Per-token log-probs: out[n] = log_softmax(logits[n])[label[n]] for logits [N, V].
// The backward, g[n] · (onehot(label[n]) − softmax(logits[n])), recomputes the softmax from the
// logits instead of keeping an [N, V] intermediate.

struct TokenLogps {
    labels: Vec<u32>,
}

impl CustomOp1 for TokenLogps {
    fn name(&self) -> &'static str {
        "fused-token-logps"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_view(s, l)?;
        let (n, v) = l.shape().dims2()?;
        let mut out = vec![0f32; n];
        out.par_iter_mut().enumerate().for_each(|(i, o)| {
            let row = &x[i * v..(i + 1) * v];
            *o = row[self.labels[i] as usize] - log_sum_exp(row);
        });
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (n, v) = arg.dims2()?;
        let dx = with_f32(arg, |x| with_f32(grad, |g| Ok(self.backward(x, g, n, v))))?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

impl TokenLogps {
    fn backward(&self, x: &[f32], g: &[f32], n: usize, v: usize) -> Vec<f32> {
        let mut dx = vec![0f32; n * v];
        dx.par_chunks_mut(v).enumerate().for_each(|(i, d)| {
            let row = &x[i * v..(i + 1) * v];
            simd::neg_softmax_grad(d, Some(row), log_sum_exp(row), g[i]);
            d[self.labels[i] as usize] += g[i];
        });
        dx
    }
}

/// log_softmax(logits)[label] per row for logits [N, V] and labels [N], fused when the logits
/// are f32 on the CPU.
pub fn token_logps(logits: &Tensor, labels: &Tensor) -> Result<Option<Tensor>> {
    if !fused_ok(logits) || logits.rank() != 2 {
        return Ok(None);
    }
    let (n, v) = logits.dims2()?;
    let labels = labels.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    if labels.len() != n {
        candle_core::bail!("token_logps: {} labels for {n} rows", labels.len());
    }
    if let Some(&bad) = labels.iter().find(|&&t| t as usize >= v) {
        candle_core::bail!("token_logps: label {bad} outside a vocabulary of {v}");
    }
    Ok(Some(logits.apply_op1(TokenLogps { labels })?))
}

// ---------------------------------------------------------------------------------------------
// Attention probabilities: y = softmax(scale · x + mask) over the last dimension, for scores
// x [B, H, T, K] and an additive mask [B or 1, H or 1, T, K]. Backward from the output only:
// dx = scale · y · (g − Σ g·y).

struct ScaledMaskedSoftmax {
    mask: Vec<f32>,
    /// Mask dims: batch and head counts (1 when broadcast).
    mask_b: usize,
    mask_h: usize,
    scale: f32,
}

impl CustomOp1 for ScaledMaskedSoftmax {
    fn name(&self) -> &'static str {
        "fused-scaled-masked-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_view(s, l)?;
        let (_, h, t, k) = l.shape().dims4()?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(k)
            .zip(x.par_chunks(k))
            .enumerate()
            .for_each(|(row, (yr, xr))| {
                let (i, hh, b) = (row % t, (row / t) % h, row / (t * h));
                let mb = if self.mask_b == 1 { 0 } else { b };
                let mh = if self.mask_h == 1 { 0 } else { hh };
                let m = &self.mask[((mb * self.mask_h + mh) * t + i) * k..][..k];
                yr.copy_from_slice(xr);
                softmax_row(yr, Some(m), self.scale);
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let k = arg.dim(candle_core::D::Minus1)?;
        let dx = with_f32(res, |y| with_f32(grad, |g| Ok(self.backward(y, g, k))))?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

impl ScaledMaskedSoftmax {
    fn backward(&self, y: &[f32], g: &[f32], k: usize) -> Vec<f32> {
        let mut dx = vec![0f32; y.len()];
        dx.par_chunks_mut(k)
            .zip(y.par_chunks(k).zip(g.par_chunks(k)))
            .for_each(|(dr, (yr, gr))| {
                let dot: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
                for ((d, &yv), &gv) in dr.iter_mut().zip(yr).zip(gr) {
                    *d = self.scale * yv * (gv - dot);
                }
            });
        dx
    }
}

/// softmax(scale · scores + mask) over the last dimension for scores [B, H, T, K] and a frozen
/// additive mask [B or 1, H or 1, T, K], fused when both are f32 on the CPU.
pub fn scaled_masked_softmax(scores: &Tensor, mask: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    if !fused_ok(scores) || !fused_ok(mask) || scores.rank() != 4 || mask.rank() != 4 {
        return Ok(None);
    }
    let (b, h, t, k) = scores.dims4()?;
    let (mb, mh, mt, mk) = mask.dims4()?;
    if !(mb == 1 || mb == b) || !(mh == 1 || mh == h) || mt != t || mk != k {
        return Ok(None);
    }
    let op = ScaledMaskedSoftmax {
        mask: tensor_f32(mask)?,
        mask_b: mb,
        mask_h: mh,
        scale: scale as f32,
    };
    Ok(Some(scores.apply_op1(op)?))
}

#[cfg(test)]
mod tests {
    //! Each fused op against the composed version, which runs in f64 (the fused kernels only
    //! take f32): forward values and the gradient of a random projection of the output.
    use candle_core::{Device, Tensor, Var, D};

    use crate::model::ops;
    use crate::model::ops::testing::max_diff;

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = crate::rng::Rng::new(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.next_normal() as f32).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Run `f` on `inputs` in f32 (fused) and f64 (composed); compare outputs and the input
    /// gradients of sum(out · w) for a random w.
    fn check(inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Tensor, tol: f32) {
        let run = |dt: candle_core::DType| {
            let vars: Vec<Var> = inputs
                .iter()
                .map(|t| Var::from_tensor(&t.to_dtype(dt).unwrap()).unwrap())
                .collect();
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let out = f(&ts);
            let w = rand(out.dims(), 7).to_dtype(dt).unwrap();
            let g = (&out * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let grads: Vec<Tensor> = vars
                .iter()
                .map(|v| g.get(v.as_tensor()).expect("no gradient").clone())
                .collect();
            (out, grads)
        };
        let (o32, g32) = run(candle_core::DType::F32);
        let (o64, g64) = run(candle_core::DType::F64);
        let e = max_diff(&o32, &o64);
        assert!(e <= tol, "forward differs by {e}");
        for (i, (a, b)) in g32.iter().zip(&g64).enumerate() {
            let e = max_diff(a, b);
            assert!(e <= tol, "gradient of input {i} differs by {e}");
        }
    }

    #[test]
    fn rms_norm_matches_composed() {
        let w = rand(&[48], 2);
        check(
            &[rand(&[3, 5, 48], 1)],
            |x| ops::rms_norm(&x[0], &w.to_dtype(x[0].dtype()).unwrap(), 1e-6).unwrap(),
            1e-4,
        );
    }

    #[test]
    fn rope_matches_composed_shared_and_per_row_tables() {
        let (b, h, t, d) = (2, 3, 5, 8);
        // Input laid out [B, T, H, D] and viewed as [B, H, T, D], as the decoder does.
        let x = rand(&[b, t, h, d], 3);
        let angles = rand(&[t, d / 2], 4);
        let per_row = rand(&[b, t, d / 2], 5);
        for tab in [angles, per_row] {
            let (cos, sin) = (tab.cos().unwrap(), tab.sin().unwrap());
            check(
                std::slice::from_ref(&x),
                |x| {
                    let dt = x[0].dtype();
                    let xv = x[0].transpose(1, 2).unwrap();
                    ops::apply_rope(&xv, &cos.to_dtype(dt).unwrap(), &sin.to_dtype(dt).unwrap()).unwrap()
                },
                1e-5,
            );
        }
    }

    #[test]
    fn scaled_masked_softmax_matches_composed() {
        for mask_shape in [[1usize, 1, 5, 6], [2, 1, 5, 6], [2, 3, 5, 6]] {
            let mask = (rand(&mask_shape, 12)
                .ge(0.5)
                .unwrap()
                .to_dtype(candle_core::DType::F32)
                .unwrap()
                * -1e9)
                .unwrap();
            check(
                &[rand(&[2, 3, 5, 6], 11)],
                |x| {
                    let m = mask.to_dtype(x[0].dtype()).unwrap();
                    match super::scaled_masked_softmax(&x[0], &m, 0.3).unwrap() {
                        Some(y) => y,
                        None => ops::softmax_last_dim(&(&x[0] * 0.3).unwrap().broadcast_add(&m).unwrap()).unwrap(),
                    }
                },
                1e-5,
            );
        }
    }

    #[test]
    fn silu_mul_matches_composed() {
        check(
            &[rand(&[4, 33], 6), rand(&[4, 33], 8)],
            |x| ops::silu_mul(&x[0], &x[1]).unwrap(),
            1e-5,
        );
    }

    #[test]
    fn token_logps_matches_composed() {
        let labels = Tensor::new(&[3u32, 0, 16, 9], &Device::Cpu).unwrap();
        // token_logps always works in f32; the f64 run spells out the composed version.
        let composed = |x: &Tensor| {
            let idx = labels.unsqueeze(1).unwrap();
            ops::log_softmax_last_dim(x)
                .unwrap()
                .gather(&idx, D::Minus1)
                .unwrap()
                .squeeze(1)
                .unwrap()
        };
        check(
            &[(rand(&[4, 17], 9) * 4.0).unwrap()],
            |x| match x[0].dtype() {
                candle_core::DType::F32 => crate::model::token_logps(&x[0], &labels).unwrap(),
                _ => composed(&x[0]),
            },
            1e-5,
        );
        // The composed version is what f64 runs: check it is a log-softmax.
        let x = rand(&[2, 5], 10).to_dtype(candle_core::DType::F64).unwrap();
        let lp = ops::log_softmax_last_dim(&x)
            .unwrap()
            .exp()
            .unwrap()
            .sum(D::Minus1)
            .unwrap();
        assert!(max_diff(&lp, &Tensor::ones(2, candle_core::DType::F64, &Device::Cpu).unwrap()) < 1e-12);
    }
}
