//! Typed errors of the lorafold library. Each variant names the file, key or tensor at fault so
//! the binary can print an actionable message.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("{path}: required file is missing")]
    MissingFile { path: PathBuf },

    #[error(
        "{path}: unsupported architecture {name:?} (supported: LlamaForCausalLM, \
         MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)"
    )]
    UnsupportedArchitecture { path: PathBuf, name: String },

    #[error("{path}: key {key:?}: {msg}")]
    Config {
        path: PathBuf,
        key: String,
        msg: String,
    },

    #[error("{path}: tensor {name:?} is missing")]
    MissingTensor { path: PathBuf, name: String },

    #[error("{path}: tensor {name:?} has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },

    #[error("{path}: adapter tensor {key:?} has no matching {missing:?}")]
    AdapterPairMissing {
        path: PathBuf,
        key: String,
        missing: String,
    },

    #[error("{path}: adapter tensor {key:?} matches no linear layer of the model")]
    AdapterKeyUnmatched { path: PathBuf, key: String },

    #[error("{path}: {msg}")]
    Adapter { path: PathBuf, msg: String },

    #[error("{path}: cannot read safetensors: {msg}")]
    Safetensors { path: PathBuf, msg: String },

    #[error("model {id:?}: {msg}")]
    Hub { id: String, msg: String },

    #[error("{0}")]
    Msg(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// Read a whole file, mapping "not found" to [`Error::MissingFile`].
pub fn read_to_string(path: &std::path::Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::MissingFile { path: path.into() }
        } else {
            Error::io(path, e)
        }
    })
}

/// Read and parse a JSON file into `T`, naming the file on any failure.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = read_to_string(path)?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.into(),
        source,
    })
}
