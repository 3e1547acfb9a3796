//! DPO settings: command-line flags and YAML recipes share one set of keys (ms-swift's names).
//! A recipe is read first, flags given on the command line override it, and the result is
//! resolved into one validated [`Settings`].

use std::path::{Path, PathBuf};

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Every key of `lorafold dpo`, as a flag (both `--max_length` and `--max-length` work) and as a
/// recipe key. Unset keys take lorafold's defaults (see `lorafold dpo --help`).
#[derive(Debug, Clone, Default, Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpoOptions {
    /// Model: local folder or hub id (aliases: --model_id_or_path, --model_type).
    #[arg(long, alias = "model-id-or-path", alias = "model-type")]
    #[serde(alias = "model_id_or_path", alias = "model_type")]
    pub model: Option<String>,
    /// Hub revision of the model.
    #[arg(long)]
    pub revision: Option<String>,
    /// Reference model; must be the same as the model (the reference is the base with adapters off).
    #[arg(long)]
    pub ref_model_type: Option<String>,
    /// Training type; only `lora` is supported.
    #[arg(long)]
    pub sft_type: Option<String>,
    /// Training data: JSON, JSONL or Parquet files, or hub dataset ids (org/name[:subset]).
    #[arg(long, num_args = 1..)]
    pub dataset: Option<Vec<String>>,
    /// Held-out evaluation data (same forms as --dataset).
    #[arg(long, num_args = 1..)]
    pub val_dataset: Option<Vec<String>>,
    /// Fraction of the training pairs held out for evaluation when no --val_dataset is given.
    #[arg(long)]
    pub split_dataset_ratio: Option<f64>,
    /// Output folder (default: adapters/<model>-dpo-<time>).
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    #[arg(long)]
    pub num_train_epochs: Option<f64>,
    /// Total optimizer steps; overrides --num_train_epochs.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Longest prompt + response in tokens.
    #[arg(long)]
    pub max_length: Option<usize>,
    #[arg(long)]
    pub max_prompt_length: Option<usize>,
    /// keep_end (default: keep the end of a long prompt) or keep_start.
    #[arg(long)]
    pub truncation_mode: Option<String>,
    #[arg(long)]
    pub lora_rank: Option<usize>,
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// LoRA dropout (alias: --lora_dropout).
    #[arg(long, alias = "lora-dropout")]
    #[serde(alias = "lora_dropout")]
    pub lora_dropout_p: Option<f64>,
    /// ALL / all-linear, a list of module names, or a regex over module paths.
    #[arg(long, num_args = 1..)]
    pub lora_target_modules: Option<Vec<String>>,
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub use_rslora: Option<bool>,
    /// Start from an existing adapter folder (trained further).
    #[arg(long)]
    pub adapters: Option<PathBuf>,
    /// Use a frozen adapter (e.g. an SFT adapter) as the reference instead of the bare base.
    #[arg(long)]
    pub ref_adapters: Option<PathBuf>,
    /// Pairs per micro-batch (alias: --per_device_train_batch_size).
    #[arg(long, alias = "per-device-train-batch-size")]
    #[serde(alias = "per_device_train_batch_size")]
    pub batch_size: Option<usize>,
    #[arg(long, alias = "per-device-eval-batch-size")]
    #[serde(alias = "per_device_eval_batch_size")]
    pub eval_batch_size: Option<usize>,
    #[arg(long)]
    pub gradient_accumulation_steps: Option<usize>,
    /// Shuffle the training pairs each epoch (default true; false keeps file order).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub shuffle: Option<bool>,
    #[arg(long)]
    pub learning_rate: Option<f64>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    #[arg(long)]
    pub adam_beta1: Option<f64>,
    #[arg(long)]
    pub adam_beta2: Option<f64>,
    #[arg(long)]
    pub adam_epsilon: Option<f64>,
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// cosine, linear, constant or constant_with_warmup.
    #[arg(long)]
    pub lr_scheduler_type: Option<String>,
    #[arg(long)]
    pub warmup_ratio: Option<f64>,
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// DPO temperature β.
    #[arg(long)]
    pub beta: Option<f64>,
    /// One or more of: sigmoid hinge ipo robust exo_pair nca_pair bco_pair sppo_hard aot aot_pair
    /// apo_zero apo_down discopop sigmoid_norm simpo orpo sft.
    #[arg(long, num_args = 1..)]
    pub loss_type: Option<Vec<String>>,
    /// Weights of the loss types, one per --loss_type.
    #[arg(long, num_args = 1.., value_delimiter = ',')]
    pub loss_weights: Option<Vec<f64>>,
    #[arg(long)]
    pub label_smoothing: Option<f64>,
    /// Weight of an SFT (NLL) term on the chosen response.
    #[arg(long)]
    pub rpo_alpha: Option<f64>,
    #[arg(long)]
    pub simpo_gamma: Option<f64>,
    #[arg(long)]
    pub discopop_tau: Option<f64>,
    /// Compute reference log-probs once before training and cache them next to the run.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub precompute_ref_log_probs: Option<bool>,
    /// Compute the prompt shared by a pair's chosen and rejected responses once, packing
    /// prompt + chosen + rejected in one row (default true; same results up to f32 rounding).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub prefix_sharing: Option<bool>,
    /// Put pairs of similar length in the same batch (less padding); the batches are
    /// shuffled. As transformers' `group_by_length`.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub group_by_length: Option<bool>,
    #[arg(long)]
    pub eval_steps: Option<usize>,
    #[arg(long)]
    pub save_steps: Option<usize>,
    /// Keep at most this many checkpoints (oldest removed).
    #[arg(long)]
    pub save_total_limit: Option<usize>,
    #[arg(long)]
    pub logging_steps: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// AUTO, fp32, bf16 or fp16 for the base weights (LoRA, optimizer and loss stay f32).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Keep only each decoder block's input during the forward pass and recompute the block in
    /// the backward pass: far less activation memory for about one more forward's time (CPU).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub gradient_checkpointing: Option<bool>,
    /// A checkpoint folder to resume from, or `latest` (the newest under --output_dir).
    #[arg(long)]
    pub resume_from_checkpoint: Option<String>,
    /// Skip rows that fail to parse (counted) instead of stopping at the first.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub skip_bad_rows: Option<bool>,
    /// Chat template override: chatml, llama3, mistral, raw, or a Jinja file.
    #[arg(long)]
    pub template: Option<String>,
    /// Evaluate on at most this many held-out pairs.
    #[arg(long)]
    pub max_eval_pairs: Option<usize>,
    /// Steps with a NaN/Inf loss or gradient are skipped; stop after this many in a row (default 5).
    #[arg(long)]
    pub max_nonfinite_steps: Option<usize>,
}

impl DpoOptions {
    /// Read a YAML recipe. Keys may use `_` or `-`; unknown keys are errors naming them.
    pub fn from_yaml_file(path: &Path) -> Result<DpoOptions> {
        let text = crate::error::read_to_string(path)?;
        let value: serde_yaml::Value =
            serde_yaml::from_str(&text).map_err(|e| Error::Msg(format!("{}: invalid YAML: {e}", path.display())))?;
        let value = match value {
            serde_yaml::Value::Mapping(m) => serde_yaml::Value::Mapping(
                m.into_iter()
                    .map(|(k, v)| match k {
                        serde_yaml::Value::String(s) => (serde_yaml::Value::String(s.replace('-', "_")), v),
                        other => (other, v),
                    })
                    .collect(),
            ),
            serde_yaml::Value::Null => serde_yaml::Value::Mapping(Default::default()),
            other => {
                let kind = match other {
                    serde_yaml::Value::Sequence(_) => "a list",
                    serde_yaml::Value::Tagged(_) => "a tagged value",
                    _ => "a single value",
                };
                return Err(Error::Msg(format!(
                    "{}: a recipe must be a mapping of keys to values, got {kind}",
                    path.display()
                )));
            }
        };
        // Single values are accepted where lists are expected (dataset: file.jsonl).
        let value = listify(
            value,
            &[
                "dataset",
                "val_dataset",
                "lora_target_modules",
                "loss_type",
                "loss_weights",
            ],
        );
        let opts: DpoOptions = serde_yaml::from_value(value.clone()).map_err(|e| {
            // Name the key at fault: check the keys one at a time.
            let key = match &value {
                serde_yaml::Value::Mapping(m) => m
                    .iter()
                    .find(|(k, v)| {
                        let mut one = serde_yaml::Mapping::new();
                        one.insert((*k).clone(), (*v).clone());
                        serde_yaml::from_value::<DpoOptions>(serde_yaml::Value::Mapping(one)).is_err()
                    })
                    .and_then(|(k, _)| k.as_str().map(str::to_string)),
                _ => None,
            };
            Error::Config {
                path: path.into(),
                key: key.unwrap_or_else(|| "recipe".into()),
                msg: e.to_string(),
            }
        })?;
        opts.check_values().map_err(|(key, msg)| Error::Config {
            path: path.into(),
            key,
            msg,
        })?;
        Ok(opts)
    }

    /// Check every value that is set, each on its own: numbers finite and in range, names known.
    /// Checks that depend on several keys together (loss parameters, weights per loss type) are
    /// left to [`DpoOptions::resolve`]. The error is (key, message).
    pub fn check_values(&self) -> std::result::Result<(), (String, String)> {
        let err = |key: &str, msg: String| Err((key.to_string(), msg));
        let floats = [
            ("split_dataset_ratio", self.split_dataset_ratio),
            ("num_train_epochs", self.num_train_epochs),
            ("lora_alpha", self.lora_alpha),
            ("lora_dropout_p", self.lora_dropout_p),
            ("learning_rate", self.learning_rate),
            ("weight_decay", self.weight_decay),
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
            ("adam_epsilon", self.adam_epsilon),
            ("max_grad_norm", self.max_grad_norm),
            ("warmup_ratio", self.warmup_ratio),
            ("beta", self.beta),
            ("label_smoothing", self.label_smoothing),
            ("rpo_alpha", self.rpo_alpha),
            ("simpo_gamma", self.simpo_gamma),
            ("discopop_tau", self.discopop_tau),
        ];
        for (key, v) in floats {
            if let Some(v) = v {
                if !v.is_finite() {
                    return err(key, format!("{v} is not a finite number"));
                }
            }
        }
        for w in self.loss_weights.iter().flatten() {
            if !w.is_finite() {
                return err("loss_weights", format!("{w} is not a finite number"));
            }
        }
        for (key, v, lo, hi) in [
            ("split_dataset_ratio", self.split_dataset_ratio, 0.0, 1.0),
            ("lora_dropout_p", self.lora_dropout_p, 0.0, 1.0),
            ("adam_beta1", self.adam_beta1, 0.0, 1.0),
            ("adam_beta2", self.adam_beta2, 0.0, 1.0),
            ("warmup_ratio", self.warmup_ratio, 0.0, 1.0),
        ] {
            if let Some(v) = v {
                if !(lo..hi).contains(&v) {
                    return err(key, format!("{v} is outside [{lo}, {hi})"));
                }
            }
        }
        if let Some(v) = self.label_smoothing {
            if !(0.0..=0.5).contains(&v) {
                return err("label_smoothing", format!("{v} is outside [0, 0.5]"));
            }
        }
        for (key, v) in [
            ("learning_rate", self.learning_rate),
            ("beta", self.beta),
            ("lora_alpha", self.lora_alpha),
            ("num_train_epochs", self.num_train_epochs),
        ] {
            if let Some(v) = v {
                if v <= 0.0 {
                    return err(key, format!("{v} must be positive"));
                }
            }
        }
        for (key, v) in [
            ("weight_decay", self.weight_decay),
            ("adam_epsilon", self.adam_epsilon),
            ("max_grad_norm", self.max_grad_norm),
        ] {
            if let Some(v) = v {
                if v < 0.0 {
                    return err(key, format!("{v} must not be negative"));
                }
            }
        }
        for (key, v) in [
            ("lora_rank", self.lora_rank),
            ("batch_size", self.batch_size),
            ("eval_batch_size", self.eval_batch_size),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps),
            ("eval_steps", self.eval_steps),
            ("save_steps", self.save_steps),
            ("logging_steps", self.logging_steps),
            ("max_steps", self.max_steps),
        ] {
            if v == Some(0) {
                return err(key, "must be at least 1".into());
            }
        }
        if let Some(t) = &self.sft_type {
            if !t.eq_ignore_ascii_case("lora") {
                return err(
                    "sft_type",
                    format!("{t:?} is not supported: lorafold trains LoRA adapters only (--sft_type lora)"),
                );
            }
        }
        if let Some(m) = &self.truncation_mode {
            if m != "keep_end" && m != "keep_start" {
                return err("truncation_mode", format!("{m:?} must be keep_end or keep_start"));
            }
        }
        if let Some(k) = &self.lr_scheduler_type {
            if let Err(e) = k.parse::<crate::train::schedule::SchedulerKind>() {
                return err("lr_scheduler_type", e.to_string());
            }
        }
        if let Some(d) = &self.dtype {
            if !DTYPES.contains(&d.to_ascii_lowercase().as_str()) {
                return err("dtype", format!("{d:?} must be AUTO, fp32, bf16 or fp16"));
            }
        }
        // Loss names only: their parameters are checked together in `resolve`.
        let names_only = crate::dpo::loss::LossParams {
            label_smoothing: 0.1,
            simpo_gamma: 0.5,
            discopop_tau: 0.05,
        };
        for name in loss_names(self.loss_type.as_deref().unwrap_or_default()) {
            if let Err(e) = crate::dpo::loss::LossKind::parse(&name, &names_only) {
                return err("loss_type", e.to_string());
            }
        }
        Ok(())
    }

    /// Overlay the keys set in `over` (the command line) onto `self`. The values of `over` are
    /// checked first (see [`DpoOptions::check_values`]).
    pub fn overlay(self, over: &DpoOptions) -> Result<DpoOptions> {
        over.check_values().map_err(|(key, msg)| Error::Config {
            path: PathBuf::from("command line"),
            key,
            msg,
        })?;
        let mut base = serde_json::to_value(&self).map_err(|e| Error::Msg(e.to_string()))?;
        let top = serde_json::to_value(over).map_err(|e| Error::Msg(e.to_string()))?;
        if let (Some(b), Some(t)) = (base.as_object_mut(), top.as_object()) {
            for (k, v) in t {
                if !v.is_null() {
                    b.insert(k.clone(), v.clone());
                }
            }
        }
        serde_json::from_value(base).map_err(|e| Error::Msg(e.to_string()))
    }
}

/// The `--dtype` spellings lorafold accepts (lower case).
const DTYPES: [&str; 9] = [
    "auto", "fp32", "f32", "float32", "bf16", "bfloat16", "fp16", "f16", "float16",
];

/// Loss type names as given: each value may hold several, comma-separated.
fn loss_names(values: &[String]) -> Vec<String> {
    values
        .iter()
        .flat_map(|s| s.split(','))
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

fn listify(v: serde_yaml::Value, keys: &[&str]) -> serde_yaml::Value {
    match v {
        serde_yaml::Value::Mapping(m) => serde_yaml::Value::Mapping(
            m.into_iter()
                .map(|(k, v)| {
                    let wrap = k.as_str().is_some_and(|s| keys.contains(&s)) && !v.is_sequence() && !v.is_null();
                    (k, if wrap { serde_yaml::Value::Sequence(vec![v]) } else { v })
                })
                .collect(),
        ),
        other => other,
    }
}

/// Normalise command-line flag spellings: `--max_length` → `--max-length` (values untouched).
pub fn normalize_flag_spelling(args: impl IntoIterator<Item = String>) -> Vec<String> {
    args.into_iter()
        .map(|a| {
            if let Some(rest) = a.strip_prefix("--") {
                let (name, value) = match rest.split_once('=') {
                    Some((n, v)) => (n, Some(v)),
                    None => (rest, None),
                };
                let name = name.replace('_', "-");
                match value {
                    Some(v) => format!("--{name}={v}"),
                    None => format!("--{name}"),
                }
            } else {
                a
            }
        })
        .collect()
}

/// Resolved, validated settings of a DPO run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    pub model: String,
    pub revision: Option<String>,
    pub dataset: Vec<String>,
    pub val_dataset: Vec<String>,
    pub split_dataset_ratio: f64,
    pub output_dir: PathBuf,
    pub num_train_epochs: f64,
    pub max_steps: Option<usize>,
    pub max_length: Option<usize>,
    pub max_prompt_length: Option<usize>,
    pub truncation_mode: String,
    pub lora_rank: usize,
    pub lora_alpha: f64,
    pub lora_dropout_p: f64,
    pub lora_target_modules: Vec<String>,
    pub use_rslora: bool,
    pub adapters: Option<PathBuf>,
    pub ref_adapters: Option<PathBuf>,
    pub batch_size: usize,
    pub eval_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub shuffle: bool,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub max_grad_norm: f64,
    pub lr_scheduler_type: String,
    pub warmup_ratio: f64,
    pub warmup_steps: usize,
    pub beta: f64,
    pub loss_type: Vec<String>,
    pub loss_weights: Vec<f64>,
    pub label_smoothing: f64,
    pub rpo_alpha: Option<f64>,
    pub simpo_gamma: f64,
    pub discopop_tau: f64,
    pub precompute_ref_log_probs: bool,
    pub prefix_sharing: bool,
    pub group_by_length: bool,
    pub eval_steps: usize,
    pub save_steps: usize,
    pub save_total_limit: Option<usize>,
    pub logging_steps: usize,
    pub seed: u64,
    pub dtype: String,
    pub gradient_checkpointing: bool,
    pub resume_from_checkpoint: Option<String>,
    pub skip_bad_rows: bool,
    pub template: Option<String>,
    pub max_eval_pairs: Option<usize>,
    pub max_nonfinite_steps: usize,
}

fn bad(key: &str, msg: impl Into<String>) -> Error {
    Error::Config {
        path: PathBuf::from("settings"),
        key: key.into(),
        msg: msg.into(),
    }
}

impl DpoOptions {
    /// Apply defaults and validate.
    pub fn resolve(self) -> Result<Settings> {
        self.check_values().map_err(|(key, msg)| bad(&key, msg))?;
        let o = self;
        let model = o
            .model
            .ok_or_else(|| bad("model", "is required (--model DIR or a hub id)"))?;
        if let Some(t) = &o.sft_type {
            if !t.eq_ignore_ascii_case("lora") {
                return Err(bad(
                    "sft_type",
                    format!("{t:?} is not supported: lorafold trains LoRA adapters only (--sft_type lora)"),
                ));
            }
        }
        if let Some(r) = &o.ref_model_type {
            if r != &model {
                return Err(bad(
                    "ref_model_type",
                    format!(
                        "{r:?} differs from the model {model:?}; the reference is always the model itself \
                         with adapters off (use --ref_adapters for an SFT adapter as reference)"
                    ),
                ));
            }
        }
        let dataset = o.dataset.unwrap_or_default();
        if dataset.is_empty() {
            return Err(bad("dataset", "at least one dataset is required"));
        }
        let truncation_mode = o.truncation_mode.unwrap_or_else(|| "keep_end".into());
        if truncation_mode != "keep_end" && truncation_mode != "keep_start" {
            return Err(bad(
                "truncation_mode",
                format!("{truncation_mode:?} must be keep_end or keep_start"),
            ));
        }
        let loss_type = o.loss_type.unwrap_or_else(|| vec!["sigmoid".into()]);
        let loss_type = loss_names(&loss_type);
        let params = crate::dpo::loss::LossParams {
            label_smoothing: o.label_smoothing.unwrap_or(0.0),
            simpo_gamma: o.simpo_gamma.unwrap_or(0.5),
            discopop_tau: o.discopop_tau.unwrap_or(0.05),
        };
        if loss_type.is_empty() {
            return Err(bad("loss_type", "no loss type given"));
        }
        for name in &loss_type {
            crate::dpo::loss::LossKind::parse(name, &params).map_err(|e| bad("loss_type", e.to_string()))?;
        }
        let loss_weights = o.loss_weights.unwrap_or_else(|| vec![1.0; loss_type.len()]);
        if loss_weights.len() != loss_type.len() {
            return Err(bad(
                "loss_weights",
                format!("{} weights for {} loss types", loss_weights.len(), loss_type.len()),
            ));
        }
        let lr_scheduler_type = o.lr_scheduler_type.unwrap_or_else(|| "cosine".into());
        lr_scheduler_type
            .parse::<crate::train::schedule::SchedulerKind>()
            .map_err(|e| bad("lr_scheduler_type", e))?;
        let dtype = o.dtype.unwrap_or_else(|| "auto".into()).to_ascii_lowercase();
        if !DTYPES.contains(&dtype.as_str()) {
            return Err(bad("dtype", format!("{dtype:?} must be AUTO, fp32, bf16 or fp16")));
        }
        let batch_size = o.batch_size.unwrap_or(1);
        let positive = |key: &str, v: usize| {
            if v == 0 {
                Err(bad(key, "must be at least 1"))
            } else {
                Ok(v)
            }
        };
        positive("batch_size", batch_size)?;
        let s = Settings {
            output_dir: o.output_dir.unwrap_or_else(|| default_output_dir(&model)),
            model,
            revision: o.revision,
            dataset,
            val_dataset: o.val_dataset.unwrap_or_default(),
            split_dataset_ratio: o.split_dataset_ratio.unwrap_or(0.0),
            num_train_epochs: o.num_train_epochs.unwrap_or(1.0),
            max_steps: o.max_steps,
            max_length: Some(o.max_length.unwrap_or(1024)),
            max_prompt_length: Some(o.max_prompt_length.unwrap_or(512)),
            truncation_mode,
            lora_rank: positive("lora_rank", o.lora_rank.unwrap_or(8))?,
            lora_alpha: o.lora_alpha.unwrap_or(32.0),
            lora_dropout_p: o.lora_dropout_p.unwrap_or(0.05),
            lora_target_modules: o.lora_target_modules.unwrap_or_else(|| vec!["ALL".into()]),
            use_rslora: o.use_rslora.unwrap_or(false),
            adapters: o.adapters,
            ref_adapters: o.ref_adapters,
            batch_size,
            eval_batch_size: positive("eval_batch_size", o.eval_batch_size.unwrap_or(batch_size))?,
            gradient_accumulation_steps: positive(
                "gradient_accumulation_steps",
                o.gradient_accumulation_steps.unwrap_or(1),
            )?,
            shuffle: o.shuffle.unwrap_or(true),
            learning_rate: o.learning_rate.unwrap_or(1e-4),
            weight_decay: o.weight_decay.unwrap_or(0.1),
            adam_beta1: o.adam_beta1.unwrap_or(0.9),
            adam_beta2: o.adam_beta2.unwrap_or(0.999),
            adam_epsilon: o.adam_epsilon.unwrap_or(1e-8),
            max_grad_norm: o.max_grad_norm.unwrap_or(1.0),
            lr_scheduler_type,
            warmup_ratio: o.warmup_ratio.unwrap_or(0.05),
            warmup_steps: o.warmup_steps.unwrap_or(0),
            beta: o.beta.unwrap_or(0.1),
            loss_type,
            loss_weights,
            label_smoothing: o.label_smoothing.unwrap_or(0.0),
            rpo_alpha: o.rpo_alpha,
            simpo_gamma: o.simpo_gamma.unwrap_or(0.5),
            discopop_tau: o.discopop_tau.unwrap_or(0.05),
            precompute_ref_log_probs: o.precompute_ref_log_probs.unwrap_or(false),
            prefix_sharing: o.prefix_sharing.unwrap_or(true),
            group_by_length: o.group_by_length.unwrap_or(false),
            eval_steps: positive("eval_steps", o.eval_steps.unwrap_or(500))?,
            save_steps: positive("save_steps", o.save_steps.unwrap_or(500))?,
            save_total_limit: Some(o.save_total_limit.unwrap_or(2)).filter(|&n| n > 0),
            logging_steps: positive("logging_steps", o.logging_steps.unwrap_or(5))?,
            seed: o.seed.unwrap_or(42),
            dtype,
            gradient_checkpointing: o.gradient_checkpointing.unwrap_or(false),
            resume_from_checkpoint: o.resume_from_checkpoint,
            skip_bad_rows: o.skip_bad_rows.unwrap_or(false),
            template: o.template,
            max_eval_pairs: o.max_eval_pairs,
            max_nonfinite_steps: o.max_nonfinite_steps.unwrap_or(5),
        };
        for (key, v, lo, hi) in [
            ("split_dataset_ratio", s.split_dataset_ratio, 0.0, 1.0),
            ("lora_dropout_p", s.lora_dropout_p, 0.0, 1.0),
            ("adam_beta1", s.adam_beta1, 0.0, 1.0),
            ("adam_beta2", s.adam_beta2, 0.0, 1.0),
            ("warmup_ratio", s.warmup_ratio, 0.0, 1.0),
            ("label_smoothing", s.label_smoothing, 0.0, 0.5),
        ] {
            if !(lo..hi).contains(&v) && !(key == "label_smoothing" && v == 0.5) {
                return Err(bad(key, format!("{v} is outside [{lo}, {hi})")));
            }
        }
        for (key, v) in [
            ("learning_rate", s.learning_rate),
            ("beta", s.beta),
            ("lora_alpha", s.lora_alpha),
        ] {
            if !(v > 0.0 && v.is_finite()) {
                return Err(bad(key, format!("{v} must be positive")));
            }
        }
        if s.max_steps == Some(0) || !(s.num_train_epochs > 0.0) {
            return Err(bad("max_steps", "training needs at least one step"));
        }
        Ok(s)
    }
}

fn default_output_dir(model: &str) -> PathBuf {
    let base = model.trim_end_matches('/').rsplit('/').next().unwrap_or("model");
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    PathBuf::from("adapters").join(format!("{base}-dpo-{}", utc_stamp(secs)))
}

/// `YYYYmmdd-HHMMSS` in UTC.
pub fn utc_stamp(secs: u64) -> String {
    let days = secs / 86400;
    let rem = secs % 86400;
    // Civil-from-days (proleptic Gregorian).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp() {
        assert_eq!(utc_stamp(0), "19700101-000000");
        assert_eq!(utc_stamp(1_700_000_000), "20231114-221320");
    }

    #[test]
    fn flag_spellings() {
        let v = normalize_flag_spelling(
            ["lorafold", "--max_length", "5", "--lora_target_modules=ALL", "x_y"].map(String::from),
        );
        assert_eq!(v, ["lorafold", "--max-length", "5", "--lora-target-modules=ALL", "x_y"]);
    }
}
