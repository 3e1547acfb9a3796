//! Property tests: the readers of user files return `Ok` or `Err` on any input and never panic:
//! data files (raw bytes, JSON token soup, arbitrary JSON rows shaped like each seed format),
//! recipes (arbitrary YAML maps and text), adapters (arbitrary adapter_config.json content,
//! corrupted and generated safetensors), model configs and weights, --prompts lines, and chat
//! templates (where the memory guards must also leave the output unchanged).
//!
//! Case counts are bounded so the whole file runs in seconds; `LORAFOLD_PROPTEST_CASES=N` runs
//! N cases per property instead (e.g. 20000 for a long local run).

use std::path::Path;

use lorafold::data::formats::{normalise_rows, Format};
use lorafold::data::source::{read_json, read_jsonl};
use lorafold::data::template::{ChatTemplate, SpecialTokens};
use lorafold::data::{LoadOptions, Message};
use lorafold::recipe::DpoOptions;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::Config as ProptestConfig;
use serde_json::{json, Map, Value};

use crate::common::*;

/// `cases` cases per property, or LORAFOLD_PROPTEST_CASES when set.
fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("LORAFOLD_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------------------------

/// Keys the data formats use (and a few wrappers), so that generated rows reach deep paths.
const DATA_KEYS: &[&str] = &[
    "prompt",
    "chosen",
    "rejected",
    "messages",
    "role",
    "content",
    "from",
    "value",
    "query",
    "response",
    "rejected_response",
    "rejected_messages",
    "history",
    "system",
    "conversations",
    "instruction",
    "input",
    "question",
    "response_1",
    "response_2",
    "overall_response",
    "chosen_conversations",
    "rejected_conversations",
    "type",
    "text",
    "data",
    "train",
];

const WORDS: &[&str] = &[
    "user",
    "assistant",
    "system",
    "human",
    "gpt",
    "tool",
    "narrator",
    "\n\nHuman: hi",
    "\n\nAssistant: yes",
    "Human: q\n\nAssistant: a",
    "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
    "",
    "  ",
    "1",
    "2",
    "text",
    "image",
    "é☃ \u{1F600}",
    "\u{0}",
];

fn arb_key() -> impl Strategy<Value = String> {
    prop_oneof![4 => select(DATA_KEYS).prop_map(String::from), 1 => "\\PC{0,8}"]
}

fn arb_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-3i64..4).prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
    ]
}

fn arb_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        arb_number(),
        select(WORDS).prop_map(Value::from),
        "\\PC{0,16}".prop_map(Value::from),
    ]
}

fn arb_json() -> impl Strategy<Value = Value> {
    arb_leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((arb_key(), inner), 0..6).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// A chat message as the formats write them, sometimes slightly off.
fn arb_message() -> impl Strategy<Value = Value> {
    let role = prop_oneof![select(WORDS).prop_map(Value::from), arb_leaf()];
    let content = prop_oneof![
        3 => select(WORDS).prop_map(Value::from),
        1 => arb_leaf(),
        1 => prop::collection::vec(
            prop_oneof![
                select(WORDS).prop_map(|w| json!({"type": "text", "text": w})),
                select(WORDS).prop_map(|w| json!({"type": w})),
                arb_leaf(),
            ],
            0..3
        )
        .prop_map(Value::Array),
    ];
    (any::<bool>(), role, content, any::<bool>()).prop_map(|(sharegpt, role, content, drop)| {
        let (rk, ck) = if sharegpt {
            ("from", "value")
        } else {
            ("role", "content")
        };
        let mut m = Map::new();
        m.insert(rk.into(), role);
        if !drop {
            m.insert(ck.into(), content);
        }
        Value::Object(m)
    })
}

/// A value for a data key: usually of a shape the formats accept, sometimes anything.
fn arb_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => select(WORDS).prop_map(Value::from),
        3 => prop::collection::vec(arb_message(), 0..5).prop_map(Value::Array),
        1 => arb_message(),
        1 => prop::collection::vec(
            prop::collection::vec(select(WORDS).prop_map(Value::from), 0..3).prop_map(Value::Array),
            0..3
        )
        .prop_map(Value::Array),
        2 => arb_json(),
    ]
}

fn arb_text() -> impl Strategy<Value = String> {
    prop_oneof![3 => select(&["What color is the sky?", "Blue.", "Green.", "hi", "", " "][..]).prop_map(String::from), 1 => "\\PC{0,12}"]
}

/// A well-formed message list: optional system turn, user/assistant turns, ending with the
/// assistant (`sharegpt`: `{from, value}` with human/gpt).
fn arb_conversation(sharegpt: bool) -> impl Strategy<Value = Value> {
    (any::<bool>(), prop::collection::vec(arb_text(), 1..4), arb_text()).prop_map(move |(sys, turns, last)| {
        let msg = |role: &str, text: String| {
            if sharegpt {
                let from = match role {
                    "user" => "human",
                    "assistant" => "gpt",
                    r => r,
                };
                json!({"from": from, "value": text})
            } else {
                json!({"role": role, "content": text})
            }
        };
        let mut out = Vec::new();
        if sys {
            out.push(msg("system", "Be brief.".into()));
        }
        for (i, t) in turns.into_iter().enumerate() {
            out.push(msg(if i % 2 == 0 { "user" } else { "assistant" }, t));
        }
        if out
            .last()
            .and_then(|m| m.get("role").or_else(|| m.get("from")))
            .and_then(Value::as_str)
            == Some(if sharegpt { "gpt" } else { "assistant" })
        {
            out.push(msg("user", "more?".into()));
        }
        out.push(msg("assistant", last));
        Value::Array(out)
    })
}

/// A value of the shape `format` expects under `key`.
fn plausible(format: Format, key: &'static str) -> BoxedStrategy<Value> {
    let text = || arb_text().prop_map(Value::from).boxed();
    let hh = || {
        (arb_text(), arb_text())
            .prop_map(|(q, a)| Value::from(format!("\n\nHuman: {q}\n\nAssistant: {a}")))
            .boxed()
    };
    match (format, key) {
        (Format::TrlExplicit, "prompt") => prop_oneof![text(), arb_conversation(false)].boxed(),
        (Format::TrlExplicit, _) => prop_oneof![
            text(),
            arb_text().prop_map(|t| json!([{"role": "assistant", "content": t}]))
        ]
        .boxed(),
        (Format::TrlImplicit, _) | (Format::SwiftV4, "messages") => arb_conversation(false).boxed(),
        (Format::SwiftV4, _) => text(),
        (Format::Xtuner, _) => arb_conversation(true).boxed(),
        (Format::Sharegpt, "conversations") => arb_conversation(true)
            .prop_map(|c| match c {
                Value::Array(mut v) => {
                    v.pop();
                    Value::Array(v)
                }
                other => other,
            })
            .boxed(),
        (Format::Sharegpt | Format::Alpaca, "chosen" | "rejected") => {
            prop_oneof![text(), arb_text().prop_map(|t| json!({"from": "gpt", "value": t}))].boxed()
        }
        (Format::AlignAnything, "overall_response") => {
            prop_oneof![Just(json!(1)), Just(json!(2)), Just(json!("2"))].boxed()
        }
        (Format::HhRlhf, _) => hh(),
        _ => text(),
    }
}

/// A row near `format`: its required keys (each kept with high probability) with values of the
/// expected shape (mostly) or anything, and a few other keys.
fn arb_row_for(format: Format) -> impl Strategy<Value = Map<String, Value>> {
    let required: Vec<&'static str> = format.required_keys().to_vec();
    let keep = prop::collection::vec(prop::bool::weighted(0.95), required.len());
    let values: Vec<BoxedStrategy<Value>> = required
        .iter()
        .map(|k| prop_oneof![6 => plausible(format, k), 1 => arb_value().boxed()].boxed())
        .collect();
    let extra = prop::collection::vec((arb_key(), arb_value()), 0..2);
    (keep, values, extra).prop_map(move |(keep, values, extra)| {
        let mut row = Map::new();
        for ((k, v), kept) in required.iter().zip(values).zip(keep) {
            if kept {
                row.insert((*k).to_string(), v);
            }
        }
        for (k, v) in extra {
            row.entry(k).or_insert(v);
        }
        row
    })
}

fn arb_rows() -> impl Strategy<Value = Vec<Value>> {
    prop::collection::vec(
        prop_oneof![
            4 => select(Format::ALL.to_vec()).prop_flat_map(arb_row_for).prop_map(Value::Object),
            1 => arb_json(),
        ],
        0..5,
    )
}

/// Text made of JSON tokens: far more likely than random bytes to get deep into a parser.
fn json_soup() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            select(&["{", "}", "[", "]", ",", ":", "\"", "\n", " ", "null", "true", "-1", "1e999", "\\u12"][..])
                .prop_map(String::from),
            select(DATA_KEYS).prop_map(|k| format!("\"{k}\"")),
            select(WORDS).prop_map(|w| serde_json::to_string(w).unwrap_or_default()),
            "\\PC{0,4}",
        ],
        0..64,
    )
    .prop_map(|parts| parts.concat())
}

// ---------------------------------------------------------------------------------------------
// Data files
// ---------------------------------------------------------------------------------------------

/// Read `bytes` as JSONL and as JSON, normalise with and without skipping bad rows. Every error
/// must name the file.
fn read_everything(bytes: &[u8]) -> Result<(), TestCaseError> {
    for skip in [false, true] {
        let opts = LoadOptions {
            skip_bad_rows: skip,
            ..Default::default()
        };
        let rows = read_jsonl(bytes, "props.jsonl");
        if let Err(e) = normalise_rows(rows, "props.jsonl", &opts) {
            prop_assert!(e.to_string().contains("props.jsonl"), "{e}");
        }
        match read_json(bytes, "props.json") {
            Ok(rows) => {
                if let Err(e) = normalise_rows(rows, "props.json", &opts) {
                    prop_assert!(e.to_string().contains("props.json"), "{e}");
                }
            }
            Err(e) => prop_assert!(e.to_string().contains("props.json"), "{e}"),
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(2048))]

    #[test]
    fn data_readers_take_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        read_everything(&bytes)?;
    }

    #[test]
    fn data_readers_take_json_token_soup(text in json_soup()) {
        read_everything(text.as_bytes())?;
    }

    #[test]
    fn every_format_takes_any_row(format in select(Format::ALL.to_vec()), row in arb_json()) {
        if let Value::Object(row) = row {
            let _ = format.parse_row(&row);
            let _ = Format::detect(&row);
        }
    }

    #[test]
    fn rows_near_each_format_never_panic(
        (format, row) in select(Format::ALL.to_vec()).prop_flat_map(|f| (Just(f), arb_row_for(f)))
    ) {
        let _ = format.parse_row(&row);
        let _ = Format::detect(&row);
        let text = Value::Object(row).to_string();
        read_everything(text.as_bytes())?;
    }

    #[test]
    fn files_of_generated_rows_never_panic(rows in arb_rows(), as_array in any::<bool>()) {
        let text = if as_array {
            serde_json::to_string(&rows).unwrap_or_default()
        } else {
            rows.iter().map(|r| r.to_string() + "\n").collect()
        };
        read_everything(text.as_bytes())?;
    }

    #[test]
    fn prompt_lines_never_panic(line in prop_oneof!["\\PC{0,64}", json_soup()]) {
        let _ = lorafold::infer::parse_prompt_line(&line);
    }
}

// ---------------------------------------------------------------------------------------------
// Recipes
// ---------------------------------------------------------------------------------------------

/// Every recipe key (the fields of DpoOptions).
fn recipe_keys() -> Vec<String> {
    match serde_json::to_value(DpoOptions::default()) {
        Ok(Value::Object(m)) => m.keys().cloned().collect(),
        _ => Vec::new(),
    }
}

fn arb_yaml_scalar() -> impl Strategy<Value = String> {
    prop_oneof![
        select(
            &[
                "0",
                "-1",
                "1",
                "1e-4",
                "-1e-4",
                ".nan",
                ".inf",
                "-.inf",
                "1e400",
                "18446744073709551616",
                "true",
                "no",
                "null",
                "~",
                "''",
                "sigmoid",
                "ipo, hinge",
                "keep_end",
                "ALL",
                "[sigmoid, nope]",
                "[1, 2]",
                "{a: 1}",
                "[]",
                "{}",
                "lora",
                "full",
                "cosine",
                "fp16",
                "latest",
                "0.5",
                "2.0",
            ][..]
        )
        .prop_map(String::from),
        any::<f64>().prop_map(|f| f.to_string()),
        any::<i64>().prop_map(|i| i.to_string()),
        "[a-z_ ]{0,12}",
    ]
}

fn arb_recipe() -> impl Strategy<Value = String> {
    let keys = recipe_keys();
    let key = prop_oneof![
        5 => select(keys).prop_map(|k| k.replace('_', if k.len() % 2 == 0 { "_" } else { "-" })),
        1 => "[a-z_-]{1,12}",
    ];
    prop::collection::vec((key, arb_yaml_scalar()), 0..8)
        .prop_map(|kv| kv.into_iter().map(|(k, v)| format!("{k}: {v}\n")).collect())
}

fn yaml_soup() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            select(
                &[":", "- ", "\n", "  ", "[", "]", "{", "}", ",", "'", "\"", "&a", "*a", "!!str", "#", "---", "? "][..]
            )
            .prop_map(String::from),
            arb_yaml_scalar(),
        ],
        0..40,
    )
    .prop_map(|p| p.concat())
}

fn load_recipe(dir: &Path, text: &str) {
    let p = dir.join("recipe.yaml");
    std::fs::write(&p, text).unwrap();
    if let Ok(opts) = DpoOptions::from_yaml_file(&p) {
        let flags = DpoOptions {
            model: Some("m".into()),
            dataset: Some(vec!["d.jsonl".into()]),
            ..Default::default()
        };
        if let Ok(o) = opts.clone().overlay(&flags) {
            let _ = o.resolve();
        }
        let _ = opts.resolve();
    }
}

proptest! {
    #![proptest_config(config(2048))]

    #[test]
    fn recipes_never_panic(text in prop_oneof![3 => arb_recipe(), 1 => yaml_soup(), 1 => "\\PC{0,64}"]) {
        let dir = tempfile::tempdir().unwrap();
        load_recipe(dir.path(), &text);
    }

    #[test]
    fn flag_values_never_panic(text in arb_recipe()) {
        // The same keys as command-line flags, overlaid on an empty recipe.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.yaml");
        std::fs::write(&p, &text).unwrap();
        if let Ok(flags) = DpoOptions::from_yaml_file(&p) {
            if let Ok(o) = DpoOptions::default().overlay(&flags) {
                let _ = o.resolve();
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Adapters, weights and model configs
// ---------------------------------------------------------------------------------------------

fn real_adapter_config() -> Map<String, Value> {
    let p = adapter_dir("qwen2_peft").join("adapter_config.json");
    match serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap() {
        Value::Object(m) => m,
        _ => unreachable!(),
    }
}

fn arb_config_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        select(vec![
            json!(0),
            json!(-1),
            json!(1),
            json!(4),
            json!(1e300),
            json!(0.5),
            json!(1.5),
            json!(true),
            json!(false),
            json!(null),
            json!("none"),
            json!("all"),
            json!("LORA"),
            json!("all-linear"),
            json!("q_proj"),
            json!("(q_proj"),
            json!(".*"),
            json!(["q_proj", "v_proj"]),
            json!(["lm_head"]),
            json!({"q_proj": 2}),
            json!({"(": 1}),
            json!({"q_proj": 0}),
            json!({"q_proj": -1}),
            json!({"v_proj": 1e9}),
            json!([]),
            json!({}),
            json!(18446744073709551615u64),
        ]),
        arb_json(),
    ]
}

/// The real adapter_config.json with keys set to other values or removed.
fn arb_adapter_config() -> impl Strategy<Value = String> {
    let base = real_adapter_config();
    let keys: Vec<String> = base.keys().cloned().collect();
    let edit = (
        prop_oneof![4 => select(keys), 1 => "[a-z_]{1,10}"],
        prop::option::weighted(0.85, arb_config_value()),
    );
    prop::collection::vec(edit, 0..5).prop_map(move |edits| {
        let mut cfg = base.clone();
        for (k, v) in edits {
            match v {
                Some(v) => {
                    cfg.insert(k, v);
                }
                None => {
                    cfg.remove(&k);
                }
            }
        }
        Value::Object(cfg).to_string()
    })
}

/// Write an adapter folder: `config` as adapter_config.json and `weights` as the safetensors.
fn adapter_folder(config: &str, weights: &[u8]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("adapter_config.json"), config).unwrap();
    std::fs::write(dir.path().join("adapter_model.safetensors"), weights).unwrap();
    dir
}

/// Load an adapter folder both ways (onto the qwen2 model, and for merging); never panics.
fn load_both_ways(dir: &Path) {
    let mut model = load_model("qwen2");
    let _ = lorafold::lora::io::load_adapter(&mut model, dir, false);
    let _ = lorafold::merge::adapter::load(dir);
}

#[derive(Debug, Clone)]
enum Mutation {
    Truncate(f64),
    Flip(f64, u8),
    HeaderLength(u64),
    Splice(f64, Vec<u8>),
    HeaderText(String),
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (0.0..1.0f64).prop_map(Mutation::Truncate),
        (0.0..1.0f64, 1..=255u8).prop_map(|(at, x)| Mutation::Flip(at, x)),
        // Mostly inside the header, where a flip changes its meaning.
        (0.0..0.05f64, 1..=255u8).prop_map(|(at, x)| Mutation::Flip(at, x)),
        prop_oneof![any::<u64>(), 0..4096u64].prop_map(Mutation::HeaderLength),
        (0.0..0.1f64, prop::collection::vec(any::<u8>(), 0..16)).prop_map(|(at, b)| Mutation::Splice(at, b)),
        json_soup().prop_map(Mutation::HeaderText),
    ]
}

/// Apply mutations to a safetensors file's bytes.
fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    let at = |f: f64, len: usize| ((len as f64 * f) as usize).min(len.saturating_sub(1));
    for m in mutations {
        match m {
            Mutation::Truncate(f) => bytes.truncate((bytes.len() as f64 * f) as usize),
            Mutation::Flip(f, x) => {
                if !bytes.is_empty() {
                    let i = at(*f, bytes.len());
                    bytes[i] ^= x;
                }
            }
            Mutation::HeaderLength(n) => {
                if bytes.len() >= 8 {
                    bytes[..8].copy_from_slice(&n.to_le_bytes());
                }
            }
            Mutation::Splice(f, b) => {
                let i = at(*f, bytes.len()).max(8.min(bytes.len()));
                bytes.splice(i..i, b.iter().copied());
            }
            Mutation::HeaderText(t) => {
                // Replace the header by the text, keeping the data.
                if bytes.len() >= 8 {
                    let hlen = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
                    let data = bytes.get(8 + hlen.min(bytes.len() - 8)..).unwrap_or(&[]).to_vec();
                    let mut out = (t.len() as u64).to_le_bytes().to_vec();
                    out.extend_from_slice(t.as_bytes());
                    out.extend(data);
                    bytes = out;
                }
            }
        }
    }
    bytes
}

const DTYPES: &[&str] = &[
    "F32", "F16", "BF16", "F64", "I64", "I32", "I16", "U8", "I8", "U16", "U32", "U64", "BOOL", "F8_E4M3", "F8_E5M2",
    "F8_E8M0", "F4", "F6_E2M3", "C64", "Q4", "",
];

/// A safetensors file written from a generated header: plausible LoRA tensor names and shapes
/// for the qwen2 model, any dtype, offsets that are packed (valid) or arbitrary.
fn arb_generated_safetensors() -> impl Strategy<Value = Vec<u8>> {
    let name = prop_oneof![
        4 => (0..3usize, select(&["self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj", "mlp.up_proj"][..]), select(&["A", "B"][..]))
            .prop_map(|(l, m, h)| format!("base_model.model.model.layers.{l}.{m}.lora_{h}.weight")),
        1 => "\\PC{0,12}",
    ];
    let shape = prop_oneof![
        (0..6usize, select(&[64usize, 32, 176][..]), any::<bool>()).prop_map(|(r, d, a)| if a {
            vec![r, d]
        } else {
            vec![d, r]
        }),
        prop::collection::vec(0..70usize, 0..4),
    ];
    let tensor = (
        name,
        select(DTYPES),
        shape,
        prop::option::weighted(0.2, (0..5000u64, 0..5000u64)),
    );
    (prop::collection::vec(tensor, 0..6), 0..64usize).prop_map(|(tensors, extra)| {
        let mut header = Map::new();
        let mut offset = 0u64;
        for (name, dtype, shape, offsets) in tensors {
            let bits: u64 = match dtype {
                "F64" | "I64" | "U64" | "C64" => 64,
                "F32" | "I32" | "U32" => 32,
                "F16" | "BF16" | "I16" | "U16" => 16,
                "F4" => 4,
                "F6_E2M3" => 6,
                _ => 8,
            };
            let n: u64 = shape.iter().map(|&d| d as u64).product::<u64>() * bits / 8;
            let (s, e) = offsets.unwrap_or((offset, offset + n));
            offset = offset.max(e);
            header.insert(name, json!({"dtype": dtype, "shape": shape, "data_offsets": [s, e]}));
        }
        let text = Value::Object(header).to_string();
        let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(text.as_bytes());
        bytes.resize(bytes.len() + offset.min(1 << 20) as usize + extra % 2 * extra, 0x3c);
        bytes
    })
}

/// A safetensors adapter for qwen2 built from well-formed pairs: some modules, a rank, a float
/// dtype; sometimes one tensor's shape is off by one.
fn arb_plausible_adapter_weights() -> impl Strategy<Value = Vec<u8>> {
    const MODULES: [(&str, usize, usize); 7] = [
        ("self_attn.q_proj", 64, 64),
        ("self_attn.k_proj", 64, 32),
        ("self_attn.v_proj", 64, 32),
        ("self_attn.o_proj", 64, 64),
        ("mlp.gate_proj", 64, 176),
        ("mlp.up_proj", 64, 176),
        ("mlp.down_proj", 176, 64),
    ];
    let pick = prop::collection::vec((0..2usize, 0..7usize), 1..5);
    (
        pick,
        1..5usize,
        select(&["F32", "F16", "BF16"][..]),
        prop::option::weighted(0.3, 0..8usize),
    )
        .prop_map(|(picks, r, dtype, off)| {
            let width = if dtype == "F32" { 4 } else { 2 };
            let mut header = Map::new();
            let mut offset = 0usize;
            let mut k = 0;
            let mut seen = std::collections::HashSet::new();
            for (layer, m) in picks {
                if !seen.insert((layer, m)) {
                    continue;
                }
                let (name, inp, out) = MODULES[m];
                for (half, mut shape) in [("A", vec![r, inp]), ("B", vec![out, r])] {
                    if off == Some(k) {
                        shape[0] += 1;
                    }
                    k += 1;
                    let n = shape.iter().product::<usize>() * width;
                    header.insert(
                        format!("base_model.model.model.layers.{layer}.{name}.lora_{half}.weight"),
                        json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}),
                    );
                    offset += n;
                }
            }
            let text = Value::Object(header).to_string();
            let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
            bytes.extend_from_slice(text.as_bytes());
            bytes.resize(bytes.len() + offset, 0x3c);
            bytes
        })
}

fn real_adapter_weights() -> Vec<u8> {
    std::fs::read(adapter_dir("qwen2_peft").join("adapter_model.safetensors")).unwrap()
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn adapter_configs_never_panic(config in prop_oneof![6 => arb_adapter_config(), 1 => json_soup()]) {
        let dir = adapter_folder(&config, &real_adapter_weights());
        let _ = lorafold::lora::config::LoraConfig::from_file(&dir.path().join("adapter_config.json"));
        load_both_ways(dir.path());
    }

    #[test]
    fn corrupted_adapter_weights_never_panic(mutations in prop::collection::vec(arb_mutation(), 1..4)) {
        let config = Value::Object(real_adapter_config()).to_string();
        let dir = adapter_folder(&config, &mutate(real_adapter_weights(), &mutations));
        load_both_ways(dir.path());
    }

    #[test]
    fn generated_adapter_weights_never_panic(weights in prop_oneof![arb_generated_safetensors(), arb_plausible_adapter_weights()]) {
        let config = Value::Object(real_adapter_config()).to_string();
        let dir = adapter_folder(&config, &weights);
        load_both_ways(dir.path());
    }

    #[test]
    fn corrupted_model_weights_never_panic(mutations in prop::collection::vec(arb_mutation(), 1..3)) {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(&model_dir("qwen2"), dir.path());
        let p = dir.path().join("model.safetensors");
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, mutate(bytes, &mutations)).unwrap();
        let _ = lorafold::model::Model::load_dir(dir.path(), &lorafold::model::LoadOptions::default());
    }

    #[test]
    fn model_configs_never_panic(edits in prop::collection::vec((prop_oneof![
        3 => select(&[
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "architectures", "model_type", "rope_scaling", "rope_parameters",
            "layer_types", "sliding_window", "use_sliding_window", "max_window_layers", "eos_token_id",
            "tie_word_embeddings", "hidden_act", "rope_theta",
        ][..]).prop_map(String::from),
        1 => "[a-z_]{1,8}",
    ], prop::option::weighted(0.85, arb_config_value())), 0..6)) {
        let p = model_dir("qwen2").join("config.json");
        let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        if let Value::Object(m) = &mut cfg {
            for (k, v) in edits {
                match v {
                    Some(v) => { m.insert(k, v); }
                    None => { m.remove(&k); }
                }
            }
        }
        let _ = lorafold::model::ModelConfig::from_value(&cfg, &p);
    }
}

// ---------------------------------------------------------------------------------------------
// Chat templates
// ---------------------------------------------------------------------------------------------

/// Jinja of the kind Hugging Face chat templates hold: text, output, `set` (plain and
/// namespace), `for` over messages, `if`, `macro`, comments and raw blocks, nested, each tag with
/// a random whitespace control.
fn arb_template() -> impl Strategy<Value = String> {
    fn ws() -> impl Strategy<Value = &'static str> {
        select(&["", "-", "+"][..])
    }
    let leaf = prop_oneof![
        select(&["text ", "\n", "  ", "\n\n  ", "<|im_start|>", " %} ", "}"][..]).prop_map(String::from),
        (
            ws(),
            ws(),
            select(
                &[
                    "'x'",
                    "m.content",
                    "x ~ 'y'",
                    "[1, 2]",
                    "messages[1:]",
                    "'%}'",
                    "loop.index if loop is defined else 0"
                ][..]
            )
        )
            .prop_map(|(a, b, e)| format!("{{%{a} set x = {e} {b}%}}")),
        (ws(), ws()).prop_map(|(a, b)| format!("{{%{a} set ns.n = ns.n ~ 'z' {b}%}}")),
        (ws(), ws()).prop_map(|(a, b)| format!("{{%{a} set x, y = 'p', 'q' {b}%}}")),
        (
            ws(),
            ws(),
            select(
                &[
                    "x",
                    "ns.n",
                    "messages|length",
                    "'}}'",
                    "m.role|upper if m is defined else ''",
                    "f('a')"
                ][..]
            )
        )
            .prop_map(|(a, b, e)| format!("{{{{{a} {e} {b}}}}}")),
        select(
            &[
                "{# note #}",
                "{#- note -#}",
                "{% raw %}{% set x = 1 %}{{ y }}{% endraw %}",
                "{%- raw -%} r {% endraw %}"
            ][..]
        )
        .prop_map(String::from),
    ];
    let body = leaf.prop_recursive(3, 24, 4, |inner| {
        let block = prop::collection::vec(inner, 0..4).prop_map(|v| v.concat());
        prop_oneof![
            (ws(), ws(), block.clone(), ws(), ws())
                .prop_map(|(a, b, x, c, d)| format!("{{%{a} for m in messages {b}%}}{x}{{%{c} endfor {d}%}}")),
            (ws(), ws(), block.clone(), ws(), ws()).prop_map(|(a, b, x, c, d)| format!(
                "{{%{a} if m is defined and m.role == 'user' {b}%}}{x}{{%{c} endif {d}%}}"
            )),
            (ws(), ws(), block.clone(), ws(), ws())
                .prop_map(|(a, b, x, c, d)| format!("{{%{a} set cap {b}%}}{x}{{%{c} endset {d}%}}{{{{ cap }}}}")),
            (ws(), ws(), block, ws(), ws())
                .prop_map(|(a, b, x, c, d)| format!("{{%{a} with w = 1 {b}%}}{x}{{%{c} endwith {d}%}}")),
        ]
    });
    prop::collection::vec(body, 0..5).prop_map(|p| {
        format!(
            "{{% set ns = namespace(n='') %}}{{% set x = '' %}}{{% macro f(v, w=2) %}}<{{{{ v }}}}>{{% endmacro %}}\n{}",
            p.concat()
        )
    })
}

fn plain_render(src: &str, messages: &[Message]) -> Result<String, minijinja::Error> {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_fuel(Some(5_000_000));
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.template_from_str(src)?
        .render(minijinja::context! { messages => messages, add_generation_prompt => true })
}

fn messages() -> Vec<Message> {
    vec![
        Message::system("Be brief."),
        Message::user("Hi"),
        Message::assistant("Hello."),
        Message::user("Bye?"),
    ]
}

proptest! {
    #![proptest_config(config(2048))]

    #[test]
    fn guarded_templates_render_like_plain_ones(src in arb_template()) {
        let msgs = messages();
        let plain = plain_render(&src, &msgs);
        match ChatTemplate::new(&src, "props.jinja", SpecialTokens::default()) {
            Ok(t) => match (t.render(&msgs, true), plain) {
                (Ok(g), Ok(p)) => prop_assert_eq!(g, p, "{:?}", src),
                (Err(_), Err(_)) => {}
                (g, p) => prop_assert!(false, "{src:?}: guarded {g:?}, plain {p:?}"),
            },
            Err(e) => prop_assert!(plain.is_err(), "{src:?}: {e}"),
        }
    }

    #[test]
    fn any_template_text_never_panics(src in prop_oneof![
        arb_template(),
        prop::collection::vec(prop_oneof![
            select(&["{%", "%}", "{{", "}}", "{#", "#}", "-", "+", " for ", " in ", " set ", " = ", " if ", " endif ",
                     " endfor ", " macro ", " endmacro ", " raw ", " endraw ", "messages", "'", "\"", "(", ")", "~", "|",
                     " recursive ", "loop(", "range(3)", "namespace(", " call ", " with ", ","][..]).prop_map(String::from),
            "\\PC{0,3}",
        ], 0..40).prop_map(|p| p.concat()),
    ]) {
        if let Ok(t) = ChatTemplate::new(&src, "props.jinja", SpecialTokens::default()) {
            let _ = t.render(&messages(), true);
        }
    }
}
