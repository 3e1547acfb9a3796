//! `lorafold merge`: fold adapters into the base weights, or combine several adapters.

use clap::Args;

/// Merge LoRA adapters into a model, or combine several adapters into one.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Base model: local folder or hub id.
    #[arg(long, alias = "model-id-or-path")]
    pub model: String,
}

pub fn run(_args: &MergeArgs) -> anyhow::Result<()> {
    anyhow::bail!("`lorafold merge` is not implemented yet")
}
