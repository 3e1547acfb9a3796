//! The DPO trainer: policy = base + trainable adapter, reference = the same base with adapters off
//! (or a frozen reference adapter), AdamW, schedule, accumulation, clipping, evaluation,
//! checkpoints and exact resume.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Tensor, Var};

use crate::dpo::batch::{sequence_logps, Batch, PairIds};
use crate::dpo::loss::{DpoLoss, LossInputs, LossKind, LossState};
use crate::error::{Error, Result};
use crate::lora::Adapter;
use crate::model::linear::Fwd;
use crate::model::Model;
use crate::rng::Rng;
use crate::train::checkpoint::{self, TrainerState};
use crate::train::metrics::{self, MetricsFile, Record};
use crate::train::optim::{clip_grad_norm, AdamW, AdamWConfig};
use crate::train::schedule::Schedule;
use crate::train::settings::Settings;

/// Everything one DPO forward needs: the model, the trainable adapter, the reference and the loss.
pub struct DpoRun<'m> {
    pub model: &'m Model,
    /// The trained (or scored) adapter; `None` scores the bare base model as the policy.
    pub adapter: Option<Adapter>,
    /// How the reference is computed: adapters off, or a frozen reference adapter's slot.
    pub reference: Fwd,
    pub loss: DpoLoss,
    pub needs_reference: bool,
    pub pad_id: u32,
    /// Pack prompt + chosen + rejected in one row so the prompt is computed once.
    pub share_prompt: bool,
}

/// Reference log-probs of each pair: [chosen, rejected].
pub type RefLogps = Vec<[f32; 2]>;

impl<'m> DpoRun<'m> {
    pub fn new(model: &'m Model, adapter: Option<Adapter>, ref_slot: Option<usize>, s: &Settings) -> Result<Self> {
        // `losses` is filled by `DpoOptions::resolve`; a Settings read back from YAML has none.
        if s.losses.is_empty() || s.losses.len() != s.loss_weights.len() {
            return Err(Error::Msg(format!(
                "settings hold {} parsed losses for {} loss weights (resolve the options first)",
                s.losses.len(),
                s.loss_weights.len()
            )));
        }
        let terms: Vec<(LossKind, f64)> = s.losses.iter().cloned().zip(s.loss_weights.iter().copied()).collect();
        let needs_reference = terms.iter().any(|(k, _)| k.needs_reference());
        Ok(DpoRun {
            model,
            adapter,
            reference: Fwd {
                adapter: ref_slot,
                dropout_seed: None,
                no_grad: false,
            },
            loss: DpoLoss {
                terms,
                beta: s.beta,
                rpo_alpha: s.rpo_alpha,
            },
            needs_reference,
            pad_id: model
                .cfg
                .pad_token_id
                .filter(|&p| (p as usize) < model.cfg.vocab_size)
                .unwrap_or(0),
            share_prompt: s.prefix_sharing,
        })
    }

    /// Reference log-probs of `pairs`, computed in batches without a gradient graph.
    pub fn reference_logps(&self, pairs: &[PairIds], batch_size: usize) -> Result<RefLogps> {
        let mut out = Vec::with_capacity(pairs.len());
        for chunk in pairs.chunks(batch_size.max(1)) {
            let refs: Vec<&PairIds> = chunk.iter().collect();
            let batch = Batch::build(&refs, self.pad_id, self.model.device(), self.share_prompt)?;
            let lp = sequence_logps(self.model, &batch, &self.reference)?
                .logps
                .detach()
                .to_vec1::<f32>()?;
            let b = chunk.len();
            out.extend((0..b).map(|i| [lp[i], lp[b + i]]));
        }
        Ok(out)
    }

    /// Loss and TRL metrics of one micro-batch. `refs` are precomputed reference log-probs of
    /// these pairs, if any; `dropout_seed` is `None` for evaluation.
    pub fn micro_batch(
        &self,
        pairs: &[&PairIds],
        refs: Option<&[[f32; 2]]>,
        dropout_seed: Option<u64>,
        state: &mut LossState,
    ) -> Result<MicroOut> {
        let dev = self.model.device();
        let b = pairs.len();
        let batch = Batch::build(pairs, self.pad_id, dev, self.share_prompt)?;
        let ctx = Fwd {
            adapter: self.adapter.as_ref().map(|a| a.slot),
            dropout_seed,
            no_grad: false,
        };
        let pol = sequence_logps(self.model, &batch, &ctx)?;
        let (chosen, rejected) = (pol.chosen(b)?, pol.rejected(b)?);
        let (ref_c, ref_r) = if !self.needs_reference {
            (None, None)
        } else if let Some(r) = refs {
            let c: Vec<f32> = r.iter().map(|x| x[0]).collect();
            let j: Vec<f32> = r.iter().map(|x| x[1]).collect();
            (Some(Tensor::from_vec(c, b, dev)?), Some(Tensor::from_vec(j, b, dev)?))
        } else {
            let lp = sequence_logps(self.model, &batch, &self.reference)?.logps.detach();
            (Some(lp.narrow(0, 0, b)?), Some(lp.narrow(0, b, b)?))
        };
        let lens_c = batch.lengths.narrow(0, 0, b)?;
        let lens_r = batch.lengths.narrow(0, b, b)?;
        let out = self.loss.compute(
            &LossInputs {
                chosen_logps: &chosen,
                rejected_logps: &rejected,
                ref_chosen_logps: ref_c.as_ref(),
                ref_rejected_logps: ref_r.as_ref(),
                chosen_lengths: &lens_c,
                rejected_lengths: &lens_r,
            },
            state,
        )?;
        let cr = out.chosen_rewards.to_vec1::<f32>()?;
        let rr = out.rejected_rewards.to_vec1::<f32>()?;
        let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64;
        let acc = cr
            .iter()
            .zip(&rr)
            .map(|(c, r)| if c > r { 1.0 } else { 0.0 })
            .collect::<Vec<f32>>();
        let margins = cr.iter().zip(&rr).map(|(c, r)| c - r).collect::<Vec<f32>>();
        let mut rec = Record::new();
        rec.insert(
            "loss".into(),
            out.loss.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()? as f64,
        );
        rec.insert("rewards/chosen".into(), mean(&cr));
        rec.insert("rewards/rejected".into(), mean(&rr));
        rec.insert("rewards/accuracies".into(), mean(&acc));
        rec.insert("rewards/margins".into(), mean(&margins));
        rec.insert("logps/chosen".into(), mean(&chosen.detach().to_vec1::<f32>()?));
        rec.insert("logps/rejected".into(), mean(&rejected.detach().to_vec1::<f32>()?));
        rec.insert("logits/chosen".into(), pol.logits_sum[0] / pol.logits_count[0].max(1.0));
        rec.insert(
            "logits/rejected".into(),
            pol.logits_sum[1] / pol.logits_count[1].max(1.0),
        );
        let vec = |t: Option<&Tensor>| -> Result<Option<Vec<f32>>> {
            Ok(match t {
                Some(t) => Some(t.to_vec1::<f32>()?),
                None => None,
            })
        };
        Ok(MicroOut {
            chosen_logps: chosen.detach().to_vec1::<f32>()?,
            rejected_logps: rejected.detach().to_vec1::<f32>()?,
            ref_chosen_logps: vec(ref_c.as_ref())?,
            ref_rejected_logps: vec(ref_r.as_ref())?,
            chosen_rewards: cr,
            rejected_rewards: rr,
            loss: out.loss,
            record: rec,
            tokens: batch.num_tokens,
        })
    }

    /// Mean metrics over `pairs` (no dropout, no gradient), keys prefixed `eval_`.
    pub fn evaluate(
        &self,
        pairs: &[PairIds],
        refs: Option<&RefLogps>,
        batch_size: usize,
        state: &LossState,
    ) -> Result<Record> {
        self.evaluate_pairs(pairs, refs, batch_size, state, |_| {})
    }

    /// Like [`DpoRun::evaluate`], handing every micro-batch's outputs to `each`.
    pub fn evaluate_pairs(
        &self,
        pairs: &[PairIds],
        refs: Option<&RefLogps>,
        batch_size: usize,
        state: &LossState,
        mut each: impl FnMut(&MicroOut),
    ) -> Result<Record> {
        let mut state = state.clone();
        let mut sums = Record::new();
        let mut n = 0usize;
        for (ci, chunk) in pairs.chunks(batch_size.max(1)).enumerate() {
            let ps: Vec<&PairIds> = chunk.iter().collect();
            let r = refs.map(|r| &r[ci * batch_size..ci * batch_size + chunk.len()]);
            let m = self.micro_batch(&ps, r, None, &mut state)?;
            each(&m);
            for (k, v) in m.record.clone() {
                *sums.entry(format!("eval_{k}")).or_insert(0.0) += v * chunk.len() as f64;
            }
            n += chunk.len();
        }
        Ok(sums.into_iter().map(|(k, v)| (k, v / n.max(1) as f64)).collect())
    }
}

/// Outputs of one micro-batch: the loss (with its graph), TRL metrics, and per-pair values.
pub struct MicroOut {
    pub loss: Tensor,
    pub record: Record,
    pub tokens: usize,
    pub chosen_logps: Vec<f32>,
    pub rejected_logps: Vec<f32>,
    pub ref_chosen_logps: Option<Vec<f32>>,
    pub ref_rejected_logps: Option<Vec<f32>>,
    pub chosen_rewards: Vec<f32>,
    pub rejected_rewards: Vec<f32>,
}

/// Training-loop settings taken from [`Settings`].
#[derive(Debug, Clone)]
pub struct LoopConfig {
    pub batch_size: usize,
    pub eval_batch_size: usize,
    pub accumulation: usize,
    pub total_steps: usize,
    pub shuffle: bool,
    /// Group pairs of similar length into the same batches.
    pub group_by_length: bool,
    pub seed: u64,
    pub schedule: Schedule,
    pub adamw: AdamWConfig,
    pub max_grad_norm: f64,
    pub logging_steps: usize,
    pub eval_steps: usize,
    pub save_steps: usize,
    pub save_total_limit: Option<usize>,
    pub precompute_ref: bool,
    /// Stop after this many steps even if `total_steps` is larger (tests interrupt runs with it).
    pub stop_after: Option<usize>,
    /// Consecutive non-finite steps (skipped) tolerated before stopping.
    pub max_nonfinite_steps: usize,
    /// Set (e.g. by Ctrl-C) to stop after the current step with a checkpoint.
    pub stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    pub quiet: bool,
}

impl LoopConfig {
    pub fn from_settings(s: &Settings, num_train_pairs: usize) -> Result<LoopConfig> {
        let micro_per_epoch = num_train_pairs.div_ceil(s.batch_size).max(1);
        let total_steps = match s.max_steps {
            Some(n) => n,
            None => ((s.num_train_epochs * micro_per_epoch as f64) / s.gradient_accumulation_steps as f64)
                .ceil()
                .max(1.0) as usize,
        };
        let kind = s.lr_scheduler_type;
        Ok(LoopConfig {
            batch_size: s.batch_size,
            eval_batch_size: s.eval_batch_size,
            accumulation: s.gradient_accumulation_steps,
            total_steps,
            shuffle: s.shuffle,
            group_by_length: s.group_by_length,
            seed: s.seed,
            schedule: Schedule {
                kind,
                base_lr: s.learning_rate,
                warmup_steps: Schedule::warmup_from(s.warmup_steps, s.warmup_ratio, total_steps),
                total_steps,
            },
            adamw: AdamWConfig {
                beta1: s.adam_beta1,
                beta2: s.adam_beta2,
                eps: s.adam_epsilon,
                weight_decay: s.weight_decay,
            },
            max_grad_norm: s.max_grad_norm,
            logging_steps: s.logging_steps,
            eval_steps: s.eval_steps,
            save_steps: s.save_steps,
            save_total_limit: s.save_total_limit,
            precompute_ref: s.precompute_ref_log_probs,
            stop_after: None,
            max_nonfinite_steps: s.max_nonfinite_steps,
            stop: None,
            quiet: false,
        })
    }
}

/// Order of the training pairs in `epoch`: file order, or a shuffle seeded by (seed, epoch).
pub fn epoch_order(n: usize, epoch: usize, seed: u64, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        Rng::stream(seed, 0x5eed_0000 + epoch as u64).shuffle(&mut order);
    }
    order
}

/// Pairs per length-sorted group, in batches: large enough that most batches hold pairs of
/// close length, small enough that the order stays random (transformers uses the same 50).
const LENGTH_GROUP_BATCHES: usize = 50;

/// Length-grouped order: the epoch order of [`epoch_order`] cut into groups of
/// `LENGTH_GROUP_BATCHES` batches, each sorted longest first, so a batch holds pairs of similar
/// length and pads little.
pub fn length_grouped_order(
    lengths: &[usize],
    epoch: usize,
    seed: u64,
    shuffle: bool,
    batch_size: usize,
) -> Vec<usize> {
    let mut order = epoch_order(lengths.len(), epoch, seed, shuffle);
    for group in order.chunks_mut(LENGTH_GROUP_BATCHES * batch_size.max(1)) {
        group.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    }
    order
}

/// FNV-1a over the token ids of all pairs.
pub fn fingerprint(pairs: &[PairIds]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |x: u64| {
        h ^= x;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    };
    for p in pairs {
        for part in [&p.prompt, &p.chosen, &p.rejected] {
            part.iter().for_each(|&t| eat(t as u64));
            eat(u64::MAX);
        }
        if let Some(rp) = &p.rejected_prompt {
            rp.iter().for_each(|&t| eat(t as u64));
        }
        eat(u64::MAX - 1);
    }
    format!("{h:016x}")
}

/// What a training run produced.
pub struct Outcome {
    /// One record per optimizer step (not windowed), with `step`-indexed TRL metrics.
    pub steps: Vec<Record>,
    pub evals: Vec<(usize, Record)>,
    pub last_step: usize,
    pub last_checkpoint: Option<PathBuf>,
    /// Steps skipped because the loss or a gradient was NaN/Inf.
    pub skipped_nonfinite: usize,
    /// The run was stopped early (Ctrl-C) after saving a checkpoint.
    pub interrupted: bool,
}

/// Where a run writes, and what it writes with its checkpoints.
pub struct RunOutput<'a> {
    pub dir: &'a Path,
    pub base_model: &'a str,
    pub recipe_yaml: &'a str,
    pub resume_from: Option<PathBuf>,
}

/// Reference log-probs cached next to the run, keyed by a fingerprint of data and reference.
#[derive(serde::Serialize, serde::Deserialize)]
struct RefCache {
    key: String,
    train: RefLogps,
    eval: RefLogps,
}

fn cached_reference(
    run: &DpoRun,
    train: &[PairIds],
    eval: &[PairIds],
    cfg: &LoopConfig,
    path: &Path,
    key: &str,
) -> Result<(RefLogps, RefLogps)> {
    if let Ok(c) = crate::error::read_json::<RefCache>(path) {
        if c.key == key && c.train.len() == train.len() && c.eval.len() == eval.len() {
            return Ok((c.train, c.eval));
        }
    }
    let t0 = Instant::now();
    let tr = run.reference_logps(train, cfg.eval_batch_size)?;
    let ev = run.reference_logps(eval, cfg.eval_batch_size)?;
    let json = serde_json::to_vec(&RefCache {
        key: key.into(),
        train: tr.clone(),
        eval: ev.clone(),
    })
    .map_err(|e| Error::Msg(e.to_string()))?;
    crate::lora::io::write_atomic(path, &json)?;
    if !cfg.quiet {
        eprintln!(
            "reference log-probs of {} pairs computed in {:.1}s, cached in {}",
            train.len() + eval.len(),
            t0.elapsed().as_secs_f64(),
            path.display()
        );
    }
    Ok((tr, ev))
}

/// Train the adapter of `run` on `train`, evaluating on `eval`.
pub fn train(run: &DpoRun, train: &[PairIds], eval: &[PairIds], cfg: &LoopConfig, out: &RunOutput) -> Result<Outcome> {
    if train.is_empty() {
        return Err(Error::Msg("no training pairs left after preprocessing".into()));
    }
    std::fs::create_dir_all(out.dir).map_err(|e| Error::io(out.dir, e))?;
    let adapter = run
        .adapter
        .as_ref()
        .ok_or_else(|| Error::Msg("training needs an adapter".into()))?;
    let params: Vec<(String, Var)> = adapter
        .params
        .iter()
        .filter_map(|p| p.var.clone().map(|v| (p.key.clone(), v)))
        .collect();
    let mut opt = AdamW::new(params.clone(), cfg.adamw)?;
    let data_fp = fingerprint(train);
    let mut loss_state = LossState::default();
    let mut step = 0usize;
    let mut consumed = 0usize;
    let mut history: Vec<Record> = Vec::new();

    if let Some(dir) = &out.resume_from {
        let ck = checkpoint::load(dir)?;
        if ck.state.data_fingerprint != data_fp {
            return Err(Error::Msg(format!(
                "{}: this checkpoint was trained on different data (fingerprint {} vs {}); refusing to resume",
                dir.display(),
                ck.state.data_fingerprint,
                data_fp
            )));
        }
        for (key, var) in &params {
            let t = ck.adapter.get(key).ok_or_else(|| Error::MissingTensor {
                path: dir.clone(),
                name: key.clone(),
            })?;
            if t.dims() != var.as_tensor().dims() {
                return Err(Error::ShapeMismatch {
                    path: dir.clone(),
                    name: key.clone(),
                    expected: var.as_tensor().dims().to_vec(),
                    got: t.dims().to_vec(),
                });
            }
            var.set(&t.to_device(var.device())?)?;
        }
        opt.load_state(&ck.optimizer, ck.state.optimizer_t, dir)?;
        step = ck.state.step;
        consumed = ck.state.consumed_micro_batches;
        loss_state = serde_json::from_value(ck.state.loss_state.clone())
            .map_err(|e| Error::Msg(format!("{}: loss state: {e}", dir.display())))?;
        history = ck.state.log_history.clone();
        checkpoint::restore_metrics(dir, &out.dir.join("metrics.jsonl"), step)?;
        if !cfg.quiet {
            eprintln!("resumed from {} at step {step}", dir.display());
        }
    }

    let refs = if cfg.precompute_ref && run.needs_reference {
        let key = format!("{}-{}-{:?}", data_fp, fingerprint(eval), run.reference.adapter);
        Some(cached_reference(
            run,
            train,
            eval,
            cfg,
            &out.dir.join("ref_logps.json"),
            &key,
        )?)
    } else {
        None
    };

    let n = train.len();
    let micro_per_epoch = n.div_ceil(cfg.batch_size);
    let mut metrics_file = MetricsFile::open(&out.dir.join("metrics.jsonl"), out.resume_from.is_none())?;
    let last = cfg.stop_after.map_or(cfg.total_steps, |s| s.min(cfg.total_steps));
    let pb = progress_bar(cfg, step);
    let mut window: Vec<Record> = Vec::new();
    let mut steps_out = Vec::new();
    let mut evals = Vec::new();
    let mut last_checkpoint = None;
    let (mut order_epoch, mut order) = (usize::MAX, Vec::new());
    let mut window_tokens = 0usize;
    let (mut skipped, mut nonfinite_run) = (0usize, 0usize);
    let mut interrupted = false;
    let mut window_start = Instant::now();

    while step < last {
        let mut grads: HashMap<String, Tensor> = HashMap::new();
        let mut micro_records = Vec::with_capacity(cfg.accumulation);
        let mut bad_step = false;
        for _ in 0..cfg.accumulation {
            let (epoch, k) = (consumed / micro_per_epoch, consumed % micro_per_epoch);
            if epoch != order_epoch {
                order = if cfg.group_by_length {
                    let lengths: Vec<usize> = train.iter().map(|p| p.num_tokens()).collect();
                    length_grouped_order(&lengths, epoch, cfg.seed, cfg.shuffle, cfg.batch_size)
                } else {
                    epoch_order(n, epoch, cfg.seed, cfg.shuffle)
                };
                order_epoch = epoch;
            }
            let idx = &order[k * cfg.batch_size..((k + 1) * cfg.batch_size).min(n)];
            let pairs: Vec<&PairIds> = idx.iter().map(|&i| &train[i]).collect();
            let r: Option<Vec<[f32; 2]>> = refs.as_ref().map(|(tr, _)| idx.iter().map(|&i| tr[i]).collect());
            let seed = Rng::stream(cfg.seed, consumed as u64 + 1).next_u64();
            let MicroOut {
                loss,
                record: rec,
                tokens,
                ..
            } = run.micro_batch(&pairs, r.as_deref(), Some(seed), &mut loss_state)?;
            let lv = rec.get("loss").copied().unwrap_or(f64::NAN);
            if !lv.is_finite() {
                bad_step = true;
                consumed += 1;
                continue;
            }
            let g = run.model.backward(&(loss / cfg.accumulation as f64)?)?;
            for (key, var) in &params {
                if let Some(gv) = g.get(var.as_tensor()) {
                    let acc = match grads.remove(key) {
                        Some(a) => (a + gv)?,
                        None => gv.clone(),
                    };
                    grads.insert(key.clone(), acc);
                }
            }
            micro_records.push(rec);
            window_tokens += tokens;
            consumed += 1;
        }
        let norm = if bad_step {
            f64::NAN
        } else {
            clip_grad_norm(&mut grads, cfg.max_grad_norm)?
        };
        if !norm.is_finite() {
            // Skip the update, keep the data position moving, stop after too many in a row.
            skipped += 1;
            nonfinite_run += 1;
            say(
                &pb,
                cfg.quiet,
                &format!(
                    "step {}: non-finite loss or gradient, update skipped ({nonfinite_run} in a row)",
                    step + 1
                ),
            );
            if nonfinite_run >= cfg.max_nonfinite_steps.max(1) {
                return Err(non_finite(step + 1, nonfinite_run, last_checkpoint.as_ref()));
            }
            step += 1;
            continue;
        }
        nonfinite_run = 0;
        let lr = cfg.schedule.lr(step);
        opt.step(&grads, lr)?;
        step += 1;

        let mut rec = metrics::mean(&micro_records);
        rec.insert("grad_norm".into(), norm);
        rec.insert("learning_rate".into(), lr);
        rec.insert("epoch".into(), consumed as f64 / micro_per_epoch as f64);
        steps_out.push(rec.clone());
        window.push(rec);
        pb.inc(1);

        if step.is_multiple_of(cfg.logging_steps) || step == last {
            let mut w = metrics::mean(&window);
            let secs = window_start.elapsed().as_secs_f64();
            w.insert("tokens_per_second".into(), window_tokens as f64 / secs.max(1e-9));
            if let Some(m) = metrics::peak_rss_mib() {
                w.insert("peak_rss_mib".into(), m);
            }
            metrics_file.write(step, &w)?;
            let line = metrics::format_line(
                step,
                &w,
                &[
                    "loss",
                    "rewards/accuracies",
                    "rewards/margins",
                    "grad_norm",
                    "learning_rate",
                    "tokens_per_second",
                ],
            );
            say(&pb, cfg.quiet, &line);
            pb.set_message(format!("loss {:.4}", w.get("loss").copied().unwrap_or(f64::NAN)));
            history.push(w);
            window.clear();
            window_tokens = 0;
            window_start = Instant::now();
        }
        if !eval.is_empty() && (step.is_multiple_of(cfg.eval_steps) || step == cfg.total_steps) {
            let e = run.evaluate(eval, refs.as_ref().map(|(_, ev)| ev), cfg.eval_batch_size, &loss_state)?;
            metrics_file.write(step, &e)?;
            say(
                &pb,
                cfg.quiet,
                &metrics::format_line(
                    step,
                    &e,
                    &["eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"],
                ),
            );
            history.push(e.clone());
            evals.push((step, e));
        }
        let stop_now = cfg
            .stop
            .as_ref()
            .is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst));
        if stop_now && step < last {
            interrupted = true;
            say(
                &pb,
                cfg.quiet,
                &format!("interrupted: saving a checkpoint at step {step} and stopping"),
            );
        }
        if step.is_multiple_of(cfg.save_steps) || step == last || interrupted {
            let state = TrainerState {
                step,
                consumed_micro_batches: consumed,
                total_steps: cfg.total_steps,
                optimizer_t: opt.t,
                seed: cfg.seed,
                loss_state: serde_json::to_value(&loss_state).map_err(|e| Error::Msg(e.to_string()))?,
                data_fingerprint: data_fp.clone(),
                log_history: history.clone(),
            };
            let dir = checkpoint::save(out.dir, adapter, out.base_model, &opt, &state, out.recipe_yaml)?;
            if let Some(k) = cfg.save_total_limit {
                checkpoint::rotate(out.dir, k, &dir)?;
            }
            last_checkpoint = Some(dir);
        }
        if interrupted {
            break;
        }
    }
    pb.finish_and_clear();
    Ok(Outcome {
        steps: steps_out,
        evals,
        last_step: step,
        last_checkpoint,
        skipped_nonfinite: skipped,
        interrupted,
    })
}

fn non_finite(step: usize, in_a_row: usize, last: Option<&PathBuf>) -> Error {
    let keep = match last {
        Some(p) => format!("the last good checkpoint is {}", p.display()),
        None => "no checkpoint was written yet".into(),
    };
    Error::Msg(format!(
        "non-finite loss or gradient in {in_a_row} steps in a row (up to step {step}); training stopped ({keep}). \
         Lower --learning_rate or check the data"
    ))
}

fn progress_bar(cfg: &LoopConfig, start: usize) -> indicatif::ProgressBar {
    let template = "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}";
    let pb = crate::util::progress_bar(cfg.total_steps, template, !cfg.quiet);
    pb.set_position(start as u64);
    pb
}

fn say(pb: &indicatif::ProgressBar, quiet: bool, line: &str) {
    if quiet {
        return;
    }
    if pb.is_hidden() {
        eprintln!("{line}");
    } else {
        pb.println(line);
    }
}
