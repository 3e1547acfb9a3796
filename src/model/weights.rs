//! Memory-mapped safetensors checkpoints (single file or sharded), with errors that name the file
//! and tensor at fault.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::error::{read_json, Error, Result};

pub struct WeightSource {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    /// Per tensor name: its file (an index into `files` and `readers`) and the byte of that file
    /// where its data starts.
    routing: HashMap<String, (usize, u64)>,
    /// The open files, which tensors are read from into memory lorafold owns, so that the mapped
    /// pages never count in the process's resident memory next to the copy.
    readers: Vec<std::fs::File>,
}

impl WeightSource {
    /// Open every file and index the tensor names. A header that does not parse is an error
    /// naming the file.
    pub fn open(paths: &[PathBuf]) -> Result<WeightSource> {
        let mut files = Vec::with_capacity(paths.len());
        let mut routing = HashMap::new();
        let mut readers = Vec::with_capacity(paths.len());
        for (i, p) in paths.iter().enumerate() {
            if !p.exists() {
                return Err(Error::MissingFile { path: p.clone() });
            }
            for (name, at) in check_header(p)? {
                routing.insert(name, (i, at));
            }
            readers.push(std::fs::File::open(p).map_err(|e| Error::io(p, e))?);
            // SAFETY: the file is mapped read-only; lorafold never writes to a loaded checkpoint.
            let st = unsafe { MmapedSafetensors::new(p) }.map_err(|e| Error::Safetensors {
                path: p.clone(),
                msg: e.to_string(),
            })?;
            files.push((p.clone(), st));
        }
        Ok(WeightSource {
            files,
            routing,
            readers,
        })
    }

    /// Weight files of a model folder: `model.safetensors.index.json` (sharded) or
    /// `model.safetensors`. Pickle checkpoints are refused with a hint.
    pub fn files_in(dir: &Path) -> Result<Vec<PathBuf>> {
        let index = dir.join("model.safetensors.index.json");
        if index.exists() {
            return shard_files(&index);
        }
        let single = dir.join("model.safetensors");
        if single.exists() {
            return Ok(vec![single]);
        }
        if dir.join("pytorch_model.bin").exists() || dir.join("pytorch_model.bin.index.json").exists() {
            return Err(Error::PickleOnly { dir: dir.to_path_buf() });
        }
        Err(Error::MissingFile { path: single })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.routing.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.routing.keys()
    }

    fn locate(&self, name: &str) -> Result<&(PathBuf, MmapedSafetensors)> {
        match self.routing.get(name) {
            Some(&(i, _)) => Ok(&self.files[i]),
            None => Err(Error::MissingTensor {
                path: self
                    .files
                    .first()
                    .map(|(p, _)| p.parent().unwrap_or(p).to_path_buf())
                    .unwrap_or_default(),
                name: name.into(),
            }),
        }
    }

    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        let (path, st) = self.locate(name)?;
        let view = st.get(name).map_err(|e| Error::Safetensors {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        Ok(view.shape().to_vec())
    }

    /// Load `name`, check its shape, convert to `dtype` on `device`.
    pub fn load(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let (path, st) = self.locate(name)?;
        let got = self.shape(name)?;
        if got != shape {
            return Err(Error::ShapeMismatch {
                path: path.clone(),
                name: name.into(),
                expected: shape.to_vec(),
                got,
            });
        }
        if let Some(t) = self.read_owned(name, shape, device)? {
            return Ok(t.to_dtype(dtype)?);
        }
        let t = st.load(name, device).map_err(|e| Error::Safetensors {
            path: path.clone(),
            msg: format!("tensor {name:?}: {e}"),
        })?;
        Ok(t.to_dtype(dtype)?)
    }

    /// `name` read from its file into a vector of its own (f32, bf16, f16 on the CPU of a
    /// little-endian Unix machine); `None` elsewhere, where the mapped file is used.
    fn read_owned(&self, name: &str, shape: &[usize], device: &Device) -> Result<Option<Tensor>> {
        #[cfg(all(unix, target_endian = "little"))]
        {
            let Some(&(i, at)) = self.routing.get(name) else {
                return Ok(None);
            };
            if !device.is_cpu() {
                return Ok(None);
            }
            let file = &self.readers[i];
            let n: usize = shape.iter().product();
            let path = &self.files[i].0;
            let io = |e| Error::io(path, e);
            let t = match self.stored_dtype(name)? {
                DType::F32 => Tensor::from_vec(read_vec::<f32>(file, at, n).map_err(io)?, shape, device)?,
                DType::BF16 => Tensor::from_vec(read_vec::<half::bf16>(file, at, n).map_err(io)?, shape, device)?,
                DType::F16 => Tensor::from_vec(read_vec::<half::f16>(file, at, n).map_err(io)?, shape, device)?,
                _ => return Ok(None),
            };
            Ok(Some(t))
        }
        #[cfg(not(all(unix, target_endian = "little")))]
        {
            let _ = (name, shape, device);
            Ok(None)
        }
    }

    /// The dtype a tensor is stored in.
    pub fn stored_dtype(&self, name: &str) -> Result<DType> {
        let (path, st) = self.locate(name)?;
        let view = st.get(name).map_err(|e| Error::Safetensors {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        view.dtype()
            .try_into()
            .map_err(|e: candle_core::Error| Error::Safetensors {
                path: path.clone(),
                msg: format!("tensor {name:?}: {e}"),
            })
    }
}

/// Marks the element types [`read_vec`] may fill from raw bytes.
#[cfg(all(unix, target_endian = "little"))]
trait PlainNumber: Copy + Default {}
#[cfg(all(unix, target_endian = "little"))]
impl PlainNumber for f32 {}
#[cfg(all(unix, target_endian = "little"))]
impl PlainNumber for half::bf16 {}
#[cfg(all(unix, target_endian = "little"))]
impl PlainNumber for half::f16 {}

/// `n` little-endian values of `T` read from `file` at byte `at`.
#[cfg(all(unix, target_endian = "little"))]
fn read_vec<T: PlainNumber>(file: &std::fs::File, at: u64, n: usize) -> std::io::Result<Vec<T>> {
    use std::os::unix::fs::FileExt;
    let mut v = vec![T::default(); n];
    // SAFETY: T is f32, bf16 or f16 (PlainNumber), for which every bit pattern is a valid value,
    // and the byte slice covers exactly the vector's initialised elements.
    let bytes =
        unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v.as_slice())) };
    file.read_exact_at(bytes, at)?;
    Ok(v)
}

/// The unique shard files named by an index, in order of first appearance.
fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: HashMap<String, String>,
    }
    let idx: Index = read_json(index)?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut names: Vec<&String> = idx.weight_map.values().collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        return Err(Error::Config {
            path: index.into(),
            key: "weight_map".into(),
            msg: "is empty".into(),
        });
    }
    names
        .into_iter()
        .map(|n| {
            if n.contains("..") || Path::new(n).is_absolute() {
                return Err(Error::Config {
                    path: index.into(),
                    key: "weight_map".into(),
                    msg: format!("shard name {n:?} leaves the model folder"),
                });
            }
            Ok(dir.join(n))
        })
        .collect()
}

/// Each tensor's first byte in its file, by name.
type Starts = HashMap<String, u64>;

/// Largest safetensors header lorafold reads (the safetensors format's own limit).
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// Bits per element of a safetensors dtype name; `None` for names the format does not define.
fn dtype_bits(name: &str) -> Option<usize> {
    Some(match name {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" | "F8_E4M3FNUZ" | "F8_E5M2FNUZ" => 8,
        "F4" => 4,
        "F6_E2M3" | "F6_E3M2" => 6,
        "I16" | "U16" | "F16" | "BF16" => 16,
        "I32" | "U32" | "F32" => 32,
        "I64" | "U64" | "F64" | "C64" => 64,
        _ => return None,
    })
}

/// Validate a safetensors file before mapping it, so that every problem is reported with the
/// file and the tensor at fault: the declared header length must fit in the file; the header must
/// be a JSON object of `{dtype, shape, data_offsets}` entries with known dtypes; each tensor's
/// offsets must lie inside the data section and hold exactly `shape × dtype` bytes; tensors must
/// not overlap, and together they must cover the data section (as the format requires).
///
/// Returns the byte of the file where each tensor's data starts.
fn check_header(path: &Path) -> Result<Starts> {
    let bad = |msg: String| Error::Safetensors { path: path.into(), msg };
    let (entries, data_start, data_len) = read_header(path)?;
    // (start, end, name) of every tensor.
    let mut spans: Vec<(u64, u64, &str)> = Vec::with_capacity(entries.len());
    for (name, entry) in &entries {
        if name == "__metadata__" {
            let ok = entry.as_object().is_some_and(|m| m.values().all(|v| v.is_string()));
            if !ok {
                return Err(bad("`__metadata__` must map strings to strings".into()));
            }
            continue;
        }
        let (start, end) = tensor_span(entry, data_len).map_err(|msg| bad(format!("tensor {name:?}: {msg}")))?;
        spans.push((start, end, name.as_str()));
    }
    let starts = spans.iter().map(|&(s, _, n)| (n.to_string(), data_start + s)).collect();
    check_packed(spans, data_len).map_err(bad)?;
    Ok(starts)
}

/// The header's entries, the byte where the data section after it starts, and its length.
fn read_header(path: &Path) -> Result<(serde_json::Map<String, serde_json::Value>, u64, u64)> {
    use std::io::Read;
    let bad = |msg: String| Error::Safetensors { path: path.into(), msg };
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    if len < 8 {
        return Err(bad(format!("file is {len} bytes, too short for a header")));
    }
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|e| Error::io(path, e))?;
    let hlen = u64::from_le_bytes(n);
    if hlen > len - 8 {
        return Err(bad(format!(
            "header length {hlen} is larger than the file ({len} bytes): truncated or corrupt"
        )));
    }
    if hlen > MAX_HEADER_BYTES {
        return Err(bad(format!(
            "header length {hlen} is over the {} MB limit of the format: corrupt",
            MAX_HEADER_BYTES >> 20
        )));
    }
    let mut header = vec![0u8; hlen as usize];
    f.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
    let text = std::str::from_utf8(&header)
        .map_err(|e| bad(format!("the header is not UTF-8 text (byte {})", e.valid_up_to() + 9)))?;
    let value: serde_json::Value = serde_json::from_str(text.trim_end_matches(' '))
        .map_err(|e| bad(format!("the header is not valid JSON: {e}")))?;
    let serde_json::Value::Object(entries) = value else {
        return Err(bad(format!(
            "the header must be a JSON object of tensors, got {}",
            crate::error::json_kind(&value)
        )));
    };
    Ok((entries, 8 + hlen, len - 8 - hlen))
}

/// The byte span [start, end) of one tensor entry in a data section of `data_len` bytes, checked
/// against its dtype and shape; the error is the message about that tensor.
fn tensor_span(entry: &serde_json::Value, data_len: u64) -> std::result::Result<(u64, u64), String> {
    let Some(obj) = entry.as_object() else {
        return Err(format!(
            "expected an object with dtype, shape and data_offsets, got {}",
            crate::error::json_kind(entry)
        ));
    };
    let dtype = match obj.get("dtype") {
        Some(serde_json::Value::String(d)) => d.as_str(),
        Some(other) => return Err(format!("dtype must be a string, got {other}")),
        None => return Err("has no dtype".into()),
    };
    let bits = dtype_bits(dtype).ok_or_else(|| format!("unknown dtype {dtype:?}"))?;
    let shape: Vec<u64> = match obj.get("shape").and_then(|v| v.as_array()) {
        Some(dims) => dims
            .iter()
            .map(|d| d.as_u64())
            .collect::<Option<_>>()
            .ok_or_else(|| "shape must be a list of non-negative integers".to_string())?,
        None => return Err("has no shape list".into()),
    };
    let offsets: Vec<u64> = obj
        .get("data_offsets")
        .and_then(|v| v.as_array())
        .and_then(|a| a.iter().map(|d| d.as_u64()).collect::<Option<Vec<_>>>())
        .filter(|a| a.len() == 2)
        .ok_or_else(|| "data_offsets must be a list of two non-negative integers".to_string())?;
    let (start, end) = (offsets[0], offsets[1]);
    if start > end {
        return Err(format!("data_offsets [{start}, {end}] end before they start"));
    }
    if end > data_len {
        return Err(format!(
            "data_offsets [{start}, {end}] run past the end of the file (the data section holds \
             {data_len} bytes): truncated or corrupt"
        ));
    }
    let need = shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .and_then(|n| n.checked_mul(bits as u64))
        .ok_or_else(|| format!("shape {shape:?} is too large"))?;
    if need % 8 != 0 {
        return Err(format!("shape {shape:?} of {dtype} does not fill whole bytes"));
    }
    if end - start != need / 8 {
        return Err(format!(
            "{dtype} {shape:?} needs {} bytes but data_offsets [{start}, {end}] hold {}",
            need / 8,
            end - start
        ));
    }
    Ok((start, end))
}

/// The tensors' spans neither overlap nor leave gaps, and cover the whole data section.
fn check_packed(mut spans: Vec<(u64, u64, &str)>, data_len: u64) -> std::result::Result<(), String> {
    spans.sort_unstable();
    let mut covered = 0u64;
    let mut prev: Option<(u64, u64, &str)> = None;
    for &(start, end, name) in &spans {
        if let Some((ps, pe, pname)) = prev {
            if start < pe {
                return Err(format!(
                    "tensor {name:?} (data_offsets [{start}, {end}]) overlaps tensor {pname:?} \
                     (data_offsets [{ps}, {pe}])"
                ));
            }
        }
        if start != covered {
            return Err(format!(
                "tensor {name:?}: data_offsets [{start}, {end}] leave bytes {covered}..{start} of the data \
                 section unused (the format requires tensors to be packed)"
            ));
        }
        covered = end;
        prev = Some((start, end, name));
    }
    if covered != data_len {
        return Err(format!(
            "the tensors cover {covered} of the {data_len} bytes of the data section: {} trailing bytes \
             belong to no tensor",
            data_len - covered
        ));
    }
    Ok(())
}
