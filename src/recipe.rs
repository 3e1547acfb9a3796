//! DPO settings: command-line flags and YAML recipes share one set of keys (ms-swift's names).
//! A recipe is read first, flags given on the command line override it, and the result is
//! resolved into one validated [`Settings`].

use std::path::{Path, PathBuf};

pub use crate::cli::{normalize_flag_spelling, DpoOptions};
pub use crate::data::template::utc_stamp;
use crate::data::tokenize::TruncationMode;
use crate::dpo::loss::{LossKind, LossParams};
use crate::error::{Error, Result};
use crate::model::load::DtypeChoice;
use crate::train::schedule::SchedulerKind;
pub use crate::train::settings::Settings;
use crate::train::settings::{Interval, LoraExtra};

impl DpoOptions {
    /// Read a YAML recipe. Keys may use `_` or `-`; unknown keys are errors naming them.
    pub fn from_yaml_file(path: &Path) -> Result<DpoOptions> {
        let text = crate::error::read_to_string(path)?;
        let value: serde_yaml::Value = serde_yaml::from_str(&text).map_err(|e| Error::Recipe {
            path: path.into(),
            msg: format!("invalid YAML: {e}"),
        })?;
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
                return Err(Error::Recipe {
                    path: path.into(),
                    msg: format!("a recipe must be a mapping of keys to values, got {kind}"),
                });
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
    /// ms-swift flags that change nothing here, one note each, to print once before a run.
    pub fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if let Some(t) = &self.tuner_backend {
            notes.push(format!(
                "note: --tuner_backend {t} is accepted; lorafold writes PEFT adapters, which peft and ms-swift both load"
            ));
        }
        if let Some(lr) = self.loraplus_lr_embedding {
            notes.push(format!(
                "note: --loraplus_lr_embedding {lr} is ignored; lorafold puts no adapter on embedding layers"
            ));
        }
        if self.check_model_is_latest.is_some() {
            notes.push("note: --check_model_is_latest is ignored; lorafold uses the model files it finds".into());
        }
        for (flag, v) in [
            ("dataloader_num_workers", self.dataloader_num_workers),
            ("dataset_num_proc", self.dataset_num_proc),
        ] {
            if let Some(n) = v {
                notes.push(format!(
                    "note: --{flag} {n} is ignored; lorafold reads and tokenises the data in-process on every core"
                ));
            }
        }
        if let Some(c) = &self.check_dataset_strategy {
            notes.push(format!(
                "note: --check_dataset_strategy {c} is accepted; lorafold checks every row as it reads it and \
                 stops at a bad one, naming file and line (--skip_bad_rows skips them instead)"
            ));
        }
        notes
    }

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
            "lorap_lr_ratio" => self.lorap_lr_ratio,
            "loraplus_lr_embedding" => self.loraplus_lr_embedding,
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
        for (key, v) in [
            ("eval_strategy", &self.eval_strategy),
            ("save_strategy", &self.save_strategy),
        ] {
            if let Some(v) = v {
                v.parse::<Interval>().map_err(|msg| (key.to_string(), msg))?;
            }
        }
        if let Some(to) = &self.report_to {
            report_to_tensorboard(to).map_err(|msg| ("report_to".to_string(), msg))?;
        }
        if let Some(t) = &self.rlhf_type {
            rlhf_loss(t, self.loss_type.as_deref()).map_err(|msg| ("rlhf_type".to_string(), msg))?;
        }
        if let Some(t) = &self.tuner_backend {
            if !matches!(t.as_str(), "peft" | "swift") {
                return err("tuner_backend", format!("{t:?} must be peft or swift"));
            }
        }
        if let Some(c) = &self.check_dataset_strategy {
            match c.as_str() {
                "none" | "warning" | "error" => {}
                "discard" => {
                    return err(
                        "check_dataset_strategy",
                        "discard is not supported: pass --skip_bad_rows true to skip rows that do not parse".into(),
                    )
                }
                _ => {
                    return err(
                        "check_dataset_strategy",
                        format!("{c:?} must be none, warning, error or discard"),
                    )
                }
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
            m.parse::<TruncationMode>()
                .map_err(|msg| ("truncation_mode".to_string(), msg))?;
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
const FLOAT_RULES: [(&str, Rule); 18] = [
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
    ("lorap_lr_ratio", Rule::Positive),
    ("loraplus_lr_embedding", Rule::Positive),
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
        let lora_extra = self.lora_extra();
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
            truncation_mode: named(o.truncation_mode.as_deref(), str::parse)?,
            lora_rank: o.lora_rank.unwrap_or(8),
            lora_alpha: o.lora_alpha.unwrap_or(32.0),
            lora_dropout_p: o.lora_dropout_p.unwrap_or(0.05),
            lora_target_modules: o.lora_target_modules.unwrap_or_else(|| vec!["ALL".into()]),
            use_rslora: o.use_rslora.unwrap_or(false),
            lora_extra,
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
            eval_strategy: named(o.eval_strategy.as_deref(), str::parse)?,
            add_version: o.add_version,
            overwrite_output_dir: o.overwrite_output_dir.unwrap_or(false),
            tensorboard: match &o.report_to {
                Some(to) => report_to_tensorboard(to).map_err(|msg| bad("report_to", msg))?,
                None => false,
            },
            save_strategy: named(o.save_strategy.as_deref(), str::parse)?,
            save_total_limit: Some(o.save_total_limit.unwrap_or(2)).filter(|&n| n > 0),
            logging_steps: o.logging_steps.unwrap_or(5),
            seed: o.seed.unwrap_or(42),
            dtype: named(o.dtype.as_deref(), str::parse)?,
            gradient_checkpointing: o.gradient_checkpointing.unwrap_or(false),
            resume_from_checkpoint: o.resume_from_checkpoint,
            skip_bad_rows: o.skip_bad_rows.unwrap_or(false),
            template: o.template,
            fold_system: o.fold_system.unwrap_or(false),
            max_eval_pairs: o.max_eval_pairs,
            max_nonfinite_steps: o.max_nonfinite_steps.unwrap_or(5),
        })
    }

    /// DoRA, module selection and LoRA+ settings.
    fn lora_extra(&self) -> LoraExtra {
        LoraExtra {
            use_dora: self.use_dora.unwrap_or(false),
            lora_target_regex: self.lora_target_regex.clone(),
            exclude_modules: self.exclude_modules.clone(),
            layers_to_transform: self.layers_to_transform.clone(),
            layers_pattern: self.layers_pattern.clone(),
            rank_pattern: self.rank_pattern.clone().unwrap_or_default(),
            alpha_pattern: self.alpha_pattern.clone().unwrap_or_default(),
            lorap_lr_ratio: self.lorap_lr_ratio,
            init_lora_weights: self.init_lora_weights.clone(),
            save_unconverted: self.save_unconverted.unwrap_or(false),
            modules_to_save: self.modules_to_save.clone(),
            ensure_weight_tying: self.ensure_weight_tying.unwrap_or(false),
            trainable_token_indices: self.trainable_token_indices.clone(),
        }
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
        let given = match &self.rlhf_type {
            Some(t) => rlhf_loss(t, self.loss_type.as_deref()).map_err(|msg| bad("rlhf_type", msg))?,
            None => self.loss_type.clone(),
        };
        let names = loss_names(given.as_deref().unwrap_or(&["sigmoid".to_string()]));
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

/// Whether `--report_to` asks for TensorBoard event files; trackers lorafold does not have are
/// refused.
fn report_to_tensorboard(values: &[String]) -> std::result::Result<bool, String> {
    let mut on = false;
    for v in values.iter().flat_map(|v| v.split(',')).map(str::trim) {
        match v {
            "tensorboard" | "all" => on = true,
            "none" | "" => {}
            other => {
                return Err(format!(
                    "{other:?} is not supported: lorafold logs to metrics.jsonl and, with tensorboard, \
                     TensorBoard event files (it makes no network calls while training)"
                ))
            }
        }
    }
    Ok(on)
}

/// The loss types an ms-swift `--rlhf_type` stands for, given the `--loss_type` values (if any):
/// dpo keeps them; orpo and simpo are those losses (and refuse another loss type).
fn rlhf_loss(rlhf_type: &str, loss_type: Option<&[String]>) -> std::result::Result<Option<Vec<String>>, String> {
    match rlhf_type {
        "dpo" => Ok(loss_type.map(<[String]>::to_vec)),
        "orpo" | "simpo" => match loss_type {
            Some(l) if loss_names(l) != [rlhf_type] => Err(format!(
                "{rlhf_type} trains with loss_type {rlhf_type}, but --loss_type {} was given",
                l.join(",")
            )),
            _ => Ok(Some(vec![rlhf_type.to_string()])),
        },
        "kto" | "cpo" | "ppo" | "grpo" | "rm" | "gkd" => Err(format!(
            "{rlhf_type:?} is not supported: lorafold trains preference pairs with DPO and its variants \
             (--rlhf_type dpo, orpo or simpo; other DPO losses with --loss_type)"
        )),
        _ => Err(format!("{rlhf_type:?} must be dpo, orpo or simpo")),
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
