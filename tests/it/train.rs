//! DPO training: step-for-step agreement with TRL, the ln 2 start, what changes and what does not,
//! exact resume, and the `dpo` / `eval` commands.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use lorafold::dpo::batch::{sequence_logps, Batch, PairIds};
use lorafold::lora::config::{LoraConfig, TargetModules};
use lorafold::lora::io::load_adapter;
use lorafold::lora::{attach_new, LoraInit};
use lorafold::model::linear::Fwd;
use lorafold::recipe::{DpoOptions, Settings};
use lorafold::train::trainer::{train, DpoRun, LoopConfig, RunOutput};
use serde_json::Value;

use crate::common::*;

fn golden_run() -> Value {
    golden_run_of("qwen2")
}

/// tests/golden/dpo_run.json (qwen2) or dpo_run_<arch>.json: TRL's 20-step run on that fixture.
fn golden_run_of(arch: &str) -> Value {
    let name = if arch == "qwen2" {
        "dpo_run.json".to_string()
    } else {
        format!("dpo_run_{arch}.json")
    };
    serde_json::from_str(&std::fs::read_to_string(root().join("tests/golden").join(name)).unwrap()).unwrap()
}

fn golden_pairs(g: &Value) -> Vec<PairIds> {
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    g["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| PairIds {
            prompt: ids(&p["prompt_ids"]),
            chosen: ids(&p["chosen_ids"]),
            rejected: ids(&p["rejected_ids"]),
            rejected_prompt: None,
        })
        .collect()
}

/// Settings equal to the TRL run's.
fn golden_settings(g: &Value) -> Settings {
    let st = &g["settings"]["training"];
    let f = |k: &str| st[k].as_f64().unwrap_or_else(|| panic!("settings.{k}"));
    let u = |k: &str| st[k].as_u64().unwrap_or_else(|| panic!("settings.{k}")) as usize;
    DpoOptions {
        model: Some(g["model"].as_str().unwrap().into()),
        dataset: Some(vec!["unused".into()]),
        beta: Some(f("beta")),
        learning_rate: Some(f("learning_rate")),
        lr_scheduler_type: Some(st["lr_scheduler_type"].as_str().unwrap().into()),
        warmup_steps: Some(u("warmup_steps")),
        weight_decay: Some(f("weight_decay")),
        adam_beta1: Some(f("adam_beta1")),
        adam_beta2: Some(f("adam_beta2")),
        adam_epsilon: Some(f("adam_epsilon")),
        max_grad_norm: Some(f("max_grad_norm")),
        batch_size: Some(u("per_device_train_batch_size")),
        gradient_accumulation_steps: Some(u("gradient_accumulation_steps")),
        max_steps: Some(u("max_steps")),
        shuffle: Some(false),
        logging_steps: Some(1),
        save_steps: Some(1000),
        eval_steps: Some(1000),
        ..Default::default()
    }
    .resolve()
    .unwrap()
}

fn quiet_loop(s: &Settings, n: usize) -> LoopConfig {
    let mut c = LoopConfig::from_settings(s, n, lorafold::dist::single()).unwrap();
    c.quiet = true;
    c
}

/// TRL's per-sequence log-probs of 4 pairs, padded and packed, on every fixture with a TRL run.
#[test]
fn sequence_logps_match_trl() {
    for arch in ["qwen2", "gemma2", "gemma3", "phi3"] {
        sequence_logps_match_trl_on(arch);
    }
}

fn sequence_logps_match_trl_on(arch: &str) {
    let g = golden_run_of(arch);
    let pairs = golden_pairs(&g);
    let file = g["logps_check"]["file"].as_str().unwrap();
    let want = candle_core::safetensors::load(root().join(file), &Device::Cpu).unwrap();
    let mut model = load_model(arch);
    let ad = load_adapter(&mut model, &adapter_dir(&format!("{arch}_peft")), false).unwrap();
    let four: Vec<&PairIds> = pairs[..4].iter().collect();
    // Both layouts: 2B padded sequences, and B packed rows with the prompt computed once.
    for batch in [
        Batch::new(&four, 0, &Device::Cpu).unwrap(),
        Batch::packed(&four, 0, &Device::Cpu).unwrap(),
    ] {
        let pol = sequence_logps(&model, &batch, &Fwd::eval(ad.slot)).unwrap();
        let rf = sequence_logps(&model, &batch, &Fwd::base()).unwrap();
        for (got, key) in [
            (pol.chosen(4).unwrap(), "policy_chosen_logps"),
            (pol.rejected(4).unwrap(), "policy_rejected_logps"),
            (rf.chosen(4).unwrap(), "ref_chosen_logps"),
            (rf.rejected(4).unwrap(), "ref_rejected_logps"),
        ] {
            let err = max_abs_diff(&got, &want[key]);
            let rel = err / max_abs(&want[key]);
            println!("{arch} {key}: max abs error {err:.3e} (relative {rel:.3e})");
            // Sums of up to ten f32 log-probs of magnitude ~6: 1e-5 relative to the sum.
            assert!(rel <= 1e-5, "{arch} {key}: {err}");
        }
    }
}

/// Prefix sharing changes how the batch is laid out, not what is computed: for every
/// architecture (Mistral's sliding window included) the packed batch gives the padded batch's
/// log-probs and LoRA gradients.
#[test]
fn packed_batches_match_padded_ones() {
    let mut rng = lorafold::rng::Rng::new(5);
    for arch in ARCHS {
        let mut model = load_model(arch);
        let vocab = model.cfg.vocab_size as u64;
        let lcfg = LoraConfig::new(4, 8.0, 0.0, TargetModules::all_linear());
        let ad = attach_new(&mut model, &lcfg, LoraInit::Gaussian { seed: 3, std: 0.1 }).unwrap();
        let mut seq = |n: usize| -> Vec<u32> { (0..n).map(|_| 1 + rng.below(vocab - 1) as u32).collect() };
        // Unequal lengths, so both layouts pad; one prompt of a single token.
        let pairs: Vec<PairIds> = [(7, 5, 9), (1, 4, 2), (12, 3, 6)]
            .iter()
            .map(|&(p, c, r)| PairIds {
                prompt: seq(p),
                chosen: seq(c),
                rejected: seq(r),
                rejected_prompt: None,
            })
            .collect();
        let refs: Vec<&PairIds> = pairs.iter().collect();
        let run = |batch: &Batch| {
            let out = sequence_logps(&model, batch, &Fwd::eval(ad.slot)).unwrap();
            let w = Tensor::new(&[1.0f32, -2.0, 0.5, 3.0, -1.0, 0.25], &Device::Cpu).unwrap();
            let g = (&out.logps * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let grads: Vec<Tensor> = ad
                .params
                .iter()
                .map(|p| g.get(p.var.as_ref().unwrap().as_tensor()).unwrap().clone())
                .collect();
            (out.logps.detach(), grads, out.logits_sum)
        };
        let padded = Batch::new(&refs, 0, &Device::Cpu).unwrap();
        let packed = Batch::packed(&refs, 0, &Device::Cpu).unwrap();
        assert!(packed.packing.is_some() && packed.input_ids.dims2().unwrap().0 == 3);
        assert_eq!(padded.num_tokens, packed.num_tokens);
        let (lp_a, g_a, ls_a) = run(&padded);
        let (lp_b, g_b, ls_b) = run(&packed);
        let err = max_abs_diff(&lp_a, &lp_b) / max_abs(&lp_a);
        assert!(err <= 1e-5, "{arch}: packed log-probs differ by {err:.3e} relative");
        for i in 0..2 {
            assert!(
                (ls_a[i] - ls_b[i]).abs() <= 1e-4 * ls_a[i].abs().max(1.0),
                "{arch}: logit sums {ls_a:?} vs {ls_b:?}"
            );
        }
        for (p, (a, b)) in ad.params.iter().zip(g_a.iter().zip(&g_b)) {
            let rel = max_abs_diff(a, b) / max_abs(a).max(1e-12);
            assert!(
                rel <= 1e-4,
                "{arch}: gradient of {} differs by {rel:.3e} relative",
                p.key
            );
        }
    }
}

#[test]
fn twenty_steps_match_trl_step_for_step() {
    twenty_steps_match_trl("qwen2");
}

/// The same 20-step TRL run on the Gemma 2, Gemma 3 and Phi-3 fixtures.
#[test]
fn twenty_steps_match_trl_on_gemma_and_phi() {
    for arch in ["gemma2", "gemma3", "phi3"] {
        twenty_steps_match_trl(arch);
    }
}

fn twenty_steps_match_trl(arch: &str) {
    let g = golden_run_of(arch);
    let pairs = golden_pairs(&g);
    let s = golden_settings(&g);
    let mut model = load_model(arch);
    let ad = load_adapter(&mut model, &root().join(g["init_adapter"].as_str().unwrap()), true).unwrap();
    let run = DpoRun::new(&model, Some(ad), None, &s).unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let cfg = quiet_loop(&s, pairs.len());
    let o = train(
        &run,
        &pairs,
        &[],
        &cfg,
        &RunOutput {
            dir: out_dir.path(),
            base_model: arch,
            recipe_yaml: "",
            resume_from: None,
        },
    )
    .unwrap();
    let steps = g["steps"].as_array().unwrap();
    assert_eq!(o.steps.len(), steps.len());
    let mut worst = 0f64;
    for (i, (ours, theirs)) in o.steps.iter().zip(steps).enumerate() {
        let l = theirs["loss"].as_f64().unwrap();
        let err = (ours["loss"] - l).abs();
        worst = worst.max(err);
        println!(
            "{arch} step {:2}: loss {:.6} vs TRL {:.6} | grad_norm {:.5} vs {:.5} | lr {:.3e}",
            i + 1,
            ours["loss"],
            l,
            ours["grad_norm"],
            theirs["grad_norm"].as_f64().unwrap(),
            ours["learning_rate"]
        );
        assert!(err <= 1e-4, "{arch} step {}: loss {} vs TRL {l}", i + 1, ours["loss"]);
        let gn = theirs["grad_norm"].as_f64().unwrap();
        assert!(
            (ours["grad_norm"] - gn).abs() <= 1e-3 * gn.max(1e-3),
            "{arch} step {}: grad_norm {} vs {gn}",
            i + 1,
            ours["grad_norm"]
        );
        for key in [
            "rewards/chosen",
            "rewards/rejected",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
        ] {
            if let Some(t) = theirs[key].as_f64() {
                assert!(
                    (ours[key] - t).abs() <= 1e-3 * t.abs().max(1.0),
                    "{arch} step {} {key}: {} vs {t}",
                    i + 1,
                    ours[key]
                );
            }
        }
    }
    println!("{arch}: worst per-step loss error {worst:.3e}");
    // The final adapter agrees with TRL's.
    let want = candle_core::safetensors::load(root().join(g["final_adapter"].as_str().unwrap()), &Device::Cpu).unwrap();
    for p in &run.adapter.as_ref().unwrap().params {
        let w = &want[&p.key];
        let rel = max_abs_diff(&p.tensor, w) / max_abs(w);
        assert!(rel <= 1e-3, "{arch} {}: relative error {rel}", p.key);
    }
}

fn snapshot(ts: &[(String, Tensor)]) -> HashMap<String, Vec<f32>> {
    ts.iter()
        .map(|(k, t)| (k.clone(), t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

#[test]
fn fresh_adapter_starts_at_ln2_and_training_moves_only_lora() {
    let g = golden_run();
    let pairs = golden_pairs(&g);
    let mut s = golden_settings(&g);
    s.max_steps = Some(3);
    s.weight_decay = 0.0;
    let mut model = load_model("llama");
    let base_before = snapshot(&model.base_tensors());
    let cfg = LoraConfig::new(4, 8.0, 0.1, TargetModules::all_linear());
    let ad = attach_new(&mut model, &cfg, LoraInit::Peft { seed: 1 }).unwrap();
    let lora_before = snapshot(
        &ad.params
            .iter()
            .map(|p| (p.key.clone(), p.tensor.clone()))
            .collect::<Vec<_>>(),
    );
    let run = DpoRun::new(&model, Some(ad), None, &s).unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let o = train(
        &run,
        &pairs,
        &[],
        &quiet_loop(&s, pairs.len()),
        &RunOutput {
            dir: out_dir.path(),
            base_model: "llama",
            recipe_yaml: "",
            resume_from: None,
        },
    )
    .unwrap();
    let first = &o.steps[0];
    assert!(
        (first["loss"] - std::f64::consts::LN_2).abs() < 1e-6,
        "first loss {}",
        first["loss"]
    );
    assert!(first["rewards/chosen"].abs() < 1e-6 && first["rewards/rejected"].abs() < 1e-6);
    for p in &run.adapter.as_ref().unwrap().params {
        let now = p.tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_ne!(now, lora_before[&p.key], "{} did not change", p.key);
    }
    assert_eq!(snapshot(&model.base_tensors()), base_before, "a base tensor changed");
}

fn resume_run(dir: &Path, stop_after: Option<usize>, resume: bool) -> Vec<(String, Vec<f32>)> {
    let g = golden_run();
    let pairs = golden_pairs(&g);
    let mut s = golden_settings(&g);
    s.max_steps = Some(10);
    s.shuffle = true;
    s.save_steps = 5;
    s.lora_dropout_p = 0.1;
    let mut model = load_model("qwen2");
    let cfg = LoraConfig::new(4, 8.0, 0.1, TargetModules::all_linear());
    let ad = attach_new(&mut model, &cfg, LoraInit::Peft { seed: 7 }).unwrap();
    let run = DpoRun::new(&model, Some(ad), None, &s).unwrap();
    let mut c = quiet_loop(&s, pairs.len());
    c.stop_after = stop_after;
    let resume_from = resume.then(|| lorafold::train::checkpoint::resolve("latest", dir).unwrap());
    train(
        &run,
        &pairs,
        &[],
        &c,
        &RunOutput {
            dir,
            base_model: "qwen2",
            recipe_yaml: "",
            resume_from,
        },
    )
    .unwrap();
    run.adapter
        .unwrap()
        .params
        .iter()
        .map(|p| (p.key.clone(), p.tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

#[test]
fn resume_gives_the_same_adapter_as_an_uninterrupted_run() {
    let a = tempfile::tempdir().unwrap();
    let full = resume_run(a.path(), None, false);
    let b = tempfile::tempdir().unwrap();
    resume_run(b.path(), Some(5), false);
    assert!(b.path().join("checkpoint-5/trainer_state.json").exists());
    let resumed = resume_run(b.path(), None, true);
    assert_eq!(full, resumed, "resumed run differs from the uninterrupted one");
    // save_total_limit 2 keeps the newest two.
    let names: Vec<String> = lorafold::train::checkpoint::list(b.path())
        .iter()
        .map(|(s, _)| s.to_string())
        .collect();
    assert_eq!(names, ["5", "10"]);
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn dpo_command_runs_the_quickstart_recipe_with_flag_overrides() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let r = lorafold(
        &[
            "dpo",
            "--recipe",
            root().join("recipes/quickstart.yaml").to_str().unwrap(),
            "--max_steps",
            "4",
            "--logging-steps",
            "2",
            "--eval_steps",
            "4",
            "--max_eval_pairs",
            "8",
            "--output_dir",
            out.to_str().unwrap(),
            "--sft_type",
            "lora",
        ],
        &[],
    );
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{stderr}");
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.jsonl",
        "metrics.png",
        "recipe.yaml",
        "checkpoint-4/trainer_state.json",
    ] {
        assert!(out.join(f).exists(), "{f} missing; stderr: {stderr}");
    }
    let lines: Vec<Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let train_lines: Vec<&Value> = lines.iter().filter(|l| l.get("loss").is_some()).collect();
    assert_eq!(train_lines.len(), 2, "logging every 2 of 4 steps");
    for key in [
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "logits/chosen",
        "logits/rejected",
        "grad_norm",
        "learning_rate",
        "epoch",
        "step",
        "tokens_per_second",
    ] {
        assert!(train_lines[0].get(key).is_some(), "metrics.jsonl lacks {key}");
    }
    assert!(lines.iter().any(|l| l.get("eval_loss").is_some()), "no eval line");
    // The resolved recipe shows the override.
    let recipe = std::fs::read_to_string(out.join("recipe.yaml")).unwrap();
    assert!(recipe.contains("max_steps: 4"), "{recipe}");
    // The saved adapter loads in eval, with JSON output and per-pair scores.
    let per_pair = tmp.path().join("pairs.jsonl");
    let r = lorafold(
        &[
            "eval",
            "--model",
            root().join("tests/fixtures/models/qwen2").to_str().unwrap(),
            "--adapters",
            out.to_str().unwrap(),
            "--dataset",
            root()
                .join("tests/fixtures/data/quickstart/eval.jsonl")
                .to_str()
                .unwrap(),
            "--max_eval_pairs",
            "6",
            "--json",
            "--per_pair",
            per_pair.to_str().unwrap(),
        ],
        &[],
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let v: Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(v["pairs"], 6);
    assert!(v["loss"].is_number() && v["rewards/accuracies"].is_number(), "{v}");
    assert_eq!(std::fs::read_to_string(per_pair).unwrap().lines().count(), 6);
}

#[test]
fn recipe_and_flag_errors_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = write(tmp.path(), "r.yaml", "model: x\ndataset: y.jsonl\nlerning_rate: 0.1\n");
    let r = lorafold(&["dpo", "--recipe", recipe.to_str().unwrap()], &[]);
    let e = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success() && e.contains("lerning_rate") && e.contains("r.yaml"),
        "{e}"
    );

    let recipe = write(tmp.path(), "t.yaml", "model: x\ndataset: y.jsonl\nbeta: high\n");
    let r = lorafold(&["dpo", "--recipe", recipe.to_str().unwrap()], &[]);
    let e = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && e.contains("beta") && e.contains("t.yaml"), "{e}");

    let r = lorafold(
        &["dpo", "--model", "x", "--dataset", "y.jsonl", "--sft_type", "full"],
        &[],
    );
    let e = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success() && e.contains("sft_type") && e.contains("lora"),
        "{e}"
    );

    let r = lorafold(
        &[
            "dpo",
            "--model",
            "x",
            "--dataset",
            "y.jsonl",
            "--loss_type",
            "sigmoid",
            "hinge",
            "--loss_weights",
            "1.0",
        ],
        &[],
    );
    let e = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && e.contains("loss_weights"), "{e}");
}

#[test]
fn both_flag_spellings_and_recipe_override_resolve_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = write(
        tmp.path(),
        "r.yaml",
        "model: m\ndataset: d.jsonl\nlora-rank: 4\nlearning_rate: 0.5\nlora_target_modules: [q_proj, v_proj]\n",
    );
    let a = lorafold(
        &[
            "dpo",
            "--recipe",
            recipe.to_str().unwrap(),
            "--learning_rate",
            "0.25",
            "--lora_dropout",
            "0.2",
            "--print-settings",
        ],
        &[],
    );
    let b = lorafold(
        &[
            "dpo",
            "--recipe",
            recipe.to_str().unwrap(),
            "--learning-rate=0.25",
            "--lora-dropout-p",
            "0.2",
            "--print_settings",
        ],
        &[],
    );
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert_eq!(a.stdout, b.stdout);
    let s: Settings = serde_yaml::from_slice(&a.stdout).unwrap();
    assert_eq!((s.learning_rate, s.lora_rank, s.lora_dropout_p), (0.25, 4, 0.2));
    assert_eq!(s.lora_target_modules, ["q_proj", "v_proj"]);
    assert!(s.shuffle, "shuffle defaults to true");
}

#[test]
fn precomputed_reference_gives_the_same_run_and_is_cached() {
    let g = golden_run();
    let pairs = golden_pairs(&g);
    let mut s = golden_settings(&g);
    s.max_steps = Some(4);
    let run_once = |precompute: bool, dir: &Path| -> Vec<f64> {
        let mut model = load_model("qwen2");
        let ad = load_adapter(&mut model, &root().join(g["init_adapter"].as_str().unwrap()), true).unwrap();
        let run = DpoRun::new(&model, Some(ad), None, &s).unwrap();
        let mut c = quiet_loop(&s, pairs.len());
        c.precompute_ref = precompute;
        let o = train(
            &run,
            &pairs,
            &[],
            &c,
            &RunOutput {
                dir,
                base_model: "qwen2",
                recipe_yaml: "",
                resume_from: None,
            },
        )
        .unwrap();
        o.steps.iter().map(|r| r["loss"]).collect()
    };
    let a = tempfile::tempdir().unwrap();
    let online = run_once(false, a.path());
    assert!(!a.path().join("ref_logps.json").exists());
    let b = tempfile::tempdir().unwrap();
    let pre = run_once(true, b.path());
    let cache = b.path().join("ref_logps.json");
    assert!(cache.exists());
    for (x, y) in online.iter().zip(&pre) {
        assert!((x - y).abs() <= 1e-5, "online {x} vs precomputed {y}");
    }
    // A second run with the same data and reference reuses the cache (not rewritten).
    let before = std::fs::metadata(&cache).unwrap().modified().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let again = run_once(true, b.path());
    assert_eq!(
        std::fs::metadata(&cache).unwrap().modified().unwrap(),
        before,
        "cache was recomputed"
    );
    assert_eq!(pre, again);
}

#[test]
fn reference_adapter_is_frozen_and_used_as_reference() {
    let g = golden_run();
    let pairs = golden_pairs(&g);
    let mut s = golden_settings(&g);
    s.max_steps = Some(2);
    s.warmup_steps = 0;
    s.warmup_ratio = 0.0;
    let mut model = load_model("qwen2");
    // Policy starts from the same weights as the reference adapter: loss ln 2, rewards 0.
    let policy = load_adapter(&mut model, &adapter_dir("qwen2_peft"), true).unwrap();
    let reference = load_adapter(&mut model, &adapter_dir("qwen2_peft"), false).unwrap();
    assert!(
        reference.params.iter().all(|p| p.var.is_none()),
        "reference adapter must be frozen"
    );
    let ref_before = snapshot(
        &reference
            .params
            .iter()
            .map(|p| (p.key.clone(), p.tensor.clone()))
            .collect::<Vec<_>>(),
    );
    let run = DpoRun::new(&model, Some(policy), Some(reference.slot), &s).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let o = train(
        &run,
        &pairs,
        &[],
        &quiet_loop(&s, pairs.len()),
        &RunOutput {
            dir: dir.path(),
            base_model: "qwen2",
            recipe_yaml: "",
            resume_from: None,
        },
    )
    .unwrap();
    assert!(
        (o.steps[0]["loss"] - std::f64::consts::LN_2).abs() < 1e-6,
        "{}",
        o.steps[0]["loss"]
    );
    assert!(o.steps[0]["rewards/chosen"].abs() < 1e-6);
    assert!(
        (o.steps[1]["loss"] - std::f64::consts::LN_2).abs() > 1e-4,
        "the policy trained"
    );
    let ref_after = snapshot(
        &reference
            .params
            .iter()
            .map(|p| (p.key.clone(), p.tensor.clone()))
            .collect::<Vec<_>>(),
    );
    assert_eq!(ref_before, ref_after, "the reference adapter changed");
}

#[test]
fn non_finite_steps_are_skipped_then_stop_the_run() {
    let g = golden_run();
    let pairs = golden_pairs(&g);
    let mut s = golden_settings(&g);
    s.max_steps = Some(10);
    s.max_nonfinite_steps = 3;
    let mut model = load_model("qwen2");
    let ad = load_adapter(&mut model, &adapter_dir("qwen2_peft"), true).unwrap();
    // Poison one B matrix: every loss is NaN.
    let v = ad.params[1].var.clone().unwrap();
    v.set(&(v.as_tensor() * f64::NAN).unwrap()).unwrap();
    let run = DpoRun::new(&model, Some(ad), None, &s).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let err = train(
        &run,
        &pairs,
        &[],
        &quiet_loop(&s, pairs.len()),
        &RunOutput {
            dir: dir.path(),
            base_model: "qwen2",
            recipe_yaml: "",
            resume_from: None,
        },
    )
    .err()
    .expect("must stop")
    .to_string();
    assert!(
        err.contains("non-finite") && err.contains("3 steps in a row") && err.contains("no checkpoint"),
        "{err}"
    );
    assert!(lorafold::train::checkpoint::list(dir.path()).is_empty());
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_exits_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_lorafold"))
        .args([
            "dpo",
            "--recipe",
            root().join("recipes/quickstart.yaml").to_str().unwrap(),
            "--output_dir",
            out.to_str().unwrap(),
            "--logging_steps",
            "1",
            "--save_steps",
            "1000",
            "--eval_steps",
            "1000",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for training to start (first metrics line), then interrupt.
    let metrics = out.join("metrics.jsonl");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&metrics)
        .map(|s| s.lines().count())
        .unwrap_or(0)
        < 1
    {
        assert!(t0.elapsed().as_secs() < 120, "training did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let kill = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let outp = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&outp.stderr);
    // 130, the shell's code for SIGINT: `lorafold dpo … && lorafold merge …` stops here.
    assert_eq!(outp.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("resume with --resume_from_checkpoint latest"),
        "{stderr}"
    );
    let cks = lorafold::train::checkpoint::list(&out);
    assert_eq!(cks.len(), 1, "{stderr}");
    assert!(
        !out.join("adapter_model.safetensors").exists(),
        "an interrupted run must not look finished"
    );
}

/// Gradient checkpointing recomputes each block in the backward pass: same loss, same LoRA
/// gradients (dropout on, so the recomputation must draw the same masks), on every
/// architecture, for padded and packed batches.
#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    let mut rng = lorafold::rng::Rng::new(11);
    for arch in ARCHS {
        let mut model = load_model(arch);
        let vocab = model.cfg.vocab_size as u64;
        let lcfg = LoraConfig::new(4, 8.0, 0.1, TargetModules::all_linear());
        let ad = attach_new(&mut model, &lcfg, LoraInit::Gaussian { seed: 4, std: 0.1 }).unwrap();
        let mut seq = |n: usize| -> Vec<u32> { (0..n).map(|_| 1 + rng.below(vocab - 1) as u32).collect() };
        let pairs: Vec<PairIds> = [(6, 4, 8), (3, 5, 2)]
            .iter()
            .map(|&(p, c, r)| PairIds {
                prompt: seq(p),
                chosen: seq(c),
                rejected: seq(r),
                rejected_prompt: None,
            })
            .collect();
        let refs: Vec<&PairIds> = pairs.iter().collect();
        let batches = [
            Batch::new(&refs, 0, &Device::Cpu).unwrap(),
            Batch::packed(&refs, 0, &Device::Cpu).unwrap(),
        ];
        let grads = |model: &lorafold::model::Model, batch: &Batch| {
            let out = sequence_logps(model, batch, &Fwd::train(ad.slot, 77)).unwrap();
            let w = Tensor::new(&[1.0f32, -2.0, 0.5, 3.0], &Device::Cpu).unwrap();
            let loss = (&out.logps * &w).unwrap().sum_all().unwrap();
            let g = model.backward(&loss).unwrap();
            let gs: Vec<Tensor> = ad
                .params
                .iter()
                .map(|p| {
                    g.get(p.var.as_ref().unwrap().as_tensor())
                        .expect("missing gradient")
                        .clone()
                })
                .collect();
            (loss.to_scalar::<f32>().unwrap(), gs)
        };
        let plain: Vec<_> = batches.iter().map(|b| grads(&model, b)).collect();
        model.set_gradient_checkpointing(true);
        for (batch, (loss_a, g_a)) in batches.iter().zip(&plain) {
            let (loss_b, g_b) = grads(&model, batch);
            assert!(
                (loss_a - loss_b).abs() <= 1e-6 * loss_a.abs().max(1.0),
                "{arch}: loss {loss_a} vs {loss_b}"
            );
            for (p, (a, b)) in ad.params.iter().zip(g_a.iter().zip(&g_b)) {
                assert!(max_abs(a) > 0.0, "{arch}: zero gradient for {}", p.key);
                let rel = max_abs_diff(a, b) / max_abs(a);
                assert!(
                    rel <= 1e-5,
                    "{arch}: gradient of {} differs by {rel:.3e} relative",
                    p.key
                );
            }
        }
    }
}

#[test]
fn ms_swift_2_flags_are_accepted_and_the_irrelevant_ones_noted() {
    let out = lorafold(
        &[
            "dpo",
            "--model",
            "m",
            "--dataset",
            "d.jsonl",
            "--model_revision",
            "master",
            "--tuner_backend",
            "swift",
            "--check_model_is_latest",
            "false",
            "--check_dataset_strategy",
            "none",
            "--lr",
            "0.25",
            "--print_settings",
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    for note in [
        "note: --tuner_backend swift is accepted",
        "note: --check_model_is_latest is ignored",
        "note: --check_dataset_strategy none is accepted",
    ] {
        assert_eq!(err.matches(note).count(), 1, "{note:?} said once in: {err}");
    }
    let s: Settings = serde_yaml::from_slice(&out.stdout).unwrap();
    assert_eq!(s.revision.as_deref(), Some("master"));
    assert_eq!(s.learning_rate, 0.25);
}

#[test]
fn rlhf_takes_ms_swift_3_flags() {
    let out = lorafold(
        &[
            "rlhf",
            "--rlhf_type",
            "simpo",
            "--model",
            "m",
            "--dataset",
            "d.jsonl",
            "--train_type",
            "lora",
            "--target_modules",
            "all-linear",
            "--torch_dtype",
            "float32",
            "--lora_dropout",
            "0.1",
            "--per_device_train_batch_size",
            "2",
            "--dataloader_num_workers",
            "4",
            "--print_settings",
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("note: --dataloader_num_workers 4 is ignored"), "{err}");
    let s: Settings = serde_yaml::from_slice(&out.stdout).unwrap();
    assert_eq!(s.loss_type, ["simpo"]);
    assert_eq!((s.batch_size, s.lora_dropout_p), (2, 0.1));
    assert_eq!(s.lora_target_modules, ["all-linear"]);
}

#[test]
fn every_unknown_flag_is_reported_at_once() {
    let out = lorafold(
        &[
            "dpo",
            "--model",
            "m",
            "--no_such_flag",
            "1",
            "--dataset",
            "d.jsonl",
            "--another-one=2",
            "--max_length",
            "64",
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("unknown flags for `lorafold dpo`: --no_such_flag, --another-one"),
        "{err}"
    );
}

#[test]
fn a_finished_run_records_an_absolute_base_and_says_what_to_run_next() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = quickstart(&out, &["--max_steps", "2"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    let base = cfg["base_model_name_or_path"].as_str().unwrap();
    assert!(Path::new(base).is_absolute(), "{base}");
    assert_eq!(
        std::fs::canonicalize(base).unwrap(),
        std::fs::canonicalize(root().join("tests/fixtures/models/qwen2")).unwrap()
    );
    let shown = out.display().to_string();
    assert!(err.contains("lorafold infer --model"), "{err}");
    assert!(err.contains(&format!("--adapters {shown}")), "{err}");
    assert!(err.contains(&format!("{shown}/metrics.jsonl")), "{err}");
    // stderr is a pipe here: the log line carries step/total, elapsed and ETA.
    assert!(err.contains(" | 2/2 [00:00:"), "{err}");
}

#[test]
fn eval_and_save_strategy_no_write_neither_evaluations_nor_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = quickstart(
        &out,
        &[
            "--max_steps",
            "3",
            "--eval_strategy",
            "no",
            "--save_strategy",
            "no",
            "--logging_steps",
            "1",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(out.join("adapter_model.safetensors").is_file(), "{err}");
    assert!(lorafold::train::checkpoint::list(&out).is_empty(), "{err}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 3, "{metrics}");
    assert!(!metrics.contains("eval_loss"), "{metrics}");
}

#[test]
fn the_parameter_count_counts_every_tensor_of_the_model() {
    for arch in ARCHS {
        let model = load_model(arch);
        let in_tensors: usize = model.base_tensors().iter().map(|(_, t)| t.elem_count()).sum();
        assert_eq!(model.cfg.num_params(), in_tensors, "{arch}");
    }
}

#[test]
fn a_resume_names_the_settings_that_changed() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let run = |extra: &[&str]| quickstart(&out, &[&["--save_steps", "1"], extra].concat());
    let first = run(&["--max_steps", "2"]);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    // A changed hyperparameter is said, and the run goes on.
    let more = run(&[
        "--max_steps",
        "3",
        "--learning_rate",
        "1e-4",
        "--resume_from_checkpoint",
        "latest",
    ]);
    let err = String::from_utf8_lossy(&more.stderr);
    assert!(more.status.success(), "{err}");
    assert!(err.contains("note: resuming"), "{err}");
    assert!(err.contains("learning_rate 0.005 → 0.0001"), "{err}");
    assert!(err.contains("max_steps 2 → 3"), "{err}");
    // Another model is named as the reason the data no longer matches.
    let llama = run(&[
        "--max_steps",
        "4",
        "--model",
        "tests/fixtures/models/llama",
        "--resume_from_checkpoint",
        "latest",
    ]);
    let err = String::from_utf8_lossy(&llama.stderr);
    assert!(!llama.status.success(), "{err}");
    assert!(err.contains("refusing to resume"), "{err}");
    assert!(
        err.contains(r#"model "tests/fixtures/models/qwen2" → "tests/fixtures/models/llama""#),
        "{err}"
    );
}

#[test]
fn report_to_tensorboard_writes_the_logged_metrics_under_transformers_tags() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = quickstart(
        &out,
        &[
            "--max_steps",
            "4",
            "--logging_steps",
            "2",
            "--eval_steps",
            "2",
            "--report_to",
            "tensorboard",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let files: Vec<_> = std::fs::read_dir(out.join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with("events.out.tfevents."));
    let scalars = lorafold::train::tensorboard::read_scalars(&files[0]).unwrap();
    // Every value of metrics.jsonl is in the event file, at its step, under its tag.
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let mut checked = 0;
    for line in metrics.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let step = v["step"].as_i64().unwrap();
        for (k, x) in v.as_object().unwrap() {
            if k == "step" {
                continue;
            }
            let tag = match k.strip_prefix("eval_") {
                Some(rest) => format!("eval/{rest}"),
                None => format!("train/{k}"),
            };
            let got = scalars
                .iter()
                .find(|s| s.step == step && s.tag == tag)
                .unwrap_or_else(|| panic!("{tag} at step {step} missing"));
            assert_eq!(got.value, x.as_f64().unwrap() as f32, "{tag} at step {step}");
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} values");
    for tag in [
        "train/loss",
        "train/rewards/margins",
        "train/learning_rate",
        "eval/loss",
    ] {
        assert!(scalars.iter().any(|s| s.tag == tag), "{tag}");
    }
}

#[test]
fn reruns_into_one_output_dir_add_a_version_or_overwrite_or_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let run = |extra: &[&str]| quickstart(&out, &[&["--max_steps", "1"], extra].concat());
    for _ in 0..2 {
        let o = run(&["--add_version"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let mut versions: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    versions.sort();
    assert_eq!(versions.len(), 2, "{versions:?}");
    assert!(
        versions[0].starts_with("v0-") && versions[1].starts_with("v1-"),
        "{versions:?}"
    );
    for v in &versions {
        assert!(out.join(v).join("adapter_model.safetensors").is_file(), "{v}");
    }
    // By default the first run writes into the folder itself and a rerun into a new version
    // folder; with --add_version false a rerun is refused, and --overwrite_output_dir replaces.
    let plain = tmp.path().join("plain");
    let into = |extra: &[&str]| quickstart(&plain, &[&["--max_steps", "1"], extra].concat());
    assert!(into(&[]).status.success());
    assert!(plain.join("adapter_model.safetensors").is_file());
    let rerun = into(&[]);
    let err = String::from_utf8_lossy(&rerun.stderr);
    assert!(rerun.status.success(), "{err}");
    assert!(err.contains("already holds a trained adapter: training into"), "{err}");
    let v0: Vec<_> = std::fs::read_dir(&plain)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("v0-"))
        .collect();
    assert_eq!(v0.len(), 1, "{v0:?}");
    assert!(plain.join(&v0[0]).join("adapter_model.safetensors").is_file());
    let again = into(&["--add_version", "false"]);
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success());
    assert!(
        err.contains("--add_version") && err.contains("--overwrite_output_dir"),
        "{err}"
    );
    let over = into(&["--overwrite_output_dir"]);
    assert!(over.status.success(), "{}", String::from_utf8_lossy(&over.stderr));
}

#[test]
fn eval_notes_an_adapter_trained_on_another_base() {
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("qwen2_copy");
    copy_dir(&root().join("tests/fixtures/models/qwen2"), &copy);
    let data = root().join("tests/fixtures/data/quickstart/eval.jsonl");
    let adapter = root().join("tests/fixtures/adapters/qwen2_peft");
    let eval = |model: &Path| {
        lorafold(
            &[
                "eval",
                "--model",
                model.to_str().unwrap(),
                "--adapters",
                adapter.to_str().unwrap(),
                "--dataset",
                data.to_str().unwrap(),
                "--max_eval_pairs",
                "4",
            ],
            &[],
        )
    };
    let same = eval(&root().join("tests/fixtures/models/qwen2"));
    let err = String::from_utf8_lossy(&same.stderr);
    assert!(same.status.success(), "{err}");
    assert!(!err.contains("was trained on"), "{err}");
    let other = eval(&copy);
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(other.status.success(), "{err}");
    assert!(
        err.contains(r#"was trained on "tests/fixtures/models/qwen2", not on --model"#),
        "{err}"
    );
}

/// `lorafold dpo` on the quickstart recipe, writing to `out`, with `extra` flags.
fn quickstart(out: &Path, extra: &[&str]) -> std::process::Output {
    let recipe = root().join("recipes/quickstart.yaml");
    let mut args = vec![
        "dpo",
        "--recipe",
        recipe.to_str().unwrap(),
        "--output_dir",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    lorafold(&args, &[])
}

/// A recipe given to eval keeps its training keys (it is shared with dpo): they are named in a
/// note, not used and not dropped silently; a training flag given to eval is an error.
#[test]
fn eval_names_the_recipe_keys_it_does_not_use() {
    let recipe = root().join("recipes/quickstart.yaml");
    let r = lorafold(
        &["eval", "--recipe", recipe.to_str().unwrap(), "--max_eval_pairs", "2"],
        &[],
    );
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{err}");
    assert!(
        err.contains("does not use the training keys of") && err.contains("learning_rate") && err.contains("lora_rank"),
        "{err}"
    );
    let r = lorafold(
        &["eval", "--recipe", recipe.to_str().unwrap(), "--learning_rate", "1e-3"],
        &[],
    );
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success() && err.contains("--learning_rate is a flag for training"),
        "{err}"
    );
}
