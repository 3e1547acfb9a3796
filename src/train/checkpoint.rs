//! Checkpoints: `<output_dir>/checkpoint-<step>/` with the PEFT adapter, optimizer moments and
//! trainer state. Written (and fsynced) into `.checkpoint-<step>.tmp` and renamed into place, and
//! deleted by renaming to `.checkpoint-<step>.trash` first, so a kill at any moment leaves each
//! `checkpoint-<step>` folder complete or absent; the leftovers of a killed save are skipped by
//! `latest` and removed by the next save.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::lora::io::{checkpoint_folders, save_safetensors, write_atomic};
use crate::lora::Adapter;
use crate::staging::Staged;
use crate::train::optim::AdamW;

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const RECIPE_FILE: &str = "recipe.yaml";
/// The run's `metrics.jsonl` as it was at the checkpoint's step (optional in a checkpoint).
pub const METRICS_FILE: &str = "metrics.jsonl";

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
    /// Non-finite values (a NaN eval loss...) are written as `null` by JSON and read back as NaN.
    #[serde(deserialize_with = "nullable_records")]
    pub log_history: Vec<BTreeMap<String, f64>>,
}

fn nullable_records<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<BTreeMap<String, f64>>, D::Error> {
    let raw: Vec<BTreeMap<String, Option<f64>>> = Deserialize::deserialize(d)?;
    Ok(raw
        .into_iter()
        .map(|r| r.into_iter().map(|(k, v)| (k, v.unwrap_or(f64::NAN))).collect())
        .collect())
}

pub fn checkpoint_dir(output_dir: &Path, step: usize) -> PathBuf {
    output_dir.join(format!("checkpoint-{step}"))
}

/// Where the checkpoint of `step` is assembled before it is renamed into place.
fn tmp_dir(output_dir: &Path, step: usize) -> PathBuf {
    output_dir.join(format!(".checkpoint-{step}.tmp"))
}

/// Where a checkpoint folder goes before it is deleted (replaced or rotated away): renaming is
/// atomic, deleting a folder file by file is not, so a kill mid-delete never leaves a
/// `checkpoint-N` folder with some of its files gone.
fn trash_dir(output_dir: &Path, step: usize) -> PathBuf {
    output_dir.join(format!(".checkpoint-{step}.trash"))
}

/// The files of a complete checkpoint. A folder missing any of them is never resumed from.
pub const REQUIRED_FILES: [&str; 4] = [
    crate::lora::io::CONFIG_FILE,
    crate::lora::io::WEIGHTS_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
];

/// The first required file `dir` lacks, if any.
pub fn missing_file(dir: &Path) -> Option<PathBuf> {
    REQUIRED_FILES.iter().map(|f| dir.join(f)).find(|p| !p.is_file())
}

/// Unfinished work of an earlier, killed process: `.checkpoint-N.tmp` and `.checkpoint-N.trash`.
fn is_unfinished_name(name: &str) -> bool {
    name.strip_prefix(".checkpoint-")
        .and_then(|r| r.strip_suffix(".tmp").or_else(|| r.strip_suffix(".trash")))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Temporary files of the atomic writes lorafold makes in an output folder.
const TMP_FILES: [&str; 6] = [
    ".adapter_config.json.tmp",
    ".adapter_model.safetensors.tmp",
    ".metrics.jsonl.tmp",
    ".recipe.yaml.tmp",
    ".ref_logps.json.tmp",
    ".lorafold-write-test",
];

/// Remove what killed saves, deletes and file writes left behind under `output_dir` (best
/// effort); returns what was removed. Called when a run starts and before each save; one run
/// writes an output folder at a time.
pub fn remove_unfinished(output_dir: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for e in std::fs::read_dir(output_dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let gone = if is_unfinished_name(&name) {
            std::fs::remove_dir_all(e.path()).is_ok()
        } else {
            TMP_FILES.contains(&name.as_str()) && std::fs::remove_file(e.path()).is_ok()
        };
        if gone {
            removed.push(e.path());
        }
    }
    removed
}

/// Write a complete checkpoint for `state.step`. On failure (disk full, folder not writable) the
/// partly written folder is removed and earlier checkpoints stay as they were.
pub fn save(
    output_dir: &Path,
    adapter: &Adapter,
    base_model: &str,
    optimizer: &AdamW,
    state: &TrainerState,
    recipe_yaml: &str,
) -> Result<PathBuf> {
    let final_dir = checkpoint_dir(output_dir, state.step);
    let failed = |e: Error| Error::CheckpointSave {
        dir: final_dir.clone(),
        error: Box::new(e),
    };
    remove_unfinished(output_dir);
    let staged = Staged::create(tmp_dir(output_dir, state.step)).map_err(failed)?;
    write_files(
        staged.path(),
        output_dir,
        adapter,
        base_model,
        optimizer,
        state,
        recipe_yaml,
    )
    .map_err(failed)?;
    // Saving a step that already has a checkpoint (a resume from an older one): the old folder
    // is moved aside, the new one put in place, then the old one deleted.
    let replaced = staged
        .commit(&final_dir, &trash_dir(output_dir, state.step))
        .map_err(failed)?;
    replaced.discard()?;
    Ok(final_dir)
}

/// Write the files of a checkpoint into `tmp`, the state file last.
fn write_files(
    tmp: &Path,
    output_dir: &Path,
    adapter: &Adapter,
    base_model: &str,
    optimizer: &AdamW,
    state: &TrainerState,
    recipe_yaml: &str,
) -> Result<()> {
    adapter.save(tmp, Some(base_model))?;
    save_safetensors(&tmp.join(OPTIMIZER_FILE), &optimizer.state_tensors())?;
    write_atomic(&tmp.join(RECIPE_FILE), recipe_yaml.as_bytes())?;
    // The metrics logged so far, so that a resume from this checkpoint restores exactly them
    // whatever other (killed, or resumed from elsewhere) attempts appended since.
    let metrics = output_dir.join(METRICS_FILE);
    if metrics.is_file() {
        let bytes = std::fs::read(&metrics).map_err(|e| Error::io(&metrics, e))?;
        write_atomic(&tmp.join(METRICS_FILE), &bytes)?;
    }
    // The state file last: a folder with it has everything else.
    // internal invariant: a TrainerState always serializes
    let json = serde_json::to_string_pretty(state).map_err(|e| Error::Msg(e.to_string()))?;
    write_atomic(&tmp.join(STATE_FILE), json.as_bytes())
}

/// Complete checkpoints under `output_dir` (every file of [`REQUIRED_FILES`]), oldest first.
pub fn list(output_dir: &Path) -> Vec<(usize, PathBuf)> {
    checkpoint_folders(output_dir, |p| missing_file(p).is_none())
}

/// Remove the oldest checkpoints so that at most `keep` remain, never `just_saved` (after a
/// resume from an older checkpoint, newer ones from the first attempt may still be present).
pub fn rotate(output_dir: &Path, keep: usize, just_saved: &Path) -> Result<()> {
    let others: Vec<(usize, PathBuf)> = list(output_dir).into_iter().filter(|(_, p)| p != just_saved).collect();
    let keep_others = keep.saturating_sub(1);
    if others.len() > keep_others {
        for (step, p) in &others[..others.len() - keep_others] {
            let trash = trash_dir(output_dir, *step);
            if trash.exists() {
                std::fs::remove_dir_all(&trash).map_err(|e| Error::io(&trash, e))?;
            }
            std::fs::rename(p, &trash).map_err(|e| Error::io(p, e))?;
            std::fs::remove_dir_all(&trash).map_err(|e| Error::io(&trash, e))?;
        }
    }
    Ok(())
}

/// Resolve `--resume_from_checkpoint`: a folder, or `latest` (the newest complete checkpoint
/// under the output folder; unfinished saves and incomplete folders are skipped).
pub fn resolve(spec: &str, output_dir: &Path) -> Result<PathBuf> {
    if spec == "latest" || spec == "true" {
        return list(output_dir)
            .pop()
            .map(|(_, p)| p)
            .ok_or_else(|| Error::NoCheckpoint {
                output_dir: output_dir.into(),
            });
    }
    let p = PathBuf::from(spec);
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if is_unfinished_name(&name) {
        return Err(Error::Resume {
            dir: p,
            msg: "this is an unfinished checkpoint left by an interrupted save or delete; \
                  resume from a checkpoint-<step> folder or with `latest`"
                .into(),
        });
    }
    if !p.is_dir() {
        return Err(Error::Resume {
            dir: p,
            msg: "no such checkpoint folder".into(),
        });
    }
    if let Some(missing) = missing_file(&p) {
        return Err(Error::Resume {
            msg: format!("not a complete checkpoint ({} is missing)", missing.display()),
            dir: p,
        });
    }
    Ok(p)
}

/// On resume from `dir` (at `step`): put back the run's `metrics.jsonl` (`path`) as it was when
/// the checkpoint was written, so that lines logged after it (by the attempt that was stopped, or
/// by later attempts resumed from elsewhere) are neither repeated nor lost. Checkpoints without a
/// copy of the metrics fall back to [`truncate_metrics`].
pub fn restore_metrics(dir: &Path, path: &Path, step: usize) -> Result<()> {
    let saved = dir.join(METRICS_FILE);
    if !saved.is_file() {
        return truncate_metrics(path, step);
    }
    if saved.canonicalize().ok() == path.canonicalize().ok() {
        return Ok(());
    }
    let bytes = std::fs::read(&saved).map_err(|e| Error::io(&saved, e))?;
    write_atomic(path, &bytes)
}

/// Drop the lines of `metrics.jsonl` logged after `step` and any cut-off last line.
pub fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let mut kept = String::with_capacity(text.len());
    let mut dropped = false;
    for line in text.split_inclusive('\n') {
        let logged = serde_json::from_str::<serde_json::Value>(line.trim_end())
            .ok()
            .and_then(|v| v.get("step").and_then(|s| s.as_u64()));
        match logged {
            Some(s) if s as usize <= step && line.ends_with('\n') => kept.push_str(line),
            _ => dropped = true,
        }
    }
    if dropped {
        write_atomic(path, kept.as_bytes())?;
    }
    Ok(())
}

/// Rough bytes one checkpoint of an adapter with `adapter_params` f32 parameters takes: the
/// weights and AdamW's two moments, plus room for the JSON files.
pub fn estimated_size(adapter_params: usize) -> u64 {
    adapter_params as u64 * 4 * 3 + 64 * 1024
}

/// Bytes available to this user on the filesystem holding `dir`, where the platform tells.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is a NUL-terminated path and `st` a properly sized out-parameter.
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return None;
        }
        return Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64));
    }
    #[allow(unreachable_code)]
    {
        let _ = dir;
        None
    }
}

/// Refuse to start a run whose output folder clearly cannot hold one checkpoint of `needed`
/// bytes (see [`estimated_size`]).
pub fn check_free_space(dir: &Path, needed: u64) -> Result<()> {
    match free_bytes(dir) {
        Some(free) if free < needed => Err(Error::DiskSpace {
            dir: dir.into(),
            free,
            needed,
        }),
        _ => Ok(()),
    }
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
        candle_core::safetensors::load(&p, &Device::Cpu).map_err(|e| Error::Safetensors {
            path: p,
            msg: e.to_string(),
        })
    };
    Ok(Loaded {
        state,
        adapter: load_st(crate::lora::io::WEIGHTS_FILE)?,
        optimizer: load_st(OPTIMIZER_FILE)?,
    })
}
