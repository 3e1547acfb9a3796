//! Metrics under TRL's names: typed structs for a micro-batch, a step, a logging window and an
//! evaluation, turned into name → value records only where they are written (`metrics.jsonl`,
//! `trainer_state.json`'s `log_history`, the terminal).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

/// A written log entry: TRL's metric names and their values.
pub type Record = BTreeMap<String, f64>;

/// TRL's DPO metrics: means over the pairs of a micro-batch (or over micro-batches).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DpoMetrics {
    pub loss: f64,
    pub rewards_chosen: f64,
    pub rewards_rejected: f64,
    pub rewards_accuracies: f64,
    pub rewards_margins: f64,
    pub logps_chosen: f64,
    pub logps_rejected: f64,
    pub logits_chosen: f64,
    pub logits_rejected: f64,
}

impl DpoMetrics {
    /// TRL's names, in the order of [`DpoMetrics::values`].
    pub const NAMES: [&'static str; 9] = [
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "logits/chosen",
        "logits/rejected",
    ];

    pub fn values(&self) -> [f64; 9] {
        [
            self.loss,
            self.rewards_chosen,
            self.rewards_rejected,
            self.rewards_accuracies,
            self.rewards_margins,
            self.logps_chosen,
            self.logps_rejected,
            self.logits_chosen,
            self.logits_rejected,
        ]
    }

    pub fn from_values(v: [f64; 9]) -> DpoMetrics {
        DpoMetrics {
            loss: v[0],
            rewards_chosen: v[1],
            rewards_rejected: v[2],
            rewards_accuracies: v[3],
            rewards_margins: v[4],
            logps_chosen: v[5],
            logps_rejected: v[6],
            logits_chosen: v[7],
            logits_rejected: v[8],
        }
    }

    /// Mean of `items` weighted by `weights` (pairs per micro-batch for an evaluation, 1 each for
    /// a step): Σ wᵢ·xᵢ / Σ wᵢ, summed in order.
    pub fn weighted_mean(items: &[DpoMetrics], weights: &[f64]) -> DpoMetrics {
        let mut sums = [0f64; 9];
        for (m, w) in items.iter().zip(weights) {
            for (s, v) in sums.iter_mut().zip(m.values()) {
                *s += v * w;
            }
        }
        let total: f64 = weights.iter().sum();
        DpoMetrics::from_values(sums.map(|s| s / total.max(f64::MIN_POSITIVE)))
    }

    /// Plain mean of `items`.
    pub fn mean(items: &[DpoMetrics]) -> DpoMetrics {
        DpoMetrics::weighted_mean(items, &vec![1.0; items.len()])
    }

    /// The metrics under TRL's names, each prefixed (`eval_` for an evaluation).
    pub fn record(&self, prefix: &str) -> Record {
        DpoMetrics::NAMES
            .iter()
            .zip(self.values())
            .map(|(k, v)| (format!("{prefix}{k}"), v))
            .collect()
    }

    fn field(&self, name: &str) -> Option<&f64> {
        Some(match name {
            "loss" => &self.loss,
            "rewards/chosen" => &self.rewards_chosen,
            "rewards/rejected" => &self.rewards_rejected,
            "rewards/accuracies" => &self.rewards_accuracies,
            "rewards/margins" => &self.rewards_margins,
            "logps/chosen" => &self.logps_chosen,
            "logps/rejected" => &self.logps_rejected,
            "logits/chosen" => &self.logits_chosen,
            "logits/rejected" => &self.logits_rejected,
            _ => return None,
        })
    }
}

/// One optimizer step: the DPO metrics (means over its micro-batches) and the update's figures.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepMetrics {
    pub dpo: DpoMetrics,
    pub grad_norm: f64,
    pub learning_rate: f64,
    pub epoch: f64,
}

impl StepMetrics {
    /// A logging window as transformers and TRL log it: the loss and the DPO metrics averaged
    /// over its steps; `grad_norm`, `learning_rate` and `epoch` those of its last step.
    pub fn window(steps: &[StepMetrics]) -> StepMetrics {
        let last = steps.last().copied().unwrap_or_default();
        StepMetrics {
            dpo: DpoMetrics::mean(&steps.iter().map(|s| s.dpo).collect::<Vec<_>>()),
            ..last
        }
    }

    pub fn record(&self) -> Record {
        let mut r = self.dpo.record("");
        r.insert("grad_norm".into(), self.grad_norm);
        r.insert("learning_rate".into(), self.learning_rate);
        r.insert("epoch".into(), self.epoch);
        r
    }

    /// A metric by TRL's name (`"loss"`, `"rewards/margins"`, `"grad_norm"`, ...).
    pub fn get(&self, name: &str) -> Option<f64> {
        self.field(name).copied()
    }

    fn field(&self, name: &str) -> Option<&f64> {
        match name {
            "grad_norm" => Some(&self.grad_norm),
            "learning_rate" => Some(&self.learning_rate),
            "epoch" => Some(&self.epoch),
            _ => self.dpo.field(name),
        }
    }
}

impl std::ops::Index<&str> for StepMetrics {
    type Output = f64;
    /// Like a map's index: a name that is not a metric is a programming error.
    fn index(&self, name: &str) -> &f64 {
        match self.field(name) {
            Some(v) => v,
            None => panic!("no step metric named {name:?}"),
        }
    }
}

/// A logging window: its metrics (see [`StepMetrics::window`]), the throughput and the
/// process's peak memory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowMetrics {
    pub metrics: StepMetrics,
    pub tokens_per_second: f64,
    pub peak_rss_mib: Option<f64>,
}

impl WindowMetrics {
    pub fn record(&self) -> Record {
        let mut r = self.metrics.record();
        r.insert("tokens_per_second".into(), self.tokens_per_second);
        if let Some(m) = self.peak_rss_mib {
            r.insert("peak_rss_mib".into(), m);
        }
        r
    }
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
    proc_status_mib("VmHWM:")
}

/// Resident memory now, in MiB (Linux; `None` elsewhere).
pub fn rss_mib() -> Option<f64> {
    proc_status_mib("VmRSS:")
}

/// A kB figure of /proc/self/status, in MiB.
fn proc_status_mib(key: &str) -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn step(loss: f64, lr: f64, epoch: f64, grad_norm: f64) -> StepMetrics {
        StepMetrics {
            dpo: DpoMetrics {
                loss,
                rewards_margins: 2.0 * loss,
                ..Default::default()
            },
            grad_norm,
            learning_rate: lr,
            epoch,
        }
    }

    #[test]
    fn a_window_averages_the_dpo_metrics_and_keeps_the_last_steps_lr_epoch_and_grad_norm() {
        let w = StepMetrics::window(&[step(1.0, 1e-4, 0.5, 3.0), step(0.5, 2e-4, 1.0, 1.0)]);
        assert_eq!(w.dpo.loss, 0.75);
        assert_eq!(w.dpo.rewards_margins, 1.5);
        assert_eq!((w.learning_rate, w.epoch, w.grad_norm), (2e-4, 1.0, 1.0));
        let r = WindowMetrics {
            metrics: w,
            tokens_per_second: 10.0,
            peak_rss_mib: None,
        }
        .record();
        assert_eq!(r["loss"], 0.75);
        assert_eq!(r["epoch"], 1.0);
        assert_eq!(r["rewards/margins"], 1.5);
        assert!(!r.contains_key("peak_rss_mib"));
        assert_eq!(r.len(), DpoMetrics::NAMES.len() + 4);
    }
}
