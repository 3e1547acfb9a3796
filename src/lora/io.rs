//! PEFT adapter folders: `adapter_config.json` + `adapter_model.safetensors`, keys
//! `base_model.model.<module path>.lora_{A,B}.weight`, A [r, in], B [out, r] (and with DoRA
//! `base_model.model.<module path>.lora_magnitude_vector`, [out]). The one reader
//! ([`read_adapter`]) and the one writer ([`write_adapter`]) of these folders: training, eval,
//! infer and merge all go through them.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};

use super::config::LoraConfig;
use super::init::{take_principal, LoraInit};
use super::{magnitude_key, peft_key, Adapter, AdapterParam, EMBED_KEY, LM_HEAD_KEY, TOKENS_KEY};
use crate::error::{Error, Result};
use crate::model::linear::LoraAdapter;
use crate::model::weights::WeightSource;
use crate::model::Model;

pub const CONFIG_FILE: &str = "adapter_config.json";
/// The keys of fully trained tensors an adapter file may hold besides its LoRA pairs.
const EXTRA_KEYS: [&str; 3] = [EMBED_KEY, LM_HEAD_KEY, TOKENS_KEY];
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// Split an adapter key into (module path, 'A' | 'B' | 'M'), 'M' being DoRA's magnitude
/// vector. Accepts PEFT's on-disk form and the in-memory form that still carries an adapter name
/// (`lora_A.default.weight`).
pub fn parse_key(key: &str) -> Option<(String, char)> {
    let rest = key.strip_prefix("base_model.model.")?;
    if let Some(module) = rest.strip_suffix(".lora_magnitude_vector") {
        return Some((module.to_string(), 'M'));
    }
    let rest = rest.strip_suffix(".weight")?;
    for half in ['A', 'B'] {
        let tag = format!(".lora_{half}");
        if let Some(i) = rest.rfind(&tag) {
            let after = &rest[i + tag.len()..];
            // Either nothing, or one `.adapter_name` segment.
            if after.is_empty() || (after.starts_with('.') && !after[1..].contains('.')) {
                return Some((rest[..i].to_string(), half));
            }
        }
    }
    None
}

/// One LoRA pair as read from a file: f32 tensors on the CPU, with their on-disk keys.
#[derive(Debug, Clone)]
pub struct LoraTensors {
    pub a_key: String,
    pub b_key: String,
    /// `[r, in]`, r > 0.
    pub a: Tensor,
    /// `[out, r]`.
    pub b: Tensor,
    /// DoRA's magnitude vector `[out]` and its key.
    pub magnitude: Option<(String, Tensor)>,
}

impl LoraTensors {
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }
}

/// A PEFT adapter folder read into memory, checked on its own (not yet against a model): every
/// tensor is half of an A/B pair and the halves chain (`B: [out, r]`, `A: [r, in]`).
#[derive(Debug, Clone)]
pub struct AdapterFile {
    pub dir: PathBuf,
    pub weights_path: PathBuf,
    pub config: LoraConfig,
    /// Keyed by module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub modules: BTreeMap<String, LoraTensors>,
    /// The dtype the A/B tensors are stored in.
    pub dtype: DType,
    /// Fully trained tensors (modules_to_save, trainable tokens) by key, f32.
    pub extras: BTreeMap<String, Tensor>,
}

/// Read and check the PEFT adapter folder `dir`. Pickle-only adapters (`adapter_model.bin`)
/// are refused, never loaded.
pub fn read_adapter(dir: &Path) -> Result<AdapterFile> {
    let config = LoraConfig::from_file(&dir.join(CONFIG_FILE))?;
    let weights_path = dir.join(WEIGHTS_FILE);
    if !weights_path.is_file() {
        if dir.join("adapter_model.bin").exists() {
            return Err(Error::Adapter {
                path: dir.into(),
                msg: "only a pickle adapter (adapter_model.bin) is present; lorafold never loads \
                      pickle files. Re-save it with PEFT's save_pretrained(..., safe_serialization=True)"
                    .into(),
            });
        }
        return Err(Error::MissingFile { path: weights_path });
    }
    let ws = WeightSource::open(std::slice::from_ref(&weights_path))?;
    let mut modules = BTreeMap::new();
    let mut dtype = DType::F32;
    for (module, (a_key, b_key, m_key)) in pair_keys(&ws, &weights_path)? {
        check_pair_shapes(&ws, &weights_path, &a_key, &b_key)?;
        dtype = ws.stored_dtype(&a_key)?;
        let a = ws.load(&a_key, &ws.shape(&a_key)?, DType::F32, &Device::Cpu)?;
        let b = ws.load(&b_key, &ws.shape(&b_key)?, DType::F32, &Device::Cpu)?;
        let magnitude = match m_key {
            Some(k) => {
                let out = b.dims()[0];
                let m = ws.load(&k, &[out], DType::F32, &Device::Cpu)?;
                Some((k, m))
            }
            None => None,
        };
        check_dora(&config, &dir.join(CONFIG_FILE), &module, magnitude.is_some())?;
        modules.insert(
            module,
            LoraTensors {
                a_key,
                b_key,
                a,
                b,
                magnitude,
            },
        );
    }
    let mut extras = BTreeMap::new();
    for key in EXTRA_KEYS {
        if ws.names().any(|n| n == key) {
            extras.insert(
                key.to_string(),
                ws.load(key, &ws.shape(key)?, DType::F32, &Device::Cpu)?,
            );
        }
    }
    Ok(AdapterFile {
        dir: dir.into(),
        weights_path,
        config,
        modules,
        dtype,
        extras,
    })
}

/// A module's magnitude vector is there exactly when the config says `use_dora`.
fn check_dora(config: &LoraConfig, config_path: &Path, module: &str, has_magnitude: bool) -> Result<()> {
    let msg = match (config.use_dora, has_magnitude) {
        (true, false) => format!("is true, but {WEIGHTS_FILE} holds no {:?}", magnitude_key(module)),
        (false, true) => format!(
            "is false, but {WEIGHTS_FILE} holds the DoRA magnitude {:?}",
            magnitude_key(module)
        ),
        _ => return Ok(()),
    };
    Err(Error::Config {
        path: config_path.into(),
        key: "use_dora".into(),
        msg,
    })
}

/// The (A key, B key, magnitude key) of each module of `ws`, by module path; every key must
/// parse, and A and B must both be there.
#[allow(clippy::type_complexity)]
fn pair_keys(ws: &WeightSource, weights_path: &Path) -> Result<BTreeMap<String, (String, String, Option<String>)>> {
    let mut names: Vec<&String> = ws.names().filter(|n| !EXTRA_KEYS.contains(&n.as_str())).collect();
    names.sort();
    let mut halves: BTreeMap<String, [Option<String>; 3]> = BTreeMap::new();
    for name in names {
        let (module, half) = parse_key(name).ok_or_else(|| Error::AdapterKeyUnmatched {
            path: weights_path.into(),
            key: name.clone(),
        })?;
        let i = match half {
            'A' => 0,
            'B' => 1,
            _ => 2,
        };
        halves.entry(module).or_default()[i] = Some(name.clone());
    }
    if halves.is_empty() {
        return Err(Error::Adapter {
            path: weights_path.into(),
            msg: "holds no LoRA tensors".into(),
        });
    }
    let mut pairs = BTreeMap::new();
    for (module, [ka, kb, km]) in halves {
        let (ka, kb) = match (ka, kb) {
            (Some(a), Some(b)) => (a, b),
            (Some(key), None) | (None, Some(key)) => {
                let missing = if key.contains(".lora_A") { 'B' } else { 'A' };
                return Err(Error::AdapterPairMissing {
                    path: weights_path.into(),
                    key,
                    missing: peft_key(&module, missing),
                });
            }
            (None, None) => {
                let key = km.unwrap_or_default();
                return Err(Error::AdapterPairMissing {
                    path: weights_path.into(),
                    key,
                    missing: peft_key(&module, 'A'),
                });
            }
        };
        pairs.insert(module, (ka, kb, km));
    }
    Ok(pairs)
}

/// Check that A is `[r, in]` with r > 0 and B is `[out, r]`. An empty shape is an error naming
/// the tensor, never a size of 0.
fn check_pair_shapes(ws: &WeightSource, weights_path: &Path, ka: &str, kb: &str) -> Result<()> {
    let sa = ws.shape(ka)?;
    let sb = ws.shape(kb)?;
    if sa.len() != 2 || sa[0] == 0 {
        return Err(Error::Adapter {
            path: weights_path.into(),
            msg: format!("tensor {ka:?} has shape {sa:?}; a LoRA A must be [r, in_features] with r > 0"),
        });
    }
    let r = sa[0];
    let Some(&out) = sb.first() else {
        return Err(Error::Adapter {
            path: weights_path.into(),
            msg: format!("tensor {kb:?} has shape []; a LoRA B must be [out_features, {r}]"),
        });
    };
    if sb.len() != 2 || sb[1] != r {
        return Err(Error::ShapeMismatch {
            path: weights_path.into(),
            name: kb.into(),
            expected: vec![out, r],
            got: sb,
        });
    }
    Ok(())
}
/// The base model an adapter folder's adapter_config.json records (`base_model_name_or_path`),
/// if it names one.
pub fn recorded_base(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(CONFIG_FILE)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("base_model_name_or_path")?
        .as_str()
        .map(str::to_string)
        .filter(|s| !s.is_empty())
}

/// A note when the adapter in `dir` was trained on another base than `model` (a path or hub
/// id; local folders are compared by their absolute paths). `None` when they agree or the
/// adapter records no base.
pub fn base_mismatch_note(dir: &Path, model: &str) -> Option<String> {
    let recorded = recorded_base(dir)?;
    let same = |a: &str, b: &str| match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => a.trim_end_matches('/') == b.trim_end_matches('/'),
    };
    (!same(&recorded, model)).then(|| {
        format!(
            "note: adapter {} was trained on {recorded:?}, not on --model {model:?}; its shapes are checked, \
             its results may not carry over",
            dir.display()
        )
    })
}

/// Load a PEFT adapter folder into a new slot of `model`. Strict: every tensor must be half of an
/// A/B pair of a linear layer of this model, with shapes that fit it. With `trainable`, A and B
/// become `Var`s (to continue training); otherwise they are frozen tensors.
pub fn load_adapter(model: &mut Model, dir: &Path, trainable: bool) -> Result<Adapter> {
    let file = read_adapter(dir)?;
    check_fits(model, &file)?;
    let slot = model.num_adapter_slots();
    let device = model.device().clone();
    let mut params = Vec::new();
    let mut initial = Vec::new();
    let principal = LoraInit::principal(file.config.init_lora_weights.as_ref());
    for lin in model.linears_mut() {
        let Some(t) = file.modules.get(&lin.path) else {
            lin.set_adapter(slot, None);
            continue;
        };
        if let Some(init) = principal {
            rebuild_residual(lin, init, t, &file, &mut initial)?;
        }
        let a = push_param(&mut params, &peft_key(&lin.path, 'A'), &t.a, &device, trainable)?;
        let b = push_param(&mut params, &peft_key(&lin.path, 'B'), &t.b, &device, trainable)?;
        let magnitude = match &t.magnitude {
            None => None,
            Some((key, m)) => Some(push_param(&mut params, key, m, &device, trainable)?),
        };
        let ad = LoraAdapter {
            a,
            b,
            scale: file.config.scale_for(&lin.path, t.rank()),
            dropout: file.config.lora_dropout as f32,
            base_row_sq: match &magnitude {
                Some(_) => LoraAdapter::weight_row_sq(&lin.weight)?,
                None => None,
            },
            magnitude,
        };
        lin.set_adapter(slot, Some(ad));
    }
    let aliases = load_extras(model, &file, slot, trainable, &mut params)?;
    Ok(Adapter {
        slot,
        config: file.config,
        params,
        initial,
        aliases,
    })
}

/// `t` on `device` as the adapter parameter `key` (a `Var` when `trainable`), appended to
/// `params`; returns the tensor the model uses.
fn push_param(
    params: &mut Vec<AdapterParam>,
    key: &str,
    t: &Tensor,
    device: &Device,
    trainable: bool,
) -> Result<Tensor> {
    let t = t.to_device(device)?;
    let (t, var) = if trainable {
        let v = Var::from_tensor(&t)?;
        (v.as_tensor().clone(), Some(v))
    } else {
        (t, None)
    };
    params.push(AdapterParam {
        key: key.into(),
        tensor: t.clone(),
        var,
    });
    Ok(t)
}

/// An adapter saved unconverted (PEFT's PiSSA / OLoRA form): rebuild the residual base of `lin`
/// as PEFT's from_pretrained does, from the untouched base weight, and keep the initial pair.
fn rebuild_residual(
    lin: &mut crate::model::linear::LoraLinear,
    init: LoraInit,
    t: &LoraTensors,
    file: &AdapterFile,
    initial: &mut Vec<(String, Tensor)>,
) -> Result<()> {
    let scale = file.config.scale_for(&lin.path, t.rank());
    let (a0, b0) = take_principal(lin, init, t.rank(), scale).map_err(|e| Error::Adapter {
        path: file.dir.clone(),
        msg: e.to_string(),
    })?;
    initial.push((peft_key(&lin.path, 'A'), a0));
    initial.push((peft_key(&lin.path, 'B'), b0));
    Ok(())
}

/// Every module `modules_to_save` lists has its tensor in the file (a tied model: with
/// ensure_weight_tying, under either name), and trainable tokens have theirs.
fn check_extras_listed(model: &Model, file: &AdapterFile) -> Result<()> {
    let bad = |msg: String| Error::Config {
        path: file.dir.join(CONFIG_FILE),
        key: "modules_to_save".into(),
        msg,
    };
    let (embed, head) = file.config.saved_modules().map_err(bad)?;
    let tied = model.cfg.tie_word_embeddings;
    if tied && head && !file.config.ensure_weight_tying {
        return Err(bad(
            "lists lm_head, which this model ties to embed_tokens; lorafold reads such adapters only with \
             ensure_weight_tying (one matrix for both)"
                .into(),
        ));
    }
    let has = |k: &str| file.extras.contains_key(k);
    for (listed, name, ok) in [
        (embed, "embed_tokens", has(EMBED_KEY) || (tied && has(LM_HEAD_KEY))),
        (head, "lm_head", has(LM_HEAD_KEY) || (tied && has(EMBED_KEY))),
    ] {
        if listed && !ok {
            return Err(bad(format!(
                "lists {name}, but {WEIGHTS_FILE} holds no trained {name} tensor"
            )));
        }
    }
    let tokens = file.config.token_indices().unwrap_or_default();
    if !tokens.is_empty() && !has(TOKENS_KEY) {
        return Err(Error::Config {
            path: file.dir.join(CONFIG_FILE),
            key: "trainable_token_indices".into(),
            msg: format!("is set, but {WEIGHTS_FILE} holds no {TOKENS_KEY:?}"),
        });
    }
    Ok(())
}

/// Put the fully trained tensors of `file` (modules_to_save, trainable tokens) into `slot`;
/// returns the key aliases of a tied model.
fn load_extras(
    model: &mut Model,
    file: &AdapterFile,
    slot: usize,
    trainable: bool,
    params: &mut Vec<AdapterParam>,
) -> Result<Vec<(String, String)>> {
    check_extras_listed(model, file)?;
    if file.extras.is_empty() {
        model.set_extras(slot, None);
        return Ok(vec![]);
    }
    let device = model.device().clone();
    let mut take = |key: &str| -> Result<Option<Tensor>> {
        match file.extras.get(key) {
            Some(t) => Ok(Some(push_param(params, key, t, &device, trainable)?)),
            None => Ok(None),
        }
    };
    let mut extras = crate::model::SlotExtras::default();
    let mut aliases = vec![];
    let tied = model.cfg.tie_word_embeddings && file.config.ensure_weight_tying;
    if tied {
        // One matrix serves both; PEFT wrote it under both names.
        let w = match take(EMBED_KEY)? {
            Some(w) => Some(w),
            None => take(LM_HEAD_KEY)?,
        };
        extras.embed = w.clone();
        extras.lm_head = w;
        aliases.push((LM_HEAD_KEY.to_string(), EMBED_KEY.to_string()));
    } else {
        extras.embed = take(EMBED_KEY)?;
        extras.lm_head = take(LM_HEAD_KEY)?;
    }
    if let Some(delta) = take(TOKENS_KEY)? {
        let ids = file.config.token_indices().map_err(|msg| Error::Config {
            path: file.dir.join(CONFIG_FILE),
            key: "trainable_token_indices".into(),
            msg,
        })?;
        extras.tokens = Some((ids, delta));
    }
    model.set_extras(slot, Some(extras));
    Ok(aliases)
}

/// Every module of `file` must be a linear layer of `model`, with A `[r, in]` and B `[out, r]`
/// fitting that layer.
fn check_fits(model: &Model, file: &AdapterFile) -> Result<()> {
    let (v, h) = (model.cfg.vocab_size, model.cfg.hidden_size);
    let n_tokens = file.config.token_indices().map(|t| t.len()).unwrap_or(0);
    for (key, t) in &file.extras {
        let expected = if key == TOKENS_KEY {
            vec![n_tokens, h]
        } else {
            vec![v, h]
        };
        if t.dims() != expected.as_slice() {
            return Err(Error::ShapeMismatch {
                path: file.weights_path.clone(),
                name: key.clone(),
                expected,
                got: t.dims().to_vec(),
            });
        }
    }
    let sizes: HashMap<&str, (usize, usize)> = model
        .linears()
        .map(|l| (l.path.as_str(), (l.in_features(), l.out_features())))
        .collect();
    for (module, t) in &file.modules {
        let Some(&(inp, out)) = sizes.get(module.as_str()) else {
            return Err(Error::AdapterKeyUnmatched {
                path: file.weights_path.clone(),
                key: t.a_key.clone(),
            });
        };
        let r = t.rank();
        for (key, tensor, expected) in [(&t.a_key, &t.a, [r, inp]), (&t.b_key, &t.b, [out, r])] {
            if tensor.dims() != expected {
                return Err(Error::ShapeMismatch {
                    path: file.weights_path.clone(),
                    name: key.clone(),
                    expected: expected.to_vec(),
                    got: tensor.dims().to_vec(),
                });
            }
        }
    }
    Ok(())
}

impl Adapter {
    /// Write the adapter as a PEFT folder (creating `dir`), see [`write_adapter`]. A PiSSA or
    /// OLoRA adapter is written as PEFT saves it without conversion: relative to the residual
    /// base, which PEFT (and lorafold) rebuild from the untouched base when loading it.
    pub fn save(&self, dir: &Path, base_model_name_or_path: Option<&str>) -> Result<()> {
        write_adapter(
            dir,
            &self.config,
            base_model_name_or_path,
            &self.with_aliases(self.tensors()),
        )
    }

    fn tensors(&self) -> Vec<(String, Tensor)> {
        self.params.iter().map(|p| (p.key.clone(), p.tensor.clone())).collect()
    }

    /// `tensors` plus each alias key with its source's tensor.
    fn with_aliases(&self, mut tensors: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
        for (extra, source) in &self.aliases {
            if let Some(t) = tensors.iter().find(|(k, _)| k == source).map(|(_, t)| t.clone()) {
                tensors.push((extra.clone(), t));
            }
        }
        tensors
    }

    /// Whether the adapter started from the principal part of the base (PiSSA / OLoRA).
    pub fn is_principal(&self) -> bool {
        !self.initial.is_empty()
    }

    /// Write the adapter so that it works on the untouched base model everywhere: a PiSSA or
    /// OLoRA adapter becomes the plain LoRA of rank 2r that PEFT's
    /// `path_initial_model_for_weight_conversion` writes (A′ = [A; A₀], B′ = [B, −B₀], r, alpha
    /// and the patterns doubled, alpha × √2 with rsLoRA, init_lora_weights true). Other adapters
    /// are written as [`Adapter::save`] writes them.
    pub fn save_converted(&self, dir: &Path, base_model_name_or_path: Option<&str>) -> Result<()> {
        if !self.is_principal() {
            return self.save(dir, base_model_name_or_path);
        }
        let start: HashMap<&str, &Tensor> = self.initial.iter().map(|(k, t)| (k.as_str(), t)).collect();
        let mut tensors = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let t = match start.get(p.key.as_str()) {
                Some(t0) if p.key.contains(".lora_A.") => Tensor::cat(&[&p.tensor, *t0], 0)?,
                Some(t0) if p.key.contains(".lora_B.") => Tensor::cat(&[&p.tensor, &t0.neg()?], 1)?,
                _ => p.tensor.clone(),
            };
            tensors.push((p.key.clone(), t));
        }
        let tensors = self.with_aliases(tensors);
        let mut config = self.config.clone();
        config.init_lora_weights = Some(serde_json::json!(true));
        config.r *= 2;
        config.lora_alpha *= if config.use_rslora { 2f64.sqrt() } else { 2.0 };
        config.rank_pattern.values_mut().for_each(|r| *r *= 2);
        config.alpha_pattern.values_mut().for_each(|a| *a *= 2.0);
        write_adapter(dir, &config, base_model_name_or_path, &tensors)
    }
}

/// Write a PEFT adapter folder (creating `dir`): `config` with `inference_mode` set (and
/// `base_model_name_or_path` when given), and `tensors` in their own dtype. Each file is written
/// under a temporary name and renamed into place.
pub fn write_adapter(
    dir: &Path,
    config: &LoraConfig,
    base_model_name_or_path: Option<&str>,
    tensors: &[(String, Tensor)],
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut config = config.clone();
    config.inference_mode = true;
    if base_model_name_or_path.is_some() {
        config.base_model_name_or_path = base_model_name_or_path.map(str::to_string);
    }
    let json = serde_json::to_string_pretty(&config).map_err(|e| Error::Msg(e.to_string()))?;
    write_atomic(&dir.join(CONFIG_FILE), json.as_bytes())?;
    save_safetensors(&dir.join(WEIGHTS_FILE), tensors)
}

/// Whether `dir` holds both files of a PEFT adapter (what merge and infer need of a folder).
pub fn is_adapter_folder(dir: &Path) -> bool {
    dir.join(CONFIG_FILE).is_file() && dir.join(WEIGHTS_FILE).is_file()
}

/// The `checkpoint-<step>` folders directly under `dir` that `complete` accepts, oldest first.
/// Training resumes only from folders with every checkpoint file; merge only needs an adapter.
pub fn checkpoint_folders(dir: &Path, complete: impl Fn(&Path) -> bool) -> Vec<(usize, PathBuf)> {
    let mut out: Vec<(usize, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step: usize = name.strip_prefix("checkpoint-")?.parse().ok()?;
            let p = e.path();
            complete(&p).then_some((step, p))
        })
        .collect();
    out.sort();
    out
}

/// Write bytes to `path` through a temporary file in the same folder, flushed to disk, and an
/// atomic rename. On failure (disk full...) the temporary file is removed and `path` is untouched.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = tmp_name(path);
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(&tmp, e));
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn tmp_name(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

/// Save tensors as safetensors with `{"format": "pt"}` metadata (what PyTorch tools expect),
/// atomically. Tensors are written in their own dtype (f32, f16, bf16 supported).
pub fn save_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    use safetensors::tensor::{Dtype, TensorView};
    let mut owned: Vec<(String, Vec<u8>, Vec<usize>, Dtype)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let shape = t.dims().to_vec();
        let t = t.flatten_all()?;
        let (bytes, dt) = match t.dtype() {
            DType::F32 => (
                t.to_vec1::<f32>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
                Dtype::F32,
            ),
            DType::F16 => (
                t.to_vec1::<half::f16>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
                Dtype::F16,
            ),
            DType::BF16 => (
                t.to_vec1::<half::bf16>()?
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
                Dtype::BF16,
            ),
            // internal invariant: lorafold only saves the float tensors it creates
            other => return Err(Error::Msg(format!("tensor {name}: cannot save dtype {other:?}"))),
        };
        owned.push((name.clone(), bytes, shape, dt));
    }
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(n, b, s, d)| {
            TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Msg(format!("tensor {n}: {e}")))
        })
        .collect::<Result<_>>()?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    // Serialised in memory and written with `write_atomic`, not with `serialize_to_file`: that
    // one goes through a randomly named temporary file (left behind if the process is killed
    // mid-write) created with mode 0600 (adapters unreadable to other users).
    let bytes = safetensors::tensor::serialize(views, Some(meta))
        .map_err(|e| Error::Msg(format!("{}: {e}", path.display())))?;
    drop(owned);
    write_atomic(path, &bytes)
}
