//! Training: optimizer, schedules, checkpoints and the DPO trainer.

pub mod checkpoint;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod run;
pub mod schedule;
pub mod settings;
pub mod step;
pub mod tensorboard;
pub mod trainer;
