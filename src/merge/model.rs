//! The base checkpoint of a merge: resolved (local folder or hub id), memory-mapped, checked
//! against the adapters, and streamed into the merged output one tensor at a time.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::Dtype;

use super::adapter::LoadedAdapter;
use super::writer::{self, OutTensor};
use super::{progress, MergePlan, MergeSummary};
use crate::error::{Error, Result};
use crate::hub::{resolve_model, ModelFiles};
use crate::linalg::mat::Mat;
use crate::lora::init::{principal_pair, residual, LoraInit};
use crate::lora::io::write_atomic;
use crate::lora::peft_key;
use crate::model::weights::WeightSource;

/// Base tensors an adapter replaces outright (modules_to_save) or row by row (trainable
/// tokens), by base tensor name.
#[derive(Default)]
pub struct FullTensors<'a> {
    pub whole: BTreeMap<String, &'a Mat>,
    pub rows: BTreeMap<String, (&'a [u32], &'a Mat)>,
}

/// One low-rank update of a base tensor: `W += factor · B·A`, then with DoRA each row `i`
/// scaled by `magnitude[i] / ‖row i‖` (PEFT's DoRA merge).
pub struct Term<'a> {
    pub a: &'a Mat,
    pub b: &'a Mat,
    pub factor: f64,
    pub magnitude: Option<&'a [f32]>,
    /// An unconverted PiSSA / OLoRA adapter (its initialisation, rank and scale): the weight is
    /// first replaced by the residual PEFT builds from it.
    pub principal: Option<(LoraInit, usize, f64)>,
}

/// The base checkpoint: its files and a memory map of every shard.
pub struct Base {
    pub files: ModelFiles,
    revision: Option<String>,
    st: MmapedSafetensors,
    /// Tensor names in output order (natural order).
    names: Vec<String>,
}

impl Base {
    pub fn open(spec: &str, revision: Option<&str>) -> Result<Base> {
        let files = resolve_model(spec, revision)?;
        // Validates every header (and names the file) before mapping.
        let ws = WeightSource::open(&files.weights)?;
        let mut names: Vec<String> = ws.names().cloned().collect();
        drop(ws);
        names.sort_by(|a, b| writer::natural_cmp(a, b));
        // SAFETY: the files are mapped read-only and never written by lorafold; the output goes
        // to a different folder (checked by `Staging::new`).
        let st = unsafe { MmapedSafetensors::multi(&files.weights) }.map_err(|e| Error::Safetensors {
            path: files.dir.clone(),
            msg: e.to_string(),
        })?;
        Ok(Base {
            files,
            revision: revision.map(str::to_string),
            st,
            names,
        })
    }

    fn view(&self, name: &str) -> Result<safetensors::tensor::TensorView<'_>> {
        self.st.get(name).map_err(|e| Error::Safetensors {
            path: self.files.dir.clone(),
            msg: format!("tensor {name:?}: {e}"),
        })
    }

    /// Whether the checkpoint holds a tensor of this name.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.has(name)
    }

    fn has(&self, name: &str) -> bool {
        self.names.binary_search_by(|n| writer::natural_cmp(n, name)).is_ok()
    }

    /// Every module of the adapter must exist in the base with a shape that fits.
    pub fn check_adapter(&self, ad: &LoadedAdapter) -> Result<()> {
        let model = &self.files.name;
        for (path, pair) in &ad.modules {
            let wname = format!("{path}.weight");
            if !self.has(&wname) {
                let hint = if path.ends_with("lm_head") && self.has("model.embed_tokens.weight") {
                    " (this model ties lm_head to embed_tokens and stores no lm_head.weight; \
                     lorafold does not merge adapters on a tied lm_head)"
                } else {
                    "; was this adapter trained on another base model?"
                };
                return Err(Error::Adapter {
                    path: ad.weights_path.clone(),
                    msg: format!(
                        "tensor {:?} adapts module {path}, but base model {model} has no tensor {wname:?}{hint}",
                        peft_key(path, 'A')
                    ),
                });
            }
            let view = self.view(&wname)?;
            let shape = view.shape().to_vec();
            if !matches!(view.dtype(), Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64) || shape.len() != 2 {
                return Err(Error::Adapter {
                    path: ad.weights_path.clone(),
                    msg: format!(
                        "module {path}: base tensor {wname:?} is {:?} {shape:?}; only 2-D float weights can be merged",
                        view.dtype()
                    ),
                });
            }
            let (out, inp, r) = (shape[0], shape[1], pair.rank());
            for (half, got, expected) in [
                ('A', [pair.a.rows, pair.a.cols], [r, inp]),
                ('B', [pair.b.rows, pair.b.cols], [out, r]),
            ] {
                if got != expected {
                    return Err(Error::Adapter {
                        path: ad.weights_path.clone(),
                        msg: format!(
                            "tensor {:?} has shape {got:?}, but base tensor {wname:?} of {model} is \
                             {shape:?}, so it must be {expected:?}; was this adapter trained on another base model?",
                            peft_key(path, half)
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// Stream the merged checkpoint into `dir`, then copy config and tokenizer files.
    pub fn write_merged(
        &self,
        dir: &Path,
        terms: &BTreeMap<String, Vec<Term<'_>>>,
        full: &FullTensors<'_>,
        plan: &MergePlan,
        show_progress: bool,
    ) -> Result<MergeSummary> {
        let mut out = Vec::with_capacity(self.names.len());
        for name in &self.names {
            let view = self.view(name)?;
            let dtype = match (plan.dtype, view.dtype()) {
                (Some(dt), Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64) => st_dtype(dt),
                (_, d) => d,
            };
            out.push(OutTensor {
                name: name.clone(),
                dtype,
                shape: view.shape().to_vec(),
            });
        }
        let shards = writer::plan_shards(&out, plan.max_shard_size);
        let files = writer::shard_names(shards.len());
        let pb = progress(out.len(), "merging", show_progress);
        let mut merged = 0usize;
        for (shard, file) in shards.iter().zip(&files) {
            let tensors: Vec<&OutTensor> = shard.iter().map(|&i| &out[i]).collect();
            writer::write_file(&dir.join(file), &tensors, |t| {
                pb.set_message(t.name.clone());
                pb.inc(1);
                let view = self.view(&t.name)?;
                let ts = terms.get(&t.name).map(Vec::as_slice).unwrap_or(&[]);
                match merged_data(t, &view, ts, full)? {
                    None if t.dtype == view.dtype() => Ok(Cow::Borrowed(view.data())),
                    None => Ok(Cow::Owned(
                        from_f32(&to_f32(view.dtype(), view.data(), &t.name)?, t.dtype, &t.name)?.0,
                    )),
                    Some(w) => {
                        merged += 1;
                        let (bytes, bad) = from_f32(&w, t.dtype, &t.name)?;
                        report_non_finite(&t.name, bad, plan.safe_merge)?;
                        Ok(Cow::Owned(bytes))
                    }
                }
            })?;
        }
        pb.finish_and_clear();
        if shards.len() > 1 {
            writer::write_index(dir, &out, &shards, &files)?;
        }
        let copied = self.copy_side_files(dir, plan.dtype)?;
        Ok(MergeSummary {
            output: plan.output.clone(),
            merged_tensors: merged,
            total_tensors: out.len(),
            shards: shards.len(),
            bytes: out.iter().map(|t| t.nbytes() as u64).sum(),
            combination: None,
            rank: None,
            copied_files: copied,
        })
    }

    /// Copy config.json, generation_config.json and the tokenizer files. With a --dtype change,
    /// config.json's dtype is rewritten.
    fn copy_side_files(&self, dir: &Path, dtype: Option<DType>) -> Result<Vec<String>> {
        const EXACT: [&str; 7] = [
            "config.json",
            "generation_config.json",
            "special_tokens_map.json",
            "added_tokens.json",
            "chat_template.jinja",
            "chat_template.json",
            "preprocessor_config.json",
        ];
        const PREFIXES: [&str; 3] = ["tokenizer", "vocab", "merges"];
        // A hub model only has the files lorafold fetched so far; fetch the usual extras.
        if !Path::new(&self.files.name).is_dir() {
            if let Ok(repo) =
                crate::hub::HubRepo::new(&self.files.name, self.revision.as_deref(), hf_hub::RepoType::Model)
            {
                for f in [
                    "special_tokens_map.json",
                    "tokenizer.model",
                    "vocab.json",
                    "merges.txt",
                    "added_tokens.json",
                    "chat_template.jinja",
                ] {
                    let _ = repo.get(f);
                }
            }
        }
        let mut copied = Vec::new();
        let entries = std::fs::read_dir(&self.files.dir).map_err(|e| Error::io(&self.files.dir, e))?;
        let mut names: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for name in names {
            let wanted = EXACT.contains(&name.as_str()) || PREFIXES.iter().any(|p| name.starts_with(p));
            let src = self.files.dir.join(&name);
            if !wanted || !src.is_file() {
                continue;
            }
            let dst = dir.join(&name);
            if name == "config.json" {
                if let Some(dt) = dtype {
                    let mut cfg: serde_json::Value = crate::error::read_json(&src)?;
                    if let Some(obj) = cfg.as_object_mut() {
                        let value = serde_json::Value::String(dtype_name(dt).into());
                        let mut set = false;
                        for key in ["dtype", "torch_dtype"] {
                            if obj.contains_key(key) {
                                obj.insert(key.into(), value.clone());
                                set = true;
                            }
                        }
                        if !set {
                            obj.insert("torch_dtype".into(), value);
                        }
                    }
                    let text = serde_json::to_string_pretty(&cfg).map_err(|e| Error::Msg(e.to_string()))?;
                    write_atomic(&dst, format!("{text}\n").as_bytes())?;
                    copied.push(name);
                    continue;
                }
            }
            std::fs::copy(&src, &dst).map_err(|e| Error::io(&dst, e))?;
            copied.push(name);
        }
        Ok(copied)
    }
}

/// NaN/infinity in a merged tensor: an error under --safe_merge, a warning otherwise.
fn report_non_finite(name: &str, bad: usize, safe: bool) -> Result<()> {
    if bad == 0 {
        return Ok(());
    }
    if safe {
        return Err(Error::MergeNonFinite {
            name: name.into(),
            count: bad,
        });
    }
    eprintln!("warning: merged tensor {name:?} has {bad} NaN/infinite values (use --safe_merge to refuse)");
    Ok(())
}

/// `w += factor · B·A` for a row-major `w` with `cols` columns, computed in blocks of rows of B
/// so that no full-size delta is ever allocated. Each element is rounded as PEFT rounds it:
/// `w + ((B·A) · factor)` in f32.
fn add_delta(w: &mut [f32], cols: usize, term: &Term<'_>) -> Result<()> {
    let (r, f) = (term.a.rows, term.factor as f32);
    let a = term.a.to_tensor()?;
    let block = (1usize << 22).div_ceil(cols.max(1)).max(1);
    let mut row = 0;
    while row < term.b.rows {
        let n = block.min(term.b.rows - row);
        let b = Tensor::from_slice(&term.b.data[row * r..(row + n) * r], (n, r), &Device::Cpu)?;
        let d = b.matmul(&a)?.flatten_all()?.to_vec1::<f32>()?;
        for (x, y) in w[row * cols..(row + n) * cols].iter_mut().zip(&d) {
            *x += y * f;
        }
        row += n;
    }
    Ok(())
}

/// The merged f32 data of `t` (the base's, or its whole replacement, with replaced rows, then
/// each term in turn), or `None` when nothing changes it.
fn merged_data(
    t: &OutTensor,
    view: &safetensors::tensor::TensorView<'_>,
    ts: &[Term<'_>],
    full: &FullTensors<'_>,
) -> Result<Option<Vec<f32>>> {
    let whole = full.whole.get(&t.name);
    let rows = full.rows.get(&t.name);
    if ts.is_empty() && whole.is_none() && rows.is_none() {
        return Ok(None);
    }
    let cols = t.shape[1];
    let mut w = match whole {
        Some(m) => m.data.clone(),
        None => to_f32(view.dtype(), view.data(), &t.name)?,
    };
    if let Some((ids, new)) = rows {
        for (k, &id) in ids.iter().enumerate() {
            w[id as usize * cols..(id as usize + 1) * cols].copy_from_slice(&new.data[k * cols..(k + 1) * cols]);
        }
    }
    for term in ts {
        if let Some((init, r, scale)) = term.principal {
            let m = Mat {
                rows: t.shape[0],
                cols,
                data: std::mem::take(&mut w),
            };
            let (a0, b0) = principal_pair(init, &m, r, scale)?;
            w = residual(&m, &a0, &b0, scale)?.data;
        }
        add_delta(&mut w, cols, term)?;
        if let Some(m) = term.magnitude {
            scale_rows_to(&mut w, cols, m);
        }
    }
    Ok(Some(w))
}

/// DoRA's merge: row `i` of the row-major `w` (`cols` columns) times `m[i] / ‖row i‖`, the norm
/// summed in f32 as torch's `linalg.norm` over a row.
fn scale_rows_to(w: &mut [f32], cols: usize, m: &[f32]) {
    for (row, &mi) in w.chunks_exact_mut(cols.max(1)).zip(m) {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        let f = mi / norm;
        row.iter_mut().for_each(|x| *x *= f);
    }
}

/// Decode little-endian float bytes into f32.
fn to_f32(dtype: Dtype, bytes: &[u8], name: &str) -> Result<Vec<f32>> {
    Ok(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
            .collect(),
        other => return Err(dtype_error(name, "convert", other)),
    })
}

fn dtype_error(name: &str, action: &'static str, dtype: Dtype) -> Error {
    Error::TensorDtype {
        name: name.into(),
        action,
        dtype,
    }
}

/// Encode f32 values in `dtype` (round to nearest even), and count the non-finite stored values.
fn from_f32(w: &[f32], dtype: Dtype, name: &str) -> Result<(Vec<u8>, usize)> {
    let mut bad = 0usize;
    let mut out = Vec::with_capacity(w.len() * dtype.bitsize() / 8);
    match dtype {
        Dtype::F32 => {
            for x in w {
                bad += usize::from(!x.is_finite());
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        Dtype::BF16 => {
            for x in w {
                let v = half::bf16::from_f32(*x);
                bad += usize::from(!v.is_finite());
                out.extend_from_slice(&v.to_bits().to_le_bytes());
            }
        }
        Dtype::F16 => {
            for x in w {
                let v = half::f16::from_f32(*x);
                bad += usize::from(!v.is_finite());
                out.extend_from_slice(&v.to_bits().to_le_bytes());
            }
        }
        Dtype::F64 => {
            for x in w {
                bad += usize::from(!x.is_finite());
                out.extend_from_slice(&(*x as f64).to_le_bytes());
            }
        }
        other => return Err(dtype_error(name, "write", other)),
    }
    Ok((out, bad))
}

fn st_dtype(dt: DType) -> Dtype {
    match dt {
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::F64 => Dtype::F64,
        _ => Dtype::F32,
    }
}

fn dtype_name(dt: DType) -> &'static str {
    match dt {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        DType::F64 => "float64",
        _ => "float32",
    }
}
