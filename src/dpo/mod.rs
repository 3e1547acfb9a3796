//! DPO: per-sequence log-probs, loss functions, metrics.

pub mod loss;
