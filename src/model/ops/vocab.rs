//! The output projection and the per-token log-probs as one op, for f32 on the CPU: for rows
//! h [N, H] and the frozen output matrix W [V, H], out[n] = (log_softmax(h·Wᵀ)[n, label[n]],
//! Σ_v (h·Wᵀ)[n, v]).
//!
//! Composed, the [N, V] logits are kept for the backward pass and the backward allocates their
//! [N, V] gradient: at a 150k vocabulary that is the largest pair of tensors of a step. Here the
//! logits exist a block of rows at a time, forward and backward, which recomputes each block's
//! logits (one more product with W) instead of keeping them:
//!
//! dh = Σ_blocks g·(onehot(label) − softmax(h·Wᵀ))·W.
//!
//! The second column, the logits' sum (TRL's logits/chosen and logits/rejected metrics), carries
//! no gradient. A trained output matrix, soft-capped logits, other dtypes and devices take the
//! composed path in [`crate::model::decoder`].

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{gemm_into, storage_f32, with_f32, Mat};
use super::simd::{log_sum_exp, neg_softmax_grad};

/// Rows whose logits exist at once: as many as fit in 128 MiB, within [64, 1024] (217 rows of
/// a 152k vocabulary, 1024 of a 16k one). Products of fewer rows run well below the GEMM's
/// peak (64 rows × 16k: 102 against 130 GFLOP/s on a 2-core AVX2 machine).
fn block_rows(vocab: usize) -> usize {
    ((128usize << 20) / (4 * vocab.max(1))).clamp(64, 1024)
}

struct VocabLogps {
    /// [V, H], f32, contiguous.
    weight: Tensor,
    labels: Vec<u32>,
}

impl VocabLogps {
    /// The logits of a block of rows [m, h] into `logits` [m, V].
    fn block_logits(&self, logits: &mut [f32], rows: &[f32], h: usize) -> Result<()> {
        let m = rows.len() / h.max(1);
        let v = logits.len() / m.max(1);
        with_f32(&self.weight, |w| {
            gemm_into(logits, Mat::new(rows, m, h), Mat::new(w, v, h).t(), 1.0, false)
        })
    }
}

impl CustomOp1 for VocabLogps {
    fn name(&self) -> &'static str {
        "vocab-logps"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = storage_f32(s, l)?;
        let (n, h) = l.shape().dims2()?;
        let v = self.weight.dim(0)?;
        let per = block_rows(v);
        let mut out = vec![0f32; n * 2];
        let mut logits = vec![0f32; per.min(n) * v];
        for (bi, (rows, o)) in x.chunks(per * h).zip(out.chunks_mut(per * 2)).enumerate() {
            let m = rows.len() / h;
            let block = &mut logits[..m * v];
            self.block_logits(block, rows, h)?;
            o.par_chunks_mut(2)
                .zip(block.par_chunks(v))
                .enumerate()
                .for_each(|(i, (o, row))| {
                    o[0] = row[self.labels[bi * per + i] as usize] - log_sum_exp(row);
                    o[1] = row.iter().sum();
                });
        }
        Ok((CpuStorage::F32(out), Shape::from((n, 2))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (n, h) = arg.dims2()?;
        let v = self.weight.dim(0)?;
        let dx = with_f32(arg, |x| {
            with_f32(grad, |g| {
                let mut dx = vec![0f32; n * h];
                let per = block_rows(v);
                let mut logits = vec![0f32; per.min(n) * v];
                for (bi, (rows, d)) in x.chunks(per * h).zip(dx.chunks_mut(per * h)).enumerate() {
                    let m = rows.len() / h;
                    let block = &mut logits[..m * v];
                    self.block_logits(block, rows, h)?;
                    block.par_chunks_mut(v).enumerate().for_each(|(i, row)| {
                        let r = bi * per + i;
                        let gi = g[r * 2];
                        neg_softmax_grad(row, None, log_sum_exp(row), gi);
                        row[self.labels[r] as usize] += gi;
                    });
                    with_f32(&self.weight, |w| {
                        gemm_into(d, Mat::new(block, m, v), Mat::new(w, v, h), 1.0, false)
                    })?;
                }
                Ok(dx)
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// [log_softmax(rows·Wᵀ)[label], Σ logits] per row, [N, 2], for rows [N, H], a frozen output
/// matrix W [V, H] and labels [N]: one op when rows and W are f32 on the CPU, `None` otherwise.
pub fn vocab_logps(rows: &Tensor, weight: &Tensor, labels: &Tensor) -> Result<Option<Tensor>> {
    let ok = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && t.rank() == 2;
    if !ok(rows) || !ok(weight) || weight.track_op() {
        return Ok(None);
    }
    let (n, h) = rows.dims2()?;
    let (v, wh) = weight.dims2()?;
    if wh != h {
        candle_core::bail!(
            "vocab logps: rows {:?} against an output matrix {:?}",
            rows.dims(),
            weight.dims()
        );
    }
    let labels = labels.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    if labels.len() != n {
        candle_core::bail!("vocab logps: {} labels for {n} rows", labels.len());
    }
    if let Some(&bad) = labels.iter().find(|&&t| t as usize >= v) {
        candle_core::bail!("vocab logps: label {bad} outside a vocabulary of {v}");
    }
    let op = VocabLogps {
        weight: weight.contiguous()?,
        labels,
    };
    Ok(Some(rows.contiguous()?.apply_op1(op)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::testing::{max_diff, uniform};
    use candle_core::{Device, Var, D};

    fn rand(shape: (usize, usize), seed: u64, scale: f32) -> Tensor {
        uniform(&[shape.0, shape.1], seed, scale)
    }

    /// Against the product, log-softmax and gather composed, over more rows than one block: the
    /// log-probs, the logits' sums, and the gradient of the rows through the log-probs only.
    #[test]
    fn matches_composed_projection_and_logps() {
        let (h, v) = (12, 37);
        let n = block_rows(v) + 9;
        let x = Var::from_tensor(&rand((n, h), 1, 1.0)).unwrap();
        let w = rand((v, h), 2, 1.5);
        let labels: Vec<u32> = (0..n as u32).map(|i| (i * 7) % v as u32).collect();
        let labels = Tensor::new(labels.as_slice(), &Device::Cpu).unwrap();
        let fused = vocab_logps(x.as_tensor(), &w, &labels).unwrap().unwrap();
        let logits = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
        let lp = crate::model::ops::log_softmax_last_dim(&logits)
            .unwrap()
            .gather(&labels.unsqueeze(1).unwrap(), D::Minus1)
            .unwrap()
            .squeeze(1)
            .unwrap();
        assert!(max_diff(&fused.narrow(1, 0, 1).unwrap().squeeze(1).unwrap(), &lp) < 1e-5);
        let sums = logits.sum(D::Minus1).unwrap();
        assert!(max_diff(&fused.narrow(1, 1, 1).unwrap().squeeze(1).unwrap(), &sums) < 1e-4);
        let up = rand((n, 1), 3, 1.0).squeeze(1).unwrap();
        let gf = (fused.narrow(1, 0, 1).unwrap().squeeze(1).unwrap() * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gc = (&lp * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let e = max_diff(gf.get(&x).unwrap(), gc.get(&x).unwrap());
        assert!(e < 1e-5, "rows' gradient differs by {e}");
    }

    #[test]
    fn rejects_labels_outside_the_vocabulary_and_declines_bf16() {
        let x = rand((3, 4), 1, 1.0);
        let w = rand((5, 4), 2, 1.0);
        let bad = Tensor::new(&[0u32, 5, 1], &Device::Cpu).unwrap();
        assert!(vocab_logps(&x, &w, &bad).is_err());
        let ok = Tensor::new(&[0u32, 4, 1], &Device::Cpu).unwrap();
        let bf = x.to_dtype(DType::BF16).unwrap();
        assert!(vocab_logps(&bf, &w, &ok).unwrap().is_none());
    }
}
