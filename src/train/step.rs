//! One optimizer step, shared by the trainer and the benchmark: forward and backward over each
//! micro-batch (gradients accumulated, the loss divided by their count), clip the global norm,
//! update with AdamW. A NaN/Inf loss or gradient skips the update.

use std::collections::HashMap;

use candle_core::{Tensor, Var};

use crate::dpo::batch::PairIds;
use crate::dpo::loss::LossState;
use crate::error::{Error, Result};
use crate::lora::Adapter;
use crate::train::metrics::DpoMetrics;
use crate::train::optim::{clip_grad_norm, loraplus_scale, AdamW, AdamWConfig};
use crate::train::trainer::{DpoRun, MicroOut};

/// A micro-batch of a step: its pairs, their precomputed reference log-probs if any, and the
/// dropout seed.
pub struct Micro<'p> {
    pub pairs: Vec<&'p PairIds>,
    pub refs: Option<Vec<[f32; 2]>>,
    pub dropout_seed: u64,
}

/// What a step did.
#[derive(Debug, Clone, Copy)]
pub enum StepOutcome {
    /// The adapter was updated. `dpo` holds the means over the step's micro-batches, `grad_norm`
    /// the global norm before clipping, `tokens` the real tokens scored.
    Updated {
        dpo: DpoMetrics,
        grad_norm: f64,
        tokens: usize,
    },
    /// A loss or gradient was NaN/Inf: nothing was updated. `tokens` counts the micro-batches
    /// whose loss was finite.
    Skipped { tokens: usize },
}

/// The trainable tensors of an adapter and their optimizer.
pub struct Updater {
    params: Vec<(String, Var)>,
    pub opt: AdamW,
    max_grad_norm: f64,
}

impl Updater {
    /// `loraplus`: LoRA+'s ratio of the B matrices' (and magnitudes') learning rate to A's.
    pub fn new(adapter: &Adapter, adamw: AdamWConfig, max_grad_norm: f64, loraplus: Option<f64>) -> Result<Updater> {
        let params: Vec<(String, Var)> = adapter
            .params
            .iter()
            .filter_map(|p| p.var.clone().map(|v| (p.key.clone(), v)))
            .collect();
        let scaled = params
            .iter()
            .map(|(n, v)| (n.clone(), v.clone(), loraplus.map_or(1.0, |r| loraplus_scale(n, v, r))))
            .collect();
        let opt = AdamW::with_lr_scales(scaled, adamw)?;
        Ok(Updater {
            params,
            opt,
            max_grad_norm,
        })
    }

    /// The trainable tensors, by adapter key.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// One optimizer step over `micros` at learning rate `lr`.
    pub fn step(&mut self, run: &DpoRun, micros: &[Micro], lr: f64, state: &mut LossState) -> Result<StepOutcome> {
        if micros.is_empty() {
            return Err(Error::Msg("an optimizer step needs at least one micro-batch".into()));
        }
        let mut grads: HashMap<String, Tensor> = HashMap::new();
        let mut metrics = Vec::with_capacity(micros.len());
        let (mut tokens, mut finite) = (0usize, true);
        for m in micros {
            let MicroOut {
                loss,
                metrics: dpo,
                tokens: n,
                ..
            } = run.micro_batch(&m.pairs, m.refs.as_deref(), Some(m.dropout_seed), state)?;
            if !dpo.loss.is_finite() {
                // The remaining micro-batches still run, so the data position and the dropout
                // streams stay where an uninterrupted run would have them.
                finite = false;
                continue;
            }
            let g = run.model.backward(&(loss / micros.len() as f64)?)?;
            for (key, var) in &self.params {
                if let Some(gv) = g.get(var.as_tensor()) {
                    let acc = match grads.remove(key) {
                        Some(a) => (a + gv)?,
                        None => gv.clone(),
                    };
                    grads.insert(key.clone(), acc);
                }
            }
            metrics.push(dpo);
            tokens += n;
        }
        let grad_norm = if finite {
            clip_grad_norm(&mut grads, self.max_grad_norm)?
        } else {
            f64::NAN
        };
        if !grad_norm.is_finite() {
            return Ok(StepOutcome::Skipped { tokens });
        }
        self.opt.step(&grads, lr)?;
        Ok(StepOutcome::Updated {
            dpo: DpoMetrics::mean(&metrics),
            grad_norm,
            tokens,
        })
    }
}
