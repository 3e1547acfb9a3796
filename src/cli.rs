//! Command-line definitions. Flags use ms-swift's names; each accepts both the underscore and the
//! dash spelling.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "lorafold", version, about = "Train LoRA adapters with DPO, merge them, and run inference")]
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
    Merge(MergeArgs),
    /// Generate text with a model, optionally with an adapter.
    Infer(InferArgs),
    /// Print a model's architecture, sizes and the adapter it would get.
    Inspect(InspectArgs),
}

#[derive(Debug, Args)]
pub struct ModelArgs {
    /// Model: a local folder laid out like a hub snapshot, or a hub id such as
    /// Qwen/Qwen2.5-0.5B-Instruct (resolved through HF_HOME; HF_ENDPOINT and HF_HUB_OFFLINE apply).
    #[arg(long, alias = "model_id_or_path", alias = "model-id-or-path")]
    pub model: String,
    /// Hub revision (branch, tag or commit).
    #[arg(long)]
    pub revision: Option<String>,
}

#[derive(Debug, Args)]
pub struct DpoArgs {
    /// YAML recipe; flags given on the command line override its keys.
    #[arg(long)]
    pub recipe: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
}

#[derive(Debug, Args)]
pub struct InferArgs {
    #[command(flatten)]
    pub model: ModelArgs,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// An adapter folder to load and check against the model.
    #[arg(long)]
    pub adapters: Option<PathBuf>,
}
