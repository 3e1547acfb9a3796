//! Choosing the compute device and the base weights' dtype, and loading a model folder.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::DType;

use crate::error::{Error, Result};
use crate::model::weights::WeightSource;
use crate::model::{LoadOptions, Model, ModelConfig};

/// `--dtype` as the user chose it: every command that takes the flag parses it here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum DtypeChoice {
    /// f32 on CPU (fastest there); the checkpoint's own dtype on accelerators.
    #[default]
    #[serde(rename = "auto")]
    Auto,
    #[serde(rename = "fp32")]
    F32,
    #[serde(rename = "bf16")]
    Bf16,
    #[serde(rename = "fp16")]
    F16,
}

impl FromStr for DtypeChoice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "auto" => DtypeChoice::Auto,
            "fp32" | "f32" | "float32" => DtypeChoice::F32,
            "bf16" | "bfloat16" => DtypeChoice::Bf16,
            "fp16" | "f16" | "float16" | "half" => DtypeChoice::F16,
            _ => return Err(format!("{s:?} must be AUTO, fp32, bf16 or fp16")),
        })
    }
}

impl DtypeChoice {
    /// The name recipes and printed settings use.
    pub fn name(self) -> &'static str {
        match self {
            DtypeChoice::Auto => "auto",
            DtypeChoice::F32 => "fp32",
            DtypeChoice::Bf16 => "bf16",
            DtypeChoice::F16 => "fp16",
        }
    }

    /// The dtype asked for explicitly; `None` for `auto`.
    pub fn explicit(self) -> Option<DType> {
        match self {
            DtypeChoice::Auto => None,
            DtypeChoice::F32 => Some(DType::F32),
            DtypeChoice::Bf16 => Some(DType::BF16),
            DtypeChoice::F16 => Some(DType::F16),
        }
    }

    /// The base weights' dtype on `device` for a checkpoint saved as `saved` (config.json's
    /// `torch_dtype`). `auto` keeps f32 on CPU and the checkpoint's dtype on accelerators.
    pub fn for_weights(self, saved: Option<&str>, device: &candle_core::Device) -> DType {
        match (self.explicit(), device.is_cpu(), saved) {
            (Some(dt), _, _) => dt,
            (None, false, Some("bfloat16")) => DType::BF16,
            (None, false, Some("float16")) => DType::F16,
            (None, _, _) => DType::F32,
        }
    }
}

/// The compute device: the first CUDA or Metal device when built with those features.
pub fn default_device() -> Result<candle_core::Device> {
    #[cfg(feature = "cuda")]
    {
        return Ok(candle_core::Device::new_cuda(0)?);
    }
    #[cfg(feature = "metal")]
    {
        return Ok(candle_core::Device::new_metal(0)?);
    }
    #[allow(unreachable_code)]
    Ok(candle_core::Device::Cpu)
}

/// Load the model described by `config` (config.json) from its safetensors `weights` on the
/// default device.
pub fn load_model(config: &Path, weights: &[PathBuf], dtype: DtypeChoice) -> Result<Model> {
    let device = default_device()?;
    let cfg = ModelConfig::from_file(config)?;
    let dt = dtype.for_weights(cfg.saved_dtype.as_deref(), &device);
    let ws = WeightSource::open(weights)?;
    Model::load(cfg, &ws, &LoadOptions { dtype: dt, device })
}

/// Parse a `--dtype` value given on the command line, naming the flag on error.
pub fn parse_dtype_flag(value: &str) -> Result<DtypeChoice> {
    value.parse().map_err(|msg| Error::Setting {
        key: "--dtype".into(),
        msg,
    })
}
