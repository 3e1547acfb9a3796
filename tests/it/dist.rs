//! Data-parallel training: `mpirun -np 2 lorafold dpo …` against one process with the same global
//! batch, a killed rank, ranks that disagree, and a resume with another world size. The MPI tests
//! need the `mpi` feature and OpenMPI's `mpirun` (`.ci/run` installs both).

use std::path::Path;

use crate::common::{lorafold, model_dir, root};

#[cfg(feature = "mpi")]
use std::collections::HashMap;
#[cfg(feature = "mpi")]
use std::path::PathBuf;
#[cfg(feature = "mpi")]
use std::process::{Command, Output, Stdio};
#[cfg(feature = "mpi")]
use std::time::{Duration, Instant};

#[cfg(feature = "mpi")]
use candle_core::{Device, Tensor};

fn data(name: &str) -> String {
    root()
        .join("tests/fixtures/data/quickstart")
        .join(name)
        .display()
        .to_string()
}

/// A DPO run on the qwen2 fixture, writing to `out`, with `extra` flags.
fn dpo_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = ["dpo", "--model", model_dir("qwen2").to_str().unwrap()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for (k, v) in [
        ("--dataset", format!("{}#16", data("train.jsonl"))),
        ("--output_dir", out.display().to_string()),
        ("--max_length", "64".into()),
        ("--max_prompt_length", "48".into()),
        ("--lora_rank", "8".into()),
        ("--lora_alpha", "16".into()),
        ("--lora_dropout_p", "0.1".into()),
        ("--learning_rate", "5e-3".into()),
        ("--warmup_steps", "1".into()),
        ("--logging_steps", "1".into()),
        ("--seed", "5".into()),
        ("--report_to", "none".into()),
    ] {
        a.push(k.into());
        a.push(v);
    }
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// Started by an MPI launcher but built without MPI: refused, not N copies of one run.
#[cfg(not(feature = "mpi"))]
#[test]
fn launcher_without_mpi_build_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let args = dpo_args(&out, &["--max_steps", "1"]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = lorafold(&refs, &[("OMPI_COMM_WORLD_SIZE", Path::new("2"))]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "a run under a 2-rank launcher succeeded without MPI"
    );
    assert!(
        err.contains("built without MPI") && err.contains("--features mpi"),
        "{err}"
    );
    assert!(!out.join("adapter_model.safetensors").exists());
}

#[cfg(feature = "mpi")]
fn mpirun(np: usize, args: &[String]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--allow-run-as-root", "--oversubscribe", "-np", &np.to_string()]);
    c.args([
        "-x",
        "RAYON_NUM_THREADS=1",
        "-x",
        "OMPI_MCA_btl_vader_single_copy_mechanism=none",
    ]);
    c.arg(env!("CARGO_BIN_EXE_lorafold")).args(args);
    c.stdin(Stdio::null());
    c
}

#[cfg(feature = "mpi")]
fn ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed: {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `(step, key) → value` of metrics.jsonl.
#[cfg(feature = "mpi")]
fn metrics(out: &Path) -> Vec<HashMap<String, f64>> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[cfg(feature = "mpi")]
fn adapter(out: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu).unwrap()
}

/// Both runs logged the same records, the DPO metrics equal within f32 summation tolerance, and
/// wrote the same adapter.
#[cfg(feature = "mpi")]
fn assert_same_run(one: &Path, two: &Path, ctx: &str) -> (f64, f32) {
    let (a, b) = (metrics(one), metrics(two));
    assert_eq!(a.len(), b.len(), "{ctx}: records");
    let mut worst = 0f64;
    for (ra, rb) in a.iter().zip(&b) {
        for key in [
            "loss",
            "rewards/margins",
            "rewards/accuracies",
            "logps/chosen",
            "grad_norm",
            "eval_loss",
        ] {
            let (Some(x), Some(y)) = (ra.get(key), rb.get(key)) else {
                assert_eq!(
                    ra.contains_key(key),
                    rb.contains_key(key),
                    "{ctx}: {key} in {ra:?} / {rb:?}"
                );
                continue;
            };
            let err = (x - y).abs() / x.abs().max(1e-3);
            worst = worst.max(err);
            assert!(err <= 1e-5, "{ctx}: {key} {x} (1 process) vs {y} (2 ranks)");
        }
        for key in ["step", "epoch", "learning_rate"] {
            assert_eq!(ra.get(key), rb.get(key), "{ctx}: {key}");
        }
    }
    let (wa, wb) = (adapter(one), adapter(two));
    assert_eq!(wa.len(), wb.len(), "{ctx}: tensors");
    let mut max = 0f32;
    for (k, t) in &wa {
        let d = crate::common::max_abs_diff(t, &wb[k]);
        max = max.max(d);
        assert!(d <= 1e-6, "{ctx}: {k} differs by {d}");
    }
    (worst, max)
}

/// 2 ranks × (1 pair × 1 accumulation) equal 1 process × (1 pair × 2 accumulations): the same
/// loss curve, evaluation and adapter, with an online and with a precomputed reference.
#[cfg(feature = "mpi")]
#[test]
fn two_ranks_equal_one_process_with_the_same_global_batch() {
    let dir = tempfile::tempdir().unwrap();
    let common = ["--max_steps", "4", "--batch_size", "1", "--eval_batch_size", "2"];
    let eval = [
        "--val_dataset",
        &format!("{}#6", data("eval.jsonl")),
        "--eval_steps",
        "2",
        "--save_steps",
        "2",
    ];
    for precompute in ["false", "true"] {
        let one = dir.path().join(format!("one-{precompute}"));
        let two = dir.path().join(format!("two-{precompute}"));
        let mut flags: Vec<&str> = common.iter().chain(&eval).copied().collect();
        flags.extend(["--precompute_ref_log_probs", precompute]);
        let mut single = flags.clone();
        single.extend(["--gradient_accumulation_steps", "2"]);
        let args = dpo_args(&one, &single);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = lorafold(&refs, &[("RAYON_NUM_THREADS", Path::new("1"))]);
        ok(&o, "1 process");
        let mut ranked = flags.clone();
        ranked.extend(["--gradient_accumulation_steps", "1"]);
        let o = mpirun(2, &dpo_args(&two, &ranked)).output().unwrap();
        ok(&o, "mpirun -np 2");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("data-parallel over 2 ranks (mpi)"), "{err}");
        let (worst, max) = assert_same_run(&one, &two, &format!("precompute_ref_log_probs {precompute}"));
        eprintln!("precompute {precompute}: worst metric rel err {worst:.2e}, adapter max abs diff {max:.2e}");
        // Rank 0 alone wrote: one metrics file, the checkpoints of steps 2 and 4.
        for step in [2, 4] {
            assert!(two
                .join(format!("checkpoint-{step}/adapter_model.safetensors"))
                .is_file());
        }
        let evals = metrics(&two).iter().filter(|r| r.contains_key("eval_loss")).count();
        assert_eq!(evals, 2, "evaluations at steps 2 and 4");
    }
}

/// A 2-rank run's checkpoint resumed by one process (2 accumulations, the same global batch)
/// continues from the same data position: the adapter equals the 2-rank run's.
#[cfg(feature = "mpi")]
#[test]
fn resume_with_another_world_size_continues_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let (two, resumed) = (dir.path().join("two"), dir.path().join("resumed"));
    let flags = ["--max_steps", "4", "--batch_size", "1", "--save_steps", "2"];
    let mut ranked: Vec<&str> = flags.to_vec();
    ranked.extend(["--gradient_accumulation_steps", "1"]);
    ok(&mpirun(2, &dpo_args(&two, &ranked)).output().unwrap(), "mpirun -np 2");
    let ck = two.join("checkpoint-2");
    let ck_s = ck.display().to_string();
    let mut single: Vec<&str> = flags.to_vec();
    single.extend(["--gradient_accumulation_steps", "2", "--resume_from_checkpoint", &ck_s]);
    let args = dpo_args(&resumed, &single);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = lorafold(&refs, &[]);
    ok(&o, "resume in 1 process");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("resumed from") && err.contains("at step 2"), "{err}");
    let (wa, wb) = (adapter(&two), adapter(&resumed));
    for (k, t) in &wa {
        let d = crate::common::max_abs_diff(t, &wb[k]);
        assert!(d <= 1e-6, "{k} differs by {d} after resuming on another world size");
    }
}

/// Ranks started on different data refuse to train, naming the rank.
#[cfg(feature = "mpi")]
#[test]
fn ranks_with_different_data_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let a = dpo_args(&out, &["--max_steps", "2"]);
    let mut b = a.clone();
    let at = b.iter().position(|x| x == "--dataset").unwrap() + 1;
    b[at] = format!("{}#12", data("train.jsonl"));
    let mut c = mpirun(1, &a);
    c.arg(":").args(["-np", "1", "-x", "RAYON_NUM_THREADS=1"]);
    c.arg(env!("CARGO_BIN_EXE_lorafold")).args(&b);
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "ranks with different data trained: {err}");
    assert!(err.contains("rank 1's training data fingerprint"), "{err}");
    assert!(!out.join("adapter_model.safetensors").exists());
}

/// The pid of rank `rank` of the run writing to `out` (found by its environment).
#[cfg(feature = "mpi")]
fn rank_pid(out: &Path, rank: usize) -> Option<i32> {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    let needle = out.display().to_string();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let p: PathBuf = e.path();
        let cmd = std::fs::read(p.join("cmdline")).unwrap_or_default();
        let env = std::fs::read(p.join("environ")).unwrap_or_default();
        let has = |hay: &[u8], s: &str| hay.split(|&b| b == 0).any(|x| x == s.as_bytes());
        if has(&cmd, &needle) && has(&env, &want) && !has(&cmd, "--allow-run-as-root") {
            return Some(pid);
        }
    }
    None
}

/// Killing one rank mid-run ends the job with an error naming that rank (no hang), and the last
/// complete checkpoint stays loadable.
#[cfg(feature = "mpi")]
#[test]
fn a_killed_rank_ends_the_run_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let args = dpo_args(
        &out,
        &["--max_steps", "100000", "--save_steps", "1", "--save_total_limit", "2"],
    );
    let log = dir.path().join("stderr.log");
    let mut child = mpirun(2, &args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let logged = || std::fs::read_to_string(out.join("metrics.jsonl")).map_or(0, |t| t.lines().count());
    while logged() < 3 {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "fewer than 3 steps after 120 s"
        );
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = rank_pid(&out, 1).expect("rank 1's process");
    assert_eq!(kill9(pid), 0, "kill -9 {pid}");
    let t1 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t1.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("the run hangs 60 s after rank 1 was killed");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{err}");
    assert!(err.contains("rank 1"), "the error does not name rank 1: {err}");
    // The newest complete checkpoint loads.
    let latest = lorafold::train::checkpoint::resolve("latest", &out).unwrap();
    lorafold::train::checkpoint::load(&latest).unwrap_or_else(|e| panic!("{}: {e}", latest.display()));
    assert!(
        !out.join("adapter_model.safetensors").exists(),
        "a killed run wrote a final adapter"
    );
}

#[cfg(feature = "mpi")]
fn kill9(pid: i32) -> i32 {
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .map_or(-1, |s| s.code().unwrap_or(-1))
}
