use std::process::ExitCode;

/// Training allocates and frees many large tensors per step. By default glibc's malloc serves each
/// with mmap and returns it with munmap, so every step pays page faults on fresh pages (measured:
/// a quarter of a benchmark step in the kernel). Keeping freed memory in the heap removes that.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_malloc() {
    // SAFETY: mallopt only changes allocator parameters; called once before any threads start.
    unsafe {
        // No mmap at all: blocks above glibc's 32 MiB ceiling for M_MMAP_THRESHOLD (attention
        // scores at long sequence lengths) would otherwise still be mapped and unmapped per use.
        if libc::mallopt(libc::M_MMAP_MAX, 0) == 0 {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        }
        // The largest value mallopt takes (an int): freed memory stays in the heap.
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}

use lorafold::cli::{self as cli, Cli, Command};
use lorafold::model::{LoadOptions, Model};
use lorafold::recipe::{normalize_flag_spelling, DpoOptions, Settings};

fn main() -> ExitCode {
    tune_malloc();
    let mut raw: Vec<String> = std::env::args().collect();
    if matches!(raw.get(1).map(String::as_str), Some("dpo" | "rlhf")) {
        // ms-swift flags lorafold does not implement: noted, or refused with the reason (all at once).
        let command = raw[1].clone();
        let foreign = lorafold::foreign_flags::strip(&raw, |name| cli::is_known_flag(&command, name));
        if !foreign.refused.is_empty() {
            for line in &foreign.refused {
                eprintln!("error: {line}");
            }
            eprintln!(
                "error: {} ms-swift flag{} cannot be honoured by lorafold (see above)",
                foreign.refused.len(),
                if foreign.refused.len() == 1 { "" } else { "s" }
            );
            return ExitCode::from(2);
        }
        for note in &foreign.notes {
            eprintln!("{note}");
        }
        raw = foreign.args;
    }
    let unknown = cli::unknown_flags(&raw);
    if !unknown.is_empty() {
        eprintln!(
            "error: unknown flag{} for `lorafold {}`: {} (see lorafold {} --help)",
            if unknown.len() == 1 { "" } else { "s" },
            raw[1],
            unknown.join(", "),
            raw[1]
        );
        return ExitCode::from(2);
    }
    let cli = cli::parse(normalize_flag_spelling(raw));
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            match e.downcast_ref::<lorafold::Error>() {
                Some(lorafold::Error::Interrupted { .. }) => ExitCode::from(INTERRUPTED),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// A run stopped by Ctrl-C (after saving its checkpoint) exits with the shell's code for SIGINT,
/// so `lorafold dpo … && lorafold merge …` does not go on with an unfinished adapter.
const INTERRUPTED: u8 = 130;

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let done = match cli.command {
        Command::Inspect(args) => inspect(args),
        Command::Bench(args) => Ok(lorafold::bench::run(&args)?),
        Command::Dpo(args) | Command::Rlhf(args) => return dpo(args),
        Command::Eval(args) => eval(args),
        Command::Merge(args) => {
            let plan = args.plan()?;
            for n in args.unused_flags() {
                eprintln!("{n}");
            }
            Ok(lorafold::merge::run(&plan)?)
        }
        Command::Infer(args) => Ok(lorafold::infer::run(&args)?),
    };
    done.map(|()| ExitCode::SUCCESS)
}

/// Recipe (if any) overlaid with the flags given, resolved into settings.
fn settings(recipe: Option<&std::path::Path>, flags: &DpoOptions) -> anyhow::Result<Settings> {
    let base = match recipe {
        Some(p) => DpoOptions::from_yaml_file(p)?,
        None => DpoOptions::default(),
    };
    let options = base.overlay(flags)?;
    for note in options.notes() {
        eprintln!("{note}");
    }
    Ok(options.resolve()?)
}

fn dpo(args: cli::DpoArgs) -> anyhow::Result<ExitCode> {
    let s = settings(args.recipe.as_deref(), &args.options)?;
    if args.print_settings {
        print!("{}", serde_yaml::to_string(&s)?);
        return Ok(ExitCode::SUCCESS);
    }
    let t0 = std::time::Instant::now();
    let dist = lorafold::dist::from_env()?;
    let summary = match lorafold::train::run::run_dpo_on(&s, false, dist.clone()) {
        Ok(summary) => summary,
        Err(e) if dist.size() > 1 => {
            // The other ranks wait in a collective: end them all, naming this rank.
            eprintln!("error on rank {} of {}: {e:#}", dist.rank(), dist.size());
            dist.abort(1);
            return Err(e.into());
        }
        Err(e) => return Err(e.into()),
    };
    if dist.rank() != 0 {
        return Ok(ExitCode::SUCCESS);
    }
    let o = &summary.outcome;
    if o.skipped_nonfinite > 0 {
        eprintln!(
            "warning: {} steps skipped because the loss or a gradient was NaN/Inf",
            o.skipped_nonfinite
        );
    }
    if o.interrupted {
        eprintln!(
            "stopped by Ctrl-C after step {}; resume with --resume_from_checkpoint latest --output_dir {}",
            o.last_step,
            summary.output_dir.display()
        );
        return Ok(ExitCode::from(INTERRUPTED));
    }
    let out = &summary.output_dir;
    eprintln!(
        "trained {} steps on {} pairs in {:.1}s; adapter written to {}",
        o.last_step,
        summary.train_pairs,
        t0.elapsed().as_secs_f64(),
        out.display()
    );
    if let Some((step, e)) = o.evals.last() {
        eprintln!(
            "eval at step {step}: loss {:.4}, reward accuracy {:.3}, margin {:.4}",
            e.loss, e.rewards_accuracies, e.rewards_margins
        );
    }
    print_where(out, &s.model, o.last_checkpoint.as_deref(), s.tensorboard);
    Ok(ExitCode::SUCCESS)
}

/// Where a finished run put everything, and the commands that use it next.
fn print_where(out: &std::path::Path, model: &str, last_checkpoint: Option<&std::path::Path>, tensorboard: bool) {
    let d = out.display();
    eprintln!("  adapter       {d}/adapter_model.safetensors, {d}/adapter_config.json");
    if let Some(c) = last_checkpoint {
        eprintln!("  checkpoints   {d}/checkpoint-* (last: {})", c.display());
    }
    eprintln!("  metrics       {d}/metrics.jsonl, plot {d}/metrics.png");
    if tensorboard {
        eprintln!("  tensorboard   {d}/runs (tensorboard --logdir {d}/runs)");
    }
    eprintln!("next:");
    eprintln!("  lorafold infer --model {model} --adapters {d}");
    eprintln!("  lorafold merge --model {model} --adapters {d} --output {d}-merged");
}

fn eval(args: cli::EvalArgs) -> anyhow::Result<()> {
    let training = args.options.training_only_flags();
    if !training.is_empty() {
        anyhow::bail!(
            "{} {} for training; lorafold eval does not use {} (see lorafold eval --help)",
            training.join(", "),
            if training.len() == 1 { "is a flag" } else { "are flags" },
            if training.len() == 1 { "it" } else { "them" }
        );
    }
    if let Some(p) = args.recipe.as_deref() {
        // A recipe is shared with `dpo`: its training keys are expected, and said, not used.
        let keys: Vec<String> = DpoOptions::from_yaml_file(p)?
            .training_only_flags()
            .iter()
            .map(|k| k.trim_start_matches('-').to_string())
            .collect();
        if !keys.is_empty() {
            eprintln!(
                "note: lorafold eval does not use the training keys of {}: {}",
                p.display(),
                keys.join(", ")
            );
        }
    }
    let s = settings(args.recipe.as_deref(), &args.options)?;
    let (rec, n, report) = lorafold::train::run::run_eval(&s, args.per_pair.as_deref())?;
    let rec = rec.record("");
    if args.json {
        let mut obj = serde_json::Map::new();
        obj.insert("pairs".into(), n.into());
        for (k, v) in &rec {
            obj.insert(
                k.clone(),
                serde_json::Number::from_f64(*v)
                    .map(Into::into)
                    .unwrap_or(serde_json::Value::Null),
            );
        }
        println!("{}", serde_json::Value::Object(obj));
    } else {
        for line in report {
            eprintln!("{line}");
        }
        println!("{:<22} {}", "pairs", n);
        for (k, v) in &rec {
            println!("{k:<22} {v:.6}");
        }
    }
    Ok(())
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
