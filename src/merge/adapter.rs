//! Reading PEFT adapter folders for merging: every LoRA pair as f32 matrices, grouped by module,
//! with the scale PEFT would use. A `checkpoint-N` folder of a `lorafold dpo` run is an adapter
//! folder too.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::mat::Mat;
use crate::error::{Error, Result};
use crate::lora::config::LoraConfig;
use crate::lora::io::{CONFIG_FILE, WEIGHTS_FILE};
use crate::lora::peft_key;
use crate::model::weights::WeightSource;

/// One adapted module: `W' = W + scale · B·A`.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// `[r, in]`
    pub a: Mat,
    /// `[out, r]`
    pub b: Mat,
    pub scale: f64,
}

impl LoraPair {
    pub fn rank(&self) -> usize {
        self.a.rows
    }
}

#[derive(Debug, Clone)]
pub struct LoadedAdapter {
    pub dir: PathBuf,
    pub weights_path: PathBuf,
    pub config: LoraConfig,
    /// Keyed by module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub modules: BTreeMap<String, LoraPair>,
    /// The dtype the A/B tensors are stored in.
    pub dtype: DType,
}

impl LoadedAdapter {
    /// The rank PEFT reserves for this adapter: `r`, or the largest `rank_pattern` value.
    pub fn max_rank(&self) -> usize {
        self.config
            .rank_pattern
            .values()
            .copied()
            .fold(self.config.r, usize::max)
    }

    /// Name for messages: the folder.
    pub fn name(&self) -> String {
        self.dir.display().to_string()
    }
}

use crate::lora::io::parse_key;

/// Checkpoint folders (`checkpoint-<step>`) directly under `dir`, newest last.
fn checkpoints_in(dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut out: Vec<(usize, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("checkpoint-")?.parse::<usize>().ok()?;
            e.path().join(CONFIG_FILE).is_file().then(|| (step, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// Load an adapter folder. Strict like `lora::io::load_adapter`: every tensor must be half of an
/// A/B pair, and the halves must chain (`B: [out, r]`, `A: [r, in]`).
pub fn load(dir: &Path) -> Result<LoadedAdapter> {
    if !dir.exists() {
        return Err(Error::Adapter {
            path: dir.into(),
            msg: "adapter folder does not exist".into(),
        });
    }
    if !dir.is_dir() {
        return Err(Error::Adapter {
            path: dir.into(),
            msg: "is a file; --adapters takes adapter folders (adapter_config.json + adapter_model.safetensors)".into(),
        });
    }
    let config_path = dir.join(CONFIG_FILE);
    if !config_path.is_file() {
        if let Some((_, last)) = checkpoints_in(dir).pop() {
            return Err(Error::Adapter {
                path: dir.into(),
                msg: format!(
                    "holds no {CONFIG_FILE}; it looks like a training output folder, pass one of its \
                     checkpoints instead, e.g. --adapters {}",
                    last.display()
                ),
            });
        }
        return Err(Error::MissingFile { path: config_path });
    }
    let config = LoraConfig::from_file(&config_path)?;
    let weights_path = dir.join(WEIGHTS_FILE);
    if !weights_path.is_file() {
        if dir.join("adapter_model.bin").exists() {
            return Err(Error::Adapter {
                path: dir.into(),
                msg: "only a pickle adapter (adapter_model.bin) is present; lorafold never loads pickle \
                      files. Re-save it with PEFT's save_pretrained(..., safe_serialization=True)"
                    .into(),
            });
        }
        return Err(Error::MissingFile { path: weights_path });
    }
    let ws = WeightSource::open(std::slice::from_ref(&weights_path))?;
    let mut names: Vec<&String> = ws.names().collect();
    names.sort();
    let mut halves: BTreeMap<String, [Option<String>; 2]> = BTreeMap::new();
    for name in names {
        let (module, half) = parse_key(name).ok_or_else(|| Error::AdapterKeyUnmatched {
            path: weights_path.clone(),
            key: name.clone(),
        })?;
        let slot = &mut halves.entry(module).or_default()[usize::from(half == 'B')];
        *slot = Some(name.clone());
    }
    if halves.is_empty() {
        return Err(Error::Adapter {
            path: weights_path,
            msg: "holds no LoRA tensors".into(),
        });
    }
    let mut modules = BTreeMap::new();
    let mut dtype = DType::F32;
    for (module, [ka, kb]) in halves {
        let (ka, kb) = match (ka, kb) {
            (Some(a), Some(b)) => (a, b),
            (Some(k), None) | (None, Some(k)) => {
                let missing = if k.contains(".lora_A") { 'B' } else { 'A' };
                return Err(Error::AdapterPairMissing {
                    path: weights_path.clone(),
                    key: k,
                    missing: peft_key(&module, missing),
                });
            }
            (None, None) => continue,
        };
        let sa = ws.shape(&ka)?;
        let sb = ws.shape(&kb)?;
        if sa.len() != 2 || sa[0] == 0 {
            return Err(Error::Adapter {
                path: weights_path.clone(),
                msg: format!("tensor {ka:?} has shape {sa:?}; a LoRA A must be [r, in_features] with r > 0"),
            });
        }
        let r = sa[0];
        if sb.len() != 2 || sb[1] != r {
            return Err(Error::ShapeMismatch {
                path: weights_path.clone(),
                name: kb.clone(),
                expected: vec![sb.first().copied().unwrap_or(0), r],
                got: sb,
            });
        }
        dtype = ws.stored_dtype(&ka)?;
        let a = Mat::from_tensor(&ws.load(&ka, &sa, DType::F32, &Device::Cpu)?)?;
        let b = Mat::from_tensor(&ws.load(&kb, &sb, DType::F32, &Device::Cpu)?)?;
        let scale = config.scale_for(&module, r);
        modules.insert(module, LoraPair { a, b, scale });
    }
    Ok(LoadedAdapter {
        dir: dir.into(),
        weights_path,
        config,
        modules,
        dtype,
    })
}

/// Fail on the first NaN or infinity in an adapter (`--safe_merge`), naming the tensor.
pub fn check_finite(ad: &LoadedAdapter) -> Result<()> {
    for (module, pair) in &ad.modules {
        for (half, m) in [('A', &pair.a), ('B', &pair.b)] {
            if let Some(bad) = m.data.iter().find(|x| !x.is_finite()) {
                return Err(Error::Adapter {
                    path: ad.weights_path.clone(),
                    msg: format!(
                        "tensor {:?} contains {bad}; refusing to merge a broken adapter (--safe_merge)",
                        peft_key(module, half)
                    ),
                });
            }
        }
    }
    Ok(())
}
