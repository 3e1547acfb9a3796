//! The key/value cache of incremental decoding. It lives outside the model: the caller owns one
//! per sequence (or batch of equal-length sequences) and passes it to
//! [`Model::forward_cached`](super::Model::forward_cached); training never sees it, so the model's
//! forward passes stay `&self`.
//!
//! Every layer keeps all keys and values seen so far, after RoPE (and Qwen3's k-norm). Sliding
//! window layers keep them too and mask the keys that fell out of the window, so one cache serves
//! every layer and can be cut back to any earlier length.
//!
//! Keys and values are written in place into buffers with room to spare, which grow by
//! doubling: appending a token copies only that token, not everything cached so far.

use candle_core::Tensor;

use crate::error::{Error, Result};

/// Keys and values of one layer: buffers [B, n_kv_heads, capacity, head_dim] each, of which the
/// first `KvCache::len` positions are valid.
#[derive(Debug)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
}

impl LayerKv {
    fn capacity(&self) -> usize {
        self.k.dims()[2]
    }
}

/// Smallest buffer, in positions.
const MIN_CAPACITY: usize = 256;

#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    /// Positions cached (the same in every layer once a forward pass has completed).
    len: usize,
    /// The token ids fed so far, [B, len] (u32), kept so the cache can be rebuilt.
    ids: Option<Tensor>,
    /// The keys were rotated with longrope's long factors (Phi-3).
    long_rope: bool,
}

impl KvCache {
    /// An empty cache for a model with `num_layers` layers.
    pub fn new(num_layers: usize) -> KvCache {
        KvCache {
            layers: (0..num_layers).map(|_| None).collect(),
            len: 0,
            ids: None,
            long_rope: false,
        }
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Number of positions cached: the position of the next token fed.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forget everything.
    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.len = 0;
        self.ids = None;
        self.long_rope = false;
    }

    /// Keep only the first `len` positions (no-op when `len` is not shorter), so a new prompt
    /// that shares a prefix with what is cached only feeds the tokens after it.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len >= self.len {
            return Ok(());
        }
        if len == 0 {
            self.reset();
            return Ok(());
        }
        // Positions past `len` are simply overwritten by the next append.
        self.len = len;
        if let Some(ids) = &self.ids {
            self.ids = Some(ids.narrow(1, 0, len)?);
        }
        Ok(())
    }

    /// Append the keys and values of new positions to layer `layer` and return all of them
    /// (cached + new). `k`, `v`: [B, n_kv_heads, T_new, head_dim].
    pub(crate) fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = self.layers.len();
        let slot = self
            .layers
            .get_mut(layer)
            .ok_or(Error::KvCacheLayer { layers: n, layer })?;
        let t_new = k.dims()[2];
        let need = self.len + t_new;
        if let Some(old) = slot.as_ref() {
            if old.k.dims()[..2] != k.dims()[..2] || old.k.dims()[3] != k.dims()[3] {
                return Err(Error::KvCacheShape {
                    cached: old.k.dims()[..2].to_vec(),
                    new: k.dims()[..2].to_vec(),
                });
            }
        }
        if slot.as_ref().is_none_or(|kv| kv.capacity() < need) {
            let cap = slot
                .as_ref()
                .map_or(0, |kv| 2 * kv.capacity())
                .max(need)
                .max(MIN_CAPACITY);
            let (b, h, _, d) = k.dims4()?;
            let grown = LayerKv {
                k: Tensor::zeros((b, h, cap, d), k.dtype(), k.device())?,
                v: Tensor::zeros((b, h, cap, d), v.dtype(), v.device())?,
            };
            if let (Some(old), true) = (slot.as_ref(), self.len > 0) {
                grown.k.slice_set(&old.k.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                grown.v.slice_set(&old.v.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
            }
            *slot = Some(grown);
        }
        let kv = slot
            .as_ref()
            .ok_or_else(|| Error::Msg("KV cache slot missing".into()))?;
        kv.k.slice_set(&k.contiguous()?, 2, self.len)?;
        kv.v.slice_set(&v.contiguous()?, 2, self.len)?;
        Ok((kv.k.narrow(2, 0, need)?, kv.v.narrow(2, 0, need)?))
    }

    /// Record that a forward pass appended `t_new` positions to every layer.
    pub(crate) fn advance(&mut self, t_new: usize) {
        self.len += t_new;
    }

    /// Record the ids [B, T_new] of the positions a forward pass is appending, and whether their
    /// keys use longrope's long factors.
    pub(crate) fn record_ids(&mut self, ids: &Tensor, long_rope: bool) -> Result<()> {
        let ids = ids.to_dtype(candle_core::DType::U32)?;
        self.ids = Some(match &self.ids {
            Some(old) => Tensor::cat(&[old, &ids], 1)?,
            None => ids,
        });
        self.long_rope = long_rope;
        Ok(())
    }

    /// The ids fed so far, [B, len], and whether their keys use longrope's long factors.
    pub(crate) fn fed(&self) -> Option<(&Tensor, bool)> {
        self.ids.as_ref().map(|ids| (ids, self.long_rope))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::{KvCache, MIN_CAPACITY};

    fn chunk(start: usize, t: usize) -> Tensor {
        // [B=2, heads=3, t, d=4] with values that identify the position.
        let v: Vec<f32> = (0..2 * 3 * t * 4)
            .map(|i| (start + (i / 4) % t) as f32 + (i % 4) as f32 * 0.01 + (i / (t * 4)) as f32 * 1000.0)
            .collect();
        Tensor::from_vec(v, (2, 3, t, 4), &Device::Cpu).unwrap()
    }

    /// Appends across buffer growth, and a truncation followed by new appends, give exactly the
    /// concatenation of what was fed.
    #[test]
    fn appends_grow_and_truncate_like_concatenation() {
        let mut cache = KvCache::new(1);
        let mut fed: Vec<Tensor> = Vec::new();
        let mut pos = 0;
        for t in [5, 1, MIN_CAPACITY, 3, MIN_CAPACITY * 2, 1] {
            let c = chunk(pos, t);
            let (k, v) = cache.append(0, &c, &(&c * 2.0).unwrap()).unwrap();
            cache.advance(t);
            fed.push(c);
            pos += t;
            let want = Tensor::cat(&fed.iter().collect::<Vec<_>>(), 2).unwrap();
            assert_eq!(
                k.contiguous().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
            let want_v = (want * 2.0).unwrap();
            assert_eq!(
                v.contiguous().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want_v.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
        cache.truncate(7).unwrap();
        assert_eq!(cache.len(), 7);
        let c = chunk(1000, 2);
        let (k, _) = cache.append(0, &c, &c).unwrap();
        let kept = Tensor::cat(&fed.iter().collect::<Vec<_>>(), 2)
            .unwrap()
            .narrow(2, 0, 7)
            .unwrap();
        let want = Tensor::cat(&[&kept, &c], 2).unwrap();
        assert_eq!(
            k.contiguous().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
}
