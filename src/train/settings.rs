//! The resolved, validated settings of a DPO run or an evaluation: real types, parsed once by
//! `recipe` from a YAML recipe and the command line. Written next to a run as recipe.yaml.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::data::tokenize::TruncationMode;
use crate::dpo::loss::LossKind;
use crate::model::load::DtypeChoice;
use crate::train::schedule::SchedulerKind;

/// Resolved, validated settings of a DPO run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    pub model: String,
    pub revision: Option<String>,
    pub dataset: Vec<String>,
    pub val_dataset: Vec<String>,
    pub split_dataset_ratio: f64,
    pub output_dir: PathBuf,
    /// Train into a new `v<N>-<time>` subfolder of `output_dir` (ms-swift's `--add_version`):
    /// `true` always, `false` never (a folder holding an adapter is refused), unset: when
    /// `output_dir` already holds a trained adapter (a rerun), unless `overwrite_output_dir`.
    #[serde(default)]
    pub add_version: Option<bool>,
    /// Train into an `output_dir` that holds a finished adapter, replacing it.
    #[serde(default)]
    pub overwrite_output_dir: bool,
    pub num_train_epochs: f64,
    pub max_steps: Option<usize>,
    pub max_length: Option<usize>,
    pub max_prompt_length: Option<usize>,
    pub truncation_mode: TruncationMode,
    pub lora_rank: usize,
    pub lora_alpha: f64,
    pub lora_dropout_p: f64,
    pub lora_target_modules: Vec<String>,
    pub use_rslora: bool,
    /// DoRA, module selection beyond target names, and LoRA+.
    #[serde(flatten)]
    pub lora_extra: LoraExtra,
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
    pub lr_scheduler_type: SchedulerKind,
    pub warmup_ratio: f64,
    pub warmup_steps: usize,
    pub beta: f64,
    pub loss_type: Vec<String>,
    /// `loss_type` parsed, with the loss parameters; kept out of the written recipe, which
    /// holds the names.
    #[serde(skip)]
    pub losses: Vec<LossKind>,
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
    /// When to evaluate and when to save a checkpoint (transformers' `IntervalStrategy`).
    #[serde(default)]
    pub eval_strategy: Interval,
    #[serde(default)]
    pub save_strategy: Interval,
    /// Also write TensorBoard event files under `<output_dir>/runs` (`--report_to tensorboard`).
    #[serde(default)]
    pub tensorboard: bool,
    pub save_total_limit: Option<usize>,
    pub logging_steps: usize,
    pub seed: u64,
    pub dtype: DtypeChoice,
    pub gradient_checkpointing: bool,
    pub resume_from_checkpoint: Option<String>,
    pub skip_bad_rows: bool,
    pub template: Option<String>,
    /// Fold a system message into the first user message (`--fold_system`).
    pub fold_system: bool,
    pub max_eval_pairs: Option<usize>,
    pub max_nonfinite_steps: usize,
}

/// PEFT's LoRA options beyond rank, alpha, dropout and targets.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoraExtra {
    pub use_dora: bool,
    pub lora_target_regex: Option<String>,
    pub exclude_modules: Option<Vec<String>>,
    pub layers_to_transform: Option<Vec<usize>>,
    pub layers_pattern: Option<String>,
    #[serde(default)]
    pub rank_pattern: std::collections::BTreeMap<String, usize>,
    #[serde(default)]
    pub alpha_pattern: std::collections::BTreeMap<String, f64>,
    /// LoRA+ ratio of B's learning rate to A's (`None`: plain AdamW).
    pub lorap_lr_ratio: Option<f64>,
    /// PEFT's init_lora_weights (`None`: true).
    pub init_lora_weights: Option<String>,
    /// Also write a PiSSA / OLoRA adapter unconverted, under `<output_dir>/unconverted`.
    #[serde(default)]
    pub save_unconverted: bool,
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub ensure_weight_tying: bool,
    pub trainable_token_indices: Option<Vec<u32>>,
}

/// transformers' `IntervalStrategy`: every N steps, at the end of each epoch, or never.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Interval {
    #[default]
    Steps,
    Epoch,
    No,
}

impl std::str::FromStr for Interval {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "steps" => Ok(Interval::Steps),
            "epoch" => Ok(Interval::Epoch),
            "no" => Ok(Interval::No),
            _ => Err(format!("{s:?} must be steps, epoch or no")),
        }
    }
}

impl Interval {
    /// Every how many optimizer steps, given `every` for `steps` and the steps of one epoch;
    /// `None` for never.
    pub fn period(self, every: usize, steps_per_epoch: usize) -> Option<usize> {
        match self {
            Interval::Steps => Some(every.max(1)),
            Interval::Epoch => Some(steps_per_epoch.max(1)),
            Interval::No => None,
        }
    }
}
