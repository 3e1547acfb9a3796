//! lorafold's integration tests: one binary, modules by area, shared fixtures.
//!
//! Golden values come from `tests/golden/generate.py` (transformers + peft); see its docstring.

mod adapters;
mod common;
mod corpus;
mod data;
mod dist;
mod errors;
mod golden;
mod hub;
mod infer;
mod losses;
mod merge;
mod peft_extras;
mod props;
mod resilience;
mod swift_flags;
mod train;
