//! The attention core as one op with its own backward, for f32 on the CPU:
//! out = softmax(scale · q·kᵀ + mask)·v per head, with grouped-query heads reading their shared
//! key/value head in place.
//!
//! Composed from tensor ops, attention keeps the [B, heads, T, keys] probabilities (and the
//! backward allocates as many again for their gradient and the scores'), quadratic in the
//! sequence length. Here the node keeps only q, k and v; the backward recomputes each head's
//! probabilities from them, one [T, keys] tile per task at a time:
//!
//! dv = Pᵀ·dO, dP = dO·vᵀ, dS = scale · P ⊙ (dP − rowsum(P ⊙ dP)), dq = dS·k, dk = dSᵀ·q,
//!
//! with the dk and dv of the query heads that share a key/value head summed. The output is laid
//! out [B, T, heads · head_dim], the input of the output projection, without a transpose copy.
//! Other dtypes and devices, soft-capped scores and the KV-cache path take the composed version
//! in [`crate::model::decoder`].

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{gemm_seq, storage_f32, with_f32, Mat};
use super::simd::softmax_row;

#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    heads: usize,
    kv_heads: usize,
    t: usize,
    keys: usize,
    hd: usize,
}

impl Dims {
    /// The rows of query head `h` of batch row `bi` in q [B, heads, T, hd].
    fn q_off(&self, bi: usize, h: usize) -> usize {
        (bi * self.heads + h) * self.t * self.hd
    }

    /// The rows of the key/value head query head `h` reads, in k or v [B, kv_heads, keys, hd].
    fn kv_off(&self, bi: usize, h: usize) -> usize {
        let g = h / (self.heads / self.kv_heads);
        (bi * self.kv_heads + g) * self.keys * self.hd
    }

    /// Query head `h` of batch row `bi` inside a [B, T, heads · hd] tensor.
    fn merged<'a>(&self, data: &'a [f32], bi: usize, h: usize) -> Mat<'a> {
        let width = self.heads * self.hd;
        let start = bi * self.t * width + h * self.hd;
        Mat {
            data: &data[start..],
            rows: self.t,
            cols: self.hd,
            rs: width,
            cs: 1,
        }
    }
}

struct AttentionOp {
    /// Additive mask [mask_b, mask_h, T, keys], f32, or `None`.
    mask: Option<Tensor>,
    mask_b: usize,
    mask_h: usize,
    scale: f32,
    dims: Dims,
}

impl AttentionOp {
    /// The probabilities P [T, keys] of query head `h` of batch row `bi`, written into `p`:
    /// the same arithmetic, in the same order, forward and backward.
    fn probs(&self, p: &mut [f32], q: &[f32], k: &[f32], mask: Option<&[f32]>, bi: usize, h: usize) -> Result<()> {
        let d = self.dims;
        let qh = Mat::new(&q[d.q_off(bi, h)..][..d.t * d.hd], d.t, d.hd);
        let kg = Mat::new(&k[d.kv_off(bi, h)..][..d.keys * d.hd], d.keys, d.hd);
        gemm_seq(p, qh, kg.t(), 1.0, false)?;
        let mb = if self.mask_b == 1 { 0 } else { bi };
        let mh = if self.mask_h == 1 { 0 } else { h };
        for (i, row) in p.chunks_exact_mut(d.keys).enumerate() {
            let m = mask.map(|m| &m[((mb * self.mask_h + mh) * d.t + i) * d.keys..][..d.keys]);
            softmax_row(row, m, self.scale);
        }
        Ok(())
    }

    fn with_mask<R>(&self, f: impl FnOnce(Option<&[f32]>) -> Result<R>) -> Result<R> {
        match &self.mask {
            Some(m) => with_f32(m, |mv| f(Some(mv))),
            None => f(None),
        }
    }

    /// out [B, T, heads · hd] from contiguous q, k, v.
    fn forward(&self, q: &[f32], k: &[f32], v: &[f32]) -> Result<Vec<f32>> {
        let d = self.dims;
        let heads: Vec<Vec<f32>> = self.with_mask(|mask| {
            (0..d.b * d.heads)
                .into_par_iter()
                .map(|task| {
                    let (bi, h) = (task / d.heads, task % d.heads);
                    let mut p = vec![0f32; d.t * d.keys];
                    self.probs(&mut p, q, k, mask, bi, h)?;
                    let vg = Mat::new(&v[d.kv_off(bi, h)..][..d.keys * d.hd], d.keys, d.hd);
                    let mut o = vec![0f32; d.t * d.hd];
                    gemm_seq(&mut o, Mat::new(&p, d.t, d.keys), vg, 1.0, false)?;
                    Ok(o)
                })
                .collect::<Result<_>>()
        })?;
        let width = d.heads * d.hd;
        let mut out = vec![0f32; d.b * d.t * width];
        for (task, o) in heads.iter().enumerate() {
            let (bi, h) = (task / d.heads, task % d.heads);
            for (i, row) in o.chunks_exact(d.hd).enumerate() {
                out[(bi * d.t + i) * width + h * d.hd..][..d.hd].copy_from_slice(row);
            }
        }
        Ok(out)
    }

    /// dq [T, hd], dk and dv [keys, hd] of one query head, given dO [B, T, heads · hd].
    fn head_backward(&self, inp: [&[f32]; 4], mask: Option<&[f32]>, bi: usize, h: usize) -> Result<[Vec<f32>; 3]> {
        let [q, k, v, go] = inp;
        let d = self.dims;
        let mut p = vec![0f32; d.t * d.keys];
        self.probs(&mut p, q, k, mask, bi, h)?;
        let pm = Mat::new(&p, d.t, d.keys);
        let dout = d.merged(go, bi, h);
        let mut dv = vec![0f32; d.keys * d.hd];
        gemm_seq(&mut dv, pm.t(), dout, 1.0, false)?;
        let vg = Mat::new(&v[d.kv_off(bi, h)..][..d.keys * d.hd], d.keys, d.hd);
        let mut ds = vec![0f32; d.t * d.keys];
        gemm_seq(&mut ds, dout, vg.t(), 1.0, false)?;
        for (dr, pr) in ds.chunks_exact_mut(d.keys).zip(p.chunks_exact(d.keys)) {
            let dot: f32 = pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
            for (g, &pv) in dr.iter_mut().zip(pr) {
                *g = self.scale * pv * (*g - dot);
            }
        }
        let dsm = Mat::new(&ds, d.t, d.keys);
        let kg = Mat::new(&k[d.kv_off(bi, h)..][..d.keys * d.hd], d.keys, d.hd);
        let mut dq = vec![0f32; d.t * d.hd];
        gemm_seq(&mut dq, dsm, kg, 1.0, false)?;
        let qh = Mat::new(&q[d.q_off(bi, h)..][..d.t * d.hd], d.t, d.hd);
        let mut dk = vec![0f32; d.keys * d.hd];
        gemm_seq(&mut dk, dsm.t(), qh, 1.0, false)?;
        Ok([dq, dk, dv])
    }

    /// dq [B, heads, T, hd] and dk, dv [B, kv_heads, keys, hd], each head's share of a key/value
    /// head's gradient summed in head order.
    fn backward(&self, inp: [&[f32]; 4]) -> Result<[Vec<f32>; 3]> {
        let d = self.dims;
        let per_head: Vec<[Vec<f32>; 3]> = self.with_mask(|mask| {
            (0..d.b * d.heads)
                .into_par_iter()
                .map(|task| self.head_backward(inp, mask, task / d.heads, task % d.heads))
                .collect::<Result<_>>()
        })?;
        let kv_len = d.keys * d.hd;
        let mut dq = Vec::with_capacity(d.b * d.heads * d.t * d.hd);
        let mut dk = vec![0f32; d.b * d.kv_heads * kv_len];
        let mut dv = vec![0f32; d.b * d.kv_heads * kv_len];
        for (task, [q, k, v]) in per_head.iter().enumerate() {
            let (bi, h) = (task / d.heads, task % d.heads);
            dq.extend_from_slice(q);
            let off = d.kv_off(bi, h);
            dk[off..off + kv_len].iter_mut().zip(k).for_each(|(a, b)| *a += b);
            dv[off..off + kv_len].iter_mut().zip(v).for_each(|(a, b)| *a += b);
        }
        Ok([dq, dk, dv])
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (storage_f32(qs, ql)?, storage_f32(ks, kl)?, storage_f32(vs, vl)?);
        let d = self.dims;
        let out = self.forward(&q, &k, &v)?;
        Ok((CpuStorage::F32(out), Shape::from((d.b, d.t, d.heads * d.hd))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [dq, dk, dv] = with_f32(q, |qv| {
            with_f32(k, |kv| {
                with_f32(v, |vv| with_f32(grad, |g| self.backward([qv, kv, vv, g])))
            })
        })?;
        let wrap = |t: &Tensor, data: Vec<f32>| -> Result<Option<Tensor>> {
            Ok(if t.track_op() {
                Some(Tensor::from_vec(data, t.shape(), t.device())?)
            } else {
                None
            })
        };
        Ok((wrap(q, dq)?, wrap(k, dk)?, wrap(v, dv)?))
    }
}

/// softmax(scale · q·kᵀ + mask)·v for q [B, heads, T, hd], k and v [B, kv_heads, keys, hd] and an
/// additive frozen mask [B or 1, heads or 1, T, keys], laid out [B, T, heads · hd]: one op when
/// every operand is an f32 CPU tensor, `None` otherwise (the caller composes it).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Option<Tensor>> {
    let ok = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && t.rank() == 4;
    if ![q, k, v].into_iter().chain(mask).all(ok) {
        return Ok(None);
    }
    let (b, heads, t, hd) = q.dims4()?;
    let (kb, kv_heads, keys, khd) = k.dims4()?;
    if kb != b || khd != hd || v.dims() != k.dims() || kv_heads == 0 || heads % kv_heads != 0 {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} do not fit together",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let (mask_b, mask_h) = match mask {
        None => (1, 1),
        Some(m) => {
            let (mb, mh, mt, mk) = m.dims4()?;
            if !(mb == 1 || mb == b) || !(mh == 1 || mh == heads) || mt != t || mk != keys {
                return Ok(None);
            }
            (mb, mh)
        }
    };
    let op = AttentionOp {
        mask: mask.map(|m| m.contiguous()).transpose()?,
        mask_b,
        mask_h,
        scale: scale as f32,
        dims: Dims {
            b,
            heads,
            kv_heads,
            t,
            keys,
            hd,
        },
    };
    Ok(Some(q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        op,
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::testing::{max_diff, uniform};
    use candle_core::{Device, Var};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        uniform(shape, seed, 1.0)
    }

    /// The composed core: heads of a group repeated, scores, masked softmax, weighted values.
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: f64) -> Tensor {
        let (b, heads, t, hd) = q.dims4().unwrap();
        let rep = heads / k.dim(1).unwrap();
        let repeat = |x: &Tensor| {
            let (b, g, l, d) = x.dims4().unwrap();
            x.unsqueeze(2)
                .unwrap()
                .expand((b, g, rep, l, d))
                .unwrap()
                .reshape((b, g * rep, l, d))
                .unwrap()
        };
        let s = (q.contiguous().unwrap().matmul(&repeat(k).t().unwrap()).unwrap() * scale).unwrap();
        let s = match mask {
            Some(m) => s.broadcast_add(m).unwrap(),
            None => s,
        };
        let p = crate::model::ops::softmax_last_dim(&s).unwrap();
        p.matmul(&repeat(v))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, heads * hd))
            .unwrap()
    }

    /// Forward and the gradients of q, k and v against the composed core, with grouped-query
    /// heads, a causal mask broadcast over heads, a per-head mask and no mask; a query view
    /// that is not contiguous; an untracked value input.
    #[test]
    fn matches_composed_attention() {
        let (b, heads, kv, t, hd) = (2, 6, 2, 7, 8);
        let causal: Vec<f32> = (0..t * t).map(|i| if i % t > i / t { -1e9 } else { 0.0 }).collect();
        let causal = Tensor::from_vec(causal, (1, 1, t, t), &Device::Cpu).unwrap();
        let per_head = (rand(&[b, heads, t, t], 9)
            .ge(0.3)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            * -1e9)
            .unwrap();
        for (mask, track_v) in [(Some(&causal), true), (Some(&per_head), true), (None, false)] {
            let q = Var::from_tensor(&rand(&[b, t, heads, hd], 1)).unwrap();
            let k = Var::from_tensor(&rand(&[b, kv, t, hd], 2)).unwrap();
            let v = Var::from_tensor(&rand(&[b, kv, t, hd], 3)).unwrap();
            let qv = q.as_tensor().transpose(1, 2).unwrap();
            let vin = if track_v {
                v.as_tensor().clone()
            } else {
                v.as_tensor().detach()
            };
            let scale = 0.35;
            let fused = attention(&qv, k.as_tensor(), &vin, mask, scale).unwrap().unwrap();
            let reference = composed(&qv, k.as_tensor(), &vin, mask, scale);
            assert!(max_diff(&fused, &reference) < 1e-5, "forward");
            let up = rand(fused.dims(), 7);
            let gf = (&fused * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = (&reference * &up).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
                match (gf.get(var), gc.get(var)) {
                    (Some(f), Some(c)) => {
                        let e = max_diff(f, c);
                        assert!(e < 1e-5, "d{name} differs by {e}");
                    }
                    (None, None) => assert!(name == "v" && !track_v),
                    _ => panic!("d{name} present in one backward only"),
                }
            }
        }
    }

    #[test]
    fn declines_other_dtypes_and_rejects_mismatched_heads() {
        let q = rand(&[1, 4, 3, 8], 1);
        let k = rand(&[1, 2, 3, 8], 2);
        let bf = q.to_dtype(DType::BF16).unwrap();
        assert!(attention(&bf, &k, &k, None, 1.0).unwrap().is_none());
        let k3 = rand(&[1, 3, 3, 8], 3);
        assert!(attention(&q, &k3, &k3, None, 1.0).is_err());
        let wide = rand(&[1, 1, 3, 4], 4);
        assert!(attention(&q, &k, &k, Some(&wide), 1.0).unwrap().is_none());
    }
}
