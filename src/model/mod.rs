//! The decoder: config, differentiable ops, weights, and the model itself.

pub mod cache;
pub mod config;
pub mod constop;
pub mod decoder;
pub mod fused;
pub mod linear;
pub mod load;
pub mod ops;
pub mod weights;

pub use cache::KvCache;
pub use config::{Arch, ModelConfig};
pub use decoder::{token_logps, LoadOptions, Model, Packing};

impl Model {
    /// Number of adapter slots in use (the next free slot index).
    pub fn num_adapter_slots(&self) -> usize {
        self.linears().map(|l| l.adapters.len()).max().unwrap_or(0)
    }
}
