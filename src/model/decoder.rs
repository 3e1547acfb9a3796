//! One generic pre-norm decoder for the Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 and Phi-3
//! families; their differences are fields of [`ModelConfig`]. Every linear layer is a
//! [`LoraLinear`]; the adapter slot selected in [`Fwd`] is applied, or none (the frozen
//! reference). The base weights exist once.

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};

use super::cache::KvCache;
use super::config::{module_path, Activation, ModelConfig};
use super::ops::frozen::{into_cpu_storage, matmul_frozen_t, to_cpu_tensor};
use super::ops::token_logps;
use super::ops::vocab::vocab_logps;
use super::ops::{apply_rope, attention_probs, rms_norm, rms_norm_f32_scale, soft_cap, Rope, MASK_VALUE};
use super::weights::WeightSource;
use crate::error::{Error, Result};
use crate::model::linear::{Fwd, LoraLinear};

/// The query, key and value projections: three layers, or one whose output rows are q, then k,
/// then v (Phi-3's `qkv_proj`).
#[derive(Debug, Clone)]
enum Qkv {
    Split {
        q: LoraLinear,
        k: LoraLinear,
        v: LoraLinear,
    },
    Fused(LoraLinear),
}

#[derive(Debug, Clone)]
struct Attention {
    qkv: Qkv,
    o: LoraLinear,
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
    sliding_window: Option<usize>,
    /// Uses the local rope tables (Gemma 3's sliding layers).
    local_rope: bool,
}

/// The gate and up projections: two layers, or one whose output rows are gate, then up
/// (Phi-3's `gate_up_proj`).
#[derive(Debug, Clone)]
enum GateUp {
    Split { gate: LoraLinear, up: LoraLinear },
    Fused(LoraLinear),
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_up: GateUp,
    down: LoraLinear,
}

/// An RMSNorm weight as the checkpoint holds it, and the tensor that multiplies the normalised
/// input: the weight itself, or Gemma's 1 + w in f32 (whose product is then taken in f32).
#[derive(Debug, Clone)]
struct Norm {
    weight: Tensor,
    scale: Tensor,
    gemma: bool,
}

impl Norm {
    fn new(weight: Tensor, gemma: bool) -> Result<Norm> {
        let scale = if gemma {
            (weight.to_dtype(DType::F32)? + 1.0)?
        } else {
            weight.clone()
        };
        Ok(Norm { weight, scale, gemma })
    }

    fn apply(&self, x: &Tensor, eps: f64) -> Result<Tensor> {
        Ok(if self.gemma {
            rms_norm_f32_scale(x, &self.scale, eps)?
        } else {
            rms_norm(x, &self.scale, eps)?
        })
    }
}

#[derive(Debug, Clone)]
struct Block {
    input_norm: Norm,
    attn: Attention,
    /// `post_attention_layernorm`: the norm before the MLP, or (with `ff_norms`, Gemma) the norm
    /// of the attention output.
    post_norm: Norm,
    /// Gemma's `pre_feedforward_layernorm` and `post_feedforward_layernorm`.
    ff_norms: Option<(Norm, Norm)>,
    mlp: Mlp,
}

impl Block {
    /// The linear layers in PEFT's module order.
    fn linears(&self) -> Vec<&LoraLinear> {
        let (a, m) = (&self.attn, &self.mlp);
        let mut out: Vec<&LoraLinear> = match &a.qkv {
            Qkv::Split { q, k, v } => vec![q, k, v],
            Qkv::Fused(qkv) => vec![qkv],
        };
        out.push(&a.o);
        match &m.gate_up {
            GateUp::Split { gate, up } => out.extend([gate, up]),
            GateUp::Fused(gu) => out.push(gu),
        }
        out.push(&m.down);
        out
    }

    /// Whether the adapter `ctx` selects has trainable tensors in this block.
    fn has_trainable(&self, ctx: &Fwd) -> bool {
        let Some(slot) = ctx.adapter else { return false };
        self.linears()
            .iter()
            .any(|l| l.adapter(slot).is_some_and(|a| a.tensors().any(Tensor::is_variable)))
    }

    fn linears_mut(&mut self) -> Vec<&mut LoraLinear> {
        let (a, m) = (&mut self.attn, &mut self.mlp);
        let mut out: Vec<&mut LoraLinear> = match &mut a.qkv {
            Qkv::Split { q, k, v } => vec![q, k, v],
            Qkv::Fused(qkv) => vec![qkv],
        };
        out.push(&mut a.o);
        match &mut m.gate_up {
            GateUp::Split { gate, up } => out.extend([gate, up]),
            GateUp::Fused(gu) => out.push(gu),
        }
        out.push(&mut m.down);
        out
    }

    /// Every norm weight, by its name within the block.
    fn norms(&self) -> Vec<(&'static str, &Norm)> {
        let mut out = vec![
            ("input_layernorm", &self.input_norm),
            ("post_attention_layernorm", &self.post_norm),
        ];
        if let Some((pre, post)) = &self.ff_norms {
            out.push(("pre_feedforward_layernorm", pre));
            out.push(("post_feedforward_layernorm", post));
        }
        if let Some(n) = &self.attn.q_norm {
            out.push(("self_attn.q_norm", n));
        }
        if let Some(n) = &self.attn.k_norm {
            out.push(("self_attn.k_norm", n));
        }
        out
    }
}

/// The cos and sin tables of one forward call: of every layer, and of the local layers where
/// their rope differs.
struct RopeTables {
    global: (Tensor, Tensor),
    local: Option<(Tensor, Tensor)>,
}

impl RopeTables {
    fn of(&self, attn: &Attention) -> (&Tensor, &Tensor) {
        match (&self.local, attn.local_rope) {
            (Some((c, s)), true) => (c, s),
            _ => (&self.global.0, &self.global.1),
        }
    }
}

/// Fully trained tensors an adapter slot brings besides its LoRA pairs (PEFT's
/// `modules_to_save` and `trainable_token_indices`), f32, `Var`-backed when trainable. Used in
/// place of the base's when the slot is active.
#[derive(Debug, Clone, Default)]
pub struct SlotExtras {
    /// The whole embedding matrix [V, H].
    pub embed: Option<Tensor>,
    /// The whole output matrix [V, H] (for a tied model with ensure_weight_tying, the same
    /// tensor as `embed`).
    pub lm_head: Option<Tensor>,
    /// New embedding rows [n, H] for the token ids given.
    pub tokens: Option<(Vec<u32>, Tensor)>,
}

/// A loaded decoder-only causal LM.
pub struct Model {
    pub cfg: ModelConfig,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Norm,
    lm_head: Tensor,
    rope: Rope,
    rope_local: Option<Rope>,
    geo: Geometry,
    /// Per adapter slot: tensors that replace the base's embedding or output matrix.
    extras: Vec<Option<SlotExtras>>,
    /// Set when gradient checkpointing is on (CPU): recompute each block in the backward pass.
    checkpointing: Option<std::sync::Arc<GradSink>>,
    dtype: DType,
    device: Device,
}

/// Load options.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub dtype: DType,
    pub device: Device,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
        }
    }
}

impl Model {
    /// Load config.json and the safetensors weights of a model folder.
    pub fn load_dir(dir: &Path, opts: &LoadOptions) -> Result<Model> {
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let files = WeightSource::files_in(dir)?;
        let ws = WeightSource::open(&files)?;
        Self::load(cfg, &ws, opts)
    }

    pub fn load(cfg: ModelConfig, ws: &WeightSource, opts: &LoadOptions) -> Result<Model> {
        let (dt, dev) = (opts.dtype, &opts.device);
        let h = cfg.hidden_size;
        let embed = ws.load("model.embed_tokens.weight", &[cfg.vocab_size, h], dt, dev)?;
        let blocks = (0..cfg.num_layers)
            .map(|l| load_block(&cfg, ws, l, opts))
            .collect::<Result<Vec<_>>>()?;
        let norm = Norm::new(ws.load("model.norm.weight", &[h], dt, dev)?, cfg.arch.is_gemma())?;
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            ws.load("lm_head.weight", &[cfg.vocab_size, h], dt, dev)?
        };
        let rope = Rope::new(&cfg);
        let rope_local = Rope::local(&cfg);
        let geo = Geometry {
            heads: cfg.num_heads,
            kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            eps: cfg.rms_norm_eps,
            dtype: dt,
            attn_scale: cfg.attn_scale,
            attn_softcap: cfg.attn_softcap,
            activation: cfg.activation,
        };
        Ok(Model {
            cfg,
            embed,
            blocks,
            norm,
            lm_head,
            rope,
            rope_local,
            geo,
            extras: Vec::new(),
            checkpointing: None,
            dtype: dt,
            device: dev.clone(),
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Turn gradient checkpointing on or off: with it on, a training forward keeps only each
    /// block's input and the backward pass recomputes the block (CPU; other devices ignore it).
    /// Gradients must then be taken with [`Model::backward`].
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.checkpointing = on.then(|| std::sync::Arc::new(GradSink::default()));
    }

    /// `loss.backward()`, plus the LoRA gradients computed inside checkpointed blocks.
    pub fn backward(&self, loss: &Tensor) -> Result<candle_core::backprop::GradStore> {
        let mut grads = loss.backward()?;
        if let Some(sink) = &self.checkpointing {
            let mut pending = sink.0.lock().map_err(|_| Error::Msg("gradient sink poisoned".into()))?;
            for (t, g) in pending.drain(..) {
                let sum = match grads.remove(&t) {
                    Some(prev) => (prev + g)?,
                    None => g,
                };
                grads.insert(&t, sum);
            }
        }
        Ok(grads)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Every linear layer, in layer order and PEFT's module order.
    pub fn linears(&self) -> impl Iterator<Item = &LoraLinear> {
        self.blocks.iter().flat_map(|b| b.linears())
    }

    pub fn linears_mut(&mut self) -> impl Iterator<Item = &mut LoraLinear> {
        self.blocks.iter_mut().flat_map(|b| b.linears_mut())
    }

    /// Frozen base tensors by checkpoint name (tied lm_head not repeated).
    pub fn base_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed.clone())];
        for (l, b) in self.blocks.iter().enumerate() {
            let p = format!("model.layers.{l}");
            for (name, n) in b.norms() {
                out.push((format!("{p}.{name}.weight"), n.weight.clone()));
            }
            for lin in b.linears() {
                out.push((format!("{}.weight", lin.path), lin.weight.clone()));
                if let Some(bias) = &lin.bias {
                    out.push((format!("{}.bias", lin.path), bias.clone()));
                }
            }
        }
        out.push(("model.norm.weight".into(), self.norm.weight.clone()));
        if !self.cfg.tie_word_embeddings {
            out.push(("lm_head.weight".into(), self.lm_head.clone()));
        }
        out
    }

    /// Hidden states after the final norm for every position: [B, T, H].
    ///
    /// `input_ids` [B, T] (u32); `attention_mask` [B, T] with 1 for real tokens and 0 for padding
    /// (any numeric dtype), or `None` when no row is padded. Positions are 0..T for every row.
    pub fn forward_hidden(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, ctx: &Fwd) -> Result<Tensor> {
        let (_, t) = input_ids.dims2()?;
        let tables = self.rope_tables(0..t, &[t])?;
        let pad = match attention_mask {
            Some(m) => Some(padding_mask(m)?),
            None => None,
        };
        self.forward_layers(input_ids, &tables, ctx, |w| {
            let causal = causal_mask(t, w, &self.device)?;
            Ok(match &pad {
                Some(p) => causal.broadcast_add(p)?,
                None => causal,
            })
        })
    }

    /// Hidden states of packed rows [B, T, H]: each row holds several segments that share a
    /// prefix (a prompt followed by its chosen and its rejected response), with explicit
    /// position ids and visibility, so the shared prompt is computed once.
    pub fn forward_hidden_packed(&self, input_ids: &Tensor, packing: &Packing, ctx: &Fwd) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        if packing.positions.len() != b * t || packing.segments.len() != b * t {
            return Err(Error::Msg(format!(
                "packing describes {} positions for a [{b}, {t}] batch",
                packing.positions.len()
            )));
        }
        let positions: Vec<usize> = packing.positions.iter().map(|&p| p as usize).collect();
        let tables = self.rope_tables(positions, &[b, t])?;
        self.forward_layers(input_ids, &tables, ctx, |w| packing.mask(b, t, w, &self.device))
    }

    /// The rope tables of one forward call at `positions` (see [`Rope::tables`]).
    fn rope_tables(&self, positions: impl IntoIterator<Item = usize> + Clone, lead: &[usize]) -> Result<RopeTables> {
        let (dt, dev) = (self.dtype, &self.device);
        let global = self.rope.tables(positions.clone(), lead, dt, dev)?;
        let local = match &self.rope_local {
            Some(r) => Some(r.tables(positions, lead, dt, dev)?),
            None => None,
        };
        Ok(RopeTables { global, local })
    }

    /// Put the extra trained tensors of adapter slot `slot` (or none).
    pub fn set_extras(&mut self, slot: usize, extras: Option<SlotExtras>) {
        if self.extras.len() <= slot {
            self.extras.resize(slot + 1, None);
        }
        self.extras[slot] = extras;
    }

    pub fn extras(&self, slot: usize) -> Option<&SlotExtras> {
        self.extras.get(slot).and_then(|e| e.as_ref())
    }

    /// The embedding matrix (`embed_tokens.weight`).
    pub fn embedding(&self) -> &Tensor {
        &self.embed
    }

    /// The output matrix [V, H] (the embedding when tied).
    pub fn lm_head_weight(&self) -> &Tensor {
        &self.lm_head
    }

    /// Token embeddings [B, T, H] of `input_ids` [B, T] (with the active slot's embedding or
    /// token rows), scaled by √hidden_size (rounded to the model's dtype first, as transformers
    /// does) for Gemma.
    fn embed(&self, input_ids: &Tensor, ctx: &Fwd) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let ids = input_ids.to_dtype(DType::U32)?.flatten_all()?;
        let extras = ctx.adapter.and_then(|s| self.extras(s));
        let table = extras.and_then(|e| e.embed.as_ref()).unwrap_or(&self.embed);
        let mut rows = table.index_select(&ids, 0)?.to_dtype(self.dtype)?;
        if let Some((tokens, delta)) = extras.and_then(|e| e.tokens.as_ref()) {
            rows = replace_token_rows(&rows, &ids, tokens, delta)?;
        }
        let x = rows.reshape((b, t, self.cfg.hidden_size))?;
        Ok(if self.cfg.arch.is_gemma() {
            (x * (self.cfg.hidden_size as f64).sqrt())?
        } else {
            x
        })
    }

    /// Embedding, decoder blocks and final norm; `mask_for(window)` gives the additive
    /// attention mask (broadcastable to [B, heads, T, T]) of layers with that sliding window.
    fn forward_layers(
        &self,
        input_ids: &Tensor,
        tables: &RopeTables,
        ctx: &Fwd,
        mask_for: impl Fn(Option<usize>) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let t = input_ids.dim(1)?;
        let mut x = self.embed(input_ids, ctx)?;
        let mut masks: Vec<(Option<usize>, Tensor)> = Vec::new();
        for block in &self.blocks {
            let w = block.attn.sliding_window.filter(|&w| w < t);
            let mask = match masks.iter().find(|(k, _)| *k == w) {
                Some((_, m)) => m.clone(),
                None => {
                    let m = mask_for(w)?;
                    masks.push((w, m.clone()));
                    m
                }
            };
            let (cos, sin) = tables.of(&block.attn);
            x = match &self.checkpointing {
                Some(sink) if x.device().is_cpu() && block.has_trainable(ctx) => {
                    if !x.track_op() {
                        // The op only runs backward when its input is tracked.
                        x = candle_core::Var::from_tensor(&x)?.as_tensor().clone();
                    }
                    x.apply_op1(CheckpointedBlock {
                        geo: self.geo,
                        block: block.clone(),
                        cos: cos.clone(),
                        sin: sin.clone(),
                        mask: mask.clone(),
                        ctx: *ctx,
                        sink: sink.clone(),
                    })?
                }
                _ => self.geo.block_forward(block, &x, (cos, sin), Some(&mask), None, ctx)?,
            };
        }
        self.norm.apply(&x, self.cfg.rms_norm_eps)
    }

    /// Gemma 2's soft cap of the final logits, where the config sets one.
    fn cap_logits(&self, logits: Tensor) -> Result<Tensor> {
        Ok(match self.cfg.final_softcap {
            Some(c) => soft_cap(&logits, c)?,
            None => logits,
        })
    }

    /// Logits for every position: hidden [B, T, H] -> [B, T, V] (model dtype; f32 with a
    /// trained output matrix).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.logits_with(hidden, &Fwd::base())
    }

    /// [`Model::logits`] with the output matrix of the slot `ctx` selects.
    pub fn logits_with(&self, hidden: &Tensor, ctx: &Fwd) -> Result<Tensor> {
        let (b, t, h) = hidden.dims3()?;
        let rows = hidden.reshape((b * t, h))?;
        Ok(self.project(&rows, ctx)?.reshape((b, t, self.cfg.vocab_size))?)
    }

    /// Logits at selected flat positions only: hidden [B, T, H], `positions` u32 indices into
    /// the B*T flattened positions -> [N, V]. The vocabulary projection is the widest matmul, so
    /// training computes it only where a token is scored.
    pub fn logits_at(&self, hidden: &Tensor, positions: &Tensor) -> Result<Tensor> {
        self.logits_at_with(hidden, positions, &Fwd::base())
    }

    /// [`Model::logits_at`] with the output matrix of the slot `ctx` selects.
    pub fn logits_at_with(&self, hidden: &Tensor, positions: &Tensor, ctx: &Fwd) -> Result<Tensor> {
        self.project(&scored_rows(hidden, positions)?, ctx)
    }

    /// At selected flat positions of hidden [B, T, H] (as [`Model::logits_at_with`]): the
    /// log-prob of each target under the slot `ctx` selects, with its graph, and the logits'
    /// sum, detached ([N] each). With the frozen output matrix on f32 CPU tensors one op that
    /// never keeps the [N, V] logits ([`vocab_logps`]).
    pub fn scored_logps(
        &self,
        hidden: &Tensor,
        positions: &Tensor,
        targets: &Tensor,
        ctx: &Fwd,
    ) -> Result<(Tensor, Tensor)> {
        let rows = scored_rows(hidden, positions)?;
        if self.trained_lm_head(ctx).is_none() && self.cfg.final_softcap.is_none() {
            if let Some(out) = vocab_logps(&rows, &self.lm_head, targets)? {
                let column = |i| out.narrow(1, i, 1)?.squeeze(1);
                return Ok((column(0)?, column(1)?.detach()));
            }
        }
        let logits = self.project(&rows, ctx)?;
        let tok = token_logps(&logits, targets)?;
        let sums = logits.detach().to_dtype(DType::F32)?.sum(D::Minus1)?;
        Ok((tok, sums))
    }

    /// The trained output matrix of the slot `ctx` selects, if it has one.
    fn trained_lm_head(&self, ctx: &Fwd) -> Option<&Tensor> {
        ctx.adapter.and_then(|s| self.extras(s)?.lm_head.as_ref())
    }

    /// rows [N, H] -> capped logits [N, V]. Against the frozen [V, H] weight read transposed in
    /// place (a broadcast matmul against `lm_head.t()` would copy the whole vocabulary matrix
    /// on every call), or against a slot's trained output matrix with its gradient.
    fn project(&self, rows: &Tensor, ctx: &Fwd) -> Result<Tensor> {
        let out = match self.trained_lm_head(ctx) {
            Some(w) => rows.to_dtype(DType::F32)?.matmul(&w.t()?)?,
            None => matmul_frozen_t(rows, &self.lm_head)?,
        };
        self.cap_logits(out)
    }

    /// Full forward to logits [B, T, V] in f32.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, ctx: &Fwd) -> Result<Tensor> {
        let h = self.forward_hidden(input_ids, attention_mask, ctx)?;
        Ok(self.logits_with(&h, ctx)?.to_dtype(DType::F32)?)
    }
}

/// Incremental decoding (inference only): the attention of new positions reads the keys and
/// values of earlier ones from a [`KvCache`] the caller owns.
impl Model {
    /// Feed `input_ids` [B, T_new] (u32) at positions `cache.len()..cache.len() + T_new`,
    /// appending their keys and values to `cache`, and return the f32 logits of the last new
    /// position, [B, V]. The first call feeds the prompt, each later call the token just chosen.
    ///
    /// Rows are not padded: a batch holds sequences of equal length. Sliding-window layers mask
    /// cached keys that are `window` or more positions behind the query, as the full forward
    /// does. On error the cache is cleared.
    pub fn forward_cached(&self, input_ids: &Tensor, cache: &mut KvCache, ctx: &Fwd) -> Result<Tensor> {
        if cache.num_layers() != self.blocks.len() {
            return Err(Error::KvCacheLayers {
                cache: cache.num_layers(),
                model: self.blocks.len(),
            });
        }
        // Decoding never takes a gradient.
        let ctx = &Fwd { no_grad: true, ..*ctx };
        let r = self.forward_cached_inner(input_ids, cache, ctx);
        if r.is_err() {
            cache.reset();
        }
        r
    }

    fn forward_cached_inner(&self, input_ids: &Tensor, cache: &mut KvCache, ctx: &Fwd) -> Result<Tensor> {
        let t = input_ids.dim(1)?;
        if t == 0 {
            return Err(Error::Msg("forward_cached: no new tokens".into()));
        }
        let start = cache.len();
        let long = self.rope.uses_long(start + t) || self.rope_local.as_ref().is_some_and(|r| r.uses_long(start + t));
        if let Some((fed, cached_long)) = cache.fed() {
            if start > 0 && cached_long != long {
                // Longrope changes factors once the sequence passes the original context: the
                // cached keys were rotated with the other set, so everything is fed again (as
                // transformers' Phi-3 drops its cache at that point).
                let all = Tensor::cat(&[fed, &input_ids.to_dtype(DType::U32)?], 1)?;
                cache.reset();
                return self.forward_cached_inner(&all, cache, ctx);
            }
        }
        // Only a rope that switches factor sets ever feeds the cached ids again; recording them
        // costs a copy of all ids per decoded token.
        if self.rope.can_switch() || self.rope_local.as_ref().is_some_and(Rope::can_switch) {
            cache.record_ids(input_ids, long)?;
        }
        let mut x = self.embed(input_ids, ctx)?;
        let tables = self.rope_tables(start..start + t, &[t])?;
        let mut masks: Vec<(Option<usize>, Option<Tensor>)> = Vec::new();
        for (l, block) in self.blocks.iter().enumerate() {
            let w = block.attn.sliding_window;
            let mask = match masks.iter().find(|(k, _)| *k == w) {
                Some((_, m)) => m.clone(),
                None => {
                    let m = cached_mask(start, t, w, &self.device)?;
                    masks.push((w, m.clone()));
                    m
                }
            };
            x = self.geo.block_forward(
                block,
                &x,
                tables.of(&block.attn),
                mask.as_ref(),
                Some((&mut *cache, l)),
                ctx,
            )?;
        }
        cache.advance(t);
        let last = x.narrow(1, t - 1, 1)?;
        let h = self.norm.apply(&last, self.cfg.rms_norm_eps)?;
        Ok(self.logits_with(&h, ctx)?.squeeze(1)?.to_dtype(DType::F32)?)
    }
}

/// Where a token sits for the visibility rule: its index in the row, its position id and its
/// segment (see [`Packing`]; unpacked rows are one [`Packing::SHARED`] segment).
#[derive(Debug, Clone, Copy)]
struct Token {
    index: usize,
    pos: usize,
    segment: u8,
}

impl Token {
    /// A token of an unpacked row, whose position is its index.
    fn plain(index: usize) -> Token {
        Token {
            index,
            pos: index,
            segment: Packing::SHARED,
        }
    }
}

/// The one attention visibility rule of every mask: query `q` sees key `k` when `k` is not after
/// it, `k` is not padding, `k` is shared or in `q`'s segment, and (with a sliding window `w`)
/// their positions are less than `w` apart.
/// The rows of hidden [B, T, H] at `positions` (u32 indices into the B*T flattened positions).
fn scored_rows(hidden: &Tensor, positions: &Tensor) -> Result<Tensor> {
    let (b, t, h) = hidden.dims3()?;
    Ok(hidden.reshape((b * t, h))?.index_select(positions, 0)?)
}

fn visible(q: Token, k: Token, window: Option<usize>) -> bool {
    k.index <= q.index
        && k.segment != Packing::PAD
        && (k.segment == Packing::SHARED || k.segment == q.segment)
        && window.is_none_or(|w| q.pos.saturating_sub(k.pos) < w)
}

/// Additive mask [B, 1, T, K] (f32) of [`visible`]: 0 where query `query(r, i)` of row `r` sees
/// key `key(r, j)`, [`MASK_VALUE`] elsewhere; also whether anything is masked.
fn additive_mask(
    (b, t, k): (usize, usize, usize),
    window: Option<usize>,
    query: impl Fn(usize, usize) -> Token,
    key: impl Fn(usize, usize) -> Token,
    device: &Device,
) -> Result<(Tensor, bool)> {
    let mut m = vec![0f32; b * t * k];
    let mut any = false;
    for r in 0..b {
        for i in 0..t {
            let q = query(r, i);
            let row = &mut m[(r * t + i) * k..(r * t + i + 1) * k];
            for (j, o) in row.iter_mut().enumerate() {
                if !visible(q, key(r, j), window) {
                    *o = MASK_VALUE;
                    any = true;
                }
            }
        }
    }
    Ok((Tensor::from_vec(m, (b, 1, t, k), device)?, any))
}

/// Additive mask [1, 1, T, start + T] (f32) for T queries at positions start.. over every key
/// so far; `None` when it masks nothing (one query, no window exceeded).
fn cached_mask(start: usize, t: usize, window: Option<usize>, device: &Device) -> Result<Option<Tensor>> {
    let shape = (1, t, start + t);
    let (m, any) = additive_mask(
        shape,
        window,
        |_, i| Token::plain(start + i),
        |_, j| Token::plain(j),
        device,
    )?;
    Ok(any.then_some(m))
}

/// Additive causal mask [1, 1, T, T] (f32) of unpacked rows.
fn causal_mask(t: usize, window: Option<usize>, device: &Device) -> Result<Tensor> {
    let token = |_, i| Token::plain(i);
    Ok(additive_mask((1, t, t), window, token, token, device)?.0)
}

/// The weights of decoder block `l`.
fn load_block(cfg: &ModelConfig, ws: &WeightSource, l: usize, opts: &LoadOptions) -> Result<Block> {
    let (dt, dev) = (opts.dtype, &opts.device);
    let p = format!("model.layers.{l}");
    let modules = cfg.linear_modules();
    // Module `j` of the family's module list: its index in the model follows from `j`, never
    // from a search.
    let linear = |j: usize| -> Result<LoraLinear> {
        let m = modules[j];
        let path = module_path(l, m);
        let (i, o) = cfg
            .linear_shape(m)
            .ok_or_else(|| Error::Msg(format!("unknown module {m}")))?;
        let w = ws.load(&format!("{path}.weight"), &[o, i], dt, dev)?;
        let b = if cfg.linear_bias(m) {
            Some(ws.load(&format!("{path}.bias"), &[o], dt, dev)?)
        } else {
            None
        };
        Ok(LoraLinear::new(path, l * modules.len() + j, w, b))
    };
    let mut lin = (0..modules.len()).map(linear).collect::<Result<Vec<_>>>()?.into_iter();
    let mut next = || lin.next().ok_or_else(|| Error::Msg("module list too short".into()));
    let (qkv, o, gate_up, down) = if cfg.fused_projections {
        (Qkv::Fused(next()?), next()?, GateUp::Fused(next()?), next()?)
    } else {
        let (q, k, v, o) = (next()?, next()?, next()?, next()?);
        let (gate, up, down) = (next()?, next()?, next()?);
        (Qkv::Split { q, k, v }, o, GateUp::Split { gate, up }, down)
    };
    let gemma = cfg.arch.is_gemma();
    let norm = |name: &str, size: usize| -> Result<Norm> {
        Norm::new(ws.load(&format!("{p}.{name}.weight"), &[size], dt, dev)?, gemma)
    };
    let qk_norm = |name: &str| cfg.qk_norm.then(|| norm(name, cfg.head_dim)).transpose();
    let sliding_window = cfg.sliding_window.get(l).copied().flatten();
    let attn = Attention {
        qkv,
        o,
        q_norm: qk_norm("self_attn.q_norm")?,
        k_norm: qk_norm("self_attn.k_norm")?,
        sliding_window,
        local_rope: sliding_window.is_some() && cfg.rope_local.is_some(),
    };
    let h = cfg.hidden_size;
    let ff_norms = if gemma {
        Some((
            norm("pre_feedforward_layernorm", h)?,
            norm("post_feedforward_layernorm", h)?,
        ))
    } else {
        None
    };
    Ok(Block {
        input_norm: norm("input_layernorm", h)?,
        attn,
        post_norm: norm("post_attention_layernorm", h)?,
        ff_norms,
        mlp: Mlp { gate_up, down },
    })
}

/// Embedding rows [N, H] with the rows of the ids in `tokens` replaced by the matching rows of
/// `delta` [n, H] (PEFT's trainable tokens: the complete new rows), differentiable in `delta`.
fn replace_token_rows(rows: &Tensor, ids: &Tensor, tokens: &[u32], delta: &Tensor) -> Result<Tensor> {
    let ids = ids.to_vec1::<u32>()?;
    let n = tokens.len() as u32;
    // Index into delta (its last row a zero pad for ids that are not replaced) and a 0/1 mask.
    let (pick, keep): (Vec<u32>, Vec<f32>) = ids
        .iter()
        .map(|id| match tokens.iter().position(|t| t == id) {
            Some(k) => (k as u32, 0.0),
            None => (n, 1.0),
        })
        .unzip();
    if keep.iter().all(|&k| k == 1.0) {
        return Ok(rows.clone());
    }
    let dev = rows.device();
    let padded = Tensor::cat(&[delta, &delta.narrow(0, 0, 1)?.zeros_like()?], 0)?;
    let new = padded
        .index_select(&Tensor::new(pick.as_slice(), dev)?, 0)?
        .to_dtype(rows.dtype())?;
    let keep = Tensor::from_vec(keep, (ids.len(), 1), dev)?.to_dtype(rows.dtype())?;
    let swap = (1.0 - &keep)?;
    Ok((rows.broadcast_mul(&keep)? + new.broadcast_mul(&swap)?)?)
}

/// Additive padding mask [B, 1, 1, T] (f32) from a 0/1 attention mask [B, T].
fn padding_mask(mask: &Tensor) -> Result<Tensor> {
    let (b, t) = mask.dims2()?;
    let m = mask.to_dtype(DType::F32)?;
    let add = ((m - 1.0)? * (-(MASK_VALUE as f64)))?;
    Ok(add.reshape((b, 1, 1, t))?)
}

/// The per-layer sizes a decoder block needs, apart from its weights.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f64,
    dtype: DType,
    attn_scale: f64,
    attn_softcap: Option<f64>,
    activation: Activation,
}

impl Geometry {
    /// One decoder block on x [B, T, H]: attention (over `cache` as well, when given: the cache
    /// and the layer's index in it) with its residual, then the MLP with its residual.
    fn block_forward(
        &self,
        block: &Block,
        x: &Tensor,
        rope: (&Tensor, &Tensor),
        mask: Option<&Tensor>,
        cache: Option<(&mut KvCache, usize)>,
        ctx: &Fwd,
    ) -> Result<Tensor> {
        let h = block.input_norm.apply(x, self.eps)?;
        let mut a = self.attention(&block.attn, &h, rope, mask, cache, ctx)?;
        if block.ff_norms.is_some() {
            a = block.post_norm.apply(&a, self.eps)?;
        }
        self.mlp_residual(block, &(x + a)?, ctx)
    }

    /// The second half of a block: x + down(act(gate(h)) · up(h)), h = the pre-MLP norm of x
    /// (Gemma also normalises the MLP's output).
    fn mlp_residual(&self, block: &Block, x: &Tensor, ctx: &Fwd) -> Result<Tensor> {
        let pre = block.ff_norms.as_ref().map_or(&block.post_norm, |(pre, _)| pre);
        let h = pre.apply(x, self.eps)?;
        let m = &block.mlp;
        let (g, u) = match &m.gate_up {
            GateUp::Split { gate, up } => (gate.forward(&h, ctx)?, up.forward(&h, ctx)?),
            GateUp::Fused(gu) => {
                let y = gu.forward(&h, ctx)?;
                let i = y.dim(D::Minus1)? / 2;
                (y.narrow(D::Minus1, 0, i)?, y.narrow(D::Minus1, i, i)?)
            }
        };
        let mut d = match self.activation {
            Activation::Silu => m.down.forward_silu_glu(&g, &u, ctx)?,
            Activation::GeluTanh => m.down.forward(&(g.gelu()? * u)?, ctx)?,
        };
        if let Some((_, post)) = &block.ff_norms {
            d = post.apply(&d, self.eps)?;
        }
        Ok((x + d)?)
    }

    /// Project x [B, T, H] to per-head q [B, nh, T, hd] and k, v [B, nkv, T, hd], with the q/k
    /// norms (Qwen3, Gemma 3) and RoPE applied; v is contiguous.
    fn qkv(
        &self,
        attn: &Attention,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        ctx: &Fwd,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.head_dim);
        let eps = self.eps;
        let heads = |y: Tensor, n: usize, norm: &Option<Norm>| -> Result<Tensor> {
            let mut y = y.reshape((b, t, n, hd))?;
            if let Some(w) = norm {
                y = w.apply(&y, eps)?;
            }
            Ok(y.transpose(1, 2)?)
        };
        let (q, k, v) = match &attn.qkv {
            Qkv::Split { q, k, v } => (q.forward(x, ctx)?, k.forward(x, ctx)?, v.forward(x, ctx)?),
            Qkv::Fused(qkv) => {
                let y = qkv.forward(x, ctx)?;
                let (qd, kd) = (nh * hd, nkv * hd);
                (y.narrow(2, 0, qd)?, y.narrow(2, qd, kd)?, y.narrow(2, qd + kd, kd)?)
            }
        };
        let q = heads(q, nh, &attn.q_norm)?;
        let k = heads(k, nkv, &attn.k_norm)?;
        let v = heads(v, nkv, &None)?.contiguous()?;
        Ok((apply_rope(&q, cos, sin)?, apply_rope(&k, cos, sin)?, v))
    }

    /// The one attention core, of training and decoding alike: x [B, T, H] attends to its own
    /// keys and values, or with `cache` (the cache and the layer's index in it) to every key and
    /// value cached so far plus its own, which are appended. `mask` is additive, broadcastable to
    /// [B, heads, T, keys] (`None`: nothing masked).
    fn attention(
        &self,
        attn: &Attention,
        x: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        mask: Option<&Tensor>,
        cache: Option<(&mut KvCache, usize)>,
        ctx: &Fwd,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.head_dim);
        let (q, k, v) = self.qkv(attn, x, cos, sin, ctx)?;
        if cache.is_none() && self.attn_softcap.is_none() {
            if let Some(out) = super::ops::attention::attention(&q, &k, &v, mask, self.attn_scale)? {
                return Ok(attn.o.forward(&out, ctx)?);
            }
        }
        let (k_t, v) = match cache {
            // k is then a view into the cache's buffer; the product reads it transposed in place.
            Some((cache, layer)) => {
                let (k, v) = cache.append(layer, &k, &v)?;
                (k.t()?, v)
            }
            None => (k.t()?.contiguous()?, v),
        };
        let len = k_t.dim(3)?;
        // Grouped-query attention without repeating K/V: fold the query heads that share a K/V
        // head into the sequence axis, [B, nkv, rep*T, hd].
        let rep = nh / nkv;
        let scores = q
            .reshape((b, nkv, rep * t, hd))?
            .matmul(&k_t)?
            .reshape((b, nh, t, len))?;
        // Scaled after the product, as transformers' eager attention does; Gemma 2 soft-caps the
        // scaled scores before the mask.
        let probs = match self.attn_softcap {
            None => attention_probs(&scores, mask, self.attn_scale)?,
            Some(c) => {
                let capped = soft_cap(&(scores.to_dtype(DType::F32)? * self.attn_scale)?, c)?;
                attention_probs(&capped, mask, 1.0)?
            }
        };
        let probs = probs.to_dtype(self.dtype)?;
        let probs = probs.reshape((b, nkv, rep * t, len))?;
        let out = probs.matmul(&v)?.reshape((b, nh, t, hd))?;
        let out = out.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        Ok(attn.o.forward(&out, ctx)?)
    }
}

/// Gradient checkpointing: a decoder block as one custom op that keeps only its input. Its
/// backward runs the block again on that input, with the same dropout masks, and
/// backpropagates through the recomputed graph. The block's LoRA gradients cannot leave
/// through the op's single input, so they go to `sink`, which [`Model::backward`] empties into
/// the gradient store.
struct CheckpointedBlock {
    geo: Geometry,
    block: Block,
    cos: Tensor,
    sin: Tensor,
    mask: Tensor,
    ctx: Fwd,
    sink: std::sync::Arc<GradSink>,
}

/// LoRA gradients produced inside checkpointed blocks during a backward pass.
#[derive(Default)]
pub struct GradSink(std::sync::Mutex<Vec<(Tensor, Tensor)>>);

impl candle_core::CustomOp1 for CheckpointedBlock {
    fn name(&self) -> &'static str {
        "checkpointed-decoder-block"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = to_cpu_tensor(s, l)?;
        let y = self
            .geo
            .block_forward(
                &self.block,
                &x,
                (&self.cos, &self.sin),
                Some(&self.mask),
                None,
                &self.ctx,
            )
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        into_cpu_storage(y.detach())
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let x = candle_core::Var::from_tensor(&arg.detach())?;
        let y = self
            .geo
            .block_forward(
                &self.block,
                x.as_tensor(),
                (&self.cos, &self.sin),
                Some(&self.mask),
                None,
                &self.ctx,
            )
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let grads = (y * grad.detach())?.sum_all()?.backward()?;
        let mut sink = self
            .sink
            .0
            .lock()
            .map_err(|_| candle_core::Error::Msg("gradient sink poisoned".into()))?;
        for lin in self.block.linears() {
            for ad in lin.adapters.iter().flatten() {
                for t in ad.tensors() {
                    if let Some(g) = grads.get(t) {
                        sink.push((t.clone(), g.clone()));
                    }
                }
            }
        }
        Ok(grads.get(x.as_tensor()).cloned())
    }
}

/// Layout of packed rows for [`Model::forward_hidden_packed`], flat over [B, T].
#[derive(Debug, Clone)]
pub struct Packing {
    /// Position id of each token (for RoPE).
    pub positions: Vec<u32>,
    /// Segment of each token: [`Packing::SHARED`] (seen by every later token of the row), a
    /// branch number (seen only by later tokens of the same branch), or [`Packing::PAD`].
    pub segments: Vec<u8>,
}

impl Packing {
    pub const SHARED: u8 = 0;
    pub const PAD: u8 = u8::MAX;

    /// Additive mask [B, 1, T, T] (f32) of [`visible`] over the packed rows.
    fn mask(&self, b: usize, t: usize, window: Option<usize>, device: &Device) -> Result<Tensor> {
        let token = |r: usize, i: usize| Token {
            index: i,
            pos: self.positions[r * t + i] as usize,
            segment: self.segments[r * t + i],
        };
        Ok(additive_mask((b, t, t), window, token, token, device)?.0)
    }
}
