//! The decoder: config, differentiable ops, weights, and the model itself.

pub mod cache;
pub mod config;
pub mod decoder;
pub mod linear;
pub mod load;
pub mod ops;
pub mod weights;

pub use cache::KvCache;
pub use config::{Arch, ModelConfig};
pub use decoder::{LoadOptions, Model, Packing, SlotExtras};
pub use ops::token_logps;

impl Model {
    /// Number of adapter slots in use (the next free slot index).
    pub fn num_adapter_slots(&self) -> usize {
        self.linears().map(|l| l.adapters.len()).max().unwrap_or(0)
    }
}
