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
}

impl Arch {
    fn from_name(name: &str) -> Option<Arch> {
        match name {
            "LlamaForCausalLM" | "llama" => Some(Arch::Llama),
            "MistralForCausalLM" | "mistral" => Some(Arch::Mistral),
            "Qwen2ForCausalLM" | "qwen2" => Some(Arch::Qwen2),
            "Qwen3ForCausalLM" | "qwen3" => Some(Arch::Qwen3),
            _ => None,
        }
    }
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
        check_activation_and_sizes(&raw, path)?;
        let (num_heads, num_kv_heads, head_dim) = head_sizes(&raw, path)?;
        check_param_count(&raw, (num_heads, num_kv_heads, head_dim), path)?;
        let (rope_theta, rope_scaling) = rope(&raw, path)?;
        let sliding_window = sliding_windows(&raw, arch, path)?;
        let attention_bias = raw.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias) = match arch {
            Arch::Qwen2 => (true, false),
            Arch::Mistral => (false, false),
            Arch::Llama | Arch::Qwen3 => (attention_bias, attention_bias),
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
            qk_norm: arch == Arch::Qwen3,
            sliding_window,
            bos_token_id: token_ids(&raw.bos_token_id).first().copied(),
            eos_token_ids: token_ids(&raw.eos_token_id),
            pad_token_id: token_ids(&raw.pad_token_id).first().copied(),
            saved_dtype: raw.dtype.or(raw.torch_dtype),
        })
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
            "o_proj" => (q, h),
            "gate_proj" | "up_proj" => (h, i),
            "down_proj" => (i, h),
            _ => return None,
        })
    }

    /// Whether a linear layer, by its short name, has a bias.
    pub fn linear_bias(&self, module: &str) -> bool {
        match module {
            "q_proj" | "k_proj" | "v_proj" => self.qkv_bias,
            "o_proj" => self.o_bias,
            _ => self.mlp_bias,
        }
    }

    /// Number of parameters of the base model.
    pub fn num_params(&self) -> usize {
        let mut per_layer = 2 * self.hidden_size;
        for m in LINEAR_MODULES {
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
    Arch::from_name(name).ok_or_else(|| Error::UnsupportedArchitecture {
        path: path.into(),
        name: name.clone(),
    })
}

/// The activation is SiLU and every required size is positive.
fn check_activation_and_sizes(raw: &RawConfig, path: &Path) -> Result<()> {
    if let Some(act) = &raw.hidden_act {
        if act != "silu" && act != "swish" {
            return Err(cfg_err(
                path,
                "hidden_act",
                format!("{act:?} is not supported (silu only)"),
            ));
        }
    }
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

/// RoPE base and scaling. transformers >= 5 keeps rope settings in `rope_parameters`; older
/// configs use `rope_theta` + `rope_scaling`.
fn rope(raw: &RawConfig, path: &Path) -> Result<(f64, RopeScaling)> {
    let rope_params = raw.rope_parameters.as_ref().and_then(|v| v.as_object());
    let rope_theta = raw
        .rope_theta
        .or_else(|| rope_params.and_then(|p| p.get("rope_theta")).and_then(|v| v.as_f64()))
        .unwrap_or(10000.0);
    let scaling = match raw.rope_scaling.as_ref().and_then(|v| v.as_object()).or(rope_params) {
        None => RopeScaling::None,
        Some(obj) => rope_scaling(obj, path)?,
    };
    Ok((rope_theta, scaling))
}

/// The scaling an object of `rope_scaling` (or `rope_parameters`) describes.
fn rope_scaling(obj: &serde_json::Map<String, Value>, path: &Path) -> Result<RopeScaling> {
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
        other => {
            return Err(cfg_err(
                path,
                "rope_scaling",
                format!("rope_type {other:?} is not supported (default, linear, llama3)"),
            ))
        }
    })
}

/// The sliding window of each layer (`None`: full attention).
fn sliding_windows(raw: &RawConfig, arch: Arch, path: &Path) -> Result<Vec<Option<usize>>> {
    let n_layers = raw.num_hidden_layers;
    Ok(match arch {
        Arch::Mistral => vec![raw.sliding_window; n_layers],
        Arch::Llama => vec![None; n_layers],
        Arch::Qwen2 | Arch::Qwen3 => {
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
            } else if raw.use_sliding_window.unwrap_or(false) {
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

/// Where a linear layer sits: `model.layers.{i}.self_attn.q_proj` or `...mlp.down_proj`.
pub fn module_path(layer: usize, module: &str) -> String {
    let block = match module {
        "q_proj" | "k_proj" | "v_proj" | "o_proj" => "self_attn",
        _ => "mlp",
    };
    format!("model.layers.{layer}.{block}.{module}")
}
