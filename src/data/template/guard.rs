//! Bounding the memory a chat template uses.
//!
//!
//! Fuel bounds the instructions a render runs, and the output is capped, but one instruction can
//! double a string (`s ~ s`) or a list (`l + l`), so a short loop could build values far larger
//! than memory. To bound that, a guard call is inserted after every tag through which values grow
//! step by step (`set`, `endset`, `macro`, `call`, `with`, recursive `for`): it adds up the sizes
//! of the variables the tag binds and stops the render when they pass the output bound. Filters
//! and methods that can multiply a size in one call (`replace`, `indent`) check their result size
//! before building it. Growth inside one expression is bounded by the template's own length.

use minijinja::value::{Kwargs, Value};
use minijinja::ErrorKind;

use super::*;

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
            if let Some(names) = guard_for(&word, rest, &mut block_sets) {
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

/// The names a `{% word rest %}` tag binds, to be guarded after it: `Some(Some(names))` guards
/// those, `Some(None)` every variable, `None` needs no guard. `block_sets` tracks the names of
/// the open `{% set name %}` blocks, guarded at their `{% endset %}`.
fn guard_for(word: &str, rest: &str, block_sets: &mut Vec<Option<Vec<String>>>) -> Option<Option<Vec<String>>> {
    match word {
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
    }
}

pub(super) fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Split at commas outside brackets and string literals.
pub(super) fn split_top_level(s: &str) -> Vec<&str> {
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
pub(super) fn top_level_find_assign(s: &str) -> Option<usize> {
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
pub(super) fn target_roots(targets: &str) -> Option<Vec<String>> {
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
pub(super) fn params(s: &str) -> Option<Vec<String>> {
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
pub(super) fn tag_end(b: &[u8], from: usize, close: u8) -> Option<usize> {
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
pub(super) fn find_endraw(src: &str, from: usize) -> Option<usize> {
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
pub(super) fn value_guard(
    names: String,
    values: minijinja::value::Rest<Value>,
) -> std::result::Result<Value, minijinja::Error> {
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
pub(super) fn is_given_messages(v: &Value) -> bool {
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
pub(super) fn value_guard_all(state: &minijinja::State) -> std::result::Result<Value, minijinja::Error> {
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

pub(super) fn grew(limit: usize, name: Option<&str>) -> minijinja::Error {
    let what = match name {
        Some(n) => format!(" (variable `{n}`)"),
        None => String::new(),
    };
    minijinja::Error::new(ErrorKind::InvalidOperation, format!("{GREW}past {limit} bytes{what}"))
}

/// Take the size of `v` out of `budget`; false when it does not fit. Strings count their bytes,
/// lists and maps their items (at least 16 bytes each), everything else 16 bytes. Lazy
/// iterables are not walked (that could consume them), only their length is counted.
pub(super) fn charge(v: &Value, budget: &mut usize, depth: usize) -> bool {
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
pub(super) fn current_limit() -> usize {
    match VALUE_LIMIT.with(std::cell::Cell::get) {
        0 => usize::MAX,
        n => n,
    }
}

/// Bytes of `s.replace(from, to)` (at most `count` replacements), without building it.
pub(super) fn replaced_len(s: &str, from: &str, to: &str, count: Option<usize>) -> usize {
    let hits = if from.is_empty() {
        s.chars().count() + 1
    } else {
        s.matches(from).count()
    };
    let hits = count.map_or(hits, |c| hits.min(c));
    (s.len() - hits.saturating_mul(from.len()).min(s.len())).saturating_add(hits.saturating_mul(to.len()))
}

/// The `replace` filter, refusing results past the render's bound.
pub(super) fn capped_replace(
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
pub(super) fn capped_indent(
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
pub(super) fn capped_methods(
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
pub(super) struct CappedWriter {
    pub(super) buf: Vec<u8>,
    pub(super) limit: usize,
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
pub(super) fn rewrite_generation_tags(src: &str) -> String {
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

pub(super) fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("{RAISED}{msg}"),
    ))
}
