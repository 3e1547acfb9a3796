//! TensorBoard event files (`--report_to tensorboard`): the scalars of every logged window and
//! evaluation under transformers' tag names (`train/loss`, `train/rewards/margins`,
//! `eval/loss`, ...), in `<output_dir>/runs/`.
//!
//! The format is TFRecord: each record is its length (u64, little-endian), the masked CRC-32C
//! of those 8 bytes, the payload, and the masked CRC-32C of the payload. Each payload is an
//! `Event` protobuf: `wall_time` (field 1, double), `step` (2, int64), and either
//! `file_version` (3, string; the first record) or `summary` (5), a list of `Value`s with a
//! `tag` (1, string) and a `simple_value` (2, float). The few protobuf fields are encoded here
//! directly rather than through a protobuf crate and generated code.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::train::metrics::Record;

/// Appends events to one `events.out.tfevents.*` file.
pub struct EventWriter {
    file: std::fs::File,
    path: PathBuf,
}

impl EventWriter {
    /// A new event file in `dir` (created if needed), opened with the file-version event.
    pub fn create(dir: &Path) -> Result<EventWriter> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let host = std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        let name = format!(
            "events.out.tfevents.{}.{host}.{}.0",
            wall_time() as u64,
            std::process::id()
        );
        let path = dir.join(name);
        let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut w = EventWriter { file, path };
        let mut event = Vec::new();
        double_field(&mut event, 1, wall_time());
        bytes_field(&mut event, 3, b"brain.Event:2");
        w.write_record(&event)?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One event at `step` holding every (tag, value) of `scalars`.
    pub fn scalars(&mut self, step: usize, scalars: &[(String, f64)]) -> Result<()> {
        let mut summary = Vec::new();
        for (tag, v) in scalars {
            let mut value = Vec::new();
            bytes_field(&mut value, 1, tag.as_bytes());
            key(&mut value, 2, 5);
            value.extend_from_slice(&(*v as f32).to_le_bytes());
            bytes_field(&mut summary, 1, &value);
        }
        let mut event = Vec::new();
        double_field(&mut event, 1, wall_time());
        key(&mut event, 2, 0);
        varint(&mut event, step as u64);
        bytes_field(&mut event, 5, &summary);
        self.write_record(&event)
    }

    fn write_record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut rec = Vec::with_capacity(data.len() + 16);
        rec.extend_from_slice(&len);
        rec.extend_from_slice(&masked_crc(&len).to_le_bytes());
        rec.extend_from_slice(data);
        rec.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.file
            .write_all(&rec)
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }
}

/// A logged record under transformers' TensorBoard tags: `eval_x` → `eval/x`, any other `x` →
/// `train/x`.
pub fn tags(record: &Record) -> Vec<(String, f64)> {
    record
        .iter()
        .map(|(k, v)| match k.strip_prefix("eval_") {
            Some(rest) => (format!("eval/{rest}"), *v),
            None => (format!("train/{k}"), *v),
        })
        .collect()
}

/// One scalar read back from an event file.
#[derive(Debug, Clone, PartialEq)]
pub struct Scalar {
    pub step: i64,
    pub tag: String,
    pub value: f32,
}

/// Every scalar of the event file at `path`, checking each record's CRCs.
pub fn read_scalars(path: &Path) -> Result<Vec<Scalar>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |msg: String| Error::EventFile { path: path.into(), msg };
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let head = bytes
            .get(at..at + 12)
            .ok_or_else(|| bad(format!("truncated record at byte {at}")))?;
        let len_bytes: [u8; 8] = head[..8].try_into().map_err(|_| bad("short length".into()))?;
        if u32::from_le_bytes([head[8], head[9], head[10], head[11]]) != masked_crc(&len_bytes) {
            return Err(bad(format!("bad length CRC at byte {at}")));
        }
        let len = u64::from_le_bytes(len_bytes) as usize;
        let data = bytes
            .get(at + 12..at + 12 + len)
            .ok_or_else(|| bad(format!("truncated record at byte {at}")))?;
        let crc = bytes
            .get(at + 12 + len..at + 16 + len)
            .ok_or_else(|| bad(format!("truncated record at byte {at}")))?;
        if u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]) != masked_crc(data) {
            return Err(bad(format!("bad data CRC at byte {at}")));
        }
        parse_event(data, &mut out).map_err(bad)?;
        at += 16 + len;
    }
    Ok(out)
}

fn parse_event(data: &[u8], out: &mut Vec<Scalar>) -> std::result::Result<(), String> {
    let mut step = 0i64;
    let mut summaries = Vec::new();
    for (field, value) in fields(data)? {
        match (field, value) {
            (2, Field::Varint(v)) => step = v as i64,
            (5, Field::Bytes(b)) => summaries.push(b),
            _ => {}
        }
    }
    for summary in summaries {
        for (field, value) in fields(summary)? {
            let (1, Field::Bytes(v)) = (field, value) else { continue };
            let (mut tag, mut value) = (String::new(), f32::NAN);
            for (f, x) in fields(v)? {
                match (f, x) {
                    (1, Field::Bytes(t)) => tag = String::from_utf8_lossy(t).into_owned(),
                    (2, Field::Fixed32(bits)) => value = f32::from_bits(bits),
                    _ => {}
                }
            }
            out.push(Scalar { step, tag, value });
        }
    }
    Ok(())
}

enum Field<'a> {
    Varint(u64),
    Fixed64,
    Fixed32(u32),
    Bytes(&'a [u8]),
}

/// The (field number, value) pairs of a protobuf message.
fn fields(mut data: &[u8]) -> std::result::Result<Vec<(u64, Field<'_>)>, String> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let k = read_varint(&mut data)?;
        let value = match k & 7 {
            0 => Field::Varint(read_varint(&mut data)?),
            1 => {
                take(&mut data, 8)?;
                Field::Fixed64
            }
            2 => {
                let n = read_varint(&mut data)? as usize;
                Field::Bytes(take(&mut data, n)?)
            }
            5 => Field::Fixed32(u32::from_le_bytes(take(&mut data, 4)?.try_into().map_err(|_| "short")?)),
            w => return Err(format!("unknown protobuf wire type {w}")),
        };
        out.push((k >> 3, value));
    }
    Ok(out)
}

fn take<'a>(data: &mut &'a [u8], n: usize) -> std::result::Result<&'a [u8], String> {
    if data.len() < n {
        return Err("truncated protobuf field".into());
    }
    let (head, rest) = data.split_at(n);
    *data = rest;
    Ok(head)
}

fn read_varint(data: &mut &[u8]) -> std::result::Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *take(data, 1)?.first().ok_or("truncated varint")?;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("varint longer than 10 bytes".into())
}

fn varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn key(buf: &mut Vec<u8>, field: u64, wire: u64) {
    varint(buf, (field << 3) | wire);
}

fn bytes_field(buf: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    key(buf, field, 2);
    varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

fn double_field(buf: &mut Vec<u8>, field: u64, v: f64) {
    key(buf, field, 1);
    buf.extend_from_slice(&v.to_le_bytes());
}

/// TFRecord's masked CRC-32C.
fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c::crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_crc_matches_tensorflow() {
        // TensorFlow's crc32c test vector: CRC-32C("123456789") = 0xe3069283.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        // Masked as TFRecord masks: ((c >> 15) | (c << 17)) + 0xa282ead8, worked out by hand.
        assert_eq!(masked_crc(b"123456789"), 0xc78a_b0e5);
    }

    #[test]
    fn scalars_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.scalars(3, &[("train/loss".into(), 0.5), ("train/learning_rate".into(), 1e-4)])
            .unwrap();
        w.scalars(7, &[("eval/loss".into(), 0.25)]).unwrap();
        let got = read_scalars(w.path()).unwrap();
        let want = [
            (3, "train/loss", 0.5f32),
            (3, "train/learning_rate", 1e-4),
            (7, "eval/loss", 0.25),
        ];
        assert_eq!(got.len(), want.len());
        for (g, (step, tag, v)) in got.iter().zip(want) {
            assert_eq!((g.step, g.tag.as_str(), g.value), (step, tag, v));
        }
    }
}
