//! Command-line definitions. Flags use ms-swift's names; each accepts both the underscore and the
//! dash spelling (`--max_length` and `--max-length`).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use lorafold::recipe::DpoOptions;

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
    /// Score preference pairs: loss, rewards, accuracy.
    Eval(EvalArgs),
    /// Merge adapters into the base weights, or combine several adapters.
    Merge(lorafold::merge::MergeArgs),
    /// Generate text with a model, optionally with an adapter.
    Infer(lorafold::infer::InferArgs),
    /// Benchmark a DPO step on a fixed ~30M-parameter model: tokens/s, peak memory, matmul peak.
    Bench(lorafold::bench::BenchArgs),
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
