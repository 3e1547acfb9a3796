//! Choosing the next token: transformers' logits processors (repetition penalty, temperature,
//! top-k, top-p, with its semantics and order) and a seeded sampler.
//!
//! Order, as `generate` applies them: repetition penalty (also when greedy), then, only when
//! sampling, temperature, top-k and top-p. Filtered-out tokens get -inf.

use crate::error::{Error, Result};
use crate::rng::Rng;

/// How the next token is chosen. `temperature` 0 is greedy decoding.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0: greedy (argmax). Otherwise logits are divided by it before sampling.
    pub temperature: f64,
    /// Keep the k most likely tokens (ties with the k-th kept); 0: off.
    pub top_k: usize,
    /// Keep the most likely tokens whose probabilities sum to at least p; 1: off.
    pub top_p: f64,
    /// > 1 discourages tokens already in the prompt or the answer; 1: off.
    pub repetition_penalty: f64,
    /// Seed of the sampler's random stream.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams::greedy()
    }
}

impl SamplingParams {
    pub fn greedy() -> SamplingParams {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// Reject values transformers rejects too.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, msg: String| Err(Error::Setting { key: key.into(), msg });
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(
                "temperature",
                format!("must be >= 0 (0: greedy), got {}", self.temperature),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("must be in (0, 1], got {}", self.top_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(
                "repetition_penalty",
                format!("must be > 0, got {}", self.repetition_penalty),
            );
        }
        Ok(())
    }
}

/// transformers' `RepetitionPenaltyLogitsProcessor`: for every distinct token of `context`
/// (prompt + generated so far), a positive logit is divided by `penalty`, a negative one
/// multiplied by it. Ids outside the vocabulary are ignored.
pub fn apply_repetition_penalty(logits: &mut [f32], context: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = vec![false; logits.len()];
    for &id in context {
        let i = id as usize;
        if i < logits.len() && !seen[i] {
            seen[i] = true;
            let s = logits[i];
            logits[i] = if s < 0.0 { s * penalty } else { s / penalty };
        }
    }
}

/// transformers' `TemperatureLogitsWarper`: logits / temperature.
pub fn apply_temperature(logits: &mut [f32], temperature: f32) {
    if temperature == 1.0 {
        return;
    }
    logits.iter_mut().for_each(|x| *x /= temperature);
}

/// transformers' `TopKLogitsWarper`: tokens below the k-th largest logit get -inf (ties with it
/// stay). `k` 0 or at least the vocabulary: no-op.
pub fn apply_top_k(logits: &mut [f32], k: usize) {
    if k == 0 || k >= logits.len() {
        return;
    }
    let mut sorted = logits.to_vec();
    sorted.sort_unstable_by(|a, b| b.total_cmp(a));
    let kth = sorted[k - 1];
    logits
        .iter_mut()
        .filter(|x| **x < kth)
        .for_each(|x| *x = f32::NEG_INFINITY);
}

/// transformers' `TopPLogitsWarper`: sort ascending, drop the tokens whose cumulative probability
/// is at most 1 - p (the most likely token always stays). Equal logits keep index order.
pub fn apply_top_p(logits: &mut [f32], p: f64) {
    if p >= 1.0 || logits.is_empty() {
        return;
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[a].total_cmp(&logits[b]));
    let max = logits[order[order.len() - 1]];
    let exps: Vec<f32> = order.iter().map(|&i| (logits[i] - max).exp()).collect();
    let total: f32 = exps.iter().sum();
    let threshold = (1.0 - p) as f32;
    let mut cum = 0f32;
    let last = order.len() - 1;
    let mut drop = Vec::new();
    for (rank, (&i, e)) in order.iter().zip(&exps).enumerate() {
        cum += e / total;
        if rank < last && cum <= threshold {
            drop.push(i);
        }
    }
    for i in drop {
        logits[i] = f32::NEG_INFINITY;
    }
}

/// Index of the largest logit (the first of equal ones, as `torch.argmax`). NaN is an error.
pub fn argmax(logits: &[f32]) -> Result<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &x) in logits.iter().enumerate() {
        if x.is_nan() {
            return Err(Error::NanLogit { token: i });
        }
        if best.is_none_or(|(_, b)| x > b) {
            best = Some((i, x));
        }
    }
    best.map(|(i, _)| i as u32)
        .ok_or_else(|| Error::Msg("empty logits".into())) // internal invariant: vocab_size > 0
}

/// Picks next tokens with [`SamplingParams`]; the random stream is seeded, so a run repeats.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        let rng = Rng::stream(params.seed, 0x5A3D_1E00);
        Sampler { params, rng }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Apply the processors in `generate`'s order: repetition penalty; then, when sampling,
    /// temperature, top-k, top-p.
    pub fn process(&self, logits: &mut [f32], context: &[u32]) {
        let p = &self.params;
        apply_repetition_penalty(logits, context, p.repetition_penalty as f32);
        if !p.is_greedy() {
            apply_temperature(logits, p.temperature as f32);
            apply_top_k(logits, p.top_k);
            apply_top_p(logits, p.top_p);
        }
    }

    /// The next token after `context` (prompt + generated), from the logits of the last position.
    pub fn next_token(&mut self, mut logits: Vec<f32>, context: &[u32]) -> Result<u32> {
        self.process(&mut logits, context);
        if self.params.is_greedy() {
            return argmax(&logits);
        }
        let best = argmax(&logits)?;
        let max = logits[best as usize];
        let probs: Vec<f64> = logits.iter().map(|&x| ((x - max) as f64).exp()).collect();
        let total: f64 = probs.iter().sum();
        let mut u = self.rng.next_f64() * total;
        for (i, p) in probs.iter().enumerate() {
            if *p > 0.0 {
                if u < *p {
                    return Ok(i as u32);
                }
                u -= p;
            }
        }
        // Rounding left u at the very end: the last token with mass.
        Ok(probs.iter().rposition(|p| *p > 0.0).unwrap_or(best as usize) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative() {
        let mut l = vec![2.0, -1.0, 0.5, 3.0];
        apply_repetition_penalty(&mut l, &[0, 1, 1, 9], 2.0);
        assert_eq!(l, vec![1.0, -2.0, 0.5, 3.0]);
    }

    #[test]
    fn top_k_keeps_ties() {
        let mut l = vec![1.0, 3.0, 2.0, 2.0, 0.0];
        apply_top_k(&mut l, 2);
        let inf = f32::NEG_INFINITY;
        assert_eq!(l, vec![inf, 3.0, 2.0, 2.0, inf]);
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // probs ~ [0.665, 0.245, 0.090]
        let mut l = vec![2.0, 1.0, 0.0];
        apply_top_p(&mut l, 0.7);
        assert_eq!(l, vec![2.0, 1.0, f32::NEG_INFINITY]);
        let mut l = vec![2.0, 1.0, 0.0];
        apply_top_p(&mut l, 0.5);
        assert_eq!(l, vec![2.0, f32::NEG_INFINITY, f32::NEG_INFINITY]);
    }

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0]).unwrap(), 1);
        assert!(argmax(&[1.0, f32::NAN]).is_err());
    }
}
