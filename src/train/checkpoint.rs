//! Checkpoints: `<output_dir>/checkpoint-<step>/` with the PEFT adapter, optimizer moments and
//! trainer state. Written into a temporary folder and renamed into place, so a checkpoint folder
//! either is complete or does not exist.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::lora::io::{save_safetensors, write_atomic};
use crate::lora::Adapter;
use crate::train::optim::AdamW;

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const RECIPE_FILE: &str = "recipe.yaml";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps taken.
    pub step: usize,
    /// Micro-batches consumed (the data position).
    pub consumed_micro_batches: usize,
    pub total_steps: usize,
    pub optimizer_t: u64,
    pub seed: u64,
    /// State of losses that keep statistics across steps (bco_pair).
    pub loss_state: serde_json::Value,
    /// Fingerprint of the tokenised training data, so a resume on other data is refused.
    pub data_fingerprint: String,
    pub log_history: Vec<BTreeMap<String, f64>>,
}

pub fn checkpoint_dir(output_dir: &Path, step: usize) -> PathBuf {
    output_dir.join(format!("checkpoint-{step}"))
}

/// Write a complete checkpoint for `state.step`.
pub fn save(
    output_dir: &Path,
    adapter: &Adapter,
    base_model: &str,
    optimizer: &AdamW,
    state: &TrainerState,
    recipe_yaml: &str,
) -> Result<PathBuf> {
    let final_dir = checkpoint_dir(output_dir, state.step);
    let tmp = output_dir.join(format!(".checkpoint-{}.tmp", state.step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    adapter.save(&tmp, Some(base_model))?;
    save_safetensors(&tmp.join(OPTIMIZER_FILE), &optimizer.state_tensors())?;
    let json = serde_json::to_string_pretty(state).map_err(|e| Error::Msg(e.to_string()))?;
    write_atomic(&tmp.join(STATE_FILE), json.as_bytes())?;
    write_atomic(&tmp.join(RECIPE_FILE), recipe_yaml.as_bytes())?;
    sync_dir(&tmp);
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|e| Error::io(&final_dir, e))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    sync_dir(output_dir);
    Ok(final_dir)
}

fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// Complete checkpoints under `output_dir`, oldest first.
pub fn list(output_dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut out: Vec<(usize, PathBuf)> = std::fs::read_dir(output_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step: usize = name.strip_prefix("checkpoint-")?.parse().ok()?;
            let p = e.path();
            p.join(STATE_FILE).exists().then_some((step, p))
        })
        .collect();
    out.sort();
    out
}

/// Remove the oldest checkpoints beyond `keep`.
pub fn rotate(output_dir: &Path, keep: usize) -> Result<()> {
    let all = list(output_dir);
    if all.len() > keep {
        for (_, p) in &all[..all.len() - keep] {
            std::fs::remove_dir_all(p).map_err(|e| Error::io(p, e))?;
        }
    }
    Ok(())
}

/// Resolve `--resume_from_checkpoint`: a folder, or `latest` under the output folder.
pub fn resolve(spec: &str, output_dir: &Path) -> Result<PathBuf> {
    if spec == "latest" || spec == "true" {
        return list(output_dir).pop().map(|(_, p)| p).ok_or_else(|| {
            Error::Msg(format!("--resume_from_checkpoint latest: no checkpoint under {}", output_dir.display()))
        });
    }
    let p = PathBuf::from(spec);
    if !p.join(STATE_FILE).exists() {
        return Err(Error::MissingFile { path: p.join(STATE_FILE) });
    }
    Ok(p)
}

pub struct Loaded {
    pub state: TrainerState,
    pub adapter: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
}

pub fn load(dir: &Path) -> Result<Loaded> {
    let state: TrainerState = crate::error::read_json(&dir.join(STATE_FILE))?;
    let load_st = |name: &str| -> Result<HashMap<String, Tensor>> {
        let p = dir.join(name);
        if !p.exists() {
            return Err(Error::MissingFile { path: p });
        }
        candle_core::safetensors::load(&p, &Device::Cpu).map_err(|e| Error::Safetensors { path: p, msg: e.to_string() })
    };
    Ok(Loaded {
        state,
        adapter: load_st(crate::lora::io::WEIGHTS_FILE)?,
        optimizer: load_st(OPTIMIZER_FILE)?,
    })
}
