//! Preference data: read JSON / JSONL / Parquet files (local or from the hub cache), detect their
//! format, normalise every row to a [`PreferencePair`], render it with the model's chat template
//! and tokenise it with the prompt/response boundary the DPO loss needs.
//!
//! ```text
//! load_pairs(spec)            source: files -> rows (serde_json::Value) with their file:line
//!   -> formats::Format        detect from the first row's keys, normalise each row
//! Preprocessor::prepare       template: render; tokenize: boundary, truncation, drops
//! ```

pub mod formats;
pub mod source;
pub mod template;
pub mod tokenize;

use std::fmt;

pub use formats::Format;
pub use tokenize::{PrepareStats, Preprocessor, TokenizeOptions, TokenizedPair, TruncationMode};

/// One chat message, roles normalised to `system`, `user` or `assistant`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// One preference pair. `chosen`/`rejected` are the response message(s) (usually one assistant
/// message). `rejected_prompt` is set only when the rejected side has a different prompt (xtuner).
#[derive(Debug, Clone, PartialEq)]
pub struct PreferencePair {
    pub prompt: Vec<Message>,
    pub chosen: Vec<Message>,
    pub rejected: Vec<Message>,
    pub rejected_prompt: Option<Vec<Message>>,
}

/// Where a row came from, for error messages and per-pair outputs: the file as named to the user
/// (a path, or `hf://datasets/org/name/path` for hub files) and the 1-based line (JSONL) or row
/// number (JSON array element, Parquet row).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RowRef {
    pub file: String,
    pub line: usize,
}

impl fmt::Display for RowRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Skip (and count) rows that fail to parse instead of stopping at the first one. A file that
    /// is empty or whose format is unknown is still an error.
    pub skip_bad_rows: bool,
    /// Hub revision (branch, tag or commit) for hub dataset ids; `main` when unset.
    pub revision: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadStats {
    /// Pairs returned.
    pub rows: usize,
    /// Rows skipped because they were malformed (only with `skip_bad_rows`).
    pub skipped_bad_rows: usize,
    /// (file, format name) for every file read, in order.
    pub formats: Vec<(String, String)>,
    /// (file, keys) for every file whose rows hold keys its format does not read.
    pub unused_keys: Vec<(String, Vec<String>)>,
}

impl LoadStats {
    fn absorb(&mut self, other: LoadStats) {
        self.rows += other.rows;
        self.skipped_bad_rows += other.skipped_bad_rows;
        self.formats.extend(other.formats);
        self.unused_keys.extend(other.unused_keys);
    }
}

/// Load a dataset spec: a local .json / .jsonl / .parquet file, a local folder of such files, or
/// a hub dataset id `org/name[:subset]` (hf-hub cache, HF_HUB_OFFLINE honoured, like models in
/// src/hub.rs).
pub fn load_pairs(spec: &str, opts: &LoadOptions) -> crate::Result<(Vec<(RowRef, PreferencePair)>, LoadStats)> {
    let (spec, sample) = split_sample(spec);
    let files = source::resolve_spec(spec, opts.revision.as_deref())?;
    let mut pairs = Vec::new();
    let mut stats = LoadStats::default();
    for file in &files {
        let (p, s) = formats::load_file(&file.path, &file.display, opts)?;
        pairs.extend(p);
        stats.absorb(s);
    }
    if let Some(n) = sample {
        pairs = sample_rows(pairs, n);
    }
    Ok((pairs, stats))
}

/// ms-swift's `dataset#N`: the spec and the number of rows to sample. A spec naming an existing
/// file is never split (`data#2` may be a file name).
fn split_sample(spec: &str) -> (&str, Option<usize>) {
    if std::path::Path::new(spec).exists() {
        return (spec, None);
    }
    match spec.rsplit_once('#') {
        Some((base, n)) if !base.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
            (base, n.parse().ok())
        }
        _ => (spec, None),
    }
}

/// `n` rows as ms-swift samples them: a seeded random subset when `n` is at most the number of
/// rows; otherwise every row as many whole times as fit, then a random subset for the rest.
fn sample_rows<T: Clone>(rows: Vec<T>, n: usize) -> Vec<T> {
    if rows.is_empty() {
        return rows;
    }
    let mut rng = crate::rng::Rng::stream(42, 0xda7a_5a3b);
    let mut out = Vec::with_capacity(n);
    for _ in 0..n / rows.len() {
        out.extend(rows.iter().cloned());
    }
    let mut idx: Vec<usize> = (0..rows.len()).collect();
    rng.shuffle(&mut idx);
    out.extend(idx[..n % rows.len()].iter().map(|&i| rows[i].clone()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dataset_hash_n_samples_n_rows() {
        assert_eq!(split_sample("my.jsonl#1000"), ("my.jsonl", Some(1000)));
        assert_eq!(split_sample("org/name:subset#5"), ("org/name:subset", Some(5)));
        assert_eq!(split_sample("my.jsonl"), ("my.jsonl", None));
        assert_eq!(split_sample("my#notes.jsonl"), ("my#notes.jsonl", None));
        let rows: Vec<u32> = (0..10).collect();
        let few = sample_rows(rows.clone(), 4);
        assert_eq!(few.len(), 4);
        let mut distinct = few.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 4, "a subset, no repeats: {few:?}");
        let many = sample_rows(rows.clone(), 25);
        assert_eq!(many.len(), 25);
        assert_eq!(&many[..20], [rows.clone(), rows].concat().as_slice());
    }
}
