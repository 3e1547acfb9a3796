use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use lorafold::model::{LoadOptions, Model};

pub const ARCHS: [&str; 7] = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"];

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn model_dir(arch: &str) -> PathBuf {
    root().join("tests/fixtures/models").join(arch)
}

pub fn adapter_dir(name: &str) -> PathBuf {
    root().join("tests/fixtures/adapters").join(name)
}

pub fn load_model(arch: &str) -> Model {
    Model::load_dir(&model_dir(arch), &LoadOptions::default()).unwrap_or_else(|e| panic!("loading {arch}: {e}"))
}

pub fn golden(arch: &str) -> HashMap<String, Tensor> {
    let p = root().join("tests/golden").join(format!("{arch}.safetensors"));
    candle_core::safetensors::load(&p, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// input_ids (u32) and attention_mask of the golden batch.
pub fn golden_inputs(g: &HashMap<String, Tensor>) -> (Tensor, Tensor) {
    let ids = g["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = g["attention_mask"].to_dtype(DType::F32).unwrap();
    (ids, mask)
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Largest |a - b| over the logits ([batch, seq, vocab]) of the positions `mask` ([batch, seq],
/// 1 = real token) keeps: the logits any loss, log-prob or generation reads. At padded positions
/// the float32 reference itself is off by up to 1.0e-4 from the same model run in float64
/// (phi3 with its rsLoRA adapter; `python tests/golden/precision.py`), so a check there
/// measures the reference's rounding, not lorafold.
pub fn max_abs_diff_kept(a: &Tensor, b: &Tensor, mask: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let per_position = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max(2)
        .unwrap();
    assert!(
        mask.to_dtype(DType::F32)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    );
    (per_position * mask.to_dtype(DType::F32).unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn max_abs(a: &Tensor) -> f32 {
    a.to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Flat indices (b*T + t-1) of the positions whose logits predict a scored label, and those
/// labels: TRL's shift (logits[:, :-1] predict labels[:, 1:]) with -100 ignored.
pub fn scored_positions(labels: &Tensor) -> (Tensor, Tensor, Vec<usize>) {
    let l = labels.to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap();
    let t = l[0].len();
    let (mut pos, mut tgt, mut row) = (vec![], vec![], vec![]);
    for (b, r) in l.iter().enumerate() {
        for (i, &label) in r.iter().enumerate().take(t).skip(1) {
            if label != -100 {
                pos.push((b * t + i - 1) as u32);
                tgt.push(label as u32);
                row.push(b);
            }
        }
    }
    let n = pos.len();
    (
        Tensor::from_vec(pos, n, &Device::Cpu).unwrap(),
        Tensor::from_vec(tgt, n, &Device::Cpu).unwrap(),
        row,
    )
}

/// Per-sequence summed response log-probs [B] from per-token log-probs and their rows.
pub fn per_sequence(token_logps: &Tensor, rows: &[usize], batch: usize) -> Tensor {
    let n = rows.len();
    let mut onehot = vec![0f32; batch * n];
    for (i, &b) in rows.iter().enumerate() {
        onehot[b * n + i] = 1.0;
    }
    let m = Tensor::from_vec(onehot, (batch, n), &Device::Cpu).unwrap();
    m.matmul(&token_logps.unsqueeze(1).unwrap())
        .unwrap()
        .squeeze(1)
        .unwrap()
}

/// Run the lorafold binary.
pub fn lorafold(args: &[&str], env: &[(&str, &Path)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lorafold"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("running lorafold")
}

/// Copy a folder (files only, one level).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}
