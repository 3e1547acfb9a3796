//! LoRA adapters: PEFT-compatible config, attaching adapters to a model, and adapter files.

pub mod config;
pub mod io;

use candle_core::{DType, Tensor, Var};

use crate::error::{Error, Result};
use crate::model::linear::LoraAdapter;
use crate::model::Model;
use crate::rng::Rng;
use config::LoraConfig;

/// How new A and B matrices are filled.
#[derive(Debug, Clone, Copy)]
pub enum LoraInit {
    /// PEFT's default: A ~ U(±1/sqrt(in)) (kaiming-uniform with a = √5), B = 0, so the adapter
    /// starts as the identity and step 1 of DPO has loss ln 2.
    Peft { seed: u64 },
    /// A and B both ~ N(0, std²): a non-trivial adapter for tests and benchmarks.
    Gaussian { seed: u64, std: f64 },
}

/// One named parameter of an adapter.
#[derive(Debug, Clone)]
pub struct AdapterParam {
    /// PEFT's on-disk key, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
    pub key: String,
    pub tensor: Tensor,
    /// Present when the parameter is trainable.
    pub var: Option<Var>,
}

/// An adapter attached to a model slot.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub slot: usize,
    pub config: LoraConfig,
    pub params: Vec<AdapterParam>,
}

impl Adapter {
    pub fn num_params(&self) -> usize {
        self.params.iter().map(|p| p.tensor.elem_count()).sum()
    }
}

/// PEFT's key for half of the adapter on the module at `path`.
pub fn peft_key(path: &str, half: char) -> String {
    format!("base_model.model.{path}.lora_{half}.weight")
}

/// Attach a fresh trainable adapter to every module selected by `config.target_modules`.
pub fn attach_new(model: &mut Model, config: &LoraConfig, init: LoraInit) -> Result<Adapter> {
    let target = config
        .target_modules
        .clone()
        .unwrap_or_else(config::TargetModules::all_linear);
    let matcher = target.matcher()?;
    let slot = model.num_adapter_slots();
    let device = model.device().clone();
    let mut params = Vec::new();
    let mut hit = 0usize;
    for lin in model.linears_mut() {
        if !matcher.matches(&lin.path) {
            lin.set_adapter(slot, None);
            continue;
        }
        hit += 1;
        let r = config.rank_for(&lin.path);
        let (i, o) = (lin.in_features(), lin.out_features());
        let (a, b) = match init {
            LoraInit::Peft { seed } => {
                let mut rng = Rng::stream(seed, lin.index as u64);
                let bound = 1.0 / (i as f64).sqrt();
                let a: Vec<f32> = (0..r * i)
                    .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
                    .collect();
                (
                    Tensor::from_vec(a, (r, i), &device)?,
                    Tensor::zeros((o, r), DType::F32, &device)?,
                )
            }
            LoraInit::Gaussian { seed, std } => {
                let mut rng = Rng::stream(seed, lin.index as u64);
                let mut draw = |n: usize| -> Vec<f32> { (0..n).map(|_| (rng.next_normal() * std) as f32).collect() };
                let a = draw(r * i);
                let b = draw(o * r);
                (
                    Tensor::from_vec(a, (r, i), &device)?,
                    Tensor::from_vec(b, (o, r), &device)?,
                )
            }
        };
        let (va, vb) = (Var::from_tensor(&a)?, Var::from_tensor(&b)?);
        let ad = LoraAdapter {
            a: va.as_tensor().clone(),
            b: vb.as_tensor().clone(),
            scale: config.scale_for(&lin.path, r),
            dropout: config.lora_dropout as f32,
        };
        params.push(AdapterParam {
            key: peft_key(&lin.path, 'A'),
            tensor: ad.a.clone(),
            var: Some(va),
        });
        params.push(AdapterParam {
            key: peft_key(&lin.path, 'B'),
            tensor: ad.b.clone(),
            var: Some(vb),
        });
        lin.set_adapter(slot, Some(ad));
    }
    if hit == 0 {
        return Err(Error::TargetUnmatched {
            target: format!("{target:?}"),
        });
    }
    let mut config = config.clone();
    config.target_modules = Some(config::TargetModules::Modules(
        target.resolved_names(model.cfg.linear_modules(), model.cfg.num_layers)?,
    ));
    if let config::TargetModules::Pattern(p) = &target {
        if !p.eq_ignore_ascii_case("all-linear") && p != "ALL" {
            config.target_modules = Some(target.clone());
        }
    }
    Ok(Adapter { slot, config, params })
}
