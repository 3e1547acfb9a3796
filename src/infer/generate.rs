//! The generation loop: feed the prompt, then one token at a time through the KV cache, until a
//! stop token or the token budget; and incremental detokenisation for streaming.

use candle_core::{Device, Tensor};
use tokenizers::Tokenizer;

use super::sampling::{Sampler, SamplingParams};
use crate::error::{Error, Result};
use crate::model::linear::Fwd;
use crate::model::{KvCache, Model};

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// Generation ends after any of these is produced (it is part of the output, as in
    /// transformers). Empty: only `max_new_tokens` ends it.
    pub stop_tokens: Vec<u32>,
    pub sampling: SamplingParams,
    /// Decode through the KV cache (the default). Without it every step recomputes the whole
    /// sequence: slow, and only there to check the cache.
    pub use_cache: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 256,
            stop_tokens: Vec::new(),
            sampling: SamplingParams::greedy(),
            use_cache: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token was produced.
    Stop,
    /// `max_new_tokens` were produced.
    Length,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// The result of one generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The new tokens, ending with the stop token when `finish` is `Stop`.
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
    /// Prompt tokens that had to be run through the model (fewer than the prompt when the
    /// session's cache already held a prefix of it).
    pub prompt_tokens_fed: usize,
}

/// One model + adapter choice with its KV cache, kept across calls so a chat only feeds what
/// each turn adds to the conversation.
pub struct Session<'m> {
    model: &'m Model,
    ctx: Fwd,
    cache: KvCache,
    /// The tokens whose keys and values `cache` holds.
    cached: Vec<u32>,
}

impl<'m> Session<'m> {
    pub fn new(model: &'m Model, ctx: Fwd) -> Session<'m> {
        Session {
            model,
            ctx,
            cache: KvCache::new(model.cfg.num_layers),
            cached: Vec::new(),
        }
    }

    pub fn reset(&mut self) {
        self.cache.reset();
        self.cached.clear();
    }

    /// Generate after `prompt`, calling `on_token` with each new token as it is chosen.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        opts: &GenerateOptions,
        mut on_token: impl FnMut(u32) -> Result<()>,
    ) -> Result<Generation> {
        if prompt.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        opts.sampling.validate()?;
        let mut sampler = Sampler::new(opts.sampling.clone());
        let mut seq: Vec<u32> = prompt.to_vec();
        let mut tokens = Vec::new();
        if opts.max_new_tokens == 0 {
            return Ok(Generation {
                tokens,
                finish: FinishReason::Length,
                prompt_tokens_fed: 0,
            });
        }
        // Reuse the cached prefix; at least one prompt token must be fed to get logits.
        let common = if opts.use_cache {
            let c = self.cached.iter().zip(prompt).take_while(|(a, b)| a == b).count();
            c.min(prompt.len() - 1)
        } else {
            0
        };
        self.cache.truncate(common)?;
        self.cached.truncate(common);
        let fed = prompt.len() - common;
        let mut logits = self.step(&prompt[common..], &seq, opts.use_cache)?;
        loop {
            let next = sampler.next_token(logits, &seq)?;
            tokens.push(next);
            seq.push(next);
            on_token(next)?;
            if opts.stop_tokens.contains(&next) {
                return Ok(self.done(tokens, FinishReason::Stop, fed));
            }
            if tokens.len() >= opts.max_new_tokens {
                return Ok(self.done(tokens, FinishReason::Length, fed));
            }
            logits = self.step(&[next], &seq, opts.use_cache)?;
        }
    }

    fn done(&self, tokens: Vec<u32>, finish: FinishReason, fed: usize) -> Generation {
        Generation {
            tokens,
            finish,
            prompt_tokens_fed: fed,
        }
    }

    /// Logits after feeding `new` (the end of `seq`): through the cache, or over all of `seq`.
    fn step(&mut self, new: &[u32], seq: &[u32], use_cache: bool) -> Result<Vec<f32>> {
        let dev = self.model.device();
        if use_cache {
            let ids = ids_tensor(new, dev)?;
            let logits = match self.model.forward_cached(&ids, &mut self.cache, &self.ctx) {
                Ok(l) => l,
                Err(e) => {
                    self.cached.clear();
                    return Err(e);
                }
            };
            self.cached.extend_from_slice(new);
            Ok(logits.squeeze(0)?.to_vec1::<f32>()?)
        } else {
            let ids = ids_tensor(seq, dev)?;
            let logits = self.model.forward(&ids, None, &self.ctx)?;
            let t = seq.len();
            Ok(logits.squeeze(0)?.get(t - 1)?.to_vec1::<f32>()?)
        }
    }
}

fn ids_tensor(ids: &[u32], dev: &Device) -> Result<Tensor> {
    Ok(Tensor::from_slice(ids, (1, ids.len()), dev)?)
}

/// One-shot generation with a fresh cache.
pub fn generate(
    model: &Model,
    ctx: &Fwd,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Generation> {
    Session::new(model, *ctx).generate(prompt, opts, on_token)
}

/// Incremental detokenisation for streaming. Byte-level BPE splits multi-byte characters across
/// tokens, so the text of all tokens so far is decoded again after each one and only the part
/// that is new and complete is handed out; a trailing U+FFFD (an unfinished character) waits for
/// the next token. Special tokens are not shown.
pub struct TextStream<'t> {
    tokenizer: &'t Tokenizer,
    ids: Vec<u32>,
    /// Bytes of the decoded text handed out so far.
    emitted: usize,
}

impl<'t> TextStream<'t> {
    pub fn new(tokenizer: &'t Tokenizer) -> TextStream<'t> {
        TextStream {
            tokenizer,
            ids: Vec::new(),
            emitted: 0,
        }
    }

    /// Add a token; the new printable text, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = self.decoded()?;
        if text.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        Ok(self.take_new(&text))
    }

    /// Whatever is still held back (at the end of generation).
    pub fn finish(&mut self) -> Result<Option<String>> {
        let text = self.decoded()?;
        Ok(self.take_new(&text))
    }

    /// The whole text so far.
    pub fn decoded(&self) -> Result<String> {
        decode(self.tokenizer, &self.ids)
    }

    fn take_new(&mut self, text: &str) -> Option<String> {
        // The text of more tokens extends the text of fewer, so what was handed out is a prefix.
        let new = text.get(self.emitted..).unwrap_or_default().to_string();
        self.emitted = self.emitted.max(text.len());
        (!new.is_empty()).then_some(new)
    }
}

/// Text of `ids` without special tokens.
pub fn decode(tokenizer: &Tokenizer, ids: &[u32]) -> Result<String> {
    tokenizer.decode(ids, true).map_err(|e| Error::Tokenizer {
        msg: format!("cannot decode: {e}"),
    })
}
