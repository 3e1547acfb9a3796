//! PEFT's `init_lora_weights`: how new A and B matrices are filled, and the two initialisations
//! that move the principal part of the base weight into the adapter (PiSSA: the top-r singular
//! triplets; OLoRA: the first r columns and rows of a QR factorisation), leaving a residual base.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::linalg::mat::Mat;
use crate::linalg::svd::{qr, truncated_svd};
use crate::rng::Rng;

/// How new A and B matrices are filled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LoraInit {
    /// PEFT's default (`true`): A ~ U(±1/sqrt(in)) (kaiming-uniform with a = √5), B = 0, so the
    /// adapter starts as the identity and step 1 of DPO has loss ln 2.
    Peft { seed: u64 },
    /// `gaussian`: A ~ N(0, 1/r²), B = 0.
    PeftGaussian { seed: u64 },
    /// `false`: A and B both as torch's default Linear init (U(±1/sqrt(fan_in))), so the adapter
    /// changes the model from the start.
    Random { seed: u64 },
    /// A and B both ~ N(0, std²): a non-trivial adapter for tests and benchmarks.
    Gaussian { seed: u64, std: f64 },
    /// PiSSA: B·A = the top-r singular part of W / scale, base W − scale·B·A. `pissa_niter_N`
    /// asks PEFT for a randomized SVD; lorafold computes the top-r triplets to convergence
    /// either way.
    Pissa,
    /// OLoRA: B = Q[:, :r], A = R[:r] of W = QR, base W − scale·B·A.
    Olora,
}

/// The `init_lora_weights` values lorafold refuses, with why.
const REFUSED: [(&str, &str); 4] = [
    ("loftq", "LoftQ needs a quantised base"),
    ("eva", "EVA needs activation statistics from a data pass"),
    ("corda", "CorDA needs activation covariances from a data pass"),
    ("lora_ga", "LoRA-GA needs gradients from a data pass"),
];

impl LoraInit {
    /// Parse `init_lora_weights` (`true`, `false`, `gaussian`, `pissa`, `pissa_niter_N`,
    /// `olora`); `seed` seeds the random ones. The error is a message for the caller to place.
    pub fn parse(value: &str, seed: u64) -> std::result::Result<LoraInit, String> {
        let v = value.trim().to_ascii_lowercase();
        Ok(match v.as_str() {
            "true" => LoraInit::Peft { seed },
            "false" => LoraInit::Random { seed },
            "gaussian" => LoraInit::PeftGaussian { seed },
            "pissa" => LoraInit::Pissa,
            "olora" => LoraInit::Olora,
            _ if v
                .strip_prefix("pissa_niter_")
                .is_some_and(|n| n.parse::<usize>().is_ok()) =>
            {
                LoraInit::Pissa
            }
            _ => {
                if let Some((_, why)) = REFUSED.iter().find(|(name, _)| v.starts_with(name)) {
                    return Err(format!("{value:?} is not supported: {why}"));
                }
                return Err(format!(
                    "{value:?} is not one of true, false, gaussian, pissa, pissa_niter_N, olora"
                ));
            }
        })
    }

    /// The initialisation an adapter_config.json's `init_lora_weights` asks for, when it moves
    /// part of the base into the adapter (so loading must rebuild the residual base).
    pub fn principal(value: Option<&serde_json::Value>) -> Option<LoraInit> {
        let s = value?.as_str()?;
        match LoraInit::parse(s, 0).ok()? {
            i @ (LoraInit::Pissa | LoraInit::Olora) => Some(i),
            _ => None,
        }
    }

    /// Whether this initialisation replaces the base weight by a residual.
    pub fn is_principal(self) -> bool {
        matches!(self, LoraInit::Pissa | LoraInit::Olora)
    }

    /// The name written to adapter_config.json's `init_lora_weights`.
    pub fn peft_value(self) -> serde_json::Value {
        match self {
            LoraInit::Peft { .. } | LoraInit::Gaussian { .. } => serde_json::json!(true),
            LoraInit::Random { .. } => serde_json::json!(false),
            LoraInit::PeftGaussian { .. } => serde_json::json!("gaussian"),
            LoraInit::Pissa => serde_json::json!("pissa"),
            LoraInit::Olora => serde_json::json!("olora"),
        }
    }
}

/// A new pair for the layer with index `index`, rank `r`, shape `(in, out)`, from a random
/// initialisation (the principal ones go through [`principal_pair`]).
pub fn random_pair(
    init: LoraInit,
    index: usize,
    r: usize,
    (i, o): (usize, usize),
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let rng = |seed: u64| Rng::stream(seed, index as u64);
    let uniform = |rng: &mut Rng, n: usize, bound: f64| -> Vec<f32> {
        (0..n).map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32).collect()
    };
    let t = |v: Vec<f32>, shape: (usize, usize)| Tensor::from_vec(v, shape, device);
    let zeros = || Tensor::zeros((o, r), DType::F32, device);
    Ok(match init {
        LoraInit::Peft { seed } => (
            t(uniform(&mut rng(seed), r * i, 1.0 / (i as f64).sqrt()), (r, i))?,
            zeros()?,
        ),
        LoraInit::Random { seed } => {
            let mut g = rng(seed);
            let a = uniform(&mut g, r * i, 1.0 / (i as f64).sqrt());
            let b = uniform(&mut g, o * r, 1.0 / (r as f64).sqrt());
            (t(a, (r, i))?, t(b, (o, r))?)
        }
        LoraInit::PeftGaussian { seed } => {
            let mut g = rng(seed);
            let a = (0..r * i).map(|_| (g.next_normal() / r as f64) as f32).collect();
            (t(a, (r, i))?, zeros()?)
        }
        LoraInit::Gaussian { seed, std } => {
            let mut g = rng(seed);
            let mut draw = |n: usize| -> Vec<f32> { (0..n).map(|_| (g.next_normal() * std) as f32).collect() };
            let a = draw(r * i);
            let b = draw(o * r);
            (t(a, (r, i))?, t(b, (o, r))?)
        }
        LoraInit::Pissa | LoraInit::Olora => {
            return Err(Error::Msg(
                "internal: a principal initialisation needs the base weight".into(),
            ))
        }
    })
}

/// PiSSA's or OLoRA's A [r, in] and B [out, r] from the base weight `w` [out, in] (f32) and the
/// LoRA scale, as PEFT's `pissa_init` / `olora_init` compute them. The residual base is
/// `w − scale·B·A`.
pub fn principal_pair(init: LoraInit, w: &Mat, r: usize, scale: f64) -> Result<(Mat, Mat)> {
    if r == 0 || r > w.rows.min(w.cols) {
        return Err(Error::Msg(format!(
            "rank {r} does not fit a {}x{} weight for {init:?}",
            w.rows, w.cols
        )));
    }
    match init {
        LoraInit::Pissa => {
            // W ≈ U S Vᵀ: A = √(S/scale) Vᵀ, B = U √(S/scale).
            let t = truncated_svd(w, r)?;
            let mut a = Mat::zeros(r, w.cols);
            let mut b = Mat::zeros(w.rows, r);
            for k in 0..r {
                let sk = t.s[k];
                let root = (sk / scale).sqrt();
                for j in 0..w.cols {
                    a.data[k * w.cols + j] = (root * t.vt.data[k * w.cols + j] as f64) as f32;
                }
                for i in 0..w.rows {
                    let u = if sk > 0.0 {
                        t.us.data[i * r + k] as f64 / sk
                    } else {
                        0.0
                    };
                    b.data[i * r + k] = (u * root) as f32;
                }
            }
            Ok((a, b))
        }
        LoraInit::Olora => {
            let (q, rr) = qr(w);
            let k = q.cols;
            let b = Mat {
                rows: w.rows,
                cols: r,
                data: (0..w.rows).flat_map(|i| q.data[i * k..i * k + r].to_vec()).collect(),
            };
            let a = Mat {
                rows: r,
                cols: w.cols,
                data: rr.data[..r * w.cols].to_vec(),
            };
            Ok((a, b))
        }
        _ => Err(Error::Msg(format!(
            "internal: {init:?} is not a principal initialisation"
        ))),
    }
}

/// Replace `lin`'s weight by its residual after the principal part (`init`, rank `r`) moved
/// into an adapter of scale `scale`, and return that part's A [r, in] and B [out, r] (f32, on
/// the weight's device).
pub fn take_principal(
    lin: &mut crate::model::linear::LoraLinear,
    init: LoraInit,
    r: usize,
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    let device = lin.weight.device().clone();
    let w = Mat::from_tensor(&lin.weight)?;
    let (a, b) = principal_pair(init, &w, r, scale).map_err(|e| Error::Msg(format!("{}: {e}", lin.path)))?;
    let res = residual(&w, &a, &b, scale)?;
    lin.weight = res.to_tensor()?.to_dtype(lin.weight.dtype())?.to_device(&device)?;
    Ok((a.to_tensor()?.to_device(&device)?, b.to_tensor()?.to_device(&device)?))
}

/// `w − scale·B·A`, the residual base of a principal initialisation (f32, as PEFT subtracts).
pub fn residual(w: &Mat, a: &Mat, b: &Mat, scale: f64) -> Result<Mat> {
    let ba = b.matmul(a)?;
    let s = scale as f32;
    Ok(Mat {
        rows: w.rows,
        cols: w.cols,
        data: w.data.iter().zip(&ba.data).map(|(x, d)| x - s * d).collect(),
    })
}
