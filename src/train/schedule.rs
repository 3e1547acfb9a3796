//! Learning-rate schedules as pure functions of the step (transformers' `get_scheduler`).

use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerKind {
    #[default]
    Cosine,
    Linear,
    Constant,
    ConstantWithWarmup,
}

impl FromStr for SchedulerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "cosine" => SchedulerKind::Cosine,
            "linear" => SchedulerKind::Linear,
            "constant" => SchedulerKind::Constant,
            "constant_with_warmup" => SchedulerKind::ConstantWithWarmup,
            other => {
                return Err(format!(
                    "unknown lr_scheduler_type {other:?} (cosine, linear, constant, constant_with_warmup)"
                ))
            }
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: SchedulerKind,
    pub base_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl Schedule {
    /// Warmup steps from a ratio of the total, rounded up as transformers does.
    pub fn warmup_from(warmup_steps: usize, warmup_ratio: f64, total_steps: usize) -> usize {
        if warmup_steps > 0 {
            warmup_steps
        } else {
            (warmup_ratio * total_steps as f64).ceil() as usize
        }
    }

    /// The learning rate of update `step` (0-based: the first optimizer step uses `lr(0)`).
    pub fn lr(&self, step: usize) -> f64 {
        let (s, w, n) = (step as f64, self.warmup_steps as f64, self.total_steps as f64);
        let factor = if self.kind != SchedulerKind::Constant && step < self.warmup_steps {
            s / w.max(1.0)
        } else {
            match self.kind {
                SchedulerKind::Constant | SchedulerKind::ConstantWithWarmup => 1.0,
                SchedulerKind::Linear => ((n - s) / (n - w).max(1.0)).max(0.0),
                SchedulerKind::Cosine => {
                    let progress = (s - w) / (n - w).max(1.0);
                    (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
                }
            }
        };
        self.base_lr * factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_with_warmup() {
        let s = Schedule {
            kind: SchedulerKind::Cosine,
            base_lr: 1.0,
            warmup_steps: 2,
            total_steps: 10,
        };
        assert_eq!(s.lr(0), 0.0);
        assert_eq!(s.lr(1), 0.5);
        assert_eq!(s.lr(2), 1.0);
        assert!((s.lr(6) - 0.5).abs() < 1e-12);
        assert!(s.lr(10).abs() < 1e-12);
    }

    #[test]
    fn linear_and_ratio() {
        let s = Schedule {
            kind: SchedulerKind::Linear,
            base_lr: 2.0,
            warmup_steps: 0,
            total_steps: 4,
        };
        assert_eq!([s.lr(0), s.lr(1), s.lr(2), s.lr(3)], [2.0, 1.5, 1.0, 0.5]);
        assert_eq!(Schedule::warmup_from(0, 0.03, 100), 3);
        assert_eq!(Schedule::warmup_from(0, 0.03, 10), 1);
        assert_eq!(Schedule::warmup_from(5, 0.5, 10), 5);
    }
}
