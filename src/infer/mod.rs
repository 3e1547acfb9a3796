//! `lorafold infer`: generation with the KV cache, sampling, chat templates.
//!
//! ```text
//! sampling.rs   logits processors (transformers' semantics and order) and the seeded sampler
//! generate.rs   the decoding loop over a Session (model + adapter choice + KV cache), streaming
//! mod.rs        the command: one prompt, a JSONL file of prompts, or an interactive chat
//! ```

pub mod generate;
pub mod sampling;

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::time::Instant;

use serde_json::{json, Value};

use crate::cli::InferArgs;
use crate::data::tokenize::Preprocessor;
use crate::data::Message;
use crate::error::{Error, Result};
use crate::model::linear::Fwd;
use crate::model::Model;
pub use generate::{generate, FinishReason, GenerateOptions, Generation, Session, TextStream};
pub use sampling::{Sampler, SamplingParams};

/// Run `lorafold infer`: one prompt, a file of prompts, or an interactive chat.
pub fn run(args: &InferArgs) -> Result<()> {
    // Read the prompts first: a bad line is reported before the model is loaded.
    let batch = match &args.prompts {
        Some(p) => Some(read_prompts(p)?),
        None => None,
    };
    let files = crate::hub::resolve_model(&args.model, args.revision.as_deref())?;
    let template = if args.no_chat_template {
        Some("raw")
    } else {
        args.template.as_deref()
    };
    let pre = Preprocessor::from_model_dir(&files.dir, template)?;
    let gen_cfg = GenerationConfig::read(files.generation_config().as_deref())?;
    let sampling = sampling_params(args, &gen_cfg);
    sampling.validate()?;
    if let Some(dir) = &args.adapters {
        check_adapter_folder(dir, &args.model)?;
    }
    // Everything cheap is checked; now the weights.
    let dtype = crate::model::load::parse_dtype_flag(&args.dtype)?;
    let mut m = crate::model::load::load_model(&files.config, &files.weights, dtype).map_err(|e| Error::Context {
        what: format!("loading model {}", files.dir.display()),
        inner: Box::new(e),
    })?;
    let adapter_slot = match &args.adapters {
        Some(dir) => Some(crate::lora::io::load_adapter(&mut m, dir, false)?.slot),
        None => None,
    };
    let stop_tokens = if args.ignore_eos {
        Vec::new()
    } else {
        stop_tokens(&gen_cfg, &m, &pre)
    };
    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens.or(gen_cfg.max_new_tokens).unwrap_or(512),
        stop_tokens,
        sampling,
        use_cache: true,
    };
    let sides: Vec<(&str, Fwd)> = match (adapter_slot, args.compare) {
        (Some(slot), true) => vec![("base", Fwd::base()), ("adapter", Fwd::eval(slot))],
        (Some(slot), false) => vec![("adapter", Fwd::eval(slot))],
        (None, _) => vec![("base", Fwd::base())],
    };
    eprintln!("{}", describe(&files.name, &m, args.adapters.as_deref(), &opts));

    let inf = Inference {
        model: &m,
        pre: &pre,
        opts,
        system: args.system.clone(),
        fold_system: args.fold_system,
        sides,
        compare: args.compare,
        stop: None,
    };
    match (&args.prompt, batch) {
        (Some(p), _) => inf.one_prompt(p),
        (None, Some(items)) => inf.prompt_file(&items, args.output.as_deref()),
        (None, None) => {
            // In a chat, Ctrl-C stops the answer being written, not the session.
            let mut inf = inf;
            inf.stop = Some(crate::util::install_ctrlc(
                "interrupt: answer stopped (Ctrl-C again to exit; /exit quits)",
            ));
            inf.chat(std::io::stdin().lock())
        }
    }
}

/// `--adapters` must be a PEFT adapter folder; one trained on another base gets a note.
fn check_adapter_folder(dir: &Path, model: &str) -> Result<()> {
    let cfg = dir.join(crate::lora::io::CONFIG_FILE);
    if !cfg.is_file() {
        return Err(Error::Adapter {
            path: cfg,
            msg: "required file is missing (--adapters must be a PEFT adapter folder)".into(),
        });
    }
    if let Some(note) = crate::lora::io::base_mismatch_note(dir, model) {
        eprintln!("{note}");
    }
    Ok(())
}

/// Sampling settings: the flags, else generation_config.json's, else transformers' defaults
/// (greedy unless the config sets do_sample).
fn sampling_params(args: &InferArgs, gen_cfg: &GenerationConfig) -> SamplingParams {
    let default_temperature = if gen_cfg.do_sample == Some(true) {
        gen_cfg.temperature.unwrap_or(1.0)
    } else {
        0.0
    };
    SamplingParams {
        temperature: args.temperature.unwrap_or(default_temperature),
        top_k: args.top_k.or(gen_cfg.top_k).unwrap_or(50),
        top_p: args.top_p.or(gen_cfg.top_p).unwrap_or(1.0),
        repetition_penalty: args.repetition_penalty.or(gen_cfg.repetition_penalty).unwrap_or(1.0),
        seed: args.seed,
    }
}

/// The sampling-relevant fields of generation_config.json.
#[derive(Debug, Default, serde::Deserialize)]
struct GenerationConfig {
    eos_token_id: Option<Value>,
    do_sample: Option<bool>,
    temperature: Option<f64>,
    top_k: Option<usize>,
    top_p: Option<f64>,
    repetition_penalty: Option<f64>,
    max_new_tokens: Option<usize>,
}

impl GenerationConfig {
    fn read(path: Option<&Path>) -> Result<GenerationConfig> {
        Ok(match path {
            Some(p) => crate::error::read_json_named(p, &serde_json::json!({}))?,
            None => GenerationConfig::default(),
        })
    }
}

/// Token ids in a config value that is an id or a list of ids.
fn ids_of(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| x as u32).into_iter().collect(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
        _ => Vec::new(),
    }
}

/// EOS / end-of-turn ids: generation_config.json's eos_token_id (an id or a list), config.json's,
/// and the tokenizer's eos token.
fn stop_tokens(gen: &GenerationConfig, model: &Model, pre: &Preprocessor) -> Vec<u32> {
    let mut ids = ids_of(gen.eos_token_id.as_ref());
    ids.extend(&model.cfg.eos_token_ids);
    ids.extend(pre.eos_token_id());
    let mut seen = std::collections::HashSet::new();
    ids.retain(|x| seen.insert(*x));
    ids
}

fn describe(name: &str, m: &Model, adapter: Option<&Path>, o: &GenerateOptions) -> String {
    let s = &o.sampling;
    let how = if s.is_greedy() {
        "greedy".to_string()
    } else {
        format!(
            "sampling (temperature {}, top_k {}, top_p {}, seed {})",
            s.temperature, s.top_k, s.top_p, s.seed
        )
    };
    let rep = if s.repetition_penalty != 1.0 {
        format!(", repetition_penalty {}", s.repetition_penalty)
    } else {
        String::new()
    };
    let adapter = adapter
        .map(|a| format!(" + adapter {}", a.display()))
        .unwrap_or_default();
    format!(
        "{name}{adapter} ({:?}, {:?}); {how}{rep}; max_new_tokens {}; stop tokens {:?}",
        m.cfg.arch,
        m.dtype(),
        o.max_new_tokens,
        o.stop_tokens
    )
}

/// One prompt of a --prompts file.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptItem {
    /// 1-based line number.
    pub line: usize,
    pub messages: Vec<Message>,
    /// The line as given (a JSON value, or the plain text as a string).
    pub source: Value,
}

/// Read a --prompts file; errors name the file and line.
pub fn read_prompts(path: &Path) -> Result<Vec<PromptItem>> {
    let bytes = std::fs::read(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound { path: path.into() }
        } else {
            Error::io(path, e)
        }
    })?;
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let mut items = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let bad_line = |msg: String| Error::PromptLine {
            path: path.into(),
            line: i + 1,
            msg,
        };
        let line = std::str::from_utf8(raw).map_err(|e| {
            bad_line(format!(
                "not valid UTF-8 text (byte {} of the line)",
                e.valid_up_to() + 1
            ))
        })?;
        let line = line.strip_suffix('\r').unwrap_or(line);
        let parsed = parse_prompt_line(line).map_err(|e| bad_line(e.to_string()))?;
        if let Some((messages, source)) = parsed {
            items.push(PromptItem {
                line: i + 1,
                messages,
                source,
            });
        }
    }
    if items.is_empty() {
        return Err(Error::NoPrompts { path: path.into() });
    }
    Ok(items)
}

/// One line of a prompts file: `{"prompt"|"query": "...", "system"?: "..."}`,
/// `{"messages": [{"role", "content"}, ...]}`, a list of messages, a JSON string, or plain text
/// (a line not starting with `{`, `[` or `"`). Blank lines: `Ok(None)`.
pub fn parse_prompt_line(line: &str) -> std::result::Result<Option<(Vec<Message>, Value)>, String> {
    let t = line.trim();
    if t.is_empty() {
        return Ok(None);
    }
    if !t.starts_with(['{', '[', '"']) {
        return Ok(Some((vec![Message::user(line)], Value::String(line.to_string()))));
    }
    let v: Value = serde_json::from_str(t).map_err(|e| format!("invalid JSON: {e}"))?;
    let messages = match &v {
        Value::String(s) => vec![Message::user(s.clone())],
        Value::Array(_) => parse_messages(&v)?,
        Value::Object(o) => {
            if let Some(m) = o.get("messages") {
                parse_messages(m)?
            } else {
                let text = match (o.get("prompt"), o.get("query")) {
                    (Some(p), _) | (None, Some(p)) => p.as_str().ok_or("\"prompt\" must be a string")?,
                    (None, None) => {
                        return Err(format!(
                            "expected {{\"prompt\": \"...\"}} or {{\"messages\": [...]}}, found keys {:?}",
                            o.keys().collect::<Vec<_>>()
                        ))
                    }
                };
                let mut msgs = Vec::new();
                if let Some(s) = o.get("system") {
                    msgs.push(Message::system(s.as_str().ok_or("\"system\" must be a string")?));
                }
                msgs.push(Message::user(text));
                msgs
            }
        }
        _ => return Err("expected a JSON object, a list of messages or a string".into()),
    };
    Ok(Some((messages, v)))
}

fn parse_messages(v: &Value) -> std::result::Result<Vec<Message>, String> {
    let arr = v.as_array().ok_or("\"messages\" must be a list")?;
    if arr.is_empty() {
        return Err("\"messages\" is empty".into());
    }
    arr.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m.get("role").and_then(Value::as_str);
            let content = m.get("content").and_then(Value::as_str);
            match (role, content) {
                (Some(r @ ("system" | "user" | "assistant")), Some(c)) => Ok(Message::new(r, c)),
                (Some(r), Some(_)) => Err(format!("message {i}: role {r:?} is not system, user or assistant")),
                _ => Err(format!("message {i}: needs string \"role\" and \"content\"")),
            }
        })
        .collect()
}

/// A loaded model, its tokenizer and template, and what to generate.
struct Inference<'a> {
    model: &'a Model,
    pre: &'a Preprocessor,
    opts: GenerateOptions,
    system: Option<String>,
    /// Put a system message into the first user message (`--fold_system`).
    fold_system: bool,
    /// (label, adapter choice) of each answer: one, or base and adapter with --compare.
    sides: Vec<(&'static str, Fwd)>,
    compare: bool,
    /// Set by Ctrl-C during a chat: the answer being generated stops.
    stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl Inference<'_> {
    /// Token ids of a conversation, ready for the assistant's answer.
    fn prompt_ids(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let mut msgs = Vec::with_capacity(messages.len() + 1);
        if let (Some(s), false) = (&self.system, messages.first().is_some_and(|m| m.role == "system")) {
            msgs.push(Message::system(s.clone()));
        }
        msgs.extend_from_slice(messages);
        if self.fold_system {
            msgs = crate::data::tokenize::fold_system(&msgs).into_owned();
        }
        let text = self.pre.render(&msgs, true)?;
        let ids = self.pre.encode(&text)?;
        if ids.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        Ok(ids)
    }

    /// Generate on `session`, streaming the text to `out` when given.
    fn answer(
        &self,
        session: &mut Session,
        ids: &[u32],
        opts: &GenerateOptions,
        mut out: Option<&mut dyn Write>,
    ) -> Result<(Generation, String)> {
        let max_pos = self.model.cfg.max_position_embeddings;
        if ids.len() + opts.max_new_tokens > max_pos {
            eprintln!(
                "warning: {} prompt tokens + up to {} new ones go past the model's max_position_embeddings ({max_pos})",
                ids.len(),
                opts.max_new_tokens
            );
        }
        let mut stream = TextStream::new(self.pre.tokenizer());
        let t0 = Instant::now();
        let stop = &opts.stop_tokens;
        let interrupted = || crate::util::is_set(self.stop.as_ref());
        let mut first: Option<Instant> = None;
        let g = session.generate(ids, opts, |tok| {
            first.get_or_insert_with(Instant::now);
            if interrupted() {
                return Err(Error::Interrupted {
                    what: "answering".into(),
                });
            }
            if stop.contains(&tok) {
                return Ok(());
            }
            if let (Some(w), Some(piece)) = (out.as_mut(), stream.push(tok)?) {
                w.write_all(piece.as_bytes()).and_then(|_| w.flush()).map_err(console)?;
            }
            Ok(())
        })?;
        if let (Some(w), Some(piece)) = (out.as_mut(), stream.finish()?) {
            w.write_all(piece.as_bytes()).map_err(console)?;
        }
        if let Some(w) = out.as_mut() {
            // End the answer's line before the statistics line (on stderr) is printed.
            writeln!(w).map_err(console)?;
            w.flush().map_err(console)?;
        }
        let text = generate::decode(self.pre.tokenizer(), answer_tokens(&g, stop))?;
        if out.is_some() {
            // The prompt's prefill ends with the first new token; the rate is of the tokens after it.
            let first = first.unwrap_or_else(Instant::now);
            let decode_s = first.elapsed().as_secs_f64();
            eprintln!(
                "[{} prompt + {} new tokens, {}; prefill {:.2}s, then {:.1} tokens/s]",
                ids.len(),
                g.tokens.len(),
                g.finish.as_str(),
                (first - t0).as_secs_f64(),
                g.tokens.len().saturating_sub(1) as f64 / decode_s.max(1e-9)
            );
        }
        Ok((g, text))
    }

    fn one_prompt(&self, prompt: &str) -> Result<()> {
        let ids = self.prompt_ids(&[Message::user(prompt)])?;
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        for (label, ctx) in &self.sides {
            if self.compare {
                writeln!(out, "=== {label} ===").map_err(console)?;
            }
            let mut session = Session::new(self.model, *ctx);
            self.answer(&mut session, &ids, &self.opts, Some(&mut out))?;
            if self.compare {
                writeln!(out).map_err(console)?;
            }
        }
        Ok(())
    }

    fn prompt_file(&self, items: &[PromptItem], output: Option<&Path>) -> Result<()> {
        let mut w: Box<dyn Write> = match output {
            Some(p) => Box::new(std::io::BufWriter::new(
                std::fs::File::create(p).map_err(|e| Error::io(p, e))?,
            )),
            None => Box::new(std::io::stdout().lock()),
        };
        // One session per side for the whole file: prompts sharing a prefix (a system prompt)
        // reuse its cached keys and values.
        let mut sessions: Vec<Session> = self
            .sides
            .iter()
            .map(|(_, ctx)| Session::new(self.model, *ctx))
            .collect();
        for (n, item) in items.iter().enumerate() {
            let ids = self.prompt_ids(&item.messages).map_err(|e| Error::Context {
                what: format!("prompt on line {}", item.line),
                inner: Box::new(e),
            })?;
            let mut answers = Vec::new();
            for ((label, _), session) in self.sides.iter().zip(sessions.iter_mut()) {
                let (g, text) = self.answer(session, &ids, &self.opts, None)?;
                answers.push((*label, g, text));
            }
            let one = |g: &Generation, text: &str| json!({"token_ids": g.tokens, "text": text, "finish_reason": g.finish.as_str()});
            let mut row = serde_json::Map::new();
            row.insert("index".into(), n.into());
            row.insert("line".into(), item.line.into());
            row.insert("prompt".into(), item.source.clone());
            row.insert("prompt_tokens".into(), ids.len().into());
            for (label, g, text) in &answers {
                match (self.compare, one(g, text)) {
                    (false, Value::Object(fields)) => row.extend(fields),
                    (_, v) => {
                        row.insert((*label).to_string(), v);
                    }
                }
            }
            let row = Value::Object(row);
            writeln!(w, "{row}").map_err(console)?;
            w.flush().map_err(console)?;
            if output.is_some() {
                eprintln!("prompt {}/{} done", n + 1, items.len());
            }
        }
        Ok(())
    }

    /// Re-arm Ctrl-C after an interrupt was handled.
    fn clear_stop(&self) {
        crate::util::clear(self.stop.as_ref());
    }

    /// Interactive chat over `input` (stdin): one user turn per line.
    fn chat(&self, input: impl BufRead) -> Result<()> {
        let tty = std::io::stdin().is_terminal();
        if tty {
            eprintln!("chat: type a message; /reset starts over, /exit quits");
        }
        let mut histories: Vec<Vec<Message>> = vec![Vec::new(); self.sides.len()];
        let mut sessions: Vec<Session> = self
            .sides
            .iter()
            .map(|(_, ctx)| Session::new(self.model, *ctx))
            .collect();
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        let mut turn = 0u64;
        let mut lines = input.lines();
        loop {
            if tty {
                eprint!("> ");
                std::io::stderr().flush().map_err(console)?;
            }
            let Some(line) = lines.next() else { break };
            let line = line.map_err(|e| Error::io("<stdin>", e))?;
            // A Ctrl-C at the prompt stopped nothing; it must not stop the next answer.
            self.clear_stop();
            let text = line.trim();
            match text {
                "" => continue,
                "/exit" | "/quit" => break,
                "/reset" => {
                    histories.iter_mut().for_each(Vec::clear);
                    sessions.iter_mut().for_each(Session::reset);
                    eprintln!("(new conversation)");
                    continue;
                }
                t if t.starts_with('/') && !t.contains(' ') => {
                    eprintln!("unknown command {t} (commands: /reset, /exit)");
                    continue;
                }
                _ => {}
            }
            let mut opts = self.opts.clone();
            opts.sampling.seed = self.opts.sampling.seed.wrapping_add(turn);
            turn += 1;
            for (((label, _), session), history) in self.sides.iter().zip(sessions.iter_mut()).zip(histories.iter_mut())
            {
                history.push(Message::user(text));
                let ids = match self.prompt_ids(history) {
                    Ok(ids) => ids,
                    Err(e) => {
                        // A template that refuses the conversation: drop the turn, keep chatting.
                        history.pop();
                        eprintln!("error: {e:#}");
                        continue;
                    }
                };
                if self.compare {
                    writeln!(out, "=== {label} ===").map_err(console)?;
                }
                let text = match self.answer(session, &ids, &opts, Some(&mut out)) {
                    Ok((_, text)) => text,
                    Err(Error::Interrupted { .. }) => {
                        // Drop the turn and its half-written cache; the chat goes on.
                        history.pop();
                        session.reset();
                        self.clear_stop();
                        writeln!(out).map_err(console)?;
                        break;
                    }
                    Err(e) => return Err(e),
                };
                if self.compare {
                    writeln!(out).map_err(console)?;
                }
                history.push(Message::assistant(text));
            }
        }
        Ok(())
    }
}

/// The answer's tokens without the stop token that ended it.
fn answer_tokens<'g>(g: &'g Generation, stop: &[u32]) -> &'g [u32] {
    match (g.finish, g.tokens.split_last()) {
        (FinishReason::Stop, Some((last, rest))) if stop.contains(last) => rest,
        _ => &g.tokens,
    }
}

/// A failed write to the terminal or the answers file.
fn console(e: std::io::Error) -> Error {
    Error::Msg(format!("writing output: {e}"))
}
