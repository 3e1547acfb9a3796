use std::process::ExitCode;

use clap::Parser;

mod cli;

use cli::{Cli, Command};
use lorafold::model::{LoadOptions, Model};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Inspect(args) => inspect(args),
        Command::Dpo(_) => anyhow::bail!("`lorafold dpo` is not implemented yet"),
        Command::Eval(_) => anyhow::bail!("`lorafold eval` is not implemented yet"),
        Command::Merge(_) => anyhow::bail!("`lorafold merge` is not implemented yet"),
        Command::Infer(_) => anyhow::bail!("`lorafold infer` is not implemented yet"),
    }
}

fn inspect(args: cli::InspectArgs) -> anyhow::Result<()> {
    let files = lorafold::hub::resolve_model(&args.model.model, args.model.revision.as_deref())?;
    let mut model = Model::load_dir(&files.dir, &LoadOptions::default())?;
    let c = &model.cfg;
    println!("model       {}", files.name);
    println!("folder      {}", files.dir.display());
    println!("arch        {:?}", c.arch);
    println!(
        "sizes       layers {} hidden {} heads {}/{} head_dim {} ffn {} vocab {}",
        c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size, c.vocab_size
    );
    println!("parameters  {}", c.num_params());
    if let Some(dir) = args.adapters {
        let ad = lorafold::lora::io::load_adapter(&mut model, &dir, false)?;
        println!(
            "adapter     {} (r {}, alpha {}, {} tensors, {} parameters)",
            dir.display(),
            ad.config.r,
            ad.config.lora_alpha,
            ad.params.len(),
            ad.num_params()
        );
    }
    Ok(())
}
