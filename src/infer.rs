//! `lorafold infer`: generation with the KV cache, sampling, chat templates.

use clap::Args;

/// Generate text with a model, optionally with an adapter.
#[derive(Debug, Args)]
pub struct InferArgs {
    /// Model: local folder or hub id.
    #[arg(long, alias = "model-id-or-path")]
    pub model: String,
}

pub fn run(_args: &InferArgs) -> anyhow::Result<()> {
    anyhow::bail!("`lorafold infer` is not implemented yet")
}
