//! lorafold: LoRA adapters for Hugging Face decoder-only models, trained with DPO on candle.
//!
//! The base model is loaded once. With an adapter slot switched on it is the policy; with all
//! adapters off it is the frozen DPO reference.

pub mod bench;
pub mod cli;
pub mod data;
pub mod dist;
pub mod dpo;
pub mod error;
pub mod foreign_flags;
pub mod hub;
pub mod infer;
pub mod linalg;
pub mod lora;
pub mod merge;
pub mod model;
pub mod recipe;
pub mod rng;
pub mod staging;
pub mod train;
pub mod util;

pub use error::{Error, Result};
