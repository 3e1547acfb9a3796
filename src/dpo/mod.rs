//! DPO: batching and per-sequence log-probs, loss functions.

pub mod batch;
pub mod loss;
