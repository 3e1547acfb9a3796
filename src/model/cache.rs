//! The key/value cache of incremental decoding. It lives outside the model: the caller owns one
//! per sequence (or batch of equal-length sequences) and passes it to
//! [`Model::forward_cached`](super::Model::forward_cached); training never sees it, so the model's
//! forward passes stay `&self`.
//!
//! Every layer keeps all keys and values seen so far, after RoPE (and Qwen3's k-norm). Sliding
//! window layers keep them too and mask the keys that fell out of the window, so one cache serves
//! every layer and can be cut back to any earlier length.

use candle_core::Tensor;

use crate::error::{Error, Result};

/// Keys and values of one layer: [B, n_kv_heads, T, head_dim] each.
#[derive(Debug, Clone)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
}

#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    /// Positions cached (the same in every layer once a forward pass has completed).
    len: usize,
}

impl KvCache {
    /// An empty cache for a model with `num_layers` layers.
    pub fn new(num_layers: usize) -> KvCache {
        KvCache {
            layers: vec![None; num_layers],
            len: 0,
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
        for kv in self.layers.iter_mut().flatten() {
            kv.k = kv.k.narrow(2, 0, len)?.contiguous()?;
            kv.v = kv.v.narrow(2, 0, len)?.contiguous()?;
        }
        self.len = len;
        Ok(())
    }

    /// Append the keys and values of new positions to layer `layer` and return all of them
    /// (cached + new). `k`, `v`: [B, n_kv_heads, T_new, head_dim].
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let n = self.layers.len();
        let slot = self.layers.get_mut(layer).ok_or_else(|| {
            Error::Msg(format!("KV cache has {n} layers, layer {layer} asked for"))
        })?;
        let kv = match slot.take() {
            None => LayerKv {
                k: k.contiguous()?,
                v: v.contiguous()?,
            },
            Some(old) => {
                if old.k.dims()[..2] != k.dims()[..2] {
                    return Err(Error::Msg(format!(
                        "KV cache holds batch/heads {:?}, new keys have {:?}",
                        &old.k.dims()[..2],
                        &k.dims()[..2]
                    )));
                }
                LayerKv {
                    k: Tensor::cat(&[&old.k, k], 2)?,
                    v: Tensor::cat(&[&old.v, v], 2)?,
                }
            }
        };
        let out = (kv.k.clone(), kv.v.clone());
        *slot = Some(kv);
        Ok(out)
    }

    /// Record that a forward pass appended `t_new` positions to every layer.
    pub(crate) fn advance(&mut self, t_new: usize) {
        self.len += t_new;
    }
}
