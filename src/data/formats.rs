//! Preference-data formats: detection from a row's keys and normalisation to [`PreferencePair`].
//!
//! The format of a file is detected from its first row; every later row must fit it. Errors name
//! the file, the line and the key.

use std::path::Path;

use serde_json::{Map, Value};

use super::source::{read_rows, RawRow};
use super::{LoadOptions, LoadStats, Message, PreferencePair, RowRef};
use crate::error::json_kind as kind;
use crate::error::{Error, Result};

type Row = Map<String, Value>;

/// A row-level problem, without its location (the caller adds `file:line`).
type RowResult<T> = std::result::Result<T, String>;

/// The preference-data formats lorafold reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// TRL: `prompt`, `chosen`, `rejected` as strings or message lists.
    TrlExplicit,
    /// TRL (and minimind): `chosen`, `rejected` as full conversations sharing a prefix.
    TrlImplicit,
    /// xtuner: `chosen_conversations`, `rejected_conversations` ({from, value} turns).
    Xtuner,
    /// ms-swift 2.x: `query`, `response`, `rejected_response`, `history`, `system`.
    SwiftV2,
    /// ms-swift 3.x/4.x: `messages` + `rejected_response` or `rejected_messages`.
    SwiftV4,
    /// LLaMA-Factory sharegpt: `conversations` + `chosen`/`rejected` messages.
    Sharegpt,
    /// LLaMA-Factory alpaca: `instruction`, `input`, `chosen`, `rejected`, `system`, `history`.
    Alpaca,
    /// PKU Align-Anything: `question`, `response_1`, `response_2`, `overall_response`.
    AlignAnything,
    /// Anthropic hh-rlhf: `chosen`, `rejected` as `\n\nHuman:` / `\n\nAssistant:` text.
    HhRlhf,
}

impl Format {
    pub const ALL: [Format; 9] = [
        Format::TrlExplicit,
        Format::TrlImplicit,
        Format::Xtuner,
        Format::SwiftV2,
        Format::SwiftV4,
        Format::Sharegpt,
        Format::Alpaca,
        Format::AlignAnything,
        Format::HhRlhf,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Format::TrlExplicit => "trl-explicit-prompt",
            Format::TrlImplicit => "trl-implicit-prompt",
            Format::Xtuner => "xtuner",
            Format::SwiftV2 => "ms-swift-v2",
            Format::SwiftV4 => "ms-swift-v4",
            Format::Sharegpt => "llamafactory-sharegpt",
            Format::Alpaca => "llamafactory-alpaca",
            Format::AlignAnything => "align-anything",
            Format::HhRlhf => "hh-rlhf",
        }
    }

    /// The keys a row of this format must have (optional keys are not listed).
    pub fn required_keys(self) -> &'static [&'static str] {
        match self {
            Format::TrlExplicit => &["prompt", "chosen", "rejected"],
            Format::TrlImplicit => &["chosen", "rejected"],
            Format::Xtuner => &["chosen_conversations", "rejected_conversations"],
            Format::SwiftV2 => &["query", "response", "rejected_response"],
            Format::SwiftV4 => &["messages"],
            Format::Sharegpt => &["conversations", "chosen", "rejected"],
            Format::Alpaca => &["instruction", "chosen", "rejected"],
            Format::AlignAnything => &["question", "response_1", "response_2", "overall_response"],
            Format::HhRlhf => &["chosen", "rejected"],
        }
    }

    /// Every key a row of this format may have: the required ones and the optional ones read.
    /// Any other key is reported as unused (once per file), never dropped silently.
    pub fn known_keys(self) -> &'static [&'static str] {
        match self {
            Format::TrlExplicit => &["prompt", "chosen", "rejected", "system", "history"],
            Format::TrlImplicit => &["chosen", "rejected"],
            Format::Xtuner => &["chosen_conversations", "rejected_conversations"],
            Format::SwiftV2 => &["query", "response", "rejected_response", "history", "system"],
            Format::SwiftV4 => &["messages", "rejected_response", "rejected_messages", "system"],
            Format::Sharegpt => &["conversations", "chosen", "rejected", "system"],
            Format::Alpaca => &["instruction", "input", "chosen", "rejected", "system", "history"],
            Format::AlignAnything => &["question", "response_1", "response_2", "overall_response"],
            Format::HhRlhf => &["chosen", "rejected"],
        }
    }

    /// How the keys of a row of this format look, for "unknown format" messages.
    fn describe(self) -> &'static str {
        match self {
            Format::TrlExplicit => "prompt, chosen, rejected [, system, history]",
            Format::TrlImplicit => "chosen, rejected as message lists",
            Format::Xtuner => "chosen_conversations, rejected_conversations",
            Format::SwiftV2 => "query, response, rejected_response [, history, system]",
            Format::SwiftV4 => "messages + rejected_response or rejected_messages",
            Format::Sharegpt => "conversations, chosen, rejected [, system]",
            Format::Alpaca => "instruction [, input], chosen, rejected [, system, history]",
            Format::AlignAnything => "question, response_1, response_2, overall_response",
            Format::HhRlhf => "chosen, rejected as \\n\\nHuman:/\\n\\nAssistant: text",
        }
    }

    /// The format a row's keys (and, for `chosen`/`rejected` alone, their types) point to.
    pub fn detect(row: &Row) -> Option<Format> {
        let has = |k: &str| row.contains_key(k);
        if has("chosen_conversations") && has("rejected_conversations") {
            Some(Format::Xtuner)
        } else if has("messages") && (has("rejected_response") || has("rejected_messages")) {
            Some(Format::SwiftV4)
        } else if has("query") && has("response") && has("rejected_response") {
            Some(Format::SwiftV2)
        } else if Format::AlignAnything.required_keys().iter().all(|k| has(k)) {
            Some(Format::AlignAnything)
        } else if has("conversations") && has("chosen") && has("rejected") {
            Some(Format::Sharegpt)
        } else if has("instruction") && has("chosen") && has("rejected") {
            Some(Format::Alpaca)
        } else if has("prompt") && has("chosen") && has("rejected") {
            Some(Format::TrlExplicit)
        } else if has("chosen") && has("rejected") {
            match (&row["chosen"], &row["rejected"]) {
                (Value::String(_), Value::String(_)) => Some(Format::HhRlhf),
                (Value::Array(_), Value::Array(_)) => Some(Format::TrlImplicit),
                _ => None,
            }
        } else {
            None
        }
    }

    fn has_required_keys(self, row: &Row) -> bool {
        match self {
            Format::SwiftV4 => {
                row.contains_key("messages")
                    && (row.contains_key("rejected_response") || row.contains_key("rejected_messages"))
            }
            _ => self.required_keys().iter().all(|k| row.contains_key(*k)),
        }
    }

    fn missing_keys(self, row: &Row) -> String {
        let missing: Vec<String> = match self {
            Format::SwiftV4 if row.contains_key("messages") => {
                vec!["`rejected_response` or `rejected_messages`".into()]
            }
            _ => self
                .required_keys()
                .iter()
                .filter(|k| !row.contains_key(**k))
                .map(|k| format!("`{k}`"))
                .collect(),
        };
        missing.join(", ")
    }

    /// Normalise one row of this format.
    pub fn parse(self, row: &Row) -> RowResult<PreferencePair> {
        match self {
            Format::TrlExplicit => trl_explicit(row),
            Format::TrlImplicit => trl_implicit(row),
            Format::Xtuner => xtuner(row),
            Format::SwiftV2 => swift_v2(row),
            Format::SwiftV4 => swift_v4(row),
            Format::Sharegpt => sharegpt(row),
            Format::Alpaca => alpaca(row),
            Format::AlignAnything => align_anything(row),
            Format::HhRlhf => hh_rlhf(row),
        }
    }

    /// Normalise a row of a file whose format is `self`: a row that fits another format is a
    /// "mixed formats" error, a row missing keys says which.
    pub fn parse_row(self, row: &Row) -> RowResult<PreferencePair> {
        let other = Format::detect(row).filter(|f| *f != self);
        if self.has_required_keys(row) {
            // `chosen`/`rejected` alone: the value types tell hh-rlhf and trl-implicit apart.
            let ambiguous = matches!(
                (self, other),
                (Format::HhRlhf, Some(Format::TrlImplicit)) | (Format::TrlImplicit, Some(Format::HhRlhf))
            );
            if !ambiguous {
                return self.parse(row);
            }
        }
        match other {
            Some(other) => Err(format!(
                "mixed formats: this row (keys {}) fits {}, but the file is {} (detected from its first row){}",
                key_list(row),
                other.name(),
                self.name(),
                if self.has_required_keys(row) {
                    String::new()
                } else {
                    format!("; missing {}", self.missing_keys(row))
                }
            )),
            None => {
                let n = self.required_keys().iter().filter(|k| !row.contains_key(**k)).count();
                Err(format!(
                    "missing key{} {} (format {})",
                    if n > 1 { "s" } else { "" },
                    self.missing_keys(row),
                    self.name()
                ))
            }
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn key_list(row: &Row) -> String {
    let keys: Vec<&str> = row.keys().map(String::as_str).collect();
    format!("[{}]", keys.join(", "))
}

/// The "unknown format" message for a file's first row.
fn unknown_format(row: &Row) -> String {
    let mut msg = format!(
        "unknown preference-data format: the first row has keys {}",
        key_list(row)
    );
    if let (Some(c), Some(r)) = (row.get("chosen"), row.get("rejected")) {
        msg.push_str(&format!(
            "; `chosen` is {} and `rejected` is {}: both must be strings (hh-rlhf) or both message lists (trl-implicit-prompt)",
            kind(c),
            kind(r)
        ));
    }
    msg.push_str(". Known formats:");
    for f in Format::ALL {
        msg.push_str(&format!(" {} ({});", f.name(), f.describe()));
    }
    msg.pop();
    msg
}

// ---------------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------------

/// Read one data file, detect its format from the first row and normalise every row.
pub fn load_file(path: &Path, display: &str, opts: &LoadOptions) -> Result<(Vec<(RowRef, PreferencePair)>, LoadStats)> {
    normalise_rows(read_rows(path, display)?, display, opts)
}

/// Detect the format of `rows` (from the first readable row) and normalise them all.
pub fn normalise_rows(
    rows: Vec<RawRow>,
    display: &str,
    opts: &LoadOptions,
) -> Result<(Vec<(RowRef, PreferencePair)>, LoadStats)> {
    if rows.is_empty() {
        return Err(Error::DataFile {
            file: display.into(),
            msg: "the file holds no rows (empty file)".into(),
        });
    }
    let mut format: Option<Format> = None;
    let mut pairs = Vec::with_capacity(rows.len());
    let mut skipped = 0;
    // Where the first pair came from, for the "nothing to score" message.
    let mut first_loc: Option<String> = None;
    let mut unused = std::collections::BTreeSet::new();
    for raw in rows {
        let parsed = match raw.value {
            Err(msg) => Err(msg),
            Ok(Value::Object(map)) => {
                let f = match format {
                    Some(f) => f,
                    None => {
                        let f = Format::detect(&map).ok_or_else(|| Error::DataRow {
                            row: raw.loc.clone(),
                            msg: unknown_format(&map),
                        })?;
                        format = Some(f);
                        f
                    }
                };
                unused.extend(map.keys().filter(|k| !f.known_keys().contains(&k.as_str())).cloned());
                f.parse_row(&map)
            }
            Ok(other) => Err(format!("a row must be a JSON object, got {}", kind(&other))),
        };
        match parsed {
            Ok(pair) => {
                if first_loc.is_none() {
                    first_loc = Some(raw.loc.clone());
                }
                pairs.push((raw.row, pair))
            }
            Err(_) if opts.skip_bad_rows => skipped += 1,
            Err(msg) => return Err(Error::DataRow { row: raw.loc, msg }),
        }
    }
    let Some(format) = format else {
        return Err(Error::DataFile {
            file: display.into(),
            msg: format!("no readable row ({skipped} bad rows skipped); cannot detect the format"),
        });
    };
    check_something_to_score(&pairs, first_loc.as_deref(), format, display)?;
    let stats = LoadStats {
        rows: pairs.len(),
        skipped_bad_rows: skipped,
        formats: vec![(display.to_string(), format.name().to_string())],
        unused_keys: if unused.is_empty() {
            Vec::new()
        } else {
            vec![(display.to_string(), unused.into_iter().collect())]
        },
    };
    Ok((pairs, stats))
}

/// The keys that hold the chosen and the rejected response in a format, for messages.
fn response_keys(format: Format) -> (&'static str, &'static str) {
    match format {
        Format::TrlExplicit | Format::TrlImplicit | Format::Sharegpt | Format::Alpaca | Format::HhRlhf => {
            ("chosen", "rejected")
        }
        Format::Xtuner => ("chosen_conversations", "rejected_conversations"),
        Format::SwiftV2 => ("response", "rejected_response"),
        Format::SwiftV4 => ("messages", "rejected_response"),
        Format::AlignAnything => ("response_1", "response_2"),
    }
}

/// A file in which every pair has an empty (blank) chosen or rejected response, or identical
/// ones, gives nothing to train on or score: that is an error naming the file, its first row and
/// the key. (A few such pairs among good ones are dropped and counted later, when tokenising.)
fn check_something_to_score(
    pairs: &[(RowRef, PreferencePair)],
    first_loc: Option<&str>,
    format: Format,
    display: &str,
) -> Result<()> {
    let blank = |msgs: &[Message]| msgs.iter().all(|m| m.content.trim().is_empty());
    let empty = |p: &PreferencePair| blank(&p.chosen) || blank(&p.rejected);
    let same = |p: &PreferencePair| p.chosen == p.rejected && p.rejected_prompt.is_none();
    if pairs.is_empty() || !pairs.iter().all(|(_, p)| empty(p) || same(p)) {
        return Ok(());
    }
    let (row, first) = &pairs[0];
    let (ck, rk) = response_keys(format);
    let loc = first_loc.map_or_else(|| row.to_string(), str::to_string);
    let what = if empty(first) {
        let key = if blank(&first.chosen) { ck } else { rk };
        format!("key `{key}` is empty")
    } else {
        format!("keys `{ck}` and `{rk}` hold the same response")
    };
    Err(Error::DataFile {
        file: display.into(),
        msg: format!(
            "every row has an empty chosen or rejected response, or the same response for both, so \
             nothing can be scored (first: {loc}: {what})"
        ),
    })
}

// ---------------------------------------------------------------------------------------------
// Values
// ---------------------------------------------------------------------------------------------

fn get<'a>(row: &'a Row, key: &str) -> RowResult<&'a Value> {
    row.get(key).ok_or_else(|| format!("missing key `{key}`"))
}

/// An optional key: absent and null are both "not given".
fn get_opt<'a>(row: &'a Row, key: &str) -> Option<&'a Value> {
    row.get(key).filter(|v| !v.is_null())
}

fn string(row: &Row, key: &str) -> RowResult<String> {
    match get(row, key)? {
        Value::String(s) => Ok(s.clone()),
        other => Err(format!("key `{key}` must be a string, got {}", kind(other))),
    }
}

fn opt_string(row: &Row, key: &str) -> RowResult<Option<String>> {
    match get_opt(row, key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(format!("key `{key}` must be a string, got {}", kind(other))),
    }
}

/// A system prompt: an empty string means "none".
fn system(row: &Row) -> RowResult<Option<Message>> {
    Ok(opt_string(row, "system")?
        .filter(|s| !s.is_empty())
        .map(Message::system))
}

/// Map a role name to system/user/assistant.
pub fn normalize_role(role: &str) -> std::result::Result<&'static str, String> {
    match role.trim().to_ascii_lowercase().as_str() {
        "system" => Ok("system"),
        "user" | "human" => Ok("user"),
        "assistant" | "gpt" | "bot" | "model" => Ok("assistant"),
        "observation" | "function" | "function_call" | "tool" | "tool_call" | "ipython" => Err(format!(
            "role `{role}` (tool use) is not supported in preference data; only system, user/human and assistant/gpt turns are"
        )),
        _ => Err(format!(
            "unknown role `{role}` (expected system, user/human or assistant/gpt)"
        )),
    }
}

/// One message: `{role, content}` or `{from, value}`; content a string or a list of text parts.
fn message(v: &Value, key: &str, idx: Option<usize>) -> RowResult<Message> {
    let at = match idx {
        Some(i) => format!("key `{key}`: message {}", i + 1),
        None => format!("key `{key}`"),
    };
    let Value::Object(m) = v else {
        return Err(format!(
            "{at} must be an object with role/content (or from/value), got {}",
            kind(v)
        ));
    };
    let (role_key, content_key) = if m.contains_key("role") {
        ("role", "content")
    } else if m.contains_key("from") {
        ("from", "value")
    } else {
        return Err(format!("{at} has no `role` (or `from`) key"));
    };
    let role = match &m[role_key] {
        Value::String(s) => normalize_role(s).map_err(|e| format!("{at}: {e}"))?,
        other => return Err(format!("{at}: `{role_key}` must be a string, got {}", kind(other))),
    };
    let content = match m.get(content_key) {
        None => return Err(format!("{at} has no `{content_key}` key")),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => text_parts(parts).map_err(|e| format!("{at}: `{content_key}`: {e}"))?,
        Some(other) => return Err(format!("{at}: `{content_key}` must be a string, got {}", kind(other))),
    };
    Ok(Message {
        role: role.into(),
        content,
    })
}

/// Content given as a list of parts (`[{"type": "text", "text": ...}]`): text parts only.
fn text_parts(parts: &[Value]) -> RowResult<String> {
    let mut out = String::new();
    for p in parts {
        match p {
            Value::String(s) => out.push_str(s),
            Value::Object(o) if o.get("type").and_then(Value::as_str).unwrap_or("text") == "text" => {
                match o.get("text") {
                    Some(Value::String(s)) => out.push_str(s),
                    _ => return Err("a text part has no string `text`".into()),
                }
            }
            Value::Object(o) => {
                let t = o.get("type").and_then(Value::as_str).unwrap_or("?");
                return Err(format!("content parts of type `{t}` are not supported (text only)"));
            }
            other => return Err(format!("a content part must be an object, got {}", kind(other))),
        }
    }
    Ok(out)
}

fn messages(v: &Value, key: &str) -> RowResult<Vec<Message>> {
    match v {
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, m)| message(m, key, Some(i)))
            .collect(),
        other => Err(format!("key `{key}` must be a list of messages, got {}", kind(other))),
    }
}

/// A string (one message of `role`) or a message list.
fn text_or_messages(row: &Row, key: &str, role: &str) -> RowResult<Vec<Message>> {
    match get(row, key)? {
        Value::String(s) => Ok(vec![Message::new(role, s.clone())]),
        Value::Array(_) => messages(&row[key], key),
        other => Err(format!(
            "key `{key}` must be a string or a list of messages, got {}",
            kind(other)
        )),
    }
}

/// A string (one message of `role`) or one message object.
fn text_or_message(row: &Row, key: &str, role: &str) -> RowResult<Message> {
    match get(row, key)? {
        Value::String(s) => Ok(Message::new(role, s.clone())),
        v @ Value::Object(_) => message(v, key, None),
        other => Err(format!(
            "key `{key}` must be a string or a message object, got {}",
            kind(other)
        )),
    }
}

/// `history`: [[query, response], ...] as user/assistant turns.
fn history(row: &Row) -> RowResult<Vec<Message>> {
    let Some(v) = get_opt(row, "history") else {
        return Ok(Vec::new());
    };
    let Value::Array(items) = v else {
        return Err(format!(
            "key `history` must be a list of [query, response] pairs, got {}",
            kind(v)
        ));
    };
    let mut out = Vec::with_capacity(items.len() * 2);
    for (i, item) in items.iter().enumerate() {
        match item.as_array().map(Vec::as_slice) {
            Some([Value::String(q), Value::String(a)]) => {
                out.push(Message::user(q.clone()));
                out.push(Message::assistant(a.clone()));
            }
            _ => {
                return Err(format!(
                    "key `history`: entry {} must be a [query, response] pair of strings",
                    i + 1
                ))
            }
        }
    }
    Ok(out)
}

/// Split a conversation at its last assistant turn: (turns before it, that turn).
fn split_last_assistant(mut conv: Vec<Message>, key: &str) -> RowResult<(Vec<Message>, Vec<Message>)> {
    let Some(last) = conv.iter().rposition(|m| m.role == "assistant") else {
        return Err(format!(
            "key `{key}` has no assistant (gpt) turn to use as the response"
        ));
    };
    if last + 1 != conv.len() {
        return Err(format!(
            "key `{key}`: the conversation continues after its last assistant turn ({} more turns)",
            conv.len() - last - 1
        ));
    }
    let response = conv.split_off(last);
    Ok((conv, response))
}

fn pair(prompt: Vec<Message>, chosen: Vec<Message>, rejected: Vec<Message>) -> PreferencePair {
    PreferencePair {
        prompt,
        chosen,
        rejected,
        rejected_prompt: None,
    }
}

/// A pair whose rejected side has its own prompt, kept only when it differs.
fn pair_with_prompts(
    prompt: Vec<Message>,
    chosen: Vec<Message>,
    rejected_prompt: Vec<Message>,
    rejected: Vec<Message>,
) -> PreferencePair {
    let rejected_prompt = (rejected_prompt != prompt).then_some(rejected_prompt);
    PreferencePair {
        prompt,
        chosen,
        rejected,
        rejected_prompt,
    }
}

// ---------------------------------------------------------------------------------------------
// Formats
// ---------------------------------------------------------------------------------------------

/// TRL's explicit-prompt layout. The `system` and `history` ([[query, response], ...]) keys
/// that ms-swift and LLaMA-Factory exports add to it come before the prompt, as in their
/// formats (a prompt that opens with its own system message keeps it).
fn trl_explicit(row: &Row) -> RowResult<PreferencePair> {
    let mut given = text_or_messages(row, "prompt", "user")?;
    let mut prompt = Vec::with_capacity(given.len() + 1);
    if given.first().is_some_and(|m| m.role == "system") {
        prompt.push(given.remove(0));
    } else {
        prompt.extend(system(row)?);
    }
    prompt.extend(history(row)?);
    prompt.append(&mut given);
    Ok(pair(
        prompt,
        text_or_messages(row, "chosen", "assistant")?,
        text_or_messages(row, "rejected", "assistant")?,
    ))
}

fn trl_implicit(row: &Row) -> RowResult<PreferencePair> {
    let mut chosen = messages(get(row, "chosen")?, "chosen")?;
    let mut rejected = messages(get(row, "rejected")?, "rejected")?;
    let shared = chosen.iter().zip(&rejected).take_while(|(c, r)| c == r).count();
    let c_resp = chosen.split_off(shared);
    let r_resp = rejected.split_off(shared);
    Ok(pair(chosen, c_resp, r_resp))
}

fn xtuner(row: &Row) -> RowResult<PreferencePair> {
    let c = messages(get(row, "chosen_conversations")?, "chosen_conversations")?;
    let r = messages(get(row, "rejected_conversations")?, "rejected_conversations")?;
    let (cp, cr) = split_last_assistant(c, "chosen_conversations")?;
    let (rp, rr) = split_last_assistant(r, "rejected_conversations")?;
    Ok(pair_with_prompts(cp, cr, rp, rr))
}

fn swift_v2(row: &Row) -> RowResult<PreferencePair> {
    let mut prompt: Vec<Message> = system(row)?.into_iter().collect();
    prompt.extend(history(row)?);
    prompt.push(Message::user(string(row, "query")?));
    Ok(pair(
        prompt,
        vec![Message::assistant(string(row, "response")?)],
        vec![Message::assistant(string(row, "rejected_response")?)],
    ))
}

fn swift_v4(row: &Row) -> RowResult<PreferencePair> {
    let conv = messages(get(row, "messages")?, "messages")?;
    let (mut prompt, chosen) = split_last_assistant(conv, "messages")?;
    if let Some(sys) = system(row)? {
        if prompt.first().map(|m| m.role.as_str()) != Some("system") {
            prompt.insert(0, sys);
        }
    }
    if let Some(v) = get_opt(row, "rejected_messages") {
        let (rp, rr) = split_last_assistant(messages(v, "rejected_messages")?, "rejected_messages")?;
        return Ok(pair_with_prompts(prompt, chosen, rp, rr));
    }
    let rejected = match get(row, "rejected_response")? {
        Value::String(s) => vec![Message::assistant(s.clone())],
        other => return Err(format!("key `rejected_response` must be a string, got {}", kind(other))),
    };
    Ok(pair(prompt, chosen, rejected))
}

fn sharegpt(row: &Row) -> RowResult<PreferencePair> {
    let conv = messages(get(row, "conversations")?, "conversations")?;
    let mut prompt: Vec<Message> = Vec::with_capacity(conv.len() + 1);
    if let Some(sys) = system(row)? {
        if conv.first().map(|m| m.role.as_str()) != Some("system") {
            prompt.push(sys);
        }
    }
    prompt.extend(conv);
    Ok(pair(
        prompt,
        vec![text_or_message(row, "chosen", "assistant")?],
        vec![text_or_message(row, "rejected", "assistant")?],
    ))
}

fn alpaca(row: &Row) -> RowResult<PreferencePair> {
    let mut query = string(row, "instruction")?;
    if let Some(input) = opt_string(row, "input")? {
        if !input.is_empty() {
            query.push('\n');
            query.push_str(&input);
        }
    }
    let mut prompt: Vec<Message> = system(row)?.into_iter().collect();
    prompt.extend(history(row)?);
    prompt.push(Message::user(query));
    Ok(pair(
        prompt,
        vec![text_or_message(row, "chosen", "assistant")?],
        vec![text_or_message(row, "rejected", "assistant")?],
    ))
}

fn align_anything(row: &Row) -> RowResult<PreferencePair> {
    let question = string(row, "question")?;
    let r1 = string(row, "response_1")?;
    let r2 = string(row, "response_2")?;
    let better = match get(row, "overall_response")? {
        Value::Number(n) if n.as_f64() == Some(1.0) => 1,
        Value::Number(n) if n.as_f64() == Some(2.0) => 2,
        Value::String(s) if s.trim() == "1" => 1,
        Value::String(s) if s.trim() == "2" => 2,
        other => {
            return Err(format!(
                "key `overall_response` must be 1 or 2 (the better response), got {}",
                match other {
                    Value::Number(_) | Value::String(_) => other.to_string(),
                    _ => kind(other).to_string(),
                }
            ))
        }
    };
    let (chosen, rejected) = if better == 1 { (r1, r2) } else { (r2, r1) };
    Ok(pair(
        vec![Message::user(question)],
        vec![Message::assistant(chosen)],
        vec![Message::assistant(rejected)],
    ))
}

const HUMAN: &str = "\n\nHuman:";
const ASSISTANT: &str = "\n\nAssistant:";

/// Split hh-rlhf text into turns; the last one must be an Assistant turn.
fn hh_turns(text: &str, key: &str) -> RowResult<(Vec<Message>, Vec<Message>)> {
    let owned;
    let text = if text.starts_with("Human:") || text.starts_with("Assistant:") {
        owned = format!("\n\n{text}");
        owned.as_str()
    } else {
        text
    };
    // (start of marker, end of marker, role)
    let mut marks: Vec<(usize, usize, &str)> = Vec::new();
    for (marker, role) in [(HUMAN, "user"), (ASSISTANT, "assistant")] {
        marks.extend(text.match_indices(marker).map(|(i, m)| (i, i + m.len(), role)));
    }
    marks.sort_unstable();
    let Some(first) = marks.first() else {
        return Err(format!(
            "key `{key}` has no `\\n\\nHuman:` / `\\n\\nAssistant:` turns (hh-rlhf text)"
        ));
    };
    if !text[..first.0].trim().is_empty() {
        return Err(format!("key `{key}` has text before its first `Human:` turn"));
    }
    let mut turns: Vec<Message> = Vec::with_capacity(marks.len());
    for (k, &(_, end, role)) in marks.iter().enumerate() {
        let stop = marks.get(k + 1).map_or(text.len(), |m| m.0);
        turns.push(Message::new(role, text[end..stop].trim()));
    }
    let last = turns.len() - 1;
    if turns[last].role != "assistant" {
        return Err(format!("key `{key}` does not end with an `Assistant:` turn"));
    }
    let response = turns.split_off(last);
    Ok((turns, response))
}

fn hh_rlhf(row: &Row) -> RowResult<PreferencePair> {
    let (cp, cr) = hh_turns(&string(row, "chosen")?, "chosen")?;
    let (rp, rr) = hh_turns(&string(row, "rejected")?, "rejected")?;
    Ok(pair_with_prompts(cp, cr, rp, rr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(v: Value) -> Row {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn detects_each_format() {
        let cases = [
            (
                json!({"prompt": "q", "chosen": "a", "rejected": "b"}),
                Format::TrlExplicit,
            ),
            (json!({"chosen": [], "rejected": []}), Format::TrlImplicit),
            (json!({"chosen": "x", "rejected": "y"}), Format::HhRlhf),
            (
                json!({"chosen_conversations": [], "rejected_conversations": []}),
                Format::Xtuner,
            ),
            (
                json!({"query": "", "response": "", "rejected_response": ""}),
                Format::SwiftV2,
            ),
            (json!({"messages": [], "rejected_response": ""}), Format::SwiftV4),
            (json!({"messages": [], "rejected_messages": []}), Format::SwiftV4),
            (
                json!({"conversations": [], "chosen": {}, "rejected": {}}),
                Format::Sharegpt,
            ),
            (
                json!({"instruction": "", "input": "", "chosen": "", "rejected": ""}),
                Format::Alpaca,
            ),
            (
                json!({"question": "", "response_1": "", "response_2": "", "overall_response": 1, "x": 0}),
                Format::AlignAnything,
            ),
        ];
        for (v, f) in cases {
            assert_eq!(Format::detect(&row(v.clone())), Some(f), "{v}");
        }
        assert_eq!(Format::detect(&row(json!({"chosen": "x", "rejected": []}))), None);
        assert_eq!(Format::detect(&row(json!({"text": "x"}))), None);
    }

    #[test]
    fn alpaca_input_is_appended_on_a_new_line() {
        let p = alpaca(&row(
            json!({"instruction": "Translate", "input": "hello", "chosen": "a", "rejected": "b"}),
        ))
        .unwrap();
        assert_eq!(p.prompt, vec![Message::user("Translate\nhello")]);
        let p = alpaca(&row(
            json!({"instruction": "Translate", "input": "", "chosen": "a", "rejected": "b", "system": ""}),
        ))
        .unwrap();
        assert_eq!(p.prompt, vec![Message::user("Translate")]);
    }

    #[test]
    fn roles_are_normalised_or_refused() {
        assert_eq!(normalize_role("human"), Ok("user"));
        assert_eq!(normalize_role("GPT"), Ok("assistant"));
        assert!(normalize_role("observation").unwrap_err().contains("tool use"));
        assert!(normalize_role("narrator").unwrap_err().contains("unknown role"));
    }

    #[test]
    fn content_parts_are_joined_text() {
        let m = message(
            &json!({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}),
            "prompt",
            Some(0),
        )
        .unwrap();
        assert_eq!(m.content, "ab");
        let e = message(
            &json!({"role": "user", "content": [{"type": "image"}]}),
            "prompt",
            Some(0),
        )
        .unwrap_err();
        assert!(e.contains("image") && e.contains("message 1"), "{e}");
    }

    #[test]
    fn hh_text_is_split_into_turns() {
        let (p, r) = hh_turns(
            "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Bye?\n\nAssistant: Bye.",
            "chosen",
        )
        .unwrap();
        assert_eq!(
            p,
            vec![Message::user("Hi"), Message::assistant("Hello."), Message::user("Bye?")]
        );
        assert_eq!(r, vec![Message::assistant("Bye.")]);
        assert!(hh_turns("Human: Hi\n\nAssistant: x", "chosen").is_ok());
        assert!(hh_turns("no turns", "chosen").unwrap_err().contains("no"));
        assert!(hh_turns("\n\nHuman: Hi", "chosen").unwrap_err().contains("Assistant"));
    }

    #[test]
    fn implicit_prompt_is_the_shared_prefix() {
        let p = trl_implicit(&row(json!({
            "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
        })))
        .unwrap();
        assert_eq!(p.prompt, vec![Message::user("q")]);
        assert_eq!(p.chosen, vec![Message::assistant("a")]);
        assert_eq!(p.rejected, vec![Message::assistant("b")]);
    }
}
