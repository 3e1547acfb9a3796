//! `lorafold bench`: a fixed, reproducible DPO workload on a ~30M-parameter Llama-architecture
//! model (hidden 512, 8 layers, 8 heads, intermediate 1376, vocab 16k, random weights from a
//! fixed seed) and a fixed preference batch (4 pairs, prompts ~150 tokens, responses ~100).
//! Reports tokens/s of a DPO step (real tokens, chosen + rejected), the median seconds per step,
//! peak RSS, and the fraction of the machine's measured matmul peak reached.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use crate::cli::BenchArgs;
use crate::dpo::batch::PairIds;
use crate::error::{Error, Result};
use crate::lora::config::{LoraConfig, TargetModules};
use crate::lora::{attach_new, LoraInit};
use crate::model::linear::Fwd;
use crate::model::ops::cpu::{take_product_stats, ProductStats};
use crate::model::{LoadOptions, Model};
use crate::recipe::DpoOptions;
use crate::rng::Rng;
use crate::train::metrics::peak_rss_mib;
use crate::train::optim::AdamWConfig;
use crate::train::step::{Micro, StepOutcome, Updater};
use crate::train::trainer::DpoRun;

/// The shape of a benchmark model and the batch it is measured on.
#[derive(Debug, Clone, Copy)]
pub struct BenchModel {
    /// `--preset` name.
    pub name: &'static str,
    /// `llama` (no biases) or `qwen2` (q/k/v biases).
    pub model_type: &'static str,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub rope_theta: f64,
    pub rms_eps: f64,
    /// Default batch: pairs, prompt tokens, tokens per response.
    pub pairs: usize,
    pub prompt_len: usize,
    pub response_len: usize,
}

/// The default workload: a ~33M-parameter Llama, 4 pairs of ~150 + ~100 tokens.
pub const BENCH_MODEL: BenchModel = BenchModel {
    name: "bench",
    model_type: "llama",
    hidden: 512,
    layers: 8,
    heads: 8,
    kv_heads: 8,
    intermediate: 1376,
    vocab: 16000,
    rope_theta: 10000.0,
    rms_eps: 1e-5,
    pairs: 4,
    prompt_len: 150,
    response_len: 100,
};

/// Qwen2.5-0.5B-Instruct's shape (494M parameters, vocab 151936, 24 layers, GQA 14/2, tied
/// embeddings, q/k/v biases) with random weights; 2 pairs of ~350-token sequences.
pub const QWEN25_05B: BenchModel = BenchModel {
    name: "qwen2.5-0.5b",
    model_type: "qwen2",
    hidden: 896,
    layers: 24,
    heads: 14,
    kv_heads: 2,
    intermediate: 4864,
    vocab: 151936,
    rope_theta: 1000000.0,
    rms_eps: 1e-6,
    pairs: 2,
    prompt_len: 250,
    response_len: 100,
};

pub const PRESETS: [BenchModel; 2] = [BENCH_MODEL, QWEN25_05B];

/// The preset named `name`.
pub fn preset(name: &str) -> Result<BenchModel> {
    PRESETS
        .iter()
        .copied()
        .find(|p| p.name == name)
        .ok_or_else(|| Error::Setting {
            key: "--preset".into(),
            msg: format!(
                "unknown preset {name:?}; known: {}",
                PRESETS.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
            ),
        })
}

/// Write a random model of shape `m` laid out like a hub snapshot.
pub fn make_model(dir: &Path, m: &BenchModel, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let arch = if m.model_type == "qwen2" {
        "Qwen2ForCausalLM"
    } else {
        "LlamaForCausalLM"
    };
    let config = serde_json::json!({
        "architectures": [arch], "model_type": m.model_type,
        "hidden_size": m.hidden, "intermediate_size": m.intermediate, "num_hidden_layers": m.layers,
        "num_attention_heads": m.heads, "num_key_value_heads": m.kv_heads, "vocab_size": m.vocab,
        "rms_norm_eps": m.rms_eps, "rope_theta": m.rope_theta, "max_position_embeddings": 32768,
        "tie_word_embeddings": true, "hidden_act": "silu", "torch_dtype": "float32",
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0
    });
    crate::lora::io::write_atomic(&dir.join("config.json"), config.to_string().as_bytes())?;
    let mut rng = Rng::new(seed);
    let dev = Device::Cpu;
    let mut randn = |shape: &[usize], std: f64| -> Result<Tensor> {
        let n = shape.iter().product::<usize>();
        let v: Vec<f32> = (0..n).map(|_| (rng.next_normal() * std) as f32).collect();
        Ok(Tensor::from_vec(v, shape, &dev)?)
    };
    let (h, kv) = (m.hidden, m.kv_heads * (m.hidden / m.heads));
    let mut ts: Vec<(String, Tensor)> = vec![("model.embed_tokens.weight".into(), randn(&[m.vocab, h], 0.02)?)];
    for l in 0..m.layers {
        let p = format!("model.layers.{l}");
        for (name, o, i) in [
            ("self_attn.q_proj", h, h),
            ("self_attn.k_proj", kv, h),
            ("self_attn.v_proj", kv, h),
            ("self_attn.o_proj", h, h),
            ("mlp.gate_proj", m.intermediate, h),
            ("mlp.up_proj", m.intermediate, h),
            ("mlp.down_proj", h, m.intermediate),
        ] {
            ts.push((format!("{p}.{name}.weight"), randn(&[o, i], 1.0 / (i as f64).sqrt())?));
            if m.model_type == "qwen2" && matches!(name, "self_attn.q_proj" | "self_attn.k_proj" | "self_attn.v_proj") {
                ts.push((format!("{p}.{name}.bias"), randn(&[o], 0.02)?));
            }
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            ts.push((format!("{p}.{norm}.weight"), Tensor::ones(h, DType::F32, &dev)?));
        }
    }
    ts.push(("model.norm.weight".into(), Tensor::ones(h, DType::F32, &dev)?));
    crate::lora::io::save_safetensors(&dir.join("model.safetensors"), &ts)
}

/// The fixed preference batch: lengths vary by ±10% around the targets.
pub fn make_pairs(n: usize, prompt_len: usize, response_len: usize, vocab: usize, seed: u64) -> Vec<PairIds> {
    let mut rng = Rng::new(seed);
    let seq =
        |len: usize, rng: &mut Rng| -> Vec<u32> { (0..len).map(|_| 3 + rng.below(vocab as u64 - 3) as u32).collect() };
    let jitter =
        |base: usize, rng: &mut Rng| -> usize { base - base / 10 + rng.below((base / 5).max(1) as u64) as usize };
    (0..n)
        .map(|_| {
            let (p, c, r) = (
                jitter(prompt_len, &mut rng),
                jitter(response_len, &mut rng),
                jitter(response_len, &mut rng),
            );
            PairIds {
                prompt: seq(p, &mut rng),
                chosen: seq(c, &mut rng),
                rejected: seq(r, &mut rng),
                rejected_prompt: None,
            }
        })
        .collect()
}

/// Measured matmul throughput (FLOP/s) of this machine in f32, best of a few 1024³ products
/// through the product the CPU kernels run (the `gemm` crate).
pub fn matmul_peak() -> Result<f64> {
    use crate::model::ops::cpu::{gemm_into, Mat};
    let n = 1024;
    let a = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let b = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut c = vec![0f32; n * n];
    gemm_into(&mut c, Mat::new(&a, n, n), Mat::new(&b, n, n), 1.0, false)?;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        gemm_into(&mut c, Mat::new(&a, n, n), Mat::new(&b, n, n), 1.0, false)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&c);
    Ok(2.0 * (n * n * n) as f64 / best)
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchResult {
    pub variant: String,
    pub params: usize,
    pub pairs: usize,
    pub tokens_per_step: usize,
    pub median_step_s: f64,
    pub tokens_per_s: f64,
    pub model_flops_per_s: f64,
    /// candle's own best 1024³ f32 product on this machine.
    pub matmul_peak_flops_per_s: f64,
    /// The peak `fraction_of_peak` is relative to: `--reference_peak_gflops` when given (the
    /// machine's best BLAS), else `matmul_peak_flops_per_s`.
    pub reference_peak_flops_per_s: f64,
    pub reference_peak_source: String,
    pub fraction_of_peak: f64,
    pub peak_rss_mib: f64,
    pub base_weights_mib: f64,
    /// Matmul FLOPs the step really needs ([`needed_flops`]), per second, and as a fraction of
    /// the reference peak.
    pub needed_flops_per_s: f64,
    pub needed_fraction_of_peak: f64,
    /// Peak RSS above the resident memory once the model was loaded, per token the model runs
    /// (prompt once per pair) and per layer: what the step keeps for its backward pass, plus
    /// logits, gradients and optimizer state.
    pub activation_bytes_per_token_layer: f64,
    /// The f32 matrix products of the median step, timed where they run (CPU).
    pub products: ProductStats,
}

/// Median seconds of a training step (the trainer's own step, one micro-batch of all pairs),
/// the real tokens it scores, and the time its matrix products took (of the median step).
fn measure(
    run: &DpoRun,
    pairs: &[PairIds],
    refs: Option<&[[f32; 2]]>,
    a: &BenchArgs,
) -> Result<(f64, usize, ProductStats)> {
    let adapter = run
        .adapter
        .as_ref()
        .ok_or_else(|| Error::Msg("bench needs an adapter".into()))?;
    let adamw = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let mut updater = Updater::new(adapter, adamw, 1.0, None)?;
    let mut times = Vec::new();
    let mut tokens = 0;
    let mut state = Default::default();
    for i in 0..a.warmup + a.steps {
        let micro = Micro {
            pairs: pairs.iter().collect(),
            refs: refs.map(<[_]>::to_vec),
            dropout_seed: i as u64,
        };
        take_product_stats();
        let t = Instant::now();
        let n = match updater.step(run, std::slice::from_ref(&micro), 1e-4, &mut state)? {
            StepOutcome::Updated { tokens, .. } | StepOutcome::Skipped { tokens } => tokens,
        };
        if i >= a.warmup {
            times.push((t.elapsed().as_secs_f64(), take_product_stats()));
        }
        tokens = n;
    }
    times.sort_by(|x, y| x.0.total_cmp(&y.0));
    let (step_s, products) = times[times.len() / 2];
    Ok((step_s, tokens, products))
}

/// A measured variant: its name, FLOPs per parameter and token, and precomputed reference log-probs.
type Variant<'a> = (&'a str, f64, Option<Vec<[f32; 2]>>);

/// The folder of the model to benchmark: `--model`, or the preset's random model in
/// `--model_dir` (written there when missing) or a temporary folder. The flag is true for a
/// temporary folder, removed at the end.
fn model_folder(a: &BenchArgs, shape: &BenchModel) -> Result<(std::path::PathBuf, bool)> {
    if let Some(m) = &a.model {
        return Ok((m.clone(), false));
    }
    let (dir, tmp) = match &a.model_dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("lorafold-bench-{}", std::process::id())),
            true,
        ),
    };
    let config = dir.join("config.json");
    if config.exists() {
        let v: serde_json::Value = crate::error::read_json(&config)?;
        let same = v["model_type"] == shape.model_type
            && v["hidden_size"] == shape.hidden
            && v["num_hidden_layers"] == shape.layers
            && v["num_key_value_heads"] == shape.kv_heads
            && v["vocab_size"] == shape.vocab;
        if !same {
            return Err(Error::Setting {
                key: "--model_dir".into(),
                msg: format!(
                    "{} holds a model that is not the {:?} preset's; give another folder",
                    dir.display(),
                    shape.name
                ),
            });
        }
    }
    if !dir.join("model.safetensors").exists() {
        make_model(&dir, shape, 1234)?;
    }
    Ok((dir, tmp))
}

/// Run `lorafold bench`: train-step variants, decode and merge on the benchmark model.
pub fn run(a: &BenchArgs) -> Result<()> {
    let shape = preset(&a.preset)?;
    let (dir, tmp) = model_folder(a, &shape)?;
    let peak = matmul_peak()?;
    let dtype = crate::model::load::parse_dtype_flag(&a.dtype)?.for_weights(None, &Device::Cpu);
    let mut model = Model::load_dir(
        &dir,
        &LoadOptions {
            dtype,
            device: Device::Cpu,
        },
    )?;
    model.set_gradient_checkpointing(a.gradient_checkpointing);
    let mut lcfg = LoraConfig::new(8, 16.0, 0.0, TargetModules::all_linear());
    lcfg.use_dora = a.use_dora;
    let adapter = attach_new(&mut model, &lcfg, LoraInit::Peft { seed: 1 })?;
    let settings = DpoOptions {
        model: Some(dir.display().to_string()),
        dataset: Some(vec!["bench".into()]),
        prefix_sharing: Some(!a.no_prefix_sharing),
        max_length: Some(a.max_length),
        ..Default::default()
    }
    .resolve()?;
    let run = DpoRun::new(&model, Some(adapter), None, &settings)?;
    let (n, p, r) = (
        a.pairs.unwrap_or(shape.pairs),
        a.prompt_len.unwrap_or(shape.prompt_len),
        a.response_len.unwrap_or(shape.response_len),
    );
    let pairs = make_pairs(n, p, r, model.cfg.vocab_size, 99);
    if let Some(p) = &a.dump_pairs {
        let json = serde_json::to_string(&pairs).map_err(|e| Error::Msg(e.to_string()))?;
        std::fs::write(p, json).map_err(|e| Error::io(p, e))?;
    }
    let loaded_rss = crate::train::metrics::rss_mib().unwrap_or(f64::NAN);
    let results = if a.steps == 0 {
        Vec::new()
    } else {
        measure_training(&run, &pairs, a, peak, dtype, loaded_rss)?
    };
    let decode = if a.decode_tokens > 0 {
        Some(measure_decode(&run, &pairs[0].prompt, a.decode_tokens)?)
    } else {
        None
    };
    let merge = if a.skip_merge {
        None
    } else {
        Some(measure_merge(&run, &dir)?)
    };
    if tmp {
        let _ = std::fs::remove_dir_all(&dir);
    }
    if a.json {
        let out = serde_json::json!({ "train": results, "decode": decode, "merge": merge });
        let text = serde_json::to_string_pretty(&out).map_err(|e| Error::Msg(e.to_string()))?;
        println!("{text}");
    } else {
        print_table(a, &model.cfg, &results, decode.as_ref(), merge.as_ref());
    }
    Ok(())
}

/// Matmul FLOPs a DPO step on `pairs` really needs, prompt computed once per pair and the
/// output matrix applied at scored (response) positions only: the policy's forward and its
/// backward to the inputs and the LoRA matrices (no base-weight gradients), plus the
/// reference's forward when it is computed online. Attention's score and value products are
/// counted over the causal (query, key) pairs.
pub fn needed_flops(cfg: &crate::model::config::ModelConfig, pairs: &[PairIds], rank: usize, online: bool) -> f64 {
    let mut per_token = 0.0;
    let mut lora = 0.0;
    for m in cfg.linear_modules() {
        let (i, o) = cfg.linear_shape(m).unwrap_or((0, 0));
        per_token += 2.0 * (i * o) as f64;
        lora += 2.0 * (rank * (i + o)) as f64;
    }
    let (mut tokens, mut scored, mut att) = (0.0, 0.0, 0.0);
    for p in pairs {
        let (lp, lc, lr) = (p.prompt.len() as f64, p.chosen.len() as f64, p.rejected.len() as f64);
        tokens += lp + lc + lr;
        scored += lc + lr;
        att += lp * (lp + 1.0) / 2.0;
        for l in [lc, lr] {
            att += l * lp + l * (l + 1.0) / 2.0;
        }
    }
    let layers = cfg.num_layers as f64;
    let q_width = (cfg.num_heads * cfg.head_dim) as f64;
    let linear = per_token * layers * tokens + 2.0 * (cfg.hidden_size * cfg.vocab_size) as f64 * scored;
    let attention = 4.0 * q_width * att * layers;
    let adapters = lora * layers * tokens;
    // Policy: forward, then dX through every product and dA, dB of the adapters; attention's
    // backward is twice its forward.
    let policy = 2.0 * linear + 3.0 * attention + 4.0 * adapters;
    policy + if online { linear + attention } else { 0.0 }
}

/// The training-step variants: online reference, and precomputed reference when asked.
fn measure_training(
    run: &DpoRun,
    pairs: &[PairIds],
    a: &BenchArgs,
    peak: f64,
    dtype: DType,
    loaded_rss_mib: f64,
) -> Result<Vec<BenchResult>> {
    let params = run.model.cfg.num_params();
    let base_mib = (params * dtype.size_in_bytes()) as f64 / (1024.0 * 1024.0);
    let mut variants: Vec<Variant> = vec![("online reference", 6.0, None)];
    if a.precomputed_ref {
        variants.push((
            "precomputed reference",
            4.0,
            Some(run.reference_logps(pairs, pairs.len())?),
        ));
    }
    let (reference, source) = match a.reference_peak_gflops {
        Some(g) if !(g.is_finite() && g > 0.0) => {
            return Err(Error::Setting {
                key: "--reference_peak_gflops".into(),
                msg: format!("{g} must be a positive number of GFLOP/s"),
            })
        }
        Some(g) => (g * 1e9, "benchmarks/sgemm.py"),
        None => (peak, "lorafold's own 1024³"),
    };
    let mut results = Vec::new();
    for (name, flops_per_param, refs) in variants {
        let (step_s, tokens, products) = measure(run, pairs, refs.as_deref(), a)?;
        let tps = tokens as f64 / step_s;
        let model_flops = flops_per_param * params as f64 * tps;
        let needed = needed_flops(&run.model.cfg, pairs, 8, refs.is_none()) / step_s;
        let peak_rss = peak_rss_mib().unwrap_or(f64::NAN);
        let run_tokens: usize = pairs
            .iter()
            .map(|p| p.prompt.len() + p.chosen.len() + p.rejected.len())
            .sum();
        let per_token_layer = (run_tokens * run.model.cfg.num_layers) as f64;
        results.push(BenchResult {
            variant: name.into(),
            params,
            pairs: pairs.len(),
            tokens_per_step: tokens,
            median_step_s: step_s,
            tokens_per_s: tps,
            model_flops_per_s: model_flops,
            matmul_peak_flops_per_s: peak,
            reference_peak_flops_per_s: reference,
            reference_peak_source: source.into(),
            fraction_of_peak: model_flops / reference,
            peak_rss_mib: peak_rss,
            base_weights_mib: base_mib,
            needed_flops_per_s: needed,
            needed_fraction_of_peak: needed / reference,
            activation_bytes_per_token_layer: (peak_rss - loaded_rss_mib) * 1048576.0 / per_token_layer,
            products,
        });
    }
    Ok(results)
}

fn print_table(
    a: &BenchArgs,
    cfg: &crate::model::config::ModelConfig,
    results: &[BenchResult],
    decode: Option<&DecodeResult>,
    merge: Option<&MergeResult>,
) {
    println!(
        "model: {:?}, {} parameters, {} weights, LoRA r8 all-linear; {} threads",
        cfg.arch,
        cfg.num_params(),
        a.dtype,
        candle_core::utils::get_num_threads()
    );
    print_training(results);
    print_decode_merge(decode, merge);
}

fn print_training(results: &[BenchResult]) {
    let Some(first) = results.first() else { return };
    println!(
        "batch {} pairs, {} real tokens/step; base weights {:.0} MiB",
        first.pairs, first.tokens_per_step, first.base_weights_mib
    );
    println!(
        "measured f32 matmul peak: {:.1} GFLOP/s (gemm crate, 1024³); \"of peak\" is relative to {:.1} GFLOP/s ({})",
        first.matmul_peak_flops_per_s / 1e9,
        first.reference_peak_flops_per_s / 1e9,
        first.reference_peak_source
    );
    println!(
        "{:<22} {:>8} {:>9} {:>10} {:>8} {:>12} {:>8} {:>9} {:>12}",
        "variant",
        "s/step",
        "tokens/s",
        "6P GFLOP/s",
        "of peak",
        "need GFLOP/s",
        "of peak",
        "peak RSS",
        "act B/tok/lyr"
    );
    for r in results {
        println!(
            "{:<22} {:>8.3} {:>9.1} {:>10.1} {:>7.1}% {:>12.1} {:>7.1}% {:>5.0} MiB {:>12.0}",
            r.variant,
            r.median_step_s,
            r.tokens_per_s,
            r.model_flops_per_s / 1e9,
            100.0 * r.fraction_of_peak,
            r.needed_flops_per_s / 1e9,
            100.0 * r.needed_fraction_of_peak,
            r.peak_rss_mib,
            r.activation_bytes_per_token_layer
        );
    }
    for r in results {
        print_products(r);
    }
}

/// Where the median step's time went in matrix products.
fn print_products(r: &BenchResult) {
    let p = &r.products;
    if p.threaded_flops + p.per_thread_flops == 0.0 {
        return;
    }
    let rate = |f: f64, s: f64| f / s.max(1e-12) / 1e9;
    println!(
        "{}: products on all threads {:.1} GFLOP in {:.3} s ({:.1} GFLOP/s, {:.0}% of the step), of them rank ≤ 16 {:.1} GFLOP in {:.3} s ({:.1} GFLOP/s); per-head products {:.1} GFLOP in {:.3} thread-s ({:.1} GFLOP/s per thread)",
        r.variant,
        p.threaded_flops / 1e9,
        p.threaded_s,
        rate(p.threaded_flops, p.threaded_s),
        100.0 * p.threaded_s / r.median_step_s,
        p.skinny_flops / 1e9,
        p.skinny_s,
        rate(p.skinny_flops, p.skinny_s),
        p.per_thread_flops / 1e9,
        p.per_thread_s,
        rate(p.per_thread_flops, p.per_thread_s)
    );
}

fn print_decode_merge(decode: Option<&DecodeResult>, merge: Option<&MergeResult>) {
    if let Some(d) = decode {
        println!(
            "decode (greedy, KV cache, adapter on): prompt {} tokens prefilled in {:.3}s; {} new tokens at {:.1} tokens/s",
            d.prompt_tokens, d.prefill_s, d.new_tokens, d.decode_tokens_per_s
        );
        println!(
            "decode bound: {:.1} tokens/s ({:.0} MiB of weights read per token at {:.1} GB/s measured read bandwidth); reached {:.0}%",
            d.bound_tokens_per_s,
            d.weight_bytes_per_token as f64 / 1048576.0,
            d.read_bandwidth_bytes_per_s / 1e9,
            100.0 * d.decode_tokens_per_s / d.bound_tokens_per_s
        );
    }
    if let Some(m) = merge {
        println!(
            "merge: {:.3}s for {:.0} MiB; copying the model files: {:.3}s ({:.2}x)",
            m.merge_s,
            m.bytes as f64 / (1024.0 * 1024.0),
            m.copy_s,
            m.merge_s / m.copy_s
        );
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DecodeResult {
    pub prompt_tokens: usize,
    pub prefill_s: f64,
    pub new_tokens: usize,
    /// New tokens after the first, per second of decoding (prefill excluded).
    pub decode_tokens_per_s: f64,
    /// Bytes of weights each new token reads (every linear layer with its adapter, and the
    /// output matrix), the machine's measured read bandwidth, and the tokens/s they allow.
    pub weight_bytes_per_token: usize,
    pub read_bandwidth_bytes_per_s: f64,
    pub bound_tokens_per_s: f64,
}

/// Bytes of weights one decoded token reads: the products against every linear layer (with a
/// rank-`rank` f32 adapter) and against the output matrix.
fn decode_weight_bytes(cfg: &crate::model::config::ModelConfig, dtype: DType, rank: usize) -> usize {
    let mut per_layer = 0;
    for m in cfg.linear_modules() {
        let (i, o) = cfg.linear_shape(m).unwrap_or((0, 0));
        per_layer += i * o * dtype.size_in_bytes() + rank * (i + o) * 4;
    }
    cfg.num_layers * per_layer + cfg.vocab_size * cfg.hidden_size * dtype.size_in_bytes()
}

/// The machine's read bandwidth in bytes/s: the best of a few parallel sums over 512 MiB
/// (far beyond the caches), on the threads the matmuls use.
pub fn read_bandwidth() -> f64 {
    use rayon::prelude::*;
    let n = 128 << 20;
    let buf = vec![1.0f32; n];
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        let total: f32 = buf
            .par_chunks(1 << 16)
            .map(|c| {
                let mut acc = [0f32; 16];
                for v in c.chunks_exact(16) {
                    for (a, x) in acc.iter_mut().zip(v) {
                        *a += x;
                    }
                }
                acc.iter().sum::<f32>()
            })
            .sum();
        let dt = t.elapsed().as_secs_f64();
        std::hint::black_box(total);
        best = best.min(dt);
    }
    (n * 4) as f64 / best
}

/// Greedy decoding with the KV cache and the adapter on, from `prompt`.
fn measure_decode(run: &DpoRun, prompt: &[u32], n: usize) -> Result<DecodeResult> {
    use crate::infer::generate::{generate, GenerateOptions};
    let ctx = run.adapter.as_ref().map_or(Fwd::base(), |a| Fwd::eval(a.slot));
    let opts = GenerateOptions {
        max_new_tokens: n,
        stop_tokens: vec![],
        use_cache: true,
        ..Default::default()
    };
    let start = Instant::now();
    let mut first: Option<Instant> = None;
    let g = generate(run.model, &ctx, prompt, &opts, |_| {
        first.get_or_insert_with(Instant::now);
        Ok(())
    })?;
    let end = Instant::now();
    let first = first.unwrap_or(end);
    let decode_s = (end - first).as_secs_f64();
    let weight_bytes = decode_weight_bytes(&run.model.cfg, run.model.dtype(), 8);
    let bandwidth = read_bandwidth();
    Ok(DecodeResult {
        weight_bytes_per_token: weight_bytes,
        read_bandwidth_bytes_per_s: bandwidth,
        bound_tokens_per_s: bandwidth / weight_bytes as f64,
        prompt_tokens: prompt.len(),
        prefill_s: (first - start).as_secs_f64(),
        new_tokens: g.tokens.len(),
        decode_tokens_per_s: g.tokens.len().saturating_sub(1) as f64 / decode_s.max(1e-9),
    })
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct MergeResult {
    pub merge_s: f64,
    /// Time to copy the model's files (config + weights) to a new folder: the floor for a merge.
    pub copy_s: f64,
    pub bytes: u64,
}

/// Save the bench adapter, merge it into the model with `lorafold merge`'s code path, and
/// compare with copying the model files.
fn measure_merge(run: &DpoRun, model_dir: &Path) -> Result<MergeResult> {
    use clap::Parser;
    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        merge: crate::cli::MergeArgs,
    }
    let adapter = run
        .adapter
        .as_ref()
        .ok_or_else(|| Error::Msg("bench needs an adapter".into()))?;
    let work = std::env::temp_dir().join(format!("lorafold-bench-merge-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let (ad_dir, merged, copied) = (work.join("adapter"), work.join("merged"), work.join("copied"));
    adapter.save(&ad_dir, Some(&model_dir.display().to_string()))?;
    let cmd = Cmd::try_parse_from([
        "merge".as_ref(),
        "--model".as_ref(),
        model_dir.as_os_str(),
        "--adapters".as_ref(),
        ad_dir.as_os_str(),
        "--output".as_ref(),
        merged.as_os_str(),
    ])
    .map_err(|e| Error::Msg(e.to_string()))?;
    let plan = cmd.merge.plan()?;
    let t = Instant::now();
    let summary = crate::merge::execute(&plan, false)?;
    let merge_s = t.elapsed().as_secs_f64();
    std::fs::create_dir_all(&copied).map_err(|e| Error::io(&copied, e))?;
    let t = Instant::now();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(model_dir.join(f), copied.join(f)).map_err(|e| Error::io(copied.join(f), e))?;
    }
    let copy_s = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&work);
    Ok(MergeResult {
        merge_s,
        copy_s,
        bytes: summary.bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_preset_is_refused_naming_the_known_ones() {
        assert_eq!(preset("qwen2.5-0.5b").map(|p| p.vocab).ok(), Some(151936));
        let e = preset("qwen-7b").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("--preset") && e.contains("bench, qwen2.5-0.5b"), "{e}");
    }

    /// One layer, hidden 4, 2 heads of 2, intermediate 8, vocab 10; one pair of prompt 2,
    /// chosen 1, rejected 2, rank 1, counted by hand.
    #[test]
    fn needed_flops_count_the_step_by_hand() {
        let v = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4,
            "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 2, "vocab_size": 10, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": true, "max_position_embeddings": 64
        });
        let cfg = crate::model::config::ModelConfig::from_value(&v, Path::new("config.json"));
        let Ok(cfg) = cfg else {
            panic!("config: {:?}", cfg.err())
        };
        let pairs = [PairIds {
            prompt: vec![5, 6],
            chosen: vec![7],
            rejected: vec![8, 9],
            rejected_prompt: None,
        }];
        // Linear weights per token: q, k, v, o 4·4 each, gate, up 8·4, down 4·8 → 160 MACs.
        let tokens = 5.0; // prompt once + both responses
                          // lm_head at the 3 scored positions.
        let linear = 2.0 * 160.0 * tokens + 2.0 * 4.0 * 10.0 * 3.0;
        // Causal (query, key) pairs: prompt 3, chosen 1·2 + 1, rejected 2·2 + 3 → 13.
        let attention = 4.0 * 4.0 * 13.0;
        // Rank-1 adapters: r·(in + out) per layer: q, k, v, o 8 each, gate, up, down 12 each →
        // 68, two FLOPs each.
        let adapters = 2.0 * 68.0 * tokens;
        let online = 3.0 * linear + 4.0 * attention + 4.0 * adapters;
        assert_eq!(needed_flops(&cfg, &pairs, 1, true), online);
        assert_eq!(needed_flops(&cfg, &pairs, 1, false), online - linear - attention);
    }
}
