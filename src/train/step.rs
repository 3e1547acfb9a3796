//! One optimizer step, shared by the trainer and the benchmark: forward and backward over each
//! micro-batch (gradients accumulated, the loss divided by their count), clip the global norm,
//! update with AdamW. A NaN/Inf loss or gradient skips the update.
//!
//! Data-parallel: each rank runs its share of the step's micro-batches, then one all-reduce of a
//! flat buffer sums the gradients, the metrics, the token count, the non-finite flags and the
//! ranks' stop requests; every rank then applies the same update.

use std::collections::HashMap;
use std::rc::Rc;

use candle_core::{Tensor, Var};

use crate::dist::Collective;
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
    dist: Rc<dyn Collective>,
}

/// The totals of one step over all ranks.
struct Totals {
    grads: HashMap<String, Tensor>,
    dpo: DpoMetrics,
    tokens: usize,
    finite: bool,
    /// Some rank asked to stop after this step.
    stop: bool,
}

/// What one rank's micro-batches of a step gave, before the ranks are summed.
struct Local {
    grads: HashMap<String, Tensor>,
    metrics: Vec<DpoMetrics>,
    tokens: usize,
    finite: bool,
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
            dist: crate::dist::single(),
        })
    }

    /// Sum each step over the ranks of `dist` (each rank then passes only its own micro-batches).
    pub fn with_collective(mut self, dist: Rc<dyn Collective>) -> Updater {
        self.dist = dist;
        self
    }

    /// The trainable tensors, by adapter key.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// One optimizer step over `micros` at learning rate `lr`.
    pub fn step(&mut self, run: &DpoRun, micros: &[Micro], lr: f64, state: &mut LossState) -> Result<StepOutcome> {
        self.step_voting(run, micros, lr, state, false).map(|(o, _)| o)
    }

    /// Like [`Updater::step`], with this rank's wish to stop after the step; returns whether any
    /// rank asked (so that all ranks stop after the same step).
    pub fn step_voting(
        &mut self,
        run: &DpoRun,
        micros: &[Micro],
        lr: f64,
        state: &mut LossState,
        stop: bool,
    ) -> Result<(StepOutcome, bool)> {
        if micros.is_empty() {
            return Err(Error::Msg("an optimizer step needs at least one micro-batch".into()));
        }
        let world = self.dist.size();
        let local = self.accumulate(run, micros, micros.len() * world, state)?;
        let Totals {
            mut grads,
            dpo,
            tokens,
            finite,
            stop,
        } = if world == 1 {
            Totals {
                dpo: DpoMetrics::mean(&local.metrics),
                grads: local.grads,
                tokens: local.tokens,
                finite: local.finite,
                stop,
            }
        } else {
            self.sum_over_ranks(local, stop)?
        };
        let grad_norm = if finite {
            clip_grad_norm(&mut grads, self.max_grad_norm)?
        } else {
            f64::NAN
        };
        if !grad_norm.is_finite() {
            return Ok((StepOutcome::Skipped { tokens }, stop));
        }
        self.opt.step(&grads, lr)?;
        Ok((StepOutcome::Updated { dpo, grad_norm, tokens }, stop))
    }

    /// Forward and backward over `micros`, each loss divided by `divisor` (the step's micro-batch
    /// count over all ranks), gradients summed per tensor.
    fn accumulate(&self, run: &DpoRun, micros: &[Micro], divisor: usize, state: &mut LossState) -> Result<Local> {
        let mut local = Local {
            grads: HashMap::new(),
            metrics: Vec::with_capacity(micros.len()),
            tokens: 0,
            finite: true,
        };
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
                local.finite = false;
                continue;
            }
            let g = run.model.backward(&(loss / divisor as f64)?)?;
            for (key, var) in &self.params {
                if let Some(gv) = g.get(var.as_tensor()) {
                    let acc = match local.grads.remove(key) {
                        Some(a) => (a + gv)?,
                        None => gv.clone(),
                    };
                    local.grads.insert(key.clone(), acc);
                }
            }
            local.metrics.push(dpo);
            local.tokens += n;
        }
        Ok(local)
    }

    /// One all-reduce of [gradients | has-gradient flags | metric sums, micro-batches, tokens,
    /// non-finite ranks, stop votes]: the step's totals over all ranks.
    fn sum_over_ranks(&self, local: Local, stop: bool) -> Result<Totals> {
        let sizes: Vec<usize> = self.params.iter().map(|(_, v)| v.as_tensor().elem_count()).collect();
        let n_grad: usize = sizes.iter().sum();
        let np = self.params.len();
        let mut buf = vec![0f32; n_grad + np + 9 + 4];
        let mut at = 0;
        for (i, ((key, _), &n)) in self.params.iter().zip(&sizes).enumerate() {
            if let Some(g) = local.grads.get(key) {
                let v = g.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                buf[at..at + n].copy_from_slice(&v);
                buf[n_grad + i] = 1.0;
            }
            at += n;
        }
        let tail = n_grad + np;
        for m in &local.metrics {
            for (s, v) in buf[tail..tail + 9].iter_mut().zip(m.values()) {
                *s += v as f32;
            }
        }
        let flags = [
            local.metrics.len() as f32,
            local.tokens as f32,
            f32::from(!local.finite),
            f32::from(stop),
        ];
        buf[tail + 9..].copy_from_slice(&flags);
        self.dist.all_reduce_sum(&mut buf)?;
        let mut grads = HashMap::new();
        let mut at = 0;
        for (i, ((key, var), &n)) in self.params.iter().zip(&sizes).enumerate() {
            if buf[n_grad + i] > 0.0 {
                let t = var.as_tensor();
                let g = Tensor::from_slice(&buf[at..at + n], t.shape(), t.device())?.to_dtype(t.dtype())?;
                grads.insert(key.clone(), g);
            }
            at += n;
        }
        let count = buf[tail + 9] as f64;
        let mut sums = [0f64; 9];
        for (s, v) in sums.iter_mut().zip(&buf[tail..tail + 9]) {
            *s = *v as f64 / count.max(1.0);
        }
        let dpo = DpoMetrics::from_values(sums);
        let tokens = buf[tail + 10] as usize;
        Ok(Totals {
            grads,
            dpo,
            tokens,
            finite: buf[tail + 11] == 0.0,
            stop: buf[tail + 12] > 0.0,
        })
    }
}
