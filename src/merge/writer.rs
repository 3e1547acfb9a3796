//! Streaming safetensors output: a plan of shards computed from tensor sizes alone, then each shard
//! written tensor by tensor (header first, then each tensor's bytes as it is produced), so only
//! one tensor is in memory at a time. Sharded output gets `model.safetensors.index.json` in the
//! layout transformers writes.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use safetensors::tensor::Dtype;
use serde_json::{json, Map, Value};

use crate::error::{Error, Result};
use crate::lora::io::write_atomic;

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// One tensor of the output, as the header describes it.
#[derive(Debug, Clone)]
pub struct OutTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl OutTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn nbytes(&self) -> usize {
        self.numel() * self.dtype.bitsize() / 8
    }
}

/// Parse a shard size the way transformers does: `5GB` (10⁹), `5GiB` (2³⁰), `200MB`, `300KB`,
/// `KiB`/`MiB`, a lower-case `b` meaning bits (`5Gb`), or a plain number of bytes. Decimals are
/// accepted (`1.5GB`).
pub fn parse_size(text: &str) -> Result<u64> {
    let bad = || Error::Setting {
        key: "--max_shard_size".into(),
        msg: format!("{text:?}: expected a number of bytes or a size such as 5GB, 500MB, 2GiB"),
    };
    let s = text.trim();
    let upper = s.to_ascii_uppercase();
    let units: [(&str, f64); 8] = [
        ("GIB", (1u64 << 30) as f64),
        ("MIB", (1u64 << 20) as f64),
        ("KIB", 1024.0),
        ("GB", 1e9),
        ("MB", 1e6),
        ("KB", 1e3),
        ("B", 1.0),
        ("", 1.0),
    ];
    for (unit, mult) in units {
        if let Some(num) = upper.strip_suffix(unit) {
            let num = num.trim();
            if num.is_empty() {
                return Err(bad());
            }
            let v: f64 = num.parse().map_err(|_| bad())?;
            let bits = unit.len() == 2 && unit != "B" && s.ends_with('b');
            let bytes = v * mult / if bits { 8.0 } else { 1.0 };
            if !(bytes.is_finite() && bytes >= 1.0) {
                return Err(bad());
            }
            return Ok(bytes as u64);
        }
    }
    Err(bad())
}

/// Compare names with runs of digits compared as numbers (`layers.2` before `layers.10`).
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut x, mut y) = (a.as_bytes(), b.as_bytes());
    loop {
        match (x.first(), y.first()) {
            (None, None) => return Ordering::Equal,
            (None, _) => return Ordering::Less,
            (_, None) => return Ordering::Greater,
            (Some(cx), Some(cy)) if cx.is_ascii_digit() && cy.is_ascii_digit() => {
                let nx = x.iter().take_while(|c| c.is_ascii_digit()).count();
                let ny = y.iter().take_while(|c| c.is_ascii_digit()).count();
                let (dx, dy) = (&x[..nx], &y[..ny]);
                let tx = dx.iter().skip_while(|&&c| c == b'0').count();
                let ty = dy.iter().skip_while(|&&c| c == b'0').count();
                let ord = tx
                    .cmp(&ty)
                    .then_with(|| dx[nx - tx..].cmp(&dy[ny - ty..]))
                    .then(nx.cmp(&ny));
                if ord != Ordering::Equal {
                    return ord;
                }
                x = &x[nx..];
                y = &y[ny..];
            }
            (Some(cx), Some(cy)) => {
                if cx != cy {
                    return cx.cmp(cy);
                }
                x = &x[1..];
                y = &y[1..];
            }
        }
    }
}

/// Split tensors (in the given order) into shards of at most `max_bytes`, as transformers does: a
/// tensor that does not fit starts a new shard; a tensor larger than the limit gets its own.
pub fn plan_shards(tensors: &[OutTensor], max_bytes: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut size = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        let n = t.nbytes() as u64;
        if !current.is_empty() && size + n > max_bytes {
            shards.push(std::mem::take(&mut current));
            size = 0;
        }
        current.push(i);
        size += n;
    }
    if !current.is_empty() || shards.is_empty() {
        shards.push(current);
    }
    shards
}

/// File names of a plan: `model.safetensors`, or `model-00001-of-0000N.safetensors`.
pub fn shard_names(count: usize) -> Vec<String> {
    if count <= 1 {
        return vec![SINGLE_FILE.to_string()];
    }
    (1..=count)
        .map(|i| format!("model-{i:05}-of-{count:05}.safetensors"))
        .collect()
}

/// Write one safetensors file. Tensors are laid out by decreasing dtype alignment, then by name,
/// as the safetensors library does; `produce` is called once per tensor, in that order, and must
/// return exactly `nbytes` bytes.
pub fn write_file<'a>(
    path: &Path,
    tensors: &[&OutTensor],
    mut produce: impl FnMut(&OutTensor) -> Result<Cow<'a, [u8]>>,
) -> Result<()> {
    let mut order: Vec<&OutTensor> = tensors.to_vec();
    order.sort_by(|a, b| b.dtype.cmp(&a.dtype).then_with(|| natural_cmp(&a.name, &b.name)));
    let mut header = Map::new();
    header.insert("__metadata__".into(), json!({ "format": "pt" }));
    let mut offset = 0usize;
    for t in &order {
        let n = t.nbytes();
        header.insert(
            t.name.clone(),
            json!({ "dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + n] }),
        );
        offset += n;
    }
    let mut header = serde_json::to_vec(&Value::Object(header)).map_err(|e| Error::Msg(e.to_string()))?;
    header.resize(header.len().next_multiple_of(8), b' ');

    let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let io = |e| Error::io(path, e);
    w.write_all(&(header.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(&header).map_err(io)?;
    for t in order {
        let bytes = produce(t)?;
        // internal invariant: `produce` encodes the dtype and shape it announced
        if bytes.len() != t.nbytes() {
            return Err(Error::Msg(format!(
                "{}: tensor {:?} produced {} bytes, expected {}",
                path.display(),
                t.name,
                bytes.len(),
                t.nbytes()
            )));
        }
        w.write_all(&bytes).map_err(io)?;
    }
    w.flush().map_err(io)?;
    Ok(())
}

/// `model.safetensors.index.json` for a sharded output.
pub fn write_index(dir: &Path, tensors: &[OutTensor], shards: &[Vec<usize>], names: &[String]) -> Result<()> {
    let mut weight_map = BTreeMap::new();
    for (shard, file) in shards.iter().zip(names) {
        for &i in shard {
            weight_map.insert(tensors[i].name.clone(), file.clone());
        }
    }
    let total_size: usize = tensors.iter().map(OutTensor::nbytes).sum();
    let total_parameters: usize = tensors.iter().map(OutTensor::numel).sum();
    let index = json!({
        "metadata": { "total_parameters": total_parameters, "total_size": total_size },
        "weight_map": weight_map,
    });
    let text = serde_json::to_string_pretty(&index).map_err(|e| Error::Msg(e.to_string()))?;
    write_atomic(&dir.join(INDEX_FILE), format!("{text}\n").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("200MB").unwrap(), 200_000_000);
        assert_eq!(parse_size("300KB").unwrap(), 300_000);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_size("8Mb").unwrap(), 1_000_000);
        assert_eq!(parse_size("12345").unwrap(), 12345);
        for bad in ["", "GB", "five", "-1MB", "0"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn natural_order() {
        let mut v = vec!["layers.10.a", "layers.2.a", "layers.1.b", "embed", "layers.1.a"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(v, ["embed", "layers.1.a", "layers.1.b", "layers.2.a", "layers.10.a"]);
    }

    #[test]
    fn shard_plan_like_transformers() {
        let t = |n: usize| OutTensor {
            name: format!("t{n}"),
            dtype: Dtype::F32,
            shape: vec![n],
        };
        let ts = vec![t(10), t(10), t(30), t(5), t(1)];
        // 40-byte, 40-byte, 120-byte (own shard), 20+4-byte.
        assert_eq!(plan_shards(&ts, 100), vec![vec![0, 1], vec![2], vec![3, 4]]);
        assert_eq!(plan_shards(&ts, 10_000), vec![vec![0, 1, 2, 3, 4]]);
        assert_eq!(shard_names(1), ["model.safetensors"]);
        assert_eq!(shard_names(2)[1], "model-00002-of-00002.safetensors");
    }
}
