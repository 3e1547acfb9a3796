//! LoRA adapters: PEFT-compatible config, attaching adapters to a model, and adapter files.

pub mod config;
pub mod init;
pub mod io;

use candle_core::{Tensor, Var};

use crate::error::{Error, Result};
use crate::model::linear::LoraAdapter;
use crate::model::Model;
use config::LoraConfig;
pub use init::LoraInit;
use init::{random_pair, take_principal};

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
    /// PiSSA / OLoRA: the initial A and B by key (the part taken out of the base), for saving
    /// the adapter converted to a plain LoRA of the untouched base.
    pub initial: Vec<(String, Tensor)>,
    /// Keys written with the tensor of another key (a tied model's trained embedding, saved as
    /// lm_head too): (extra key, source key).
    pub aliases: Vec<(String, String)>,
}

/// PEFT's keys of fully trained tensors (`modules_to_save`, `trainable_token_indices`).
pub const EMBED_KEY: &str = "base_model.model.model.embed_tokens.weight";
pub const LM_HEAD_KEY: &str = "base_model.model.lm_head.weight";
pub const TOKENS_KEY: &str = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta";

/// The tensors of `modules_to_save` and `trainable_token_indices` for a new adapter in `slot`:
/// f32 copies of the embedding / output matrix and of the chosen embedding rows, trainable,
/// appended to `params`; returns the key aliases a tied model needs.
fn attach_extras(
    model: &mut Model,
    config: &LoraConfig,
    slot: usize,
    params: &mut Vec<AdapterParam>,
) -> Result<Vec<(String, String)>> {
    let bad = |key: &str, msg: String| Error::Config {
        path: "--lora options".into(),
        key: key.into(),
        msg,
    };
    let (embed, head) = config.saved_modules().map_err(|m| bad("modules_to_save", m))?;
    let tokens = config.token_indices().map_err(|m| bad("trainable_token_indices", m))?;
    let tied = model.cfg.tie_word_embeddings;
    if !embed && !head && tokens.is_empty() {
        model.set_extras(slot, None);
        return Ok(vec![]);
    }
    if tied && (embed || head) && !config.ensure_weight_tying {
        return Err(bad(
            "modules_to_save",
            "this model ties lm_head to embed_tokens; set ensure_weight_tying (--ensure_weight_tying) to train the one \
             matrix both use, as PEFT does"
                .into(),
        ));
    }
    if tied && !tokens.is_empty() {
        return Err(bad(
            "trainable_token_indices",
            "is not supported on a model whose lm_head is tied to embed_tokens".into(),
        ));
    }
    let mut var_param = |key: &str, t: Tensor| -> Result<Tensor> {
        let v = Var::from_tensor(&t.to_dtype(candle_core::DType::F32)?)?;
        params.push(AdapterParam {
            key: key.into(),
            tensor: v.as_tensor().clone(),
            var: Some(v.clone()),
        });
        Ok(v.as_tensor().clone())
    };
    let mut extras = crate::model::SlotExtras::default();
    let mut aliases = vec![];
    if tied && (embed || head) {
        let w = var_param(EMBED_KEY, model.embedding().copy()?)?;
        extras.embed = Some(w.clone());
        extras.lm_head = Some(w);
        aliases.push((LM_HEAD_KEY.to_string(), EMBED_KEY.to_string()));
    } else {
        if embed {
            extras.embed = Some(var_param(EMBED_KEY, model.embedding().copy()?)?);
        }
        if head {
            extras.lm_head = Some(var_param(LM_HEAD_KEY, model.lm_head_weight().copy()?)?);
        }
    }
    if !tokens.is_empty() {
        let vocab = model.cfg.vocab_size as u32;
        if let Some(t) = tokens.iter().find(|&&t| t >= vocab) {
            return Err(bad(
                "trainable_token_indices",
                format!("token {t} is outside the vocabulary of {vocab}"),
            ));
        }
        let idx = Tensor::new(tokens.as_slice(), model.device())?;
        let rows = model.embedding().index_select(&idx, 0)?;
        extras.tokens = Some((tokens, var_param(TOKENS_KEY, rows)?));
    }
    model.set_extras(slot, Some(extras));
    Ok(aliases)
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

/// A new pair for `lin`: random, or (PiSSA / OLoRA) the principal part of its weight, which
/// is then replaced by the residual (the base still exists once). Also the pair as it started,
/// for principal initialisations.
#[allow(clippy::type_complexity)]
fn new_pair(
    lin: &mut crate::model::linear::LoraLinear,
    init: LoraInit,
    r: usize,
    scale: f64,
) -> Result<(Tensor, Tensor, Option<(Tensor, Tensor)>)> {
    let device = lin.weight.device().clone();
    let shape = (lin.in_features(), lin.out_features());
    if !init.is_principal() {
        let (a, b) = random_pair(init, lin.index, r, shape, &device)?;
        return Ok((a, b, None));
    }
    let (a, b) = take_principal(lin, init, r, scale)?;
    Ok((a.clone(), b.clone(), Some((a.copy()?, b.copy()?))))
}

/// The trainable adapter of `lin` from its starting A and B (with DoRA, a magnitude at the row
/// norms of W + s·B·A, PEFT's start), its parameters appended to `params`.
fn trainable_adapter(
    lin: &crate::model::linear::LoraLinear,
    (a, b): (Tensor, Tensor),
    scale: f64,
    config: &LoraConfig,
    params: &mut Vec<AdapterParam>,
) -> Result<LoraAdapter> {
    let (va, vb) = (Var::from_tensor(&a)?, Var::from_tensor(&b)?);
    let mut ad = LoraAdapter {
        a: va.as_tensor().clone(),
        b: vb.as_tensor().clone(),
        scale,
        dropout: config.lora_dropout as f32,
        magnitude: None,
        base_row_sq: None,
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
        ad.base_row_sq = LoraAdapter::weight_row_sq(&lin.weight)?;
        let vm = Var::from_tensor(&ad.row_norms(&lin.weight)?)?;
        ad.magnitude = Some(vm.as_tensor().clone());
        params.push(AdapterParam {
            key: magnitude_key(&lin.path),
            tensor: vm.as_tensor().clone(),
            var: Some(vm),
        });
    }
    Ok(ad)
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
    let mut params = Vec::new();
    let mut initial = Vec::new();
    let mut hit = 0usize;
    for lin in model.linears_mut() {
        if !selector.selects(&lin.path) {
            lin.set_adapter(slot, None);
            continue;
        }
        hit += 1;
        let r = config.rank_for(&lin.path);
        let scale = config.scale_for(&lin.path, r);
        let (a, b, start) = new_pair(lin, init, r, scale)?;
        if let Some((a0, b0)) = start {
            initial.push((peft_key(&lin.path, 'A'), a0));
            initial.push((peft_key(&lin.path, 'B'), b0));
        }
        let ad = trainable_adapter(lin, (a, b), scale, config, &mut params)?;
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
    let aliases = attach_extras(model, config, slot, &mut params)?;
    let mut config = config.clone();
    config.target_modules = Some(config::TargetModules::Modules(
        target.resolved_names(model.cfg.linear_modules(), model.cfg.num_layers)?,
    ));
    if let config::TargetModules::Pattern(p) = &target {
        if !p.eq_ignore_ascii_case("all-linear") && p != "ALL" {
            config.target_modules = Some(target.clone());
        }
    }
    config.init_lora_weights = Some(init.peft_value());
    Ok(Adapter {
        slot,
        config,
        params,
        initial,
        aliases,
    })
}
