//! PEFT adapter folders: `adapter_config.json` + `adapter_model.safetensors`, keys
//! `base_model.model.<module path>.lora_{A,B}.weight`, A [r, in], B [out, r].

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor, Var};

use super::config::LoraConfig;
use super::{peft_key, Adapter, AdapterParam};
use crate::error::{Error, Result};
use crate::model::linear::LoraAdapter;
use crate::model::weights::WeightSource;
use crate::model::Model;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// Split an adapter key into (module path, 'A' | 'B'). Accepts PEFT's on-disk form and the
/// in-memory form that still carries an adapter name (`lora_A.default.weight`).
pub fn parse_key(key: &str) -> Option<(String, char)> {
    let rest = key.strip_prefix("base_model.model.")?;
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

/// Load a PEFT adapter folder into a new slot of `model`. Strict: every tensor must be half of an
/// A/B pair of a linear layer of this model, with shapes that fit it. With `trainable`, A and B
/// become `Var`s (to continue training); otherwise they are frozen tensors.
pub fn load_adapter(model: &mut Model, dir: &Path, trainable: bool) -> Result<Adapter> {
    let config_path = dir.join(CONFIG_FILE);
    let config = LoraConfig::from_file(&config_path)?;
    let weights_path = dir.join(WEIGHTS_FILE);
    if !weights_path.exists() {
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

    // Group tensors by module.
    let mut pairs: BTreeMap<String, HashMap<char, String>> = BTreeMap::new();
    let mut names: Vec<&String> = ws.names().collect();
    names.sort();
    for name in names {
        let (module, half) = parse_key(name).ok_or_else(|| Error::AdapterKeyUnmatched {
            path: weights_path.clone(),
            key: name.clone(),
        })?;
        pairs.entry(module).or_default().insert(half, name.clone());
    }
    let known: HashMap<String, ()> = model.linears().map(|l| (l.path.clone(), ())).collect();
    for (module, halves) in &pairs {
        if !known.contains_key(module) {
            let key = halves.values().next().cloned().unwrap_or_default();
            return Err(Error::AdapterKeyUnmatched {
                path: weights_path.clone(),
                key,
            });
        }
        for (have, missing) in [('A', 'B'), ('B', 'A')] {
            if let (Some(k), None) = (halves.get(&have), halves.get(&missing)) {
                return Err(Error::AdapterPairMissing {
                    path: weights_path.clone(),
                    key: k.clone(),
                    missing: peft_key(module, missing),
                });
            }
        }
    }
    if pairs.is_empty() {
        return Err(Error::Adapter {
            path: weights_path.clone(),
            msg: "holds no LoRA tensors".into(),
        });
    }

    let slot = model.num_adapter_slots();
    let device = model.device().clone();
    let mut params = Vec::new();
    for lin in model.linears_mut() {
        let Some(halves) = pairs.get(&lin.path) else {
            lin.set_adapter(slot, None);
            continue;
        };
        let (ka, kb) = (&halves[&'A'], &halves[&'B']);
        let sa = ws.shape(ka)?;
        let r = sa.first().copied().unwrap_or(0);
        let a = ws.load(ka, &[r, lin.in_features()], DType::F32, &device)?;
        let b = ws.load(kb, &[lin.out_features(), r], DType::F32, &device)?;
        if r == 0 {
            return Err(Error::ShapeMismatch {
                path: weights_path.clone(),
                name: ka.clone(),
                expected: vec![config.r, lin.in_features()],
                got: sa,
            });
        }
        let (a, b, va, vb) = if trainable {
            let (va, vb) = (Var::from_tensor(&a)?, Var::from_tensor(&b)?);
            (va.as_tensor().clone(), vb.as_tensor().clone(), Some(va), Some(vb))
        } else {
            (a, b, None, None)
        };
        params.push(AdapterParam {
            key: peft_key(&lin.path, 'A'),
            tensor: a.clone(),
            var: va,
        });
        params.push(AdapterParam {
            key: peft_key(&lin.path, 'B'),
            tensor: b.clone(),
            var: vb,
        });
        lin.set_adapter(
            slot,
            Some(LoraAdapter {
                a,
                b,
                scale: config.scale_for(&lin.path, r),
                dropout: config.lora_dropout as f32,
            }),
        );
    }
    Ok(Adapter { slot, config, params })
}

impl Adapter {
    /// Write the adapter as a PEFT folder (creating `dir`). Each file is written under a
    /// temporary name and renamed into place.
    pub fn save(&self, dir: &Path, base_model_name_or_path: Option<&str>) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut config = self.config.clone();
        config.inference_mode = true;
        if base_model_name_or_path.is_some() {
            config.base_model_name_or_path = base_model_name_or_path.map(str::to_string);
        }
        let json = serde_json::to_string_pretty(&config).map_err(|e| Error::Msg(e.to_string()))?;
        write_atomic(&dir.join(CONFIG_FILE), json.as_bytes())?;
        let tensors: Vec<(String, Tensor)> = self.params.iter().map(|p| (p.key.clone(), p.tensor.clone())).collect();
        save_safetensors(&dir.join(WEIGHTS_FILE), &tensors)?;
        Ok(())
    }
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
