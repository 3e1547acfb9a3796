//! Metric records (TRL's names), averaged over logging windows, written as JSON lines.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

pub type Record = BTreeMap<String, f64>;

/// Average each key over the records of a window.
pub fn mean(records: &[Record]) -> Record {
    let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for r in records {
        for (k, v) in r {
            let e = sums.entry(k.clone()).or_insert((0.0, 0));
            e.0 += v;
            e.1 += 1;
        }
    }
    sums.into_iter().map(|(k, (s, n))| (k, s / n as f64)).collect()
}

/// Appends one JSON object per line to `metrics.jsonl`.
pub struct MetricsFile {
    file: std::fs::File,
}

impl MetricsFile {
    pub fn open(path: &Path, truncate: bool) -> Result<MetricsFile> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(!truncate)
            .write(true)
            .truncate(truncate)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(MetricsFile { file })
    }

    pub fn write(&mut self, step: usize, record: &Record) -> Result<()> {
        let mut obj = serde_json::Map::new();
        obj.insert("step".into(), step.into());
        for (k, v) in record {
            let val = serde_json::Number::from_f64(*v)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null);
            obj.insert(k.clone(), val);
        }
        let line = serde_json::Value::Object(obj).to_string();
        writeln!(self.file, "{line}").map_err(|e| Error::Msg(format!("writing metrics.jsonl: {e}")))
    }
}

/// Peak resident memory of this process in MiB (Linux: VmHWM), if known.
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// One line for the terminal: `step 10 | loss 0.6931 | rewards/accuracies 0.5000 | ...`.
pub fn format_line(step: usize, r: &Record, keys: &[&str]) -> String {
    let mut s = format!("step {step}");
    for k in keys {
        if let Some(v) = r.get(*k) {
            if k.contains("learning_rate") {
                s += &format!(" | {k} {v:.3e}");
            } else {
                s += &format!(" | {k} {v:.4}");
            }
        }
    }
    s
}
