//! Collating preference pairs into one right-padded batch of [chosen; rejected] sequences, and
//! computing per-sequence response log-probs (TRL's `concatenated_forward` + `get_batch_logps`).

use candle_core::{Device, Tensor};

use crate::error::Result;
use crate::model::linear::Fwd;
use crate::model::{Model, Packing};

/// Token ids of one pair: sequences are `prompt + chosen` and `(rejected_prompt or prompt) + rejected`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PairIds {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected_prompt: Option<Vec<u32>>,
}

impl PairIds {
    /// Real (non-pad) tokens in both sequences.
    pub fn num_tokens(&self) -> usize {
        let rp = self.rejected_prompt.as_ref().unwrap_or(&self.prompt).len();
        self.prompt.len() + self.chosen.len() + rp + self.rejected.len()
    }
}

/// A batch of B pairs whose per-sequence outputs come as 2B rows: 0..B chosen, B..2B rejected.
/// The forward runs on 2B padded sequences, or on B packed rows (see [`Batch::packed`]).
pub struct Batch {
    pub pairs: usize,
    /// [2B, T] u32, right-padded.
    pub input_ids: Tensor,
    /// [2B, T] f32 (1 real, 0 pad); `None` when no row is padded.
    pub attention_mask: Option<Tensor>,
    /// Flat positions (row*T + t) whose logits predict a scored token: [N] u32.
    pub positions: Tensor,
    /// The scored tokens: [N] u32.
    pub targets: Tensor,
    /// [2B, N] f32 selection matrix: row r has 1 at the scored tokens of sequence r.
    pub select: Tensor,
    /// Scored tokens per sequence: [2B] f32.
    pub lengths: Tensor,
    /// Real tokens in the batch (chosen and rejected sequences, prompts counted in each).
    pub num_tokens: usize,
    /// Set when each row packs one pair as prompt + chosen + rejected, the prompt computed once.
    pub packing: Option<Packing>,
}

impl Batch {
    /// The batch for `pairs`: packed with the prompt shared by chosen and rejected when
    /// `share_prompt` is set and every pair scores both responses after one prompt, else as
    /// 2B separate sequences.
    pub fn build(pairs: &[&PairIds], pad_id: u32, device: &Device, share_prompt: bool) -> Result<Batch> {
        let shareable =
            |p: &&PairIds| p.rejected_prompt.as_ref().is_none_or(|rp| rp == &p.prompt) && !p.prompt.is_empty();
        if share_prompt && !pairs.is_empty() && pairs.iter().all(shareable) {
            Self::packed(pairs, pad_id, device)
        } else {
            Self::new(pairs, pad_id, device)
        }
    }

    /// One row per pair: prompt, chosen, rejected. The rejected tokens take positions
    /// prompt.len().. again and attend to the prompt and to each other, never to chosen; the
    /// first rejected token is scored from the last prompt position.
    pub fn packed(pairs: &[&PairIds], pad_id: u32, device: &Device) -> Result<Batch> {
        let b = pairs.len();
        let t = pairs
            .iter()
            .map(|p| p.prompt.len() + p.chosen.len() + p.rejected.len())
            .max()
            .unwrap_or(0)
            .max(1);
        let mut ids = vec![pad_id; b * t];
        let mut positions = vec![0u32; b * t];
        let mut segments = vec![Packing::PAD; b * t];
        let mut scored = Scored::default();
        let mut num_tokens = 0;
        const CHOSEN: u8 = 1;
        const REJECTED: u8 = 2;
        for (r, p) in pairs.iter().enumerate() {
            let (pl, cl, rl) = (p.prompt.len(), p.chosen.len(), p.rejected.len());
            let row = r * t;
            let all = [p.prompt.as_slice(), &p.chosen, &p.rejected].concat();
            ids[row..row + all.len()].copy_from_slice(&all);
            for k in 0..pl + cl {
                positions[row + k] = k as u32;
                segments[row + k] = if k < pl { Packing::SHARED } else { CHOSEN };
            }
            for j in 0..rl {
                positions[row + pl + cl + j] = (pl + j) as u32;
                segments[row + pl + cl + j] = REJECTED;
            }
            num_tokens += 2 * pl + cl + rl;
            for (k, &token) in all.iter().enumerate().take(pl + cl).skip(pl) {
                scored.push(row + k - 1, token, r);
            }
            for j in 0..rl {
                let from = if j == 0 { pl - 1 } else { pl + cl + j - 1 };
                scored.push(row + from, p.rejected[j], b + r);
            }
        }
        let (scored_at, targets, select, lengths) = scored.into_tensors(2 * b, device)?;
        Ok(Batch {
            pairs: b,
            input_ids: Tensor::from_vec(ids, (b, t), device)?,
            attention_mask: None,
            positions: scored_at,
            targets,
            select,
            lengths,
            num_tokens,
            packing: Some(Packing { positions, segments }),
        })
    }

    /// 2B right-padded sequences: rows 0..B prompt + chosen, rows B..2B prompt + rejected.
    pub fn new(pairs: &[&PairIds], pad_id: u32, device: &Device) -> Result<Batch> {
        let b = pairs.len();
        let mut seqs: Vec<(Vec<u32>, usize)> = Vec::with_capacity(2 * b);
        for p in pairs {
            seqs.push(([p.prompt.as_slice(), &p.chosen].concat(), p.prompt.len()));
        }
        for p in pairs {
            let pr = p.rejected_prompt.as_ref().unwrap_or(&p.prompt);
            seqs.push(([pr.as_slice(), &p.rejected].concat(), pr.len()));
        }
        let t = seqs.iter().map(|(s, _)| s.len()).max().unwrap_or(0).max(1);
        let rows = seqs.len();
        let mut ids = vec![pad_id; rows * t];
        let mut mask = vec![0f32; rows * t];
        let mut scored = Scored::default();
        let mut padded = false;
        let mut num_tokens = 0;
        for (r, (s, plen)) in seqs.iter().enumerate() {
            ids[r * t..r * t + s.len()].copy_from_slice(s);
            mask[r * t..r * t + s.len()].iter_mut().for_each(|m| *m = 1.0);
            padded |= s.len() < t;
            num_tokens += s.len();
            // The token at position i is predicted by the logits at i-1.
            for (i, &token) in s.iter().enumerate().skip((*plen).max(1)) {
                scored.push(r * t + i - 1, token, r);
            }
        }
        let (positions, targets, select, lengths) = scored.into_tensors(rows, device)?;
        Ok(Batch {
            pairs: b,
            input_ids: Tensor::from_vec(ids, (rows, t), device)?,
            attention_mask: if padded {
                Some(Tensor::from_vec(mask, (rows, t), device)?)
            } else {
                None
            },
            positions,
            targets,
            select,
            lengths,
            num_tokens,
            packing: None,
        })
    }
}

/// The scored tokens of a batch, as they are laid out: for each, the flat position whose logits
/// predict it, the token, and the sequence (0..2B) it belongs to.
#[derive(Default)]
struct Scored {
    positions: Vec<u32>,
    targets: Vec<u32>,
    owner: Vec<usize>,
}

impl Scored {
    fn push(&mut self, from: usize, token: u32, seq: usize) {
        self.positions.push(from as u32);
        self.targets.push(token);
        self.owner.push(seq);
    }

    /// Positions [N], targets [N], the [seqs, N] selection matrix and the scored tokens per
    /// sequence [seqs].
    fn into_tensors(self, seqs: usize, device: &Device) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
        let n = self.positions.len();
        let mut select = vec![0f32; seqs * n];
        let mut lengths = vec![0f32; seqs];
        for (k, &r) in self.owner.iter().enumerate() {
            select[r * n + k] = 1.0;
            lengths[r] += 1.0;
        }
        Ok((
            Tensor::from_vec(self.positions, n, device)?,
            Tensor::from_vec(self.targets, n, device)?,
            Tensor::from_vec(select, (seqs, n), device)?,
            Tensor::from_vec(lengths, seqs, device)?,
        ))
    }
}

/// Per-sequence outputs of one forward pass over a batch.
pub struct SeqLogps {
    /// Summed response log-probs [2B] (f32; carries the graph when adapters are trainable).
    pub logps: Tensor,
    /// Sum of all logits at scored positions of the chosen / rejected rows (for TRL's
    /// logits/chosen and logits/rejected means) and the number of (position, vocab) entries.
    pub logits_sum: [f64; 2],
    pub logits_count: [f64; 2],
}

impl SeqLogps {
    pub fn chosen(&self, b: usize) -> Result<Tensor> {
        Ok(self.logps.narrow(0, 0, b)?)
    }
    pub fn rejected(&self, b: usize) -> Result<Tensor> {
        Ok(self.logps.narrow(0, b, b)?)
    }
}

/// Forward the batch with `ctx` and sum log p(token | prefix) over each sequence's response.
/// The vocabulary projection is applied only at scored positions.
pub fn sequence_logps(model: &Model, batch: &Batch, ctx: &Fwd) -> Result<SeqLogps> {
    let hidden = match &batch.packing {
        Some(p) => model.forward_hidden_packed(&batch.input_ids, p, ctx)?,
        None => model.forward_hidden(&batch.input_ids, batch.attention_mask.as_ref(), ctx)?,
    };
    let (tok, per_pos) = model.scored_logps(&hidden, &batch.positions, &batch.targets, ctx)?;
    let logps = batch.select.matmul(&tok.unsqueeze(1)?)?.squeeze(1)?;
    let per_seq = batch
        .select
        .matmul(&per_pos.unsqueeze(1)?)?
        .squeeze(1)?
        .to_vec1::<f32>()?;
    let lens = batch.lengths.to_vec1::<f32>()?;
    let v = model.cfg.vocab_size as f64;
    let b = batch.pairs;
    let half = |from: usize| -> (f64, f64) {
        let s: f64 = per_seq[from..from + b].iter().map(|&x| x as f64).sum();
        let c: f64 = lens[from..from + b].iter().map(|&x| x as f64 * v).sum();
        (s, c)
    };
    let (cs, cc) = half(0);
    let (rs, rc) = half(b);
    Ok(SeqLogps {
        logps,
        logits_sum: [cs, rs],
        logits_count: [cc, rc],
    })
}
