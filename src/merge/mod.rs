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
pub mod model;
pub mod writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::DType;

use crate::error::{Error, Result};
use crate::lora::init::LoraInit;
use crate::lora::io::write_adapter;
use crate::lora::peft_key;
use crate::staging::Staged;
use adapter::LoadedAdapter;
use combine::{Combination, CombineOptions, Combined};
use model::{Base, FullTensors, Term};

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

/// Run `lorafold merge`: execute `plan` and say what was written.
pub fn run(plan: &MergePlan) -> Result<()> {
    let t0 = std::time::Instant::now();
    let s = execute(plan, true)?;
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
        Some(opts) => Some(combine_adapters(&adapters, &plan.weights, opts, show_progress)?),
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

    let base = base.ok_or_else(|| Error::Setting {
        key: "--model".into(),
        msg: "is required to merge".into(),
    })?;
    for (ad, &w) in adapters.iter().zip(&plan.weights) {
        if ad.config.use_dora && w != 1.0 {
            return Err(Error::Setting {
                key: "--weights".into(),
                msg: format!(
                    "{w} for the DoRA adapter {}: a DoRA adapter merges with weight 1 only (its magnitudes fix the row norms)",
                    ad.name()
                ),
            });
        }
    }
    let terms = delta_terms(&adapters, &plan.weights, combined.as_ref());
    let full = full_tensors(&adapters, &base)?;
    let mut summary = base.write_merged(staging.path(), &terms, &full, plan, show_progress)?;
    summary.combination = combined.as_ref().map(|c| c.combination);
    summary.rank = combined.as_ref().map(|c| c.rank);
    staging.commit()?;
    Ok(summary)
}

/// The adapters combined into one (PEFT's add_weighted_adapter), with a progress bar.
fn combine_adapters(
    adapters: &[LoadedAdapter],
    weights: &[f64],
    opts: &CombineOptions,
    show_progress: bool,
) -> Result<Combined> {
    let n: usize = {
        let mut all: Vec<&String> = adapters.iter().flat_map(|a| a.modules.keys()).collect();
        all.sort();
        all.dedup();
        all.len()
    };
    let pb = progress(n, &format!("combining ({})", opts.combination.name()), show_progress);
    let c = combine::combine(adapters, weights, opts, |m| {
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
    Ok(c)
}

/// Folders that --output must not replace.
fn inputs(plan: &MergePlan, base: Option<&Base>) -> Vec<PathBuf> {
    let mut v = plan.adapters.clone();
    if let Some(b) = base {
        v.push(b.files.dir.clone());
    }
    v
}

/// The base tensors the adapters replace whole or by rows. A trained output matrix of a tied
/// base (which stores no lm_head.weight) is the trained embedding, which keeps the tie.
fn full_tensors<'a>(adapters: &'a [LoadedAdapter], base: &Base) -> Result<FullTensors<'a>> {
    let mut full = FullTensors::default();
    for ad in adapters {
        for (name, m) in &ad.whole {
            if name == "lm_head.weight" && !base.has_tensor(name) {
                if !ad.whole.contains_key("model.embed_tokens.weight") {
                    return Err(Error::Adapter {
                        path: ad.weights_path.clone(),
                        msg: "trains lm_head, but the base ties it to embed_tokens and stores no lm_head.weight; \
                              train it with ensure_weight_tying so the one matrix is saved for both"
                            .into(),
                    });
                }
                continue;
            }
            full.whole.insert(name.clone(), m);
        }
        if let Some((ids, rows)) = &ad.token_rows {
            full.rows
                .insert("model.embed_tokens.weight".into(), (ids.as_slice(), rows));
        }
    }
    Ok(full)
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
                terms.entry(format!("{path}.weight")).or_default().push(Term {
                    a,
                    b,
                    factor: 1.0,
                    magnitude: None,
                    principal: None,
                });
            }
        }
        None => {
            for (ad, &w) in adapters.iter().zip(weights) {
                for (path, p) in &ad.modules {
                    terms.entry(format!("{path}.weight")).or_default().push(Term {
                        a: &p.a,
                        b: &p.b,
                        factor: w * p.scale,
                        magnitude: p.magnitude.as_deref(),
                        principal: LoraInit::principal(ad.config.init_lora_weights.as_ref())
                            .map(|i| (i, p.rank(), p.scale)),
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
                    return Err(Error::MergeOutput {
                        dir: out.into(),
                        msg: "is one of the inputs; choose another folder".into(),
                    });
                }
            }
            let empty_dir = out.is_dir() && std::fs::read_dir(out).map(|mut d| d.next().is_none()).unwrap_or(false);
            if !empty_dir && !overwrite {
                return Err(Error::MergeOutput {
                    dir: out.into(),
                    msg: "already exists; pass --overwrite to replace it".into(),
                });
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
