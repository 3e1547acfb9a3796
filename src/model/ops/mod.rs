//! Differentiable building blocks, and the one place that decides which implementation runs.
//! candle-nn 0.11's fused `rms_norm`, `softmax_last_dim`, `rope` and `sdpa` carry no gradient,
//! so everything on the path from a LoRA parameter to the loss is either one of the fused CPU
//! kernels with a hand-written backward in [`fused`] (f32 on the CPU), or composed here from
//! primitive ops that all implement backward (other dtypes and devices). Ops against a frozen
//! operand, whose backward flows only to the tracked input, are in [`frozen`].

pub mod attention;
pub mod cpu;
pub mod frozen;
pub mod fused;
pub mod lora_op;
pub mod matvec;
pub mod simd;
#[cfg(test)]
mod testing;
pub mod vocab;

use candle_core::{DType, Device, Result, Tensor, D};

use self::frozen::{add_frozen, mul_frozen};
use super::config::{ModelConfig, RopeScaling};

/// RMSNorm over the last dimension, computed in f32 and cast back, then scaled by `weight`
/// (as transformers: `weight * (x * rsqrt(mean(x^2) + eps)).to(input_dtype)`).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if let Some(y) = fused::rms_norm(x, weight, eps)? {
        return Ok(y);
    }
    let dtype = x.dtype();
    let x32 = x.to_dtype(DType::F32)?;
    let ms = x32.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x32.broadcast_div(&(ms + eps)?.sqrt()?)?;
    mul_frozen(&normed.to_dtype(dtype)?, weight)
}

/// Attention probabilities softmax(scale · scores + mask) over the last dimension, in f32, for
/// scores [B, H, T, K] and an additive frozen mask broadcastable to them (`None`: nothing masked).
pub fn attention_probs(scores: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let scores = scores.to_dtype(DType::F32)?;
    if let Some(m) = mask {
        if let Some(p) = fused::scaled_masked_softmax(&scores, m, scale)? {
            return Ok(p);
        }
    }
    let scaled = (scores * scale)?;
    let masked = match mask {
        Some(m) => add_frozen(&scaled, m)?,
        None => scaled,
    };
    softmax_last_dim(&masked)
}

/// Softmax over the last dimension, composed from primitives: the path of devices and dtypes
/// the fused kernel ([`fused::scaled_masked_softmax`]) does not take, and of unmasked rows. The
/// max is detached: softmax does not depend on it, and it keeps the backward graph small.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)
}

/// Log-softmax over the last dimension (max detached, as in [`softmax_last_dim`]), composed:
/// the per-token log-probs of [`token_logps`] where the fused kernel does not apply.
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let diff = x.broadcast_sub(&max)?;
    let lse = diff.exp()?.sum_keepdim(D::Minus1)?.log()?;
    diff.broadcast_sub(&lse)
}

/// Gemma's RMSNorm: like [`rms_norm`], but the product with `scale` (f32, already 1 + w) is
/// taken in f32 before the cast back (transformers: `(x̂ · (1 + w.float())).type_as(x)`).
pub fn rms_norm_f32_scale(x: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    if x.dtype() == DType::F32 {
        return rms_norm(x, scale, eps);
    }
    let x32 = x.to_dtype(DType::F32)?;
    let ms = x32.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x32.broadcast_div(&(ms + eps)?.sqrt()?)?;
    mul_frozen(&normed, scale)?.to_dtype(x.dtype())
}

/// c · tanh(x / c): Gemma 2's soft cap of attention scores and final logits.
pub fn soft_cap(x: &Tensor, cap: f64) -> Result<Tensor> {
    (x / cap)?.tanh()? * cap
}

/// silu(g) · u (the gated MLP activation).
pub fn silu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if let Some(y) = fused::silu_mul(g, u)? {
        return Ok(y);
    }
    g.silu()? * u
}

/// Rotary position embedding tables for given positions.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
    /// Phi-3's longrope: the frequencies of calls whose largest position is at or beyond the
    /// original context, and that context length.
    long: Option<(Vec<f32>, usize)>,
    /// Multiplier of cos and sin (longrope's attention factor; 1 otherwise).
    attention_factor: f32,
}

impl Rope {
    /// The rope of every layer (of the full-attention layers, where local layers differ).
    pub fn new(cfg: &ModelConfig) -> Rope {
        Rope::with(cfg.rotary_dim, cfg.rope_theta, &cfg.rope_scaling)
    }

    /// The rope of sliding-window layers, where it differs from [`Rope::new`] (Gemma 3).
    pub fn local(cfg: &ModelConfig) -> Option<Rope> {
        let (theta, scaling) = cfg.rope_local.as_ref()?;
        Some(Rope::with(cfg.rotary_dim, *theta, scaling))
    }

    fn with(dim: usize, base: f64, scaling: &RopeScaling) -> Rope {
        let plain: Vec<f64> = (0..dim / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f64 / dim as f64))
            .collect();
        let f32s = |v: Vec<f64>| v.into_iter().map(|f| f as f32).collect::<Vec<f32>>();
        let mut rope = Rope {
            inv_freq: vec![],
            long: None,
            attention_factor: 1.0,
        };
        let mut inv_freq = plain.clone();
        match scaling {
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
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                attention_factor,
            } => {
                let scaled = |ext: &[f64]| plain.iter().zip(ext).map(|(f, e)| f / e).collect::<Vec<f64>>();
                inv_freq = scaled(short_factor);
                rope.long = Some((f32s(scaled(long_factor)), *original_max_position_embeddings));
                rope.attention_factor = *attention_factor as f32;
            }
        }
        rope.inv_freq = f32s(inv_freq);
        rope
    }

    /// Whether this rope switches factor sets with the sequence length (longrope).
    pub fn can_switch(&self) -> bool {
        self.long.is_some()
    }

    /// Whether a call whose largest position is `longest - 1` uses longrope's long factors.
    pub fn uses_long(&self, longest: usize) -> bool {
        self.long.as_ref().is_some_and(|(_, original)| longest > *original)
    }

    /// cos and sin tables of shape `lead` + [rotary_dim/2], one row per position of `positions`
    /// in order: [T] for a range shared by every row, [B, T] for per-row positions. With
    /// longrope, the long frequencies apply to the whole call when its largest position is at or
    /// beyond the original context (as transformers chooses them per forward call).
    pub fn tables(
        &self,
        positions: impl IntoIterator<Item = usize>,
        lead: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let positions: Vec<usize> = positions.into_iter().collect();
        let longest = positions.iter().max().map_or(0, |p| p + 1);
        let inv_freq = match &self.long {
            Some((long, _)) if self.uses_long(longest) => long,
            _ => &self.inv_freq,
        };
        let half = inv_freq.len();
        let n: usize = lead.iter().product();
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        let scale = self.attention_factor;
        for p in positions {
            for &f in inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos() * scale);
                sin.push(angle.sin() * scale);
            }
        }
        let shape: Vec<usize> = lead.iter().copied().chain([half]).collect();
        let cos = Tensor::from_vec(cos, shape.as_slice(), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }
}

/// Apply rotary embeddings (the "rotate half" layout of Llama/Qwen checkpoints) to
/// x [B, H, T, D] with cos/sin [T, R/2], or [B, T, R/2] for per-row positions. Only the first
/// R dimensions of each head rotate (R < D with Phi's `partial_rotary_factor`).
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let rotary = 2 * cos.dim(D::Minus1)?;
    if rotary < d {
        let turned = apply_rope(&x.narrow(D::Minus1, 0, rotary)?, cos, sin)?;
        let kept = x.narrow(D::Minus1, rotary, d - rotary)?;
        return Tensor::cat(&[&turned, &kept], D::Minus1);
    }
    if let Some(y) = fused::rope(x, cos, sin)? {
        return Ok(y);
    }
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

/// Gather per-token log-probs of `labels` from logits: logits [N, V] (any float dtype),
/// labels [N] (u32) -> [N] f32.
pub fn token_logps(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let logits = logits.to_dtype(DType::F32)?;
    if let Some(lp) = fused::token_logps(&logits, labels)? {
        return Ok(lp);
    }
    let lp = log_softmax_last_dim(&logits)?;
    let idx = labels.to_dtype(DType::U32)?.unsqueeze(D::Minus1)?;
    lp.gather(&idx, D::Minus1)?.squeeze(D::Minus1)
}
