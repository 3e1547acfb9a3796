//! `lorafold dpo` and `lorafold eval` end to end: resolve the model, read and tokenise the data,
//! attach the adapters, train or score.

use std::path::{Path, PathBuf};
use std::rc::Rc;

use crate::dist::Collective;

use crate::data::tokenize::{Preprocessor, TokenizeOptions};
use crate::data::{load_pairs, LoadOptions as DataOptions};
use crate::dpo::batch::PairIds;
use crate::error::{Error, Result};
use crate::hub::{resolve_model, ModelFiles};
use crate::lora::config::{LoraConfig, TargetModules};
use crate::lora::{attach_new, io::load_adapter, Adapter, LoraInit};
use crate::model::load::load_model;
use crate::rng::Rng;
use crate::train::metrics::DpoMetrics;
use crate::train::settings::Settings;
use crate::train::trainer::{train, DpoRun, LoopConfig, Outcome, RunOutput};

/// Tokenised data of a run.
pub struct Prepared {
    pub train: Vec<PairIds>,
    pub eval: Vec<PairIds>,
    pub report: Vec<String>,
}

fn to_ids(t: crate::data::tokenize::TokenizedPair) -> PairIds {
    PairIds {
        prompt: t.prompt,
        chosen: t.chosen,
        rejected: t.rejected,
        rejected_prompt: t.rejected_prompt,
    }
}

/// Read, normalise and tokenise every dataset spec.
pub fn prepare_specs(
    pre: &Preprocessor,
    specs: &[String],
    opts: &TokenizeOptions,
    skip_bad_rows: bool,
    report: &mut Vec<String>,
) -> Result<Vec<PairIds>> {
    let mut out = Vec::new();
    for spec in specs {
        let (rows, stats) = load_pairs(
            spec,
            &DataOptions {
                skip_bad_rows,
                revision: None,
            },
        )?;
        let (tok, ps) = pre.prepare(&rows, opts)?;
        // A folder (or a hub dataset) of several files: name each file with its format.
        let fmts: Vec<String> = match stats.formats.as_slice() {
            [(_, f)] => vec![f.clone()],
            many => many.iter().map(|(file, f)| format!("{file}: {f}")).collect(),
        };
        report.push(format!(
            "{spec}: {} rows ({}), {} pairs kept; dropped {} identical, {} with nothing to score; {} truncated; {} bad rows skipped",
            stats.rows,
            fmts.join(", "),
            ps.kept,
            ps.dropped_identical,
            ps.dropped_empty,
            ps.truncated,
            stats.skipped_bad_rows
        ));
        for (file, keys) in &stats.unused_keys {
            report.push(unused_keys_warning(file, keys));
        }
        out.extend(tok.into_iter().map(to_ids));
    }
    Ok(out)
}

/// The warning for keys of a data file that its format does not read (at most 8 named).
fn unused_keys_warning(file: &str, keys: &[String]) -> String {
    let shown: Vec<&str> = keys.iter().take(8).map(String::as_str).collect();
    let more = match keys.len().saturating_sub(shown.len()) {
        0 => String::new(),
        n => format!(" and {n} more"),
    };
    format!(
        "warning: {file}: key{} {}{more} not used by its format (ignored)",
        if keys.len() == 1 { "" } else { "s" },
        shown.join(", ")
    )
}

pub fn tokenize_options(s: &Settings) -> TokenizeOptions {
    TokenizeOptions {
        max_length: s.max_length,
        max_prompt_length: s.max_prompt_length,
        truncation_mode: s.truncation_mode,
        fold_system: s.fold_system,
    }
}

pub fn prepare_data(files: &ModelFiles, s: &Settings) -> Result<Prepared> {
    let started = std::time::Instant::now();
    let pre = Preprocessor::from_model_dir(&files.dir, s.template.as_deref())?;
    let opts = tokenize_options(s);
    let mut report = Vec::new();
    let mut train = prepare_specs(&pre, &s.dataset, &opts, s.skip_bad_rows, &mut report)?;
    let mut eval = prepare_specs(&pre, &s.val_dataset, &opts, s.skip_bad_rows, &mut report)?;
    if eval.is_empty() && s.split_dataset_ratio > 0.0 {
        let n_eval = ((train.len() as f64) * s.split_dataset_ratio).ceil() as usize;
        let mut idx: Vec<usize> = (0..train.len()).collect();
        Rng::stream(s.seed, 0x5711_7000).shuffle(&mut idx);
        let held: std::collections::HashSet<usize> = idx[..n_eval.min(train.len().saturating_sub(1))]
            .iter()
            .copied()
            .collect();
        let (mut tr, mut ev) = (Vec::new(), Vec::new());
        for (i, p) in train.into_iter().enumerate() {
            if held.contains(&i) {
                ev.push(p)
            } else {
                tr.push(p)
            }
        }
        train = tr;
        eval = ev;
        report.push(format!(
            "held out {} pairs for evaluation (split_dataset_ratio {})",
            eval.len(),
            s.split_dataset_ratio
        ));
    }
    if let Some(m) = s.max_eval_pairs {
        eval.truncate(m);
    }
    report.push(format!(
        "data read, templated and tokenised in {:.1}s",
        started.elapsed().as_secs_f64()
    ));
    Ok(Prepared { train, eval, report })
}

pub struct DpoSummary {
    pub output_dir: PathBuf,
    pub outcome: Outcome,
    pub train_pairs: usize,
    pub eval_pairs: usize,
}

/// Run `lorafold dpo` with resolved settings, in one process.
pub fn run_dpo(s: &Settings, quiet: bool) -> Result<DpoSummary> {
    run_dpo_on(s, quiet, crate::dist::single())
}

/// Run `lorafold dpo` as one rank of `dist` (every rank calls this with the same settings); rank
/// 0 alone writes the output folder.
pub fn run_dpo_on(s: &Settings, quiet: bool, dist: Rc<dyn Collective>) -> Result<DpoSummary> {
    let main = dist.rank() == 0;
    let quiet = quiet || !main;
    // The output folder first: a bad one fails before the model is fetched or loaded.
    let (out_dir, resume_from, created) = open_output_on(s, quiet, main)?;
    let files = resolve_model(&s.model, s.revision.as_deref()).inspect_err(|_| {
        if created {
            let _ = std::fs::remove_dir(&out_dir);
        }
    })?;
    let recipe_yaml = serde_yaml::to_string(s).map_err(|e| Error::Msg(e.to_string()))?;
    if main {
        crate::lora::io::write_atomic(&out_dir.join("recipe.yaml"), recipe_yaml.as_bytes())?;
    }

    // Model, data, adapters.
    let mut model = load_model(&files.config, &files.weights, s.dtype)?;
    model.set_gradient_checkpointing(s.gradient_checkpointing);
    let data = prepare_data(&files, s)?;
    if !quiet {
        for line in &data.report {
            eprintln!("{line}");
        }
    }
    let (adapter, ref_slot) = attach_adapters(&mut model, s)?;
    if main {
        crate::train::checkpoint::check_free_space(
            &out_dir,
            crate::train::checkpoint::estimated_size(adapter.num_params()),
        )?;
    }
    if !quiet {
        print_run_header(&files.name, &model, &adapter, (data.train.len(), data.eval.len()));
        print_ranks(s, &*dist);
    }

    // Train, then write the final adapter (an interrupted run leaves its checkpoint) and the plot.
    let run = DpoRun::new(&model, Some(adapter), ref_slot, s)?;
    let mut cfg = LoopConfig::from_settings(s, data.train.len(), dist)?;
    cfg.quiet = quiet;
    cfg.stop = Some(crate::util::install_ctrlc(
        "interrupt: finishing this step and saving a checkpoint (Ctrl-C again to exit now)",
    ));
    let base_model = base_to_record(&files);
    let output = RunOutput {
        dir: &out_dir,
        base_model: &base_model,
        recipe_yaml: &recipe_yaml,
        resume_from,
    };
    let outcome = train(&run, &data.train, &data.eval, &cfg, &output)?;
    if main {
        write_results(s, &run, &outcome, &out_dir, &base_model, quiet)?;
    }
    Ok(DpoSummary {
        output_dir: out_dir,
        outcome,
        train_pairs: data.train.len(),
        eval_pairs: data.eval.len(),
    })
}

/// The output folder, the checkpoint to resume from and whether this call created the folder:
/// rank 0 opens it (see [`open_output`]); the other ranks only find the checkpoint.
fn open_output_on(s: &Settings, quiet: bool, main: bool) -> Result<(PathBuf, Option<PathBuf>, bool)> {
    if main {
        return open_output(s, quiet);
    }
    Ok((s.output_dir.clone(), resume_checkpoint(s)?, false))
}

/// The checkpoint `--resume_from_checkpoint` names (resolved in `--output_dir`), if any.
fn resume_checkpoint(s: &Settings) -> Result<Option<PathBuf>> {
    s.resume_from_checkpoint
        .as_deref()
        .map(|spec| crate::train::checkpoint::resolve(spec, &s.output_dir))
        .transpose()
}

fn print_ranks(s: &Settings, dist: &dyn Collective) {
    if dist.size() > 1 {
        eprintln!(
            "data-parallel over {} ranks ({}): {} pairs per step ({} per micro-batch × {} accumulation × {} ranks)",
            dist.size(),
            dist.backend(),
            s.batch_size * s.gradient_accumulation_steps * dist.size(),
            s.batch_size,
            s.gradient_accumulation_steps,
            dist.size()
        );
    }
}

/// After training (rank 0): the final adapter, unless the run was interrupted (its checkpoint
/// stands), and the plot.
fn write_results(
    s: &Settings,
    run: &DpoRun,
    outcome: &Outcome,
    out_dir: &Path,
    base_model: &str,
    quiet: bool,
) -> Result<()> {
    if let (Some(a), false) = (&run.adapter, outcome.interrupted) {
        // PiSSA / OLoRA: converted to a plain LoRA of the untouched base (the unconverted form
        // too with --save_unconverted, as PEFT keeps both).
        a.save_converted(out_dir, Some(base_model))?;
        if a.is_principal() && s.lora_extra.save_unconverted {
            a.save(&out_dir.join("unconverted"), Some(base_model))?;
        }
    }
    if let Err(e) = crate::train::plot::write_plot(&out_dir.join("metrics.jsonl"), &out_dir.join("metrics.png")) {
        if !quiet {
            eprintln!("warning: could not draw metrics.png: {e}");
        }
    }
    Ok(())
}

/// The base model as adapter_config.json records it: the hub id, or a local folder's absolute
/// path, so that PEFT's `AutoPeftModelForCausalLM.from_pretrained(adapter)` finds it from any
/// working directory.
fn base_to_record(files: &ModelFiles) -> String {
    let named = Path::new(&files.name);
    if !named.is_dir() {
        return files.name.clone();
    }
    std::fs::canonicalize(named).map_or_else(|_| files.name.clone(), |p| p.display().to_string())
}

/// The output folder of a run, checked writable, with the checkpoint to resume from (if asked)
/// and whether this call created the folder. Unfinished checkpoints of an interrupted run are
/// removed.
fn open_output(s: &Settings, quiet: bool) -> Result<(PathBuf, Option<PathBuf>, bool)> {
    let mut out_dir = s.output_dir.clone();
    let resume_from = resume_checkpoint(s)?;
    let rerun = out_dir.join(crate::lora::io::WEIGHTS_FILE).exists();
    let version = s.add_version.unwrap_or(rerun && !s.overwrite_output_dir);
    if version && resume_from.is_none() {
        out_dir = out_dir.join(next_version(&out_dir));
        if s.add_version.is_none() && !quiet {
            eprintln!(
                "{} already holds a trained adapter: training into {} (ms-swift's version folders; \
                 --add_version false refuses instead, --overwrite_output_dir replaces)",
                s.output_dir.display(),
                out_dir.display()
            );
        }
    }
    let finished = out_dir.join(crate::lora::io::WEIGHTS_FILE).exists();
    if resume_from.is_none() && finished && !s.overwrite_output_dir {
        return Err(Error::OutputHoldsAdapter { dir: out_dir });
    }
    let created = !out_dir.exists();
    check_writable(&out_dir)?;
    for p in crate::train::checkpoint::remove_unfinished(&out_dir) {
        if !quiet {
            eprintln!("removed {}, left unfinished by an interrupted run", p.display());
        }
    }
    Ok((out_dir, resume_from, created))
}

/// ms-swift's version folder name for a new run under `dir`: `v<N>-<YYYYMMDD>-<HHMMSS>`, N one
/// more than the largest `v<N>-` already there (from 0).
fn next_version(dir: &Path) -> String {
    let taken = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix('v')?.split('-').next()?.parse::<u64>().ok()
        })
        .max();
    let n = taken.map_or(0, |m| m + 1);
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("v{n}-{}", crate::data::template::utc_stamp(secs))
}

/// The trained adapter (new, or `--adapters` to continue from) and the frozen reference
/// adapter's slot (`--ref_adapters`), if any.
fn attach_adapters(model: &mut crate::model::Model, s: &Settings) -> Result<(Adapter, Option<usize>)> {
    let adapter = match &s.adapters {
        Some(dir) => load_adapter(model, dir, true)?,
        None => {
            let x = &s.lora_extra;
            let target = match &x.lora_target_regex {
                Some(re) => TargetModules::Pattern(re.clone()),
                None => TargetModules::parse_cli(&s.lora_target_modules),
            };
            let mut cfg = LoraConfig::new(s.lora_rank, s.lora_alpha, s.lora_dropout_p, target);
            cfg.use_rslora = s.use_rslora;
            cfg.use_dora = x.use_dora;
            cfg.exclude_modules = x.exclude_modules.as_ref().map(|v| TargetModules::parse_exclude(v));
            cfg.layers_to_transform = x.layers_to_transform.as_ref().map(|v| serde_json::json!(v));
            cfg.layers_pattern = x.layers_pattern.as_ref().map(|p| serde_json::json!(p));
            cfg.rank_pattern = x.rank_pattern.clone();
            cfg.alpha_pattern = x.alpha_pattern.clone();
            cfg.modules_to_save = x.modules_to_save.clone();
            cfg.ensure_weight_tying = x.ensure_weight_tying;
            cfg.trainable_token_indices = x.trainable_token_indices.as_ref().map(|t| serde_json::json!(t));
            let init = match &x.init_lora_weights {
                Some(v) => LoraInit::parse(v, s.seed).map_err(|msg| Error::Setting {
                    key: "--init_lora_weights".into(),
                    msg,
                })?,
                None => LoraInit::Peft { seed: s.seed },
            };
            cfg.init_lora_weights = Some(init.peft_value());
            cfg.validate(std::path::Path::new("--lora options"))?;
            attach_new(model, &cfg, init)?
        }
    };
    let ref_slot = match &s.ref_adapters {
        Some(dir) => Some(load_adapter(model, dir, false)?.slot),
        None => None,
    };
    Ok((adapter, ref_slot))
}

/// Create the output folder and fail before training when it cannot be written, naming it.
pub fn check_writable(dir: &Path) -> Result<()> {
    let say = |msg: String| Error::OutputDir { dir: dir.into(), msg };
    if dir.exists() && !dir.is_dir() {
        return Err(say("exists and is not a folder".into()));
    }
    std::fs::create_dir_all(dir).map_err(|e| say(format!("cannot create the folder: {e}")))?;
    let probe = dir.join(".lorafold-write-test");
    let written = std::fs::write(&probe, b"ok");
    let _ = std::fs::remove_file(&probe);
    written.map_err(|e| say(format!("the folder is not writable: {e}")))
}

/// Per-pair scores written by `lorafold eval --per_pair`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PairScore {
    pub index: usize,
    pub policy_chosen_logps: f32,
    pub policy_rejected_logps: f32,
    pub ref_chosen_logps: Option<f32>,
    pub ref_rejected_logps: Option<f32>,
    pub chosen_reward: f32,
    pub rejected_reward: f32,
}

/// Run `lorafold eval`: the DPO metrics of an adapter (or the bare model) on preference pairs.
pub fn run_eval(s: &Settings, per_pair: Option<&Path>) -> Result<(DpoMetrics, usize, Vec<String>)> {
    let files = resolve_model(&s.model, s.revision.as_deref())?;
    let mut model = load_model(&files.config, &files.weights, s.dtype)?;
    let pre = Preprocessor::from_model_dir(&files.dir, s.template.as_deref())?;
    let mut report = Vec::new();
    let specs: Vec<String> = s.dataset.iter().chain(&s.val_dataset).cloned().collect();
    let mut pairs = prepare_specs(&pre, &specs, &tokenize_options(s), s.skip_bad_rows, &mut report)?;
    if let Some(m) = s.max_eval_pairs {
        pairs.truncate(m);
    }
    if pairs.is_empty() {
        return Err(Error::NoEvalPairs);
    }
    for dir in s.adapters.iter().chain(&s.ref_adapters) {
        if let Some(note) = crate::lora::io::base_mismatch_note(dir, &s.model) {
            report.push(note);
        }
    }
    let adapter = match &s.adapters {
        Some(dir) => Some(load_adapter(&mut model, dir, false)?),
        None => None,
    };
    let ref_slot = match &s.ref_adapters {
        Some(dir) => Some(load_adapter(&mut model, dir, false)?.slot),
        None => None,
    };
    let run = DpoRun::new(&model, adapter, ref_slot, s)?;
    let mut scores = Vec::new();
    let rec = run.evaluate_pairs(&pairs, None, s.eval_batch_size, &Default::default(), |m| {
        for i in 0..m.chosen_logps.len() {
            scores.push(PairScore {
                index: scores.len(),
                policy_chosen_logps: m.chosen_logps[i],
                policy_rejected_logps: m.rejected_logps[i],
                ref_chosen_logps: m.ref_chosen_logps.as_ref().map(|v| v[i]),
                ref_rejected_logps: m.ref_rejected_logps.as_ref().map(|v| v[i]),
                chosen_reward: m.chosen_rewards[i],
                rejected_reward: m.rejected_rewards[i],
            });
        }
    })?;
    if let Some(p) = per_pair {
        let mut text = String::new();
        for sc in &scores {
            text += &serde_json::to_string(sc).map_err(|e| Error::Msg(e.to_string()))?;
            text.push('\n');
        }
        std::fs::write(p, text).map_err(|e| Error::io(p, e))?;
    }
    Ok((rec, pairs.len(), report))
}

/// The line naming model, adapter and data, and what fully trained tensors cost.
fn print_run_header(name: &str, model: &crate::model::Model, adapter: &Adapter, pairs: (usize, usize)) {
    eprintln!(
        "model {} ({:?}, {} parameters, {:?}); adapter {} trainable parameters; {} train / {} eval pairs",
        name,
        model.cfg.arch,
        model.cfg.num_params(),
        model.dtype(),
        adapter.num_params(),
        pairs.0,
        pairs.1
    );
    let full: usize = adapter
        .params
        .iter()
        .filter(|p| !p.key.contains(".lora_"))
        .map(|p| p.tensor.elem_count())
        .sum();
    if full > 0 {
        eprintln!(
            "note: {full} of them are trained in full (modules_to_save / trainable tokens): {} for the f32 \
                 copies, their gradients and AdamW's two moments",
            crate::util::human_bytes(16 * full as u64)
        );
    }
}
