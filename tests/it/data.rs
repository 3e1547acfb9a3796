//! Preference data: every format to the same pair, file:line errors, skipping bad rows, Parquet,
//! hub datasets from a cache on disk, chat templates against transformers, the prompt/response
//! boundary, truncation and the drops.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use lorafold::data::formats::load_file;
use lorafold::data::source::{pick_data_files, resolve_hub_dataset_in, HubSpec};
use lorafold::data::{
    load_pairs, LoadOptions, Message, PreferencePair, PrepareStats, Preprocessor, RowRef, TokenizeOptions,
    TruncationMode,
};

use crate::common::*;

fn data_dir() -> PathBuf {
    root().join("tests/fixtures/data")
}

fn fixture(name: &str) -> String {
    data_dir().join(name).display().to_string()
}

fn load(spec: &str) -> (Vec<(RowRef, PreferencePair)>, lorafold::data::LoadStats) {
    load_pairs(spec, &LoadOptions::default()).unwrap_or_else(|e| panic!("{spec}: {e}"))
}

fn load_err(spec: &str, skip: bool) -> String {
    let opts = LoadOptions {
        skip_bad_rows: skip,
        ..Default::default()
    };
    match load_pairs(spec, &opts) {
        Ok((p, s)) => panic!("{spec}: expected an error, got {} pairs ({s:?})", p.len()),
        Err(e) => e.to_string(),
    }
}

/// A temporary data file with `content`.
fn temp_file(dir: &tempfile::TempDir, name: &str, content: &[u8]) -> String {
    let p = dir.path().join(name);
    std::fs::write(&p, content).unwrap();
    p.display().to_string()
}

const SYSTEM: &str = "You are a helpful assistant.";
const USER1: &str = "What color is the sky?";
const ASSISTANT1: &str = "The sky is blue.";
const USER2: &str = "And at night?";
const CHOSEN: &str = "At night the sky is dark.";
const REJECTED: &str = "The cat is happy.";

fn prompt() -> Vec<Message> {
    vec![
        Message::system(SYSTEM),
        Message::user(USER1),
        Message::assistant(ASSISTANT1),
        Message::user(USER2),
    ]
}

fn expected_pair() -> PreferencePair {
    PreferencePair {
        prompt: prompt(),
        chosen: vec![Message::assistant(CHOSEN)],
        rejected: vec![Message::assistant(REJECTED)],
        rejected_prompt: None,
    }
}

// ---------------------------------------------------------------------------------------------
// Formats
// ---------------------------------------------------------------------------------------------

#[test]
fn every_format_parses_to_the_same_pair() {
    let files = [
        ("trl_explicit.jsonl", "trl-explicit-prompt", 1),
        ("trl_explicit.json", "trl-explicit-prompt", 2),
        ("trl_explicit.parquet", "trl-explicit-prompt", 1),
        ("trl_implicit.jsonl", "trl-implicit-prompt", 1),
        ("xtuner.jsonl", "xtuner", 2),
        ("swift_v2.jsonl", "ms-swift-v2", 1),
        ("swift_v4.jsonl", "ms-swift-v4", 2),
        ("llamafactory_sharegpt.json", "llamafactory-sharegpt", 1),
        ("llamafactory_alpaca.json", "llamafactory-alpaca", 1),
    ];
    for (name, format, rows) in files {
        let spec = fixture(name);
        let (pairs, stats) = load(&spec);
        assert_eq!(pairs.len(), rows, "{name}");
        assert_eq!(stats.rows, rows, "{name}");
        assert_eq!(stats.formats, vec![(spec.clone(), format.to_string())], "{name}");
        assert_eq!(
            pairs[0].0,
            RowRef {
                file: spec.clone(),
                line: 1
            },
            "{name}"
        );
        assert_eq!(pairs[0].1, expected_pair(), "{name}");
    }
    // ms-swift v4 with rejected_messages sharing the prompt.
    assert_eq!(load(&fixture("swift_v4.jsonl")).0[1].1, expected_pair());
    // TRL with plain strings.
    assert_eq!(
        load(&fixture("trl_explicit.json")).0[1].1,
        PreferencePair {
            prompt: vec![Message::user(USER1)],
            chosen: vec![Message::assistant(ASSISTANT1)],
            rejected: vec![Message::assistant(REJECTED)],
            rejected_prompt: None,
        }
    );
    // xtuner with different turn counts: the rejected side keeps its own prompt.
    let (x, _) = load(&fixture("xtuner.jsonl"));
    assert_eq!(x[1].1.prompt, prompt());
    assert_eq!(x[1].1.rejected_prompt, Some(vec![Message::user(USER2)]));
    assert_eq!(x[1].1.rejected, vec![Message::assistant(REJECTED)]);
    assert_eq!(x[1].0.line, 2);
}

#[test]
fn hh_rlhf_and_align_anything_parse_to_their_own_pairs() {
    let (hh, stats) = load(&fixture("hh_rlhf.jsonl"));
    assert_eq!(stats.formats[0].1, "hh-rlhf");
    let mut no_system = expected_pair();
    no_system.prompt.remove(0);
    assert_eq!(hh[0].1, no_system);

    let (aa, stats) = load(&fixture("align_anything.jsonl"));
    assert_eq!(stats.formats[0].1, "align-anything");
    let single = PreferencePair {
        prompt: vec![Message::user(USER1)],
        chosen: vec![Message::assistant(ASSISTANT1)],
        rejected: vec![Message::assistant(REJECTED)],
        rejected_prompt: None,
    };
    // overall_response 2 (a number) and "1" (a string) name the better response.
    assert_eq!(aa[0].1, single);
    assert_eq!(aa[1].1, single);
}

#[test]
fn json_files_may_wrap_rows_or_hold_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let row = r#"{"prompt": "q", "chosen": "a", "rejected": "b"}"#;
    let wrapped = temp_file(
        &dir,
        "wrapped.json",
        format!(r#"{{"train": [{row}, {row}]}}"#).as_bytes(),
    );
    assert_eq!(load(&wrapped).0.len(), 2);
    let lines = temp_file(&dir, "lines.json", format!("{row}\n\n{row}\n").as_bytes());
    let (pairs, _) = load(&lines);
    assert_eq!(pairs.iter().map(|p| p.0.line).collect::<Vec<_>>(), [1, 3]);
    // A BOM and CRLF line ends are fine.
    let bom = temp_file(&dir, "bom.jsonl", format!("\u{feff}{row}\r\n{row}\r\n").as_bytes());
    assert_eq!(load(&bom).0.len(), 2);
}

#[test]
fn a_local_folder_loads_its_train_files() {
    let dir = tempfile::tempdir().unwrap();
    let row = r#"{"prompt": "q", "chosen": "a", "rejected": "b"}"#;
    temp_file(&dir, "train.jsonl", format!("{row}\n{row}\n").as_bytes());
    temp_file(&dir, "test.jsonl", format!("{row}\n").as_bytes());
    let (pairs, stats) = load(dir.path().to_str().unwrap());
    assert_eq!(pairs.len(), 2);
    assert!(stats.formats[0].0.ends_with("train.jsonl"), "{stats:?}");
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

const GOOD: &str = r#"{"prompt": "q", "chosen": "a", "rejected": "b"}"#;

fn assert_contains(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "expected {p:?} in: {msg}");
    }
}

#[test]
fn bad_rows_are_errors_naming_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "malformed.jsonl",
            format!("{GOOD}\n{GOOD}\n{{\"prompt\": \"q\", \"chosen\": \n"),
            vec!["malformed.jsonl:3", "invalid JSON"],
        ),
        (
            "wrong_type.jsonl",
            format!("{GOOD}\n{{\"prompt\": \"q\", \"chosen\": 42, \"rejected\": \"b\"}}\n"),
            vec![
                "wrong_type.jsonl:2",
                "key `chosen` must be a string or a list of messages, got a number",
            ],
        ),
        (
            "missing.jsonl",
            format!("{GOOD}\n\n{{\"prompt\": \"q\", \"chosen\": \"a\"}}\n"),
            vec!["missing.jsonl:3", "missing key `rejected`"],
        ),
        (
            "bad_message.jsonl",
            r#"{"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}"#.to_string(),
            vec!["bad_message.jsonl:1", "key `prompt`: message 1 has no `content`"],
        ),
        (
            "tool_role.jsonl",
            r#"{"prompt": [{"role": "observation", "content": "x"}], "chosen": "a", "rejected": "b"}"#.to_string(),
            vec!["tool_role.jsonl:1", "role `observation`", "not supported"],
        ),
        (
            "not_object.jsonl",
            format!("{GOOD}\n[1, 2]\n"),
            vec!["not_object.jsonl:2", "must be a JSON object, got a list"],
        ),
        (
            "overall.jsonl",
            r#"{"question": "q", "response_1": "a", "response_2": "b", "overall_response": 3}"#.to_string(),
            vec!["overall.jsonl:1", "`overall_response` must be 1 or 2", "got 3"],
        ),
        (
            "history.jsonl",
            r#"{"query": "q", "response": "a", "rejected_response": "b", "history": [["x"]]}"#.to_string(),
            vec!["history.jsonl:1", "key `history`: entry 1"],
        ),
        (
            "xtuner_no_gpt.jsonl",
            r#"{"chosen_conversations": [{"from": "human", "value": "q"}], "rejected_conversations": []}"#.to_string(),
            vec![
                "xtuner_no_gpt.jsonl:1",
                "`chosen_conversations` has no assistant (gpt) turn",
            ],
        ),
        (
            "hh_bad.jsonl",
            r#"{"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi\n\nAssistant: x"}"#.to_string(),
            vec!["hh_bad.jsonl:1", "`chosen` does not end with an `Assistant:` turn"],
        ),
        (
            "array.json",
            format!("[\n  {GOOD},\n  {{\"prompt\": \"q\",\n   \"chosen\": null, \"rejected\": \"b\"}}\n]"),
            vec![
                "array.json: row 2 (line 3)",
                "key `chosen` must be a string or a list of messages, got null",
            ],
        ),
        (
            "broken_array.json",
            format!("[\n  {GOOD},\n  {{\"prompt\": }}\n]"),
            vec!["broken_array.json:3", "invalid JSON"],
        ),
    ];
    for (name, content, parts) in cases {
        let spec = temp_file(&dir, name, content.as_bytes());
        assert_contains(&load_err(&spec, false), &parts);
    }
}

#[test]
fn non_utf8_input_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = format!("{GOOD}\n").into_bytes();
    bytes.extend_from_slice(b"{\"prompt\": \"\xff\xfe\", \"chosen\": \"a\", \"rejected\": \"b\"}\n");
    let jsonl = temp_file(&dir, "latin1.jsonl", &bytes);
    assert_contains(&load_err(&jsonl, false), &["latin1.jsonl:2", "UTF-8"]);
    let mut arr = format!("[\n{GOOD},\n").into_bytes();
    arr.extend_from_slice(b"{\"prompt\": \"\xff\"}]");
    let json = temp_file(&dir, "latin1.json", &arr);
    assert_contains(&load_err(&json, false), &["latin1.json:3", "UTF-8"]);
}

#[test]
fn empty_unknown_and_mixed_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    for (name, content) in [("empty.jsonl", ""), ("blank.jsonl", "\n  \n"), ("empty.json", "[]")] {
        let spec = temp_file(&dir, name, content.as_bytes());
        // Even when bad rows are skipped.
        assert_contains(&load_err(&spec, true), &[name, "empty"]);
    }
    let unknown = temp_file(&dir, "unknown.jsonl", b"{\"text\": \"x\", \"label\": 1}\n");
    let msg = load_err(&unknown, true);
    assert_contains(
        &msg,
        &[
            "unknown.jsonl:1",
            "unknown preference-data format",
            "[label, text]",
            "trl-explicit-prompt",
            "hh-rlhf",
            "xtuner",
        ],
    );
    let half = temp_file(
        &dir,
        "half.jsonl",
        b"{\"chosen\": \"x\", \"rejected\": [{\"role\": \"assistant\", \"content\": \"y\"}]}\n",
    );
    assert_contains(
        &load_err(&half, false),
        &["`chosen` is a string and `rejected` is a list"],
    );

    let mixed = format!(
        "{GOOD}\n{}\n",
        r#"{"query": "q", "response": "a", "rejected_response": "b"}"#
    );
    let spec = temp_file(&dir, "mixed.jsonl", mixed.as_bytes());
    assert_contains(
        &load_err(&spec, false),
        &[
            "mixed.jsonl:2",
            "mixed formats",
            "ms-swift-v2",
            "trl-explicit-prompt",
            "missing `prompt`",
        ],
    );
    let mixed = format!(
        "{}\n{}\n",
        r#"{"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}"#,
        r#"{"chosen": [], "rejected": []}"#
    );
    let spec = temp_file(&dir, "mixed_hh.jsonl", mixed.as_bytes());
    assert_contains(
        &load_err(&spec, false),
        &["mixed_hh.jsonl:2", "mixed formats", "trl-implicit-prompt", "hh-rlhf"],
    );

    let missing = dir.path().join("absent.jsonl");
    assert_contains(&load_err(missing.to_str().unwrap(), false), &["absent.jsonl"]);
    let txt = temp_file(&dir, "data.txt", b"hello");
    assert_contains(&load_err(&txt, false), &["data.txt", "unsupported data file extension"]);
}

#[test]
fn skip_bad_rows_counts_what_it_skips() {
    let dir = tempfile::tempdir().unwrap();
    let content = [
        "{not json",
        GOOD,
        r#"{"prompt": "q", "chosen": 1, "rejected": "b"}"#,
        r#"{"query": "q", "response": "a", "rejected_response": "b"}"#,
        GOOD,
        "",
        GOOD,
    ]
    .join("\n");
    let spec = temp_file(&dir, "some_bad.jsonl", content.as_bytes());
    assert_contains(&load_err(&spec, false), &["some_bad.jsonl:1"]);
    let opts = LoadOptions {
        skip_bad_rows: true,
        ..Default::default()
    };
    let (pairs, stats) = load_pairs(&spec, &opts).unwrap();
    assert_eq!(pairs.iter().map(|p| p.0.line).collect::<Vec<_>>(), [2, 5, 7]);
    assert_eq!(stats.rows, 3);
    assert_eq!(stats.skipped_bad_rows, 3);
    assert_eq!(stats.formats[0].1, "trl-explicit-prompt");

    // Nothing readable at all is still an error.
    let spec = temp_file(&dir, "all_bad.jsonl", b"{x\n{y\n");
    assert_contains(&load_err(&spec, true), &["all_bad.jsonl", "no readable row"]);
}

// ---------------------------------------------------------------------------------------------
// Hub datasets
// ---------------------------------------------------------------------------------------------

/// Lay out `datasets--org--name/{refs/main, snapshots/<rev>/...}` like huggingface_hub.
fn make_dataset_cache(root: &Path, id: &str, rev: &str, files: &[(&str, &str)]) {
    let repo = root.join(format!("datasets--{}", id.replace('/', "--")));
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), rev).unwrap();
    for (rel, content) in files {
        let p = repo.join("snapshots").join(rev).join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
}

#[test]
fn hub_datasets_resolve_from_the_cache_offline() {
    let cache = tempfile::tempdir().unwrap();
    let rev = "89abcdef0123456789abcdef0123456789abcdef";
    let aa = std::fs::read_to_string(data_dir().join("align_anything.jsonl")).unwrap();
    let trl = std::fs::read_to_string(data_dir().join("trl_explicit.jsonl")).unwrap();
    make_dataset_cache(
        cache.path(),
        "lorafold-test/prefs",
        rev,
        &[
            ("README.md", "# card"),
            ("text-to-text/train_12k.jsonl", &aa),
            ("text-to-text/val_1k.jsonl", &aa),
            ("text-to-text/dataset_info.json", "{}"),
            ("other/train.jsonl", &trl),
        ],
    );
    let spec = HubSpec::parse("lorafold-test/prefs:text-to-text").unwrap();
    assert_eq!(spec.subset.as_deref(), Some("text-to-text"));
    let files = resolve_hub_dataset_in(cache.path(), &spec, None, true).unwrap();
    assert_eq!(files.len(), 1);
    assert_eq!(
        files[0].display,
        "hf://datasets/lorafold-test/prefs/text-to-text/train_12k.jsonl"
    );
    let (pairs, stats) = load_file(&files[0].path, &files[0].display, &LoadOptions::default()).unwrap();
    assert_eq!(stats.formats[0].1, "align-anything");
    assert_eq!(
        pairs[0].0.to_string(),
        "hf://datasets/lorafold-test/prefs/text-to-text/train_12k.jsonl:1"
    );

    // A subset that names a split; a commit given as the revision.
    let val = HubSpec::parse("lorafold-test/prefs:val").unwrap();
    let files = resolve_hub_dataset_in(cache.path(), &val, Some(rev), true).unwrap();
    assert!(files[0].display.ends_with("text-to-text/val_1k.jsonl"), "{files:?}");

    // Without a subset, two configurations are ambiguous.
    let whole = HubSpec::parse("lorafold-test/prefs").unwrap();
    let e = resolve_hub_dataset_in(cache.path(), &whole, None, true)
        .unwrap_err()
        .to_string();
    assert_contains(&e, &["lorafold-test/prefs", "several subsets", "other", "text-to-text"]);
    let e = resolve_hub_dataset_in(
        cache.path(),
        &HubSpec::parse("lorafold-test/prefs:nope").unwrap(),
        None,
        true,
    )
    .unwrap_err()
    .to_string();
    assert_contains(&e, &["subset `nope`", "text-to-text/train_12k.jsonl"]);

    // Not cached, offline.
    let e = resolve_hub_dataset_in(cache.path(), &HubSpec::parse("nobody/absent").unwrap(), None, true)
        .unwrap_err()
        .to_string();
    assert_contains(&e, &["nobody/absent", "not in the local hub cache", "HF_HUB_OFFLINE"]);
}

#[test]
fn data_files_are_picked_like_the_hub_lays_them_out() {
    let files: Vec<String> = [
        ".gitattributes",
        "README.md",
        "data/train-00000-of-00002.parquet",
        "data/train-00001-of-00002.parquet",
        "data/test-00000-of-00001.parquet",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(
        pick_data_files(&files, None).unwrap(),
        ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]
    );
    assert_eq!(
        pick_data_files(&files, Some("test")).unwrap(),
        ["data/test-00000-of-00001.parquet"]
    );
    assert!(pick_data_files(&files[..2], None).unwrap_err().contains("no .parquet"));
    assert!(HubSpec::parse("./local/file.jsonl").is_none());
    assert!(HubSpec::parse("a/b/c").is_none());
}

// ---------------------------------------------------------------------------------------------
// Chat templates against transformers
// ---------------------------------------------------------------------------------------------

#[derive(serde::Deserialize)]
struct Golden {
    conversations: HashMap<String, Vec<Message>>,
    cases: Vec<GoldenCase>,
}

#[derive(serde::Deserialize)]
struct GoldenCase {
    model: String,
    template: Option<String>,
    conversation: String,
    add_generation_prompt: bool,
    #[serde(default)]
    text: String,
    #[serde(default)]
    ids: Vec<u32>,
    /// The message of a template that raises (Gemma 2 on a system turn).
    error: Option<String>,
}

fn golden_templates() -> Golden {
    let p = root().join("tests/golden/templates.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn template_path(name: &str) -> String {
    if name == "features" {
        fixture("templates/features.jinja")
    } else {
        name.to_string()
    }
}

fn preprocessor(model: &str, template: Option<&str>) -> Preprocessor {
    Preprocessor::from_model_dir(&model_dir(model), template).unwrap_or_else(|e| panic!("{model}: {e}"))
}

#[test]
fn chat_templates_render_like_transformers() {
    let g = golden_templates();
    let mut pres: HashMap<(String, Option<String>), Preprocessor> = HashMap::new();
    for c in &g.cases {
        let key = (c.model.clone(), c.template.clone());
        let pre = pres
            .entry(key)
            .or_insert_with(|| preprocessor(&c.model, c.template.as_deref().map(template_path).as_deref()));
        let conv = &g.conversations[&c.conversation];
        let what = format!(
            "{} / {:?} / {} / gen={}",
            c.model, c.template, c.conversation, c.add_generation_prompt
        );
        if let Some(want) = &c.error {
            let e = pre.render(conv, c.add_generation_prompt).expect_err(&what);
            assert!(e.to_string().contains(want.as_str()), "{what}: {e} (expected {want:?})");
            continue;
        }
        let text = pre
            .render(conv, c.add_generation_prompt)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(text, c.text, "{what}");
        assert_eq!(pre.encode(&text).unwrap(), c.ids, "{what}");
    }
    assert_eq!(pres.len(), ARCHS.len() + 2 * 5);
}

#[test]
fn responses_are_what_the_full_conversation_adds_to_the_prompt() {
    let g = golden_templates();
    let ids = |model: &str, conv: &str, gen: bool| {
        g.cases
            .iter()
            .find(|c| {
                c.model == model && c.template.is_none() && c.conversation == conv && c.add_generation_prompt == gen
            })
            .map(|c| c.ids.clone())
            .unwrap()
    };
    let row = RowRef {
        file: "x.jsonl".into(),
        line: 1,
    };
    for model in ARCHS {
        let pre = preprocessor(model, None);
        let mut stats = PrepareStats::default();
        if model == "gemma2" {
            // Gemma 2's template has no system role: the row is refused, naming where it is.
            let e = pre
                .tokenize_pair(&row, &expected_pair(), &TokenizeOptions::default(), &mut stats)
                .expect_err("a system turn with Gemma 2's template");
            let msg = e.to_string();
            assert!(
                msg.contains("x.jsonl") && msg.contains("System role not supported"),
                "{msg}"
            );
            assert!(msg.contains("--fold_system"), "{msg}");
            // With --fold_system the system message opens the first user turn: the ids are
            // what transformers renders for the folded conversation.
            let fold = TokenizeOptions {
                fold_system: true,
                ..Default::default()
            };
            let t = pre
                .tokenize_pair(&row, &expected_pair(), &fold, &mut stats)
                .unwrap()
                .unwrap();
            let prompt = ids(model, "multi_folded", true);
            let full = ids(model, "multi_chosen_folded", false);
            assert_eq!(t.prompt, prompt, "{model} folded");
            assert_eq!(t.chosen, full[prompt.len()..], "{model} folded");
            continue;
        }
        let t = pre
            .tokenize_pair(&row, &expected_pair(), &TokenizeOptions::default(), &mut stats)
            .unwrap()
            .unwrap();
        let prompt = ids(model, "multi", true);
        let full = ids(model, "multi_chosen", false);
        assert_eq!(t.prompt, prompt, "{model}");
        assert_eq!(t.chosen, full[prompt.len()..], "{model}");
        assert_eq!(t.rejected_prompt, None);
        assert_eq!(stats.boundary_fallbacks, 0, "{model}");
        assert_eq!((stats.pairs_in, stats.kept), (1, 1));
        // The response ends with the template's end-of-turn token.
        let eos = pre.eos_token_id().unwrap();
        assert!(t.chosen.contains(&eos) && t.rejected.contains(&eos), "{model}");
    }
}

#[test]
fn models_without_a_template_get_a_fitting_fallback() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&model_dir("qwen3"), dir.path());
    let cfg_path = dir.path().join("tokenizer_config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let pre = Preprocessor::from_model_dir(dir.path(), None).unwrap();
    // The shared vocabulary has <|im_start|>: chatml.
    assert!(
        pre.template().origin().contains("chatml"),
        "{}",
        pre.template().origin()
    );
    assert_eq!(
        pre.render(&[Message::user("hi")], true).unwrap(),
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );

    // A list of named templates: "default" is used.
    cfg["chat_template"] = serde_json::json!([
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "{% for m in messages %}<{{ m.content }}>{% endfor %}"}
    ]);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let pre = Preprocessor::from_model_dir(dir.path(), None).unwrap();
    assert_eq!(pre.render(&[Message::user("hi")], true).unwrap(), "<hi>");

    let e = Preprocessor::from_model_dir(dir.path(), Some("vicuna"))
        .unwrap_err()
        .to_string();
    assert_contains(&e, &["vicuna", "chatml", "raw"]);
}

#[test]
fn a_template_that_raises_is_an_error_with_its_message() {
    let pre = preprocessor("mistral", None);
    let e = pre
        .render(&[Message::user("a"), Message::user("b")], false)
        .unwrap_err()
        .to_string();
    assert_contains(
        &e,
        &[
            "tokenizer_config.json",
            "Conversation roles must alternate user/assistant/user/assistant/...",
        ],
    );
    // Through tokenize_pair the row is named too.
    let pair = PreferencePair {
        prompt: vec![Message::user("a"), Message::user("b")],
        chosen: vec![Message::assistant("x")],
        rejected: vec![Message::assistant("y")],
        rejected_prompt: None,
    };
    let row = RowRef {
        file: "pairs.jsonl".into(),
        line: 7,
    };
    let e = pre
        .tokenize_pair(&row, &pair, &TokenizeOptions::default(), &mut PrepareStats::default())
        .unwrap_err()
        .to_string();
    assert_contains(&e, &["pairs.jsonl:7", "Conversation roles must alternate"]);
}

#[test]
fn a_template_that_loops_too_long_is_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let endless = temp_file(
        &dir,
        "endless.jinja",
        b"{% for i in range(100000) %}{% for j in range(100000) %}{% if i == j and i < 0 %}x{% endif %}{% endfor %}{% endfor %}",
    );
    let pre = preprocessor("qwen3", Some(&endless));
    let t0 = std::time::Instant::now();
    let e = pre.render(&[Message::user("hi")], true).unwrap_err().to_string();
    assert_contains(&e, &["endless.jinja", "out of fuel"]);
    assert!(t0.elapsed().as_secs_f32() < 5.0);

    let deep = temp_file(
        &dir,
        "deep.jinja",
        b"{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    );
    let e = preprocessor("qwen3", Some(&deep))
        .render(&[Message::user("hi")], true)
        .unwrap_err()
        .to_string();
    assert_contains(&e, &["deep.jinja"]);

    let syntax = temp_file(&dir, "syntax.jinja", b"{% for m in messages %}");
    let e = Preprocessor::from_model_dir(&model_dir("qwen3"), Some(&syntax))
        .unwrap_err()
        .to_string();
    assert_contains(&e, &["syntax.jinja", "cannot parse"]);
}

// ---------------------------------------------------------------------------------------------
// Boundary, truncation, drops
// ---------------------------------------------------------------------------------------------

fn simple_pair(prompt: &str, chosen: &str, rejected: &str) -> PreferencePair {
    PreferencePair {
        prompt: vec![Message::user(prompt)],
        chosen: vec![Message::assistant(chosen)],
        rejected: vec![Message::assistant(rejected)],
        rejected_prompt: None,
    }
}

fn row(line: usize) -> RowRef {
    RowRef {
        file: "t.jsonl".into(),
        line,
    }
}

#[test]
fn boundary_mismatches_fall_back_to_the_response_alone_plus_eos() {
    // raw: "Hello wor" + "ld" tokenises as "Hello world", whose last token spans the boundary.
    let pre = preprocessor("qwen3", Some("raw"));
    let eos = pre.eos_token_id().unwrap();
    let mut stats = PrepareStats::default();
    let t = pre
        .tokenize_pair(
            &row(1),
            &simple_pair("Hello wor", "ld", "ld!"),
            &TokenizeOptions::default(),
            &mut stats,
        )
        .unwrap()
        .unwrap();
    assert_eq!(t.prompt, pre.encode("Hello wor").unwrap());
    let mut expected = pre.encode("ld").unwrap();
    expected.push(eos);
    assert_eq!(t.chosen, expected);
    assert_eq!(stats.boundary_fallbacks, 1);

    // A template that rewrites earlier text depending on the whole conversation.
    let dir = tempfile::tempdir().unwrap();
    let rewriting = temp_file(
        &dir,
        "count.jinja",
        b"{{ messages | length }}{% for m in messages %} {{ m.content }}{% endfor %}",
    );
    let pre = preprocessor("qwen3", Some(&rewriting));
    let mut stats = PrepareStats::default();
    pre.tokenize_pair(
        &row(1),
        &simple_pair("the cat", "is happy", "is sad"),
        &TokenizeOptions::default(),
        &mut stats,
    )
    .unwrap()
    .unwrap();
    assert_eq!(stats.boundary_fallbacks, 1);

    // No mismatch: no fallback.
    let pre = preprocessor("qwen3", Some("raw"));
    let mut stats = PrepareStats::default();
    let t = pre
        .tokenize_pair(
            &row(1),
            &simple_pair("Hello", " world", " cat"),
            &TokenizeOptions::default(),
            &mut stats,
        )
        .unwrap()
        .unwrap();
    assert_eq!(t.chosen, pre.encode(" world").unwrap());
    assert_eq!(stats.boundary_fallbacks, 0);
}

#[test]
fn truncation_keeps_the_chosen_end_of_the_prompt_and_the_start_of_responses() {
    let pre = preprocessor("qwen3", Some("raw"));
    let pair = simple_pair(
        "the cat and the dog run to the river",
        " and the bird is happy and the fish is sad",
        " no",
    );
    let full = pre
        .tokenize_pair(
            &row(1),
            &pair,
            &TokenizeOptions::default(),
            &mut PrepareStats::default(),
        )
        .unwrap()
        .unwrap();
    assert!(full.prompt.len() > 6 && full.chosen.len() > 6, "{full:?}");

    for (mode, expect) in [
        (TruncationMode::KeepEnd, full.prompt[full.prompt.len() - 4..].to_vec()),
        (TruncationMode::KeepStart, full.prompt[..4].to_vec()),
    ] {
        let opts = TokenizeOptions {
            max_length: Some(7),
            max_prompt_length: Some(4),
            truncation_mode: mode,
            ..Default::default()
        };
        let mut stats = PrepareStats::default();
        let t = pre.tokenize_pair(&row(1), &pair, &opts, &mut stats).unwrap().unwrap();
        assert_eq!(t.prompt, expect, "{mode:?}");
        // Responses keep their start, cut to max_length - prompt length.
        assert_eq!(t.chosen, full.chosen[..3], "{mode:?}");
        assert_eq!(t.rejected, full.rejected, "short responses are not cut");
        assert_eq!(stats.truncated, 1);
    }

    // Within limits: nothing is cut, nothing counted.
    let opts = TokenizeOptions {
        max_length: Some(1000),
        max_prompt_length: Some(1000),
        truncation_mode: TruncationMode::KeepEnd,
        ..Default::default()
    };
    let mut stats = PrepareStats::default();
    assert_eq!(
        pre.tokenize_pair(&row(1), &pair, &opts, &mut stats).unwrap().unwrap(),
        full
    );
    assert_eq!(stats.truncated, 0);
}

#[test]
fn identical_and_empty_pairs_are_dropped_and_counted() {
    let pre = preprocessor("qwen3", None);
    let long_prompt = "the cat and the dog run to the river and the bird is happy";
    let pairs: Vec<(RowRef, PreferencePair)> = vec![
        (row(1), simple_pair("q", "same answer", "same answer")),
        (row(2), simple_pair("q", "", "an answer")),
        (row(3), simple_pair("q", "an answer", "   ")),
        (row(4), simple_pair("q", "yes", "no")),
        (row(5), simple_pair(long_prompt, "yes", "no")),
        (row(6), simple_pair("q", "the cat is happy", "the cat is sad")),
    ];
    // Row 5's prompt fills max_length: nothing left to score. Row 6's responses share their first
    // tokens ("the cat is "): cut to those, they become identical.
    let q = pre
        .encode(&pre.render(&[Message::user("q")], true).unwrap())
        .unwrap()
        .len();
    let max_length = q + 5;
    let opts = TokenizeOptions {
        max_length: Some(max_length),
        max_prompt_length: None,
        truncation_mode: TruncationMode::KeepEnd,
        ..Default::default()
    };
    let r6 = pre
        .tokenize_pair(
            &row(6),
            &pairs[5].1,
            &TokenizeOptions::default(),
            &mut PrepareStats::default(),
        )
        .unwrap()
        .unwrap();
    assert_eq!(r6.chosen[..5], r6.rejected[..5]);
    let long = pre.encode(&pre.render(&pairs[4].1.prompt, true).unwrap()).unwrap();
    assert!(long.len() >= max_length, "{}", long.len());

    let (out, stats) = pre.prepare(&pairs, &opts).unwrap();
    assert_eq!(out.iter().map(|t| t.row.line).collect::<Vec<_>>(), [4]);
    assert_eq!(
        stats,
        PrepareStats {
            pairs_in: 6,
            kept: 1,
            dropped_identical: 2,
            dropped_empty: 3,
            truncated: 0,
            boundary_fallbacks: 0,
        }
    );
}

#[test]
fn a_rejected_side_with_its_own_prompt_is_tokenised_with_it() {
    let pre = preprocessor("qwen3", None);
    let (pairs, _) = load(&fixture("xtuner.jsonl"));
    let (out, stats) = pre.prepare(&pairs, &TokenizeOptions::default()).unwrap();
    assert_eq!(stats.kept, 2);
    assert_eq!(out[0].rejected_prompt, None);
    let rp = out[1].rejected_prompt.as_ref().unwrap();
    assert_eq!(
        *rp,
        pre.encode(&pre.render(&[Message::user(USER2)], true).unwrap()).unwrap()
    );
    assert_eq!(out[1].rejected_prompt(), rp.as_slice());
    assert_eq!(out[1].rejected, out[0].rejected);
}

#[test]
fn quickstart_data_loads_and_prepares_in_parallel_like_one_by_one() {
    let (train, stats) = load(&fixture("quickstart/train.jsonl"));
    let (eval, _) = load(&fixture("quickstart/eval.jsonl"));
    assert_eq!((train.len(), eval.len()), (400, 64));
    assert_eq!(stats.formats[0].1, "trl-explicit-prompt");
    for (_, p) in train.iter().chain(&eval) {
        let c = &p.chosen[0].content;
        assert!(
            (c.starts_with("Yes,") || c.starts_with("Sure,")) && c.ends_with('.'),
            "{c}"
        );
        assert!(p.rejected[0].content.starts_with("no") && p.rejected[0].content.ends_with('!'));
    }
    // qwen2's template adds a long default system prompt: prompts are 41-81 tokens.
    let pre = preprocessor("qwen2", None);
    let opts = TokenizeOptions {
        max_length: Some(128),
        ..Default::default()
    };
    let (par, pstats) = pre.prepare(&train, &opts).unwrap();
    let mut seq_stats = PrepareStats::default();
    let seq: Vec<_> = train
        .iter()
        .filter_map(|(r, p)| pre.tokenize_pair(r, p, &opts, &mut seq_stats).unwrap())
        .collect();
    assert_eq!(par, seq);
    assert_eq!(pstats, seq_stats);
    assert_eq!(pstats.kept, 400);
    assert_eq!((pstats.boundary_fallbacks, pstats.truncated), (0, 0));
    assert!(par
        .iter()
        .all(|t| (8..=24).contains(&t.chosen.len()) && (8..=24).contains(&t.rejected.len())));
}

#[test]
fn system_and_history_beside_an_explicit_prompt_are_used_and_other_keys_reported() {
    let dir = tempfile::tempdir().unwrap();
    let row = serde_json::json!({
        "system": SYSTEM,
        "history": [[USER1, ASSISTANT1]],
        "prompt": USER2,
        "chosen": "Dark.",
        "rejected": "Green.",
        "score": 3,
    });
    let path = temp_file(&dir, "extra.jsonl", format!("{row}\n").as_bytes());
    let (pairs, stats) = load(&path);
    let roles: Vec<(&str, &str)> = pairs[0]
        .1
        .prompt
        .iter()
        .map(|m| (m.role.as_str(), m.content.as_str()))
        .collect();
    assert_eq!(
        roles,
        [
            ("system", SYSTEM),
            ("user", USER1),
            ("assistant", ASSISTANT1),
            ("user", USER2)
        ]
    );
    assert_eq!(stats.unused_keys, [(path, vec!["score".to_string()])]);
}
