//! Generation against transformers' `generate` and logits processors
//! (tests/golden/infer.py -> tests/golden/infer.json), the KV cache against recomputation,
//! unmerged adapters against a merged folder, sampling, streaming, and the `infer` command.

use std::path::Path;

use candle_core::{Device, Tensor};
use lorafold::data::tokenize::Preprocessor;
use lorafold::data::Message;
use lorafold::infer::sampling::{apply_repetition_penalty, apply_temperature, apply_top_k, apply_top_p};
use lorafold::infer::{generate, FinishReason, GenerateOptions, Sampler, SamplingParams, Session, TextStream};
use lorafold::lora::io::{load_adapter, save_safetensors};
use lorafold::model::linear::Fwd;
use lorafold::model::{KvCache, LoadOptions, Model};
use serde_json::Value;

use crate::common::*;

fn infer_golden() -> Value {
    let p = root().join("tests/golden/infer.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Greedy, every stop token disabled (as the golden's `eos_token_id=None`).
fn greedy_opts(n: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: n,
        stop_tokens: vec![],
        sampling: SamplingParams::greedy(),
        use_cache: true,
    }
}

fn run(model: &Model, ctx: Fwd, prompt: &[u32], opts: &GenerateOptions) -> Vec<u32> {
    generate(model, &ctx, prompt, opts, |_| Ok(())).unwrap().tokens
}

fn with_adapter(arch: &str) -> (Model, Fwd) {
    let mut m = load_model(arch);
    let ad = load_adapter(&mut m, &adapter_dir(&format!("{arch}_peft")), false).unwrap();
    (m, Fwd::eval(ad.slot))
}

#[test]
fn greedy_matches_transformers_generate() {
    let g = infer_golden();
    let n = g["new_tokens"].as_u64().unwrap() as usize;
    let penalty = g["repetition_penalty"].as_f64().unwrap();
    for arch in ARCHS {
        let a = &g["archs"][arch];
        let prompt = ids(&a["prompt_ids"]);
        let (model, adapter) = with_adapter(arch);

        let base = run(&model, Fwd::base(), &prompt, &greedy_opts(n));
        assert_eq!(base, ids(&a["greedy_base"]), "{arch}: base");
        let peft = run(&model, adapter, &prompt, &greedy_opts(n));
        assert_eq!(peft, ids(&a["greedy_peft"]), "{arch}: with the PEFT adapter");

        let mut rep = greedy_opts(n);
        rep.sampling.repetition_penalty = penalty;
        assert_eq!(
            run(&model, Fwd::base(), &prompt, &rep),
            ids(&a["greedy_base_rep"]),
            "{arch}: repetition penalty"
        );

        // Stopping: the stop token ends generation and is part of the output, as in transformers.
        let stop = &a["stop_base"];
        let mut o = greedy_opts(n);
        o.stop_tokens = vec![stop["stop_token"].as_u64().unwrap() as u32];
        let gen = generate(&model, &Fwd::base(), &prompt, &o, |_| Ok(())).unwrap();
        assert_eq!(gen.tokens, ids(&stop["tokens"]), "{arch}: stop");
        assert_eq!(gen.finish, FinishReason::Stop);

        // From a 5-token prompt (phi3: the decode crosses longrope's original context of 12
        // positions, where the long factors take over for the later tokens).
        let short = ids(&a["short_prompt_ids"]);
        assert_eq!(
            run(&model, Fwd::base(), &short, &greedy_opts(n)),
            ids(&a["greedy_base_short"]),
            "{arch}: short prompt"
        );
        println!(
            "{arch}: {n} greedy tokens match transformers (base, adapter, repetition penalty, stop, short prompt)"
        );
    }
}

#[test]
fn chat_template_gives_the_golden_prompt_ids() {
    let g = infer_golden();
    for arch in ARCHS {
        let a = &g["archs"][arch];
        let msgs: Vec<Message> = serde_json::from_value(a["messages"].clone()).unwrap();
        let pre = Preprocessor::from_model_dir(&model_dir(arch), None).unwrap();
        let text = pre.render(&msgs, true).unwrap();
        assert_eq!(text, a["prompt_text"].as_str().unwrap(), "{arch}");
        assert_eq!(pre.encode(&text).unwrap(), ids(&a["prompt_ids"]), "{arch}");
    }
}

#[test]
fn kv_cache_decoding_equals_recomputation() {
    let g = infer_golden();
    for arch in ARCHS {
        let prompt = ids(&g["archs"][arch]["prompt_ids"]);
        let (model, adapter) = with_adapter(arch);
        for ctx in [Fwd::base(), adapter] {
            let cached = run(&model, ctx, &prompt, &greedy_opts(32));
            let mut o = greedy_opts(32);
            o.use_cache = false;
            assert_eq!(cached, run(&model, ctx, &prompt, &o), "{arch} {ctx:?}");
        }
        // Logits too, with chunks of several tokens fed after a cached prefix (mistral's window
        // is 6, shorter than every chunk boundary here).
        let seq: Vec<u32> = prompt
            .iter()
            .copied()
            .chain(ids(&g["archs"][arch]["greedy_base"]))
            .collect();
        let mut cache = KvCache::new(model.cfg.num_layers);
        let mut fed = 0;
        for chunk in [5usize, 1, 9, 1, 1, 17] {
            let part = &seq[fed..fed + chunk];
            let t = Tensor::from_slice(part, (1, chunk), &Device::Cpu).unwrap();
            let got = model.forward_cached(&t, &mut cache, &adapter).unwrap();
            fed += chunk;
            assert_eq!(cache.len(), fed);
            let full = Tensor::from_slice(&seq[..fed], (1, fed), &Device::Cpu).unwrap();
            let want = model
                .forward(&full, None, &adapter)
                .unwrap()
                .get(0)
                .unwrap()
                .get(fed - 1)
                .unwrap();
            let err = max_abs_diff(&got.squeeze(0).unwrap(), &want);
            assert!(err < 1e-4, "{arch}: cached logits after {fed} tokens differ by {err}");
        }
        // Cutting the cache back and feeding again gives the same logits.
        cache.truncate(10).unwrap();
        let t = Tensor::from_slice(&seq[10..fed], (1, fed - 10), &Device::Cpu).unwrap();
        let again = model.forward_cached(&t, &mut cache, &adapter).unwrap();
        let full = Tensor::from_slice(&seq[..fed], (1, fed), &Device::Cpu).unwrap();
        let want = model
            .forward(&full, None, &adapter)
            .unwrap()
            .get(0)
            .unwrap()
            .get(fed - 1)
            .unwrap();
        assert!(
            max_abs_diff(&again.squeeze(0).unwrap(), &want) < 1e-4,
            "{arch}: after truncate"
        );
    }
}

#[test]
fn session_reuses_the_cached_prefix() {
    let g = infer_golden();
    let a = &g["archs"]["qwen3"];
    let prompt = ids(&a["prompt_ids"]);
    let model = load_model("qwen3");
    let mut s = Session::new(&model, Fwd::base());
    let first = s.generate(&prompt, &greedy_opts(8), |_| Ok(())).unwrap();
    assert_eq!(first.prompt_tokens_fed, prompt.len());
    // The next turn starts with the previous prompt and answer: only the rest is fed.
    let mut next = prompt.clone();
    next.extend(&first.tokens);
    next.extend([1, 40, 50, 2]);
    let second = s.generate(&next, &greedy_opts(8), |_| Ok(())).unwrap();
    assert_eq!(second.prompt_tokens_fed, 4 + 1);
    let fresh = generate(&model, &Fwd::base(), &next, &greedy_opts(8), |_| Ok(())).unwrap();
    assert_eq!(second.tokens, fresh.tokens);
    // A different prompt shares nothing but still works.
    let third = s.generate(&[5, 6, 7], &greedy_opts(4), |_| Ok(())).unwrap();
    let fresh = generate(&model, &Fwd::base(), &[5, 6, 7], &greedy_opts(4), |_| Ok(())).unwrap();
    assert_eq!(third.tokens, fresh.tokens);
}

/// W + scale·B·A for every adapted layer, written as a model folder.
fn write_merged(arch: &str, model: &Model, slot: usize, to: &Path) {
    copy_dir(&model_dir(arch), to);
    for e in std::fs::read_dir(to).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("model") && (name.ends_with(".safetensors") || name.ends_with(".index.json")) {
            std::fs::remove_file(&p).unwrap();
        }
    }
    let mut tensors = model.base_tensors();
    for lin in model.linears() {
        let Some(ad) = lin.adapter(slot) else {
            continue;
        };
        let key = format!("{}.weight", lin.path);
        let t = tensors.iter_mut().find(|(k, _)| *k == key).unwrap();
        t.1 = (&t.1 + ad.delta_weight().unwrap()).unwrap();
    }
    save_safetensors(&to.join("model.safetensors"), &tensors).unwrap();
}

#[test]
fn merged_folder_generates_like_the_unmerged_adapter() {
    let g = infer_golden();
    for arch in ARCHS {
        let prompt = ids(&g["archs"][arch]["prompt_ids"]);
        let (model, adapter) = with_adapter(arch);
        let dir = tempfile::tempdir().unwrap();
        write_merged(arch, &model, adapter.adapter.unwrap(), dir.path());
        let merged = Model::load_dir(dir.path(), &LoadOptions::default()).unwrap();
        let unmerged = run(&model, adapter, &prompt, &greedy_opts(32));
        assert_eq!(run(&merged, Fwd::base(), &prompt, &greedy_opts(32)), unmerged, "{arch}");
        assert_eq!(unmerged, ids(&g["archs"][arch]["greedy_peft"]), "{arch}");
        // And through the command, on the merged folder (with the golden's system turn, which
        // Gemma 2's template has no room for).
        let mut args = vec![
            "infer",
            "--model",
            dir.path().to_str().unwrap(),
            "--prompt",
            "Hello world, is the cat happy?",
            "--max_new_tokens",
            "32",
            "--ignore_eos",
        ];
        let messages = &g["archs"][arch]["messages"];
        if messages[0]["role"] == "system" {
            args.extend(["--system", messages[0]["content"].as_str().unwrap()]);
        }
        let out = lorafold(&args, &[]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = decode_text(arch, &unmerged);
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            format!("{text}\n"),
            "{arch}: merged via the CLI"
        );
    }
}

fn sampling(temperature: f64, top_k: usize, top_p: f64, seed: u64) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: 24,
        stop_tokens: vec![],
        sampling: SamplingParams {
            temperature,
            top_k,
            top_p,
            repetition_penalty: 1.0,
            seed,
        },
        use_cache: true,
    }
}

#[test]
fn seeded_sampling_repeats_and_top_k_1_is_greedy() {
    let g = infer_golden();
    let prompt = ids(&g["archs"]["llama"]["prompt_ids"]);
    let model = load_model("llama");
    let a = run(&model, Fwd::base(), &prompt, &sampling(1.0, 0, 1.0, 7));
    let b = run(&model, Fwd::base(), &prompt, &sampling(1.0, 0, 1.0, 7));
    let c = run(&model, Fwd::base(), &prompt, &sampling(1.0, 0, 1.0, 8));
    assert_eq!(a, b, "same seed, same tokens");
    assert_ne!(a, c, "another seed, other tokens");
    let greedy = run(&model, Fwd::base(), &prompt, &greedy_opts(24));
    assert_ne!(a, greedy, "sampling at temperature 1 should leave the greedy path");
    for seed in [1, 2, 3] {
        assert_eq!(
            run(&model, Fwd::base(), &prompt, &sampling(1.5, 1, 1.0, seed)),
            greedy,
            "top-k 1"
        );
        assert_eq!(
            run(&model, Fwd::base(), &prompt, &sampling(1.5, 0, 1e-6, seed)),
            greedy,
            "tiny top-p"
        );
    }
    // Sampled tokens come from the kept set: with top-k 3 every token is among the 3 best.
    let mut s = Sampler::new(sampling(2.0, 3, 1.0, 5).sampling);
    let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 50) as f32 / 10.0).collect();
    let mut best: Vec<usize> = (0..50).collect();
    best.sort_by(|&x, &y| logits[y].total_cmp(&logits[x]));
    let mut hits = std::collections::HashSet::new();
    for _ in 0..200 {
        let t = s.next_token(logits.clone(), &[]).unwrap() as usize;
        assert!(best[..3].contains(&t));
        hits.insert(t);
    }
    assert_eq!(hits.len(), 3, "all three kept tokens get sampled");
}

fn opt_f32(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().map_or(f32::NEG_INFINITY, |f| f as f32))
        .collect()
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let ok = (g.is_infinite() && w.is_infinite() && g.signum() == w.signum())
            || (g - w).abs() <= 1e-6 * w.abs().max(1.0);
        assert!(ok, "{what}: index {i}: got {g}, transformers {w}");
    }
}

#[test]
fn logits_processors_match_transformers() {
    let g = infer_golden();
    let p = &g["processors"];
    let logits = opt_f32(&p["logits"]);
    let ctx = ids(&p["context"]);
    let rep = p["repetition_penalty"].as_f64().unwrap();
    let temp = p["temperature"].as_f64().unwrap();
    let k = p["top_k"].as_u64().unwrap() as usize;
    let top_p = p["top_p"].as_f64().unwrap();

    let mut l = logits.clone();
    apply_repetition_penalty(&mut l, &ctx, rep as f32);
    assert_close(&l, &opt_f32(&p["after_repetition_penalty"]), "repetition penalty");
    let mut l = logits.clone();
    apply_temperature(&mut l, temp as f32);
    assert_close(&l, &opt_f32(&p["after_temperature"]), "temperature");
    let mut l = logits.clone();
    apply_top_k(&mut l, k);
    assert_close(&l, &opt_f32(&p["after_top_k"]), "top-k");
    let mut l = logits.clone();
    apply_top_p(&mut l, top_p);
    assert_close(&l, &opt_f32(&p["after_top_p"]), "top-p");

    let s = Sampler::new(SamplingParams {
        temperature: temp,
        top_k: k,
        top_p,
        repetition_penalty: rep,
        seed: 0,
    });
    let mut l = logits.clone();
    s.process(&mut l, &ctx);
    assert_close(&l, &opt_f32(&p["after_all"]), "all, in generate's order");

    // Hand-computed: penalty 2 on tokens 0 (positive) and 1 (negative), once each.
    let mut l = vec![2.0, -1.0, 0.5];
    apply_repetition_penalty(&mut l, &[1, 0, 0, 1], 2.0);
    assert_eq!(l, vec![1.0, -2.0, 0.5]);
    // Greedy keeps the repetition penalty but no warper.
    let greedy = Sampler::new(SamplingParams {
        repetition_penalty: 2.0,
        top_k: 1,
        ..SamplingParams::greedy()
    });
    let mut l = vec![2.0, 1.5, -3.0];
    greedy.process(&mut l, &[0]);
    assert_eq!(l, vec![1.0, 1.5, -3.0]);
}

#[test]
fn streaming_prints_multibyte_characters_whole() {
    let pre = Preprocessor::from_model_dir(&model_dir("qwen2"), None).unwrap();
    let text = "héllo wörld ✓ 猫 🐈 done";
    let toks = pre.encode(text).unwrap();
    assert!(toks.len() > text.chars().count() / 2);
    let mut stream = TextStream::new(pre.tokenizer());
    let mut pieces = Vec::new();
    for t in &toks {
        if let Some(p) = stream.push(*t).unwrap() {
            assert!(!p.contains('\u{FFFD}'), "piece {p:?} has a broken character");
            pieces.push(p);
        }
    }
    pieces.extend(stream.finish().unwrap());
    assert_eq!(pieces.concat(), text);
    assert!(pieces.len() > 5, "text arrives in pieces: {pieces:?}");
}

fn decode_text(arch: &str, toks: &[u32]) -> String {
    let pre = Preprocessor::from_model_dir(&model_dir(arch), None).unwrap();
    pre.tokenizer().decode(toks, true).unwrap()
}

fn stdout_of(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

const SYSTEM: &str = "You are a small model.";
const QUESTION: &str = "Hello world, is the cat happy?";

#[test]
fn cli_prompt_streams_the_greedy_answer() {
    let g = infer_golden();
    for arch in ["llama", "mistral"] {
        let model = model_dir(arch);
        // The model's own stop tokens (never produced by these tiny models within 32 tokens).
        let out = lorafold(
            &[
                "infer",
                "--model",
                model.to_str().unwrap(),
                "--system",
                SYSTEM,
                "--prompt",
                QUESTION,
                "--max_new_tokens",
                "32",
                "--temperature",
                "0",
            ],
            &[],
        );
        let want = decode_text(arch, &ids(&g["archs"][arch]["chat_base"]));
        assert_eq!(stdout_of(&out), format!("{want}\n"), "{arch}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("32 new tokens"), "{err}");
    }
}

#[test]
fn cli_prompts_file_writes_one_json_line_per_prompt() {
    let g = infer_golden();
    let a = &g["archs"]["qwen2"];
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("prompts.jsonl");
    let msgs = serde_json::json!({"messages": a["messages"]});
    let lines = [
        msgs.to_string(),
        String::new(),
        serde_json::json!({"prompt": QUESTION, "system": SYSTEM}).to_string(),
        "plain text prompt".to_string(),
        "\"a JSON string\"".to_string(),
    ];
    std::fs::write(&file, lines.join("\n")).unwrap();
    let model = model_dir("qwen2");
    let out_file = dir.path().join("answers.jsonl");
    let out = lorafold(
        &[
            "infer",
            "--model",
            model.to_str().unwrap(),
            "--prompts",
            file.to_str().unwrap(),
            "--max_new_tokens",
            "32",
            "--output",
            out_file.to_str().unwrap(),
        ],
        &[],
    );
    stdout_of(&out);
    let rows: Vec<Value> = std::fs::read_to_string(&out_file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 4);
    let want = ids(&a["chat_base"]);
    for row in &rows[..2] {
        assert_eq!(ids(&row["token_ids"]), want);
        assert_eq!(row["text"].as_str().unwrap(), decode_text("qwen2", &want));
        assert_eq!(row["finish_reason"], "length");
        assert_eq!(
            row["prompt_tokens"].as_u64().unwrap() as usize,
            ids(&a["prompt_ids"]).len()
        );
    }
    assert_eq!(rows[0]["line"], 1);
    assert_eq!(rows[1]["line"], 3);
    assert_eq!(rows[2]["prompt"], "plain text prompt");
    assert_eq!(rows[3]["prompt"], "a JSON string");
    assert!(rows.iter().all(|r| r["token_ids"].as_array().unwrap().len() == 32));

    // --compare to stdout: base and adapter answers in one line.
    let adapter = adapter_dir("qwen2_peft");
    let out = lorafold(
        &[
            "infer",
            "--model",
            model.to_str().unwrap(),
            "--adapters",
            adapter.to_str().unwrap(),
            "--compare",
            "--prompts",
            file.to_str().unwrap(),
            "--max_new_tokens",
            "32",
        ],
        &[],
    );
    let first: Value = serde_json::from_str(stdout_of(&out).lines().next().unwrap()).unwrap();
    assert_eq!(ids(&first["base"]["token_ids"]), want);
    assert_eq!(ids(&first["adapter"]["token_ids"]), ids(&a["greedy_peft"]));
}

#[test]
fn cli_chat_reads_turns_from_a_pipe() {
    use std::io::Write;
    let g = infer_golden();
    let arch = "qwen3";
    let model = model_dir(arch);
    let run_chat = |input: &str| {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lorafold"))
            .args([
                "infer",
                "--model",
                model.to_str().unwrap(),
                "--system",
                SYSTEM,
                "--max_new_tokens",
                "32",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        (stdout_of(&out), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let first = decode_text(arch, &ids(&g["archs"][arch]["chat_base"]));
    let (out, err) = run_chat(&format!("{QUESTION}\nThanks.\n/reset\n{QUESTION}\n/exit\nnever read\n"));
    let answers: Vec<&str> = out.split_terminator('\n').collect();
    assert!(out.starts_with(&format!("{first}\n")), "first turn: {out:?}");
    assert!(
        out.ends_with(&format!("{first}\n")),
        "after /reset the first answer again: {out:?}"
    );
    // The second turn saw the whole conversation: it fed only what the turn added.
    let fed: Vec<usize> = err
        .lines()
        .filter_map(|l| l.strip_prefix('['))
        .filter_map(|l| l.split(' ').next()?.parse().ok())
        .collect();
    assert_eq!(fed.len(), 3, "three answers: {err}");
    assert!(fed[1] > fed[0], "the second prompt holds the first turn: {fed:?}");
    assert!(answers.len() >= 3);
    // EOF ends the chat too.
    let (out, _) = run_chat(&format!("{QUESTION}\n"));
    assert_eq!(out, format!("{first}\n"));
}

#[test]
fn cli_errors_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-model");
    let out = lorafold(&["infer", "--model", missing.to_str().unwrap(), "--prompt", "hi"], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-model"), "{err}");

    let model = model_dir("qwen2");
    let file = dir.path().join("bad.jsonl");
    std::fs::write(&file, "{\"prompt\": \"fine\"}\n{\"prompt\": \n").unwrap();
    let out = lorafold(
        &[
            "infer",
            "--model",
            model.to_str().unwrap(),
            "--prompts",
            file.to_str().unwrap(),
        ],
        &[],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.jsonl:2: invalid JSON"), "{err}");

    std::fs::write(&file, "{\"text\": \"x\"}\n").unwrap();
    let out = lorafold(
        &[
            "infer",
            "--model",
            model.to_str().unwrap(),
            "--prompts",
            file.to_str().unwrap(),
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("bad.jsonl:1: expected"), "{err}");

    let out = lorafold(
        &[
            "infer",
            "--model",
            model.to_str().unwrap(),
            "--compare",
            "--prompt",
            "hi",
        ],
        &[],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--adapters"));

    let out = lorafold(
        &[
            "infer",
            "--model",
            model.to_str().unwrap(),
            "--adapters",
            missing.to_str().unwrap(),
            "--prompt",
            "hi",
        ],
        &[],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-model"));

    let out = lorafold(
        &[
            "infer",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "hi",
            "--temperature",
            "0.5",
            "--top_p",
            "0",
        ],
        &[],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("top_p"));
}

/// Gemma 2's template has no system role: `--system` alone is refused with the template's
/// message, and with `--fold_system` the answer is the one to the prompt whose first user
/// message starts with the system message.
#[test]
fn fold_system_lets_gemma2_take_a_system_message() {
    let model_path = model_dir("gemma2");
    let args = |fold: bool| {
        let mut a = vec![
            "infer",
            "--model",
            model_path.to_str().unwrap(),
            "--prompt",
            "Hello world, is the cat happy?",
            "--system",
            "You are a small model.",
            "--max_new_tokens",
            "8",
            "--ignore_eos",
        ];
        if fold {
            a.push("--fold_system");
        }
        lorafold(&a, &[])
    };
    let refused = args(false);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("System role not supported"));
    let folded = args(true);
    assert!(folded.status.success(), "{}", String::from_utf8_lossy(&folded.stderr));
    let pre = Preprocessor::from_model_dir(&model_path, None).unwrap();
    let msgs = [Message::new(
        "user",
        "You are a small model.\n\nHello world, is the cat happy?",
    )];
    let prompt = pre.encode(&pre.render(&msgs, true).unwrap()).unwrap();
    let model = load_model("gemma2");
    let want = decode_text("gemma2", &run(&model, Fwd::base(), &prompt, &greedy_opts(8)));
    assert_eq!(String::from_utf8(folded.stdout).unwrap(), format!("{want}\n"));
}
