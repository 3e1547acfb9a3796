//! PEFT's LoRA options beyond plain LoRA against PEFT 0.21 (tests/golden/peft_extras.py): DoRA
//! (logits, DPO gradients of A, B and the magnitudes, merged weights), layer subsets, rank and
//! alpha patterns, excluded modules, regex targets, and LoRA+'s optimizer groups.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use lorafold::lora::config::LoraConfig;
use lorafold::lora::io::load_adapter;
use lorafold::lora::{attach_new, LoraInit};
use lorafold::model::linear::Fwd;
use lorafold::model::{token_logps, Model};
use lorafold::train::optim::{loraplus_scale, AdamW, AdamWConfig};

use crate::common::*;

const LOGIT_TOL: f32 = 1e-4;

fn extras() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(root().join("tests/golden/peft_extras.safetensors"), &Device::Cpu).unwrap()
}

fn extras_meta() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("tests/golden/peft_extras.json")).unwrap()).unwrap()
}

/// generate.py's golden batch (the same ids for every fixture).
fn batch() -> (Tensor, Tensor, Tensor) {
    let g = golden("llama");
    let (ids, mask) = golden_inputs(&g);
    (ids, mask, g["labels"].clone())
}

/// `lorafold merge --model <arch fixture> --adapters <adapter fixture>` into `out`: the merged
/// tensors by name.
fn merge_cli(arch: &str, adapter: &str, out: &std::path::Path) -> HashMap<String, Tensor> {
    let o = lorafold(
        &[
            "merge",
            "--model",
            model_dir(arch).to_str().unwrap(),
            "--adapters",
            adapter_dir(adapter).to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap()
}

/// The sigmoid DPO loss of peft_extras.py: row 0 chosen, row 1 rejected, the bare base as
/// reference, beta from the golden.
fn dpo_loss(model: &Model, slot: usize, beta: f64) -> Tensor {
    let (ids, mask, labels) = batch();
    let (pos, tgt, rows) = scored_positions(&labels);
    let seq = |ctx: &Fwd| {
        let h = model.forward_hidden(&ids, Some(&mask), ctx).unwrap();
        per_sequence(
            &token_logps(&model.logits_at_with(&h, &pos, ctx).unwrap(), &tgt).unwrap(),
            &rows,
            2,
        )
    };
    let reference = seq(&Fwd::base()).detach();
    let policy = seq(&Fwd::eval(slot));
    let d = (policy - reference).unwrap();
    let margin = (d.get(0).unwrap() - d.get(1).unwrap()).unwrap();
    // -log σ(βm) = log(1 + exp(-βm))
    ((margin * -beta).unwrap().exp().unwrap() + 1.0).unwrap().log().unwrap()
}

#[test]
fn dora_adapters_give_peft_logits_gradients_and_merge() {
    for (name, arch) in [("llama_dora", "llama"), ("phi3_dora", "phi3")] {
        let ad = logits_gradients_and_merge(name, arch);
        assert!(ad.config.use_dora);
        let magnitudes = ad
            .params
            .iter()
            .filter(|p| p.key.ends_with("lora_magnitude_vector"))
            .count();
        assert_eq!(
            magnitudes,
            load_model(arch).linears().count(),
            "{name}: a magnitude per layer"
        );
    }
}

/// modules_to_save (untied; tied with ensure_weight_tying) and trainable tokens: logits, the
/// DPO gradients of the fully trained tensors and of the LoRA pairs, and the merged weights.
#[test]
fn fully_trained_modules_and_tokens_match_peft() {
    for (name, arch, full) in [
        ("llama_modules_to_save", "llama", 2),
        ("qwen2_modules_to_save_tied", "qwen2", 1),
        ("llama_tokens", "llama", 1),
    ] {
        let ad = logits_gradients_and_merge(name, arch);
        let n = ad.params.iter().filter(|p| !p.key.contains(".lora_")).count();
        assert_eq!(n, full, "{name}: fully trained tensors");
    }
}

/// Load PEFT's adapter `name` (trainable) on `arch`: its logits, the gradients of the DPO loss
/// of every trainable tensor, and `lorafold merge`'s weights must be PEFT's.
fn logits_gradients_and_merge(name: &str, arch: &str) -> lorafold::lora::Adapter {
    let g = extras();
    let beta = extras_meta()["beta"].as_f64().unwrap();
    let mut model = load_model(arch);
    let ad = load_adapter(&mut model, &adapter_dir(name), true).unwrap();
    let (ids, mask, _) = batch();
    let logits = model.forward(&ids, Some(&mask), &Fwd::eval(ad.slot)).unwrap();
    let err = max_abs_diff(&logits, &g[&format!("{name}/logits")]);
    println!("{name}: max abs logit error {err:.3e}");
    assert!(err <= LOGIT_TOL, "{name}: logits differ by {err}");

    let grads = dpo_loss(&model, ad.slot, beta).backward().unwrap();
    let mut worst = 0f32;
    for p in &ad.params {
        let var = p.var.as_ref().unwrap();
        let got = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient for {}", p.key));
        let want = &g[&format!("{name}/grad/{}", p.key)];
        let rel = max_abs_diff(got, want) / max_abs(want);
        worst = worst.max(rel);
        assert!(rel <= 1e-4, "{name}: gradient of {} off by {rel:.3e}", p.key);
    }
    println!("{name}: worst relative gradient error {worst:.3e}");

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let merged = merge_cli(arch, name, &out);
    let prefix = format!("{name}/merged/");
    let mut n = 0;
    for (k, want) in g.iter().filter(|(k, _)| k.starts_with(&prefix)) {
        // A tied base stores no lm_head.weight: the merged embedding serves both.
        let Some(got) = merged.get(&k[prefix.len()..]) else {
            assert!(
                model.cfg.tie_word_embeddings && k.ends_with("lm_head.weight"),
                "{name}: {k} not merged"
            );
            continue;
        };
        let rel = max_abs_diff(got, want) / max_abs(want);
        assert!(rel <= 1e-6, "{name}: merged {k} off by {rel:.3e}");
        n += 1;
    }
    assert!(
        n >= model.linears().filter(|l| l.adapter(ad.slot).is_some()).count(),
        "{name}: merged tensors"
    );
    // The merged folder loads as a plain model with the adapter's logits.
    let plain = Model::load_dir(&out, &Default::default()).unwrap();
    let lm = plain.forward(&ids, Some(&mask), &Fwd::base()).unwrap();
    assert!(max_abs_diff(&lm, &logits) <= LOGIT_TOL, "{name}: merged logits");
    ad
}

#[test]
fn layer_subsets_patterns_and_regex_targets_match_peft() {
    let g = extras();
    for name in ["llama_patterns", "llama_regex"] {
        let dir = adapter_dir(name);
        let mut model = load_model("llama");
        let ad = load_adapter(&mut model, &dir, false).unwrap();
        let (ids, mask, _) = batch();
        let logits = model.forward(&ids, Some(&mask), &Fwd::eval(ad.slot)).unwrap();
        let err = max_abs_diff(&logits, &g[&format!("{name}/logits")]);
        println!("{name}: max abs logit error {err:.3e}");
        assert!(err <= LOGIT_TOL, "{name}: logits differ by {err}");

        // A fresh adapter from the same config selects the layers, ranks and scales PEFT chose.
        let cfg = LoraConfig::from_file(&dir.join("adapter_config.json")).unwrap();
        let mut fresh = load_model("llama");
        let new = attach_new(&mut fresh, &cfg, LoraInit::Peft { seed: 1 }).unwrap();
        let shapes = |m: &Model, slot: usize| -> Vec<(String, usize, f64)> {
            m.linears()
                .filter_map(|l| l.adapter(slot).map(|a| (l.path.clone(), a.rank(), a.scale)))
                .collect()
        };
        assert_eq!(shapes(&fresh, new.slot), shapes(&model, ad.slot), "{name}");
    }
}

#[test]
fn patterns_that_match_nothing_are_errors_naming_them() {
    let mut model = load_model("llama");
    let mut cfg = LoraConfig::from_file(&adapter_dir("llama_patterns").join("adapter_config.json")).unwrap();
    cfg.rank_pattern.insert("qproj".into(), 3);
    let e = attach_new(&mut model, &cfg, LoraInit::Peft { seed: 1 }).unwrap_err();
    assert!(
        e.to_string().contains("rank_pattern") && e.to_string().contains("qproj"),
        "{e}"
    );

    let mut cfg = LoraConfig::from_file(&adapter_dir("llama_patterns").join("adapter_config.json")).unwrap();
    cfg.exclude_modules = Some(lorafold::lora::config::TargetModules::Modules(vec!["upproj".into()]));
    let e = attach_new(&mut model, &cfg, LoraInit::Peft { seed: 1 }).unwrap_err();
    assert!(
        e.to_string().contains("exclude_modules") && e.to_string().contains("upproj"),
        "{e}"
    );
}

/// Five AdamW steps with create_loraplus_optimizer's groups (B matrices and magnitudes at
/// lr × ratio) on the DPO loss, from the DoRA adapter: the same losses and the same adapter.
#[test]
fn loraplus_steps_match_peft_create_loraplus_optimizer() {
    let g = extras();
    let meta = extras_meta();
    let lp = &meta["adapters"]["loraplus"];
    let (lr, ratio, wd) = (
        lp["lr"].as_f64().unwrap(),
        lp["loraplus_lr_ratio"].as_f64().unwrap(),
        lp["weight_decay"].as_f64().unwrap(),
    );
    let beta = meta["beta"].as_f64().unwrap();
    let mut model = load_model("llama");
    let ad = load_adapter(&mut model, &adapter_dir("llama_dora"), true).unwrap();
    let params: Vec<_> = ad
        .params
        .iter()
        .map(|p| {
            let v = p.var.clone().unwrap();
            (p.key.clone(), v.clone(), loraplus_scale(&p.key, &v, ratio))
        })
        .collect();
    let boosted = params.iter().filter(|p| p.2 == ratio).count();
    assert_eq!(boosted, 2 * model.linears().count(), "B matrices and magnitudes");
    let cfg = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: wd,
    };
    let mut opt = AdamW::with_lr_scales(params, cfg).unwrap();
    for (i, want) in lp["losses"].as_array().unwrap().iter().enumerate() {
        let loss = dpo_loss(&model, ad.slot, beta);
        let l = loss.to_scalar::<f32>().unwrap() as f64;
        let want = want.as_f64().unwrap();
        println!("step {}: loss {l:.6} vs PEFT {want:.6}", i + 1);
        assert!((l - want).abs() <= 1e-4, "step {}: {l} vs {want}", i + 1);
        let grads = loss.backward().unwrap();
        let by_name: HashMap<String, Tensor> = ad
            .params
            .iter()
            .filter_map(|p| {
                grads
                    .get(p.var.as_ref()?.as_tensor())
                    .map(|t| (p.key.clone(), t.clone()))
            })
            .collect();
        opt.step(&by_name, lr).unwrap();
    }
    for p in &ad.params {
        let want = &g[&format!("loraplus/final/{}", p.key)];
        let rel = max_abs_diff(&p.tensor, want) / max_abs(want);
        assert!(rel <= 1e-3, "{}: relative error {rel:.3e}", p.key);
    }
}

/// Magnitudes times 1.25; A and B of PiSSA / OLoRA adapters and fully trained tensors plus
/// 0.05·N(0, 1).
fn move_params(ad: &lorafold::lora::Adapter, seed: u64) {
    let mut rng = lorafold::rng::Rng::new(seed);
    for p in &ad.params {
        let v = p.var.as_ref().unwrap();
        let t = v.as_tensor();
        let moved = if p.key.ends_with("lora_magnitude_vector") {
            (t * 1.25).unwrap()
        } else if ad.is_principal() || !p.key.contains(".lora_") {
            let noise: Vec<f32> = (0..t.elem_count()).map(|_| 0.05 * rng.next_normal() as f32).collect();
            (t + Tensor::from_vec(noise, t.shape(), t.device()).unwrap()).unwrap()
        } else {
            continue;
        };
        v.set(&moved).unwrap();
    }
}

/// PiSSA and OLoRA: PEFT's adapters load saved either way (unconverted: lorafold rebuilds the
/// residual base as PEFT does; converted: a plain rank-2r LoRA of the untouched base), a fresh
/// initialisation leaves PEFT's residual base, and `lorafold merge` of the unconverted form
/// writes merge_and_unload's weights.
#[test]
fn pissa_and_olora_match_peft() {
    let g = extras();
    for kind in ["pissa", "olora"] {
        let name = format!("llama_{kind}");
        let (ids, mask, _) = batch();
        for folder in [name.clone(), format!("{name}_converted")] {
            let mut model = load_model("llama");
            let ad = load_adapter(&mut model, &adapter_dir(&folder), false).unwrap();
            let logits = model.forward(&ids, Some(&mask), &Fwd::eval(ad.slot)).unwrap();
            let err = max_abs_diff(&logits, &g[&format!("{name}/logits")]);
            println!("{folder}: max abs logit error {err:.3e}");
            assert!(err <= LOGIT_TOL, "{folder}: logits differ by {err}");
        }
        let cfg = LoraConfig::from_file(&adapter_dir(&name).join("adapter_config.json")).unwrap();
        let init = LoraInit::principal(cfg.init_lora_weights.as_ref()).unwrap();
        let mut model = load_model("llama");
        let ad = attach_new(&mut model, &cfg, init).unwrap();
        assert!(ad.is_principal());
        let mut worst = 0f32;
        for lin in model.linears() {
            let want = &g[&format!("{name}/residual/{}.weight", lin.path)];
            let err = max_abs_diff(&lin.weight, want);
            worst = worst.max(err);
            assert!(err <= 1e-5, "{name}: residual of {} off by {err:.3e}", lin.path);
        }
        println!("{name}: worst residual error {worst:.3e}");
        // Right after initialisation the model is the base model.
        let logits = model.forward(&ids, Some(&mask), &Fwd::eval(ad.slot)).unwrap();
        assert!(
            max_abs_diff(&logits, &golden("llama")["logits_base"]) <= LOGIT_TOL,
            "{name}: init"
        );

        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        let merged = merge_cli("llama", &name, &out);
        let prefix = format!("{name}/merged/");
        let mut n = 0;
        for (k, want) in g.iter().filter(|(k, _)| k.starts_with(&prefix)) {
            let rel = max_abs_diff(&merged[&k[prefix.len()..]], want) / max_abs(want);
            // The residual comes from an SVD / QR: PEFT's runs in f32 LAPACK, lorafold's in f64,
            // so they agree to about 1e-5 of the weight's scale (a plain merge: 1e-6).
            assert!(rel <= 1e-4, "{name}: merged {k} off by {rel:.3e}");
            n += 1;
        }
        assert_eq!(n, model.linears().count(), "{name}");
    }
}

/// DoRA adapters lorafold trains and saves reload with the same logits, and (after
/// `peft_extras.py verify`) PEFT gives them lorafold's logits.
///
/// Regenerate with `LORAFOLD_WRITE_FIXTURES=1 cargo test --release --test it peft_extras`, then
/// run the verify stage.
#[test]
fn lorafold_dora_and_pattern_adapters_load_in_peft() {
    let write = std::env::var("LORAFOLD_WRITE_FIXTURES").is_ok_and(|v| v == "1");
    let check: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("tests/golden/peft_extras_check.json")).unwrap())
            .unwrap();
    for (name, arch, source) in [
        ("llama_dora", "llama", "llama_dora"),
        ("phi3_dora", "phi3", "phi3_dora"),
        ("llama_patterns", "llama", "llama_patterns"),
        ("llama_pissa", "llama", "llama_pissa"),
        ("llama_pissa_converted", "llama", "llama_pissa"),
        ("llama_olora", "llama", "llama_olora"),
        ("llama_olora_converted", "llama", "llama_olora"),
        ("llama_modules_to_save", "llama", "llama_modules_to_save"),
        ("qwen2_modules_to_save_tied", "qwen2", "qwen2_modules_to_save_tied"),
        ("llama_tokens", "llama", "llama_tokens"),
    ] {
        let dir = root().join("tests/fixtures/lorafold_adapters/extras").join(name);
        let (ids, mask, _) = batch();
        if write {
            let cfg = LoraConfig::from_file(&adapter_dir(source).join("adapter_config.json")).unwrap();
            let mut model = load_model(arch);
            let principal = LoraInit::principal(cfg.init_lora_weights.as_ref());
            let init = principal.unwrap_or(LoraInit::Gaussian { seed: 77, std: 0.3 });
            let ad = attach_new(&mut model, &cfg, init).unwrap();
            // Magnitudes off their initial row norms, and PiSSA/OLoRA factors moved as training
            // would move them, so that PEFT's reading of them matters.
            move_params(&ad, 5);
            let base = format!("tests/fixtures/models/{arch}");
            if name.ends_with("_converted") {
                ad.save_converted(&dir, Some(&base)).unwrap();
            } else {
                ad.save(&dir, Some(&base)).unwrap();
            }
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
        assert!(max_abs_diff(&logits, &saved["logits"]) <= 5e-5, "{name}: reload");
        let c = &check[name];
        assert_eq!(c["passed"], true, "{name}: PEFT check {c}");
        assert!(c["max_abs_logit_diff"].as_f64().unwrap() <= 1e-4);
    }
}
