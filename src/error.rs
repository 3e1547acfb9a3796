//! Typed errors of the lorafold library. Each variant names the file, key or tensor at fault so
//! the binary can print an actionable message.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // training runs
    #[error("no training pairs left after preprocessing")]
    NoTrainingPairs,

    #[error("no pairs to evaluate after preprocessing")]
    NoEvalPairs,

    #[error("{dir}: this checkpoint was trained on different data (fingerprint {was} vs {now}); refusing to resume")]
    ResumeDataMismatch { dir: PathBuf, was: String, now: String },

    #[error("{dir}: loss state: {msg}")]
    LossState { dir: PathBuf, msg: String },

    #[error(
        "non-finite loss or gradient in {in_a_row} steps in a row (up to step {step}); training stopped ({keep}). \
         Lower --learning_rate or check the data"
    )]
    NonFinite { step: usize, in_a_row: usize, keep: String },

    #[error("{dir} already holds a trained adapter; choose another --output_dir or pass --resume_from_checkpoint")]
    OutputHoldsAdapter { dir: PathBuf },

    #[error("--output_dir {dir}: {msg}")]
    OutputDir { dir: PathBuf, msg: String },

    // inference
    #[error("{path}:{line}: {msg}")]
    PromptLine { path: PathBuf, line: usize, msg: String },

    #[error("{path}: no prompts in the file")]
    NoPrompts { path: PathBuf },

    #[error("the prompt has no tokens")]
    EmptyPrompt,

    /// What was being done when `inner` happened (`loading model <dir>: ...`).
    #[error("{what}: {inner}")]
    Context { what: String, inner: Box<Error> },

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
    Config { path: PathBuf, key: String, msg: String },

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

    /// A command-line flag with a bad value (`--dtype "x" must be ...`).
    #[error("{key} {msg}")]
    Setting { key: String, msg: String },

    /// A command-line flag whose value is refused (`--weights: inf is not a finite number`).
    #[error("{flag}: {msg}")]
    Flag { flag: String, msg: String },

    /// A recipe file that is not YAML, or not a mapping of keys to values.
    #[error("{path}: {msg}")]
    Recipe { path: PathBuf, msg: String },

    // model
    #[error(
        "{dir}: only pickle weights (pytorch_model.bin) found; lorafold never loads pickle files. \
         Convert them to safetensors first, e.g. in Python: \
         AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
    )]
    PickleOnly { dir: PathBuf },

    #[error("KV cache has {cache} layers, the model {model}")]
    KvCacheLayers { cache: usize, model: usize },

    #[error("KV cache has {layers} layers, layer {layer} asked for")]
    KvCacheLayer { layers: usize, layer: usize },

    #[error("KV cache holds batch/heads {cached:?}, new keys have {new:?}")]
    KvCacheShape { cached: Vec<usize>, new: Vec<usize> },

    /// An internal invariant that does not hold; user input is reported by the variants above.
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

/// Read a JSON file and deserialize it into `T`, naming the key at fault when a value has the
/// wrong type or is missing (serde alone only says "expected usize"). Syntax errors keep their
/// line and column. `example` is any valid `T` as JSON (see [`from_json_named`]).
pub fn read_json_named<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
    example: &serde_json::Value,
) -> Result<T> {
    let value: serde_json::Value = read_json(path)?;
    from_json_named(&value, example, path)
}

/// The JSON type of a value, for messages ("a string", "a list", ...).
pub fn json_kind(v: &serde_json::Value) -> &'static str {
    use serde_json::Value;
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Deserialize a JSON object into `T`; on failure, name the key at fault. `example` is a valid
/// `T` as JSON: each key of `value` is put, alone, into a copy of `example`, and the first one
/// that does not deserialize there is the one named. A missing field is named from serde's
/// message.
pub fn from_json_named<T: serde::de::DeserializeOwned>(
    value: &serde_json::Value,
    example: &serde_json::Value,
    path: &std::path::Path,
) -> Result<T> {
    use serde_json::Value;
    let Value::Object(map) = value else {
        return Err(Error::Msg(format!(
            "{}: must be a JSON object of keys and values, got {}",
            path.display(),
            json_kind(value)
        )));
    };
    let err = match serde_json::from_value::<T>(value.clone()) {
        Ok(v) => return Ok(v),
        Err(e) => e,
    };
    let config = |key: &str, msg: String| Error::Config {
        path: path.into(),
        key: key.into(),
        msg,
    };
    if let Value::Object(base) = example {
        for (k, v) in map {
            let mut one = base.clone();
            one.insert(k.clone(), v.clone());
            if let Err(e) = serde_json::from_value::<T>(Value::Object(one)) {
                let shown = match v {
                    Value::String(s) if s.chars().count() <= 60 => format!("{s:?}"),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    other => json_kind(other).to_string(),
                };
                return Err(config(k, format!("{e} (got {shown})")));
            }
        }
    }
    let msg = err.to_string();
    if let Some(rest) = msg.strip_prefix("missing field `") {
        if let Some(name) = rest.split('`').next() {
            return Err(config(name, "is required but missing".into()));
        }
    }
    Err(Error::Msg(format!("{}: {msg}", path.display())))
}
