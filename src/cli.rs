//! Command-line definitions. Flags use ms-swift's names; each accepts both the underscore and the
//! dash spelling (`--max_length` and `--max-length`).

use std::path::{Path, PathBuf};

use clap::{ArgAction, Args, Parser, Subcommand};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::merge::combine::{Combination, CombineOptions, SignMethod};
use crate::merge::MergePlan;

#[derive(Debug, Parser)]
#[command(
    name = "lorafold",
    version,
    about = "Train LoRA adapters with DPO, merge them, and run inference",
    after_help = "Every flag accepts both spellings: --max_length and --max-length."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a LoRA adapter with DPO (or a variant).
    Dpo(DpoArgs),
    /// ms-swift 3.x's name for the same: `lorafold rlhf --rlhf_type dpo ...` runs `lorafold dpo`.
    Rlhf(DpoArgs),
    /// Score preference pairs: loss, rewards, accuracy.
    Eval(EvalArgs),
    /// Merge adapters into the base weights, or combine several adapters.
    Merge(MergeArgs),
    /// Generate text with a model, optionally with an adapter.
    Infer(InferArgs),
    /// Benchmark a DPO step on a fixed ~30M-parameter model: tokens/s, peak memory, matmul peak.
    Bench(BenchArgs),
    /// Print a model's architecture and sizes, and check an adapter against it.
    Inspect(InspectArgs),
}

#[derive(Debug, Args)]
pub struct ModelArgs {
    /// Model: a local folder laid out like a hub snapshot, or a hub id such as
    /// Qwen/Qwen2.5-0.5B-Instruct (resolved through HF_HOME; HF_ENDPOINT and HF_HUB_OFFLINE apply).
    #[arg(long, alias = "model-id-or-path")]
    pub model: String,
    /// Hub revision (branch, tag or commit).
    #[arg(long)]
    pub revision: Option<String>,
}

#[derive(Debug, Args)]
pub struct DpoArgs {
    /// YAML recipe (see recipes/); flags given on the command line override its keys.
    #[arg(long)]
    pub recipe: Option<PathBuf>,
    /// Only print the resolved settings as YAML, do not train.
    #[arg(long)]
    pub print_settings: bool,
    #[command(flatten)]
    pub options: DpoOptions,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// YAML recipe; flags override its keys. Training keys are ignored.
    #[arg(long)]
    pub recipe: Option<PathBuf>,
    /// Print one JSON object with TRL's metric names instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Write per-pair log-probs and rewards to this JSONL file.
    #[arg(long)]
    pub per_pair: Option<PathBuf>,
    #[command(flatten)]
    pub options: DpoOptions,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// An adapter folder to load and check against the model.
    #[arg(long)]
    pub adapters: Option<PathBuf>,
}

/// Every key of `lorafold dpo`, as a flag (both `--max_length` and `--max-length` work) and as a
/// recipe key. Unset keys take lorafold's defaults (see `lorafold dpo --help`).
#[derive(Debug, Clone, Default, Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpoOptions {
    /// Model: local folder or hub id (aliases: --model_id_or_path, --model_type).
    #[arg(long, alias = "model-id-or-path", alias = "model-type")]
    #[serde(alias = "model_id_or_path", alias = "model_type")]
    pub model: Option<String>,
    /// Hub revision of the model (alias: --model_revision, ms-swift 2.x).
    #[arg(long, alias = "model-revision")]
    #[serde(alias = "model_revision")]
    pub revision: Option<String>,
    /// Reference model; must be the same as the model (the reference is the base with adapters off).
    #[arg(long)]
    pub ref_model_type: Option<String>,
    /// Training type; only `lora` is supported (alias: --train_type, ms-swift 3.x).
    #[arg(long, alias = "train-type")]
    #[serde(alias = "train_type")]
    pub sft_type: Option<String>,
    /// ms-swift 3.x's `rlhf --rlhf_type`: dpo (the default), or orpo / simpo, which pick that
    /// loss type. Other kinds (kto, cpo, ppo, grpo, rm, gkd) are refused.
    #[arg(long)]
    pub rlhf_type: Option<String>,
    /// Training data: JSON, JSONL or Parquet files, or hub dataset ids (org/name[:subset]).
    #[arg(long, num_args = 1..)]
    pub dataset: Option<Vec<String>>,
    /// Held-out evaluation data (same forms as --dataset).
    #[arg(long, num_args = 1..)]
    pub val_dataset: Option<Vec<String>>,
    /// Fraction of the training pairs held out for evaluation when no --val_dataset is given
    /// (alias: ms-swift 2's --dataset_test_ratio).
    #[arg(long, alias = "dataset-test-ratio", alias = "dataset_test_ratio")]
    #[serde(alias = "dataset_test_ratio")]
    pub split_dataset_ratio: Option<f64>,
    /// Output folder (default: adapters/<model>-dpo-<time>).
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Passes over the training pairs [default: 1]; --max_steps overrides it.
    #[arg(long)]
    pub num_train_epochs: Option<f64>,
    /// Total optimizer steps; overrides --num_train_epochs.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Longest prompt + response in tokens.
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Longest prompt in tokens, cut per --truncation_mode [default: 512].
    #[arg(long)]
    pub max_prompt_length: Option<usize>,
    /// keep_end (default: keep the end of a long prompt) or keep_start.
    #[arg(long)]
    pub truncation_mode: Option<String>,
    /// LoRA rank r [default: 8].
    #[arg(long)]
    pub lora_rank: Option<usize>,
    /// LoRA alpha; the update is scaled by alpha / r (alpha / √r with --use_rslora) [default: 32].
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// LoRA dropout (alias: --lora_dropout).
    #[arg(long, alias = "lora-dropout")]
    #[serde(alias = "lora_dropout")]
    pub lora_dropout_p: Option<f64>,
    /// ALL / all-linear, a list of module names, or a regex over module paths (alias:
    /// --target_modules, ms-swift 3.x).
    #[arg(long, alias = "target-modules", num_args = 1..)]
    #[serde(alias = "target_modules")]
    pub lora_target_modules: Option<Vec<String>>,
    /// Rank-stabilised LoRA: scale by alpha / √r [default: false].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub use_rslora: Option<bool>,
    /// DoRA: a trained magnitude per output row on top of LoRA's direction (PEFT's use_dora)
    /// [default: false].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub use_dora: Option<bool>,
    /// A regex over module paths (full match) choosing the adapted layers; overrides
    /// --lora_target_modules (alias: --target_regex, ms-swift 3.x).
    #[arg(long, alias = "target-regex")]
    #[serde(alias = "target_regex")]
    pub lora_target_regex: Option<String>,
    /// Layers left without an adapter: module names (matched as path suffixes) or one regex over
    /// module paths (PEFT's exclude_modules).
    #[arg(long, num_args = 1..)]
    pub exclude_modules: Option<Vec<String>>,
    /// Adapt only these decoder layers, by index (PEFT's layers_to_transform).
    #[arg(long, num_args = 1..)]
    pub layers_to_transform: Option<Vec<usize>>,
    /// The name of the layer list in module paths whose index --layers_to_transform reads
    /// [default: the first numbered name, `layers`].
    #[arg(long)]
    pub layers_pattern: Option<String>,
    /// Per-module ranks, as JSON {"pattern": r}: a pattern matches the end of a module path at a
    /// dot boundary, the first match wins (PEFT's rank_pattern).
    #[arg(long, value_parser = json_map::<usize>)]
    pub rank_pattern: Option<std::collections::BTreeMap<String, usize>>,
    /// Per-module alphas, as JSON {"pattern": alpha} (PEFT's alpha_pattern).
    #[arg(long, value_parser = json_map::<f64>)]
    pub alpha_pattern: Option<std::collections::BTreeMap<String, f64>>,
    /// LoRA+: B matrices (and DoRA magnitudes) learn at this multiple of --learning_rate
    /// (aliases: --loraplus_lr_ratio, ms-swift 2's --lora_lr_ratio; PEFT's create_loraplus_optimizer
    /// groups).
    #[arg(
        long,
        alias = "loraplus-lr-ratio",
        alias = "loraplus_lr_ratio",
        alias = "lora-lr-ratio",
        alias = "lora_lr_ratio"
    )]
    #[serde(alias = "loraplus_lr_ratio", alias = "lora_lr_ratio")]
    pub lorap_lr_ratio: Option<f64>,
    /// How A and B start (PEFT's init_lora_weights): true (A random, B zero), false (both
    /// random), gaussian, pissa / pissa_niter_N (the top-r singular part of each weight moves
    /// into the adapter), olora (the first r of a QR factorisation) (alias: --init_weights,
    /// ms-swift 3.x). PiSSA and OLoRA adapters are written converted to a plain LoRA of rank 2r
    /// that works on the untouched base.
    #[arg(long, alias = "init-weights")]
    #[serde(alias = "init_weights")]
    pub init_lora_weights: Option<String>,
    /// Also write a PiSSA / OLoRA adapter in PEFT's unconverted form, to
    /// `<output_dir>/unconverted`.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub save_unconverted: Option<bool>,
    /// Modules trained in full beside the adapters, embed_tokens and/or lm_head (alias:
    /// --lora_modules_to_save, ms-swift 2.x). Saved under PEFT's names; their f32 copies and
    /// AdamW moments take 16 bytes per parameter (a 150k × 896 lm_head: 2 GiB).
    #[arg(long, alias = "lora-modules-to-save", alias = "lora_modules_to_save", num_args = 1..)]
    #[serde(alias = "lora_modules_to_save")]
    pub modules_to_save: Option<Vec<String>>,
    /// On a model whose lm_head is tied to embed_tokens, --modules_to_save trains the one matrix
    /// both use and saves it under both names (PEFT's ensure_weight_tying).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub ensure_weight_tying: Option<bool>,
    /// Embedding rows trained on their own, by token id (PEFT's trainable_token_indices; saved
    /// as embed_tokens.token_adapter.trainable_tokens_delta).
    #[arg(long, num_args = 1..)]
    pub trainable_token_indices: Option<Vec<u32>>,
    /// LoRA+ learning rate of embedding adapters; lorafold puts no adapter on embeddings, so it is
    /// accepted and noted.
    #[arg(long)]
    pub loraplus_lr_embedding: Option<f64>,
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
    /// Pairs per evaluation batch [default: --batch_size] (alias: --per_device_eval_batch_size).
    #[arg(long, alias = "per-device-eval-batch-size")]
    #[serde(alias = "per_device_eval_batch_size")]
    pub eval_batch_size: Option<usize>,
    /// Micro-batches per optimizer step [default: 1].
    #[arg(long)]
    pub gradient_accumulation_steps: Option<usize>,
    /// Shuffle the training pairs each epoch (default true; false keeps file order).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub shuffle: Option<bool>,
    /// Peak learning rate (alias: --lr).
    #[arg(long, alias = "lr")]
    #[serde(alias = "lr")]
    pub learning_rate: Option<f64>,
    /// AdamW weight decay [default: 0.1].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// AdamW β1 [default: 0.9].
    #[arg(long)]
    pub adam_beta1: Option<f64>,
    /// AdamW β2 [default: 0.999].
    #[arg(long)]
    pub adam_beta2: Option<f64>,
    /// AdamW ε [default: 1e-8].
    #[arg(long)]
    pub adam_epsilon: Option<f64>,
    /// Clip the global gradient norm to this [default: 1].
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// cosine, linear, constant or constant_with_warmup.
    #[arg(long)]
    pub lr_scheduler_type: Option<String>,
    /// Fraction of the steps spent warming the learning rate up [default: 0.05].
    #[arg(long)]
    pub warmup_ratio: Option<f64>,
    /// Warm-up steps; overrides --warmup_ratio when above 0 [default: 0].
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
    /// Label smoothing of the sigmoid loss (cDPO) and exo_pair's ε [default: 0].
    #[arg(long)]
    pub label_smoothing: Option<f64>,
    /// Weight of an SFT (NLL) term on the chosen response.
    #[arg(long)]
    pub rpo_alpha: Option<f64>,
    /// SimPO's target reward margin γ [default: 0.5].
    #[arg(long)]
    pub simpo_gamma: Option<f64>,
    /// DiscoPOP's temperature τ [default: 0.05].
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
    /// Evaluate every this many steps, and at the end [default: 500].
    #[arg(long)]
    pub eval_steps: Option<usize>,
    /// Save a checkpoint every this many steps, and at the end [default: 500].
    #[arg(long)]
    pub save_steps: Option<usize>,
    /// Keep at most this many checkpoints (oldest removed).
    #[arg(long)]
    pub save_total_limit: Option<usize>,
    /// Log the window's mean metrics every this many steps [default: 5].
    #[arg(long)]
    pub logging_steps: Option<usize>,
    /// Seed of the adapter initialisation, shuffling and dropout [default: 42].
    #[arg(long)]
    pub seed: Option<u64>,
    /// AUTO, fp32, bf16 or fp16 for the base weights (LoRA, optimizer and loss stay f32; alias:
    /// --torch_dtype, which also takes bfloat16, float16, float32).
    #[arg(long, alias = "torch-dtype")]
    #[serde(alias = "torch_dtype")]
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
    /// Put a row's system message at the start of its first user message (joined by a blank
    /// line), for chat templates without a system role such as Gemma 2's, which otherwise refuse
    /// the row.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub fold_system: Option<bool>,
    /// Evaluate on at most this many held-out pairs.
    #[arg(long)]
    pub max_eval_pairs: Option<usize>,
    /// Steps with a NaN/Inf loss or gradient are skipped; stop after this many in a row (default 5).
    #[arg(long)]
    pub max_nonfinite_steps: Option<usize>,
    /// ms-swift's tuner library: peft or swift. lorafold writes PEFT adapters either way, which
    /// both load; accepted and noted.
    #[arg(long)]
    pub tuner_backend: Option<String>,
    /// Write into a new `v<N>-<YYYYMMDD>-<HHMMSS>` subfolder of --output_dir, as ms-swift does.
    /// [default: only when --output_dir already holds a trained adapter; a resume never adds one]
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub add_version: Option<bool>,
    /// Train into an --output_dir that already holds a finished adapter, replacing its files.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub overwrite_output_dir: Option<bool>,
    /// When to evaluate: steps (every --eval_steps, and at the end; the default), epoch (at the
    /// end of each epoch) or no (alias: --evaluation_strategy).
    #[arg(long, alias = "evaluation-strategy")]
    #[serde(alias = "evaluation_strategy")]
    pub eval_strategy: Option<String>,
    /// When to save a checkpoint: steps (every --save_steps, and at the end; the default), epoch,
    /// or no (only the final adapter is written; a Ctrl-C still saves one to resume from).
    #[arg(long)]
    pub save_strategy: Option<String>,
    /// ms-swift checks whether the model on the hub is newer; lorafold uses the files it finds
    /// (accepted and noted).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub check_model_is_latest: Option<bool>,
    /// ms-swift's dataset check: none, warning or error (lorafold checks every row as it reads
    /// it and names a bad one; --skip_bad_rows skips them instead). discard is refused: pass
    /// --skip_bad_rows.
    #[arg(long)]
    pub check_dataset_strategy: Option<String>,
    /// Where to log besides metrics.jsonl: tensorboard (event files in <output_dir>/runs, with
    /// transformers' tags), none (the default) or all (= tensorboard). Hosted trackers (wandb,
    /// swanlab, mlflow, ...) are refused: lorafold makes no network calls while training.
    #[arg(long, num_args = 1..)]
    pub report_to: Option<Vec<String>>,
    /// ms-swift's data-loader worker processes; lorafold reads and tokenises data in-process on
    /// all cores (accepted and noted).
    #[arg(long)]
    pub dataloader_num_workers: Option<usize>,
    /// ms-swift's dataset preprocessing processes (accepted and noted, as above).
    #[arg(long)]
    pub dataset_num_proc: Option<usize>,
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

/// Merge LoRA adapters into a model, or combine several adapters into one.
///
/// Without --combination, every adapter is folded into the base: W' = W + Σ wᵢ·scaleᵢ·BᵢAᵢ,
/// computed in f32 and stored in the base dtype; the output is a model folder (safetensors,
/// config, tokenizer and generation config) that transformers and `lorafold infer` load.
///
/// With --combination, the adapters are combined into one PEFT adapter (PEFT's
/// add_weighted_adapter); add --merge to fold the combined adapter into the base instead.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    lorafold merge --model Qwen/Qwen2.5-0.5B-Instruct --adapters out/checkpoint-200 --output merged\n  \
    lorafold merge --adapters a b --weights 0.7,0.3 --combination svd --svd_rank 16 --output ab\n  \
    lorafold merge --model M --adapters a b --combination ties --density 0.5 --merge --output m")]
pub struct MergeArgs {
    /// Base model: a local folder laid out like a hub snapshot, or a hub id. Needed unless only
    /// combining adapters (--combination without --merge); when given there, the adapters are
    /// checked against it.
    #[arg(long, alias = "model-id-or-path")]
    pub model: Option<String>,
    /// Hub revision of the base model (branch, tag or commit).
    #[arg(long)]
    pub revision: Option<String>,
    /// Adapter folders: adapter_config.json + adapter_model.safetensors, e.g. the output or a
    /// checkpoint-N folder of `lorafold dpo`. Repeat the flag or list several after it.
    #[arg(long, alias = "adapter", required = true, num_args = 1..)]
    pub adapters: Vec<PathBuf>,
    /// Output folder [default: <first adapter>-merged, or <first adapter>-<combination> for a
    /// combined adapter].
    #[arg(long, alias = "output-dir")]
    pub output: Option<PathBuf>,
    /// Replace --output if it exists (a non-empty existing folder is refused otherwise).
    #[arg(long)]
    pub overwrite: bool,
    /// One weight per adapter, comma-separated (default 1 each). Negative weights subtract.
    #[arg(long, value_delimiter = ',', num_args = 1.., allow_negative_numbers = true)]
    pub weights: Vec<f64>,
    /// Combine the adapters into one, as PEFT's add_weighted_adapter(combination_type=...):
    /// cat (exact: ranks add up), linear (A and B averaged separately; equal ranks), svd (weighted
    /// sum of ΔW truncated by SVD), ties, dare_linear, dare_ties, magnitude_prune (on A and B
    /// separately; equal ranks), and ties_svd, dare_linear_svd, dare_ties_svd,
    /// magnitude_prune_svd (on ΔW, then SVD).
    #[arg(long, alias = "combination-type", value_enum)]
    pub combination: Option<Combination>,
    /// Fold the combined adapter into the base model instead of writing it as an adapter.
    #[arg(
        long,
        visible_alias = "into-base",
        alias = "merge-lora",
        num_args = 0..=1,
        default_missing_value = "true",
        default_value_t = false,
        action = ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub merge: bool,
    /// Fraction of values kept by ties, dare_* and magnitude_prune* (0 < density ≤ 1).
    #[arg(long)]
    pub density: Option<f64>,
    /// How ties and dare_ties elect the sign of each value.
    #[arg(long, value_enum, default_value_t = SignMethod::Total)]
    pub majority_sign_method: SignMethod,
    /// Rank of the adapter made by the *svd combinations [default: the largest adapter rank].
    #[arg(long)]
    pub svd_rank: Option<usize>,
    /// Clamp the SVD factors at this quantile of their values (PEFT's svd_clamp), e.g. 0.99.
    #[arg(long)]
    pub svd_clamp: Option<f64>,
    /// Seed of the random masks of dare_linear and dare_ties.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// dtype of the output: auto (keep each tensor's dtype), fp32, bf16 or fp16. Converting
    /// rewrites the dtype in config.json.
    #[arg(long, alias = "torch-dtype", default_value = "auto")]
    pub dtype: String,
    /// Largest shard of the merged model: bytes or a size such as 5GB, 200MB, 2GiB. A model
    /// larger than this is split into model-0000i-of-0000N.safetensors with an index.
    #[arg(long, default_value = "5GB")]
    pub max_shard_size: String,
    /// Check every merged tensor for NaN and infinity (and the adapters first), and refuse to
    /// write a broken model.
    #[arg(
        long,
        num_args = 0..=1,
        default_missing_value = "true",
        default_value_t = false,
        action = ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub safe_merge: bool,
}

/// Generate text with a model, optionally with an adapter.
///
/// With --prompt: stream one answer. With --prompts: answer every line of a JSONL file, writing
/// one JSON line per prompt. With neither: chat interactively, reading lines from stdin
/// (/reset starts a new conversation, /exit quits).
#[derive(Debug, Args)]
pub struct InferArgs {
    /// Model: local folder or hub id (a merged model is just a model folder).
    #[arg(long, alias = "model-id-or-path")]
    pub model: String,
    /// Hub revision (branch, tag or commit).
    #[arg(long)]
    pub revision: Option<String>,
    /// A PEFT adapter folder, applied unmerged on top of the model.
    #[arg(long)]
    pub adapters: Option<PathBuf>,
    /// Answer this prompt (streamed to stdout) and exit.
    #[arg(long, conflicts_with = "prompts")]
    pub prompt: Option<String>,
    /// JSONL file of prompts: each line {"prompt": "..."}, {"messages": [...]}, a JSON string,
    /// or plain text. Writes one JSON line per prompt with the generated token ids and text.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Write the JSONL answers of --prompts here instead of stdout.
    #[arg(long, requires = "prompts")]
    pub output: Option<PathBuf>,
    /// System message put before the conversation (unless a prompt brings its own).
    #[arg(long)]
    pub system: Option<String>,
    /// Put the system message at the start of the first user message, for chat templates
    /// without a system role (Gemma 2).
    #[arg(long)]
    pub fold_system: bool,
    /// Feed the prompt as it is (after the BOS token, if the model has one), without the chat
    /// template.
    #[arg(long)]
    pub no_chat_template: bool,
    /// Chat template instead of the model's: chatml, llama3, mistral, raw, or a Jinja file.
    #[arg(long)]
    pub template: Option<String>,
    /// Most tokens to generate per answer [default: generation_config.json's, else 512].
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// 0 is greedy decoding [default: generation_config.json's when it sets do_sample, else 0].
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Sample among the k most likely tokens; 0 turns it off [default: generation_config.json's,
    /// else 50, as transformers].
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Sample among the most likely tokens that make up this much probability [default:
    /// generation_config.json's, else 1].
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Penalise tokens already in the prompt or answer (transformers' definition; 1 is off)
    /// [default: generation_config.json's, else 1].
    #[arg(long)]
    pub repetition_penalty: Option<f64>,
    /// Seed of sampling (turn n of a chat uses seed + n).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Keep generating past EOS / end-of-turn tokens, up to --max_new_tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Answer with the base model and with the adapter, one after the other, labelled.
    #[arg(long, requires = "adapters")]
    pub compare: bool,
    /// Weights dtype: auto (f32 on CPU, the checkpoint's dtype on GPU), fp32, bf16 or fp16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
}

/// `lorafold bench`: the fixed benchmark workload and what to measure.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// The workload: `bench` (a ~33M Llama, 4 pairs of ~150 + 2 × ~100 tokens) or
    /// `qwen2.5-0.5b` (Qwen2.5-0.5B-Instruct's shape with random weights, 2 pairs of
    /// ~250 + 2 × ~100 tokens). The model is written to --model_dir unless --model is given.
    #[arg(long, default_value = "bench")]
    pub preset: String,
    /// Benchmark this model folder (a hub snapshot's layout) instead of the preset's random model.
    #[arg(long, conflicts_with = "model_dir")]
    pub model: Option<std::path::PathBuf>,
    /// Measured steps (after warm-up); 0 measures only decoding and merging.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Warm-up steps, not measured.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Pairs in the batch (default: the preset's).
    #[arg(long)]
    pub pairs: Option<usize>,
    /// Prompt tokens per pair, ±10% (default: the preset's).
    #[arg(long)]
    pub prompt_len: Option<usize>,
    /// Tokens per chosen and per rejected response, ±10% (default: the preset's).
    #[arg(long)]
    pub response_len: Option<usize>,
    /// Longest sequence (prompt + response) before truncation.
    #[arg(long, default_value_t = 1024)]
    pub max_length: usize,
    /// Also measure with precomputed reference log-probs (one forward + backward per step).
    #[arg(long)]
    pub precomputed_ref: bool,
    /// Where to write the benchmark model (default: a temporary folder).
    #[arg(long)]
    pub model_dir: Option<std::path::PathBuf>,
    /// Write the benchmark batch as JSON ([{prompt, chosen, rejected}] token ids) for
    /// benchmarks/trl_bench.py.
    #[arg(long)]
    pub dump_pairs: Option<std::path::PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Train DoRA adapters (magnitude vectors on top of LoRA) instead of plain LoRA, to measure
    /// what DoRA costs.
    #[arg(long)]
    pub use_dora: bool,
    /// Recompute each decoder block in the backward pass (less memory, more time).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Run chosen and rejected as separate padded sequences instead of sharing the prompt.
    #[arg(long)]
    pub no_prefix_sharing: bool,
    /// Tokens to generate for the decode measurement (0 skips it).
    #[arg(long, default_value_t = 128)]
    pub decode_tokens: usize,
    /// Base weight dtype: f32, bf16 or f16 (LoRA stays f32).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Skip the merge measurement.
    #[arg(long)]
    pub skip_merge: bool,
    /// The machine's best f32 GEMM in GFLOP/s, as measured by benchmarks/sgemm.py (torch's or
    /// numpy's BLAS on the step's shapes); the "of peak" column is then relative to it instead
    /// of candle's own 1024³ product.
    #[arg(long)]
    pub reference_peak_gflops: Option<f64>,
}

impl MergeArgs {
    /// The flags resolved into a checked [`MergePlan`].
    pub fn plan(&self) -> Result<MergePlan> {
        if self.adapters.is_empty() {
            return Err(Error::Flag {
                flag: "--adapters".into(),
                msg: "give at least one adapter folder".into(),
            });
        }
        let weights = self.weights_per_adapter()?;
        self.check_ranges()?;
        let combine = self.combination.map(|c| CombineOptions {
            combination: c,
            density: self.density,
            sign_method: self.majority_sign_method,
            svd_rank: self.svd_rank,
            svd_clamp: self.svd_clamp,
            seed: self.seed,
        });
        if let Some(c) = &combine {
            if c.combination.needs_density() && self.density.is_none() && self.adapters.len() > 1 {
                let msg = format!(
                    "{} needs --density (the fraction of values kept, 0 < d ≤ 1)",
                    c.combination.name()
                );
                return Err(setting("--combination", msg));
            }
        }
        let into_base = combine.is_none() || self.merge;
        // Without --model, merging uses the base the first adapter records (PEFT's
        // base_model_name_or_path), as AutoPeftModelForCausalLM does.
        let model = match &self.model {
            Some(m) => Some(m.clone()),
            None if into_base => crate::lora::io::recorded_base(&self.adapters[0]),
            None => None,
        };
        if into_base && model.is_none() {
            return Err(setting(
                "--model",
                "is required to merge into the base model (only combining adapters with \
                 --combination and without --merge works without it)",
            ));
        }
        let output = match &self.output {
            Some(o) => o.clone(),
            None => match (&combine, into_base) {
                (Some(c), false) => sibling(&self.adapters[0], c.combination.name()),
                _ => sibling(&self.adapters[0], "merged"),
            },
        };
        Ok(MergePlan {
            model,
            revision: self.revision.clone(),
            adapters: self.adapters.clone(),
            weights,
            combine,
            into_base,
            output,
            overwrite: self.overwrite,
            dtype: crate::model::load::parse_dtype_flag(&self.dtype)?.explicit(),
            max_shard_size: crate::merge::writer::parse_size(&self.max_shard_size)?,
            safe_merge: self.safe_merge,
        })
    }

    /// `--weights`, one per adapter (1 each when not given), all finite.
    fn weights_per_adapter(&self) -> Result<Vec<f64>> {
        let (w, a) = (&self.weights, &self.adapters);
        let weights = if w.is_empty() {
            vec![1.0; a.len()]
        } else if w.len() != a.len() {
            let msg = format!(
                "has {} value{} but --adapters names {} adapter{}; give one weight per adapter",
                w.len(),
                if w.len() == 1 { "" } else { "s" },
                a.len(),
                if a.len() == 1 { "" } else { "s" },
            );
            return Err(setting("--weights", msg));
        } else {
            w.clone()
        };
        if let Some(w) = weights.iter().find(|w| !w.is_finite()) {
            return Err(Error::Flag {
                flag: "--weights".into(),
                msg: format!("{w} is not a finite number"),
            });
        }
        Ok(weights)
    }

    fn check_ranges(&self) -> Result<()> {
        if let Some(d) = self.density {
            if !(d > 0.0 && d <= 1.0) {
                return Err(setting("--density", format!("{d} is outside (0, 1]")));
            }
        }
        if let Some(q) = self.svd_clamp {
            if !(0.0..=1.0).contains(&q) {
                return Err(setting("--svd_clamp", format!("{q} is outside [0, 1]")));
            }
        }
        if self.svd_rank == Some(0) {
            return Err(setting("--svd_rank", "must be positive"));
        }
        Ok(())
    }

    /// Notes for the user: flags that the chosen mode does not use (PEFT ignores them too), the
    /// base taken from the adapter when --model is not given, adapters trained on another base.
    pub fn unused_flags(&self) -> Vec<String> {
        let comb = self.combination;
        let mut notes = Vec::new();
        match &self.model {
            Some(m) => notes.extend(
                self.adapters
                    .iter()
                    .filter_map(|a| crate::lora::io::base_mismatch_note(a, m)),
            ),
            None if comb.is_none() || self.merge => {
                if let Some(base) = self.adapters.first().and_then(|a| crate::lora::io::recorded_base(a)) {
                    notes.push(format!(
                        "note: no --model given: merging into {base:?}, the base the adapter records"
                    ));
                }
            }
            None => {}
        }
        let mut unused =
            |flag: &str, used_by: &str| notes.push(format!("note: {flag} is ignored; it is used by {used_by}"));
        if self.density.is_some() && !comb.is_some_and(Combination::needs_density) {
            unused("--density", "--combination ties, dare_*, magnitude_prune*");
        }
        if (self.svd_rank.is_some() || self.svd_clamp.is_some()) && !comb.is_some_and(Combination::on_delta) {
            unused("--svd_rank/--svd_clamp", "the *svd combinations");
        }
        if self.merge && comb.is_none() {
            notes.push("note: --merge is implied without --combination".into());
        }
        notes
    }
}

fn setting(key: &str, msg: impl Into<String>) -> Error {
    Error::Setting {
        key: key.into(),
        msg: msg.into(),
    }
}

/// `<dir>-<suffix>` next to `dir`.
fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let abs;
    let dir = if dir.file_name().is_none() {
        abs = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        abs.as_path()
    } else {
        dir
    };
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "adapter".into());
    dir.with_file_name(format!("{name}-{suffix}"))
}

/// Is `--name` a flag of `lorafold <command>` (or an alias of one)?
pub fn is_known_flag(command: &str, name: &str) -> bool {
    unknown_flags(&["lorafold".into(), command.into(), format!("--{name}")]).is_empty()
}

/// Every `--flag` in the command line `args` that the subcommand does not know, as typed, so
/// that all of them are reported at once (clap stops at the first). Both spellings
/// (`--max_length`, `--max-length`) are known. Empty when the subcommand itself is unknown:
/// clap reports that.
pub fn unknown_flags(args: &[String]) -> Vec<String> {
    let cli = command();
    let Some(sub) = args.get(1).and_then(|name| cli.find_subcommand(name)) else {
        return Vec::new();
    };
    let mut known: Vec<String> = vec!["help".into(), "version".into()];
    for arg in sub.get_arguments() {
        known.extend(arg.get_long().map(str::to_string));
        known.extend(
            arg.get_all_aliases()
                .unwrap_or_default()
                .into_iter()
                .map(str::to_string),
        );
    }
    let mut unknown = Vec::new();
    for a in &args[2..] {
        if a == "--" {
            break;
        }
        let Some(rest) = a.strip_prefix("--") else { continue };
        let name = rest.split_once('=').map_or(rest, |(n, _)| n);
        let canonical = name.replace('_', "-");
        if !known.contains(&canonical) && !unknown.contains(&format!("--{name}")) {
            unknown.push(format!("--{name}"));
        }
    }
    unknown
}

/// Keys of [`DpoOptions`] that only training uses: given to `lorafold eval` as flags, they are
/// errors (a recipe's training keys are ignored there).
const TRAINING_ONLY: [&str; 36] = [
    "output_dir",
    "num_train_epochs",
    "max_steps",
    "split_dataset_ratio",
    "lora_rank",
    "lora_alpha",
    "lora_dropout_p",
    "lora_target_modules",
    "use_rslora",
    "gradient_accumulation_steps",
    "shuffle",
    "learning_rate",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "lr_scheduler_type",
    "warmup_ratio",
    "warmup_steps",
    "precompute_ref_log_probs",
    "group_by_length",
    "eval_steps",
    "save_steps",
    "save_total_limit",
    "logging_steps",
    "gradient_checkpointing",
    "resume_from_checkpoint",
    "max_nonfinite_steps",
    "eval_strategy",
    "save_strategy",
    "report_to",
    "add_version",
    "overwrite_output_dir",
    "dataloader_num_workers",
    "dataset_num_proc",
];

/// The command-line definition, with `eval --help` listing only what eval uses (the training
/// flags stay parseable, so that giving one is refused with a message naming it).
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    Cli::command().mut_subcommand("eval", |eval| {
        TRAINING_ONLY
            .iter()
            .fold(eval, |cmd, id| cmd.mut_arg(*id, |a| a.hide(true)))
    })
}

/// Parse a command line (already through [`normalize_flag_spelling`]) with [`command`]; clap
/// prints help, version and usage errors and exits, as `Cli::parse_from` does.
pub fn parse(args: Vec<String>) -> Cli {
    use clap::FromArgMatches;
    let matches = command().get_matches_from(args);
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

impl DpoOptions {
    /// The training-only flags set in these options, as `--name`.
    pub fn training_only_flags(&self) -> Vec<String> {
        let Ok(serde_json::Value::Object(set)) = serde_json::to_value(self) else {
            return Vec::new();
        };
        TRAINING_ONLY
            .iter()
            .filter(|k| set.get(**k).is_some_and(|v| !v.is_null()))
            .map(|k| format!("--{k}"))
            .collect()
    }
}

/// A JSON object of pattern -> value, for --rank_pattern and --alpha_pattern.
fn json_map<V: serde::de::DeserializeOwned>(
    s: &str,
) -> std::result::Result<std::collections::BTreeMap<String, V>, String> {
    serde_json::from_str(s).map_err(|e| format!("expected a JSON object such as {{\"q_proj\": 16}}: {e}"))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn every_flag_of_every_command_has_a_description() {
        let cli = super::Cli::command();
        let mut bare = Vec::new();
        for sub in cli.get_subcommands() {
            for arg in sub.get_arguments() {
                let id = arg.get_id().as_str();
                if arg.get_long().is_some() && arg.get_help().is_none() && !matches!(id, "help" | "version") {
                    bare.push(format!("{} --{}", sub.get_name(), arg.get_long().unwrap_or(id)));
                }
            }
        }
        assert!(bare.is_empty(), "flags without a description: {bare:?}");
    }

    #[test]
    fn eval_help_lists_only_what_eval_uses() {
        let mut cmd = super::command();
        let help = cmd
            .find_subcommand_mut("eval")
            .map(|e| e.render_long_help().to_string())
            .unwrap_or_default();
        for used in ["--beta", "--adapters", "--max-length", "--per-pair"] {
            assert!(help.contains(used), "{used} missing from eval --help");
        }
        for training in ["--learning-rate", "--max-steps", "--save-steps", "--output-dir"] {
            assert!(!help.contains(training), "{training} listed in eval --help");
        }
    }

    #[test]
    fn training_only_keys_are_keys_of_the_options() {
        let all = match serde_json::to_value(super::DpoOptions::default()) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => panic!("DpoOptions serialises to an object"),
        };
        for k in super::TRAINING_ONLY {
            assert!(all.contains_key(k), "{k} is not a DpoOptions key");
        }
        let o = super::DpoOptions {
            learning_rate: Some(1e-4),
            beta: Some(0.2),
            ..Default::default()
        };
        assert_eq!(o.training_only_flags(), ["--learning_rate"]);
    }
}
