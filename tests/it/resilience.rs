//! Resilience of `lorafold dpo`: SIGKILL at random moments (some of them in the middle of a
//! checkpoint save) followed by `--resume_from_checkpoint` ends with the uninterrupted run's
//! adapter bit for bit; memory stays flat over repeated train/save/resume cycles in one process;
//! an unwritable or full output folder fails cleanly, before training when that can be known and
//! without a corrupt checkpoint when it cannot.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lorafold::train::checkpoint;

use crate::common::*;

/// splitmix64: a small deterministic generator for kill delays and choices.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The first `n` pairs of the quickstart training set, in a file under `dir`.
fn small_data(dir: &Path, n: usize) -> PathBuf {
    let text = std::fs::read_to_string(root().join("tests/fixtures/data/quickstart/train.jsonl")).unwrap();
    let p = dir.join("pairs.jsonl");
    let mut f = File::create(&p).unwrap();
    for line in text.lines().take(n) {
        writeln!(f, "{line}").unwrap();
    }
    p
}

const KILL_STEPS: usize = 20;
/// SIGKILLs before a run is left to finish.
const KILLS: usize = 20;

/// A small run that saves a checkpoint after every step. LoRA dropout and shuffling are on, and
/// 20 steps of 2x2 pairs cross an epoch boundary of 48 pairs, so an exact resume has to restore
/// the data position, the dropout stream and the epoch's shuffle, not only the weights.
fn kill_run_args(out: &Path, data: &Path) -> Vec<String> {
    let mut a: Vec<String> = vec!["dpo".into(), "--model".into(), model_dir("qwen2").to_str().unwrap().into()];
    a.extend(["--dataset".into(), data.to_str().unwrap().into(), "--output_dir".into(), out.to_str().unwrap().into()]);
    for (k, v) in [
        ("--max_steps", KILL_STEPS.to_string()),
        ("--save_steps", "1".into()),
        ("--save_total_limit", "2".into()),
        ("--batch_size", "2".into()),
        ("--gradient_accumulation_steps", "2".into()),
        ("--max_length", "64".into()),
        ("--max_prompt_length", "48".into()),
        ("--lora_rank", "16".into()),
        ("--lora_alpha", "32".into()),
        ("--lora_dropout_p", "0.1".into()),
        ("--learning_rate", "5e-3".into()),
        ("--warmup_steps", "2".into()),
        ("--logging_steps", "1".into()),
        ("--eval_steps", "1000".into()),
        ("--seed", "11".into()),
    ] {
        a.push(k.into());
        a.push(v);
    }
    a
}

fn spawn(args: &[String], log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_lorafold"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(log).unwrap())
        .spawn()
        .expect("starting lorafold")
}

/// Names in `dir` that belong to an unfinished write: `.checkpoint-N.tmp` folders, the trash of a
/// replaced or rotated checkpoint, and `.<file>.tmp` files of an atomic file write.
fn leftovers(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    v.sort();
    v
}

/// [`leftovers`] with their inode numbers, to tell a new unfinished write from a stale one.
fn unfinished_ids(dir: &Path) -> Vec<(String, u64)> {
    use std::os::unix::fs::MetadataExt;
    leftovers(dir).into_iter().filter_map(|n| Some((n.clone(), std::fs::symlink_metadata(dir.join(&n)).ok()?.ino()))).collect()
}

/// Every `checkpoint-*` entry of `out` is a complete folder whose state names its own step and
/// whose adapter loads into the model (strict PEFT loading) and whose optimizer state loads.
/// Returns the steps found.
fn assert_checkpoints_complete(out: &Path, ctx: &str) -> Vec<usize> {
    let mut steps = Vec::new();
    for e in std::fs::read_dir(out).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(n) = name.strip_prefix("checkpoint-") else { continue };
        let step: usize = n.parse().unwrap_or_else(|_| panic!("{ctx}: odd checkpoint name {name}"));
        let dir = e.path();
        assert!(dir.is_dir(), "{ctx}: {name} is not a folder");
        for f in ["adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors", "trainer_state.json"] {
            assert!(dir.join(f).is_file(), "{ctx}: {name} lacks {f}");
        }
        let ck = checkpoint::load(&dir).unwrap_or_else(|e| panic!("{ctx}: {name} does not load: {e}"));
        assert_eq!(ck.state.step, step, "{ctx}: {name} holds the state of step {}", ck.state.step);
        let mut model = load_model("qwen2");
        lorafold::lora::io::load_adapter(&mut model, &dir, false).unwrap_or_else(|e| panic!("{ctx}: adapter of {name}: {e}"));
        steps.push(step);
    }
    steps.sort();
    steps
}

/// metrics.jsonl without the timing fields (tokens/s, peak memory), which differ between runs.
fn deterministic_metrics(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: bad line {l:?}: {e}", path.display()));
            let o = v.as_object_mut().unwrap();
            o.remove("tokens_per_second");
            o.remove("peak_rss_mib");
            v.to_string()
        })
        .collect()
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The reference: the same run, never interrupted. Returns its wall time until the first
/// checkpoint appears (startup and one step) and in all.
fn reference_run(out: &Path, data: &Path, log: &Path) -> (Duration, Duration) {
    let t0 = Instant::now();
    let mut child = spawn(&kill_run_args(out, data), log);
    let mut first = None;
    let st = loop {
        if first.is_none() && out.join("checkpoint-1").exists() {
            first = Some(t0.elapsed());
        }
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    assert!(st.success(), "reference run failed:\n{}", std::fs::read_to_string(log).unwrap_or_default());
    let all = t0.elapsed();
    (first.unwrap_or(all / KILL_STEPS as u32), all)
}

fn assert_same_final_output(reference: &Path, out: &Path) {
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        assert!(read(&reference.join(f)) == read(&out.join(f)), "{f} differs from the uninterrupted run");
    }
    let last = format!("checkpoint-{KILL_STEPS}");
    for f in ["adapter_model.safetensors", "optimizer.safetensors"] {
        assert!(read(&reference.join(&last).join(f)) == read(&out.join(&last).join(f)), "{last}/{f} differs from the uninterrupted run");
    }
    assert_eq!(
        deterministic_metrics(&reference.join("metrics.jsonl")),
        deterministic_metrics(&out.join("metrics.jsonl")),
        "metrics.jsonl differs from the uninterrupted run (lost or repeated steps)"
    );
}

/// When a kill attempt fires.
#[derive(Clone)]
enum Kill {
    Never,
    At(Instant),
    /// Once this step is logged, after this long.
    AfterStep(usize, Duration),
    /// When a new `.checkpoint-N.tmp` folder appears, after skipping this many.
    OnTmp(u64),
}

#[test]
fn sigkill_at_random_moments_then_resume_gives_the_uninterrupted_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let data = small_data(tmp.path(), 48);
    let reference = tmp.path().join("reference");
    let (t_first, t_ref) = reference_run(&reference, &data, &tmp.path().join("reference.log"));
    let per_step = t_ref.saturating_sub(t_first) / (KILL_STEPS as u32 - 1);
    let out = tmp.path().join("killed");
    let mut rng = SplitMix(0x00c0_ffee_5eed);
    let (mut kills, mut in_save, mut in_final_write) = (0usize, 0usize, 0usize);
    let mut resumes_latest = 0usize;
    let mut resumes_explicit = 0usize;
    let mut resumes_older = 0usize;
    let mut log_lines = Vec::new();
    let t_all = Instant::now();
    for attempt in 0.. {
        // How to start: fresh when no checkpoint exists yet, else `latest` or a named folder
        // (sometimes an older one than the newest, which re-saves over existing checkpoints).
        let present = checkpoint::list(&out);
        let mut args = kill_run_args(&out, &data);
        let how = if present.is_empty() {
            "fresh".to_string()
        } else if rng.below(5) < 3 {
            resumes_latest += 1;
            args.extend(["--resume_from_checkpoint".into(), "latest".into()]);
            "latest".into()
        } else {
            let (step, dir) = &present[rng.below(present.len() as u64) as usize];
            resumes_explicit += 1;
            if *step < present.last().unwrap().0 {
                resumes_older += 1;
            }
            args.extend(["--resume_from_checkpoint".into(), dir.to_str().unwrap().into()]);
            format!("checkpoint-{step}")
        };
        let log = tmp.path().join(format!("attempt-{attempt}.log"));
        let before = unfinished_ids(&out);
        let mut child = spawn(&args, &log);
        // Where to kill, tied to the run's progress (its own log) rather than to wall time alone,
        // since timings vary with the load of the machine:
        // - mid-run: once the log shows a random step still to come, wait a random part of a
        //   step, then kill (lands in the save after that step, in the next step's compute, ...);
        // - on a save: the moment a `.checkpoint-N.tmp` folder shows up (after skipping a random
        //   number of them);
        // - at startup: within the time the reference took to its first checkpoint.
        // After KILLS kills the run is left to finish.
        let from = match how.as_str() {
            "fresh" => 0,
            "latest" => present.last().unwrap().0,
            named => named["checkpoint-".len()..].parse().unwrap(),
        };
        let mut mode = match (kills >= KILLS, rng.below(20)) {
            (true, _) => Kill::Never,
            (false, 0..=8) => Kill::AfterStep((from + 1 + rng.below(3) as usize).min(KILL_STEPS), per_step.mul_f64(rng.unit())),
            (false, 9..=16) => Kill::OnTmp(rng.below(3)),
            (false, _) => Kill::At(Instant::now() + t_first.mul_f64(rng.unit())),
        };
        let mut seen_tmp: Option<String> = None;
        let mut step_seen_at: Option<Instant> = None;
        let killed = loop {
            if let Some(st) = child.try_wait().unwrap() {
                assert!(st.success(), "attempt {attempt} ({how}) failed on its own:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
                break false;
            }
            let fire = match &mut mode {
                Kill::Never => false,
                Kill::At(t) => Instant::now() >= *t,
                Kill::AfterStep(step, wait) => {
                    if step_seen_at.is_none() && std::fs::read_to_string(&log).unwrap_or_default().contains(&format!("step {step} |")) {
                        step_seen_at = Some(Instant::now());
                    }
                    step_seen_at.is_some_and(|t| t.elapsed() >= *wait)
                }
                Kill::OnTmp(skip) => {
                    let tmp_now = leftovers(&out).into_iter().find(|n| n.starts_with(".checkpoint-") && n.ends_with(".tmp"));
                    match tmp_now {
                        Some(n) if seen_tmp.as_deref() != Some(n.as_str()) => {
                            seen_tmp = Some(n);
                            if *skip == 0 {
                                true
                            } else {
                                *skip -= 1;
                                false
                            }
                        }
                        _ => false,
                    }
                }
            };
            if fire {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                break true;
            }
            std::thread::sleep(Duration::from_micros(100));
        };
        if !killed {
            log_lines.push(format!("attempt {attempt}: {how}, ran to completion"));
            break;
        }
        kills += 1;
        // Where it landed: unfinished writes this attempt started (a stale folder of an earlier
        // attempt that is still there does not count).
        let left = leftovers(&out);
        let new: Vec<String> = unfinished_ids(&out).into_iter().filter(|x| !before.contains(x)).map(|(n, _)| n).collect();
        let during_save = new.iter().any(|n| n.starts_with(".checkpoint-"));
        let during_final = new.iter().any(|n| n.starts_with(".adapter_"));
        in_save += during_save as usize;
        in_final_write += during_final as usize;
        // After every kill: each checkpoint folder present is complete, and `latest` picks one.
        let steps = assert_checkpoints_complete(&out, &format!("after kill {kills}"));
        if let Ok(p) = checkpoint::resolve("latest", &out) {
            checkpoint::load(&p).unwrap_or_else(|e| panic!("latest = {} does not load: {e}", p.display()));
        }
        log_lines.push(format!(
            "attempt {attempt}: {how}, SIGKILL {} -> checkpoints {steps:?}, leftovers {left:?}{}",
            match &mode {
                Kill::AfterStep(s, w) => format!("{:.0} ms after step {s} was logged", w.as_secs_f64() * 1e3),
                Kill::OnTmp(_) => "on a .tmp folder".into(),
                _ => "at startup".into(),
            },
            if during_save { " [during a save]" } else { "" }
        ));
    }
    for l in &log_lines {
        println!("{l}");
    }
    println!(
        "reference run {:.2}s (first checkpoint after {:.2}s); {kills} SIGKILLs, {in_save} during a checkpoint save, {in_final_write} during the final adapter write; \
         resumes: {resumes_latest} latest, {resumes_explicit} named folder ({resumes_older} older than the newest); total {:.1}s",
        t_ref.as_secs_f64(),
        t_first.as_secs_f64(),
        t_all.elapsed().as_secs_f64()
    );
    assert_same_final_output(&reference, &out);
    assert_eq!(leftovers(&out), Vec::<String>::new(), "unfinished writes left behind");
    assert_eq!(assert_checkpoints_complete(&out, "at the end"), [KILL_STEPS - 1, KILL_STEPS]);
    assert!(kills >= 12, "too few kills ({kills}) to mean anything");
    assert!(in_save >= 3, "fewer than three kills landed during a checkpoint save");
    println!("final adapter, last checkpoint and metrics.jsonl are bit-identical to the uninterrupted run");
}

/// Copy a reference checkpoint folder (files only).
fn copy_checkpoint(from: &Path, to: &Path) {
    copy_dir(from, to);
}

#[test]
fn latest_skips_a_stale_tmp_folder_and_an_incomplete_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = small_data(tmp.path(), 48);
    let reference = tmp.path().join("reference");
    // Keep every checkpoint of the reference for this test.
    let mut args = kill_run_args(&reference, &data);
    let i = args.iter().position(|a| a == "--save_total_limit").unwrap();
    args[i + 1] = "100".into();
    let log = tmp.path().join("reference.log");
    assert!(spawn(&args, &log).wait().unwrap().success(), "{}", std::fs::read_to_string(&log).unwrap());

    // A run killed during the save of step 7: checkpoint-6 complete, `.checkpoint-7.tmp` holds a
    // full state file but a cut-off optimizer file. And a `checkpoint-8` folder that lost its
    // optimizer file (as an interrupted delete, or a hand copy, can leave it).
    let out = tmp.path().join("run");
    std::fs::create_dir_all(&out).unwrap();
    for f in ["metrics.jsonl", "recipe.yaml"] {
        std::fs::copy(reference.join(f), out.join(f)).unwrap();
    }
    copy_checkpoint(&reference.join("checkpoint-6"), &out.join("checkpoint-6"));
    let stale = out.join(".checkpoint-7.tmp");
    copy_checkpoint(&reference.join("checkpoint-7"), &stale);
    let opt = read(&stale.join("optimizer.safetensors"));
    std::fs::write(stale.join("optimizer.safetensors"), &opt[..opt.len() / 3]).unwrap();
    copy_checkpoint(&reference.join("checkpoint-8"), &out.join("checkpoint-8"));
    std::fs::remove_file(out.join("checkpoint-8/optimizer.safetensors")).unwrap();

    let latest = checkpoint::resolve("latest", &out).unwrap();
    assert_eq!(latest, out.join("checkpoint-6"), "latest must be the newest complete checkpoint");
    assert_eq!(checkpoint::list(&out).iter().map(|(s, _)| *s).collect::<Vec<_>>(), [6]);
    // Naming the unfinished folders explicitly is refused with a reason.
    for bad in [&stale, &out.join("checkpoint-8")] {
        let e = checkpoint::resolve(bad.to_str().unwrap(), &out).err().unwrap_or_else(|| panic!("{} accepted", bad.display())).to_string();
        assert!(e.contains(bad.file_name().unwrap().to_str().unwrap()), "{e}");
        println!("explicit {}: {e}", bad.display());
    }

    let mut args = kill_run_args(&out, &data);
    args.extend(["--resume_from_checkpoint".into(), "latest".into()]);
    let log = tmp.path().join("resume.log");
    let st = spawn(&args, &log).wait().unwrap();
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(st.success(), "{stderr}");
    assert!(stderr.contains(&format!("resumed from {} at step 6", out.join("checkpoint-6").display())), "{stderr}");
    assert_same_final_output(&reference, &out);
    assert_eq!(leftovers(&out), Vec::<String>::new(), "the stale tmp folder was not cleaned up");
    assert_eq!(assert_checkpoints_complete(&out, "after resume"), [KILL_STEPS - 1, KILL_STEPS]);
}
