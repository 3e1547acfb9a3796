//! Chat templates: Hugging Face Jinja templates rendered with minijinja the way transformers'
//! `apply_chat_template` renders them, plus named fallbacks for models without one.
//!
//! Environment as in transformers: trim_blocks and lstrip_blocks on, no trailing newline kept,
//! loop controls, Python string/dict methods (`.strip()`, `.startswith()`, `.items()` ...),
//! `raise_exception`, `strftime_now`, and a `tojson` filter that writes like Python's
//! `json.dumps(..., ensure_ascii=False)`. The context holds `messages`, `add_generation_prompt`,
//! `tools`/`documents` (none) and the special tokens that are set. Work is bounded: a template
//! that loops for too long runs out of fuel, and output is capped.

use std::path::Path;

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind};
use serde_json::Value as Json;

use super::Message;
use crate::error::{Error, Result};

/// Instructions a single render may execute. Real templates need a few hundred per message.
const FUEL: u64 = 5_000_000;
/// Output larger than this (plus the size of the messages) is refused. The values a template
/// builds (strings, lists, namespaces) are held to the same bound.
const MAX_OUTPUT: usize = 16 << 20;

thread_local! {
    /// The memory bound of the render running on this thread (0: none running).
    static VALUE_LIMIT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// The `messages` list the render was given: already inside the bound, so the guards skip it
    /// (recognised by identity, not by name: a template cannot forge it).
    static GIVEN_MESSAGES: std::cell::RefCell<Option<Value>> = const { std::cell::RefCell::new(None) };
}

/// Names of the functions the guards call (see [`inject_guards`]).
const GUARD: &str = "__lorafold_value_guard";
const GUARD_ALL: &str = "__lorafold_scope_guard";
/// Marks errors made by the guards.
const GREW: &str = "values grew: ";

/// Special-token strings from tokenizer_config.json (each may be unset).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub pad: Option<String>,
    pub unk: Option<String>,
}

/// What tokenizer_config.json (and chat_template.jinja / chat_template.json beside it) says
/// about chat rendering.
#[derive(Debug, Clone, Default)]
pub struct TokenizerConfig {
    pub chat_template: Option<String>,
    /// The file the template came from, for messages.
    pub template_file: Option<String>,
    pub tokens: SpecialTokens,
}

/// A token in tokenizer_config.json: a string, an AddedToken object `{"content": ...}`, or null.
fn token_string(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    }
}

/// `chat_template`: a string, or a list of `{name, template}` (the one named "default").
fn template_value(v: &Json, file: &str) -> Result<Option<String>> {
    match v {
        Json::Null => Ok(None),
        Json::String(s) => Ok(Some(s.clone())),
        Json::Array(items) => {
            let mut names = Vec::new();
            for it in items {
                let name = it.get("name").and_then(Json::as_str).unwrap_or("");
                if name == "default" {
                    return match it.get("template") {
                        Some(Json::String(t)) => Ok(Some(t.clone())),
                        _ => Err(Error::Config {
                            path: file.into(),
                            key: "chat_template".into(),
                            msg: "the `default` entry has no string `template`".into(),
                        }),
                    };
                }
                names.push(name.to_string());
            }
            Err(Error::Config {
                path: file.into(),
                key: "chat_template".into(),
                msg: format!(
                    "a list of templates without one named `default` (found: {}); choose one with a template override",
                    names.join(", ")
                ),
            })
        }
        _ => Err(Error::Config {
            path: file.into(),
            key: "chat_template".into(),
            msg: "must be a string or a list of {name, template}".into(),
        }),
    }
}

/// Read the chat template and special tokens of a model folder. Missing files mean "not set".
/// Like transformers, `chat_template.jinja` (then `chat_template.json`) beside the tokenizer
/// takes precedence over tokenizer_config.json's `chat_template`.
pub fn read_tokenizer_config(dir: &Path) -> Result<TokenizerConfig> {
    let mut cfg = TokenizerConfig::default();
    let tc = dir.join("tokenizer_config.json");
    if tc.exists() {
        let v: Json = crate::error::read_json(&tc)?;
        let name = tc.display().to_string();
        cfg.tokens = SpecialTokens {
            bos: token_string(v.get("bos_token")),
            eos: token_string(v.get("eos_token")),
            pad: token_string(v.get("pad_token")),
            unk: token_string(v.get("unk_token")),
        };
        if let Some(t) = v.get("chat_template") {
            cfg.chat_template = template_value(t, &name)?;
            cfg.template_file = Some(name);
        }
    }
    let jinja = dir.join("chat_template.jinja");
    let json = dir.join("chat_template.json");
    if jinja.exists() {
        cfg.chat_template = Some(crate::error::read_to_string(&jinja)?);
        cfg.template_file = Some(jinja.display().to_string());
    } else if json.exists() {
        let v: Json = crate::error::read_json(&json)?;
        let name = json.display().to_string();
        if let Some(t) = v.get("chat_template") {
            cfg.chat_template = template_value(t, &name)?;
            cfg.template_file = Some(name);
        }
    }
    if cfg.chat_template.is_none() {
        cfg.template_file = None;
    }
    Ok(cfg)
}

// ---------------------------------------------------------------------------------------------
// Named templates
// ---------------------------------------------------------------------------------------------

/// The names accepted by [`named_template`].
pub const NAMED_TEMPLATES: [&str; 4] = ["chatml", "llama3", "mistral", "raw"];

/// The source of a named fallback template: `chatml`, `llama3`, `mistral`, or `raw` (BOS, then
/// the message contents concatenated, for base models).
pub fn named_template(name: &str) -> Option<&'static str> {
    match name {
        "chatml" => Some(include_str!("templates/chatml.jinja")),
        "llama3" => Some(include_str!("templates/llama3.jinja")),
        "mistral" => Some(include_str!("templates/mistral.jinja")),
        "raw" => Some(include_str!("templates/raw.jinja")),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------------

/// A compiled chat template with the special tokens it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    origin: String,
    tokens: SpecialTokens,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("tokens", &self.tokens)
            .finish()
    }
}

#[derive(serde::Serialize)]
struct Context<'a> {
    messages: &'a [Message],
    add_generation_prompt: bool,
    tools: Option<()>,
    documents: Option<()>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bos_token: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    eos_token: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pad_token: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    unk_token: Option<&'a str>,
}

impl ChatTemplate {
    /// Compile `source`. `origin` names where it came from in error messages (a file, or
    /// "the chatml fallback").
    pub fn new(source: &str, origin: impl Into<String>, tokens: SpecialTokens) -> Result<Self> {
        let origin = origin.into();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_fuel(Some(FUEL));
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(capped_methods);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_function(GUARD, value_guard);
        env.add_function(GUARD_ALL, value_guard_all);
        env.add_filter("tojson", tojson);
        env.add_filter("replace", capped_replace);
        env.add_filter("indent", capped_indent);
        // Parse the template as written first, so that syntax errors point at its own lines.
        let source = rewrite_generation_tags(source);
        Environment::new()
            .template_from_str(&source)
            .map_err(|e| Error::Msg(format!("{origin}: cannot parse the chat template: {}", one_line(&e))))?;
        // The guarded form parses whenever the original does; should it ever not, the template
        // still runs, bounded by fuel and the output cap only.
        if env.add_template_owned("chat_template", inject_guards(&source)).is_err() {
            env.add_template_owned("chat_template", source)
                .map_err(|e| Error::Msg(format!("{origin}: cannot parse the chat template: {}", one_line(&e))))?;
        }
        Ok(ChatTemplate { env, origin, tokens })
    }

    /// A named fallback template (see [`named_template`]).
    pub fn named(name: &str, tokens: SpecialTokens) -> Result<Self> {
        let src = named_template(name).ok_or_else(|| {
            Error::Msg(format!(
                "unknown chat template name `{name}` (known: {}; or give a Jinja file path)",
                NAMED_TEMPLATES.join(", ")
            ))
        })?;
        Self::new(src, format!("the `{name}` chat template"), tokens)
    }

    /// Where the template came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub fn tokens(&self) -> &SpecialTokens {
        &self.tokens
    }

    /// Render `messages` as transformers' `apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=...)` does.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let err = |msg: String| Error::Msg(format!("{}: chat template: {msg}", self.origin));
        let tmpl = self.env.get_template("chat_template").map_err(|e| err(e.to_string()))?;
        let ctx = Context {
            messages,
            add_generation_prompt,
            tools: None,
            documents: None,
            bos_token: self.tokens.bos.as_deref(),
            eos_token: self.tokens.eos.as_deref(),
            pad_token: self.tokens.pad.as_deref(),
            unk_token: self.tokens.unk.as_deref(),
        };
        let limit = MAX_OUTPUT + 4 * messages.iter().map(|m| m.content.len()).sum::<usize>();
        let mut out = CappedWriter { buf: Vec::new(), limit };
        let root = Value::from_serialize(&ctx);
        let given = root.get_attr("messages").ok();
        let outer = VALUE_LIMIT.with(|l| l.replace(limit));
        let outer_messages = GIVEN_MESSAGES.with(|m| m.replace(given));
        let rendered = tmpl.render_captured_to(root, &mut out);
        VALUE_LIMIT.with(|l| l.set(outer));
        GIVEN_MESSAGES.with(|m| m.replace(outer_messages));
        if let Err(e) = rendered {
            return Err(err(match e.kind() {
                ErrorKind::OutOfFuel => "the template ran too long (out of fuel) and was stopped; \
                                         does it loop without end?"
                    .to_string(),
                ErrorKind::WriteFailure if out.buf.len() >= limit => {
                    format!("the output grew past {limit} bytes and was stopped")
                }
                _ => describe(&e),
            }));
        }
        String::from_utf8(out.buf).map_err(|_| err("rendered text is not valid UTF-8".into()))
    }
}

/// Marks errors made by `raise_exception`, so they print as the template's own message.
const RAISED: &str = "raise_exception: ";

/// A template error as one line: the message (a `raise_exception` text verbatim) and where.
fn describe(e: &minijinja::Error) -> String {
    // The error raised inside a macro or a filter may be the cause of a wrapper error.
    let mut inner: &dyn std::error::Error = e;
    let mut raised = None;
    loop {
        if let Some(me) = inner.downcast_ref::<minijinja::Error>() {
            if let Some(d) = me.detail() {
                if let Some(msg) = d.strip_prefix(RAISED) {
                    raised = Some(format!("the template raised an exception: {msg}"));
                    break;
                }
                if let Some(msg) = d.strip_prefix(GREW) {
                    raised = Some(format!("the values the template builds grew {msg} and it was stopped"));
                    break;
                }
            }
        }
        match inner.source() {
            Some(next) => inner = next,
            None => break,
        }
    }
    match raised {
        Some(msg) => match e.line() {
            Some(line) => format!("{msg} (template line {line})"),
            None => msg,
        },
        None => one_line(e),
    }
}

/// A minijinja error as "kind: detail (line N)", without minijinja's internal template name.
fn one_line(e: &minijinja::Error) -> String {
    let mut s = match e.detail() {
        Some(d) => format!("{}: {d}", e.kind()),
        None => e.kind().to_string(),
    };
    if let Some(line) = e.line() {
        s.push_str(&format!(" (template line {line})"));
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Bounding the memory a template uses
// ---------------------------------------------------------------------------------------------
//
// Fuel bounds the instructions a render runs, and the output is capped, but one instruction can
// double a string (`s ~ s`) or a list (`l + l`), so a short loop could build values far larger
// than memory. To bound that, a guard call is inserted after every tag through which values grow
// step by step (`set`, `endset`, `macro`, `call`, `with`, recursive `for`): it adds up the sizes
// of the variables the tag binds and stops the render when they pass the output bound. Filters
// and methods that can multiply a size in one call (`replace`, `indent`) check their result size
// before building it. Growth inside one expression is bounded by the template's own length.

/// Insert `{% if <guard>(names) %}{% endif %}` after every tag through which values grow step by
/// step, naming the variables the tag binds: `set` (its targets; for `ns.x = ...` the whole
/// `ns`), `endset` (the captured variable), `macro` and `call` (their parameters: recursion),
/// `with` (its names) and recursive `for` (its loop variables). Where the names cannot be read,
/// the guard checks every variable in scope instead (slower, same bound). The output is
/// unchanged: the inserted tags render nothing, and they take over the original tag's trailing
/// whitespace control (`-%}` / `+%}`), so trim_blocks and whitespace stripping act as before.
/// `{% raw %}` blocks and comments are copied as they are; string literals inside tags are
/// skipped when looking for a tag's end.
pub fn inject_guards(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len() + 256);
    let mut i = 0;
    let mut copied = 0;
    // Names captured by the open `{% set name %}` blocks.
    let mut block_sets: Vec<Option<Vec<String>>> = Vec::new();
    while i + 1 < b.len() {
        if b[i] != b'{' || !matches!(b[i + 1], b'%' | b'{' | b'#') {
            i += 1;
            continue;
        }
        let open = b[i + 1];
        if open == b'#' {
            // A comment: up to its `#}`.
            i = src[i + 2..].find("#}").map_or(b.len(), |e| i + 2 + e + 2);
            continue;
        }
        let close = if open == b'%' { b'%' } else { b'}' };
        let Some(end) = tag_end(b, i + 2, close) else {
            break; // An unterminated tag: the parser reports it.
        };
        if open == b'%' {
            let inner = &src[i + 2..end - 2];
            let body = inner.trim_start_matches(['-', '+']).trim_end_matches(['-', '+']).trim();
            let word: String = body
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let rest = body[word.len()..].trim();
            if word == "raw" {
                // Copy up to and including the matching endraw tag.
                i = find_endraw(src, end).unwrap_or(b.len());
                continue;
            }
            // Some(names): guard those (None: every variable); no entry: no guard.
            let guard: Option<Option<Vec<String>>> = match word.as_str() {
                "set" => match top_level_find_assign(rest) {
                    Some(eq) => Some(target_roots(&rest[..eq])),
                    None => {
                        // A block set: the name comes before an optional `| filter`.
                        let name = rest.split('|').next().unwrap_or("").trim();
                        block_sets.push(target_roots(name));
                        None
                    }
                },
                "endset" => block_sets.pop(),
                "macro" => Some(rest.find('(').and_then(|p| params(&rest[p..]))),
                "call" if rest.starts_with('(') => Some(params(rest)),
                "with" => Some(
                    split_top_level(rest)
                        .iter()
                        .map(|part| top_level_find_assign(part).and_then(|eq| target_roots(&part[..eq])))
                        .collect::<Option<Vec<Vec<String>>>>()
                        .map(|v| v.concat()),
                ),
                "for" if rest.split_whitespace().any(|w| w == "recursive") => {
                    Some(rest.find(" in ").and_then(|k| target_roots(&rest[..k])))
                }
                _ => None,
            };
            if let Some(names) = guard {
                let marker = match inner.trim_end().as_bytes().last() {
                    Some(b'-') => "-",
                    Some(b'+') => "+",
                    _ => "",
                };
                let call = match names {
                    Some(names) if names.is_empty() => format!("{GUARD}('')"),
                    Some(names) => format!("{GUARD}('{}', {})", names.join(","), names.join(", ")),
                    None => format!("{GUARD_ALL}()"),
                };
                out.push_str(&src[copied..end]);
                out.push_str(&format!("{{% if {call} %}}{{% endif {marker}%}}"));
                copied = end;
            }
        }
        i = end;
    }
    out.push_str(&src[copied..]);
    out
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Split at commas outside brackets and string literals.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut quote, mut start) = (0i32, None::<char>, 0);
    let mut escaped = false;
    for (k, c) in s.char_indices() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                }
            }
            None => match c {
                '\'' | '"' => quote = Some(c),
                '(' | '[' | '{' => depth += 1,
                ')' | ']' | '}' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(&s[start..k]);
                    start = k + 1;
                }
                _ => {}
            },
        }
    }
    parts.push(&s[start..]);
    parts
}

/// The byte offset of the first `=` outside brackets and strings that is an assignment (not part
/// of `==`, `!=`, `<=`, `>=`).
fn top_level_find_assign(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let (mut depth, mut quote) = (0i32, None::<u8>);
    let mut k = 0;
    while k < b.len() {
        let c = b[k];
        match quote {
            Some(q) => {
                if c == b'\\' {
                    k += 1;
                } else if c == q {
                    quote = None;
                }
            }
            None => match c {
                b'\'' | b'"' => quote = Some(c),
                b'(' | b'[' | b'{' => depth += 1,
                b')' | b']' | b'}' => depth -= 1,
                b'=' if depth == 0 => {
                    let prev = if k > 0 { b[k - 1] } else { b' ' };
                    let next = b.get(k + 1).copied().unwrap_or(b' ');
                    if next != b'=' && !matches!(prev, b'=' | b'!' | b'<' | b'>') {
                        return Some(k);
                    }
                    k += 1; // skip the second character of `==`
                }
                _ => {}
            },
        }
        k += 1;
    }
    None
}

/// The variables an assignment target binds: `a`, `a, b`, `(a, b)`, `ns.x` (→ `ns`),
/// `d['k']` (→ `d`). `None` when one is not a plain name.
fn target_roots(targets: &str) -> Option<Vec<String>> {
    let t = targets.trim().trim_start_matches('(').trim_end_matches(')');
    let mut out = Vec::new();
    for part in split_top_level(t) {
        let part = part.trim().trim_start_matches('(').trim_end_matches(')').trim();
        let root = part.split(['.', '[']).next().unwrap_or("").trim();
        if !is_identifier(root) {
            return None;
        }
        if !out.iter().any(|n| n == root) {
            out.push(root.to_string());
        }
    }
    (!out.is_empty()).then_some(out)
}

/// The parameter names of `(a, b=1, c)` (the text starting at the opening parenthesis).
fn params(s: &str) -> Option<Vec<String>> {
    let close = {
        let mut depth = 0i32;
        let mut found = None;
        for (k, c) in s.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        found = Some(k);
                        break;
                    }
                }
                _ => {}
            }
        }
        found?
    };
    let inner = s[1..close].trim();
    if inner.is_empty() {
        return Some(Vec::new());
    }
    split_top_level(inner)
        .iter()
        .map(|p| {
            let name = match top_level_find_assign(p) {
                Some(eq) => &p[..eq],
                None => p,
            };
            let name = name.trim();
            is_identifier(name).then(|| name.to_string())
        })
        .collect()
}

/// The index just past the `%}` / `}}` that closes a tag whose body starts at `from`, skipping
/// string literals.
fn tag_end(b: &[u8], from: usize, close: u8) -> Option<usize> {
    let mut i = from;
    let mut quote: Option<u8> = None;
    while i < b.len() {
        let c = b[i];
        match quote {
            Some(q) => {
                if c == b'\\' {
                    i += 1;
                } else if c == q {
                    quote = None;
                }
            }
            None => {
                if c == b'"' || c == b'\'' {
                    quote = Some(c);
                } else if c == close && b.get(i + 1) == Some(&b'}') {
                    return Some(i + 2);
                }
            }
        }
        i += 1;
    }
    None
}

/// The index just past the `{% endraw %}` tag that ends a raw block whose body starts at `from`.
fn find_endraw(src: &str, from: usize) -> Option<usize> {
    let mut at = from;
    while let Some(k) = src[at..].find("{%") {
        let start = at + k;
        let end = tag_end(src.as_bytes(), start + 2, b'%')?;
        let body = src[start + 2..end - 2].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        if body == "endraw" {
            return Some(end);
        }
        at = end;
    }
    None
}

/// The guard: fails when the values it is given (the variables a tag just bound) hold more than
/// the render's bound.
fn value_guard(names: String, values: minijinja::value::Rest<Value>) -> std::result::Result<Value, minijinja::Error> {
    let limit = VALUE_LIMIT.with(std::cell::Cell::get);
    if limit == 0 {
        return Ok(Value::from(false));
    }
    let mut budget = limit;
    for (v, name) in values.iter().zip(names.split(',')) {
        if !is_given_messages(v) && !charge(v, &mut budget, 0) {
            return Err(grew(limit, Some(name)));
        }
    }
    Ok(Value::from(false))
}

/// Is `v` the `messages` list the render was given (the very object, not a copy)?
fn is_given_messages(v: &Value) -> bool {
    let Some(this) = v.downcast_object::<Vec<Value>>() else {
        return false;
    };
    GIVEN_MESSAGES.with(|m| {
        m.borrow()
            .as_ref()
            .and_then(|g| g.downcast_object::<Vec<Value>>())
            .is_some_and(|g| std::sync::Arc::ptr_eq(&g, &this))
    })
}

/// The guard for tags whose names could not be read: every variable in scope, added up.
fn value_guard_all(state: &minijinja::State) -> std::result::Result<Value, minijinja::Error> {
    let limit = VALUE_LIMIT.with(std::cell::Cell::get);
    if limit == 0 {
        return Ok(Value::from(false));
    }
    // Each variable is measured on its own (to name the largest), and the sizes are added up.
    let mut total = 0usize;
    let mut largest: (usize, String) = (0, String::new());
    for name in state.known_variables() {
        let Some(v) = state.lookup(&name) else { continue };
        if is_given_messages(&v) {
            continue;
        }
        let mut budget = limit;
        if !charge(&v, &mut budget, 0) {
            return Err(grew(limit, Some(&name)));
        }
        let size = limit - budget;
        if size > largest.0 {
            largest = (size, name.to_string());
        }
        total = total.saturating_add(size);
        if total > limit {
            return Err(grew(limit, Some(&largest.1)));
        }
    }
    Ok(Value::from(false))
}

fn grew(limit: usize, name: Option<&str>) -> minijinja::Error {
    let what = match name {
        Some(n) => format!(" (variable `{n}`)"),
        None => String::new(),
    };
    minijinja::Error::new(ErrorKind::InvalidOperation, format!("{GREW}past {limit} bytes{what}"))
}

/// Take the size of `v` out of `budget`; false when it does not fit. Strings count their bytes,
/// lists and maps their items (at least 16 bytes each), everything else 16 bytes. Lazy
/// iterables are not walked (that could consume them), only their length is counted.
fn charge(v: &Value, budget: &mut usize, depth: usize) -> bool {
    use minijinja::value::ValueKind;
    let mut take = |n: usize| match budget.checked_sub(n) {
        Some(left) => {
            *budget = left;
            true
        }
        None => false,
    };
    match v.kind() {
        ValueKind::String | ValueKind::Bytes => {
            take(v.as_str().map_or_else(|| v.len().unwrap_or(16), str::len).max(16))
        }
        ValueKind::Seq | ValueKind::Map if depth < 16 => {
            if let Some(n) = v.len() {
                if !take(n.saturating_mul(16)) {
                    return false;
                }
            }
            let Ok(items) = v.try_iter() else { return true };
            let is_map = v.kind() == ValueKind::Map;
            for item in items {
                if is_map {
                    let value = v.get_item(&item).unwrap_or_default();
                    if !charge(&item, budget, depth + 1) || !charge(&value, budget, depth + 1) {
                        return false;
                    }
                } else if !charge(&item, budget, depth + 1) {
                    return false;
                }
            }
            true
        }
        ValueKind::Iterable => take(v.len().unwrap_or(1).saturating_mul(16)),
        _ => take(16),
    }
}

/// The size bound of the render on this thread (usize::MAX outside one).
fn current_limit() -> usize {
    match VALUE_LIMIT.with(std::cell::Cell::get) {
        0 => usize::MAX,
        n => n,
    }
}

/// Bytes of `s.replace(from, to)` (at most `count` replacements), without building it.
fn replaced_len(s: &str, from: &str, to: &str, count: Option<usize>) -> usize {
    let hits = if from.is_empty() {
        s.chars().count() + 1
    } else {
        s.matches(from).count()
    };
    let hits = count.map_or(hits, |c| hits.min(c));
    (s.len() - hits.saturating_mul(from.len()).min(s.len())).saturating_add(hits.saturating_mul(to.len()))
}

/// The `replace` filter, refusing results past the render's bound.
fn capped_replace(
    value: Value,
    from: Value,
    to: Value,
    count: Option<usize>,
) -> std::result::Result<Value, minijinja::Error> {
    let as_text = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_string);
    let (s, f, t) = (as_text(&value), as_text(&from), as_text(&to));
    let limit = current_limit();
    if replaced_len(&s, &f, &t, count) > limit {
        return Err(grew(limit, None));
    }
    Ok(Value::from(match count {
        Some(n) => s.replacen(&f, &t, n),
        None => s.replace(&f, &t),
    }))
}

/// The `indent` filter, refusing widths that would build a result past the render's bound.
fn capped_indent(
    value: minijinja::value::StringInput<'_>,
    width: Option<usize>,
    first: Option<bool>,
    blank: Option<bool>,
    kwargs: Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let w = match width {
        Some(w) => w,
        None => kwargs.peek::<Option<usize>>("width")?.unwrap_or(4),
    };
    let lines = value.as_str().lines().count() + 1;
    let limit = current_limit();
    if lines.saturating_mul(w).saturating_add(value.as_str().len()) > limit {
        return Err(grew(limit, None));
    }
    minijinja::filters::indent(value, width, first, blank, kwargs)
}

/// Python string methods (minijinja-contrib's pycompat), with `str.replace` checked for size.
fn capped_methods(
    state: &minijinja::State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> std::result::Result<Value, minijinja::Error> {
    if method == "replace" {
        if let (Some(s), Some(f), Some(t)) = (
            value.as_str(),
            args.first().and_then(Value::as_str),
            args.get(1).and_then(Value::as_str),
        ) {
            let count = args
                .get(2)
                .and_then(|c| c.as_i64())
                .and_then(|c| usize::try_from(c).ok());
            let limit = current_limit();
            if replaced_len(s, f, t, count) > limit {
                return Err(grew(limit, None));
            }
        }
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// Output buffer that refuses to grow past `limit`.
struct CappedWriter {
    buf: Vec<u8>,
    limit: usize,
}

impl std::io::Write for CappedWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + data.len() > self.limit {
            self.buf.resize(self.limit, 0);
            return Err(std::io::Error::other("chat template output too large"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// transformers' `{% generation %}...{% endgeneration %}` marks assistant text for masks; here it
/// renders its body unchanged (an always-true `if` keeps the whitespace control as written).
fn rewrite_generation_tags(src: &str) -> String {
    if !src.contains("generation") {
        return src.to_string();
    }
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tail = &rest[start..];
        let Some(end) = tail.find("%}") else {
            out.push_str(tail);
            return out;
        };
        let tag = &tail[..end + 2];
        let inner = tag[2..tag.len() - 2].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        let (lead, trail) = (
            if tag[2..].starts_with(['-', '+']) {
                &tag[2..3]
            } else {
                ""
            },
            if tag[..tag.len() - 2].ends_with(['-', '+']) {
                &tag[tag.len() - 3..tag.len() - 2]
            } else {
                ""
            },
        );
        match inner {
            "generation" => out.push_str(&format!("{{%{lead} if true {trail}%}}")),
            "endgeneration" => out.push_str(&format!("{{%{lead} endif {trail}%}}")),
            _ => out.push_str(tag),
        }
        rest = &tail[end + 2..];
    }
    out.push_str(rest);
    out
}

fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("{RAISED}{msg}"),
    ))
}

// ---------------------------------------------------------------------------------------------
// tojson, as Python's json.dumps(x, ensure_ascii=False, indent=..., sort_keys=...)
// ---------------------------------------------------------------------------------------------

fn tojson(value: Value, indent: Option<Value>, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<Value> = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.as_i64() {
            Some(n) => Some(" ".repeat(n.clamp(0, 64) as usize)),
            None => match v.as_str() {
                Some(s) => Some(s.to_string()),
                None => {
                    return Err(minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: indent must be a number or a string",
                    ))
                }
            },
        },
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let _ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?;
    let mut out = String::new();
    py_json(&value, indent.as_deref(), sort_keys, 0, &mut out)?;
    Ok(Value::from(out))
}

/// Python's json.dumps layout: `", "` and `": "` without indent, newlines and `","` with it.
/// Maps keep their order (as Python dicts do).
pub fn py_json(
    v: &Value,
    indent: Option<&str>,
    sort_keys: bool,
    depth: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    use minijinja::value::ValueKind;
    let newline = |out: &mut String, depth: usize| {
        if let Some(ind) = indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(ind);
            }
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => match (v.is_integer(), v.as_i64()) {
            (true, Some(n)) => out.push_str(&n.to_string()),
            (true, None) => out.push_str(&v.to_string()),
            (false, _) => out.push_str(&py_float(f64::try_from(v.clone())?)),
        },
        ValueKind::String => py_string(v.as_str().unwrap_or_default(), out),
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if sort_keys {
                keys.sort();
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                match k.as_str() {
                    Some(s) => py_string(s, out),
                    None => py_string(&k.to_string(), out),
                }
                out.push_str(": ");
                py_json(&v.get_item(k)?, indent, sort_keys, depth + 1, out)?;
            }
            newline(out, depth);
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, it) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                py_json(it, indent, sort_keys, depth + 1, out)?;
            }
            newline(out, depth);
            out.push(']');
        }
        _ => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: cannot serialize a value of type {}", v.kind()),
            ))
        }
    }
    Ok(())
}

fn py_float(f: f64) -> String {
    if f.is_finite() && f == f.trunc() && f.abs() < 1e16 {
        format!("{f:.1}")
    } else {
        format!("{f}")
    }
}

fn py_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

// ---------------------------------------------------------------------------------------------
// strftime_now
// ---------------------------------------------------------------------------------------------

fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime(&format, secs)
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01 (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Days since 1970-01-01 of a (year, month, day) date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A UTC subset of C's strftime: %Y %y %m %d %e %H %I %M %S %p %b %B %h %a %A %j %F %T %%, and
/// glibc's `%-d`-style unpadded forms.
pub fn strftime(format: &str, unix_secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (secs / 3600, (secs / 60) % 60, secs % 60);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let yday = days - days_from_civil(y, 1, 1) + 1;
    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let unpadded = chars.peek() == Some(&'-');
        if unpadded {
            chars.next();
        }
        let num = |n: i64, w: usize| if unpadded { n.to_string() } else { format!("{n:0w$}") };
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&num(y.rem_euclid(100), 2)),
            Some('m') => out.push_str(&num(i64::from(m), 2)),
            Some('d') => out.push_str(&num(i64::from(d), 2)),
            Some('e') => out.push_str(&format!("{d:>2}")),
            Some('H') => out.push_str(&num(hh, 2)),
            Some('I') => out.push_str(&num(if hh % 12 == 0 { 12 } else { hh % 12 }, 2)),
            Some('M') => out.push_str(&num(mm, 2)),
            Some('S') => out.push_str(&num(ss, 2)),
            Some('p') => out.push_str(if hh < 12 { "AM" } else { "PM" }),
            Some('b') | Some('h') => out.push_str(&MONTHS[m as usize - 1][..3]),
            Some('B') => out.push_str(MONTHS[m as usize - 1]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('j') => out.push_str(&num(yday, 3)),
            Some('F') => out.push_str(&format!("{y}-{m:02}-{d:02}")),
            Some('T') => out.push_str(&format!("{hh:02}:{mm:02}:{ss:02}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_formats_known_dates() {
        // 2024-02-29 13:05:09 UTC, a Thursday, day 60 of the year.
        let t = 1_709_211_909;
        assert_eq!(strftime("%d %b %Y", t), "29 Feb 2024");
        assert_eq!(
            strftime("%A %-d %B %y %H:%M:%S %j %p", t),
            "Thursday 29 February 24 13:05:09 060 PM"
        );
        assert_eq!(strftime("%F %T %%", 0), "1970-01-01 00:00:00 %");
        assert_eq!(strftime("%j %a", 0), "001 Thu");
    }

    #[test]
    fn py_json_matches_python_layout() {
        let env = Environment::new();
        let v = env
            .compile_expression(r#"{"b": [1, 2.0, "x\"y\n", none, true], "a": {}, "c": "é"}"#)
            .unwrap()
            .eval(())
            .unwrap();
        let mut s = String::new();
        py_json(&v, None, false, 0, &mut s).unwrap();
        assert_eq!(s, r#"{"b": [1, 2.0, "x\"y\n", null, true], "a": {}, "c": "é"}"#);
        let v = env
            .compile_expression(r#"{"b": [1, 2.0, "x\"y\n"], "a": {}, "c": "é"}"#)
            .unwrap()
            .eval(())
            .unwrap();
        let mut s = String::new();
        py_json(&v, Some("  "), true, 0, &mut s).unwrap();
        assert_eq!(
            s,
            "{\n  \"a\": {},\n  \"b\": [\n    1,\n    2.0,\n    \"x\\\"y\\n\"\n  ],\n  \"c\": \"é\"\n}"
        );
    }

    /// Render `src` with the guards (ChatTemplate) and without (a plain environment with the
    /// same whitespace settings).
    fn both_ways(src: &str, messages: &[Message]) -> (String, String) {
        let guarded = ChatTemplate::new(src, "test", SpecialTokens::default())
            .unwrap()
            .render(messages, true)
            .unwrap();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        let plain = env
            .template_from_str(src)
            .unwrap()
            .render(minijinja::context! { messages => messages, add_generation_prompt => true })
            .unwrap();
        (guarded, plain)
    }

    #[test]
    fn guards_leave_the_output_unchanged() {
        let msgs = [
            Message::system("Be brief."),
            Message::user("Hi there"),
            Message::assistant("Hello."),
        ];
        for src in [
            "{% for m in messages %}\n  {{ m.role }}: {{ m.content }}\n{% endfor %}\n",
            "{%- for m in messages -%}\n   {{ m.content }}   \n{%- endfor -%}\n  tail",
            "{% for m in messages +%}\n{{ m.content }}\n{% endfor +%}\nend",
            "{% set x = 'a' %}\n{% set y = x ~ '%}' ~ \"{%\" %}\n[{{ y }}]\n{%- set z -%}\n  cap {{ y }}\n{%- endset %}\n{{ z }}",
            "{# {% for m in messages %} #}{% raw %}{% for x in y %}{% set %}{% endraw %}\n{{ messages|length }}",
            "{% macro f(m) -%}\n  <{{ m.content }}>\n{%- endmacro %}\n{% for m in messages %}{{ f(m) }}{% endfor %}",
            "{% with a = 1 %}\n{{ a }}\n{% endwith %}\n{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}",
            "{{ messages[1].content|replace('there', 'you')|indent(2, true) }}{{ messages[1].content.replace('i', 'I', 1) }}",
            "{% set a, b = 1, 2 %}{% set c = a == b %}{% set (d, e) = ('x', 'y') %}{{ a }}{{ b }}{{ c }}{{ d }}{{ e }}",
            "{% macro f(x, y='=') %}[{{ x }}{{ y }}{{ caller() if caller else '' }}]{% endmacro %}{% call(z) f('a') %}{{ z }}{% endcall %}{{ f('b', y='c') }}",
            "{% for a, b in [(1, [(2, [])])] recursive %}{{ a }}{% if b %}{{ loop(b) }}{% endif %}{% endfor %}",
            "{%- set x | upper -%}\n  shout\n{%- endset %}\n{{ x }}",
        ] {
            let (guarded, plain) = both_ways(src, &msgs);
            assert_eq!(guarded, plain, "{src:?}");
        }
        // The names each guard is given.
        for (src, call) in [
            ("{% set ns.x = 1 %}", "('ns', ns)"),
            ("{% set a, (b) = 1, 2 %}", "('a,b', a, b)"),
            ("{% set x = y == 1 %}", "('x', x)"),
            ("{% set s | trim %}x{% endset %}", "('s', s)"),
            ("{% macro m(p, q=[1, 2]) %}{% endmacro %}", "('p,q', p, q)"),
            ("{% with a = [1, 2], b = 'x,y' %}{% endwith %}", "('a,b', a, b)"),
            ("{% for k, v in d recursive %}{% endfor %}", "('k,v', k, v)"),
        ] {
            assert!(inject_guards(src).contains(call), "{src}: {}", inject_guards(src));
        }
        assert!(inject_guards("{% macro m() %}{% endmacro %}").contains(&format!("{GUARD}('')")));
        // Targets that are not plain names: every variable in scope is checked instead.
        assert!(inject_guards("{% set 9x = 1 %}").contains(GUARD_ALL));
        let g =
            inject_guards("{% for x in y recursive -%}\n{% endfor %}{% set a = 1 +%}{{ '%}{% set' }}{% for z in y %}");
        assert_eq!(g.matches(GUARD).count(), 2, "{g}");
        assert!(g.contains("{% endif -%}") && g.contains("{% endif +%}"), "{g}");
    }

    #[test]
    fn templates_that_build_huge_values_are_stopped() {
        let msgs = [Message::user("hi")];
        for src in [
            "{% set ns = namespace(s='x') %}{% for i in range(100) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
            "{% set ns = namespace(l=[1]) %}{% for i in range(100) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l|length }}",
            "{% macro g(s, n) %}{% if n > 0 %}{{ g(s ~ s, n - 1) }}{% endif %}{% endmacro %}{{ g('x', 80) }}",
            "{% for s in ['x'] recursive %}{{ loop([s ~ s]) }}{% endfor %}",
            "{% set s = 'x' * 20000 %}{{ s|replace('x', s)|length }}",
            "{% set s = 'x' * 20000 %}{{ s.replace('x', s)|length }}",
            "{{ 'x'|indent(100000000000) }}",
        ] {
            let t = ChatTemplate::new(src, "big.jinja", SpecialTokens::default()).unwrap();
            let e = t.render(&msgs, false).unwrap_err().to_string();
            assert!(e.contains("big.jinja") && e.contains("bytes"), "{src}: {e}");
        }
    }

    #[test]
    fn generation_tags_render_their_body() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{%- generation -%} {{ m.content }} {%- endgeneration -%}{% endfor %}",
            "test",
            SpecialTokens::default(),
        )
        .unwrap();
        assert_eq!(
            t.render(&[Message::user("a"), Message::user("b")], false).unwrap(),
            "ab"
        );
    }
}
