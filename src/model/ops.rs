//! Differentiable building blocks. candle-nn 0.11's fused `rms_norm`, `softmax_last_dim`, `rope`
//! and `sdpa` carry no gradient, so everything on the path from a LoRA parameter to the loss is
//! written here from primitive ops that all implement backward.

use candle_core::{DType, Device, Result, Tensor, D};

use super::config::{ModelConfig, RopeScaling};
use super::constop::mul_frozen;

/// RMSNorm over the last dimension, computed in f32 and cast back, then scaled by `weight`
/// (as transformers: `weight * (x * rsqrt(mean(x^2) + eps)).to(input_dtype)`).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if let Some(y) = super::fused::rms_norm(x, weight, eps)? {
        return Ok(y);
    }
    let dtype = x.dtype();
    let x32 = x.to_dtype(DType::F32)?;
    let ms = x32.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x32.broadcast_div(&(ms + eps)?.sqrt()?)?;
    mul_frozen(&normed.to_dtype(dtype)?, weight)
}

/// Softmax over the last dimension. The max is detached: softmax does not depend on it, and it
/// keeps the backward graph small.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    super::constop::softmax_last_dim(x)
}

/// Log-softmax over the last dimension (max detached, as in [`softmax_last_dim`]).
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let diff = x.broadcast_sub(&max)?;
    let lse = diff.exp()?.sum_keepdim(D::Minus1)?.log()?;
    diff.broadcast_sub(&lse)
}

/// silu(g) · u (the gated MLP activation).
pub fn silu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if let Some(y) = super::fused::silu_mul(g, u)? {
        return Ok(y);
    }
    g.silu()? * u
}

/// Rotary position embedding tables for a range of positions.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(cfg: &ModelConfig) -> Rope {
        let dim = cfg.head_dim;
        let base = cfg.rope_theta;
        let mut inv_freq: Vec<f64> = (0..dim / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f64 / dim as f64))
            .collect();
        match &cfg.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= factor),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old_ctx,
            } => {
                let low_wavelen = old_ctx / low_freq_factor;
                let high_wavelen = old_ctx / high_freq_factor;
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f64::consts::PI / *f;
                    if wavelen > low_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_wavelen {
                        let smooth = (old_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
        }
        Rope {
            inv_freq: inv_freq.into_iter().map(|f| f as f32).collect(),
        }
    }

    /// cos and sin tables of shape [len, head_dim/2] for positions `start..start+len`.
    pub fn tables(&self, start: usize, len: usize, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in start..start + len {
            for &f in &self.inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (len, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (len, half), device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }

    /// cos and sin tables of shape [B, T, head_dim/2] for explicit positions [B*T].
    pub fn tables_at(
        &self,
        positions: &[u32],
        b: usize,
        t: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (b, t, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (b, t, half), device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }
}

/// Apply rotary embeddings (the "rotate half" layout of Llama/Qwen checkpoints) to
/// x [B, H, T, D] with cos/sin [T, D/2], or [B, T, D/2] for per-row positions.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if let Some(y) = super::fused::rope(x, cos, sin)? {
        return Ok(y);
    }
    let d = x.dim(D::Minus1)?;
    let half = d / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    // [T, D/2] -> [1, 1, T, D/2]; [B, T, D/2] -> [B, 1, T, D/2].
    let (cos, sin) = if cos.rank() == 3 {
        (cos.unsqueeze(1)?, sin.unsqueeze(1)?)
    } else {
        (cos.unsqueeze(0)?.unsqueeze(0)?, sin.unsqueeze(0)?.unsqueeze(0)?)
    };
    let r1 = (mul_frozen(&x1, &cos)? - mul_frozen(&x2, &sin)?)?;
    let r2 = (mul_frozen(&x2, &cos)? + mul_frozen(&x1, &sin)?)?;
    Tensor::cat(&[&r1, &r2], D::Minus1)
}

/// Value added to attention scores at masked positions. Finite, so a fully masked row (a
/// left-padding query) gives a uniform distribution instead of NaN.
pub const MASK_VALUE: f32 = -1e9;
