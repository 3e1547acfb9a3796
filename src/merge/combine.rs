//! Combining several LoRA adapters into one, with the semantics of PEFT 0.21's
//! `LoraModel.add_weighted_adapter`.
//!
//! Per module, with adapter weights `w_i` and LoRA scales `s_i`:
//!
//! * `cat`: `A' = [w_1 s_1 A_1; w_2 s_2 A_2; …]`, `B' = [B_1, B_2, …]`, rank `Σ r_i`. Exact:
//!   `B'A' = Σ w_i s_i B_i A_i`.
//! * `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`: the rule is applied to the
//!   A matrices and to the B matrices *separately*, with weights `sign(w_i s_i)·√|w_i s_i|` for A
//!   and `√|w_i s_i|` for B. Needs equal ranks. (An approximation of the weighted sum: cross terms
//!   `B_i A_j` appear.)
//! * `svd`, `ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd`: the rule is
//!   applied to the delta weights `ΔW_i = s_i B_i A_i` with weights `w_i`, and the result is
//!   truncated to rank `--svd_rank` (default: the largest adapter rank) by SVD:
//!   `B' = U_k S_k`, `A' = V_kᵀ`, optionally clamped at a quantile (`--svd_clamp`).
//!
//! The rules (PEFT's `merge_utils`): task arithmetic `Σ w_i t_i`; magnitude pruning keeps the
//! `⌊density·n⌋` largest |values| of each task tensor; DARE keeps each value with probability
//! `density` and divides the kept ones by `density`; TIES elects a sign per element (the sign of
//! `Σ t_i`, or of `Σ sign(t_i)` with `--majority_sign_method frequency`; zero counts as positive)
//! and averages the weighted values that agree with it.
//!
//! The combined adapter has `lora_alpha = r`, so its scale is 1; unlike PEFT 0.21 it never
//! inherits `use_rslora` from the first adapter (that would scale it by `√r`; fixed upstream in
//! PEFT PR #3449).
//!
//! A module that only some adapters adapt is combined from those adapters. When one adapter is
//! given, every combination acts as `linear`, as in PEFT.

use std::collections::{BTreeMap, BTreeSet};

use clap::ValueEnum;

use super::adapter::{LoadedAdapter, LoraPair};
use crate::error::{Error, Result};
use crate::linalg::mat::Mat;
use crate::linalg::svd;
use crate::lora::config::{LoraConfig, TargetModules};
use crate::rng::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Combination {
    Linear,
    Cat,
    Svd,
    Ties,
    #[value(name = "ties_svd", alias = "ties-svd")]
    TiesSvd,
    #[value(name = "dare_linear", alias = "dare-linear")]
    DareLinear,
    #[value(name = "dare_ties", alias = "dare-ties")]
    DareTies,
    #[value(name = "dare_linear_svd", alias = "dare-linear-svd")]
    DareLinearSvd,
    #[value(name = "dare_ties_svd", alias = "dare-ties-svd")]
    DareTiesSvd,
    #[value(name = "magnitude_prune", alias = "magnitude-prune")]
    MagnitudePrune,
    #[value(name = "magnitude_prune_svd", alias = "magnitude-prune-svd")]
    MagnitudePruneSvd,
}

/// How task tensors are merged (PEFT's `merge_utils` functions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    TaskArithmetic,
    Ties,
    DareLinear,
    DareTies,
    MagnitudePrune,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SignMethod {
    /// Sign of the sum of the (pruned) values.
    Total,
    /// Sign that most adapters have.
    Frequency,
}

impl Combination {
    pub fn name(self) -> &'static str {
        match self {
            Combination::Linear => "linear",
            Combination::Cat => "cat",
            Combination::Svd => "svd",
            Combination::Ties => "ties",
            Combination::TiesSvd => "ties_svd",
            Combination::DareLinear => "dare_linear",
            Combination::DareTies => "dare_ties",
            Combination::DareLinearSvd => "dare_linear_svd",
            Combination::DareTiesSvd => "dare_ties_svd",
            Combination::MagnitudePrune => "magnitude_prune",
            Combination::MagnitudePruneSvd => "magnitude_prune_svd",
        }
    }

    /// The merge rule; `None` for `cat`.
    pub fn rule(self) -> Option<Rule> {
        use Combination::*;
        Some(match self {
            Cat => return None,
            Linear | Svd => Rule::TaskArithmetic,
            Ties | TiesSvd => Rule::Ties,
            DareLinear | DareLinearSvd => Rule::DareLinear,
            DareTies | DareTiesSvd => Rule::DareTies,
            MagnitudePrune | MagnitudePruneSvd => Rule::MagnitudePrune,
        })
    }

    /// Computed on delta weights and truncated by SVD.
    pub fn on_delta(self) -> bool {
        use Combination::*;
        matches!(self, Svd | TiesSvd | DareLinearSvd | DareTiesSvd | MagnitudePruneSvd)
    }

    pub fn needs_density(self) -> bool {
        self.rule().is_some_and(|r| r != Rule::TaskArithmetic)
    }
}

#[derive(Debug, Clone)]
pub struct CombineOptions {
    pub combination: Combination,
    pub density: Option<f64>,
    pub sign_method: SignMethod,
    pub svd_rank: Option<usize>,
    pub svd_clamp: Option<f64>,
    pub seed: u64,
}

/// A combined adapter: per module `(A [r, in], B [out, r])`, scale 1.
#[derive(Debug, Clone)]
pub struct Combined {
    pub rank: usize,
    pub modules: BTreeMap<String, (Mat, Mat)>,
    pub config: LoraConfig,
    /// The combination actually used (`linear` for a single adapter).
    pub combination: Combination,
}

/// Combine `adapters` with `weights` (one per adapter). `on_module` is called once per module.
pub fn combine(
    adapters: &[LoadedAdapter],
    weights: &[f64],
    opts: &CombineOptions,
    mut on_module: impl FnMut(&str),
) -> Result<Combined> {
    if adapters.is_empty() || adapters.len() != weights.len() {
        return Err(setting(
            "--weights",
            format!("has {} values for {} adapters", weights.len(), adapters.len()),
        ));
    }
    refuse_uncombinable(adapters)?;
    let comb = if adapters.len() == 1 {
        Combination::Linear
    } else {
        opts.combination
    };
    let density = checked_density(comb, opts.density)?;
    let new_rank = combined_rank(adapters, comb, opts)?;
    if let Some(q) = opts.svd_clamp {
        if !(0.0..=1.0).contains(&q) {
            return Err(setting("--svd_clamp", format!("{q} is outside [0, 1]")));
        }
    }

    let paths: BTreeSet<&String> = adapters.iter().flat_map(|a| a.modules.keys()).collect();
    let mut modules = BTreeMap::new();
    for path in paths {
        on_module(path);
        let present: Vec<(usize, &LoraPair)> = adapters
            .iter()
            .enumerate()
            .filter_map(|(i, a)| a.modules.get(path).map(|p| (i, p)))
            .collect();
        let (a, b) = if comb == Combination::Cat {
            cat(&present, weights, new_rank)
        } else if comb.on_delta() {
            via_delta(path, &present, weights, comb, density, opts, new_rank)?
        } else {
            on_factors(path, adapters, &present, weights, comb, density, opts, new_rank)?
        };
        modules.insert(path.clone(), (a, b));
    }
    Ok(Combined {
        rank: new_rank,
        config: combined_config(adapters, new_rank, modules.keys()),
        modules,
        combination: comb,
    })
}

/// Adapters whose weights are more than LoRA pairs have no weighted combination: DoRA (its
/// magnitudes), unconverted PiSSA / OLoRA (relative to a residual base) and fully trained
/// modules.
fn refuse_uncombinable(adapters: &[LoadedAdapter]) -> Result<()> {
    if let Some(d) = adapters
        .iter()
        .find(|a| crate::lora::init::LoraInit::principal(a.config.init_lora_weights.as_ref()).is_some())
    {
        return Err(setting(
            "--adapters",
            format!(
                "{} is a PiSSA/OLoRA adapter saved unconverted (relative to a residual base); save it \
                 converted (lorafold writes it so by default) before combining",
                d.name()
            ),
        ));
    }
    if let Some(d) = adapters.iter().find(|a| !a.whole.is_empty() || a.token_rows.is_some()) {
        return Err(setting(
            "--adapters",
            format!(
                "{} trains embed_tokens / lm_head in full (modules_to_save or trainable tokens); such adapters \
                 merge on their own, not in a weighted combination",
                d.name()
            ),
        ));
    }
    if let Some(d) = adapters.iter().find(|a| a.config.use_dora) {
        return Err(setting(
            "--adapters",
            format!(
                "{} is a DoRA adapter; its magnitude vectors have no weighted combination (PEFT's \
                 add_weighted_adapter ignores them). Merge it on its own, without --combination or --weights",
                d.name()
            ),
        ));
    }
    Ok(())
}

/// A bad command-line value of the merge.
fn setting(key: &str, msg: String) -> Error {
    Error::Setting { key: key.into(), msg }
}

/// The density `comb` uses: `--density`, required (0 < d ≤ 1) by the pruning combinations, 1
/// for the others.
fn checked_density(comb: Combination, density: Option<f64>) -> Result<f64> {
    match (comb.needs_density(), density) {
        (true, None) => Err(setting(
            "--combination",
            format!("{} needs --density (0 < d ≤ 1)", comb.name()),
        )),
        (true, Some(d)) if !(d > 0.0 && d <= 1.0) => Err(setting("--density", format!("{d} is outside (0, 1]"))),
        (_, d) => Ok(d.unwrap_or(1.0)),
    }
}

/// The rank of the combined adapter: the sum of the ranks for `cat`, `--svd_rank` (default: the
/// largest rank) on delta weights, the common rank otherwise.
fn combined_rank(adapters: &[LoadedAdapter], comb: Combination, opts: &CombineOptions) -> Result<usize> {
    let ranks: Vec<usize> = adapters.iter().map(LoadedAdapter::max_rank).collect();
    let new_rank = if comb == Combination::Cat {
        ranks.iter().sum()
    } else if comb.on_delta() {
        opts.svd_rank
            .unwrap_or_else(|| ranks.iter().copied().max().unwrap_or(1))
    } else {
        if ranks.iter().any(|&r| r != ranks[0]) {
            return Err(setting(
                "--combination",
                format!(
                    "{} needs adapters of equal rank, got r = {}; use cat or svd instead",
                    comb.name(),
                    ranks.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        ranks[0]
    };
    if new_rank == 0 {
        return Err(setting("--svd_rank", "must be positive".into()));
    }
    Ok(new_rank)
}

/// The adapter config of the combination: the first adapter's, at rank `new_rank` with
/// alpha = r, no per-module patterns, and the union of the targets.
fn combined_config<'a>(
    adapters: &[LoadedAdapter],
    new_rank: usize,
    paths: impl Iterator<Item = &'a String>,
) -> LoraConfig {
    let mut config = adapters[0].config.clone();
    config.r = new_rank;
    config.lora_alpha = new_rank as f64;
    config.use_rslora = false;
    config.rank_pattern.clear();
    config.alpha_pattern.clear();
    config.inference_mode = true;
    config.target_modules = Some(combined_targets(adapters, paths));
    config
}

/// `target_modules` of the combined adapter, as PEFT builds it: the union of the lists, or the
/// regexes joined with `|`. Mixed kinds (PEFT refuses them) and `all-linear` become the explicit
/// list of adapted module paths.
fn combined_targets<'a>(adapters: &[LoadedAdapter], paths: impl Iterator<Item = &'a String>) -> TargetModules {
    let is_all = |p: &str| p.eq_ignore_ascii_case("all-linear") || p.eq_ignore_ascii_case("all_linear") || p == "ALL";
    let mut lists = BTreeSet::new();
    let mut patterns = Vec::new();
    let mut explicit = false;
    for a in adapters {
        match &a.config.target_modules {
            Some(TargetModules::Modules(l)) if !l.iter().any(|m| is_all(m)) => lists.extend(l.iter().cloned()),
            Some(TargetModules::Pattern(p)) if !is_all(p) => patterns.push(format!("({p})")),
            _ => explicit = true,
        }
    }
    if !explicit && patterns.is_empty() {
        return TargetModules::Modules(lists.into_iter().collect());
    }
    if !explicit && lists.is_empty() {
        return TargetModules::Pattern(patterns.join("|"));
    }
    TargetModules::Modules(paths.cloned().collect())
}

fn cat(present: &[(usize, &LoraPair)], weights: &[f64], new_rank: usize) -> (Mat, Mat) {
    let (out, inp) = (present[0].1.b.rows, present[0].1.a.cols);
    let a_parts: Vec<Mat> = present
        .iter()
        .map(|(i, p)| p.a.scaled(weights[*i] as f32).scaled(p.scale as f32))
        .collect();
    let b_parts: Vec<Mat> = present.iter().map(|(_, p)| p.b.clone()).collect();
    let a = Mat::vcat(&a_parts, inp).pad_rows(new_rank);
    let b = Mat::hcat(&b_parts, out).pad_cols(new_rank);
    (a, b)
}

#[allow(clippy::too_many_arguments)]
fn on_factors(
    path: &str,
    adapters: &[LoadedAdapter],
    present: &[(usize, &LoraPair)],
    weights: &[f64],
    comb: Combination,
    density: f64,
    opts: &CombineOptions,
    new_rank: usize,
) -> Result<(Mat, Mat)> {
    let r = present[0].1.rank();
    if let Some((i, p)) = present.iter().find(|(_, p)| p.rank() != r) {
        return Err(Error::CombineRank {
            combination: comb.name(),
            module: path.into(),
            rank: p.rank(),
            adapter: adapters[*i].name(),
            other_rank: r,
            other: adapters[present[0].0].name(),
        });
    }
    let rule = comb.rule().unwrap_or(Rule::TaskArithmetic);
    let mut wa = Vec::new();
    let mut wb = Vec::new();
    for (i, p) in present {
        let ws = weights[*i] * p.scale;
        let root = ws.abs().sqrt();
        wa.push((if ws >= 0.0 { root } else { -root }) as f32);
        wb.push(root as f32);
    }
    let ids: Vec<usize> = present.iter().map(|(i, _)| *i).collect();
    let a_t: Vec<&[f32]> = present.iter().map(|(_, p)| p.a.data.as_slice()).collect();
    let b_t: Vec<&[f32]> = present.iter().map(|(_, p)| p.b.data.as_slice()).collect();
    let sa = StreamKey::new(opts.seed, path, 'A', &ids);
    let sb = StreamKey::new(opts.seed, path, 'B', &ids);
    let a = apply_rule(rule, &a_t, &wa, density, opts.sign_method, &sa);
    let b = apply_rule(rule, &b_t, &wb, density, opts.sign_method, &sb);
    let (out, inp) = (present[0].1.b.rows, present[0].1.a.cols);
    let a = Mat {
        rows: r,
        cols: inp,
        data: a,
    }
    .pad_rows(new_rank);
    let b = Mat {
        rows: out,
        cols: r,
        data: b,
    }
    .pad_cols(new_rank);
    Ok((a, b))
}

fn via_delta(
    path: &str,
    present: &[(usize, &LoraPair)],
    weights: &[f64],
    comb: Combination,
    density: f64,
    opts: &CombineOptions,
    new_rank: usize,
) -> Result<(Mat, Mat)> {
    let (out, inp) = (present[0].1.b.rows, present[0].1.a.cols);
    if new_rank > out.min(inp) {
        return Err(Error::SvdRank {
            rank: new_rank,
            max: out.min(inp),
            module: path.into(),
        });
    }
    let rule = comb.rule().unwrap_or(Rule::TaskArithmetic);
    let total_rank: usize = present.iter().map(|(_, p)| p.rank()).sum();
    let mut t = if rule == Rule::TaskArithmetic && out.min(inp) > svd::EXACT_MAX && total_rank <= out.min(inp) {
        // Σ w_i s_i B_i A_i is a product of thin factors: decompose it without forming it.
        let b_parts: Vec<Mat> = present
            .iter()
            .map(|(i, p)| p.b.scaled((weights[*i] * p.scale) as f32))
            .collect();
        let a_parts: Vec<Mat> = present.iter().map(|(_, p)| p.a.clone()).collect();
        svd::truncated_svd_of_product(&Mat::hcat(&b_parts, out), &Mat::vcat(&a_parts, inp), new_rank)?
    } else {
        let deltas: Vec<Mat> = present
            .iter()
            .map(|(_, p)| Ok(p.b.matmul(&p.a)?.scaled(p.scale as f32)))
            .collect::<Result<_>>()?;
        let w: Vec<f32> = present.iter().map(|(i, _)| weights[*i] as f32).collect();
        let ids: Vec<usize> = present.iter().map(|(i, _)| *i).collect();
        let tensors: Vec<&[f32]> = deltas.iter().map(|d| d.data.as_slice()).collect();
        let key = StreamKey::new(opts.seed, path, 'D', &ids);
        let combined = Mat {
            rows: out,
            cols: inp,
            data: apply_rule(rule, &tensors, &w, density, opts.sign_method, &key),
        };
        svd::truncated_svd(&combined, new_rank).map_err(|e| Error::Svd {
            module: path.into(),
            error: Box::new(e),
        })?
    };
    if t.residual > 1e-6 {
        eprintln!(
            "warning: SVD of module {path} stopped at relative residual {:.1e} after {} iterations",
            t.residual, t.iterations
        );
    }
    if let Some(q) = opts.svd_clamp {
        clamp_quantile(&mut t.us, &mut t.vt, q);
    }
    Ok((t.vt, t.us))
}

/// PEFT's `svd_clamp`: clamp both factors to ±(the `q`-quantile of all their values), with
/// torch.quantile's linear interpolation.
fn clamp_quantile(us: &mut Mat, vt: &mut Mat, q: f64) {
    let mut all: Vec<f32> = us.data.iter().chain(&vt.data).copied().collect();
    if all.is_empty() {
        return;
    }
    all.sort_by(|a, b| a.total_cmp(b));
    let pos = q * (all.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(all.len() - 1);
    let frac = (pos - lo as f64) as f32;
    let hi_val = all[lo] + frac * (all[hi] - all[lo]);
    let lo_val = -hi_val;
    for x in us.data.iter_mut().chain(vt.data.iter_mut()) {
        *x = x.clamp(lo_val.min(hi_val), hi_val.max(lo_val));
    }
}

/// Identifies the random stream of one DARE mask, so masks depend on the seed, the module, the
/// half (A, B or delta) and the adapter, and not on the order of work.
struct StreamKey {
    seed: u64,
    base: u64,
    /// Adapter index of each task tensor.
    ids: Vec<usize>,
}

impl StreamKey {
    fn new(seed: u64, path: &str, half: char, ids: &[usize]) -> StreamKey {
        // FNV-1a over the module path and the half.
        let mut h = crate::util::Fnv1a::default();
        h.eat_bytes(path.as_bytes());
        h.eat_bytes(&[b'|', half as u8]);
        StreamKey {
            seed,
            base: h.finish(),
            ids: ids.to_vec(),
        }
    }

    /// The stream for task tensor `pos`.
    fn rng(&self, pos: usize) -> Rng {
        let adapter = self.ids.get(pos).copied().unwrap_or(pos) as u64 + 1;
        Rng::stream(self.seed, self.base ^ adapter.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }
}

/// Apply a rule to task tensors `t_i` (same length) with weights `w_i`.
fn apply_rule(
    rule: Rule,
    tensors: &[&[f32]],
    weights: &[f32],
    density: f64,
    sign: SignMethod,
    key: &StreamKey,
) -> Vec<f32> {
    let pruned: Vec<Vec<f32>> = match rule {
        Rule::TaskArithmetic => tensors.iter().map(|t| t.to_vec()).collect(),
        Rule::Ties | Rule::MagnitudePrune => tensors.iter().map(|t| magnitude_prune(t, density)).collect(),
        Rule::DareLinear | Rule::DareTies => tensors
            .iter()
            .enumerate()
            .map(|(i, t)| random_prune(t, density, &mut key.rng(i)))
            .collect(),
    };
    let n = tensors.first().map(|t| t.len()).unwrap_or(0);
    match rule {
        Rule::TaskArithmetic | Rule::MagnitudePrune | Rule::DareLinear => {
            let mut out = vec![0f32; n];
            for (t, &w) in pruned.iter().zip(weights) {
                for (o, x) in out.iter_mut().zip(t) {
                    *o += x * w;
                }
            }
            out
        }
        Rule::Ties | Rule::DareTies => {
            let mut out = vec![0f32; n];
            for (j, o) in out.iter_mut().enumerate() {
                let elected = match sign {
                    SignMethod::Total => pruned.iter().map(|t| t[j]).sum::<f32>(),
                    SignMethod::Frequency => pruned.iter().map(|t| sign_of(t[j])).sum::<f32>(),
                };
                let elected = if elected >= 0.0 { 1.0 } else { -1.0 };
                let mut sum = 0f32;
                let mut count = 0f32;
                for (t, &w) in pruned.iter().zip(weights) {
                    if sign_of(t[j]) == elected {
                        sum += t[j] * w;
                        count += 1.0;
                    }
                }
                *o = sum / count.max(1.0);
            }
            out
        }
    }
}

fn sign_of(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// Keep the `⌊density·n⌋` largest |values| (ties broken by position), zero the rest. A density of
/// 1 or more keeps everything.
pub fn magnitude_prune(t: &[f32], density: f64) -> Vec<f32> {
    if density >= 1.0 {
        return t.to_vec();
    }
    let k = (density * t.len() as f64) as usize;
    let mut out = vec![0f32; t.len()];
    if k == 0 {
        return out;
    }
    let mut idx: Vec<usize> = (0..t.len()).collect();
    let cmp = |a: &usize, b: &usize| t[*b].abs().total_cmp(&t[*a].abs()).then(a.cmp(b));
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
    }
    for &i in &idx[..k] {
        out[i] = t[i];
    }
    out
}

/// DARE: keep each value with probability `density`, divide the kept ones by `density`.
pub fn random_prune(t: &[f32], density: f64, rng: &mut Rng) -> Vec<f32> {
    if density >= 1.0 {
        return t.to_vec();
    }
    let d = density as f32;
    t.iter()
        .map(|&x| if rng.next_f64() < density { x / d } else { 0.0 })
        .collect()
}
