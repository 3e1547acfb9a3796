//! Bad model and adapter files give errors that name the file, key or tensor; never a panic.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use lorafold::lora::io::{load_adapter, save_safetensors};
use lorafold::model::{LoadOptions, Model};
use lorafold::Error;

use crate::common::*;

fn load(dir: &Path) -> Result<Model, Error> {
    Model::load_dir(dir, &LoadOptions::default())
}

#[test]
fn missing_config_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = load(dir.path()).err().expect("must fail");
    assert!(matches!(err, Error::MissingFile { .. }), "{err:?}");
    assert!(err.to_string().contains("config.json"), "{err}");
}

#[test]
fn missing_weights_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(model_dir("qwen2").join("config.json"), dir.path().join("config.json")).unwrap();
    let err = load(dir.path()).err().expect("must fail");
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

#[test]
fn pickle_weights_are_refused_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(model_dir("qwen2").join("config.json"), dir.path().join("config.json")).unwrap();
    std::fs::write(dir.path().join("pytorch_model.bin"), b"not loaded").unwrap();
    let err = load(dir.path()).err().expect("must fail").to_string();
    assert!(err.contains("pickle") && err.contains("safetensors"), "{err}");
}

#[test]
fn unknown_architecture_is_named() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&model_dir("qwen2"), dir.path());
    let p = dir.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    std::fs::write(&p, cfg.to_string()).unwrap();
    let err = load(dir.path()).err().expect("must fail");
    assert!(matches!(err, Error::UnsupportedArchitecture { .. }), "{err:?}");
    assert!(err.to_string().contains("GPT2LMHeadModel"), "{err}");
}

#[test]
fn absurd_config_sizes_are_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&model_dir("qwen2"), dir.path());
    let p = dir.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["hidden_size"] = serde_json::json!(1u64 << 40);
    std::fs::write(&p, cfg.to_string()).unwrap();
    let err = load(dir.path()).err().expect("must fail").to_string();
    assert!(err.contains("refusing to allocate"), "{err}");
}

#[test]
fn malformed_config_json_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&model_dir("qwen2"), dir.path());
    std::fs::write(dir.path().join("config.json"), "{\"hidden_size\": ").unwrap();
    let err = load(dir.path()).err().expect("must fail");
    assert!(matches!(err, Error::Json { .. }), "{err:?}");
    assert!(err.to_string().contains("config.json"), "{err}");
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&model_dir("qwen2"), dir.path());
    let p = dir.path().join("model.safetensors");
    let mut ts = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
    ts.remove("model.layers.1.mlp.up_proj.weight").unwrap();
    let v: Vec<(String, Tensor)> = ts.into_iter().collect();
    save_safetensors(&p, &v).unwrap();
    let err = load(dir.path()).err().expect("must fail");
    assert!(matches!(err, Error::MissingTensor { .. }), "{err:?}");
    assert!(err.to_string().contains("model.layers.1.mlp.up_proj.weight"), "{err}");
}

#[test]
fn truncated_safetensors_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&model_dir("qwen3"), dir.path());
    let p = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let err = load(dir.path()).err().expect("must fail").to_string();
    assert!(err.contains("model.safetensors"), "{err}");
    // A header length beyond the end of the file.
    let mut bad = (1u64 << 40).to_le_bytes().to_vec();
    bad.extend_from_slice(b"{}");
    std::fs::write(&p, bad).unwrap();
    let err = load(dir.path()).err().expect("must fail").to_string();
    assert!(err.contains("header length"), "{err}");
}

fn adapter_copy(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&adapter_dir(name), dir.path());
    dir
}

fn edit_adapter(dir: &Path, f: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let p = dir.join("adapter_model.safetensors");
    let mut v: Vec<(String, Tensor)> = candle_core::safetensors::load(&p, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    f(&mut v);
    save_safetensors(&p, &v).unwrap();
}

#[test]
fn adapter_missing_half_of_a_pair_is_named() {
    let dir = adapter_copy("llama_peft");
    let gone = "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight";
    edit_adapter(dir.path(), |v| v.retain(|(k, _)| k != gone));
    let mut model = load_model("llama");
    let err = load_adapter(&mut model, dir.path(), false).expect_err("must fail");
    assert!(matches!(err, Error::AdapterPairMissing { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(gone) && msg.contains("lora_A"), "{msg}");
}

#[test]
fn adapter_for_another_base_is_a_shape_error() {
    // qwen3 has head_dim 32, so its q_proj adapter does not fit llama's q_proj.
    let mut model = load_model("llama");
    let err = load_adapter(&mut model, &adapter_dir("qwen3_peft"), false).expect_err("must fail");
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err:?}");
    assert!(err.to_string().contains("lora_"), "{err}");
}

#[test]
fn adapter_key_matching_no_layer_is_named() {
    let dir = adapter_copy("mistral_peft");
    let extra = "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight";
    edit_adapter(dir.path(), |v| {
        v.push((extra.into(), Tensor::zeros((4, 64), DType::F32, &Device::Cpu).unwrap()));
        v.push((
            extra.replace("lora_A", "lora_B"),
            Tensor::zeros((64, 4), DType::F32, &Device::Cpu).unwrap(),
        ));
    });
    let mut model = load_model("mistral");
    let err = load_adapter(&mut model, dir.path(), false).expect_err("must fail");
    assert!(matches!(err, Error::AdapterKeyUnmatched { .. }), "{err:?}");
    assert!(err.to_string().contains("layers.7.self_attn.q_proj"), "{err}");

    let dir = adapter_copy("mistral_peft");
    edit_adapter(dir.path(), |v| {
        v.push((
            "base_model.model.lm_head.weight".into(),
            Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap(),
        ))
    });
    let err = load_adapter(&mut model, dir.path(), false).expect_err("must fail");
    assert!(err.to_string().contains("base_model.model.lm_head.weight"), "{err}");
}

#[test]
fn unsupported_adapter_options_are_named() {
    for (key, value) in [
        ("use_dora", serde_json::json!(true)),
        ("modules_to_save", serde_json::json!(["lm_head"])),
        ("bias", serde_json::json!("all")),
        ("peft_type", serde_json::json!("IA3")),
    ] {
        let dir = adapter_copy("qwen2_peft");
        let p = dir.path().join("adapter_config.json");
        let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        cfg[key] = value;
        std::fs::write(&p, cfg.to_string()).unwrap();
        let mut model = load_model("qwen2");
        let err = load_adapter(&mut model, dir.path(), false)
            .expect_err("must fail")
            .to_string();
        assert!(err.contains(key) && err.contains("adapter_config.json"), "{key}: {err}");
    }
}

#[test]
fn missing_adapter_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = load_model("qwen2");
    let err = load_adapter(&mut model, dir.path(), false)
        .expect_err("must fail")
        .to_string();
    assert!(err.contains("adapter_config.json"), "{err}");
    std::fs::copy(
        adapter_dir("qwen2_peft").join("adapter_config.json"),
        dir.path().join("adapter_config.json"),
    )
    .unwrap();
    let err = load_adapter(&mut model, dir.path(), false)
        .expect_err("must fail")
        .to_string();
    assert!(err.contains("adapter_model.safetensors"), "{err}");
}

#[test]
fn cli_prints_errors_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let out = lorafold(&["inspect", "--model", dir.path().to_str().unwrap()], &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: ") && stderr.contains("config.json"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
