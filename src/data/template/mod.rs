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

use minijinja::value::Value;
use minijinja::{Environment, ErrorKind};
use serde_json::Value as Json;

mod guard;
mod json;
mod time;

pub use guard::inject_guards;
use guard::*;
pub use json::py_json;
use json::*;
use time::*;
pub use time::{strftime, utc_stamp};

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
        "chatml" => Some(include_str!("../templates/chatml.jinja")),
        "llama3" => Some(include_str!("../templates/llama3.jinja")),
        "mistral" => Some(include_str!("../templates/mistral.jinja")),
        "raw" => Some(include_str!("../templates/raw.jinja")),
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
            .map_err(|e| parse_error(&origin, &e))?;
        // The guarded form parses whenever the original does; should it ever not, the template
        // still runs, bounded by fuel and the output cap only.
        if env.add_template_owned("chat_template", inject_guards(&source)).is_err() {
            env.add_template_owned("chat_template", source)
                .map_err(|e| parse_error(&origin, &e))?;
        }
        Ok(ChatTemplate { env, origin, tokens })
    }

    /// A named fallback template (see [`named_template`]).
    pub fn named(name: &str, tokens: SpecialTokens) -> Result<Self> {
        let src = named_template(name).ok_or_else(|| Error::TemplateName {
            name: name.into(),
            known: NAMED_TEMPLATES.join(", "),
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
        let err = |msg: String| Error::Template {
            origin: self.origin.clone(),
            msg: format!("chat template: {msg}"),
        };
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
/// A template that does not parse, named by its origin.
fn parse_error(origin: &str, e: &minijinja::Error) -> Error {
    Error::Template {
        origin: origin.into(),
        msg: format!("cannot parse the chat template: {}", one_line(e)),
    }
}

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
