//! Adapters written by lorafold: PEFT's key names, shapes and config fields, lossless round trip,
//! and the committed adapters that the generator script loaded in PEFT.

use std::collections::BTreeMap;

use candle_core::Device;
use lorafold::lora::config::{LoraConfig, TargetModules};
use lorafold::lora::io::load_adapter;
use lorafold::lora::{attach_new, LoraInit};
use lorafold::model::linear::Fwd;

use crate::common::*;

fn key_shapes(path: &std::path::Path) -> BTreeMap<String, Vec<usize>> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.dims().to_vec()))
        .collect()
}

fn lorafold_adapter(arch: &str) -> (lorafold::model::Model, lorafold::lora::Adapter) {
    let mut model = load_model(arch);
    let cfg = LoraConfig::new(4, 8.0, 0.0, TargetModules::all_linear());
    let ad = attach_new(&mut model, &cfg, LoraInit::Gaussian { seed: 1234, std: 0.3 }).unwrap();
    (model, ad)
}

#[test]
fn saved_adapter_has_peft_layout_and_round_trips() {
    for arch in ARCHS {
        let (model, ad) = lorafold_adapter(arch);
        let dir = tempfile::tempdir().unwrap();
        ad.save(dir.path(), Some(&format!("tests/fixtures/models/{arch}")))
            .unwrap();

        // Same tensor names and shapes as the adapter PEFT saved for the same config.
        let ours = key_shapes(&dir.path().join("adapter_model.safetensors"));
        let peft = key_shapes(&adapter_dir(&format!("{arch}_peft")).join("adapter_model.safetensors"));
        assert_eq!(ours, peft, "{arch}: keys/shapes differ from PEFT's");

        // Config fields PEFT consumers rely on.
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap()).unwrap();
        assert_eq!(cfg["peft_type"], "LORA");
        assert_eq!(cfg["task_type"], "CAUSAL_LM");
        assert_eq!(cfg["r"], 4);
        assert_eq!(cfg["lora_alpha"], 8.0);
        assert_eq!(cfg["lora_dropout"], 0.0);
        assert_eq!(cfg["bias"], "none");
        assert_eq!(cfg["use_rslora"], false);
        assert_eq!(cfg["use_dora"], false);
        assert_eq!(cfg["fan_in_fan_out"], false);
        assert_eq!(cfg["inference_mode"], true);
        assert_eq!(cfg["base_model_name_or_path"], format!("tests/fixtures/models/{arch}"));
        let mut targets: Vec<String> = serde_json::from_value(cfg["target_modules"].clone()).unwrap();
        targets.sort();
        let mut all: Vec<String> = model.cfg.linear_modules().iter().map(|s| s.to_string()).collect();
        all.sort();
        assert_eq!(targets, all);

        // Reloading gives the same logits.
        let g = golden(arch);
        let (ids, mask) = golden_inputs(&g);
        let before = model.forward(&ids, Some(&mask), &Fwd::eval(ad.slot)).unwrap();
        let mut fresh = load_model(arch);
        let re = load_adapter(&mut fresh, dir.path(), false).unwrap();
        let after = fresh.forward(&ids, Some(&mask), &Fwd::eval(re.slot)).unwrap();
        assert_eq!(max_abs_diff(&before, &after), 0.0, "{arch}: round trip changed logits");
    }
}

/// `tests/fixtures/lorafold_adapters/<arch>` holds an adapter saved by lorafold and lorafold's
/// logits with it; `generate.py verify-lorafold` loaded each in PEFT and recorded the result in
/// `tests/golden/lorafold_adapter_check.json`. This test checks that the record says PEFT agreed
/// and that today's code still gives the logits PEFT agreed with.
///
/// Regenerate with `LORAFOLD_WRITE_FIXTURES=1 cargo test --release --test it
/// committed_lorafold_adapters_were_verified_by_peft`, then run the verify stage.
#[test]
fn committed_lorafold_adapters_were_verified_by_peft() {
    let write = std::env::var("LORAFOLD_WRITE_FIXTURES").is_ok_and(|v| v == "1");
    let check_path = root().join("tests/golden/lorafold_adapter_check.json");
    for arch in ARCHS {
        let dir = root().join("tests/fixtures/lorafold_adapters").join(arch);
        let g = golden(arch);
        let (ids, mask) = golden_inputs(&g);
        if write {
            let (model, ad) = lorafold_adapter(arch);
            ad.save(&dir, Some(&format!("tests/fixtures/models/{arch}"))).unwrap();
            let logits = model.forward(&ids, Some(&mask), &Fwd::eval(ad.slot)).unwrap();
            lorafold::lora::io::save_safetensors(
                &dir.join("lorafold_logits.safetensors"),
                &[("logits".into(), logits)],
            )
            .unwrap();
            continue;
        }
        let mut model = load_model(arch);
        let ad = load_adapter(&mut model, &dir, false).unwrap();
        let logits = model.forward(&ids, Some(&mask), &Fwd::eval(ad.slot)).unwrap();
        let saved = candle_core::safetensors::load(dir.join("lorafold_logits.safetensors"), &Device::Cpu).unwrap();
        let err = max_abs_diff(&logits, &saved["logits"]);
        // f32 kernels that sum in another order move logits by a few 1e-5; 5e-5 of drift plus
        // the recorded PEFT difference stays inside the 1e-4 agreement checked below.
        assert!(
            err <= 5e-5,
            "{arch}: logits drifted from the PEFT-verified ones by {err}"
        );

        let check: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&check_path).unwrap()).unwrap();
        let c = &check[arch];
        assert_eq!(c["keys_match"], true, "{arch}: {c}");
        assert_eq!(c["config_ok"], true, "{arch}: {c}");
        let d = c["max_abs_logit_diff"].as_f64().unwrap();
        assert!(d <= 1e-4, "{arch}: PEFT's logits differed from lorafold's by {d}");
    }
}

#[test]
fn peft_default_init_is_identity() {
    let mut model = load_model("qwen2");
    let cfg = LoraConfig::new(8, 16.0, 0.05, TargetModules::all_linear());
    let ad = attach_new(&mut model, &cfg, LoraInit::Peft { seed: 3 }).unwrap();
    let g = golden("qwen2");
    let (ids, mask) = golden_inputs(&g);
    let on = model.forward(&ids, Some(&mask), &Fwd::eval(ad.slot)).unwrap();
    assert!(max_abs_diff(&on, &g["logits_base"].clone()) <= 1e-4);
    for p in &ad.params {
        let v = max_abs(&p.tensor);
        if p.key.ends_with("lora_B.weight") {
            assert_eq!(v, 0.0, "{}", p.key);
        } else {
            // kaiming-uniform(a=√5): |A| < 1/sqrt(in) and clearly non-zero.
            let fan_in = p.tensor.dims()[1] as f32;
            assert!(v > 0.5 / fan_in.sqrt() && v <= 1.0 / fan_in.sqrt(), "{}: {v}", p.key);
        }
    }
}

#[test]
fn target_modules_list_and_regex() {
    let mut model = load_model("llama");
    let cfg = LoraConfig::new(
        2,
        4.0,
        0.0,
        TargetModules::Modules(vec!["q_proj".into(), "down_proj".into()]),
    );
    let ad = attach_new(&mut model, &cfg, LoraInit::Peft { seed: 0 }).unwrap();
    assert_eq!(ad.params.len(), 2 * 2 * model.cfg.num_layers);
    assert!(ad
        .params
        .iter()
        .all(|p| p.key.contains("q_proj") || p.key.contains("down_proj")));

    let mut model = load_model("llama");
    let re = TargetModules::Pattern(r"model\.layers\.1\.self_attn\.(k|v)_proj".into());
    let ad = attach_new(
        &mut model,
        &LoraConfig::new(2, 4.0, 0.0, re.clone()),
        LoraInit::Peft { seed: 0 },
    )
    .unwrap();
    let keys: Vec<&str> = ad.params.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight",
            "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight",
            "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight",
            "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight",
        ]
    );
    // A regex is saved as the pattern, as PEFT does.
    assert_eq!(ad.config.target_modules, Some(re));

    assert_eq!(TargetModules::parse_cli(&["ALL".into()]), TargetModules::all_linear());
    assert_eq!(
        TargetModules::parse_cli(&["q_proj,v_proj".into()]),
        TargetModules::Modules(vec!["q_proj".into(), "v_proj".into()])
    );
    let none = LoraConfig::new(2, 4.0, 0.0, TargetModules::Modules(vec!["lm_head".into()]));
    let mut model = load_model("llama");
    let err = attach_new(&mut model, &none, LoraInit::Peft { seed: 0 })
        .unwrap_err()
        .to_string();
    assert!(err.contains("selects no linear layer"), "{err}");
}

#[test]
fn dropout_is_reproducible_and_only_in_training() {
    let mut model = load_model("mistral");
    let cfg = LoraConfig::new(4, 8.0, 0.5, TargetModules::all_linear());
    let ad = attach_new(&mut model, &cfg, LoraInit::Gaussian { seed: 9, std: 0.3 }).unwrap();
    let g = golden("mistral");
    let (ids, mask) = golden_inputs(&g);
    let a = model.forward(&ids, Some(&mask), &Fwd::train(ad.slot, 11)).unwrap();
    let b = model.forward(&ids, Some(&mask), &Fwd::train(ad.slot, 11)).unwrap();
    let c = model.forward(&ids, Some(&mask), &Fwd::train(ad.slot, 12)).unwrap();
    let e1 = model.forward(&ids, Some(&mask), &Fwd::eval(ad.slot)).unwrap();
    let e2 = model.forward(&ids, Some(&mask), &Fwd::eval(ad.slot)).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0, "same seed, same masks");
    assert!(max_abs_diff(&a, &c) > 1e-3, "different seed, different masks");
    assert!(max_abs_diff(&a, &e1) > 1e-3, "dropout is applied in training");
    assert_eq!(max_abs_diff(&e1, &e2), 0.0, "no dropout in evaluation");
}
