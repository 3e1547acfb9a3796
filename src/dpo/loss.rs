//! DPO-family preference losses, as TRL 1.16 defines them.
//!
//! Inputs are per-sequence SUMS of response-token log-probs ([B] tensors); losses that TRL
//! computes on per-token means (ipo, sigmoid_norm, simpo, orpo) divide by the scored token
//! counts. With Δ = (logp_c − ref_c) − (logp_r − ref_r) and z = βΔ:
//!
//! | kind | per-pair loss |
//! |---|---|
//! | sigmoid | −(1−ε)·logσ(z) − ε·logσ(−z) (cDPO; ε = 0 is plain DPO) |
//! | hinge | max(0, 1 − z) |
//! | ipo | (Δ̄ − 1/(2β))², Δ̄ on per-token means |
//! | robust | (−(1−ε)·logσ(z) + ε·logσ(−z)) / (1 − 2ε) |
//! | exo_pair | σ(z)(logσ(z) − log(1−ε)) + σ(−z)(logσ(−z) − log ε) |
//! | nca_pair | −logσ(r_c) − ½logσ(−r_c) − ½logσ(−r_r), r = β(logp − ref) |
//! | bco_pair | −logσ(r_c) − logσ(−r_r) |
//! | sppo_hard | (lr_c − 1/(2β))² + (lr_r + 1/(2β))², lr = logp − ref |
//! | aot | cDPO on sort(logp_c − logp_r) − sort(ref_c − ref_r) |
//! | aot_pair | cDPO on sort(lr_c) − sort(lr_r) (TRL 1.16 calls it "aot_unpaired") |
//! | apo_zero | 1 − σ(r_c) + σ(r_r) |
//! | apo_down | σ(r_c) + 1 − σ(z) |
//! | discopop | −logσ(z)·(1 − σ(z/τ)) + e^(−z)·σ(z/τ) |
//! | sigmoid_norm | −logσ(βΔ̄), Δ̄ on per-token means |
//! | simpo | cDPO on β(m_c − m_r) − γ, m = per-token mean logp (no reference) |
//! | orpo | NLL − β·logσ(log odds(m_c) − log odds(m_r)), odds(m) = e^m / (1 − e^m) |
//! | sft | NLL = −Σ logp_c / Σ len_c (mean over all chosen tokens of the batch) |
//!
//! The batch loss is Σ_k w_k · mean_b(loss_k) (+ rpo_alpha · NLL). Rewards are what TRL logs:
//! β(logp − ref) for reference-based losses (DPOTrainer), β·mean logp for simpo and orpo
//! (CPOTrainer, ORPOTrainer).
//!
//! Everything is built from candle primitives that implement backward (candle-nn's fused
//! sigmoid and friends would drop the gradient: in candle 0.11 those ops carry none).

use candle_core::{DType, Tensor};

use crate::{Error, Result};

/// TRL's loss names that [`LossKind::parse`] accepts (plus the alias "aot_unpaired").
pub const LOSS_NAMES: [&str; 17] = [
    "sigmoid",
    "hinge",
    "ipo",
    "robust",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_pair",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
    "simpo",
    "orpo",
    "sft",
];

/// One preference loss, with its own parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum LossKind {
    /// DPO; conservative DPO (cDPO) when `label_smoothing` > 0.
    Sigmoid {
        label_smoothing: f64,
    },
    Hinge,
    /// IPO on per-token mean log-ratios.
    Ipo,
    Robust {
        label_smoothing: f64,
    },
    ExoPair {
        label_smoothing: f64,
    },
    NcaPair,
    /// BCO on pairs, stateless as in TRL 1.16 (older TRL subtracted a running reward mean).
    BcoPair,
    SppoHard,
    /// AOT: sorted policy log-ratio margins against sorted reference margins.
    Aot {
        label_smoothing: f64,
    },
    /// AOT with chosen and rejected log-ratios sorted separately ("aot_pair" in older TRL and
    /// ms-swift, "aot_unpaired" in TRL 1.16).
    AotPair {
        label_smoothing: f64,
    },
    ApoZero,
    ApoDown,
    DiscoPop {
        tau: f64,
    },
    /// Sigmoid DPO on per-token mean log-ratios (TRL 1.16 "sigmoid_norm").
    SigmoidNorm,
    /// SimPO (CPOTrainer "simpo"): reference-free, on per-token mean log-probs.
    Simpo {
        gamma: f64,
        label_smoothing: f64,
    },
    /// ORPO: reference-free odds ratio on per-token mean log-probs, plus the chosen NLL.
    Orpo,
    /// NLL of the chosen responses, averaged over all their tokens.
    Sft,
}

/// Parameters that [`LossKind::parse`] puts into the kinds that take them.
#[derive(Debug, Clone, PartialEq)]
pub struct LossParams {
    pub label_smoothing: f64,
    pub simpo_gamma: f64,
    pub discopop_tau: f64,
}

impl Default for LossParams {
    /// TRL's defaults: DPOConfig `label_smoothing` 0 and `discopop_tau` 0.05, CPOConfig
    /// `simpo_gamma` 0.5.
    fn default() -> Self {
        LossParams {
            label_smoothing: 0.0,
            simpo_gamma: 0.5,
            discopop_tau: 0.05,
        }
    }
}

impl LossKind {
    /// Parse one of TRL's loss names ([`LOSS_NAMES`]), taking parameters from `p`.
    pub fn parse(name: &str, p: &LossParams) -> Result<LossKind> {
        let eps = p.label_smoothing;
        let kind = match name {
            "sigmoid" => LossKind::Sigmoid { label_smoothing: eps },
            "hinge" => LossKind::Hinge,
            "ipo" => LossKind::Ipo,
            "robust" => LossKind::Robust { label_smoothing: eps },
            "exo_pair" => LossKind::ExoPair { label_smoothing: eps },
            "nca_pair" => LossKind::NcaPair,
            "bco_pair" => LossKind::BcoPair,
            "sppo_hard" => LossKind::SppoHard,
            "aot" => LossKind::Aot { label_smoothing: eps },
            "aot_pair" | "aot_unpaired" => LossKind::AotPair { label_smoothing: eps },
            "apo_zero" => LossKind::ApoZero,
            "apo_down" => LossKind::ApoDown,
            "discopop" => LossKind::DiscoPop { tau: p.discopop_tau },
            "sigmoid_norm" => LossKind::SigmoidNorm,
            "simpo" => LossKind::Simpo {
                gamma: p.simpo_gamma,
                label_smoothing: eps,
            },
            "orpo" => LossKind::Orpo,
            "sft" => LossKind::Sft,
            _ => {
                return Err(Error::UnknownLoss {
                    name: name.into(),
                    known: LOSS_NAMES.join(", "),
                })
            }
        };
        kind.validate()?;
        Ok(kind)
    }

    /// The TRL name of this loss.
    pub fn name(&self) -> &'static str {
        match self {
            LossKind::Sigmoid { .. } => "sigmoid",
            LossKind::Hinge => "hinge",
            LossKind::Ipo => "ipo",
            LossKind::Robust { .. } => "robust",
            LossKind::ExoPair { .. } => "exo_pair",
            LossKind::NcaPair => "nca_pair",
            LossKind::BcoPair => "bco_pair",
            LossKind::SppoHard => "sppo_hard",
            LossKind::Aot { .. } => "aot",
            LossKind::AotPair { .. } => "aot_pair",
            LossKind::ApoZero => "apo_zero",
            LossKind::ApoDown => "apo_down",
            LossKind::DiscoPop { .. } => "discopop",
            LossKind::SigmoidNorm => "sigmoid_norm",
            LossKind::Simpo { .. } => "simpo",
            LossKind::Orpo => "orpo",
            LossKind::Sft => "sft",
        }
    }

    /// Does this loss need reference log-probs? (false for simpo, orpo, sft)
    pub fn needs_reference(&self) -> bool {
        !matches!(self, LossKind::Simpo { .. } | LossKind::Orpo | LossKind::Sft)
    }

    /// Check the parameters: a value outside its range is an error naming the loss.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, v: f64| {
            Err(Error::LossParam {
                loss: self.name(),
                msg: format!("{what}, got {v}"),
            })
        };
        match *self {
            LossKind::Sigmoid { label_smoothing: e }
            | LossKind::Aot { label_smoothing: e }
            | LossKind::AotPair { label_smoothing: e }
            | LossKind::Simpo { label_smoothing: e, .. }
                if !(0.0..=1.0).contains(&e) =>
            {
                bad("label_smoothing must lie in [0, 1]", e)
            }
            // TRL warns outside [0, 0.5); at 0.5 the loss divides by zero, beyond it flips sign.
            LossKind::Robust { label_smoothing: e } if !(0.0..0.5).contains(&e) => {
                bad("label_smoothing must lie in [0, 0.5)", e)
            }
            // log(ε) and log(1 − ε) must be finite; TRL refuses ε = 0 too.
            LossKind::ExoPair { label_smoothing: e } if !(e > 0.0 && e < 1.0) => {
                bad("label_smoothing must lie in (0, 1) (the EXO paper suggests 1e-3)", e)
            }
            LossKind::DiscoPop { tau } if !(tau > 0.0 && tau.is_finite()) => bad("discopop_tau must be > 0", tau),
            LossKind::Simpo { gamma, .. } if !gamma.is_finite() => bad("simpo_gamma must be finite", gamma),
            _ => Ok(()),
        }
    }

    /// Per-pair losses [B] of this kind (sft's and orpo's batch-level NLL is repeated on every
    /// pair, as TRL does, so that the batch loss is always the mean of this).
    pub fn pair_losses(&self, beta: f64, x: &LossInputs) -> Result<Tensor> {
        let c = Prepared::new(x)?;
        self.losses(beta, &c)
    }

    fn losses(&self, beta: f64, c: &Prepared) -> Result<Tensor> {
        let name = self.name();
        let out = match *self {
            LossKind::Sigmoid { label_smoothing } => cdpo(&c.z(name, beta)?, label_smoothing)?,
            LossKind::Hinge => hinge(&c.z(name, beta)?)?,
            LossKind::Ipo => (c.mean_margin(name)? - 1.0 / (2.0 * beta))?.sqr()?,
            LossKind::Robust { label_smoothing: e } => robust(&c.z(name, beta)?, e)?,
            LossKind::ExoPair { label_smoothing: e } => exo_pair(&c.z(name, beta)?, e)?,
            LossKind::NcaPair => nca_pair(c.logratios(name)?, beta)?,
            LossKind::BcoPair => bco_pair(c.logratios(name)?, beta)?,
            LossKind::SppoHard => sppo_hard(c.logratios(name)?, beta)?,
            LossKind::Aot { label_smoothing } => aot(c, name, beta, label_smoothing)?,
            LossKind::AotPair { label_smoothing } => aot_pair(c.logratios(name)?, beta, label_smoothing)?,
            LossKind::ApoZero => apo_zero(c.logratios(name)?, beta)?,
            LossKind::ApoDown => apo_down(&c.logratios(name)?.0, &c.z(name, beta)?, beta)?,
            LossKind::DiscoPop { tau } => discopop(&c.z(name, beta)?, tau)?,
            LossKind::SigmoidNorm => log_sigmoid(&(c.mean_margin(name)? * beta)?)?.neg()?,
            LossKind::Simpo { gamma, label_smoothing } => simpo(c, beta, gamma, label_smoothing)?,
            LossKind::Orpo => orpo(c, beta)?,
            LossKind::Sft => c.nll()?.broadcast_as(c.chosen.shape())?,
        };
        Ok(out)
    }
}

// Per-pair losses of the kinds whose formula takes more than one line; `lr` is the pair of
// policy−reference log-ratios (chosen, rejected), `z` = βΔ.

/// max(0, 1 − z), with gradient 0 at 0 as torch (candle's relu passes 1 there).
fn hinge(z: &Tensor) -> Result<Tensor> {
    let u = (1.0 - z)?;
    let on = u.gt(0.0)?.to_dtype(u.dtype())?;
    Ok((u * on)?)
}

fn robust(z: &Tensor, e: f64) -> Result<Tensor> {
    let clean = (log_sigmoid(z)? * -(1.0 - e))?;
    let flipped = (log_sigmoid(&z.neg()?)? * e)?;
    Ok(((clean + flipped)? / (1.0 - 2.0 * e))?)
}

fn exo_pair(z: &Tensor, e: f64) -> Result<Tensor> {
    let log_qw = log_sigmoid(z)?;
    let log_ql = log_sigmoid(&z.neg()?)?;
    let w = (log_qw.exp()? * (&log_qw - (-e).ln_1p())?)?;
    let l = (log_ql.exp()? * (&log_ql - e.ln())?)?;
    Ok((w + l)?)
}

fn nca_pair((lc, lr): (Tensor, Tensor), beta: f64) -> Result<Tensor> {
    let (rc, rr) = ((lc * beta)?, (lr * beta)?);
    let a = log_sigmoid(&rc)?;
    let b = log_sigmoid(&rc.neg()?)?;
    let d = log_sigmoid(&rr.neg()?)?;
    Ok(((a.neg()? - (b * 0.5)?)? - (d * 0.5)?)?)
}

fn bco_pair((lc, lr): (Tensor, Tensor), beta: f64) -> Result<Tensor> {
    let a = log_sigmoid(&(lc * beta)?)?;
    let b = log_sigmoid(&(lr * -beta)?)?;
    Ok((a + b)?.neg()?)
}

fn sppo_hard((lc, lr): (Tensor, Tensor), beta: f64) -> Result<Tensor> {
    let half = 0.5 / beta;
    Ok(((lc - half)?.sqr()? + (lr + half)?.sqr()?)?)
}

fn aot(c: &Prepared, name: &'static str, beta: f64, label_smoothing: f64) -> Result<Tensor> {
    let (rc, rr) = c.refs(name)?;
    let pi = (&c.chosen - &c.rejected)?;
    let reference = (rc - rr)?;
    let d = (sorted(&pi)? - sorted(&reference)?)?;
    Ok(cdpo(&(d * beta)?, label_smoothing)?)
}

fn aot_pair((lc, lr): (Tensor, Tensor), beta: f64, label_smoothing: f64) -> Result<Tensor> {
    let d = (sorted(&lc)? - sorted(&lr)?)?;
    Ok(cdpo(&(d * beta)?, label_smoothing)?)
}

fn apo_zero((lc, lr): (Tensor, Tensor), beta: f64) -> Result<Tensor> {
    let chosen = (1.0 - sigmoid(&(lc * beta)?)?)?;
    Ok((chosen + sigmoid(&(lr * beta)?)?)?)
}

fn apo_down(lc: &Tensor, z: &Tensor, beta: f64) -> Result<Tensor> {
    let chosen = sigmoid(&(lc * beta)?)?;
    Ok((chosen + (1.0 - sigmoid(z)?)?)?)
}

fn discopop(z: &Tensor, tau: f64) -> Result<Tensor> {
    let m = sigmoid(&(z / tau)?)?;
    let logistic = log_sigmoid(z)?.neg()?;
    let exponential = z.neg()?.exp()?;
    Ok(((logistic * (1.0 - &m)?)? + (exponential * m)?)?)
}

fn simpo(c: &Prepared, beta: f64, gamma: f64, label_smoothing: f64) -> Result<Tensor> {
    let (mc, mr) = c.means()?;
    let logits = (((mc - mr)? * beta)? - gamma)?;
    Ok(cdpo(&logits, label_smoothing)?)
}

fn orpo(c: &Prepared, beta: f64) -> Result<Tensor> {
    let (mc, mr) = c.means()?;
    let log_odds = ((&mc - &mr)? - (log1mexp(&mc)? - log1mexp(&mr)?)?)?;
    let ratio = (log_sigmoid(&log_odds)? * beta)?;
    Ok(c.nll()?.broadcast_sub(&ratio)?)
}

/// Inputs, all [B] tensors of the same float dtype (f32 in training). Log-probs are
/// per-sequence SUMS over response tokens.
pub struct LossInputs<'a> {
    /// Policy log-probs; they carry the gradient.
    pub chosen_logps: &'a Tensor,
    pub rejected_logps: &'a Tensor,
    /// Reference log-probs (no gradient); needed unless every term is reference-free.
    pub ref_chosen_logps: Option<&'a Tensor>,
    pub ref_rejected_logps: Option<&'a Tensor>,
    /// Scored token counts.
    pub chosen_lengths: &'a Tensor,
    pub rejected_lengths: &'a Tensor,
}

pub struct LossOutput {
    /// Scalar batch loss.
    pub loss: Tensor,
    /// [B], detached.
    pub chosen_rewards: Tensor,
    /// [B], detached.
    pub rejected_rewards: Tensor,
}

/// Several loss kinds combined with weights (TRL's `loss_type` list and `loss_weights`), plus
/// an optional SFT term on the chosen responses weighted by `rpo_alpha` (older TRL's RPO: NLL
/// averaged over all chosen response tokens of the batch, added to the loss).
#[derive(Debug, Clone, PartialEq)]
pub struct DpoLoss {
    pub terms: Vec<(LossKind, f64)>,
    pub beta: f64,
    pub rpo_alpha: Option<f64>,
}

/// State carried across steps by the losses. TRL 1.16 has none (its bco_pair no longer keeps
/// the running reward mean of older versions); the type stays so that checkpoints and the
/// trainer have one place for it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossState {}

impl DpoLoss {
    /// One loss kind with weight 1.
    pub fn single(kind: LossKind, beta: f64) -> DpoLoss {
        DpoLoss {
            terms: vec![(kind, 1.0)],
            beta,
            rpo_alpha: None,
        }
    }

    /// Does any term need reference log-probs?
    pub fn needs_reference(&self) -> bool {
        self.terms.iter().any(|(k, _)| k.needs_reference())
    }

    /// Check beta, the weights and every kind's parameters.
    pub fn validate(&self) -> Result<()> {
        if self.terms.is_empty() {
            return Err(Error::NoLoss);
        }
        if !(self.beta > 0.0 && self.beta.is_finite()) {
            return Err(Error::Setting {
                key: "beta".into(),
                msg: format!("must be > 0, got {}", self.beta),
            });
        }
        for (kind, w) in &self.terms {
            kind.validate()?;
            if !w.is_finite() {
                return Err(Error::LossParam {
                    loss: kind.name(),
                    msg: format!("weight must be finite, got {w}"),
                });
            }
        }
        if let Some(a) = self.rpo_alpha {
            if !a.is_finite() {
                return Err(Error::Setting {
                    key: "rpo_alpha".into(),
                    msg: format!("must be finite, got {a}"),
                });
            }
        }
        Ok(())
    }

    /// Batch loss Σ_k w_k · mean(loss_k) (+ rpo_alpha · NLL) and the rewards TRL logs.
    pub fn compute(&self, x: &LossInputs, _state: &mut LossState) -> Result<LossOutput> {
        self.validate()?;
        let c = Prepared::new(x)?;
        let mut loss: Option<Tensor> = None;
        let mut add = |t: Tensor| -> Result<()> {
            loss = Some(match loss.take() {
                None => t,
                Some(l) => (l + t)?,
            });
            Ok(())
        };
        for (kind, w) in &self.terms {
            add((kind.losses(self.beta, &c)?.mean_all()? * *w)?)?;
        }
        if let Some(a) = self.rpo_alpha {
            add((c.nll()? * a)?)?;
        }
        let loss = loss.expect("at least one term");

        // Rewards as TRL logs them: DPOTrainer's β(logp − ref) whenever a reference is used,
        // CPO/ORPO's β·mean logp for reference-free runs.
        let reference_free = !self.needs_reference()
            && (self
                .terms
                .iter()
                .any(|(k, _)| matches!(k, LossKind::Simpo { .. } | LossKind::Orpo))
                || c.ref_chosen.is_none()
                || c.ref_rejected.is_none());
        let (chosen_rewards, rejected_rewards) = match (&c.ref_chosen, &c.ref_rejected) {
            (Some(rc), Some(rr)) if !reference_free => {
                (((&c.chosen - rc)? * self.beta)?, ((&c.rejected - rr)? * self.beta)?)
            }
            _ => {
                let (mc, mr) = c.means()?;
                ((mc * self.beta)?, (mr * self.beta)?)
            }
        };
        Ok(LossOutput {
            loss,
            chosen_rewards: chosen_rewards.detach(),
            rejected_rewards: rejected_rewards.detach(),
        })
    }
}

/// Validated inputs: shapes checked, lengths clamped to ≥ 1 and in the log-probs' dtype,
/// references detached.
struct Prepared {
    chosen: Tensor,
    rejected: Tensor,
    ref_chosen: Option<Tensor>,
    ref_rejected: Option<Tensor>,
    chosen_len: Tensor,
    rejected_len: Tensor,
}

impl Prepared {
    fn new(x: &LossInputs) -> Result<Prepared> {
        let b = match x.chosen_logps.dims() {
            [b] if *b > 0 => *b,
            d => {
                return Err(Error::LossInput {
                    tensor: "chosen_logps",
                    msg: format!("expected shape [B] with B > 0, got {d:?}"),
                })
            }
        };
        let dtype = x.chosen_logps.dtype();
        if !matches!(dtype, DType::F32 | DType::F64 | DType::BF16 | DType::F16) {
            return Err(Error::LossInput {
                tensor: "chosen_logps",
                msg: format!("expected a float tensor, got {dtype:?}"),
            });
        }
        let check = |name: &'static str, t: &Tensor| -> Result<Tensor> {
            if t.dims() != [b] {
                return Err(Error::LossInput {
                    tensor: name,
                    msg: format!("expected shape [{b}], got {:?}", t.dims()),
                });
            }
            Ok(t.to_dtype(dtype)?)
        };
        let refs = match (x.ref_chosen_logps, x.ref_rejected_logps) {
            (Some(rc), Some(rr)) => (
                Some(check("ref_chosen_logps", rc)?.detach()),
                Some(check("ref_rejected_logps", rr)?.detach()),
            ),
            (None, None) => (None, None),
            _ => return Err(Error::LossRefsUnpaired),
        };
        Ok(Prepared {
            chosen: x.chosen_logps.clone(),
            rejected: check("rejected_logps", x.rejected_logps)?,
            ref_chosen: refs.0,
            ref_rejected: refs.1,
            chosen_len: check("chosen_lengths", x.chosen_lengths)?.detach().maximum(1.0)?,
            rejected_len: check("rejected_lengths", x.rejected_lengths)?.detach().maximum(1.0)?,
        })
    }

    /// The reference log-probs (chosen, rejected); an error naming `loss` when there are none.
    fn refs(&self, loss: &'static str) -> Result<(&Tensor, &Tensor)> {
        match (&self.ref_chosen, &self.ref_rejected) {
            (Some(rc), Some(rr)) => Ok((rc, rr)),
            _ => Err(Error::LossNeedsReference { loss }),
        }
    }

    /// Policy − reference log-ratios of chosen and rejected.
    fn logratios(&self, loss: &'static str) -> Result<(Tensor, Tensor)> {
        let (rc, rr) = self.refs(loss)?;
        Ok(((&self.chosen - rc)?, (&self.rejected - rr)?))
    }

    /// z = βΔ.
    fn z(&self, loss: &'static str, beta: f64) -> Result<Tensor> {
        let (lc, lr) = self.logratios(loss)?;
        Ok(((lc - lr)? * beta)?)
    }

    /// Δ̄: the log-ratio margin on per-token means.
    fn mean_margin(&self, loss: &'static str) -> Result<Tensor> {
        let (lc, lr) = self.logratios(loss)?;
        Ok(((lc / &self.chosen_len)? - (lr / &self.rejected_len)?)?)
    }

    /// Per-token mean log-probs of chosen and rejected.
    fn means(&self) -> Result<(Tensor, Tensor)> {
        Ok((
            (&self.chosen / &self.chosen_len)?,
            (&self.rejected / &self.rejected_len)?,
        ))
    }

    /// Scalar NLL of the chosen responses: −Σ logp_c / Σ len_c (the mean over all chosen tokens
    /// of the batch, as TRL's cross-entropy and its "sft" loss).
    fn nll(&self) -> Result<Tensor> {
        let tokens = self.chosen_len.sum_all()?;
        Ok(self.chosen.sum_all()?.div(&tokens)?.neg()?)
    }
}

/// log σ(x), stable for any x and differentiable with candle primitives:
/// for x ≥ 0, −log(1 + e^(−x)); for x < 0, x − log(1 + e^x). The branch mask is a constant,
/// so the gradient is σ(−x) on both sides (0.5 at 0, as torch).
pub fn log_sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    let pos = x.ge(0.0)?.to_dtype(x.dtype())?;
    let sign = ((&pos * 2.0)? - 1.0)?;
    let neg_abs = (x * sign)?.neg()?;
    let softplus_tail = (neg_abs.exp()? + 1.0)?.log()?;
    (x * (1.0 - pos)?)? - softplus_tail
}

/// σ(x) = exp(log σ(x)), stable and differentiable.
fn sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    log_sigmoid(x)?.exp()
}

/// Conservative sigmoid loss −(1−ε)·logσ(z) − ε·logσ(−z).
fn cdpo(z: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let main = (log_sigmoid(z)? * -(1.0 - eps))?;
    if eps == 0.0 {
        return Ok(main);
    }
    main - (log_sigmoid(&z.neg()?)? * eps)?
}

/// Ascending sort of a [B] tensor that keeps the gradient (indices from the detached values,
/// then a differentiable gather).
fn sorted(x: &Tensor) -> candle_core::Result<Tensor> {
    let idx = x.detach().arg_sort_last_dim(true)?;
    x.index_select(&idx, 0)
}

/// log(1 − e^x) for x < 0, differentiable. As TRL's ORPO, it branches at −ln 2: log(1 − e^x)
/// below, and log(−expm1(x)) above with expm1(x) = 2t / (1 − t), t = tanh(x/2), which keeps its
/// precision near 0. Each branch sees its input clamped into its own range so the unused one
/// stays finite (a NaN there would leak into the gradient).
fn log1mexp(x: &Tensor) -> candle_core::Result<Tensor> {
    let cut = -std::f64::consts::LN_2;
    let low = x.lt(cut)?;
    let cut_t = x.ones_like()?.affine(cut, 0.0)?;
    let xa = low.where_cond(x, &cut_t)?;
    let xb = low.where_cond(&cut_t, x)?;
    let a = (1.0 - xa.exp()?)?.log()?;
    let t = (xb * 0.5)?.tanh()?;
    let b = ((t.neg()? * 2.0)? / (1.0 - &t)?)?.log()?;
    low.where_cond(&a, &b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn log_sigmoid_matches_f64_and_is_stable() {
        let xs = [-100.0f32, -30.0, -5.0, -0.5, 0.0, 0.5, 5.0, 30.0, 100.0];
        let v = Var::from_tensor(&t(&xs)).unwrap();
        let y = log_sigmoid(v.as_tensor()).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        let g = grads.get(v.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        for ((x, y), g) in xs.iter().zip(y.to_vec1::<f32>().unwrap()).zip(g) {
            let x = *x as f64;
            let want = if x < 0.0 {
                x - x.exp().ln_1p()
            } else {
                -(-x).exp().ln_1p()
            };
            assert!(
                (y as f64 - want).abs() <= 1e-6 * want.abs().max(1.0),
                "logσ({x}) = {y}, want {want}"
            );
            let dwant = 1.0 / (1.0 + x.exp());
            assert!((g as f64 - dwant).abs() < 1e-6, "d logσ({x}) = {g}, want {dwant}");
        }
    }

    #[test]
    fn log1mexp_both_branches() {
        let xs = [-30.0f32, -3.0, -0.7, -0.69, -0.1, -1e-3, -1e-6];
        let v = Var::from_tensor(&t(&xs)).unwrap();
        let y = log1mexp(v.as_tensor()).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        let g = grads.get(v.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        for ((x, y), g) in xs.iter().zip(y.to_vec1::<f32>().unwrap()).zip(g) {
            let x = *x as f64;
            let want = (-x.exp_m1()).ln();
            assert!(
                (y as f64 - want).abs() <= 2e-6 * want.abs().max(1.0),
                "log1mexp({x}) = {y}, want {want}"
            );
            // d/dx log(1 − e^x) = −e^x / (1 − e^x) = −1 / expm1(−x)
            let dwant = -1.0 / (-x).exp_m1();
            assert!(
                (g as f64 - dwant).abs() <= 1e-5 * dwant.abs().max(1.0),
                "grad at {x}: {g}, want {dwant}"
            );
        }
    }

    #[test]
    fn sort_keeps_gradient() {
        let v = Var::from_tensor(&t(&[3.0, 1.0, 2.0])).unwrap();
        let s = sorted(v.as_tensor()).unwrap();
        assert_eq!(s.to_vec1::<f32>().unwrap(), [1.0, 2.0, 3.0]);
        let w = t(&[1.0, 10.0, 100.0]);
        let grads = (s * w).unwrap().sum_all().unwrap().backward().unwrap();
        let g = grads.get(v.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(g, [100.0, 1.0, 10.0]);
    }

    #[test]
    fn names_round_trip() {
        let p = LossParams {
            label_smoothing: 0.1,
            ..LossParams::default()
        };
        for name in LOSS_NAMES {
            let k = LossKind::parse(name, &p).unwrap();
            assert_eq!(k.name(), name);
        }
        assert_eq!(LossKind::parse("aot_unpaired", &p).unwrap().name(), "aot_pair");
    }
}
