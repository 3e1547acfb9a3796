//! DPO settings: command-line flags and YAML recipes share one set of keys (ms-swift's names).
//! A recipe is read first, flags given on the command line override it, and the result is
//! resolved into one validated [`Settings`].

use std::path::{Path, PathBuf};

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::data::tokenize::TruncationMode;
use crate::dpo::loss::{LossKind, LossParams};
use crate::error::{Error, Result};
use crate::model::load::DtypeChoice;
use crate::train::schedule::SchedulerKind;
pub use crate::train::settings::Settings;

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

    /// Check every value that is set, each on its own: numbers finite and in range (the table
    /// [`FLOAT_RULES`]), counts at least 1, names known. Checks that depend on several keys
    /// together (loss parameters, weights per loss type) are left to [`DpoOptions::resolve`].
    /// The error is (key, message).
    pub fn check_values(&self) -> std::result::Result<(), (String, String)> {
        let err = |key: &str, msg: String| Err((key.to_string(), msg));
        for (key, rule) in FLOAT_RULES {
            if let Some(v) = self.float(key) {
                rule.check(v).map_err(|msg| (key.to_string(), msg))?;
            }
        }
        for w in self.loss_weights.iter().flatten() {
            Rule::Finite
                .check(*w)
                .map_err(|msg| ("loss_weights".to_string(), msg))?;
        }
        for (key, v) in self.counts() {
            if v == Some(0) {
                return err(key, "must be at least 1".into());
            }
        }
        self.check_names()
    }

    /// The value of the float key `key` of [`FLOAT_RULES`].
    fn float(&self, key: &str) -> Option<f64> {
        match key {
            "split_dataset_ratio" => self.split_dataset_ratio,
            "num_train_epochs" => self.num_train_epochs,
            "lora_alpha" => self.lora_alpha,
            "lora_dropout_p" => self.lora_dropout_p,
            "learning_rate" => self.learning_rate,
            "weight_decay" => self.weight_decay,
            "adam_beta1" => self.adam_beta1,
            "adam_beta2" => self.adam_beta2,
            "adam_epsilon" => self.adam_epsilon,
            "max_grad_norm" => self.max_grad_norm,
            "warmup_ratio" => self.warmup_ratio,
            "beta" => self.beta,
            "label_smoothing" => self.label_smoothing,
            "rpo_alpha" => self.rpo_alpha,
            "simpo_gamma" => self.simpo_gamma,
            "discopop_tau" => self.discopop_tau,
            _ => None,
        }
    }

    /// The count keys, each of which must be at least 1 when set.
    fn counts(&self) -> [(&'static str, Option<usize>); 8] {
        [
            ("lora_rank", self.lora_rank),
            ("batch_size", self.batch_size),
            ("eval_batch_size", self.eval_batch_size),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps),
            ("eval_steps", self.eval_steps),
            ("save_steps", self.save_steps),
            ("logging_steps", self.logging_steps),
            ("max_steps", self.max_steps),
        ]
    }

    /// Named values: sft_type, truncation_mode, lr_scheduler_type, dtype and loss names.
    fn check_names(&self) -> std::result::Result<(), (String, String)> {
        let err = |key: &str, msg: String| Err((key.to_string(), msg));
        if let Some(t) = &self.sft_type {
            if !t.eq_ignore_ascii_case("lora") {
                return err(
                    "sft_type",
                    format!("{t:?} is not supported: lorafold trains LoRA adapters only (--sft_type lora)"),
                );
            }
        }
        if let Some(m) = &self.truncation_mode {
            parse_truncation_mode(m).map_err(|msg| ("truncation_mode".to_string(), msg))?;
        }
        if let Some(k) = &self.lr_scheduler_type {
            k.parse::<SchedulerKind>()
                .map_err(|msg| ("lr_scheduler_type".to_string(), msg))?;
        }
        if let Some(d) = &self.dtype {
            d.parse::<DtypeChoice>().map_err(|msg| ("dtype".to_string(), msg))?;
        }
        // Loss names only: their parameters are checked together in `resolve`.
        let names_only = LossParams {
            label_smoothing: 0.1,
            simpo_gamma: 0.5,
            discopop_tau: 0.05,
        };
        for name in loss_names(self.loss_type.as_deref().unwrap_or_default()) {
            if let Err(e) = LossKind::parse(&name, &names_only) {
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

/// What a float setting must satisfy, besides being finite.
#[derive(Debug, Clone, Copy)]
enum Rule {
    Finite,
    /// In [0, 1).
    Unit,
    /// In [0, 0.5] (label smoothing).
    UpToHalf,
    Positive,
    NonNegative,
}

impl Rule {
    fn check(self, v: f64) -> std::result::Result<(), String> {
        if !v.is_finite() {
            return Err(format!("{v} is not a finite number"));
        }
        let ok = match self {
            Rule::Finite => true,
            Rule::Unit => (0.0..1.0).contains(&v),
            Rule::UpToHalf => (0.0..=0.5).contains(&v),
            Rule::Positive => v > 0.0,
            Rule::NonNegative => v >= 0.0,
        };
        match (ok, self) {
            (true, _) => Ok(()),
            (false, Rule::Unit) => Err(format!("{v} is outside [0, 1)")),
            (false, Rule::UpToHalf) => Err(format!("{v} is outside [0, 0.5]")),
            (false, Rule::Positive) => Err(format!("{v} must be positive")),
            (false, _) => Err(format!("{v} must not be negative")),
        }
    }
}

/// The one table of ranges for float settings: recipes, flags and resolved values are all
/// checked against it.
const FLOAT_RULES: [(&str, Rule); 16] = [
    ("split_dataset_ratio", Rule::Unit),
    ("num_train_epochs", Rule::Positive),
    ("lora_alpha", Rule::Positive),
    ("lora_dropout_p", Rule::Unit),
    ("learning_rate", Rule::Positive),
    ("weight_decay", Rule::NonNegative),
    ("adam_beta1", Rule::Unit),
    ("adam_beta2", Rule::Unit),
    ("adam_epsilon", Rule::NonNegative),
    ("max_grad_norm", Rule::NonNegative),
    ("warmup_ratio", Rule::Unit),
    ("beta", Rule::Positive),
    ("label_smoothing", Rule::UpToHalf),
    ("rpo_alpha", Rule::Finite),
    ("simpo_gamma", Rule::Finite),
    ("discopop_tau", Rule::Finite),
];

/// `--truncation_mode`, with the message the recipe checks have always given.
fn parse_truncation_mode(m: &str) -> std::result::Result<TruncationMode, String> {
    match m {
        "keep_end" => Ok(TruncationMode::KeepEnd),
        "keep_start" => Ok(TruncationMode::KeepStart),
        _ => Err(format!("{m:?} must be keep_end or keep_start")),
    }
}

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

fn bad(key: &str, msg: impl Into<String>) -> Error {
    Error::Config {
        path: PathBuf::from("settings"),
        key: key.into(),
        msg: msg.into(),
    }
}

impl DpoOptions {
    /// Apply defaults and validate: every value on its own (see [`DpoOptions::check_values`]),
    /// then the keys that only make sense together.
    pub fn resolve(self) -> Result<Settings> {
        self.check_values().map_err(|(key, msg)| bad(&key, msg))?;
        let model = self.resolve_model()?;
        let dataset = self.dataset.clone().unwrap_or_default();
        if dataset.is_empty() {
            return Err(bad("dataset", "at least one dataset is required"));
        }
        let (loss_type, losses, loss_weights) = self.resolve_losses()?;
        let o = self;
        let batch_size = o.batch_size.unwrap_or(1);
        // Counts the user set were checked above; these are the defaults filled in.
        Ok(Settings {
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
            truncation_mode: named(o.truncation_mode.as_deref(), parse_truncation_mode)?,
            lora_rank: o.lora_rank.unwrap_or(8),
            lora_alpha: o.lora_alpha.unwrap_or(32.0),
            lora_dropout_p: o.lora_dropout_p.unwrap_or(0.05),
            lora_target_modules: o.lora_target_modules.unwrap_or_else(|| vec!["ALL".into()]),
            use_rslora: o.use_rslora.unwrap_or(false),
            adapters: o.adapters,
            ref_adapters: o.ref_adapters,
            batch_size,
            eval_batch_size: o.eval_batch_size.unwrap_or(batch_size),
            gradient_accumulation_steps: o.gradient_accumulation_steps.unwrap_or(1),
            shuffle: o.shuffle.unwrap_or(true),
            learning_rate: o.learning_rate.unwrap_or(1e-4),
            weight_decay: o.weight_decay.unwrap_or(0.1),
            adam_beta1: o.adam_beta1.unwrap_or(0.9),
            adam_beta2: o.adam_beta2.unwrap_or(0.999),
            adam_epsilon: o.adam_epsilon.unwrap_or(1e-8),
            max_grad_norm: o.max_grad_norm.unwrap_or(1.0),
            lr_scheduler_type: named(o.lr_scheduler_type.as_deref(), str::parse)?,
            warmup_ratio: o.warmup_ratio.unwrap_or(0.05),
            warmup_steps: o.warmup_steps.unwrap_or(0),
            beta: o.beta.unwrap_or(0.1),
            loss_type,
            losses,
            loss_weights,
            label_smoothing: o.label_smoothing.unwrap_or(0.0),
            rpo_alpha: o.rpo_alpha,
            simpo_gamma: o.simpo_gamma.unwrap_or(0.5),
            discopop_tau: o.discopop_tau.unwrap_or(0.05),
            precompute_ref_log_probs: o.precompute_ref_log_probs.unwrap_or(false),
            prefix_sharing: o.prefix_sharing.unwrap_or(true),
            group_by_length: o.group_by_length.unwrap_or(false),
            eval_steps: o.eval_steps.unwrap_or(500),
            save_steps: o.save_steps.unwrap_or(500),
            save_total_limit: Some(o.save_total_limit.unwrap_or(2)).filter(|&n| n > 0),
            logging_steps: o.logging_steps.unwrap_or(5),
            seed: o.seed.unwrap_or(42),
            dtype: named(o.dtype.as_deref(), str::parse)?,
            gradient_checkpointing: o.gradient_checkpointing.unwrap_or(false),
            resume_from_checkpoint: o.resume_from_checkpoint,
            skip_bad_rows: o.skip_bad_rows.unwrap_or(false),
            template: o.template,
            max_eval_pairs: o.max_eval_pairs,
            max_nonfinite_steps: o.max_nonfinite_steps.unwrap_or(5),
        })
    }

    /// The model, which is required; a reference model must be the model itself.
    fn resolve_model(&self) -> Result<String> {
        let model = self
            .model
            .clone()
            .ok_or_else(|| bad("model", "is required (--model DIR or a hub id)"))?;
        if let Some(r) = &self.ref_model_type {
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
        Ok(model)
    }

    /// Loss names, the losses they parse to with their parameters, and one weight per loss.
    fn resolve_losses(&self) -> Result<(Vec<String>, Vec<LossKind>, Vec<f64>)> {
        let names = loss_names(self.loss_type.as_deref().unwrap_or(&["sigmoid".to_string()]));
        if names.is_empty() {
            return Err(bad("loss_type", "no loss type given"));
        }
        let params = LossParams {
            label_smoothing: self.label_smoothing.unwrap_or(0.0),
            simpo_gamma: self.simpo_gamma.unwrap_or(0.5),
            discopop_tau: self.discopop_tau.unwrap_or(0.05),
        };
        let losses = names
            .iter()
            .map(|name| LossKind::parse(name, &params).map_err(|e| bad("loss_type", e.to_string())))
            .collect::<Result<Vec<_>>>()?;
        let weights = self.loss_weights.clone().unwrap_or_else(|| vec![1.0; names.len()]);
        if weights.len() != names.len() {
            return Err(bad(
                "loss_weights",
                format!("{} weights for {} loss types", weights.len(), names.len()),
            ));
        }
        Ok((names, losses, weights))
    }
}

/// A named setting parsed into its type, or its default when unset.
fn named<T: Default>(value: Option<&str>, parse: impl Fn(&str) -> std::result::Result<T, String>) -> Result<T> {
    match value {
        None => Ok(T::default()),
        // Already checked by `check_values`, so an error here is unreachable from user input.
        Some(v) => parse(v).map_err(Error::Msg),
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
    crate::data::template::strftime("%Y%m%d-%H%M%S", secs as i64)
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
