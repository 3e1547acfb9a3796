//! AdamW with decoupled weight decay (torch.optim.AdamW), with state that can be saved and
//! restored exactly.

use std::collections::HashMap;

use candle_core::{Tensor, Var};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// One parameter with its moments.
struct Slot {
    name: String,
    var: Var,
    /// Multiplier of the step's learning rate (LoRA+ groups).
    lr_scale: f64,
    m: Tensor,
    v: Tensor,
}

pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
    /// Number of updates taken.
    pub t: u64,
}

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<AdamW> {
        Self::with_lr_scales(params.into_iter().map(|(n, v)| (n, v, 1.0)).collect(), cfg)
    }

    /// AdamW whose parameters each take the step's learning rate times their own factor.
    pub fn with_lr_scales(params: Vec<(String, Var, f64)>, cfg: AdamWConfig) -> Result<AdamW> {
        let slots = params
            .into_iter()
            .map(|(name, var, lr_scale)| {
                let z = var.as_tensor().zeros_like()?;
                Ok(Slot {
                    name,
                    var,
                    lr_scale,
                    m: z.clone(),
                    v: z,
                })
            })
            .collect::<Result<_>>()?;
        Ok(AdamW { cfg, slots, t: 0 })
    }

    /// One update with learning rate `lr`; `grads` maps each parameter name to its gradient.
    pub fn step(&mut self, grads: &HashMap<String, Tensor>, lr: f64) -> Result<()> {
        self.t += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        for s in &mut self.slots {
            let Some(g) = grads.get(&s.name) else { continue };
            let lr = lr * s.lr_scale;
            let p = s.var.as_tensor();
            let mut p_new = if c.weight_decay != 0.0 {
                (p * (1.0 - lr * c.weight_decay))?
            } else {
                p.clone()
            };
            s.m = ((&s.m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            s.v = ((&s.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((s.v.sqrt()? / bc2.sqrt())? + c.eps)?;
            p_new = (p_new - (s.m.div(&denom)? * (lr / bc1))?)?;
            s.var.set(&p_new)?;
        }
        Ok(())
    }

    /// Moments by name (`<name>.exp_avg`, `<name>.exp_avg_sq`) for a checkpoint.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.slots
            .iter()
            .flat_map(|s| {
                [
                    (format!("{}.exp_avg", s.name), s.m.clone()),
                    (format!("{}.exp_avg_sq", s.name), s.v.clone()),
                ]
            })
            .collect()
    }

    /// Restore moments saved by [`AdamW::state_tensors`].
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, t: u64, source: &std::path::Path) -> Result<()> {
        for s in &mut self.slots {
            for (suffix, dst) in [("exp_avg", &mut s.m), ("exp_avg_sq", &mut s.v)] {
                let key = format!("{}.{suffix}", s.name);
                let src = tensors.get(&key).ok_or_else(|| Error::MissingTensor {
                    path: source.into(),
                    name: key.clone(),
                })?;
                if src.dims() != dst.dims() {
                    return Err(Error::ShapeMismatch {
                        path: source.into(),
                        name: key,
                        expected: dst.dims().to_vec(),
                        got: src.dims().to_vec(),
                    });
                }
                *dst = src.to_device(dst.device())?;
            }
        }
        self.t = t;
        Ok(())
    }
}

/// LoRA+'s learning-rate factor of a parameter (`create_loraplus_optimizer`'s groups): `ratio`
/// for a B matrix and for every 1-D tensor (DoRA magnitudes), 1 for the rest.
pub fn loraplus_scale(name: &str, var: &Var, ratio: f64) -> f64 {
    if name.contains("lora_B") || var.as_tensor().rank() == 1 {
        ratio
    } else {
        1.0
    }
}

/// Global L2 norm of all gradients.
pub fn grad_norm(grads: &HashMap<String, Tensor>) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.values() {
        total += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    Ok(total.sqrt())
}

/// Scale gradients so their global norm is at most `max_norm` (torch's clip_grad_norm_:
/// coefficient max_norm / (norm + 1e-6), applied only when below 1). Returns the norm before
/// clipping.
pub fn clip_grad_norm(grads: &mut HashMap<String, Tensor>, max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads)?;
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.values_mut() {
                *g = (&*g * coef)?;
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Two steps of AdamW on a scalar, by hand.
    #[test]
    fn matches_hand_computed_adamw() {
        let var = Var::new(&[1.0f32], &Device::Cpu).unwrap();
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], cfg).unwrap();
        let mut p = 1.0f64;
        let (mut m, mut v) = (0.0f64, 0.0f64);
        for (t, g) in [(1, 0.5f64), (2, -0.25)] {
            let grads = HashMap::from([("w".to_string(), Tensor::new(&[g as f32], &Device::Cpu).unwrap())]);
            opt.step(&grads, 0.01).unwrap();
            p *= 1.0 - 0.01 * 0.1;
            m = 0.9 * m + 0.1 * g;
            v = 0.999 * v + 0.001 * g * g;
            let mh = m / (1.0 - 0.9f64.powi(t));
            let vh = v / (1.0 - 0.999f64.powi(t));
            p -= 0.01 * mh / (vh.sqrt() + 1e-8);
            let got = var.as_tensor().to_vec1::<f32>().unwrap()[0] as f64;
            assert!((got - p).abs() < 1e-6, "step {t}: {got} vs {p}");
        }
    }
}
