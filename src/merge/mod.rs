//! `lorafold merge`: fold LoRA adapters into the base weights, or combine several adapters into
//! one.
//!
//! Merging streams the base checkpoint tensor by tensor from its memory map: a tensor that no
//! adapter touches is copied byte for byte; an adapted one is loaded, converted to f32,
//! `W + Σ wᵢ·sᵢ·BᵢAᵢ` is added in f32, and the result is stored in the base dtype. Only one base
//! tensor (plus the adapters, which are small) is in memory at a time. The output is written into
//! a hidden staging folder beside `--output` and renamed into place at the end, so a failed merge
//! (a NaN under `--safe_merge`, a full disk) leaves nothing behind.
//!
//! Combining (`--combination`) follows PEFT's `add_weighted_adapter`; see [`combine`].

pub mod adapter;
pub mod combine;
pub mod mat;
pub mod model;
pub mod svd;
pub mod writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::DType;
use clap::{ArgAction, Args};

use crate::error::{Error, Result};
use crate::lora::io::write_adapter;
use crate::lora::peft_key;
use crate::staging::Staged;
use adapter::LoadedAdapter;
use combine::{Combination, CombineOptions, Combined, SignMethod};
use model::{Base, Term};

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

/// What `lorafold merge` will do, resolved from the flags and checked.
#[derive(Debug, Clone)]
pub struct MergePlan {
    pub model: Option<String>,
    pub revision: Option<String>,
    pub adapters: Vec<PathBuf>,
    pub weights: Vec<f64>,
    pub combine: Option<CombineOptions>,
    /// Write a model folder (true) or an adapter folder (false).
    pub into_base: bool,
    pub output: PathBuf,
    pub overwrite: bool,
    /// `None` keeps each tensor's dtype.
    pub dtype: Option<DType>,
    pub max_shard_size: u64,
    pub safe_merge: bool,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct MergeSummary {
    pub output: PathBuf,
    /// Base tensors changed by the adapters.
    pub merged_tensors: usize,
    pub total_tensors: usize,
    pub shards: usize,
    pub bytes: u64,
    /// Set when a combined adapter was written (or merged).
    pub combination: Option<Combination>,
    pub rank: Option<usize>,
    pub copied_files: Vec<String>,
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

impl MergePlan {
    pub fn from_args(args: &MergeArgs) -> Result<MergePlan> {
        let MergeArgs {
            model,
            revision,
            adapters,
            output,
            overwrite,
            weights,
            combination,
            merge,
            density,
            majority_sign_method,
            svd_rank,
            svd_clamp,
            seed,
            dtype,
            max_shard_size,
            safe_merge,
        } = args;
        if adapters.is_empty() {
            return Err(Error::Msg("--adapters: give at least one adapter folder".into()));
        }
        let weights = if weights.is_empty() {
            vec![1.0; adapters.len()]
        } else if weights.len() != adapters.len() {
            return Err(Error::Msg(format!(
                "--weights has {} value{} but --adapters names {} adapter{}; give one weight per adapter",
                weights.len(),
                if weights.len() == 1 { "" } else { "s" },
                adapters.len(),
                if adapters.len() == 1 { "" } else { "s" },
            )));
        } else {
            weights.clone()
        };
        if let Some(w) = weights.iter().find(|w| !w.is_finite()) {
            return Err(Error::Msg(format!("--weights: {w} is not a finite number")));
        }
        if let Some(d) = density {
            if !(*d > 0.0 && *d <= 1.0) {
                return Err(Error::Msg(format!("--density {d} is outside (0, 1]")));
            }
        }
        if let Some(q) = svd_clamp {
            if !(0.0..=1.0).contains(q) {
                return Err(Error::Msg(format!("--svd_clamp {q} is outside [0, 1]")));
            }
        }
        if *svd_rank == Some(0) {
            return Err(Error::Msg("--svd_rank must be positive".into()));
        }
        let combine = combination.map(|c| CombineOptions {
            combination: c,
            density: *density,
            sign_method: *majority_sign_method,
            svd_rank: *svd_rank,
            svd_clamp: *svd_clamp,
            seed: *seed,
        });
        if let Some(c) = &combine {
            if c.combination.needs_density() && density.is_none() && adapters.len() > 1 {
                return Err(Error::Msg(format!(
                    "--combination {} needs --density (the fraction of values kept, 0 < d ≤ 1)",
                    c.combination.name()
                )));
            }
        }
        let into_base = combine.is_none() || *merge;
        if into_base && model.is_none() {
            return Err(Error::Msg(
                "--model is required to merge into the base model (only combining adapters with \
                 --combination and without --merge works without it)"
                    .into(),
            ));
        }
        let output = match output {
            Some(o) => o.clone(),
            None => match (&combine, into_base) {
                (Some(c), false) => sibling(&adapters[0], c.combination.name()),
                _ => sibling(&adapters[0], "merged"),
            },
        };
        Ok(MergePlan {
            model: model.clone(),
            revision: revision.clone(),
            adapters: adapters.clone(),
            weights,
            combine,
            into_base,
            output,
            overwrite: *overwrite,
            dtype: crate::model::load::parse_dtype_flag(dtype)?.explicit(),
            max_shard_size: writer::parse_size(max_shard_size)?,
            safe_merge: *safe_merge,
        })
    }
}

/// Flags that the chosen mode does not use (PEFT ignores them too), as notes for the user.
fn unused_flags(args: &MergeArgs) -> Vec<String> {
    let comb = args.combination;
    let mut notes = Vec::new();
    let mut unused =
        |flag: &str, used_by: &str| notes.push(format!("note: {flag} is ignored; it is used by {used_by}"));
    if args.density.is_some() && !comb.is_some_and(Combination::needs_density) {
        unused("--density", "--combination ties, dare_*, magnitude_prune*");
    }
    if (args.svd_rank.is_some() || args.svd_clamp.is_some()) && !comb.is_some_and(Combination::on_delta) {
        unused("--svd_rank/--svd_clamp", "the *svd combinations");
    }
    if args.merge && comb.is_none() {
        notes.push("note: --merge is implied without --combination".into());
    }
    notes
}

pub fn run(args: &MergeArgs) -> anyhow::Result<()> {
    let plan = MergePlan::from_args(args)?;
    for n in unused_flags(args) {
        eprintln!("{n}");
    }
    let t0 = std::time::Instant::now();
    let s = execute(&plan, true)?;
    let secs = t0.elapsed().as_secs_f64();
    match (s.combination, plan.into_base) {
        (Some(c), false) => eprintln!(
            "combined {} adapters ({}, rank {}) into {} modules; adapter written to {} in {secs:.1}s",
            plan.adapters.len(),
            c.name(),
            s.rank.unwrap_or(0),
            s.merged_tensors,
            s.output.display()
        ),
        _ => eprintln!(
            "merged {} adapter{}{} into {} of {} tensors; wrote {:.1} MB in {} file{} to {} in {secs:.1}s",
            plan.adapters.len(),
            if plan.adapters.len() == 1 { "" } else { "s" },
            s.combination
                .map(|c| format!(" ({}, rank {})", c.name(), s.rank.unwrap_or(0)))
                .unwrap_or_default(),
            s.merged_tensors,
            s.total_tensors,
            s.bytes as f64 / 1e6,
            s.shards,
            if s.shards == 1 {
                ""
            } else {
                "s (sharded, with model.safetensors.index.json)"
            },
            s.output.display()
        ),
    }
    Ok(())
}

fn progress(len: usize, what: &str, show: bool) -> indicatif::ProgressBar {
    let template = format!("{{spinner}} {what} [{{bar:30}}] {{pos}}/{{len}} {{msg}} ({{elapsed}})");
    crate::util::progress_bar(len, &template, show)
}

/// Carry out a plan. `show_progress` draws progress bars on stderr (when it is a terminal).
pub fn execute(plan: &MergePlan, show_progress: bool) -> Result<MergeSummary> {
    let adapters: Vec<LoadedAdapter> = plan.adapters.iter().map(|d| adapter::load(d)).collect::<Result<_>>()?;
    if plan.safe_merge {
        for a in &adapters {
            adapter::check_finite(a)?;
        }
    }
    let base = match &plan.model {
        Some(m) => Some(Base::open(m, plan.revision.as_deref())?),
        None => None,
    };
    if let Some(b) = &base {
        for a in &adapters {
            b.check_adapter(a)?;
        }
    }
    let staging = Staging::new(&plan.output, plan.overwrite, &inputs(plan, base.as_ref()))?;

    let combined = match &plan.combine {
        Some(opts) => {
            let n: usize = {
                let mut all: Vec<&String> = adapters.iter().flat_map(|a| a.modules.keys()).collect();
                all.sort();
                all.dedup();
                all.len()
            };
            let pb = progress(n, &format!("combining ({})", opts.combination.name()), show_progress);
            let c = combine::combine(&adapters, &plan.weights, opts, |m| {
                pb.set_message(m.to_string());
                pb.inc(1);
            })?;
            pb.finish_and_clear();
            if adapters.len() == 1 && opts.combination != Combination::Linear {
                eprintln!(
                    "note: one adapter given, so --combination {} acts as linear (as in PEFT)",
                    opts.combination.name()
                );
            }
            Some(c)
        }
        None => None,
    };

    if !plan.into_base {
        let c = combined
            .as_ref()
            .ok_or_else(|| Error::Msg("internal: nothing to write".into()))?;
        let base_name = plan
            .model
            .clone()
            .or_else(|| adapters[0].config.base_model_name_or_path.clone());
        let dtype = plan.dtype.unwrap_or(match adapters[0].dtype {
            DType::F16 => DType::F16,
            DType::BF16 => DType::BF16,
            _ => DType::F32,
        });
        write_combined(staging.path(), c, base_name.as_deref(), dtype)?;
        staging.commit()?;
        return Ok(MergeSummary {
            output: plan.output.clone(),
            merged_tensors: c.modules.len(),
            total_tensors: 2 * c.modules.len(),
            shards: 1,
            bytes: 0,
            combination: Some(c.combination),
            rank: Some(c.rank),
            copied_files: vec![],
        });
    }

    let base = base.ok_or_else(|| Error::Msg("--model is required to merge".into()))?;
    let terms = delta_terms(&adapters, &plan.weights, combined.as_ref());
    let mut summary = base.write_merged(staging.path(), &terms, plan, show_progress)?;
    summary.combination = combined.as_ref().map(|c| c.combination);
    summary.rank = combined.as_ref().map(|c| c.rank);
    staging.commit()?;
    Ok(summary)
}

/// Folders that --output must not replace.
fn inputs(plan: &MergePlan, base: Option<&Base>) -> Vec<PathBuf> {
    let mut v = plan.adapters.clone();
    if let Some(b) = base {
        v.push(b.files.dir.clone());
    }
    v
}

/// Updates per base tensor name (`<module>.weight`).
fn delta_terms<'a>(
    adapters: &'a [LoadedAdapter],
    weights: &[f64],
    combined: Option<&'a Combined>,
) -> BTreeMap<String, Vec<Term<'a>>> {
    let mut terms: BTreeMap<String, Vec<Term<'a>>> = BTreeMap::new();
    match combined {
        Some(c) => {
            for (path, (a, b)) in &c.modules {
                terms
                    .entry(format!("{path}.weight"))
                    .or_default()
                    .push(Term { a, b, factor: 1.0 });
            }
        }
        None => {
            for (ad, &w) in adapters.iter().zip(weights) {
                for (path, p) in &ad.modules {
                    terms.entry(format!("{path}.weight")).or_default().push(Term {
                        a: &p.a,
                        b: &p.b,
                        factor: w * p.scale,
                    });
                }
            }
        }
    }
    terms
}

/// Write a combined adapter as a PEFT folder.
fn write_combined(dir: &Path, c: &Combined, base_name: Option<&str>, dtype: DType) -> Result<()> {
    let mut tensors = Vec::with_capacity(2 * c.modules.len());
    for (path, (a, b)) in &c.modules {
        tensors.push((peft_key(path, 'A'), a.to_tensor()?.to_dtype(dtype)?));
        tensors.push((peft_key(path, 'B'), b.to_tensor()?.to_dtype(dtype)?));
    }
    write_adapter(dir, &c.config, base_name, &tensors)
}

/// A hidden folder beside the output that becomes the output on `commit`, and is removed if the
/// merge fails.
struct Staging {
    staged: Staged,
    out: PathBuf,
    trash: PathBuf,
}

impl Staging {
    fn new(out: &Path, overwrite: bool, inputs: &[PathBuf]) -> Result<Staging> {
        let exists = out.exists() || out.symlink_metadata().is_ok();
        if exists {
            let canon = std::fs::canonicalize(out).unwrap_or_else(|_| out.to_path_buf());
            for i in inputs {
                if std::fs::canonicalize(i).is_ok_and(|c| c == canon) {
                    return Err(Error::Msg(format!(
                        "--output {} is one of the inputs; choose another folder",
                        out.display()
                    )));
                }
            }
            let empty_dir = out.is_dir() && std::fs::read_dir(out).map(|mut d| d.next().is_none()).unwrap_or(false);
            if !empty_dir && !overwrite {
                return Err(Error::Msg(format!(
                    "--output {} already exists; pass --overwrite to replace it",
                    out.display()
                )));
            }
        }
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let name = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "output".into());
        let pid = std::process::id();
        Ok(Staging {
            staged: Staged::create(parent.join(format!(".{name}.lorafold-tmp-{pid}")))?,
            out: out.to_path_buf(),
            trash: parent.join(format!(".{name}.lorafold-trash-{pid}")),
        })
    }

    fn path(&self) -> &Path {
        self.staged.path()
    }

    /// Put the output in place, replacing (and then deleting) what was there.
    fn commit(self) -> Result<()> {
        self.staged.commit(&self.out, &self.trash)?.discard()
    }
}
