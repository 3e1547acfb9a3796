//! The DPO trainer: policy = base + trainable adapter, reference = the same base with adapters off
//! (or a frozen reference adapter), AdamW, schedule, accumulation, clipping, evaluation,
//! checkpoints and exact resume.

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

use candle_core::Tensor;

use crate::dist::Collective;
use crate::dpo::batch::{sequence_logps, Batch, PairIds};
use crate::dpo::loss::{DpoLoss, LossInputs, LossKind, LossState};
use crate::error::{Error, Result};
use crate::lora::Adapter;
use crate::model::linear::Fwd;
use crate::model::Model;
use crate::rng::Rng;
use crate::train::checkpoint::{self, TrainerState};
use crate::train::metrics::{self, DpoMetrics, MetricsFile, Record, StepMetrics, WindowMetrics};
use crate::train::optim::AdamWConfig;
use crate::train::schedule::Schedule;
use crate::train::settings::Settings;
use crate::train::step::{Micro, StepOutcome, Updater};
use crate::train::tensorboard::{self, EventWriter};

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
        self.reference_logps_with(pairs, batch_size, |_| true)
    }

    /// Like [`DpoRun::reference_logps`], calling `each` with the pairs done after every batch;
    /// `each` returning false stops early with [`Error::Interrupted`].
    pub fn reference_logps_with(
        &self,
        pairs: &[PairIds],
        batch_size: usize,
        mut each: impl FnMut(usize) -> bool,
    ) -> Result<RefLogps> {
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
            if !each(out.len()) {
                return Err(Error::Interrupted {
                    what: "computing the reference log-probs".into(),
                });
            }
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
        // The reference pass first: its transient activations and logits then never sit on top
        // of the policy's graph, which lives until the backward pass.
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
        let pol = sequence_logps(self.model, &batch, &ctx)?;
        let (chosen, rejected) = (pol.chosen(b)?, pol.rejected(b)?);
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
        let metrics = DpoMetrics {
            loss: out.loss.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()? as f64,
            rewards_chosen: mean(&cr),
            rewards_rejected: mean(&rr),
            rewards_accuracies: mean(&acc),
            rewards_margins: mean(&margins),
            logps_chosen: mean(&chosen.detach().to_vec1::<f32>()?),
            logps_rejected: mean(&rejected.detach().to_vec1::<f32>()?),
            logits_chosen: pol.logits_sum[0] / pol.logits_count[0].max(1.0),
            logits_rejected: pol.logits_sum[1] / pol.logits_count[1].max(1.0),
        };
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
            metrics,
            tokens: batch.num_tokens,
        })
    }

    /// Mean metrics over `pairs` (no dropout, no gradient).
    pub fn evaluate(
        &self,
        pairs: &[PairIds],
        refs: Option<&RefLogps>,
        batch_size: usize,
        state: &LossState,
    ) -> Result<DpoMetrics> {
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
    ) -> Result<DpoMetrics> {
        let mut state = state.clone();
        let (mut means, mut weights) = (Vec::new(), Vec::new());
        for (ci, chunk) in pairs.chunks(batch_size.max(1)).enumerate() {
            let ps: Vec<&PairIds> = chunk.iter().collect();
            let r = refs.map(|r| &r[ci * batch_size..ci * batch_size + chunk.len()]);
            let m = self.micro_batch(&ps, r, None, &mut state)?;
            each(&m);
            means.push(m.metrics);
            weights.push(chunk.len() as f64);
        }
        Ok(DpoMetrics::weighted_mean(&means, &weights))
    }
}

/// Outputs of one micro-batch: the loss (with its graph), TRL metrics, and per-pair values.
pub struct MicroOut {
    pub loss: Tensor,
    pub metrics: DpoMetrics,
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
    /// LoRA+ ratio of the B matrices' learning rate to A's.
    pub loraplus: Option<f64>,
    pub max_grad_norm: f64,
    pub logging_steps: usize,
    /// Evaluate every this many steps and at the last step; `None`: never (`--eval_strategy no`).
    pub eval_every: Option<usize>,
    /// Save a checkpoint every this many steps and at the last step; `None`: only on interrupt
    /// (`--save_strategy no`).
    pub save_every: Option<usize>,
    pub save_total_limit: Option<usize>,
    pub precompute_ref: bool,
    /// Also write TensorBoard event files under `<output dir>/runs`.
    pub tensorboard: bool,
    /// Stop after this many steps even if `total_steps` is larger (tests interrupt runs with it).
    pub stop_after: Option<usize>,
    /// Consecutive non-finite steps (skipped) tolerated before stopping.
    pub max_nonfinite_steps: usize,
    /// Set (e.g. by Ctrl-C) to stop after the current step with a checkpoint.
    pub stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    pub quiet: bool,
    /// The ranks of a data-parallel run: each step's `batch_size × accumulation × size` pairs are
    /// split between them; rank 0 alone writes logs, checkpoints and the adapter.
    pub dist: Rc<dyn Collective>,
}

impl LoopConfig {
    /// The loop of `s` over `num_train_pairs` pairs on the ranks of `dist`: a step takes
    /// `gradient_accumulation_steps` micro-batches on each rank, as transformers counts it.
    pub fn from_settings(s: &Settings, num_train_pairs: usize, dist: Rc<dyn Collective>) -> Result<LoopConfig> {
        let micro_per_epoch = num_train_pairs.div_ceil(s.batch_size).max(1);
        let per_step = s.gradient_accumulation_steps.max(1) * dist.size();
        let total_steps = match s.max_steps {
            Some(n) => n,
            None => ((s.num_train_epochs * micro_per_epoch as f64) / per_step as f64)
                .ceil()
                .max(1.0) as usize,
        };
        let kind = s.lr_scheduler_type;
        let steps_per_epoch = micro_per_epoch.div_ceil(per_step);
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
            loraplus: s.lora_extra.lorap_lr_ratio,
            logging_steps: s.logging_steps,
            eval_every: s.eval_strategy.period(s.eval_steps, steps_per_epoch),
            save_every: s.save_strategy.period(s.save_steps, steps_per_epoch),
            save_total_limit: s.save_total_limit,
            precompute_ref: s.precompute_ref_log_probs,
            tensorboard: s.tensorboard,
            stop_after: None,
            max_nonfinite_steps: s.max_nonfinite_steps,
            stop: None,
            quiet: false,
            dist,
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
    let mut h = crate::util::Fnv1a::default();
    let mut eat = |x: u64| h.eat(x);
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
    format!("{:016x}", h.finish())
}

/// What a training run produced.
pub struct Outcome {
    /// One entry per optimizer step (not windowed), with TRL's metrics.
    pub steps: Vec<StepMetrics>,
    pub evals: Vec<(usize, DpoMetrics)>,
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
    let dist = &*cfg.dist;
    let cached = crate::error::read_json::<RefCache>(path)
        .ok()
        .filter(|c| c.key == key && c.train.len() == train.len() && c.eval.len() == eval.len());
    // Every rank takes the cache only when every rank has it (the ranks may not share a disk).
    let mut hits = [f32::from(cached.is_some())];
    if dist.size() > 1 {
        dist.all_reduce_sum(&mut hits)?;
    }
    if let (Some(c), true) = (cached, hits[0] as usize == dist.size()) {
        return Ok((c.train, c.eval));
    }
    let t0 = Instant::now();
    let total = train.len() + eval.len();
    let template = "reference log-probs {bar:30} {pos}/{len} pairs [{elapsed_precise}<{eta_precise}]";
    let pb = crate::util::progress_bar(total, template, !cfg.quiet);
    let stopped = || crate::util::is_set(cfg.stop.as_ref());
    let tr = sharded_reference(run, train, cfg.eval_batch_size, dist, |n| {
        pb.set_position(n as u64);
        !stopped()
    })?;
    let ev = sharded_reference(run, eval, cfg.eval_batch_size, dist, |n| {
        pb.set_position((train.len() + n) as u64);
        !stopped()
    })?;
    pb.finish_and_clear();
    if dist.rank() != 0 {
        return Ok((tr, ev));
    }
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

/// Reference log-probs of `pairs` over the ranks of `dist`: each rank scores its batches (the
/// same batches one process forms), one all-reduce gives every rank all of them.
fn sharded_reference(
    run: &DpoRun,
    pairs: &[PairIds],
    batch_size: usize,
    dist: &dyn Collective,
    mut each: impl FnMut(usize) -> bool,
) -> Result<RefLogps> {
    if dist.size() == 1 {
        return run.reference_logps_with(pairs, batch_size, each);
    }
    let mut buf = vec![0f32; 2 * pairs.len()];
    let mine = crate::dist::my_chunks(pairs.len(), batch_size, dist.rank(), dist.size());
    for range in mine {
        let lp = run.reference_logps(&pairs[range.clone()], batch_size)?;
        for (i, [c, r]) in range.clone().zip(lp) {
            buf[2 * i] = c;
            buf[2 * i + 1] = r;
        }
        // Progress as this rank sees it, scaled to the whole set.
        if !each((range.end * dist.size()).min(pairs.len())) {
            return Err(Error::Interrupted {
                what: "computing the reference log-probs".into(),
            });
        }
    }
    dist.all_reduce_sum(&mut buf)?;
    Ok(buf.chunks(2).map(|x| [x[0], x[1]]).collect())
}

/// The mean metrics of `pairs` over the ranks of `dist`, each rank evaluating its batches.
fn sharded_evaluate(
    run: &DpoRun,
    pairs: &[PairIds],
    refs: Option<&RefLogps>,
    batch_size: usize,
    state: &LossState,
    dist: &dyn Collective,
) -> Result<DpoMetrics> {
    if dist.size() == 1 {
        return run.evaluate(pairs, refs, batch_size, state);
    }
    let mut buf = [0f32; 10];
    for range in crate::dist::my_chunks(pairs.len(), batch_size, dist.rank(), dist.size()) {
        let r = refs.map(|r| r[range.clone()].to_vec());
        let m = run.evaluate(&pairs[range.clone()], r.as_ref(), batch_size, state)?;
        let w = range.len() as f64;
        for (s, v) in buf.iter_mut().zip(m.values()) {
            *s += (v * w) as f32;
        }
        buf[9] += w as f32;
    }
    dist.all_reduce_sum(&mut buf)?;
    let w = (buf[9] as f64).max(f64::MIN_POSITIVE);
    let mut v = [0f64; 9];
    for (x, s) in v.iter_mut().zip(&buf) {
        *x = *s as f64 / w;
    }
    Ok(DpoMetrics::from_values(v))
}

/// Train the adapter of `run` on `train`, evaluating on `eval`.
pub fn train(run: &DpoRun, train: &[PairIds], eval: &[PairIds], cfg: &LoopConfig, out: &RunOutput) -> Result<Outcome> {
    Trainer::new(run, train, eval, cfg, out)?.train()
}

/// The steps of the current logging window.
struct Window {
    steps: Vec<StepMetrics>,
    tokens: usize,
    start: Instant,
}

impl Window {
    fn new() -> Window {
        Window {
            steps: Vec::new(),
            tokens: 0,
            start: Instant::now(),
        }
    }
}

/// A training run in progress: the data position, the optimizer, the logs and what was written.
pub struct Trainer<'a> {
    run: &'a DpoRun<'a>,
    adapter: &'a Adapter,
    train: &'a [PairIds],
    eval: &'a [PairIds],
    cfg: &'a LoopConfig,
    out: &'a RunOutput<'a>,
    updater: Updater,
    data_fp: String,
    loss_state: LossState,
    /// Optimizer steps taken (skipped ones included) and micro-batches consumed.
    step: usize,
    consumed: usize,
    /// The last step this call runs to (`total_steps`, or `stop_after`).
    last: usize,
    refs: Option<(RefLogps, RefLogps)>,
    /// The epoch whose pair order is in `order`.
    order_epoch: usize,
    order: Vec<usize>,
    /// `log_history` of trainer_state.json: every window and evaluation logged so far.
    history: Vec<Record>,
    window: Window,
    metrics_file: Option<MetricsFile>,
    events: Option<EventWriter>,
    pb: indicatif::ProgressBar,
    nonfinite_run: usize,
    /// When this call's training began, and at which step (for elapsed time and ETA).
    started: (Instant, usize),
    /// Some rank asked to stop (Ctrl-C) during the last step.
    stop_voted: bool,
    outcome: Outcome,
}

impl<'a> Trainer<'a> {
    pub fn new(
        run: &'a DpoRun<'a>,
        train: &'a [PairIds],
        eval: &'a [PairIds],
        cfg: &'a LoopConfig,
        out: &'a RunOutput<'a>,
    ) -> Result<Trainer<'a>> {
        if train.is_empty() {
            return Err(Error::NoTrainingPairs);
        }
        if cfg.dist.rank() == 0 {
            std::fs::create_dir_all(out.dir).map_err(|e| Error::io(out.dir, e))?;
        }
        let adapter = run
            .adapter
            .as_ref()
            .ok_or_else(|| Error::Msg("training needs an adapter".into()))?;
        Ok(Trainer {
            run,
            adapter,
            train,
            eval,
            cfg,
            out,
            updater: Updater::new(adapter, cfg.adamw, cfg.max_grad_norm, cfg.loraplus)?
                .with_collective(cfg.dist.clone()),
            data_fp: fingerprint(train),
            loss_state: LossState::default(),
            step: 0,
            consumed: 0,
            last: cfg.stop_after.map_or(cfg.total_steps, |s| s.min(cfg.total_steps)),
            refs: None,
            order_epoch: usize::MAX,
            order: Vec::new(),
            history: Vec::new(),
            window: Window::new(),
            metrics_file: None,
            events: None,
            pb: indicatif::ProgressBar::hidden(),
            nonfinite_run: 0,
            started: (Instant::now(), 0),
            stop_voted: false,
            outcome: Outcome {
                steps: Vec::new(),
                evals: Vec::new(),
                last_step: 0,
                last_checkpoint: None,
                skipped_nonfinite: 0,
                interrupted: false,
            },
        })
    }

    /// The training loop.
    pub fn train(mut self) -> Result<Outcome> {
        // Every rank must hold the same data and settings (refused at start, not found later).
        if self.cfg.dist.size() > 1 {
            crate::dist::check_agreement(
                &*self.cfg.dist,
                &[
                    (
                        "training data fingerprint",
                        u64::from_str_radix(&self.data_fp, 16).unwrap_or(0),
                    ),
                    ("evaluation data", crate::dist::hash_str(&fingerprint(self.eval))),
                    ("settings", crate::dist::hash_str(self.out.recipe_yaml)),
                ],
            )?;
        }
        // Pick up where a checkpoint left off: weights, optimizer moments, data position, logs.
        if let Some(dir) = &self.out.resume_from {
            self.resume(dir)?;
        }
        // Reference log-probs once up front, when asked (cached next to the run).
        self.refs = self.precompute_reference()?;
        if self.is_main() {
            self.metrics_file = Some(MetricsFile::open(
                &self.out.dir.join("metrics.jsonl"),
                self.out.resume_from.is_none(),
            )?);
            if self.cfg.tensorboard {
                self.events = Some(EventWriter::create(&self.out.dir.join("runs"))?);
            }
        }
        self.pb = progress_bar(self.cfg, self.step);
        self.window = Window::new();
        self.started = (Instant::now(), self.step);
        while self.step < self.last {
            // Accumulate over the micro-batches, clip, update; a non-finite step is skipped.
            let micros = self.next_micros();
            let lr = self.cfg.schedule.lr(self.step);
            let stop = crate::util::is_set(self.cfg.stop.as_ref());
            let (outcome, stop) = self
                .updater
                .step_voting(self.run, &micros, lr, &mut self.loss_state, stop)?;
            self.stop_voted = stop;
            self.step += 1;
            match outcome {
                StepOutcome::Updated { dpo, grad_norm, tokens } => self.record_step(dpo, grad_norm, lr, tokens),
                StepOutcome::Skipped { tokens } => {
                    self.skip_step(tokens)?;
                    continue;
                }
            }
            // Log the window every `logging_steps`; evaluate as `--eval_strategy` says.
            self.log_window()?;
            self.maybe_eval()?;
            // A Ctrl-C stops after this step, with a checkpoint.
            let interrupted = self.check_interrupt();
            self.maybe_save()?;
            if interrupted {
                break;
            }
        }
        self.pb.finish_and_clear();
        self.outcome.last_step = self.step;
        Ok(self.outcome)
    }

    /// Restore the adapter, optimizer, data position, loss state and logs of checkpoint `dir`.
    fn resume(&mut self, dir: &Path) -> Result<()> {
        let ck = checkpoint::load(dir)?;
        let changes = changed_settings(&dir.join(checkpoint::RECIPE_FILE), self.out.recipe_yaml);
        if ck.state.data_fingerprint != self.data_fp {
            let because = if changes.is_empty() {
                String::new()
            } else {
                format!(" (changed since: {})", changes.join("; "))
            };
            return Err(Error::ResumeDataMismatch {
                dir: dir.into(),
                was: ck.state.data_fingerprint.clone(),
                now: self.data_fp.clone(),
                because,
            });
        }
        if !changes.is_empty() && !self.cfg.quiet {
            eprintln!(
                "note: resuming {} with changed settings: {}",
                dir.display(),
                changes.join("; ")
            );
        }
        for (key, var) in self.updater.params() {
            let t = ck.adapter.get(key).ok_or_else(|| Error::MissingTensor {
                path: dir.into(),
                name: key.clone(),
            })?;
            if t.dims() != var.as_tensor().dims() {
                return Err(Error::ShapeMismatch {
                    path: dir.into(),
                    name: key.clone(),
                    expected: var.as_tensor().dims().to_vec(),
                    got: t.dims().to_vec(),
                });
            }
            var.set(&t.to_device(var.device())?)?;
        }
        self.updater.opt.load_state(&ck.optimizer, ck.state.optimizer_t, dir)?;
        self.step = ck.state.step;
        self.consumed = ck.state.consumed_micro_batches;
        self.loss_state = serde_json::from_value(ck.state.loss_state.clone()).map_err(|e| Error::LossState {
            dir: dir.into(),
            msg: e.to_string(),
        })?;
        self.history = ck.state.log_history.clone();
        if self.is_main() {
            checkpoint::restore_metrics(dir, &self.out.dir.join("metrics.jsonl"), self.step)?;
        }
        if !self.cfg.quiet {
            eprintln!("resumed from {} at step {}", dir.display(), self.step);
        }
        Ok(())
    }

    fn precompute_reference(&self) -> Result<Option<(RefLogps, RefLogps)>> {
        if !(self.cfg.precompute_ref && self.run.needs_reference) {
            return Ok(None);
        }
        let key = format!(
            "{}-{}-{:?}",
            self.data_fp,
            fingerprint(self.eval),
            self.run.reference.adapter
        );
        let path = self.out.dir.join("ref_logps.json");
        cached_reference(self.run, self.train, self.eval, self.cfg, &path, &key).map(Some)
    }

    /// Rank 0 writes what the run produces.
    fn is_main(&self) -> bool {
        self.cfg.dist.rank() == 0
    }

    /// Micro-batches in one pass over the training pairs.
    fn micro_per_epoch(&self) -> usize {
        self.train.len().div_ceil(self.cfg.batch_size)
    }

    /// This rank's share of the step's next `accumulation × ranks` micro-batches in epoch order
    /// (micro-batch `j` of the step goes to rank `j % ranks`), advancing the data position.
    fn next_micros(&mut self) -> Vec<Micro<'a>> {
        let (cfg, n) = (self.cfg, self.train.len());
        let (rank, world) = (cfg.dist.rank(), cfg.dist.size());
        let micro_per_epoch = self.micro_per_epoch();
        let mut micros = Vec::with_capacity(cfg.accumulation);
        for j in 0..cfg.accumulation * world {
            if j % world != rank {
                self.consumed += 1;
                continue;
            }
            let (epoch, k) = (self.consumed / micro_per_epoch, self.consumed % micro_per_epoch);
            if epoch != self.order_epoch {
                self.order = if cfg.group_by_length {
                    let lengths: Vec<usize> = self.train.iter().map(|p| p.num_tokens()).collect();
                    length_grouped_order(&lengths, epoch, cfg.seed, cfg.shuffle, cfg.batch_size)
                } else {
                    epoch_order(n, epoch, cfg.seed, cfg.shuffle)
                };
                self.order_epoch = epoch;
            }
            let idx = &self.order[k * cfg.batch_size..((k + 1) * cfg.batch_size).min(n)];
            let train = self.train;
            micros.push(Micro {
                pairs: idx.iter().map(|&i| &train[i]).collect(),
                refs: self.refs.as_ref().map(|(tr, _)| idx.iter().map(|&i| tr[i]).collect()),
                dropout_seed: Rng::stream(cfg.seed, self.consumed as u64 + 1).next_u64(),
            });
            self.consumed += 1;
        }
        micros
    }

    fn record_step(&mut self, dpo: DpoMetrics, grad_norm: f64, lr: f64, tokens: usize) {
        self.nonfinite_run = 0;
        let m = StepMetrics {
            dpo,
            grad_norm,
            learning_rate: lr,
            epoch: self.consumed as f64 / self.micro_per_epoch() as f64,
        };
        self.outcome.steps.push(m);
        self.window.steps.push(m);
        self.window.tokens += tokens;
        self.pb.inc(1);
    }

    /// A skipped step keeps the data position moving; too many in a row stop the run.
    fn skip_step(&mut self, tokens: usize) -> Result<()> {
        self.window.tokens += tokens;
        self.outcome.skipped_nonfinite += 1;
        self.nonfinite_run += 1;
        let line = format!(
            "step {}: non-finite loss or gradient, update skipped ({} in a row)",
            self.step, self.nonfinite_run
        );
        say(&self.pb, self.cfg.quiet, &line);
        if self.nonfinite_run >= self.cfg.max_nonfinite_steps.max(1) {
            let keep = match &self.outcome.last_checkpoint {
                Some(p) => format!("the last good checkpoint is {}", p.display()),
                None => "no checkpoint was written yet".into(),
            };
            return Err(Error::NonFinite {
                step: self.step,
                in_a_row: self.nonfinite_run,
                keep,
            });
        }
        Ok(())
    }

    /// One logged record: to metrics.jsonl and, when asked, to the TensorBoard event file.
    fn write_metrics(&mut self, record: &Record) -> Result<()> {
        if !self.is_main() {
            return Ok(());
        }
        if let Some(ev) = self.events.as_mut() {
            ev.scalars(self.step, &tensorboard::tags(record))?;
        }
        match self.metrics_file.as_mut() {
            Some(f) => f.write(self.step, record),
            None => Err(Error::Msg("metrics.jsonl is not open".into())),
        }
    }

    /// At the end of a logging window: write and print its means, start the next window.
    fn log_window(&mut self) -> Result<()> {
        if !(self.step.is_multiple_of(self.cfg.logging_steps) || self.step == self.last) {
            return Ok(());
        }
        let w = WindowMetrics {
            metrics: StepMetrics::window(&self.window.steps),
            tokens_per_second: self.window.tokens as f64 / self.window.start.elapsed().as_secs_f64().max(1e-9),
            peak_rss_mib: metrics::peak_rss_mib(),
        };
        let record = w.record();
        self.write_metrics(&record)?;
        let keys = [
            "loss",
            "rewards/accuracies",
            "rewards/margins",
            "grad_norm",
            "learning_rate",
            "tokens_per_second",
        ];
        let mut line = metrics::format_line(self.step, &record, &keys);
        if self.pb.is_hidden() {
            // No bar is drawn (stderr is a file or a pipe): the line carries the progress.
            line += &format!(" | {}", self.progress_text());
        }
        say(&self.pb, self.cfg.quiet, &line);
        self.pb.set_message(format!("loss {:.4}", w.metrics.dpo.loss));
        self.history.push(record);
        self.window = Window::new();
        Ok(())
    }

    /// `step/total [elapsed<eta]`, the ETA from this call's pace so far.
    fn progress_text(&self) -> String {
        let (t0, first) = self.started;
        let secs = t0.elapsed().as_secs_f64();
        let done = self.step.saturating_sub(first).max(1) as f64;
        let left = self.cfg.total_steps.saturating_sub(self.step) as f64;
        format!(
            "{}/{} [{}<{}]",
            self.step,
            self.cfg.total_steps,
            clock(secs),
            clock(secs / done * left)
        )
    }

    /// Every `eval_every` steps and at the last step: the DPO metrics on the eval pairs.
    fn maybe_eval(&mut self) -> Result<()> {
        let Some(every) = self.cfg.eval_every else {
            return Ok(());
        };
        let due = self.step.is_multiple_of(every) || self.step == self.cfg.total_steps;
        if self.eval.is_empty() || !due {
            return Ok(());
        }
        let refs = self.refs.as_ref().map(|(_, ev)| ev);
        let e = sharded_evaluate(
            self.run,
            self.eval,
            refs,
            self.cfg.eval_batch_size,
            &self.loss_state,
            &*self.cfg.dist,
        )?;
        let record = e.record("eval_");
        self.write_metrics(&record)?;
        let keys = ["eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"];
        say(
            &self.pb,
            self.cfg.quiet,
            &metrics::format_line(self.step, &record, &keys),
        );
        self.history.push(record);
        self.outcome.evals.push((self.step, e));
        Ok(())
    }

    /// Has a Ctrl-C asked the run to stop before its last step?
    fn check_interrupt(&mut self) -> bool {
        // One process reads its flag now; ranks act on the vote of the step, taken by all.
        let stop = if self.cfg.dist.size() == 1 {
            crate::util::is_set(self.cfg.stop.as_ref())
        } else {
            self.stop_voted
        };
        if stop && self.step < self.last {
            self.outcome.interrupted = true;
            let line = format!("interrupted: saving a checkpoint at step {} and stopping", self.step);
            say(&self.pb, self.cfg.quiet, &line);
        }
        self.outcome.interrupted
    }

    /// Every `save_every` steps, at the last step and on interrupt: a checkpoint, old ones rotated
    /// out.
    fn maybe_save(&mut self) -> Result<()> {
        let due = self
            .cfg
            .save_every
            .is_some_and(|every| self.step.is_multiple_of(every) || self.step == self.last);
        if !(due || self.outcome.interrupted) || !self.is_main() {
            return Ok(());
        }
        let state = TrainerState {
            step: self.step,
            consumed_micro_batches: self.consumed,
            total_steps: self.cfg.total_steps,
            optimizer_t: self.updater.opt.t,
            seed: self.cfg.seed,
            loss_state: serde_json::to_value(&self.loss_state).map_err(|e| Error::Msg(e.to_string()))?,
            data_fingerprint: self.data_fp.clone(),
            log_history: self.history.clone(),
        };
        let out = self.out;
        let dir = checkpoint::save(
            out.dir,
            self.adapter,
            out.base_model,
            &self.updater.opt,
            &state,
            out.recipe_yaml,
        )?;
        if let Some(k) = self.cfg.save_total_limit {
            checkpoint::rotate(out.dir, k, &dir)?;
        }
        self.outcome.last_checkpoint = Some(dir);
        Ok(())
    }
}

/// The settings that differ between a checkpoint's recipe.yaml (`saved`) and this run's
/// (`now`), as `key old → new`; `resume_from_checkpoint` itself is left out. Empty when either
/// is not a mapping (a checkpoint without one, or an API caller's empty recipe).
fn changed_settings(saved: &Path, now: &str) -> Vec<String> {
    use serde_yaml::Value;
    let parse = |text: &str| {
        serde_yaml::from_str::<Value>(text)
            .ok()
            .and_then(|v| v.as_mapping().cloned())
    };
    let (Some(old), Some(new)) = (
        std::fs::read_to_string(saved).ok().as_deref().and_then(parse),
        parse(now),
    ) else {
        return Vec::new();
    };
    let show = |v: Option<&Value>| v.map_or("(unset)".into(), |v| serde_json::to_string(v).unwrap_or_default());
    let keys = new.keys().chain(old.keys().filter(|k| !new.contains_key(*k)));
    let mut out = Vec::new();
    for key in keys.cloned().collect::<Vec<_>>() {
        let name = key.as_str().unwrap_or_default();
        if name == "resume_from_checkpoint" || old.get(&key) == new.get(&key) {
            continue;
        }
        out.push(format!("{name} {} → {}", show(old.get(&key)), show(new.get(&key))));
    }
    out
}

/// Seconds as `HH:MM:SS`.
fn clock(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
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
