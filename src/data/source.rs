//! Reading data files into rows, and resolving a dataset spec (local file, local folder, hub
//! dataset id) into the files to read.
//!
//! Rows come back as `serde_json::Value`s with their location; a row that cannot be read (bad
//! JSON on a JSONL line, a line that is not UTF-8) is kept as an error message so the caller can
//! either stop or skip it.

use std::path::{Path, PathBuf};

use hf_hub::{Repo, RepoType};
use serde_json::Value;

use super::RowRef;
use crate::error::{Error, Result};

/// One row of a data file.
#[derive(Debug, Clone)]
pub struct RawRow {
    pub row: RowRef,
    /// The location as error messages print it: `file:line` for JSONL, `file: row N (line L)`
    /// for JSON arrays, `file: row N` for Parquet.
    pub loc: String,
    /// The parsed row, or why it could not be read.
    pub value: std::result::Result<Value, String>,
}

/// The kinds of data file lorafold reads, from the file name's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Json,
    Jsonl,
    Parquet,
}

impl FileKind {
    pub fn of(path: &Path) -> Option<FileKind> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "json" => Some(FileKind::Json),
            "jsonl" | "ndjson" => Some(FileKind::Jsonl),
            "parquet" => Some(FileKind::Parquet),
            _ => None,
        }
    }
}

fn file_err(display: &str, msg: impl std::fmt::Display) -> Error {
    Error::DataFile {
        file: display.into(),
        msg: msg.to_string(),
    }
}

/// Read every row of a data file. `display` names the file in rows and messages.
pub fn read_rows(path: &Path, display: &str) -> Result<Vec<RawRow>> {
    let kind = FileKind::of(path).ok_or_else(|| {
        file_err(
            display,
            "unsupported data file extension (expected .json, .jsonl or .parquet)",
        )
    })?;
    match kind {
        FileKind::Parquet => read_parquet(path, display),
        FileKind::Json | FileKind::Jsonl => {
            let bytes = std::fs::read(path).map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Error::MissingFile { path: path.into() }
                } else {
                    Error::io(path, e)
                }
            })?;
            if kind == FileKind::Jsonl {
                Ok(read_jsonl(&bytes, display))
            } else {
                read_json(&bytes, display)
            }
        }
    }
}

/// Largest row lorafold reads (a JSONL line, or one element of a JSON file). Anything longer
/// cannot fit a context window, and rendering and tokenising it would cost gigabytes.
pub const MAX_ROW_BYTES: usize = 16 << 20;

fn too_long(what: &str, len: usize) -> String {
    format!(
        "{what} is {len} bytes long; rows longer than {} MiB are refused (no context window holds \
         them; shorten or split the row)",
        MAX_ROW_BYTES >> 20
    )
}

fn strip_bom(bytes: &[u8]) -> &[u8] {
    bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes)
}

/// Parse one JSON value, with serde's "at line 1 column N" turned into "column N" (the line is
/// already in the location).
fn parse_line(text: &str) -> std::result::Result<Value, String> {
    serde_json::from_str(text).map_err(|e| format!("invalid JSON at column {}: {}", e.column(), json_msg(&e)))
}

/// serde_json's message without its trailing " at line L column C".
fn json_msg(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// JSONL: one JSON value per line, blank lines skipped. Lines that are not UTF-8 or not valid
/// JSON become bad rows.
pub fn read_jsonl(bytes: &[u8], display: &str) -> Vec<RawRow> {
    let bytes = strip_bom(bytes);
    let mut rows = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let line_no = i + 1;
        let value = if line.len() > MAX_ROW_BYTES {
            Err(too_long("the line", line.len()))
        } else {
            match std::str::from_utf8(line) {
                Err(e) => Err(format!(
                    "not valid UTF-8 text (byte {} of the line)",
                    e.valid_up_to() + 1
                )),
                Ok(text) => {
                    let text = text.trim();
                    if text.is_empty() {
                        continue;
                    }
                    parse_line(text)
                }
            }
        };
        rows.push(RawRow {
            row: RowRef {
                file: display.into(),
                line: line_no,
            },
            loc: format!("{display}:{line_no}"),
            value,
        });
    }
    rows
}

fn line_of(text: &str, byte: usize) -> usize {
    text.as_bytes()[..byte.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

/// JSON: a top-level array of rows (each element's line is recorded), or an object holding the
/// array under `data` or `train`. A .json file that holds one object per line is read as JSONL.
pub fn read_json(bytes: &[u8], display: &str) -> Result<Vec<RawRow>> {
    let bytes = strip_bom(bytes);
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let line = bytes[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count() + 1;
        file_err(&format!("{display}:{line}"), "not valid UTF-8 text")
    })?;
    let start = skip_ws(text.as_bytes(), 0);
    if start == text.len() {
        return Ok(Vec::new());
    }
    if text.as_bytes()[start] == b'[' {
        return read_json_array(text, start, display);
    }
    // An object: either a wrapper ({"data": [...]}) or the first of several JSONL-style rows.
    let mut stream = serde_json::Deserializer::from_str(text).into_iter::<Value>();
    let first = match stream.next() {
        Some(Ok(v)) => v,
        Some(Err(e)) => {
            return Err(file_err(
                &format!("{display}:{}", e.line()),
                format!("invalid JSON at column {}: {}", e.column(), json_msg(&e)),
            ))
        }
        None => return Ok(Vec::new()),
    };
    let after = skip_ws(text.as_bytes(), stream.byte_offset());
    if after < text.len() {
        // More than one top-level value: JSON Lines in a .json file.
        return Ok(read_jsonl(bytes, display));
    }
    if let Value::Object(map) = &first {
        for key in ["data", "train"] {
            if let Some(Value::Array(items)) = map.get(key) {
                return Ok(items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        let size = serde_json::to_vec(v).map_or(0, |b| b.len());
                        RawRow {
                            row: RowRef {
                                file: display.into(),
                                line: i + 1,
                            },
                            loc: format!("{display}: row {} of `{key}`", i + 1),
                            value: if size > MAX_ROW_BYTES {
                                Err(too_long("the row", size))
                            } else {
                                Ok(v.clone())
                            },
                        }
                    })
                    .collect());
            }
        }
        // A single row.
        let size = stream.byte_offset();
        return Ok(vec![RawRow {
            row: RowRef {
                file: display.into(),
                line: 1,
            },
            loc: format!("{display}:1"),
            value: if size > MAX_ROW_BYTES {
                Err(too_long("the row", size))
            } else {
                Ok(first)
            },
        }]);
    }
    Err(file_err(display, "expected a JSON array of rows (or JSON Lines)"))
}

/// Walk a top-level array element by element so each row knows the line it starts on.
fn read_json_array(text: &str, open: usize, display: &str) -> Result<Vec<RawRow>> {
    let b = text.as_bytes();
    let mut rows = Vec::new();
    let mut i = skip_ws(b, open + 1);
    let bad = |at: usize, msg: &str| file_err(&format!("{display}:{}", line_of(text, at)), msg);
    // Line numbers are counted forward from the previous element (not from the start each time:
    // that would be quadratic in the file size).
    let (mut seen_pos, mut seen_line) = (0usize, 1usize);
    let mut line_at = |pos: usize| {
        let pos = pos.min(text.len());
        if pos >= seen_pos {
            seen_line += b[seen_pos..pos].iter().filter(|&&c| c == b'\n').count();
            seen_pos = pos;
            seen_line
        } else {
            line_of(text, pos)
        }
    };
    if i < b.len() && b[i] == b']' {
        return Ok(rows);
    }
    loop {
        if i >= b.len() {
            return Err(bad(i, "invalid JSON: the top-level array is not closed"));
        }
        let mut stream = serde_json::Deserializer::from_str(&text[i..]).into_iter::<Value>();
        let value = match stream.next() {
            Some(Ok(v)) => v,
            Some(Err(e)) => {
                let line = line_at(i) + e.line() - 1;
                return Err(file_err(
                    &format!("{display}:{line}"),
                    format!("invalid JSON in row {}: {}", rows.len() + 1, json_msg(&e)),
                ));
            }
            None => return Err(bad(i, "invalid JSON: the top-level array is not closed")),
        };
        let n = rows.len() + 1;
        let line = line_at(i);
        let size = stream.byte_offset();
        rows.push(RawRow {
            row: RowRef {
                file: display.into(),
                line: n,
            },
            loc: format!("{display}: row {n} (line {line})"),
            value: if size > MAX_ROW_BYTES {
                Err(too_long("the row", size))
            } else {
                Ok(value)
            },
        });
        i = skip_ws(b, i + stream.byte_offset());
        match b.get(i) {
            Some(b',') => i = skip_ws(b, i + 1),
            Some(b']') => {
                let end = skip_ws(b, i + 1);
                if end < b.len() {
                    return Err(bad(end, "invalid JSON: trailing characters after the top-level array"));
                }
                return Ok(rows);
            }
            _ => return Err(bad(i, "invalid JSON: expected `,` or `]` after an array element")),
        }
    }
}

/// Parquet: each row becomes a JSON object (strings, numbers, lists, structs, maps).
pub fn read_parquet(path: &Path, display: &str) -> Result<Vec<RawRow>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};

    let file = std::fs::File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::MissingFile { path: path.into() }
        } else {
            Error::io(path, e)
        }
    })?;
    let reader = SerializedFileReader::new(file).map_err(|e| file_err(display, format!("cannot read Parquet: {e}")))?;
    let iter = reader
        .get_row_iter(None)
        .map_err(|e| file_err(display, format!("cannot read Parquet: {e}")))?;
    let mut rows = Vec::new();
    for (i, row) in iter.enumerate() {
        let n = i + 1;
        let row = row.map_err(|e| file_err(display, format!("row {n}: cannot read Parquet: {e}")))?;
        let value = parquet_row(&row);
        rows.push(RawRow {
            row: RowRef {
                file: display.into(),
                line: n,
            },
            loc: format!("{display}: row {n}"),
            value,
        });
    }
    Ok(rows)
}

fn parquet_row(row: &parquet::record::Row) -> std::result::Result<Value, String> {
    let mut map = serde_json::Map::new();
    for (name, field) in row.get_column_iter() {
        let v = parquet_field(field).map_err(|msg| format!("column `{name}`: {msg}"))?;
        map.insert(name.clone(), v);
    }
    Ok(Value::Object(map))
}

fn parquet_field(field: &parquet::record::Field) -> std::result::Result<Value, String> {
    use parquet::record::Field as F;
    Ok(match field {
        F::Null => Value::Null,
        F::Bool(b) => Value::Bool(*b),
        F::Byte(n) => (*n).into(),
        F::Short(n) => (*n).into(),
        F::Int(n) => (*n).into(),
        F::Long(n) => (*n).into(),
        F::UByte(n) => (*n).into(),
        F::UShort(n) => (*n).into(),
        F::UInt(n) => (*n).into(),
        F::ULong(n) => (*n).into(),
        F::Float(x) => serde_json::Number::from_f64(f64::from(*x)).map_or(Value::Null, Value::Number),
        F::Double(x) => serde_json::Number::from_f64(*x).map_or(Value::Null, Value::Number),
        F::Str(s) => Value::String(s.clone()),
        F::Bytes(b) => match std::str::from_utf8(b.data()) {
            Ok(s) => Value::String(s.into()),
            Err(_) => return Err("binary data that is not UTF-8 text".into()),
        },
        F::Group(row) => parquet_row(row)?,
        F::ListInternal(list) => Value::Array(
            list.elements()
                .iter()
                .map(parquet_field)
                .collect::<std::result::Result<_, _>>()?,
        ),
        F::MapInternal(map) => {
            let mut out = serde_json::Map::new();
            for (k, v) in map.entries() {
                let key = match parquet_field(k)? {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                out.insert(key, parquet_field(v)?);
            }
            Value::Object(out)
        }
        other => Value::String(other.to_string()),
    })
}

// ---------------------------------------------------------------------------------------------
// Dataset specs
// ---------------------------------------------------------------------------------------------

/// A data file to read and the name it goes by in messages.
#[derive(Debug, Clone, PartialEq)]
pub struct DataFile {
    pub path: PathBuf,
    pub display: String,
}

/// A hub dataset id with an optional subset: `org/name[:subset]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSpec {
    pub id: String,
    pub subset: Option<String>,
}

impl HubSpec {
    pub fn parse(spec: &str) -> Option<HubSpec> {
        let (id, subset) = match spec.split_once(':') {
            Some((id, sub)) if !sub.is_empty() && !sub.contains(['/', '\\']) => (id, Some(sub.to_string())),
            Some(_) => return None,
            None => (spec, None),
        };
        crate::hub::looks_like_hub_id(id).then(|| HubSpec { id: id.into(), subset })
    }
}

/// The files a dataset spec names: a local file, the data files of a local folder, or the data
/// files of a hub dataset.
pub fn resolve_spec(spec: &str, revision: Option<&str>) -> Result<Vec<DataFile>> {
    let path = Path::new(spec);
    if path.is_file() {
        return Ok(vec![DataFile {
            path: path.into(),
            display: spec.into(),
        }]);
    }
    if path.is_dir() {
        let files = list_files(path).map_err(|e| Error::io(path, e))?;
        let picked = pick_data_files(&files, None).map_err(|msg| file_err(spec, msg))?;
        return Ok(picked
            .into_iter()
            .map(|rel| DataFile {
                path: path.join(&rel),
                display: path.join(&rel).display().to_string(),
            })
            .collect());
    }
    if FileKind::of(path).is_some() || path.exists() {
        return Err(Error::NotFound { path: path.into() });
    }
    match HubSpec::parse(spec) {
        Some(hs) => match swift_dataset(&hs.id) {
            Some(SwiftDataset { hf: Some(hf), .. }) => {
                let mapped = HubSpec {
                    id: (*hf).to_string(),
                    subset: hs.subset.clone(),
                };
                resolve_hub_dataset(&mapped, revision)
            }
            Some(SwiftDataset { hf: None, source, .. }) => Err(hub_err(
                &hs.id,
                format!(
                    "is ms-swift's name for the {source} dataset, which is not on the Hugging Face hub; \
                     download it and pass its files with --dataset"
                ),
            )),
            None => resolve_hub_dataset(&hs, revision).map_err(|e| match e {
                Error::HubDataset { id, msg } if !id.contains('/') => Error::HubDataset {
                    msg: format!(
                        "{msg}. A name without an organisation may be an ms-swift dataset name: lorafold \
                         reads local files and Hugging Face ids (org/name[:subset])"
                    ),
                    id,
                },
                other => other,
            }),
        },
        None => Err(Error::NotFound { path: path.into() }),
    }
}

/// A preference dataset of ms-swift's registry (`--dataset hh-rlhf`), and its Hugging Face id
/// when it has one.
struct SwiftDataset {
    name: &'static str,
    hf: Option<&'static str>,
    /// Where the data lives, for the message when it is not on the Hugging Face hub.
    source: &'static str,
}

const SWIFT_DATASETS: [SwiftDataset; 5] = [
    SwiftDataset {
        name: "hh-rlhf",
        hf: Some("Anthropic/hh-rlhf"),
        source: "Anthropic/hh-rlhf",
    },
    SwiftDataset {
        name: "stack-exchange-paired",
        hf: Some("lvwerra/stack-exchange-paired"),
        source: "lvwerra/stack-exchange-paired",
    },
    SwiftDataset {
        name: "orpo-dpo-mix-40k",
        hf: Some("mlabonne/orpo-dpo-mix-40k"),
        source: "mlabonne/orpo-dpo-mix-40k",
    },
    SwiftDataset {
        name: "hh-rlhf-cn",
        hf: None,
        source: "ModelScope AI-ModelScope/hh_rlhf_cn",
    },
    SwiftDataset {
        name: "shareai-llama3-dpo-zh-en-emoji",
        hf: None,
        source: "shareAI/DPO-zh-en-emoji (question, answer_zh, answer_en columns, which ms-swift renames)",
    },
];

fn swift_dataset(name: &str) -> Option<&'static SwiftDataset> {
    SWIFT_DATASETS.iter().find(|d| d.name == name)
}

/// Resolve a hub dataset through the environment's hub cache (HF_HUB_CACHE / HF_HOME), offline
/// when HF_HUB_OFFLINE is set.
pub fn resolve_hub_dataset(spec: &HubSpec, revision: Option<&str>) -> Result<Vec<DataFile>> {
    let cache = crate::hub::hub_cache();
    resolve_hub_dataset_in(cache.path(), spec, revision, crate::util::env_flag("HF_HUB_OFFLINE"))
}

fn hub_err(id: &str, msg: impl std::fmt::Display) -> Error {
    Error::HubDataset {
        id: id.into(),
        msg: msg.to_string(),
    }
}

/// Resolve a hub dataset with the cache root given explicitly. Offline, the snapshot folder of
/// the revision (`datasets--org--name/snapshots/<commit>`, found through `refs/<revision>`, or
/// named directly by a commit) is listed; online, the repository's file list comes from the hub
/// API and the chosen files are downloaded into the cache (falling back to the cached snapshot
/// when the API cannot be reached).
pub fn resolve_hub_dataset_in(
    cache_root: &Path,
    spec: &HubSpec,
    revision: Option<&str>,
    offline: bool,
) -> Result<Vec<DataFile>> {
    let rev = revision.unwrap_or("main");
    let display = |rel: &str| format!("hf://datasets/{}/{rel}", spec.id);
    let pick = |files: &[String]| pick_data_files(files, spec.subset.as_deref()).map_err(|m| hub_err(&spec.id, m));

    let from_cache = || -> Result<Vec<DataFile>> {
        let snap = cached_snapshot(cache_root, &spec.id, rev).ok_or_else(|| {
            hub_err(
                &spec.id,
                format!(
                    "revision {rev} is not in the local hub cache {}{}",
                    cache_root.display(),
                    if offline { " and HF_HUB_OFFLINE is set" } else { "" }
                ),
            )
        })?;
        let files = list_files(&snap).map_err(|e| Error::io(&snap, e))?;
        Ok(pick(&files)?
            .into_iter()
            .map(|rel| DataFile {
                path: snap.join(&rel),
                display: display(&rel),
            })
            .collect())
    };
    if offline {
        return from_cache();
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_cache_dir(cache_root.to_path_buf())
        .build()
        .map_err(|e| hub_err(&spec.id, format!("cannot start the hub client: {e}")))?;
    let repo = api.repo(Repo::with_revision(spec.id.clone(), RepoType::Dataset, rev.to_string()));
    let info = match repo.info() {
        Ok(info) => info,
        Err(e) => {
            return from_cache().map_err(|cache_err| {
                hub_err(
                    &spec.id,
                    format!("cannot list the repository (revision {rev}): {e}; and {cache_err}"),
                )
            })
        }
    };
    let files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    pick(&files)?
        .into_iter()
        .map(|rel| {
            let path = repo
                .get(&rel)
                .map_err(|e| hub_err(&spec.id, format!("downloading {rel} (revision {rev}): {e}")))?;
            Ok(DataFile {
                path,
                display: display(&rel),
            })
        })
        .collect()
}

/// The snapshot folder of `id` at `rev` in the cache, if present.
pub fn cached_snapshot(cache_root: &Path, id: &str, rev: &str) -> Option<PathBuf> {
    let repo = Repo::with_revision(id.into(), RepoType::Dataset, rev.into());
    let base = cache_root.join(repo.folder_name());
    let snapshots = base.join("snapshots");
    let direct = snapshots.join(rev);
    if direct.is_dir() {
        return Some(direct);
    }
    let commit = std::fs::read_to_string(base.join("refs").join(rev)).ok()?;
    let dir = snapshots.join(commit.trim());
    dir.is_dir().then_some(dir)
}

/// Every file under `dir`, as `/`-separated relative paths, sorted; hidden entries skipped.
pub fn list_files(dir: &Path) -> std::io::Result<Vec<String>> {
    fn walk(root: &Path, rel: &str, out: &mut Vec<String>, depth: usize) -> std::io::Result<()> {
        if depth > 16 {
            return Ok(());
        }
        let here = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(rel)
        };
        for entry in std::fs::read_dir(&here)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let child = if rel.is_empty() { name } else { format!("{rel}/{name}") };
            // Follow symlinks (hub snapshots link into blobs/).
            let meta = std::fs::metadata(entry.path())?;
            if meta.is_dir() {
                walk(root, &child, out, depth + 1)?;
            } else if meta.is_file() {
                out.push(child);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, "", &mut out, 0)?;
    out.sort();
    Ok(out)
}

/// Metadata files that share the data extensions.
const NOT_DATA: [&str; 5] = [
    "dataset_info.json",
    "dataset_infos.json",
    "dataset_dict.json",
    "state.json",
    "config.json",
];

fn is_data_file(rel: &str) -> bool {
    let name = rel.rsplit('/').next().unwrap_or(rel);
    FileKind::of(Path::new(name)).is_some() && !NOT_DATA.contains(&name) && !rel.split('/').any(|c| c.starts_with('.'))
}

fn list_some(files: &[&String]) -> String {
    const N: usize = 20;
    let mut s = files.iter().take(N).map(|f| f.as_str()).collect::<Vec<_>>().join(", ");
    if files.len() > N {
        s.push_str(&format!(", ... ({} in all)", files.len()));
    }
    s
}

/// Choose the data files of a repository listing: those under the subset folder when a subset is
/// given (else those whose path contains the subset name), then those with `train` in the path
/// when there are any. Without a subset, files from several top-level folders (several
/// configurations) are refused: the user must name one.
pub fn pick_data_files(files: &[String], subset: Option<&str>) -> std::result::Result<Vec<String>, String> {
    let data: Vec<&String> = files.iter().filter(|f| is_data_file(f)).collect();
    if data.is_empty() {
        return Err("no .parquet, .jsonl or .json data files found".into());
    }
    let candidates: Vec<&String> = match subset {
        Some(sub) => {
            let folder = format!("{sub}/");
            let inner = format!("/{sub}/");
            let under: Vec<&String> = data
                .iter()
                .copied()
                .filter(|f| f.starts_with(&folder) || f.contains(&inner))
                .collect();
            let under = if under.is_empty() {
                data.iter().copied().filter(|f| f.contains(sub)).collect()
            } else {
                under
            };
            if under.is_empty() {
                return Err(format!(
                    "no data file for subset `{sub}` (data files: {})",
                    list_some(&data)
                ));
            }
            under
        }
        None => data.clone(),
    };
    let train: Vec<&String> = candidates
        .iter()
        .copied()
        .filter(|f| f.to_ascii_lowercase().contains("train"))
        .collect();
    let chosen = if train.is_empty() { candidates } else { train };
    if subset.is_none() {
        let mut tops: Vec<&str> = chosen
            .iter()
            .filter_map(|f| f.split_once('/').map(|(top, _)| top))
            .collect();
        tops.sort();
        tops.dedup();
        if tops.len() > 1 {
            return Err(format!(
                "holds several subsets ({}); name one as `org/name:subset`",
                tops.join(", ")
            ));
        }
    }
    Ok(chosen.into_iter().cloned().collect())
}
