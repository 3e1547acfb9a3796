//! LoRA adapters: PEFT-compatible config, attaching adapters to a model, and adapter files.

pub mod config;
pub mod io;

use candle_core::{DType, Device, Tensor, Var};

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

/// PEFT's key for DoRA's magnitude vector of the module at `path` (no `.weight` suffix).
pub fn magnitude_key(path: &str) -> String {
    format!("base_model.model.{path}.lora_magnitude_vector")
}

/// Fresh A [r, in] and B [out, r] for the layer with index `index`, filled as `init` says.
fn new_pair(
    init: LoraInit,
    index: usize,
    r: usize,
    (i, o): (usize, usize),
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    Ok(match init {
        LoraInit::Peft { seed } => {
            let mut rng = Rng::stream(seed, index as u64);
            let bound = 1.0 / (i as f64).sqrt();
            let a: Vec<f32> = (0..r * i)
                .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
                .collect();
            (
                Tensor::from_vec(a, (r, i), device)?,
                Tensor::zeros((o, r), DType::F32, device)?,
            )
        }
        LoraInit::Gaussian { seed, std } => {
            let mut rng = Rng::stream(seed, index as u64);
            let mut draw = |n: usize| -> Vec<f32> { (0..n).map(|_| (rng.next_normal() * std) as f32).collect() };
            let a = draw(r * i);
            let b = draw(o * r);
            (
                Tensor::from_vec(a, (r, i), device)?,
                Tensor::from_vec(b, (o, r), device)?,
            )
        }
    })
}

/// Attach a fresh trainable adapter to every module selected by `config.target_modules`.
pub fn attach_new(model: &mut Model, config: &LoraConfig, init: LoraInit) -> Result<Adapter> {
    let target = config
        .target_modules
        .clone()
        .unwrap_or_else(config::TargetModules::all_linear);
    let selector = config.selector()?;
    let paths: Vec<String> = model.linears().map(|l| l.path.clone()).collect();
    if !selector.exclude_matches(paths.iter().map(String::as_str)) {
        return Err(Error::ExcludeUnmatched {
            pattern: format!("{:?}", config.exclude_modules),
        });
    }
    let slot = model.num_adapter_slots();
    let device = model.device().clone();
    let mut params = Vec::new();
    let mut hit = 0usize;
    for lin in model.linears_mut() {
        if !selector.selects(&lin.path) {
            lin.set_adapter(slot, None);
            continue;
        }
        hit += 1;
        let r = config.rank_for(&lin.path);
        let (a, b) = new_pair(init, lin.index, r, (lin.in_features(), lin.out_features()), &device)?;
        let (va, vb) = (Var::from_tensor(&a)?, Var::from_tensor(&b)?);
        let mut ad = LoraAdapter {
            a: va.as_tensor().clone(),
            b: vb.as_tensor().clone(),
            scale: config.scale_for(&lin.path, r),
            dropout: config.lora_dropout as f32,
            magnitude: None,
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
        if config.use_dora {
            // PEFT's initial magnitude: the row norms of W + s·B·A.
            let vm = Var::from_tensor(&ad.row_norms(&lin.weight)?)?;
            ad.magnitude = Some(vm.as_tensor().clone());
            params.push(AdapterParam {
                key: magnitude_key(&lin.path),
                tensor: vm.as_tensor().clone(),
                var: Some(vm),
            });
        }
        lin.set_adapter(slot, Some(ad));
    }
    if hit == 0 {
        return Err(Error::TargetUnmatched {
            target: format!("{target:?}"),
            layers: model.cfg.linear_modules().join(", "),
        });
    }
    let adapted: Vec<&str> = model
        .linears()
        .filter(|l| l.adapter(slot).is_some())
        .map(|l| l.path.as_str())
        .collect();
    config.check_patterns_match(adapted.iter().copied())?;
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
