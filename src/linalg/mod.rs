//! Dense linear algebra candle lacks, on plain f32/f64 matrices: truncated SVD and QR. Used by
//! the SVD-based adapter combinations (merge) and by PiSSA/OLoRA initialisation (lora).

pub mod mat;
pub mod svd;
