//! `lorafold merge`: merged weights against PEFT's merge_and_unload, merged logits against the
//! unmerged adapter, dtype and tying preserved, sharding, adapter combinations against PEFT's
//! add_weighted_adapter, DARE statistics, and named errors.
//!
//! Goldens come from `tests/golden/merge.py` (see its docstring).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use lorafold::lora::io::load_adapter;
use lorafold::model::linear::Fwd;
use lorafold::model::{LoadOptions, Model};

use crate::common::*;

const MERGE_TOL: f32 = 1e-6;
const LOGIT_TOL: f32 = 1e-4;

fn merge(args: &[&str]) -> std::process::Output {
    let mut full = vec!["merge"];
    full.extend_from_slice(args);
    lorafold(&full, &[])
}

fn merge_ok(args: &[&str]) {
    let out = merge(args);
    assert!(
        out.status.success(),
        "lorafold merge {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn merge_err(args: &[&str]) -> String {
    let out = merge(args);
    assert!(!out.status.success(), "lorafold merge {args:?} should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn merge_adapter_dir(name: &str) -> PathBuf {
    root().join("tests/fixtures/merge_adapters").join(name)
}

/// Every tensor of a model or adapter folder (all *.safetensors files).
fn tensors_in(dir: &Path) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            out.extend(candle_core::safetensors::load(&p, &Device::Cpu).unwrap());
        }
    }
    out
}

/// Raw bytes and dtype of every tensor of a folder.
fn raw_in(dir: &Path) -> HashMap<String, (safetensors::Dtype, Vec<u8>)> {
    let mut out = HashMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let bytes = std::fs::read(&p).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            for (name, view) in st.tensors() {
                out.insert(name, (view.dtype(), view.data().to_vec()));
            }
        }
    }
    out
}

fn adapted_weight_names(adapter: &Path) -> Vec<String> {
    let t = candle_core::safetensors::load(adapter.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let mut v: Vec<String> = t
        .keys()
        .filter(|k| k.contains(".lora_A"))
        .map(|k| {
            format!(
                "{}.weight",
                k.split(".lora_")
                    .next()
                    .unwrap()
                    .trim_start_matches("base_model.model.")
            )
        })
        .collect();
    v.sort();
    v
}

/// Merged tensors equal PEFT's merge_and_unload (golden, rsLoRA adapters); every other tensor is
/// bit-identical to the base; names (so tying) and dtypes are the base's.
#[test]
fn merged_weights_match_peft_merge_and_unload_rslora() {
    let golden =
        candle_core::safetensors::load(root().join("tests/golden/merge_peft_rslora.safetensors"), &Device::Cpu)
            .unwrap();
    for arch in ARCHS {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("m");
        let ad = adapter_dir(&format!("{arch}_peft_rslora"));
        merge_ok(&[
            "--model",
            s(&model_dir(arch)),
            "--adapters",
            s(&ad),
            "--output",
            s(&out),
        ]);
        let ours = raw_in(&out);
        let base = raw_in(&model_dir(arch));
        let mut ours_names: Vec<&String> = ours.keys().collect();
        let mut base_names: Vec<&String> = base.keys().collect();
        ours_names.sort();
        base_names.sort();
        assert_eq!(ours_names, base_names, "{arch}: tensor names differ from the base");
        let adapted = adapted_weight_names(&ad);
        let merged = tensors_in(&out);
        let mut worst = 0f32;
        for name in &adapted {
            let g = &golden[&format!("{arch}/{name}")];
            worst = worst.max(max_abs_diff(&merged[name], g));
        }
        println!(
            "{arch}: {} merged tensors, max abs diff vs PEFT {worst:.2e}",
            adapted.len()
        );
        assert!(worst <= MERGE_TOL, "{arch}: merged weights differ from PEFT by {worst}");
        for (name, (dt, bytes)) in &base {
            assert_eq!(ours[name].0, *dt, "{arch}: {name} changed dtype");
            if !adapted.contains(name) {
                assert!(
                    ours[name].1 == *bytes,
                    "{arch}: untouched tensor {name} is not bit-identical"
                );
            }
        }
        if arch == "qwen2" || arch == "qwen3" {
            assert!(
                !ours.contains_key("lm_head.weight"),
                "{arch}: tied lm_head was duplicated"
            );
        }
        for f in [
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ] {
            assert_eq!(
                std::fs::read(out.join(f)).unwrap(),
                std::fs::read(model_dir(arch).join(f)).unwrap(),
                "{arch}: {f} not copied as is"
            );
        }
    }
}

/// A merged model, loaded as a plain model, gives the logits of base + adapter unmerged.
#[test]
fn merged_logits_equal_unmerged_adapter() {
    for arch in ARCHS {
        for kind in ["peft", "peft_rslora"] {
            let tmp = tempfile::tempdir().unwrap();
            let out = tmp.path().join("m");
            let ad = adapter_dir(&format!("{arch}_{kind}"));
            merge_ok(&[
                "--model",
                s(&model_dir(arch)),
                "--adapters",
                s(&ad),
                "--output",
                s(&out),
            ]);
            let g = golden(arch);
            let (ids, mask) = golden_inputs(&g);
            let merged = Model::load_dir(&out, &LoadOptions::default()).unwrap();
            let lm = merged.forward(&ids, Some(&mask), &Fwd::base()).unwrap();
            let mut model = load_model(arch);
            let a = load_adapter(&mut model, &ad, false).unwrap();
            let lu = model.forward(&ids, Some(&mask), &Fwd::eval(a.slot)).unwrap();
            let err = max_abs_diff_kept(&lm, &lu, &mask);
            println!("{arch} {kind}: merged vs unmerged max abs logit diff {err:.2e}");
            assert!(err <= LOGIT_TOL, "{arch} {kind}: {err}");
            assert!(max_abs_diff_kept(&lm, &g[&format!("logits_{kind}")], &mask) <= LOGIT_TOL);
        }
    }
}

fn write_merged_fixture(arch: &str, out: &Path) {
    let mut args = vec![
        "--model".to_string(),
        s(&model_dir(arch)).to_string(),
        "--adapters".into(),
        s(&adapter_dir(&format!("{arch}_peft"))).to_string(),
        "--output".into(),
        s(out).to_string(),
        "--overwrite".into(),
    ];
    if arch == "llama" {
        args.extend(["--max_shard_size".into(), "150KB".into()]);
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    merge_ok(&refs);
}

/// `tests/fixtures/merged/<arch>` holds lorafold's merge of `<arch>_peft` (llama sharded);
/// `merge.py verify` compared it with PEFT's merge_and_unload and loaded it in transformers,
/// recording the result in `tests/golden/merge_check.json`. This test checks the record and that
/// today's merge writes the same bytes.
///
/// Regenerate with `LORAFOLD_WRITE_FIXTURES=1 cargo test --release --test it
/// merge::committed_merged_folders`, then run `tests/golden/merge.py verify`.
#[test]
fn committed_merged_folders_were_verified_by_transformers() {
    let write = std::env::var("LORAFOLD_WRITE_FIXTURES").is_ok_and(|v| v == "1");
    let check: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/golden/merge_check.json")).unwrap_or_else(|_| "{}".into()),
    )
    .unwrap();
    for arch in ARCHS {
        let committed = root().join("tests/fixtures/merged").join(arch);
        if write {
            write_merged_fixture(arch, &committed);
            continue;
        }
        let tmp = tempfile::tempdir().unwrap();
        let fresh = tmp.path().join("m");
        write_merged_fixture(arch, &fresh);
        let mut names: Vec<String> = std::fs::read_dir(&committed)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let mut fresh_names: Vec<String> = std::fs::read_dir(&fresh)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        fresh_names.sort();
        assert_eq!(names, fresh_names, "{arch}: files differ from the committed merge");
        for n in &names {
            assert!(
                std::fs::read(committed.join(n)).unwrap() == std::fs::read(fresh.join(n)).unwrap(),
                "{arch}: {n} differs from the transformers-verified one"
            );
        }
        let c = &check[arch];
        assert_eq!(c["passed"], true, "{arch}: {c}");
        assert_eq!(c["transformers_load_ok"], true, "{arch}: {c}");
        assert_eq!(c["names_match_base"], true, "{arch}: {c}");
        assert_eq!(c["untouched_identical"], true, "{arch}: {c}");
        let d = c["max_abs_diff_vs_peft_merge"].as_f64().unwrap();
        assert!(
            d <= MERGE_TOL as f64,
            "{arch}: merged weights differed from PEFT's by {d}"
        );
        let l = c["max_abs_logit_diff_vs_peft_unmerged"].as_f64().unwrap();
        assert!(l <= LOGIT_TOL as f64, "{arch}: transformers' logits differed by {l}");
        if c["tie_word_embeddings"] == true {
            assert_eq!(c["lm_head_saved"], false, "{arch}: {c}");
            assert_eq!(c["tied_in_transformers"], true, "{arch}: {c}");
        }
        if arch == "llama" {
            assert!(c["shards"].as_u64().unwrap() > 3, "{arch}: {c}");
            assert_eq!(c["index_ok"], true, "{arch}: {c}");
        }
    }
}

/// Write a bf16 copy of a fixture model.
fn bf16_copy(arch: &str, dir: &Path) {
    copy_dir(&model_dir(arch), dir);
    let t = tensors_in(&model_dir(arch));
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.to_string_lossy().contains("safetensors") {
            std::fs::remove_file(p).unwrap();
        }
    }
    let mut v: Vec<(String, Tensor)> = t
        .into_iter()
        .map(|(k, t)| (k, t.to_dtype(DType::BF16).unwrap()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    lorafold::lora::io::save_safetensors(&dir.join("model.safetensors"), &v).unwrap();
}

/// A bf16 base is merged in f32 and stored in bf16; untouched tensors keep their bytes.
/// `--dtype bf16` converts an f32 base and says so in config.json.
#[test]
fn bf16_base_stays_bf16() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    bf16_copy("qwen2", &base);
    let out = tmp.path().join("m");
    let ad = adapter_dir("qwen2_peft");
    merge_ok(&["--model", s(&base), "--adapters", s(&ad), "--output", s(&out)]);
    let ours = raw_in(&out);
    let theirs = raw_in(&base);
    let adapted = adapted_weight_names(&ad);
    let merged = tensors_in(&out);
    let base_t = tensors_in(&base);
    let mut model = load_model("qwen2");
    let a = load_adapter(&mut model, &ad, false).unwrap();
    let cfg = a.config.clone();
    let lora = tensors_in(&ad);
    for (name, (dt, bytes)) in &ours {
        assert_eq!(*dt, safetensors::Dtype::BF16, "{name}");
        if !adapted.contains(name) {
            assert!(*bytes == theirs[name].1, "{name} not bit-identical");
            continue;
        }
        // Expected: bf16(f32(W) + scale · B·A).
        let path = name.trim_end_matches(".weight");
        let la = &lora[&format!("base_model.model.{path}.lora_A.weight")];
        let lb = &lora[&format!("base_model.model.{path}.lora_B.weight")];
        let scale = cfg.scale_for(path, la.dims()[0]);
        let want = (base_t[name].to_dtype(DType::F32).unwrap() + (lb.matmul(la).unwrap() * scale).unwrap())
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        assert_eq!(max_abs_diff(&merged[name], &want), 0.0, "{name}");
    }

    let out2 = tmp.path().join("m2");
    merge_ok(&[
        "--model",
        s(&model_dir("qwen2")),
        "--adapters",
        s(&ad),
        "--output",
        s(&out2),
        "--dtype",
        "bf16",
    ]);
    assert!(raw_in(&out2).values().all(|(dt, _)| *dt == safetensors::Dtype::BF16));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out2.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["dtype"], "bfloat16");
    // Same numbers as merging the bf16 copy, up to where f32 → bf16 rounding happens.
    let m2 = tensors_in(&out2);
    for name in &adapted {
        assert!(max_abs_diff(&m2[name], &merged[name]) <= 0.07, "{name}");
    }
    let lm = Model::load_dir(&out2, &LoadOptions::default()).unwrap();
    let g = golden("qwen2");
    let (ids, mask) = golden_inputs(&g);
    let logits = lm.forward(&ids, Some(&mask), &Fwd::base()).unwrap();
    assert!(max_abs_diff(&logits, &g["logits_peft"]) < 0.5);
}

/// A tiny --max_shard_size gives several shards and an index that lorafold loads; the weights are
/// those of the single-file merge.
#[test]
fn sharded_output_with_index() {
    let tmp = tempfile::tempdir().unwrap();
    let ad = adapter_dir("qwen2_peft");
    let one = tmp.path().join("one");
    let many = tmp.path().join("many");
    merge_ok(&[
        "--model",
        s(&model_dir("qwen2")),
        "--adapters",
        s(&ad),
        "--output",
        s(&one),
    ]);
    merge_ok(&[
        "--model",
        s(&model_dir("qwen2")),
        "--adapters",
        s(&ad),
        "--output",
        s(&many),
        "--max_shard_size",
        "100KB",
    ]);
    assert!(one.join("model.safetensors").exists() && !one.join("model.safetensors.index.json").exists());
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(many.join("model.safetensors.index.json")).unwrap()).unwrap();
    let wm = index["weight_map"].as_object().unwrap();
    let mut files: Vec<String> = wm.values().map(|v| v.as_str().unwrap().to_string()).collect();
    files.sort();
    files.dedup();
    assert!(files.len() >= 4, "{files:?}");
    let n = files.len();
    for (i, f) in files.iter().enumerate() {
        assert_eq!(f, &format!("model-{:05}-of-{n:05}.safetensors", i + 1));
        let size = std::fs::metadata(many.join(f)).unwrap().len();
        let here = raw_in_file(&many.join(f));
        assert!(size <= 100_000 + 4096 || here.len() == 1, "{f}: {size} bytes");
        for name in here {
            assert_eq!(wm[&name], f.as_str(), "{name} is not where the index says");
        }
    }
    let a = raw_in(&one);
    let b = raw_in(&many);
    assert_eq!(a.len(), b.len());
    assert_eq!(wm.len(), a.len());
    let total: usize = a.values().map(|(_, v)| v.len()).sum();
    assert_eq!(index["metadata"]["total_size"], total);
    for (k, v) in &a {
        assert!(b[k] == *v, "{k} differs between single-file and sharded output");
    }
    let g = golden("qwen2");
    let (ids, mask) = golden_inputs(&g);
    let l1 = Model::load_dir(&one, &LoadOptions::default())
        .unwrap()
        .forward(&ids, Some(&mask), &Fwd::base())
        .unwrap();
    let l2 = Model::load_dir(&many, &LoadOptions::default())
        .unwrap()
        .forward(&ids, Some(&mask), &Fwd::base())
        .unwrap();
    assert_eq!(max_abs_diff(&l1, &l2), 0.0);
}

fn raw_in_file(p: &Path) -> Vec<String> {
    let bytes = std::fs::read(p).unwrap();
    safetensors::SafeTensors::deserialize(&bytes)
        .unwrap()
        .names()
        .into_iter()
        .map(String::from)
        .collect()
}

/// The adapters of a combination, by the names merge.py uses.
fn combo_adapter(arch: &str, name: &str) -> PathBuf {
    match name {
        "b" => merge_adapter_dir(&format!("{arch}_b")),
        other => adapter_dir(&format!("{arch}_{other}")),
    }
}

/// Per module: (A, B, scale) of an adapter folder.
fn lora_modules(dir: &Path) -> BTreeMap<String, (Tensor, Tensor, f64)> {
    let cfg = lorafold::lora::config::LoraConfig::from_file(&dir.join("adapter_config.json")).unwrap();
    let t = tensors_in(dir);
    let mut out = BTreeMap::new();
    for (k, a) in &t {
        if let Some(path) = k.strip_suffix(".lora_A.weight") {
            let b = &t[&format!("{path}.lora_B.weight")];
            let module = path.trim_start_matches("base_model.model.").to_string();
            let scale = cfg.scale_for(&module, a.dims()[0]);
            out.insert(module, (a.clone(), b.clone(), scale));
        }
    }
    out
}

/// Flags for a combination spec from merge_combos.json.
fn combo_args(arch: &str, spec: &serde_json::Value, out: &Path) -> Vec<String> {
    let mut args = vec!["--adapters".to_string()];
    for a in spec["adapters"].as_array().unwrap() {
        args.push(s(&combo_adapter(arch, a.as_str().unwrap())).to_string());
    }
    let w: Vec<String> = spec["weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_f64().unwrap().to_string())
        .collect();
    args.extend(["--weights".into(), w.join(","), "--combination".into()]);
    args.push(spec["combination_type"].as_str().unwrap().into());
    for key in ["density", "svd_rank", "majority_sign_method"] {
        if let Some(v) = spec.get(key) {
            args.push(format!("--{key}"));
            args.push(v.to_string().trim_matches('"').to_string());
        }
    }
    args.extend([
        "--output".into(),
        s(out).into(),
        "--model".into(),
        s(&model_dir(arch)).into(),
    ]);
    args
}

/// linear, cat, svd, ties, magnitude_prune and their *_svd forms equal PEFT's
/// add_weighted_adapter. SVD factors are compared as their product and component by component
/// up to sign (singular vectors have no canonical sign).
#[test]
fn combinations_match_peft_add_weighted_adapter() {
    let spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("tests/golden/merge_combos.json")).unwrap()).unwrap();
    let golden =
        candle_core::safetensors::load(root().join("tests/golden/merge_combos.safetensors"), &Device::Cpu).unwrap();
    for (arch, combos) in spec["combos"].as_object().unwrap() {
        for (name, c) in combos.as_object().unwrap() {
            let tmp = tempfile::tempdir().unwrap();
            let out = tmp.path().join("c");
            let args = combo_args(arch, c, &out);
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            merge_ok(&refs);
            let cfg: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
            assert_eq!(cfg["r"], c["r"], "{arch}/{name}");
            assert_eq!(
                cfg["lora_alpha"].as_f64(),
                c["r"].as_f64(),
                "{arch}/{name}: scale must be 1"
            );
            assert_eq!(cfg["use_rslora"], false, "{arch}/{name}");
            let ours = tensors_in(&out);
            assert_eq!(ours.len(), 2 * c["modules"].as_u64().unwrap() as usize, "{arch}/{name}");
            let svd = c["combination_type"].as_str().unwrap().contains("svd");
            let mut worst = 0f32;
            for (key, a) in &ours {
                let Some(path) = key.strip_suffix(".lora_A.weight") else {
                    continue;
                };
                let b = &ours[&format!("{path}.lora_B.weight")];
                let ga = &golden[&format!("{arch}/{name}/{path}.lora_A.weight")];
                let gb = &golden[&format!("{arch}/{name}/{path}.lora_B.weight")];
                assert_eq!(a.dims(), ga.dims(), "{arch}/{name}/{key}");
                assert_eq!(b.dims(), gb.dims(), "{arch}/{name}/{key}");
                if !svd {
                    worst = worst.max(max_abs_diff(a, ga)).max(max_abs_diff(b, gb));
                    continue;
                }
                let prod = b.matmul(a).unwrap();
                let gprod = gb.matmul(ga).unwrap();
                let scale = max_abs(&gprod).max(1.0);
                worst = worst.max(max_abs_diff(&prod, &gprod) / scale);
                // Component j: column j of B (= u_j σ_j) and row j of A (= v_j).
                let sig: Vec<f32> = (0..ga.dims()[0])
                    .map(|j| {
                        gb.narrow(1, j, 1)
                            .unwrap()
                            .sqr()
                            .unwrap()
                            .sum_all()
                            .unwrap()
                            .to_scalar::<f32>()
                            .unwrap()
                            .sqrt()
                    })
                    .collect();
                for j in 0..sig.len() {
                    let separated = (j == 0 || (sig[j - 1] - sig[j]) > 1e-3 * sig[0])
                        && (j + 1 == sig.len() || (sig[j] - sig[j + 1]) > 1e-3 * sig[0]);
                    if sig[j] < 1e-3 * sig[0] || !separated {
                        continue;
                    }
                    let (ra, rga) = (a.narrow(0, j, 1).unwrap(), ga.narrow(0, j, 1).unwrap());
                    let dot = (&ra * &rga).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
                    let sign = if dot < 0.0 { -1.0 } else { 1.0 };
                    let da = max_abs_diff(&(ra * sign).unwrap(), &rga);
                    let db = max_abs_diff(
                        &(b.narrow(1, j, 1).unwrap() * sign).unwrap(),
                        &gb.narrow(1, j, 1).unwrap(),
                    );
                    assert!(
                        da <= 1e-4 && db <= 1e-4 * scale,
                        "{arch}/{name}/{path} component {j}: {da} {db}"
                    );
                }
            }
            println!(
                "{arch}/{name}: max diff vs PEFT {worst:.2e}{}",
                if svd { " (relative, B·A)" } else { "" }
            );
            let tol = if svd { 1e-5 } else { MERGE_TOL };
            assert!(worst <= tol, "{arch}/{name}: differs from PEFT by {worst}");
            // The combined adapter is a valid adapter for the base model.
            let mut model = load_model(arch);
            load_adapter(&mut model, &out, false).unwrap();
        }
    }
}

/// `cat` is exact: B'A' is the weighted sum of the adapters' ΔW, and `--combination cat --merge`
/// equals merging the adapters one after another.
#[test]
fn cat_is_the_weighted_sum_of_deltas() {
    let arch = "qwen2";
    let names = ["peft", "peft_rslora", "b"];
    let weights = [0.6f64, 0.9, -0.4];
    let dirs: Vec<PathBuf> = names.iter().map(|n| combo_adapter(arch, n)).collect();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("cat");
    let mut args: Vec<&str> = vec!["--adapters"];
    args.extend(dirs.iter().map(|d| s(d)));
    args.extend(["--weights", "0.6,0.9,-0.4", "--combination", "cat", "--output", s(&out)]);
    merge_ok(&args);
    let cat = lora_modules(&out);
    let inputs: Vec<_> = dirs.iter().map(|d| lora_modules(d)).collect();
    let mut worst = 0f32;
    for (module, (a, b, scale)) in &cat {
        assert_eq!(*scale, 1.0);
        assert_eq!(a.dims()[0], 16, "cat rank is 4 + 8 + 4");
        let mut want: Option<Tensor> = None;
        for (ad, w) in inputs.iter().zip(weights) {
            if let Some((ia, ib, is)) = ad.get(module) {
                let d = (ib.matmul(ia).unwrap() * (w * is)).unwrap();
                want = Some(match want {
                    None => d,
                    Some(x) => (x + d).unwrap(),
                });
            }
        }
        // Relative to the largest |ΔW| entry: the two sides round in a different order in f32.
        let want = want.unwrap();
        worst = worst.max(max_abs_diff(&b.matmul(a).unwrap(), &want) / max_abs(&want).max(1.0));
    }
    println!("cat: max |B'A' - Σ w s BA| / max |ΔW| = {worst:.2e}");
    assert!(worst <= MERGE_TOL, "{worst}");

    // Folding the cat adapter into the base = merging the three adapters directly.
    let m1 = tmp.path().join("m1");
    let m2 = tmp.path().join("m2");
    let base = model_dir(arch);
    let mut a1 = args.clone();
    let o = a1.iter().position(|x| *x == "--output").unwrap();
    a1[o + 1] = s(&m1);
    a1.extend(["--merge", "--model", s(&base)]);
    merge_ok(&a1);
    let mut a2: Vec<&str> = vec!["--model", s(&base), "--adapters"];
    a2.extend(dirs.iter().map(|d| s(d)));
    a2.extend(["--weights", "0.6,0.9,-0.4", "--output", s(&m2)]);
    merge_ok(&a2);
    let (t1, t2) = (tensors_in(&m1), tensors_in(&m2));
    for (k, v) in &t1 {
        let d = max_abs_diff(v, &t2[k]) / max_abs(&t2[k]).max(1.0);
        assert!(d <= MERGE_TOL, "{k}: relative difference {d}");
    }
}

/// `--combination svd --merge` folds exactly the adapter that `--combination svd` writes.
#[test]
fn combined_then_merged_equals_merging_the_written_adapter() {
    let arch = "qwen2";
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (adapter_dir("qwen2_peft"), adapter_dir("qwen2_peft_rslora"));
    let base = model_dir(arch);
    let c = tmp.path().join("c");
    let m = tmp.path().join("m");
    let m2 = tmp.path().join("m2");
    let common = [
        "--adapters",
        s(&a),
        s(&b),
        "--combination",
        "svd",
        "--svd_rank",
        "5",
        "--weights",
        "0.5,0.5",
    ];
    let mut args = common.to_vec();
    args.extend(["--output", s(&c)]);
    merge_ok(&args);
    let mut args = common.to_vec();
    args.extend(["--output", s(&m), "--into_base", "--model", s(&base)]);
    merge_ok(&args);
    merge_ok(&["--model", s(&model_dir(arch)), "--adapters", s(&c), "--output", s(&m2)]);
    let (t1, t2) = (tensors_in(&m), tensors_in(&m2));
    for (k, v) in &t1 {
        assert_eq!(max_abs_diff(v, &t2[k]), 0.0, "{k}");
    }
}

/// DARE is random: with the second adapter weighted 0, dare_linear keeps a fraction ≈ density of
/// the first adapter's values, each rescaled by 1/density (times √(w·scale), as PEFT applies the
/// weight to A and B); the same seed gives the same adapter, another seed another one.
#[test]
fn dare_keeps_density_and_is_seeded() {
    let arch = "qwen2";
    let tmp = tempfile::tempdir().unwrap();
    let (p, b) = (adapter_dir("qwen2_peft"), merge_adapter_dir("qwen2_b"));
    let density = 0.3f64;
    let run = |comb: &str, seed: &str, out: &Path| {
        merge_ok(&[
            "--adapters",
            s(&p),
            s(&b),
            "--weights",
            "1,0",
            "--combination",
            comb,
            "--density",
            "0.3",
            "--seed",
            seed,
            "--output",
            s(out),
        ]);
    };
    let o1 = tmp.path().join("d1");
    run("dare_linear", "7", &o1);
    let input = lora_modules(&p);
    let got = lora_modules(&o1);
    let (mut kept, mut total, mut worst) = (0usize, 0usize, 0f32);
    for (module, (a, bb, _)) in &got {
        let (ia, ib, is) = &input[module];
        let f = (is.sqrt() / density) as f32;
        for (ours, orig) in [(a, ia), (bb, ib)] {
            let o = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let i = orig.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (x, y) in o.iter().zip(&i) {
                total += 1;
                if *x != 0.0 {
                    kept += 1;
                    worst = worst.max((x - y * f).abs() / (y * f).abs().max(1e-6));
                }
            }
        }
    }
    let frac = kept as f64 / total as f64;
    println!("dare_linear: kept {kept}/{total} = {frac:.4} (density {density}), rescale rel err {worst:.1e}");
    assert!((frac - density).abs() < 0.02, "{frac}");
    assert!(worst < 1e-5, "{worst}");
    let _ = arch;

    let o2 = tmp.path().join("d2");
    let o3 = tmp.path().join("d3");
    run("dare_linear", "7", &o2);
    run("dare_linear", "8", &o3);
    let bytes = |d: &Path| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    assert_eq!(bytes(&o1), bytes(&o2), "same seed, same adapter");
    assert_ne!(bytes(&o1), bytes(&o3), "another seed, another adapter");

    // dare_ties and dare_*_svd: seeded too, and of the expected rank.
    for comb in ["dare_ties", "dare_linear_svd", "dare_ties_svd"] {
        let (x, y) = (tmp.path().join(format!("{comb}1")), tmp.path().join(format!("{comb}2")));
        run(comb, "3", &x);
        run(comb, "3", &y);
        assert_eq!(bytes(&x), bytes(&y), "{comb}");
        let m = lora_modules(&x);
        assert!(m.values().all(|(a, _, s)| a.dims()[0] == 4 && *s == 1.0), "{comb}");
    }
}

/// Adapters made for another base, missing files, a wrong number of weights, an existing output
/// and other misuse fail with messages that name the file, tensor or flag.
#[test]
fn errors_name_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let llama = model_dir("llama");
    let qwen = adapter_dir("qwen3_peft");

    let e = merge_err(&["--model", s(&llama), "--adapters", s(&qwen), "--output", s(&out)]);
    assert!(
        e.contains("k_proj.lora_B.weight") && e.contains("[32, 64]") && e.contains("another base model"),
        "{e}"
    );
    assert!(!out.exists(), "nothing written on error");

    let missing = tmp.path().join("nope");
    let e = merge_err(&["--model", s(&llama), "--adapters", s(&missing), "--output", s(&out)]);
    assert!(e.contains("nope") && e.contains("does not exist"), "{e}");

    let partial = tmp.path().join("partial");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::copy(
        adapter_dir("llama_peft").join("adapter_config.json"),
        partial.join("adapter_config.json"),
    )
    .unwrap();
    let e = merge_err(&["--model", s(&llama), "--adapters", s(&partial), "--output", s(&out)]);
    assert!(e.contains("adapter_model.safetensors") && e.contains("missing"), "{e}");

    let run_dir = tmp.path().join("run");
    copy_dir(&adapter_dir("llama_peft"), &run_dir.join("checkpoint-5"));
    let e = merge_err(&["--model", s(&llama), "--adapters", s(&run_dir), "--output", s(&out)]);
    assert!(e.contains("checkpoint-5"), "{e}");
    // A checkpoint folder of a dpo run (extra optimizer/trainer files) merges like any adapter.
    std::fs::write(run_dir.join("checkpoint-5/trainer_state.json"), "{}").unwrap();
    merge_ok(&[
        "--model",
        s(&llama),
        "--adapters",
        s(&run_dir.join("checkpoint-5")),
        "--output",
        s(&out),
    ]);

    let e = merge_err(&[
        "--model",
        s(&llama),
        "--adapters",
        s(&adapter_dir("llama_peft")),
        "--output",
        s(&out),
    ]);
    assert!(e.contains("already exists") && e.contains("--overwrite"), "{e}");
    merge_ok(&[
        "--model",
        s(&llama),
        "--adapters",
        s(&adapter_dir("llama_peft")),
        "--output",
        s(&out),
        "--overwrite",
    ]);
    let e = merge_err(&[
        "--model",
        s(&llama),
        "--adapters",
        s(&adapter_dir("llama_peft")),
        "--output",
        s(&llama),
        "--overwrite",
    ]);
    assert!(e.contains("one of the inputs"), "{e}");

    let no_model = tmp.path().join("empty_model");
    std::fs::create_dir_all(&no_model).unwrap();
    let e = merge_err(&[
        "--model",
        s(&no_model),
        "--adapters",
        s(&adapter_dir("llama_peft")),
        "--output",
        s(&tmp.path().join("o2")),
    ]);
    assert!(e.contains("config.json"), "{e}");

    let (pa, pb) = (adapter_dir("llama_peft"), adapter_dir("llama_peft_rslora"));
    let two = [s(&pa), s(&pb)];
    let e = merge_err(&[
        "--model",
        s(&llama),
        "--adapters",
        two[0],
        two[1],
        "--weights",
        "0.2,0.3,0.5",
        "--output",
        s(&tmp.path().join("o3")),
    ]);
    assert!(e.contains("--weights has 3 values") && e.contains("2 adapters"), "{e}");

    let e = merge_err(&[
        "--adapters",
        two[0],
        two[1],
        "--combination",
        "linear",
        "--output",
        s(&tmp.path().join("o4")),
    ]);
    assert!(e.contains("equal rank") && e.contains("4, 8"), "{e}");
    let e = merge_err(&[
        "--adapters",
        two[0],
        two[1],
        "--combination",
        "ties",
        "--output",
        s(&tmp.path().join("o5")),
    ]);
    assert!(e.contains("--density"), "{e}");
    // Without --model, the base the adapter records is used (as AutoPeftModelForCausalLM does);
    // an adapter that records none needs --model.
    let out = merge(&["--adapters", two[0], "--output", s(&tmp.path().join("o6"))]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{e}");
    assert!(
        e.contains("no --model given: merging into \"tests/fixtures/models/llama\""),
        "{e}"
    );
    let bare = tmp.path().join("no_base");
    copy_dir(&pa, &bare);
    let cfg_path = bare.join("adapter_config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("base_model_name_or_path");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = merge_err(&["--adapters", s(&bare), "--output", s(&tmp.path().join("o6b"))]);
    assert!(e.contains("--model is required"), "{e}");
    let e = merge_err(&[
        "--model",
        s(&llama),
        "--adapters",
        two[0],
        "--max_shard_size",
        "lots",
        "--output",
        s(&tmp.path().join("o7")),
    ]);
    assert!(e.contains("--max_shard_size"), "{e}");
    let e = merge_err(&[
        "--adapters",
        two[0],
        two[1],
        "--combination",
        "svd",
        "--svd_rank",
        "100",
        "--output",
        s(&tmp.path().join("o8")),
    ]);
    assert!(e.contains("--svd_rank 100") && e.contains("model.layers.0"), "{e}");
}

/// `--safe_merge` refuses an adapter holding a NaN (naming the tensor) and writes nothing; without
/// it the merge goes through with a warning, as PEFT's merge does.
#[test]
fn safe_merge_refuses_nan() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad");
    copy_dir(&adapter_dir("qwen2_peft"), &bad);
    let mut t: Vec<(String, Tensor)> = tensors_in(&bad).into_iter().collect();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    let key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight";
    for (k, v) in t.iter_mut() {
        if k == key {
            let mut d = v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            d[3] = f32::NAN;
            *v = Tensor::from_vec(d, v.dims(), &Device::Cpu).unwrap();
        }
    }
    lorafold::lora::io::save_safetensors(&bad.join("adapter_model.safetensors"), &t).unwrap();
    let out = tmp.path().join("m");
    let base = model_dir("qwen2");
    let e = merge_err(&[
        "--model",
        s(&base),
        "--adapters",
        s(&bad),
        "--output",
        s(&out),
        "--safe_merge",
    ]);
    assert!(e.contains(key) && e.contains("NaN"), "{e}");
    assert!(!out.exists());
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "staging folder left behind: {leftovers:?}");
    let o = merge(&["--model", s(&base), "--adapters", s(&bad), "--output", s(&out)]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("NaN"));
}

/// The subspace-iteration SVD (used when both sides exceed `EXACT_MAX`) agrees with the exact
/// Jacobi SVD, for tall and wide matrices.
#[test]
fn iterative_svd_matches_exact() {
    use lorafold::linalg::mat::Mat;
    use lorafold::linalg::svd::{truncated_svd_with, SvdMethod, EXACT_MAX};
    let mut rng = lorafold::rng::Rng::new(11);
    let mut gauss = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.next_normal() as f32).collect() };
    for (m, n) in [(EXACT_MAX + 160, EXACT_MAX + 40), (EXACT_MAX + 40, EXACT_MAX + 160)] {
        // A decaying spectrum (rank-12 signal of decreasing strength) over a small noise floor.
        let r = 12;
        let mut b = Mat {
            rows: m,
            cols: r,
            data: gauss(m * r),
        };
        for i in 0..m {
            for j in 0..r {
                b.data[i * r + j] *= 0.75f32.powi(j as i32);
            }
        }
        let a = Mat {
            rows: r,
            cols: n,
            data: gauss(r * n),
        };
        let mut x = b.matmul(&a).unwrap();
        for (v, e) in x.data.iter_mut().zip(gauss(m * n)) {
            *v += 1e-3 * e;
        }
        let k = 6;
        let exact = truncated_svd_with(&x, k, SvdMethod::Exact).unwrap();
        let iter = truncated_svd_with(&x, k, SvdMethod::Iterative).unwrap();
        assert!(
            iter.iterations >= 1 && iter.residual <= 1e-8,
            "{m}x{n}: {} {}",
            iter.iterations,
            iter.residual
        );
        for (e, i) in exact.s.iter().zip(&iter.s) {
            assert!((e - i).abs() <= 1e-6 * exact.s[0], "{m}x{n}: σ {e} vs {i}");
        }
        let pe = exact.us.matmul(&exact.vt).unwrap();
        let pi = iter.us.matmul(&iter.vt).unwrap();
        let d = pe
            .data
            .iter()
            .zip(&pi.data)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        let scale = pe.data.iter().fold(0f32, |acc, v| acc.max(v.abs()));
        println!(
            "{m}x{n}: {} iterations, rank-{k} reconstructions differ by {:.1e} (relative)",
            iter.iterations,
            d / scale
        );
        assert!(d <= 1e-5 * scale, "{m}x{n}: {d}");
    }
}

/// `--svd_clamp q` clamps both factors at ±(the q-quantile of their values), as PEFT does.
#[test]
fn svd_clamp_clamps_at_the_quantile() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (adapter_dir("qwen2_peft"), adapter_dir("qwen2_peft_rslora"));
    let (plain, clamped) = (tmp.path().join("p"), tmp.path().join("c"));
    let args = ["--adapters", s(&a), s(&b), "--combination", "svd"];
    let mut p = args.to_vec();
    p.extend(["--output", s(&plain)]);
    merge_ok(&p);
    let mut c = args.to_vec();
    c.extend(["--output", s(&clamped), "--svd_clamp", "0.9"]);
    merge_ok(&c);
    let (tp, tc) = (lora_modules(&plain), lora_modules(&clamped));
    let mut changed = 0;
    for (module, (pa, pb, _)) in &tp {
        let mut all: Vec<f32> = pb.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        all.extend(pa.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        all.sort_by(|x, y| x.total_cmp(y));
        let pos = 0.9 * (all.len() - 1) as f64;
        let lo = pos.floor() as usize;
        let hi = all[lo] + (pos - lo as f64) as f32 * (all[(lo + 1).min(all.len() - 1)] - all[lo]);
        let (ca, cb, _) = &tc[module];
        for (orig, got) in [(pa, ca), (pb, cb)] {
            let want = orig.clamp(-hi, hi).unwrap();
            assert_eq!(max_abs_diff(&want, got), 0.0, "{module}");
            changed += (max_abs_diff(orig, got) > 0.0) as usize;
        }
    }
    assert!(changed > 0, "clamping changed nothing");
}

/// The base model may be a hub id, resolved through the local hub cache.
#[test]
fn base_from_hub_cache() {
    let home = tempfile::tempdir().unwrap();
    let rev = "89abcdef0123456789abcdef0123456789abcdef";
    let repo = home.path().join("hub/models--lorafold-test--tiny-qwen2");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), rev).unwrap();
    copy_dir(&model_dir("qwen2"), &repo.join("snapshots").join(rev));
    let out = home.path().join("merged");
    let ad = adapter_dir("qwen2_peft");
    let env = [("HF_HOME", home.path()), ("HF_HUB_OFFLINE", Path::new("1"))];
    let o = lorafold(
        &[
            "merge",
            "--model",
            "lorafold-test/tiny-qwen2",
            "--adapters",
            s(&ad),
            "--output",
            s(&out),
        ],
        &env,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let committed = root().join("tests/fixtures/merged/qwen2");
    for f in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(
            std::fs::read(out.join(f)).unwrap() == std::fs::read(committed.join(f)).unwrap(),
            "{f}"
        );
    }
}
