//! DPO-family losses against TRL 1.16: golden values from `tests/golden/dpo_losses.py`
//! (`tests/golden/dpo_losses.json`), plus invariants.

use std::path::PathBuf;

use candle_core::{Device, Tensor, Var};
use lorafold::dpo::loss::{log_sigmoid, DpoLoss, LossInputs, LossKind, LossParams, LossState, LOSS_NAMES};
use serde_json::Value;

fn golden() -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/dpo_losses.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn tensor(v: &[f32]) -> Tensor {
    Tensor::new(v, &Device::Cpu).unwrap()
}

fn vec1(t: &Tensor) -> Vec<f64> {
    t.to_vec1::<f32>().unwrap().into_iter().map(f64::from).collect()
}

/// Largest |got − want| / max(|want|, floor).
fn max_rel_err(got: &[f64], want: &[f64], floor: f64) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs() / w.abs().max(floor))
        .fold(0.0, f64::max)
}

/// One batch of golden inputs as tensors, with the policy log-probs as Vars.
struct Batch {
    chosen: Var,
    rejected: Var,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    chosen_len: Tensor,
    rejected_len: Tensor,
}

impl Batch {
    fn new(g: &Value) -> Batch {
        Batch {
            chosen: Var::from_tensor(&tensor(&f32s(&g["chosen_logps"]))).unwrap(),
            rejected: Var::from_tensor(&tensor(&f32s(&g["rejected_logps"]))).unwrap(),
            ref_chosen: tensor(&f32s(&g["ref_chosen_logps"])),
            ref_rejected: tensor(&f32s(&g["ref_rejected_logps"])),
            chosen_len: tensor(&f32s(&g["chosen_lengths"])),
            rejected_len: tensor(&f32s(&g["rejected_lengths"])),
        }
    }

    fn inputs(&self, with_ref: bool) -> LossInputs<'_> {
        LossInputs {
            chosen_logps: self.chosen.as_tensor(),
            rejected_logps: self.rejected.as_tensor(),
            ref_chosen_logps: with_ref.then_some(&self.ref_chosen),
            ref_rejected_logps: with_ref.then_some(&self.ref_rejected),
            chosen_lengths: &self.chosen_len,
            rejected_lengths: &self.rejected_len,
        }
    }
}

fn case_loss(case: &Value) -> DpoLoss {
    let params = LossParams {
        label_smoothing: case["label_smoothing"].as_f64().unwrap(),
        simpo_gamma: case["simpo_gamma"].as_f64().unwrap(),
        discopop_tau: case["discopop_tau"].as_f64().unwrap(),
    };
    let terms = case["terms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let name = t[0].as_str().unwrap();
            (LossKind::parse(name, &params).unwrap(), t[1].as_f64().unwrap())
        })
        .collect();
    DpoLoss {
        terms,
        beta: case["beta"].as_f64().unwrap(),
        rpo_alpha: case["rpo_alpha"].as_f64(),
    }
}

/// Errors of one golden case: (loss, per-pair, rewards, gradients).
fn check_case(g: &Value, case: &Value, state: &mut LossState) -> [f64; 4] {
    let label = format!(
        "{} (beta {}, label_smoothing {}, tau {}, gamma {}, input {})",
        case["name"], case["beta"], case["label_smoothing"], case["discopop_tau"], case["simpo_gamma"], case["input"]
    );
    let batch = Batch::new(&g["inputs"][case["input"].as_str().unwrap()]);
    let loss = case_loss(case);
    // Reference-free cases run without reference log-probs, as they would in training.
    let with_ref = case["trl_function"].as_str().unwrap().starts_with("trl.DPOTrainer");
    let x = batch.inputs(with_ref);
    let out = loss.compute(&x, state).unwrap_or_else(|e| panic!("{label}: {e}"));
    assert!(out.loss.dims().is_empty(), "{label}: loss must be a scalar");

    let want = case["loss"].as_f64().unwrap();
    let got = f64::from(out.loss.to_scalar::<f32>().unwrap());
    let loss_err = (got - want).abs() / want.abs().max(1.0);
    assert!(loss_err <= 1e-5, "{label}: loss {got}, TRL {want}");
    // TRL's own float32 run agrees as closely.
    let want32 = case["loss_f32"].as_f64().unwrap();
    assert!(
        (got - want32).abs() <= 1e-5 * want32.abs().max(1.0),
        "{label}: loss {got}, TRL f32 {want32}"
    );

    let mut pair_err = 0.0;
    if !case["per_pair"].is_null() && loss.terms.len() == 1 && loss.rpo_alpha.is_none() {
        let pp = loss.terms[0].0.pair_losses(loss.beta, &x).unwrap();
        pair_err = max_rel_err(&vec1(&pp), &f64s(&case["per_pair"]), 1.0);
        assert!(
            pair_err <= 1e-5,
            "{label}: per-pair losses {pp}, TRL {}",
            case["per_pair"]
        );
    }

    let rc = vec1(&out.chosen_rewards);
    let rr = vec1(&out.rejected_rewards);
    let reward_err = max_rel_err(&rc, &f64s(&case["chosen_rewards"]), 1.0).max(max_rel_err(
        &rr,
        &f64s(&case["rejected_rewards"]),
        1.0,
    ));
    assert!(reward_err <= 1e-5, "{label}: rewards {rc:?} / {rr:?}");
    if let Some(logged) = case["trl_logged_rewards_chosen"].as_f64() {
        let mean = rc.iter().sum::<f64>() / rc.len() as f64;
        assert!(
            (mean - logged).abs() <= 1e-5 * logged.abs().max(1.0),
            "{label}: rewards/chosen {mean}, TRL {logged}"
        );
        let logged = case["trl_logged_rewards_rejected"].as_f64().unwrap();
        let mean = rr.iter().sum::<f64>() / rr.len() as f64;
        assert!(
            (mean - logged).abs() <= 1e-5 * logged.abs().max(1.0),
            "{label}: rewards/rejected {mean}, TRL {logged}"
        );
    }
    assert!(
        !out.chosen_rewards.track_op() && !out.rejected_rewards.track_op(),
        "{label}: rewards must be detached"
    );

    let grads = out.loss.backward().unwrap();
    let gc = vec1(grads.get(batch.chosen.as_tensor()).expect("gradient wrt chosen_logps"));
    let gr = grads
        .get(batch.rejected.as_tensor())
        .map(vec1)
        .unwrap_or_else(|| vec![0.0; gc.len()]);
    let (wc, wr) = (f64s(&case["grad_chosen"]), f64s(&case["grad_rejected"]));
    // Relative to each gradient, floored at 1e-4 of the case's largest one: f32 cannot resolve
    // a gradient 10⁴ times smaller than its neighbours (two terms cancelling) any better.
    let scale = wc.iter().chain(&wr).fold(0.0f64, |m, v| m.max(v.abs()));
    let floor = (scale * 1e-4).max(1e-12);
    let grad_err = max_rel_err(&gc, &wc, floor).max(max_rel_err(&gr, &wr, floor));
    assert!(grad_err <= 1e-5, "{label}: grads {gc:?} / {gr:?}, TRL {wc:?} / {wr:?}");
    [loss_err, pair_err, reward_err, grad_err]
}

#[test]
fn golden_losses_match_trl() {
    let g = golden();
    let cases = g["cases"].as_array().unwrap();
    assert!(cases.len() >= 40, "golden file has {} cases", cases.len());
    let mut worst: Vec<(String, [f64; 4])> = Vec::new();
    for case in cases {
        let errs = check_case(&g, case, &mut LossState::default());
        let name = case["name"].as_str().unwrap().to_string();
        match worst.iter_mut().find(|(n, _)| *n == name) {
            Some((_, w)) => (0..4).for_each(|i| w[i] = w[i].max(errs[i])),
            None => worst.push((name, errs)),
        }
    }
    // Every kind is covered.
    for name in LOSS_NAMES {
        assert!(
            cases
                .iter()
                .any(|c| c["terms"].as_array().unwrap().iter().any(|t| t[0] == name)),
            "no golden case for {name}"
        );
    }
    println!(
        "{:<20} {:>10} {:>10} {:>10} {:>10}",
        "case", "loss", "per-pair", "rewards", "grads"
    );
    for (name, e) in worst {
        println!(
            "{name:<20} {:>10.2e} {:>10.2e} {:>10.2e} {:>10.2e}",
            e[0], e[1], e[2], e[3]
        );
    }
}

/// TRL 1.16's bco_pair keeps no running mean: two consecutive calls sharing one state give
/// each batch's own value.
#[test]
fn bco_pair_consecutive_calls() {
    let g = golden();
    let mut state = LossState::default();
    for case in g["bco_pair_consecutive"].as_array().unwrap() {
        check_case(&g, case, &mut state);
    }
}

#[test]
fn log_sigmoid_is_stable_and_differentiable() {
    let xs = [-1000.0f32, -100.0, -20.0, -1.0, 0.0, 1.0, 20.0, 100.0, 1000.0];
    let v = Var::from_tensor(&tensor(&xs)).unwrap();
    let y = log_sigmoid(v.as_tensor()).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    let dy = vec1(grads.get(v.as_tensor()).unwrap());
    for ((&x, y), dy) in xs.iter().zip(vec1(&y)).zip(dy) {
        let x = f64::from(x);
        let want = if x < 0.0 {
            x - x.exp().ln_1p()
        } else {
            -(-x).exp().ln_1p()
        };
        assert!(y.is_finite() && dy.is_finite(), "logσ({x}) = {y}, grad {dy}");
        assert!(
            (y - want).abs() <= 1e-6 * want.abs().max(1.0),
            "logσ({x}) = {y}, want {want}"
        );
        let dwant = 1.0 / (1.0 + x.exp()); // σ(−x)
        assert!((dy - dwant).abs() <= 1e-6, "d logσ({x}) = {dy}, want {dwant}");
    }
}

/// At step 1 of DPO the policy is the reference: every loss sees Δ = 0, sigmoid gives ln 2 and
/// the rewards are 0.
#[test]
fn policy_equal_to_reference_gives_ln2_and_zero_rewards() {
    let logps = tensor(&[-12.5, -3.0, -40.25, -7.75]);
    let rej = tensor(&[-9.0, -15.5, -22.0, -6.5]);
    let lens = tensor(&[5.0, 3.0, 12.0, 4.0]);
    let x = LossInputs {
        chosen_logps: &logps,
        rejected_logps: &rej,
        ref_chosen_logps: Some(&logps),
        ref_rejected_logps: Some(&rej),
        chosen_lengths: &lens,
        rejected_lengths: &lens,
    };
    let loss = DpoLoss::single(LossKind::Sigmoid { label_smoothing: 0.0 }, 0.1);
    let out = loss.compute(&x, &mut LossState::default()).unwrap();
    let l = out.loss.to_scalar::<f32>().unwrap();
    assert!((f64::from(l) - std::f64::consts::LN_2).abs() < 1e-6, "loss {l}");
    assert_eq!(vec1(&out.chosen_rewards), [0.0; 4]);
    assert_eq!(vec1(&out.rejected_rewards), [0.0; 4]);
    // cDPO too: −(1−ε)logσ(0) − ε·logσ(0) = ln 2.
    let loss = DpoLoss::single(LossKind::Sigmoid { label_smoothing: 0.3 }, 0.5);
    let l = loss
        .compute(&x, &mut LossState::default())
        .unwrap()
        .loss
        .to_scalar::<f32>()
        .unwrap();
    assert!((f64::from(l) - std::f64::consts::LN_2).abs() < 1e-6, "cDPO loss {l}");
}

#[test]
fn parse_errors_list_the_names() {
    let p = LossParams::default();
    let err = LossKind::parse("dpo", &p).unwrap_err().to_string();
    assert!(err.contains("\"dpo\""), "{err}");
    for name in LOSS_NAMES {
        assert!(err.contains(name), "{err} does not list {name}");
    }
    // Parameters out of range name the loss.
    let eps = |e| LossParams {
        label_smoothing: e,
        ..LossParams::default()
    };
    let err = LossKind::parse("exo_pair", &eps(0.0)).unwrap_err().to_string();
    assert!(err.contains("exo_pair") && err.contains("label_smoothing"), "{err}");
    let err = LossKind::parse("robust", &eps(0.5)).unwrap_err().to_string();
    assert!(err.contains("robust"), "{err}");
    let tau = LossParams {
        discopop_tau: 0.0,
        ..LossParams::default()
    };
    assert!(LossKind::parse("discopop", &tau)
        .unwrap_err()
        .to_string()
        .contains("discopop_tau"));
    // Parameters land in the kinds that take them.
    let p = LossParams {
        label_smoothing: 0.2,
        simpo_gamma: 1.5,
        discopop_tau: 0.3,
    };
    assert_eq!(
        LossKind::parse("simpo", &p).unwrap(),
        LossKind::Simpo {
            gamma: 1.5,
            label_smoothing: 0.2
        }
    );
    assert_eq!(
        LossKind::parse("discopop", &p).unwrap(),
        LossKind::DiscoPop { tau: 0.3 }
    );
    assert_eq!(
        LossKind::parse("sigmoid", &p).unwrap(),
        LossKind::Sigmoid { label_smoothing: 0.2 }
    );
    assert_eq!(
        LossKind::parse("aot_unpaired", &p).unwrap(),
        LossKind::AotPair { label_smoothing: 0.2 }
    );
    assert_eq!(
        LossParams::default(),
        LossParams {
            label_smoothing: 0.0,
            simpo_gamma: 0.5,
            discopop_tau: 0.05
        }
    );
}

#[test]
fn reference_requirements() {
    let p = LossParams {
        label_smoothing: 0.1,
        ..LossParams::default()
    };
    for name in LOSS_NAMES {
        let k = LossKind::parse(name, &p).unwrap();
        assert_eq!(k.needs_reference(), !matches!(name, "simpo" | "orpo" | "sft"), "{name}");
    }
    let c = tensor(&[-10.0, -4.0]);
    let r = tensor(&[-12.0, -3.0]);
    let n = tensor(&[5.0, 2.0]);
    let x = LossInputs {
        chosen_logps: &c,
        rejected_logps: &r,
        ref_chosen_logps: None,
        ref_rejected_logps: None,
        chosen_lengths: &n,
        rejected_lengths: &n,
    };
    let err = DpoLoss::single(LossKind::Ipo, 0.1)
        .compute(&x, &mut LossState::default())
        .err()
        .expect("ipo without references must fail")
        .to_string();
    assert!(err.contains("ipo") && err.contains("reference"), "{err}");
    // Reference-free: rewards are β · mean log-probs (CPO/ORPO).
    for kind in [
        LossKind::Orpo,
        LossKind::Simpo {
            gamma: 0.5,
            label_smoothing: 0.0,
        },
        LossKind::Sft,
    ] {
        let out = DpoLoss::single(kind, 0.5)
            .compute(&x, &mut LossState::default())
            .unwrap();
        assert_eq!(vec1(&out.chosen_rewards), [-1.0, -1.0]);
        assert_eq!(
            vec1(&out.rejected_rewards),
            [-1.2, -0.75].map(|v: f64| f64::from(v as f32))
        );
    }
    // Mismatched shapes are an error naming the tensor.
    let short = tensor(&[3.0]);
    let bad = LossInputs {
        rejected_lengths: &short,
        ..x
    };
    let err = DpoLoss::single(LossKind::Sft, 0.1)
        .compute(&bad, &mut LossState::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("rejected_lengths"), "{err}");
}
