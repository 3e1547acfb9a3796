//! The bad-input corpus (tests/bad_inputs/cases.yaml): every case runs the real lorafold binary
//! on inputs built in a temporary folder and must fail cleanly: a non-zero exit, no panic, and
//! an error naming the file and the line, key or tensor at fault. See the manifest's header for
//! its format. `LORAFOLD_CORPUS_CASE=<part of a name>` runs only the matching cases.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use serde_json::Value;

use crate::common::*;

/// Longest a case may run before it counts as hanging.
const CASE_TIMEOUT: Duration = Duration::from_secs(180);
/// Address-space limit of each lorafold run: a runaway allocation fails the case instead of
/// exhausting the machine.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const CHILD_MEMORY_LIMIT: u64 = 8 << 30;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    about: String,
    #[serde(default)]
    setup: Vec<Step>,
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    file: Option<String>,
    #[serde(default)]
    flag: bool,
    at: Vec<String>,
    #[serde(default)]
    also: Vec<String>,
}

/// One setup step; exactly one field is set.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Step {
    copy: Option<CopyStep>,
    write: Option<WriteStep>,
    json: Option<JsonStep>,
    remove: Option<String>,
    truncate: Option<TruncateStep>,
    safetensors: Option<RawSafetensors>,
    tensors: Option<TensorsStep>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CopyStep {
    from: String,
    to: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteStep {
    path: String,
    text: Option<String>,
    parts: Option<Vec<Part>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Part {
    text: Option<String>,
    hex: Option<String>,
    repeat: Option<String>,
    times: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonStep {
    path: String,
    #[serde(default)]
    set: serde_json::Map<String, Value>,
    #[serde(default)]
    remove: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TruncateStep {
    path: String,
    keep: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSafetensors {
    path: String,
    header: Value,
    #[serde(default)]
    data_len: usize,
    header_len: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TensorsStep {
    path: String,
    #[serde(default)]
    drop: Vec<String>,
    #[serde(default)]
    add: Vec<NewTensor>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewTensor {
    name: String,
    shape: Vec<usize>,
}

fn corpus_dir() -> PathBuf {
    root().join("tests/bad_inputs")
}

fn load_cases() -> Vec<Case> {
    let path = corpus_dir().join("cases.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Replace the placeholders of the manifest.
fn expand(s: &str, tmp: &Path) -> String {
    let fixtures = root().join("tests/fixtures");
    s.replace("{tmp}", &tmp.display().to_string())
        .replace("{models}", &fixtures.join("models").display().to_string())
        .replace("{adapters}", &fixtures.join("adapters").display().to_string())
        .replace("{data}", &fixtures.join("data").display().to_string())
        .replace("{cases}", &corpus_dir().display().to_string())
}

/// A setup path: expanded, and inside the case folder unless absolute.
fn setup_path(s: &str, tmp: &Path) -> PathBuf {
    let p = PathBuf::from(expand(s, tmp));
    if p.is_absolute() {
        p
    } else {
        tmp.join(p)
    }
}

fn ensure_parent(p: &Path) {
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
}

fn hex_bytes(s: &str) -> Vec<u8> {
    s.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).unwrap_or_else(|e| panic!("hex byte {b:?}: {e}")))
        .collect()
}

fn run_step(step: &Step, tmp: &Path) -> Result<(), String> {
    let set = [
        step.copy.is_some(),
        step.write.is_some(),
        step.json.is_some(),
        step.remove.is_some(),
        step.truncate.is_some(),
        step.safetensors.is_some(),
        step.tensors.is_some(),
    ];
    if set.iter().filter(|x| **x).count() != 1 {
        return Err(format!("a setup step must have exactly one kind: {step:?}"));
    }
    if let Some(c) = &step.copy {
        let (from, to) = (setup_path(&c.from, tmp), setup_path(&c.to, tmp));
        if from.is_dir() {
            copy_dir(&from, &to);
        } else {
            ensure_parent(&to);
            std::fs::copy(&from, &to).map_err(|e| format!("copy {}: {e}", from.display()))?;
        }
    }
    if let Some(w) = &step.write {
        let p = setup_path(&w.path, tmp);
        ensure_parent(&p);
        let mut bytes = Vec::new();
        match (&w.text, &w.parts) {
            (Some(t), None) => bytes.extend_from_slice(expand(t, tmp).as_bytes()),
            (None, Some(parts)) => {
                for part in parts {
                    match (&part.text, &part.hex, &part.repeat) {
                        (Some(t), None, None) => bytes.extend_from_slice(t.as_bytes()),
                        (None, Some(h), None) => bytes.extend(hex_bytes(h)),
                        (None, None, Some(r)) => {
                            let n = part.times.ok_or("`repeat` needs `times`")?;
                            bytes.reserve(r.len() * n);
                            for _ in 0..n {
                                bytes.extend_from_slice(r.as_bytes());
                            }
                        }
                        _ => return Err(format!("a part needs one of text, hex, repeat: {part:?}")),
                    }
                }
            }
            _ => return Err("`write` needs `text` or `parts`".into()),
        }
        std::fs::write(&p, bytes).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    if let Some(j) = &step.json {
        let p = setup_path(&j.path, tmp);
        let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        let mut v: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))?;
        let obj = v.as_object_mut().ok_or("`json` edits need a JSON object")?;
        for k in &j.remove {
            obj.remove(k);
        }
        for (k, val) in &j.set {
            obj.insert(k.clone(), val.clone());
        }
        std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    }
    if let Some(r) = &step.remove {
        let p = setup_path(r, tmp);
        std::fs::remove_file(&p).map_err(|e| format!("remove {}: {e}", p.display()))?;
    }
    if let Some(t) = &step.truncate {
        let p = setup_path(&t.path, tmp);
        let bytes = std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        let keep = ((bytes.len() as f64) * t.keep) as usize;
        std::fs::write(&p, &bytes[..keep.min(bytes.len())]).unwrap();
    }
    if let Some(s) = &step.safetensors {
        let p = setup_path(&s.path, tmp);
        ensure_parent(&p);
        let header = match &s.header {
            Value::String(raw) => raw.clone().into_bytes(),
            other => serde_json::to_vec(other).unwrap(),
        };
        let len = s.header_len.unwrap_or(header.len() as u64);
        let mut bytes = len.to_le_bytes().to_vec();
        bytes.extend_from_slice(&header);
        bytes.resize(bytes.len() + s.data_len, 0);
        std::fs::write(&p, bytes).unwrap();
    }
    if let Some(t) = &step.tensors {
        let p = setup_path(&t.path, tmp);
        let mut all: Vec<(String, Tensor)> = candle_core::safetensors::load(&p, &Device::Cpu)
            .map_err(|e| format!("{}: {e}", p.display()))?
            .into_iter()
            .collect();
        for name in &t.drop {
            let before = all.len();
            all.retain(|(k, _)| k != name);
            if all.len() == before {
                return Err(format!("{}: no tensor {name} to drop", p.display()));
            }
        }
        for n in &t.add {
            all.push((
                n.name.clone(),
                Tensor::zeros(n.shape.as_slice(), DType::F32, &Device::Cpu).unwrap(),
            ));
        }
        all.sort_by(|a, b| a.0.cmp(&b.0));
        lorafold::lora::io::save_safetensors(&p, &all).map_err(|e| e.to_string())?;
    }
    Ok(())
}

struct Outcome {
    code: Option<i32>,
    stderr: String,
    secs: f64,
}

fn run_binary(case: &Case, tmp: &Path) -> Result<Outcome, String> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lorafold"));
    cmd.args(case.args.iter().map(|a| expand(a, tmp)))
        .current_dir(root())
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_ENDPOINT")
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", tmp.join("hf-home"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in &case.env {
        cmd.env(k, expand(v, tmp));
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                let lim = libc::rlimit {
                    rlim_cur: CHILD_MEMORY_LIMIT,
                    rlim_max: CHILD_MEMORY_LIMIT,
                };
                libc::setrlimit(libc::RLIMIT_AS, &lim);
                Ok(())
            });
        }
    }
    let t0 = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("spawning lorafold: {e}"))?;
    let mut pipe = child.stderr.take().ok_or("no stderr pipe")?;
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        buf
    });
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            break s;
        }
        if t0.elapsed() > CASE_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("still running after {}s (killed)", CASE_TIMEOUT.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = reader.join().map_err(|_| "stderr reader panicked")?;
    Ok(Outcome {
        code: status.code(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        secs: t0.elapsed().as_secs_f64(),
    })
}

/// Run one case; `Err` says what went wrong.
fn check_case(case: &Case) -> Result<f64, String> {
    if case.at.is_empty() {
        return Err("the manifest must say where the error is (`at`)".into());
    }
    if case.file.is_none() && !case.flag {
        return Err("the manifest must name the file at fault (`file`), or mark a flag case".into());
    }
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    for step in &case.setup {
        run_step(step, tmp.path()).map_err(|e| format!("setup: {e}"))?;
    }
    let out = run_binary(case, tmp.path())?;
    let mut problems = Vec::new();
    match out.code {
        Some(0) => problems.push("exited with status 0".to_string()),
        None => problems.push("killed by a signal (crash or out of memory)".to_string()),
        Some(_) => {}
    }
    for bad in ["panicked", "RUST_BACKTRACE"] {
        if out.stderr.contains(bad) {
            problems.push(format!("stderr contains {bad:?}"));
        }
    }
    let wanted = case.file.iter().chain(&case.at).chain(&case.also);
    for w in wanted {
        if !out.stderr.contains(w.as_str()) {
            problems.push(format!("stderr lacks {w:?}"));
        }
    }
    if problems.is_empty() {
        Ok(out.secs)
    } else {
        let tail: String = {
            let s = out.stderr.trim_end();
            let start = s.len().saturating_sub(2000);
            let start = (start..=s.len()).find(|&i| s.is_char_boundary(i)).unwrap_or(s.len());
            s[start..].to_string()
        };
        Err(format!(
            "{} ({:.1}s)\n      stderr: {tail}",
            problems.join("; "),
            out.secs
        ))
    }
}

#[test]
fn manifest_is_well_formed() {
    let cases = load_cases();
    assert!(
        cases.len() >= 45,
        "the corpus holds {} cases; it needs at least 45",
        cases.len()
    );
    let mut names = std::collections::HashSet::new();
    for c in &cases {
        assert!(names.insert(c.name.as_str()), "duplicate case name {}", c.name);
        assert!(!c.about.trim().is_empty(), "{}: say what is wrong (`about`)", c.name);
        assert!(!c.at.is_empty(), "{}: `at` is empty", c.name);
        assert!(c.file.is_some() || c.flag, "{}: no `file` and not a flag case", c.name);
        assert!(!c.args.is_empty(), "{}: no args", c.name);
    }
}

#[test]
fn every_bad_input_fails_cleanly_and_names_the_place() {
    let filter = std::env::var("LORAFOLD_CORPUS_CASE").unwrap_or_default();
    let cases: Vec<Case> = load_cases().into_iter().filter(|c| c.name.contains(&filter)).collect();
    assert!(!cases.is_empty(), "no case matches LORAFOLD_CORPUS_CASE={filter:?}");
    // Two workers: the cases are independent processes.
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<(usize, Result<f64, String>)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let Some(case) = cases.get(i) else { break };
                        done.push((i, check_case(case)));
                    }
                    done
                })
            })
            .collect();
        workers.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let mut failures = Vec::new();
    let mut total = 0.0;
    for (i, r) in &results {
        match r {
            Ok(secs) => total += secs,
            Err(e) => failures.push(format!("  {}: {e}", cases[*i].name)),
        }
    }
    failures.sort();
    eprintln!(
        "bad-input corpus: {} cases, {} failed, {:.1}s of lorafold runs",
        cases.len(),
        failures.len(),
        total
    );
    assert!(
        failures.is_empty(),
        "{} of {} corpus cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
