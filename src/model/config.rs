//! `config.json` of a Hugging Face decoder, read with serde and resolved into one [`ModelConfig`]
//! that covers every supported family. Family differences are fields, not separate code paths.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::error::{read_json, Error, Result};

/// The supported decoder families, from `architectures` (or `model_type`) in config.json.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma2,
    Gemma3,
    Phi3,
}

impl Arch {
    fn from_name(name: &str) -> Option<Arch> {
        match name {
            "LlamaForCausalLM" | "llama" => Some(Arch::Llama),
            "MistralForCausalLM" | "mistral" => Some(Arch::Mistral),
            "Qwen2ForCausalLM" | "qwen2" => Some(Arch::Qwen2),
            "Qwen3ForCausalLM" | "qwen3" => Some(Arch::Qwen3),
            "Gemma2ForCausalLM" | "gemma2" => Some(Arch::Gemma2),
            "Gemma3ForCausalLM" | "gemma3_text" => Some(Arch::Gemma3),
            "Phi3ForCausalLM" | "phi3" => Some(Arch::Phi3),
            _ => None,
        }
    }

    /// Gemma's conventions: RMSNorm scaled by (1 + w), embeddings scaled by √hidden_size, a norm
    /// before and after both the attention and the MLP.
    pub fn is_gemma(self) -> bool {
        matches!(self, Arch::Gemma2 | Arch::Gemma3)
    }
}

/// The `architectures` entries lorafold loads, for messages.
pub const SUPPORTED_ARCHITECTURES: &str = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, \
Qwen3ForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM, Phi3ForCausalLM";

/// The MLP's gate activation (`hidden_act`, or Gemma's `hidden_activation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SiLU (`silu`, `swish`).
    Silu,
    /// GELU with the tanh approximation (`gelu_pytorch_tanh`).
    GeluTanh,
}

/// RoPE frequency scaling, as transformers' `rope_type`.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    Linear {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// Phi-3's `longrope`: per-frequency divisors, the short set up to
    /// `original_max_position_embeddings` tokens and the long set beyond, and a factor that
    /// scales cos and sin.
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_position_embeddings: usize,
        attention_factor: f64,
    },
}

/// The raw fields of config.json that lorafold reads. Unknown fields are ignored.
#[derive(Debug, Deserialize)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    layer_types: Option<Vec<String>>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    hidden_activation: Option<String>,
    query_pre_attn_scalar: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    final_logit_softcapping: Option<f64>,
    sliding_window_pattern: Option<usize>,
    rope_local_base_freq: Option<f64>,
    partial_rotary_factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    pad_token_id: Option<Value>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
}

/// A resolved decoder configuration.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q, k and v projections.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    /// Bias on gate, up and down projections.
    pub mlp_bias: bool,
    /// Per-head RMSNorm on q and k before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Sliding attention window of each layer, `None` for full attention.
    pub sliding_window: Vec<Option<usize>>,
    /// RoPE base and scaling of sliding-window layers when they differ from the others
    /// (Gemma 3's local layers).
    pub rope_local: Option<(f64, RopeScaling)>,
    /// Leading dimensions of each head that rotate (`partial_rotary_factor` · head_dim).
    pub rotary_dim: usize,
    pub activation: Activation,
    /// Multiplier of the attention scores (head_dim^-0.5, or Gemma's query_pre_attn_scalar^-0.5).
    pub attn_scale: f64,
    /// `c` of the soft cap c·tanh(s/c) on attention scores (Gemma 2).
    pub attn_softcap: Option<f64>,
    /// `c` of the soft cap on the final logits (Gemma 2).
    pub final_softcap: Option<f64>,
    /// q, k and v are one `qkv_proj`, gate and up one `gate_up_proj` (Phi-3).
    pub fused_projections: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// The dtype the checkpoint says it was saved in (`torch_dtype`/`dtype`).
    pub saved_dtype: Option<String>,
}

/// Largest parameter count lorafold agrees to allocate from a config (refuses absurd sizes before
/// any allocation happens).
const MAX_PARAMS: f64 = 2.0e12;

fn token_ids(v: &Option<Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
        _ => vec![],
    }
}

impl ModelConfig {
    /// Read and validate `config.json`.
    pub fn from_file(path: &Path) -> Result<ModelConfig> {
        let value: Value = read_json(path)?;
        Self::from_value(&value, path)
    }

    /// Resolve a parsed config.json (`path` names it in errors).
    pub fn from_value(value: &Value, path: &Path) -> Result<ModelConfig> {
        let example = serde_json::json!({
            "vocab_size": 1,
            "hidden_size": 1,
            "intermediate_size": 1,
            "num_hidden_layers": 1,
            "num_attention_heads": 1,
        });
        let raw: RawConfig = crate::error::from_json_named(value, &example, path)?;
        let arch = detect_arch(&raw, path)?;
        let activation = activation(&raw, arch, path)?;
        check_sizes(&raw, path)?;
        let (num_heads, num_kv_heads, head_dim) = head_sizes(&raw, path)?;
        check_param_count(&raw, (num_heads, num_kv_heads, head_dim), path)?;
        let rotary_dim = rotary_dim(&raw, head_dim, path)?;
        let (rope_theta, rope_scaling, rope_local) = rope(&raw, arch, rotary_dim, path)?;
        let sliding_window = sliding_windows(&raw, arch, path)?;
        let attention_bias = raw.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias) = match arch {
            Arch::Qwen2 => (true, false),
            Arch::Mistral | Arch::Phi3 => (false, false),
            Arch::Llama | Arch::Qwen3 | Arch::Gemma2 | Arch::Gemma3 => (attention_bias, attention_bias),
        };
        let attn_scale = match (arch.is_gemma(), raw.query_pre_attn_scalar) {
            (true, Some(s)) if s > 0.0 => s.powf(-0.5),
            (true, Some(s)) => {
                return Err(cfg_err(path, "query_pre_attn_scalar", format!("{s} must be positive")));
            }
            _ => (head_dim as f64).powf(-0.5),
        };
        let softcap = |key: &str, v: Option<f64>| -> Result<Option<f64>> {
            match v {
                Some(c) if c <= 0.0 || !c.is_finite() => {
                    Err(cfg_err(path, key, format!("{c} must be a positive number")))
                }
                _ => Ok(v),
            }
        };
        Ok(ModelConfig {
            arch,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias: arch == Arch::Llama && raw.mlp_bias.unwrap_or(false),
            qk_norm: matches!(arch, Arch::Qwen3 | Arch::Gemma3),
            sliding_window,
            rope_local,
            rotary_dim,
            activation,
            attn_scale,
            attn_softcap: softcap("attn_logit_softcapping", raw.attn_logit_softcapping)?,
            final_softcap: softcap("final_logit_softcapping", raw.final_logit_softcapping)?,
            fused_projections: arch == Arch::Phi3,
            bos_token_id: token_ids(&raw.bos_token_id).first().copied(),
            eos_token_ids: token_ids(&raw.eos_token_id),
            pad_token_id: token_ids(&raw.pad_token_id).first().copied(),
            saved_dtype: raw.dtype.or(raw.torch_dtype),
        })
    }

    /// The linear layers of a decoder block, by short name, in the order PEFT lists them.
    pub fn linear_modules(&self) -> &'static [&'static str] {
        if self.fused_projections {
            &FUSED_LINEAR_MODULES
        } else {
            &LINEAR_MODULES
        }
    }

    /// Input and output sizes of each linear layer, by its short name.
    pub fn linear_shape(&self, module: &str) -> Option<(usize, usize)> {
        let h = self.hidden_size;
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let i = self.intermediate_size;
        Some(match module {
            "q_proj" => (h, q),
            "k_proj" | "v_proj" => (h, kv),
            "qkv_proj" => (h, q + 2 * kv),
            "o_proj" => (q, h),
            "gate_proj" | "up_proj" => (h, i),
            "gate_up_proj" => (h, 2 * i),
            "down_proj" => (i, h),
            _ => return None,
        })
    }

    /// Whether a linear layer, by its short name, has a bias.
    pub fn linear_bias(&self, module: &str) -> bool {
        match module {
            "q_proj" | "k_proj" | "v_proj" | "qkv_proj" => self.qkv_bias,
            "o_proj" => self.o_bias,
            _ => self.mlp_bias,
        }
    }

    /// Number of parameters of the base model.
    pub fn num_params(&self) -> usize {
        let norms = if self.arch.is_gemma() { 4 } else { 2 };
        let mut per_layer = norms * self.hidden_size;
        for m in self.linear_modules() {
            let (i, o) = self.linear_shape(m).unwrap_or((0, 0));
            per_layer += i * o + if self.linear_bias(m) { o } else { 0 };
        }
        if self.qk_norm {
            per_layer += 2 * self.head_dim;
        }
        let emb = self.vocab_size * self.hidden_size;
        let head = if self.tie_word_embeddings { 0 } else { emb };
        emb + head + self.hidden_size + self.num_layers * per_layer
    }
}

/// The error of config key `key` of the file at `path`.
fn cfg_err(path: &Path, key: &str, msg: String) -> Error {
    Error::Config {
        path: PathBuf::from(path),
        key: key.to_string(),
        msg,
    }
}

/// The family, from `architectures` (first entry) or else `model_type`.
fn detect_arch(raw: &RawConfig, path: &Path) -> Result<Arch> {
    let name = match (&raw.architectures, &raw.model_type) {
        (Some(archs), _) if !archs.is_empty() => &archs[0],
        (_, Some(mt)) => mt,
        _ => {
            return Err(cfg_err(
                path,
                "architectures",
                "neither `architectures` nor `model_type` is set".into(),
            ))
        }
    };
    if name == "Gemma3ForConditionalGeneration" || name == "gemma3" {
        return Err(cfg_err(
            path,
            "architectures",
            format!(
                "{name} is Gemma 3 with a vision tower; lorafold trains text-only decoders. Use a \
                 text-only checkpoint (Gemma3ForCausalLM, e.g. google/gemma-3-1b-it)"
            ),
        ));
    }
    Arch::from_name(name).ok_or_else(|| Error::UnsupportedArchitecture {
        path: path.into(),
        name: name.clone(),
        supported: SUPPORTED_ARCHITECTURES,
    })
}

/// The MLP activation: `hidden_activation` (Gemma's key, which wins when both are set) or
/// `hidden_act`.
fn activation(raw: &RawConfig, arch: Arch, path: &Path) -> Result<Activation> {
    let (key, act) = match (&raw.hidden_activation, &raw.hidden_act) {
        (Some(a), _) if arch.is_gemma() => ("hidden_activation", a.as_str()),
        (_, Some(a)) => ("hidden_act", a.as_str()),
        (Some(a), None) => ("hidden_activation", a.as_str()),
        (None, None) if arch.is_gemma() => return Ok(Activation::GeluTanh),
        (None, None) => return Ok(Activation::Silu),
    };
    match act {
        "silu" | "swish" => Ok(Activation::Silu),
        "gelu_pytorch_tanh" | "gelu_tanh" | "gelu_new" => Ok(Activation::GeluTanh),
        other => Err(cfg_err(
            path,
            key,
            format!("{other:?} is not supported (silu, gelu_pytorch_tanh)"),
        )),
    }
}

/// Every required size is positive.
fn check_sizes(raw: &RawConfig, path: &Path) -> Result<()> {
    for (key, v) in [
        ("vocab_size", raw.vocab_size),
        ("hidden_size", raw.hidden_size),
        ("intermediate_size", raw.intermediate_size),
        ("num_hidden_layers", raw.num_hidden_layers),
        ("num_attention_heads", raw.num_attention_heads),
    ] {
        if v == 0 {
            return Err(cfg_err(path, key, "must be positive".into()));
        }
    }
    Ok(())
}

/// Query heads, key/value heads and head size, checked against each other.
fn head_sizes(raw: &RawConfig, path: &Path) -> Result<(usize, usize, usize)> {
    let num_heads = raw.num_attention_heads;
    let num_kv_heads = raw.num_key_value_heads.unwrap_or(num_heads);
    if num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
        return Err(cfg_err(
            path,
            "num_key_value_heads",
            format!("{num_kv_heads} does not divide num_attention_heads {num_heads}"),
        ));
    }
    let head_dim = match raw.head_dim {
        Some(d) => d,
        None => {
            if !raw.hidden_size.is_multiple_of(num_heads) {
                return Err(cfg_err(
                    path,
                    "hidden_size",
                    format!("{} is not divisible by {num_heads} heads", raw.hidden_size),
                ));
            }
            raw.hidden_size / num_heads
        }
    };
    if head_dim == 0 || head_dim % 2 != 0 {
        return Err(cfg_err(
            path,
            "head_dim",
            format!("{head_dim} must be even and positive"),
        ));
    }
    Ok((num_heads, num_kv_heads, head_dim))
}

/// Refuse absurd sizes before anything is allocated, naming the largest size: the one most
/// likely to be wrong.
fn check_param_count(
    raw: &RawConfig,
    (num_heads, num_kv_heads, head_dim): (usize, usize, usize),
    path: &Path,
) -> Result<()> {
    let (h, i, l, v) = (
        raw.hidden_size as f64,
        raw.intermediate_size as f64,
        raw.num_hidden_layers as f64,
        raw.vocab_size as f64,
    );
    let (nh, nkv, hd) = (num_heads as f64, num_kv_heads as f64, head_dim as f64);
    let attn = h * (nh + 2.0 * nkv) * hd + nh * hd * h;
    let params = 2.0 * v * h + l * (attn + 3.0 * h * i);
    if params < MAX_PARAMS {
        return Ok(());
    }
    let sizes = [
        ("vocab_size", raw.vocab_size),
        ("hidden_size", raw.hidden_size),
        ("intermediate_size", raw.intermediate_size),
        ("num_hidden_layers", raw.num_hidden_layers),
        ("head_dim", head_dim),
    ];
    let (key, _) = sizes
        .iter()
        .copied()
        .max_by_key(|(_, n)| *n)
        .unwrap_or(("hidden_size", 0));
    let all: Vec<String> = sizes.iter().map(|(k, n)| format!("{k} {n}")).collect();
    Err(cfg_err(
        path,
        key,
        format!(
            "the sizes in this config ({}) describe {params:.3e} parameters; refusing to allocate",
            all.join(", ")
        ),
    ))
}

/// Leading dimensions of each head that rotate: `partial_rotary_factor` (top level, or in
/// `rope_parameters`) times head_dim.
fn rotary_dim(raw: &RawConfig, head_dim: usize, path: &Path) -> Result<usize> {
    let in_params = raw
        .rope_parameters
        .as_ref()
        .and_then(|p| p.get("partial_rotary_factor"))
        .and_then(|v| v.as_f64());
    let factor = raw.partial_rotary_factor.or(in_params).unwrap_or(1.0);
    let dim = (head_dim as f64 * factor) as usize;
    if !(factor > 0.0 && factor <= 1.0) || dim == 0 || !dim.is_multiple_of(2) {
        return Err(cfg_err(
            path,
            "partial_rotary_factor",
            format!("{factor} gives {dim} rotary dimensions of head_dim {head_dim}; they must be even and positive"),
        ));
    }
    Ok(dim)
}

/// RoPE of every layer (base and scaling), and of sliding-window layers where they differ.
/// transformers >= 5 keeps rope settings in `rope_parameters` (Gemma 3: one entry per layer
/// type); older configs use `rope_theta` + `rope_scaling` (+ Gemma 3's `rope_local_base_freq`).
#[allow(clippy::type_complexity)]
fn rope(
    raw: &RawConfig,
    arch: Arch,
    rotary_dim: usize,
    path: &Path,
) -> Result<(f64, RopeScaling, Option<(f64, RopeScaling)>)> {
    let params = raw.rope_parameters.as_ref().and_then(|v| v.as_object());
    let per_type = params.filter(|p| p.contains_key("full_attention") || p.contains_key("sliding_attention"));
    let ctx = RopeContext { raw, rotary_dim, path };
    if let Some(p) = per_type {
        let of = |key: &str, default_theta: f64| -> Result<(f64, RopeScaling)> {
            match p.get(key).and_then(|v| v.as_object()) {
                Some(obj) => ctx.resolve(
                    raw.rope_theta.filter(|_| key == "full_attention"),
                    Some(obj),
                    default_theta,
                ),
                None => Ok((default_theta, RopeScaling::None)),
            }
        };
        let global = of("full_attention", 1_000_000.0)?;
        let local = of("sliding_attention", raw.rope_local_base_freq.unwrap_or(10_000.0))?;
        return Ok((global.0, global.1, Some(local)));
    }
    let obj = raw.rope_scaling.as_ref().and_then(|v| v.as_object()).or(params);
    let default_theta = if arch == Arch::Gemma3 { 1_000_000.0 } else { 10_000.0 };
    let (theta, scaling) = ctx.resolve(raw.rope_theta, obj, default_theta)?;
    let local = (arch == Arch::Gemma3).then(|| (raw.rope_local_base_freq.unwrap_or(10_000.0), RopeScaling::None));
    Ok((theta, scaling, local))
}

/// What resolving one rope settings object needs besides the object.
struct RopeContext<'a> {
    raw: &'a RawConfig,
    rotary_dim: usize,
    path: &'a Path,
}

impl RopeContext<'_> {
    /// Base and scaling from `theta` (top-level `rope_theta`), else the object's `rope_theta`,
    /// else `default_theta`.
    fn resolve(
        &self,
        theta: Option<f64>,
        obj: Option<&serde_json::Map<String, Value>>,
        default_theta: f64,
    ) -> Result<(f64, RopeScaling)> {
        let theta = theta
            .or_else(|| obj.and_then(|p| p.get("rope_theta")).and_then(|v| v.as_f64()))
            .unwrap_or(default_theta);
        let scaling = match obj {
            None => RopeScaling::None,
            Some(obj) => rope_scaling(obj, self)?,
        };
        Ok((theta, scaling))
    }
}

/// The scaling an object of `rope_scaling` (or `rope_parameters`) describes.
fn rope_scaling(obj: &serde_json::Map<String, Value>, ctx: &RopeContext) -> Result<RopeScaling> {
    let path = ctx.path;
    let kind = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let num = |k: &str| -> Result<f64> {
        obj.get(k).and_then(|v| v.as_f64()).ok_or_else(|| {
            cfg_err(
                path,
                "rope_scaling",
                format!("rope_type {kind:?} needs a numeric {k:?}"),
            )
        })
    };
    Ok(match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: num("factor")? },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        },
        "longrope" | "su" => long_rope(obj, ctx)?,
        other => {
            return Err(cfg_err(
                path,
                "rope_scaling",
                format!("rope_type {other:?} is not supported (default, linear, llama3, longrope)"),
            ))
        }
    })
}

/// Phi-3's `longrope`, resolved as transformers resolves it: `factor` defaults to
/// max_position_embeddings / original_max_position_embeddings, and `attention_factor` to
/// √(1 + ln factor / ln original_max_position_embeddings) (1 when factor ≤ 1).
fn long_rope(obj: &serde_json::Map<String, Value>, ctx: &RopeContext) -> Result<RopeScaling> {
    let err = |msg: String| cfg_err(ctx.path, "rope_scaling", msg);
    let factors = |key: &str| -> Result<Vec<f64>> {
        let list = obj
            .get(key)
            .and_then(|v| v.as_array())
            .ok_or_else(|| err(format!("longrope needs a list {key:?}")))?;
        let v: Vec<f64> = list.iter().filter_map(|x| x.as_f64()).collect();
        if v.len() != list.len() || v.len() != ctx.rotary_dim / 2 || v.iter().any(|&f| f <= 0.0) {
            return Err(err(format!(
                "{key:?} must hold {} positive numbers (rotary dimensions / 2), it has {} entries",
                ctx.rotary_dim / 2,
                list.len()
            )));
        }
        Ok(v)
    };
    let original = obj
        .get("original_max_position_embeddings")
        .and_then(|v| v.as_u64())
        .map(|v| v as usize)
        .or(ctx.raw.original_max_position_embeddings)
        .filter(|&n| n > 1)
        .ok_or_else(|| err("longrope needs original_max_position_embeddings (> 1)".into()))?;
    let factor = match obj.get("factor").and_then(|v| v.as_f64()) {
        Some(f) => f,
        None => ctx.raw.max_position_embeddings.unwrap_or(original) as f64 / original as f64,
    };
    let attention_factor = match obj.get("attention_factor").and_then(|v| v.as_f64()) {
        Some(a) => a,
        None if factor <= 1.0 => 1.0,
        None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
    };
    Ok(RopeScaling::LongRope {
        short_factor: factors("short_factor")?,
        long_factor: factors("long_factor")?,
        original_max_position_embeddings: original,
        attention_factor,
    })
}

/// The sliding window of each layer (`None`: full attention).
fn sliding_windows(raw: &RawConfig, arch: Arch, path: &Path) -> Result<Vec<Option<usize>>> {
    let n_layers = raw.num_hidden_layers;
    if arch.is_gemma() && raw.layer_types.is_none() {
        // Before layer_types: Gemma 2 alternates sliding and full layers, Gemma 3 has every
        // `sliding_window_pattern`-th layer full.
        let pattern = match arch {
            Arch::Gemma2 => 2,
            _ => raw.sliding_window_pattern.unwrap_or(6).max(1),
        };
        return Ok((0..n_layers)
            .map(|i| {
                if (i + 1) % pattern != 0 {
                    raw.sliding_window
                } else {
                    None
                }
            })
            .collect());
    }
    Ok(match arch {
        Arch::Mistral | Arch::Phi3 => vec![raw.sliding_window; n_layers],
        Arch::Llama => vec![None; n_layers],
        Arch::Qwen2 | Arch::Qwen3 | Arch::Gemma2 | Arch::Gemma3 => {
            if let Some(types) = &raw.layer_types {
                if types.len() != n_layers {
                    return Err(cfg_err(
                        path,
                        "layer_types",
                        format!("has {} entries for {n_layers} layers", types.len()),
                    ));
                }
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        "sliding_attention" => Ok(raw.sliding_window),
                        "full_attention" => Ok(None),
                        other => Err(cfg_err(path, "layer_types", format!("unknown layer type {other:?}"))),
                    })
                    .collect::<Result<_>>()?
            } else if raw.use_sliding_window.unwrap_or(false) && !arch.is_gemma() {
                let from = raw.max_window_layers.unwrap_or(0);
                (0..n_layers)
                    .map(|i| if i >= from { raw.sliding_window } else { None })
                    .collect()
            } else {
                vec![None; n_layers]
            }
        }
    })
}

/// The linear layers of a decoder block, in the order PEFT lists them.
pub const LINEAR_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The linear layers of a Phi-3 block, whose q, k, v and gate, up projections are fused.
pub const FUSED_LINEAR_MODULES: [&str; 4] = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"];

/// Every short name of a linear layer of any supported family.
pub fn is_linear_module(name: &str) -> bool {
    LINEAR_MODULES.contains(&name) || FUSED_LINEAR_MODULES.contains(&name)
}

/// Where a linear layer sits: `model.layers.{i}.self_attn.q_proj` or `...mlp.down_proj`.
pub fn module_path(layer: usize, module: &str) -> String {
    let block = match module {
        "q_proj" | "k_proj" | "v_proj" | "o_proj" | "qkv_proj" => "self_attn",
        _ => "mlp",
    };
    format!("model.layers.{layer}.{block}.{module}")
}
