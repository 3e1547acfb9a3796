//! Tokenisation of preference pairs: the chat template renders prompt and prompt + response, the
//! tokenizer encodes both (no special tokens added: templates write BOS themselves), and the
//! response ids are what `full` adds after the prompt ids. Then truncation, and the drops of
//! pairs that cannot teach anything (identical responses, nothing left to score).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use tokenizers::Tokenizer;

use super::template::{read_tokenizer_config, ChatTemplate, NAMED_TEMPLATES};
use super::{Message, PreferencePair, RowRef};
use crate::error::{Error, Result};

/// Which end of an over-long prompt is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TruncationMode {
    /// Keep the last tokens of the prompt (the turn being answered). TRL's default.
    #[default]
    KeepEnd,
    /// Keep the first tokens of the prompt.
    KeepStart,
}

/// The one parser of `truncation_mode` (flags and recipes): `keep_end` or `keep_start`, in any
/// case, with `-` or `_`.
impl std::str::FromStr for TruncationMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().replace('-', "_").as_str() {
            "keep_end" => Ok(TruncationMode::KeepEnd),
            "keep_start" => Ok(TruncationMode::KeepStart),
            _ => Err(format!("{s:?} must be keep_end or keep_start")),
        }
    }
}

impl std::fmt::Display for TruncationMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TruncationMode::KeepEnd => "keep_end",
            TruncationMode::KeepStart => "keep_start",
        })
    }
}

#[derive(Debug, Clone, Default)]
pub struct TokenizeOptions {
    /// Longest prompt + response, in tokens.
    pub max_length: Option<usize>,
    /// Longest prompt, in tokens (cut first, by `truncation_mode`).
    pub max_prompt_length: Option<usize>,
    pub truncation_mode: TruncationMode,
    /// Put a leading system message at the start of the first user message.
    pub fold_system: bool,
}

/// A row's error message, with a pointer to `--fold_system` when a template refused a row that
/// has a system turn.
fn fold_hint(mut msg: String, pair: &PreferencePair, opts: &TokenizeOptions) -> String {
    let has_system = pair.prompt.first().is_some_and(|m| m.role == "system");
    if has_system && !opts.fold_system && msg.contains("the template raised an exception") {
        msg.push_str("; --fold_system puts the system message into the first user message");
    }
    msg
}

/// `msgs` with a leading system message moved to the start of the first user message (joined
/// by a blank line, as Gemma 3's template joins them); unchanged when there is none.
pub fn fold_system(msgs: &[Message]) -> std::borrow::Cow<'_, [Message]> {
    match msgs {
        [sys, user, rest @ ..] if sys.role == "system" && user.role == "user" => {
            let mut first = user.clone();
            first.content = format!("{}\n\n{}", sys.content, user.content);
            std::borrow::Cow::Owned(std::iter::once(first).chain(rest.iter().cloned()).collect())
        }
        _ => std::borrow::Cow::Borrowed(msgs),
    }
}

/// A tokenised pair: the response ids are the tokens that are scored.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedPair {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    /// Only when the rejected side has its own prompt (with different ids).
    pub rejected_prompt: Option<Vec<u32>>,
    pub row: RowRef,
}

impl TokenizedPair {
    /// The prompt the rejected response follows.
    pub fn rejected_prompt(&self) -> &[u32] {
        self.rejected_prompt.as_deref().unwrap_or(&self.prompt)
    }
}

/// Counts of what [`Preprocessor::prepare`] did: `kept + dropped_identical + dropped_empty ==
/// pairs_in`; `truncated` and `boundary_fallbacks` count kept pairs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PrepareStats {
    pub pairs_in: usize,
    pub kept: usize,
    pub dropped_identical: usize,
    pub dropped_empty: usize,
    pub truncated: usize,
    pub boundary_fallbacks: usize,
}

impl PrepareStats {
    fn absorb(&mut self, o: &PrepareStats) {
        self.pairs_in += o.pairs_in;
        self.kept += o.kept;
        self.dropped_identical += o.dropped_identical;
        self.dropped_empty += o.dropped_empty;
        self.truncated += o.truncated;
        self.boundary_fallbacks += o.boundary_fallbacks;
    }
}

/// Tokenizer + chat template + special ids of one model.
pub struct Preprocessor {
    tokenizer: Tokenizer,
    template: ChatTemplate,
    eos_id: Option<u32>,
    warned_boundary: AtomicBool,
}

impl std::fmt::Debug for Preprocessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Preprocessor")
            .field("template", &self.template)
            .field("eos_id", &self.eos_id)
            .finish()
    }
}

/// The named template whose special tokens the vocabulary has, for models without a template.
fn guess_template(tok: &Tokenizer) -> &'static str {
    let has = |t: &str| tok.token_to_id(t).is_some();
    if has("<|im_start|>") && has("<|im_end|>") {
        "chatml"
    } else if has("<|start_header_id|>") && has("<|eot_id|>") {
        "llama3"
    } else if has("[INST]") && has("[/INST]") {
        "mistral"
    } else {
        "raw"
    }
}

impl Preprocessor {
    /// From a model folder: tokenizer.json + tokenizer_config.json (chat_template, bos/eos
    /// tokens). `template_override`: a named fallback ("chatml", "llama3", "mistral", "raw") or
    /// a Jinja file path. A model without a template and no override gets the named template
    /// that fits its special tokens (raw when none does), with a note on stderr.
    pub fn from_model_dir(dir: &Path, template_override: Option<&str>) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.exists() {
            return Err(Error::MissingFile { path: tok_path });
        }
        let tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| Error::TokenizerLoad {
            path: tok_path.clone(),
            msg: e.to_string(),
        })?;
        let cfg = read_tokenizer_config(dir)?;
        let template = match template_override {
            Some(name) if NAMED_TEMPLATES.contains(&name) => ChatTemplate::named(name, cfg.tokens.clone())?,
            Some(path) => {
                let p = Path::new(path);
                if !p.is_file() {
                    return Err(Error::TemplateSpec {
                        spec: path.into(),
                        known: NAMED_TEMPLATES.join(", "),
                    });
                }
                let src = crate::error::read_to_string(p)?;
                ChatTemplate::new(&src, path, cfg.tokens.clone())?
            }
            None => match (&cfg.chat_template, &cfg.template_file) {
                (Some(src), file) => ChatTemplate::new(
                    src,
                    file.clone().unwrap_or_else(|| "tokenizer_config.json".into()),
                    cfg.tokens.clone(),
                )?,
                (None, _) => {
                    let name = guess_template(&tokenizer);
                    eprintln!(
                        "note: {} has no chat template; using the `{name}` template (choose another with a template override)",
                        dir.display()
                    );
                    ChatTemplate::named(name, cfg.tokens.clone())?
                }
            },
        };
        Self::new(tokenizer, template)
    }

    /// From parts (the EOS id comes from the template's eos token).
    pub fn new(tokenizer: Tokenizer, template: ChatTemplate) -> Result<Self> {
        let eos_id = template.tokens().eos.as_deref().and_then(|t| tokenizer.token_to_id(t));
        Ok(Preprocessor {
            tokenizer,
            template,
            eos_id,
            warned_boundary: AtomicBool::new(false),
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_id
    }

    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.template.render(messages, add_generation_prompt)
    }

    /// Token ids of `text`, without adding special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::Tokenizer { msg: e.to_string() })
    }

    /// Prompt ids (rendered with the generation prompt).
    fn prompt_ids(&self, prompt: &[Message]) -> Result<Vec<u32>> {
        self.encode(&self.render(prompt, true)?)
    }

    /// The ids `prompt + response` adds after `prompt_ids`; on a boundary mismatch, the response
    /// text tokenised alone + EOS (second value true).
    fn response_ids(&self, prompt: &[Message], prompt_ids: &[u32], response: &[Message]) -> Result<(Vec<u32>, bool)> {
        let mut full_msgs = Vec::with_capacity(prompt.len() + response.len());
        full_msgs.extend_from_slice(prompt);
        full_msgs.extend_from_slice(response);
        let full = self.encode(&self.render(&full_msgs, false)?)?;
        if full.len() > prompt_ids.len() && full.starts_with(prompt_ids) {
            return Ok((full[prompt_ids.len()..].to_vec(), false));
        }
        if !self.warned_boundary.swap(true, Ordering::Relaxed) {
            eprintln!(
                "warning: with {}, the tokens of prompt + response do not start with the tokens of the prompt \
                 (BPE merges across the boundary, or the template rewrites earlier turns); such responses \
                 are tokenised on their own and end with EOS (counted as boundary fallbacks)",
                self.template.origin()
            );
        }
        let text: Vec<&str> = response.iter().map(|m| m.content.as_str()).collect();
        let mut ids = self.encode(&text.join("\n"))?;
        ids.extend(self.eos_id);
        Ok((ids, true))
    }

    /// Prompt, chosen, rejected prompt (when it differs) and rejected ids of a pair, untruncated,
    /// and whether a response boundary fell back to the response text alone.
    #[allow(clippy::type_complexity)]
    fn tokenize_sides(
        &self,
        pair: &PreferencePair,
        fold: bool,
    ) -> Result<(Vec<u32>, Vec<u32>, Option<Vec<u32>>, Vec<u32>, bool)> {
        let folded = |msgs: &'_ [Message]| -> Vec<Message> {
            if fold {
                fold_system(msgs).into_owned()
            } else {
                msgs.to_vec()
            }
        };
        let prompt_msgs = folded(&pair.prompt);
        let prompt = self.prompt_ids(&prompt_msgs)?;
        let (chosen, fb_c) = self.response_ids(&prompt_msgs, &prompt, &pair.chosen)?;
        let (rejected_prompt, rejected, fb_r) = match pair.rejected_prompt.as_deref().map(folded) {
            Some(rp) => {
                let rp_ids = self.prompt_ids(&rp)?;
                let (r, fb) = self.response_ids(&rp, &rp_ids, &pair.rejected)?;
                (Some(rp_ids).filter(|ids| *ids != prompt), r, fb)
            }
            None => {
                let (r, fb) = self.response_ids(&prompt_msgs, &prompt, &pair.rejected)?;
                (None, r, fb)
            }
        };
        Ok((prompt, chosen, rejected_prompt, rejected, fb_c || fb_r))
    }

    /// Tokenise, check the boundary, truncate. `Ok(None)` when the pair is dropped (stats say
    /// why). Template and tokenizer failures are errors naming the row.
    pub fn tokenize_pair(
        &self,
        row: &RowRef,
        pair: &PreferencePair,
        opts: &TokenizeOptions,
        stats: &mut PrepareStats,
    ) -> Result<Option<TokenizedPair>> {
        stats.pairs_in += 1;
        let blank = |msgs: &[Message]| msgs.iter().all(|m| m.content.trim().is_empty());
        if blank(&pair.chosen) || blank(&pair.rejected) {
            stats.dropped_empty += 1;
            return Ok(None);
        }
        let at_row = |e: Error| Error::DataRow {
            row: row.to_string(),
            msg: fold_hint(e.to_string(), pair, opts),
        };
        let (mut prompt, mut chosen, mut rejected_prompt, mut rejected, fallback) =
            self.tokenize_sides(pair, opts.fold_system).map_err(at_row)?;

        // Same prompt (no separate rejected prompt survives when the ids agree) and same response.
        let identical = |c: &[u32], r: &[u32], rp: &Option<Vec<u32>>| c == r && rp.is_none();
        if identical(&chosen, &rejected, &rejected_prompt) {
            stats.dropped_identical += 1;
            return Ok(None);
        }

        let mut truncated = cut_prompt(&mut prompt, opts.max_prompt_length, opts.truncation_mode);
        if let Some(rp) = &mut rejected_prompt {
            truncated |= cut_prompt(rp, opts.max_prompt_length, opts.truncation_mode);
        }
        if rejected_prompt.as_ref() == Some(&prompt) {
            rejected_prompt = None;
        }
        if let Some(max) = opts.max_length {
            let rp_len = rejected_prompt.as_ref().map_or(prompt.len(), Vec::len);
            for (resp, p_len) in [(&mut chosen, prompt.len()), (&mut rejected, rp_len)] {
                if p_len + resp.len() > max {
                    resp.truncate(max.saturating_sub(p_len));
                    truncated = true;
                }
            }
        }
        if chosen.is_empty() || rejected.is_empty() {
            stats.dropped_empty += 1;
            return Ok(None);
        }
        // Cutting both responses to the same length can make them equal.
        if truncated && identical(&chosen, &rejected, &rejected_prompt) {
            stats.dropped_identical += 1;
            return Ok(None);
        }
        stats.kept += 1;
        stats.truncated += usize::from(truncated);
        stats.boundary_fallbacks += usize::from(fallback);
        Ok(Some(TokenizedPair {
            prompt,
            chosen,
            rejected,
            rejected_prompt,
            row: row.clone(),
        }))
    }

    /// All pairs, in order, tokenised on up to 8 threads.
    pub fn prepare(
        &self,
        pairs: &[(RowRef, PreferencePair)],
        opts: &TokenizeOptions,
    ) -> Result<(Vec<TokenizedPair>, PrepareStats)> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 8);
        let threads = threads.min(pairs.len().div_ceil(64)).max(1);
        let chunk = pairs.len().div_ceil(threads).max(1);
        let run = |part: &[(RowRef, PreferencePair)]| -> Result<(Vec<TokenizedPair>, PrepareStats)> {
            let mut stats = PrepareStats::default();
            let mut out = Vec::with_capacity(part.len());
            for (row, pair) in part {
                if let Some(t) = self.tokenize_pair(row, pair, opts, &mut stats)? {
                    out.push(t);
                }
            }
            Ok((out, stats))
        };
        let results: Vec<Result<(Vec<TokenizedPair>, PrepareStats)>> = if threads == 1 {
            vec![run(pairs)]
        } else {
            std::thread::scope(|s| {
                let handles: Vec<_> = pairs.chunks(chunk).map(|part| s.spawn(move || run(part))).collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            // internal invariant: tokenising does not panic
                            .unwrap_or_else(|_| Err(Error::Msg("tokenising thread panicked".into())))
                    })
                    .collect()
            })
        };
        let mut out = Vec::with_capacity(pairs.len());
        let mut stats = PrepareStats::default();
        for r in results {
            let (part, s) = r?;
            out.extend(part);
            stats.absorb(&s);
        }
        Ok((out, stats))
    }
}

/// Cut a prompt to `max` tokens; true when something was cut.
fn cut_prompt(ids: &mut Vec<u32>, max: Option<usize>, mode: TruncationMode) -> bool {
    match max {
        Some(max) if ids.len() > max => {
            match mode {
                TruncationMode::KeepEnd => {
                    ids.drain(..ids.len() - max);
                }
                TruncationMode::KeepStart => ids.truncate(max),
            }
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_mode_parses() {
        assert_eq!("keep_end".parse::<TruncationMode>().unwrap(), TruncationMode::KeepEnd);
        assert_eq!(
            "keep-start".parse::<TruncationMode>().unwrap(),
            TruncationMode::KeepStart
        );
        assert!("middle"
            .parse::<TruncationMode>()
            .unwrap_err()
            .to_string()
            .contains("keep_end"));
        assert_eq!(TruncationMode::KeepStart.to_string(), "keep_start");
    }

    #[test]
    fn prompts_are_cut_at_the_chosen_end() {
        let mut a = vec![1, 2, 3, 4, 5];
        assert!(cut_prompt(&mut a, Some(3), TruncationMode::KeepEnd));
        assert_eq!(a, [3, 4, 5]);
        let mut b = vec![1, 2, 3, 4, 5];
        assert!(cut_prompt(&mut b, Some(3), TruncationMode::KeepStart));
        assert_eq!(b, [1, 2, 3]);
        assert!(!cut_prompt(&mut b, Some(3), TruncationMode::KeepStart));
        assert!(!cut_prompt(&mut b, None, TruncationMode::KeepStart));
    }
}
