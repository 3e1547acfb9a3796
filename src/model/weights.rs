//! Memory-mapped safetensors checkpoints (single file or sharded), with errors that name the file
//! and tensor at fault.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::error::{read_json, Error, Result};

pub struct WeightSource {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    routing: HashMap<String, usize>,
}

impl WeightSource {
    /// Open every file and index the tensor names. A header that does not parse is an error
    /// naming the file.
    pub fn open(paths: &[PathBuf]) -> Result<WeightSource> {
        let mut files = Vec::with_capacity(paths.len());
        let mut routing = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            if !p.exists() {
                return Err(Error::MissingFile { path: p.clone() });
            }
            check_header(p)?;
            // SAFETY: the file is mapped read-only; lorafold never writes to a loaded checkpoint.
            let st = unsafe { MmapedSafetensors::new(p) }.map_err(|e| Error::Safetensors {
                path: p.clone(),
                msg: e.to_string(),
            })?;
            for (name, _) in st.tensors() {
                routing.insert(name, i);
            }
            files.push((p.clone(), st));
        }
        Ok(WeightSource { files, routing })
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
            return Err(Error::Msg(format!(
                "{}: only pickle weights (pytorch_model.bin) found; lorafold never loads pickle files. \
                 Convert them to safetensors first, e.g. in Python: \
                 AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)",
                dir.display()
            )));
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
            Some(&i) => Ok(&self.files[i]),
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
        let t = st.load(name, device).map_err(|e| Error::Safetensors {
            path: path.clone(),
            msg: format!("tensor {name:?}: {e}"),
        })?;
        Ok(t.to_dtype(dtype)?)
    }

    /// The dtype a tensor is stored in.
    pub fn stored_dtype(&self, name: &str) -> Result<DType> {
        let (path, st) = self.locate(name)?;
        let view = st.get(name).map_err(|e| Error::Safetensors {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        view.dtype().try_into().map_err(|e: candle_core::Error| Error::Safetensors {
            path: path.clone(),
            msg: format!("tensor {name:?}: {e}"),
        })
    }
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

/// Validate the safetensors header before mapping: the declared header length must fit in the
/// file and every tensor's offsets must lie inside the data section.
fn check_header(path: &Path) -> Result<()> {
    use std::io::Read;
    let bad = |msg: String| Error::Safetensors {
        path: path.into(),
        msg,
    };
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
    Ok(())
}
