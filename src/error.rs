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

    /// `because` names the settings that changed since the checkpoint (the model, the data files,
    /// the template...), when the checkpoint's recipe.yaml tells.
    #[error(
        "{dir}: this checkpoint was trained on different data (fingerprint {was} vs {now}); refusing to resume{because}"
    )]
    ResumeDataMismatch {
        dir: PathBuf,
        was: String,
        now: String,
        because: String,
    },

    #[error("{dir}: loss state: {msg}")]
    LossState { dir: PathBuf, msg: String },

    #[error(
        "non-finite loss or gradient in {in_a_row} steps in a row (up to step {step}); training stopped ({keep}). \
         Lower --learning_rate or check the data"
    )]
    NonFinite { step: usize, in_a_row: usize, keep: String },

    #[error(
        "{dir} already holds a trained adapter; choose another --output_dir, pass --resume_from_checkpoint, \
         --add_version true (a new v<N>-<time> subfolder) or --overwrite_output_dir"
    )]
    OutputHoldsAdapter { dir: PathBuf },

    #[error("--output_dir {dir}: {msg}")]
    OutputDir { dir: PathBuf, msg: String },

    /// Ctrl-C during a phase that has nothing to save (nothing was trained yet).
    #[error("interrupted while {what}; nothing was trained yet")]
    Interrupted { what: String },

    #[error("--output {dir} {msg}")]
    MergeOutput { dir: PathBuf, msg: String },

    #[error("{path}: not a TensorBoard event file: {msg}")]
    EventFile { path: PathBuf, msg: String },

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

    /// A file that must be inside a folder the user named (config.json in a model folder).
    #[error("{path}: required file is missing")]
    MissingFile { path: PathBuf },

    /// A path the user named that does not exist (`--dataset`, `--prompts`).
    #[error("{path}: no such file or folder")]
    NotFound { path: PathBuf },

    #[error("{path}: unsupported architecture {name:?} (supported: {supported})")]
    UnsupportedArchitecture {
        path: PathBuf,
        name: String,
        supported: &'static str,
    },

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

    // data, adapters, checkpoints, losses, merge
    /// A JSON file that is not an object of keys and values.
    #[error("{path}: must be a JSON object of keys and values, got {got}")]
    NotAnObject { path: PathBuf, got: &'static str },

    /// A JSON file whose values do not deserialize, with no single key to blame. (The inner
    /// errors of this block are fields, not `#[source]`s: the binary prints the source chain,
    /// and the message already holds them.)
    #[error("{path}: {error}")]
    Deserialize { path: PathBuf, error: serde_json::Error },

    /// A data file at fault as a whole (unknown extension, empty, nothing to score); `file` is the
    /// name messages give it.
    #[error("{file}: {msg}")]
    DataFile { file: String, msg: String },

    /// One row of a data file; `row` is its location (`file:line`, `file: row N (line L)`).
    #[error("{row}: {msg}")]
    DataRow { row: String, msg: String },

    #[error("dataset {id:?}: {msg}")]
    HubDataset { id: String, msg: String },

    #[error("{path}: cannot load the tokenizer: {msg}")]
    TokenizerLoad { path: PathBuf, msg: String },

    /// The tokenizer failed on a text.
    #[error("tokenizer: {msg}")]
    Tokenizer { msg: String },

    /// A chat template that does not parse or render; `origin` names it (a file or a name).
    #[error("{origin}: {msg}")]
    Template { origin: String, msg: String },

    #[error("unknown chat template name `{name}` (known: {known}; or give a Jinja file path)")]
    TemplateName { name: String, known: String },

    #[error("chat template `{spec}` is neither a named template ({known}) nor a file")]
    TemplateSpec { spec: String, known: String },

    #[error("target_modules: invalid regex {pattern:?}: {msg}")]
    TargetRegex { pattern: String, msg: String },

    #[error("target_modules {target} selects no linear layer of the model (its layers are {layers})")]
    /// `target` is the targets as written in an adapter_config.json (Debug form).
    TargetUnmatched { target: String, layers: String },

    #[error("{field}: {pattern:?} matches no adapted module")]
    PatternUnmatched { field: &'static str, pattern: String },

    #[error("exclude_modules {pattern} matches no linear layer of the model")]
    ExcludeUnmatched { pattern: String },

    #[error("{spec}: --model must be a folder or a hub id, not a file")]
    ModelIsFile { spec: String },

    #[error(
        "saving checkpoint {dir} failed: {error}; the unfinished checkpoint was removed and earlier \
         checkpoints are untouched"
    )]
    CheckpointSave { dir: PathBuf, error: Box<Error> },

    /// `--resume_from_checkpoint <dir>` names no usable checkpoint.
    #[error("--resume_from_checkpoint {dir}: {msg}")]
    Resume { dir: PathBuf, msg: String },

    #[error("--resume_from_checkpoint latest: no complete checkpoint under {output_dir}")]
    NoCheckpoint { output_dir: PathBuf },

    #[error(
        "{dir}: only {} free on its filesystem, but one checkpoint needs about {}; free some space or \
         choose another --output_dir",
        crate::util::human_bytes(*.free),
        crate::util::human_bytes(*.needed)
    )]
    DiskSpace { dir: PathBuf, free: u64, needed: u64 },

    #[error("unknown loss type {name:?}; known: {known}")]
    UnknownLoss { name: String, known: String },

    /// A loss parameter (or a loss weight) out of its range.
    #[error("loss type {loss:?}: {msg}")]
    LossParam { loss: &'static str, msg: String },

    #[error("loss type {loss:?} needs reference log-probs")]
    LossNeedsReference { loss: &'static str },

    #[error("no loss type given")]
    NoLoss,

    /// A loss input tensor of the wrong shape or dtype.
    #[error("{tensor}: {msg}")]
    LossInput { tensor: &'static str, msg: String },

    #[error("ref_chosen_logps and ref_rejected_logps must be given together")]
    LossRefsUnpaired,

    #[error("the model produced a NaN logit (token {token})")]
    NanLogit { token: usize },

    /// Metrics that cannot be read back or a plot that cannot be written.
    #[error("{path}: {msg}")]
    Plot { path: PathBuf, msg: String },

    #[error(
        "--combination {combination}: module {module} has rank {rank} in {adapter} but {other_rank} in \
         {other}; use cat or svd"
    )]
    CombineRank {
        combination: &'static str,
        module: String,
        rank: usize,
        adapter: String,
        other_rank: usize,
        other: String,
    },

    #[error("--svd_rank {rank} is larger than min(out, in) = {max} of module {module}")]
    SvdRank { rank: usize, max: usize, module: String },

    /// The SVD of one module failed.
    #[error("module {module}: {error}")]
    Svd { module: String, error: Box<Error> },

    #[error("subspace iteration did not converge (residual {residual:?})")]
    SvdNotConverged { residual: Option<f64> },

    #[error(
        "merged tensor {name:?} has {count} NaN/infinite values; the adapter seems to be broken \
         (--safe_merge: nothing was written)"
    )]
    MergeNonFinite { name: String, count: usize },

    /// A tensor whose dtype lorafold cannot convert (`action` is "convert" or "write").
    #[error("tensor {name:?}: cannot {action} dtype {dtype:?}")]
    TensorDtype {
        name: String,
        action: &'static str,
        dtype: safetensors::Dtype,
    },

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
        return Err(Error::NotAnObject {
            path: path.into(),
            got: json_kind(value),
        });
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
    Err(Error::Deserialize {
        path: path.into(),
        error: err,
    })
}
