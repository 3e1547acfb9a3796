//! Reading PEFT adapter folders for merging: every LoRA pair as f32 matrices, grouped by module,
//! with the scale PEFT would use. A `checkpoint-N` folder of a `lorafold dpo` run is an adapter
//! folder too.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::DType;

use crate::error::{Error, Result};
use crate::linalg::mat::Mat;
use crate::lora::config::LoraConfig;
use crate::lora::io::{checkpoint_folders, is_adapter_folder, read_adapter, CONFIG_FILE};
use crate::lora::{peft_key, EMBED_KEY, LM_HEAD_KEY};

/// One adapted module: `W' = W + scale · B·A` (with DoRA, rows then scaled to the magnitude:
/// `W' = m/‖W + scale · B·A‖ · (W + scale · B·A)`).
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// `[r, in]`
    pub a: Mat,
    /// `[out, r]`
    pub b: Mat,
    pub scale: f64,
    /// DoRA's magnitude vector, `[out]`.
    pub magnitude: Option<Vec<f32>>,
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
    /// Base tensors replaced whole (modules_to_save), by base tensor name.
    pub whole: BTreeMap<String, Mat>,
    /// Embedding rows replaced (trainable tokens): the token ids and their new rows.
    pub token_rows: Option<(Vec<u32>, Mat)>,
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

/// Load an adapter folder with [`read_adapter`] (strict like `lora::io::load_adapter`: every
/// tensor must be half of an A/B pair, and the halves must chain), after checks that name what
/// `--adapters` expects.
pub fn load(dir: &Path) -> Result<LoadedAdapter> {
    check_folder(dir)?;
    let file = read_adapter(dir)?;
    let mut modules = BTreeMap::new();
    for (module, t) in &file.modules {
        let a = Mat::from_tensor(&t.a)?;
        let b = Mat::from_tensor(&t.b)?;
        let scale = file.config.scale_for(module, t.rank());
        let magnitude = match &t.magnitude {
            Some((_, m)) => Some(m.to_vec1::<f32>()?),
            None => None,
        };
        modules.insert(module.clone(), LoraPair { a, b, scale, magnitude });
    }
    let mut whole = BTreeMap::new();
    let mut token_rows = None;
    for (key, t) in &file.extras {
        match key.as_str() {
            EMBED_KEY => {
                whole.insert("model.embed_tokens.weight".to_string(), Mat::from_tensor(t)?);
            }
            LM_HEAD_KEY => {
                whole.insert("lm_head.weight".to_string(), Mat::from_tensor(t)?);
            }
            _ => {
                let ids = file.config.token_indices().map_err(|msg| Error::Adapter {
                    path: file.dir.clone(),
                    msg: format!("trainable_token_indices: {msg}"),
                })?;
                token_rows = Some((ids, Mat::from_tensor(t)?));
            }
        }
    }
    Ok(LoadedAdapter {
        dir: file.dir,
        weights_path: file.weights_path,
        config: file.config,
        modules,
        dtype: file.dtype,
        whole,
        token_rows,
    })
}

/// `dir` must be an existing folder with an adapter config; a training output folder is pointed
/// to its newest checkpoint.
fn check_folder(dir: &Path) -> Result<()> {
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
        if let Some((_, last)) = checkpoint_folders(dir, is_adapter_folder).pop() {
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
    Ok(())
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
