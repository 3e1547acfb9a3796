//! Logits, log-probs and LoRA gradients against transformers + peft (tests/golden/generate.py).

use candle_core::backprop::GradStore;
use lorafold::lora::io::load_adapter;
use lorafold::model::linear::Fwd;
use lorafold::model::token_logps;

use crate::common::*;

/// f32 logits must match transformers within this (DESIGN.md: ≤ 1e-4 on tiny models).
const LOGIT_TOL: f32 = 1e-4;

#[test]
fn base_logits_match_transformers() {
    for arch in ARCHS {
        let model = load_model(arch);
        let g = golden(arch);
        let (ids, mask) = golden_inputs(&g);
        let logits = model.forward(&ids, Some(&mask), &Fwd::base()).unwrap();
        let err = max_abs_diff_kept(&logits, &g["logits_base"], &mask);
        println!("{arch}: base max abs logit error {err:.3e}");
        assert!(err <= LOGIT_TOL, "{arch}: base logits differ by {err}");
    }
}

#[test]
fn peft_adapter_logits_match_peft() {
    for arch in ARCHS {
        for (name, key) in [("peft", "logits_peft"), ("peft_rslora", "logits_peft_rslora")] {
            let mut model = load_model(arch);
            let ad = load_adapter(&mut model, &adapter_dir(&format!("{arch}_{name}")), false).unwrap();
            let g = golden(arch);
            let (ids, mask) = golden_inputs(&g);
            let logits = model.forward(&ids, Some(&mask), &Fwd::eval(ad.slot)).unwrap();
            let err = max_abs_diff_kept(&logits, &g[key], &mask);
            println!("{arch} {name}: max abs logit error {err:.3e}");
            assert!(err <= LOGIT_TOL, "{arch} {name}: logits differ by {err}");
            // The adapter must matter, or the comparison proves nothing.
            let base = model.forward(&ids, Some(&mask), &Fwd::base()).unwrap();
            assert!(
                max_abs_diff_kept(&logits, &base, &mask) > 0.1,
                "{arch} {name}: adapter has no effect"
            );
            // Switching the adapter off gives the base model back.
            assert!(max_abs_diff_kept(&base, &g["logits_base"], &mask) <= LOGIT_TOL);
        }
    }
}

fn logps_and_grads(
    arch: &str,
) -> (
    Vec<f32>,
    Vec<f32>,
    lorafold::lora::Adapter,
    GradStore,
    lorafold::model::Model,
) {
    let mut model = load_model(arch);
    let g = golden(arch);
    let (ids, mask) = golden_inputs(&g);
    let (pos, tgt, rows) = scored_positions(&g["labels"]);
    let base_h = model.forward_hidden(&ids, Some(&mask), &Fwd::base()).unwrap();
    let base_lp = token_logps(&model.logits_at(&base_h, &pos).unwrap(), &tgt).unwrap();
    let base = per_sequence(&base_lp, &rows, 2).to_vec1::<f32>().unwrap();

    let ad = load_adapter(&mut model, &adapter_dir(&format!("{arch}_peft")), true).unwrap();
    let h = model
        .forward_hidden(&ids, Some(&mask), &Fwd::train(ad.slot, 0))
        .unwrap();
    let lp = token_logps(&model.logits_at(&h, &pos).unwrap(), &tgt).unwrap();
    let seq = per_sequence(&lp, &rows, 2);
    let grads = seq.sum_all().unwrap().backward().unwrap();
    (base, seq.to_vec1::<f32>().unwrap(), ad, grads, model)
}

#[test]
fn response_logps_match_trl() {
    for arch in ARCHS {
        let g = golden(arch);
        let (base, peft, ..) = logps_and_grads(arch);
        for (got, key) in [(base, "logps_base"), (peft, "logps_peft")] {
            let want = g[key].to_vec1::<f32>().unwrap();
            for (a, b) in got.iter().zip(&want) {
                let err = (a - b).abs();
                // Sums of ~8 log-probs of size ~6: 1e-4 absolute is ~1e-6 relative.
                assert!(err <= 1e-4, "{arch} {key}: {a} vs {b}");
            }
        }
    }
}

#[test]
fn every_lora_gradient_matches_pytorch() {
    for arch in ARCHS {
        let g = golden(arch);
        let (_, _, ad, grads, model) = logps_and_grads(arch);
        assert_eq!(
            ad.params.len(),
            2 * model.cfg.linear_modules().len() * model.cfg.num_layers,
            "{arch}: all-linear adapter"
        );
        let mut worst = 0f32;
        for p in &ad.params {
            let var = p.var.as_ref().expect("trainable");
            let got = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{arch}: no gradient for {}", p.key));
            let want = g
                .get(&format!("grad.{}", p.key))
                .unwrap_or_else(|| panic!("{arch}: golden has no grad.{}", p.key));
            let scale = max_abs(want);
            assert!(scale > 0.0 && max_abs(got) > 0.0, "{arch}: zero gradient for {}", p.key);
            let rel = max_abs_diff(got, want) / scale;
            worst = worst.max(rel);
            assert!(rel <= 1e-4, "{arch}: gradient of {} off by {rel:.3e} (relative)", p.key);
        }
        println!("{arch}: worst relative gradient error {worst:.3e}");
        for (name, t) in model.base_tensors() {
            assert!(
                grads.get(&t).is_none(),
                "{arch}: frozen base tensor {name} got a gradient"
            );
        }
    }
}
