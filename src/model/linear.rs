//! `LoraLinear`: a frozen base linear layer plus any number of LoRA adapter slots, of which the
//! forward context selects at most one.
//!
//! y = x Wᵀ (+ bias) + scale · dropout(x) Aᵀ Bᵀ, with A [r, in] and B [out, r] kept in f32.
//! With DoRA (a magnitude vector m [out]) the adapter term is, as PEFT computes it,
//! (m/‖W + s·B·A‖ − 1) · dropout(x) Wᵀ + (m/‖W + s·B·A‖) · s · dropout(x) Aᵀ Bᵀ, the row norm
//! taken without gradient.

use candle_core::{DType, Result, Tensor};

use crate::model::ops::frozen::{add_frozen, matmul_frozen_t};
use crate::model::ops::lora_op::{lora_linear, lora_linear_glu, LoraInputs};
use crate::rng::Rng;

/// Which adapter (if any) is active for a forward pass, and whether adapter dropout applies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fwd {
    /// Adapter slot to apply; `None` runs the bare base model (the DPO reference).
    pub adapter: Option<usize>,
    /// Seed for LoRA dropout masks; `None` disables dropout (evaluation).
    pub dropout_seed: Option<u64>,
    /// No gradient will be taken (decoding): each linear layer may run as one fused product.
    pub no_grad: bool,
}

impl Fwd {
    /// The base model with every adapter off.
    pub fn base() -> Fwd {
        Fwd::default()
    }

    /// Adapter `slot` on, no dropout.
    pub fn eval(slot: usize) -> Fwd {
        Fwd {
            adapter: Some(slot),
            dropout_seed: None,
            no_grad: false,
        }
    }

    /// Adapter `slot` on, dropout masks drawn from `seed`.
    pub fn train(slot: usize, seed: u64) -> Fwd {
        Fwd {
            adapter: Some(slot),
            dropout_seed: Some(seed),
            no_grad: false,
        }
    }
}

/// One low-rank adapter on one linear layer.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// [r, in], f32. Backed by a `Var` when trainable.
    pub a: Tensor,
    /// [out, r], f32. Backed by a `Var` when trainable.
    pub b: Tensor,
    pub scale: f64,
    pub dropout: f32,
    /// DoRA's magnitude vector [out], f32 (`lora_magnitude_vector`). Backed by a `Var` when
    /// trainable.
    pub magnitude: Option<Tensor>,
    /// DoRA on an f32 base: the squared row norms ‖W_i‖² [out] of the frozen weight, so that
    /// ‖W + s·B·A‖ is found without an [out, in] temporary (see [`LoraAdapter::row_norms`]).
    pub base_row_sq: Option<Tensor>,
}

impl LoraAdapter {
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }

    /// ΔW = scale · B A, [out, in], f32.
    pub fn delta_weight(&self) -> Result<Tensor> {
        self.b.matmul(&self.a)? * self.scale
    }

    /// The trainable tensors: A, B and (DoRA) the magnitude.
    pub fn tensors(&self) -> impl Iterator<Item = &Tensor> {
        [&self.a, &self.b].into_iter().chain(self.magnitude.as_ref())
    }

    /// The row norms ‖W + s·B·A‖ [out] (f32, no gradient) of `weight` with this adapter added.
    /// With `base_row_sq` (f32 weights) as ‖W_i‖² + 2s·Σ_k B_ik (A·Wᵀ)_ki + s²·(B·A·Aᵀ·Bᵀ)_ii:
    /// products of rank r only, never the [out, in] sum.
    pub fn row_norms(&self, weight: &Tensor) -> Result<Tensor> {
        let (a, b, s) = (self.a.detach(), self.b.detach(), self.scale);
        match &self.base_row_sq {
            Some(w2) if weight.dtype() == DType::F32 => {
                let awt = matmul_frozen_t(&a, weight)?; // [r, out]
                let cross = (&b * awt.t()?)?.sum(1)?;
                let gram = a.matmul(&a.t()?)?; // [r, r]
                let own = (b.matmul(&gram)? * &b)?.sum(1)?;
                let sq = ((w2 + (cross * (2.0 * s))?)? + (own * (s * s))?)?;
                sq.relu()?.sqrt()
            }
            _ => {
                let w = (weight.to_dtype(DType::F32)?.detach() + (b.matmul(&a)? * s)?)?;
                w.sqr()?.sum(1)?.sqrt()
            }
        }
    }

    /// ‖W_i‖² [out] of an f32 weight, for [`LoraAdapter::base_row_sq`]; `None` for other dtypes.
    pub fn weight_row_sq(weight: &Tensor) -> Result<Option<Tensor>> {
        if weight.dtype() != DType::F32 {
            return Ok(None);
        }
        Ok(Some(weight.sqr()?.sum(1)?))
    }

    /// The weight PEFT's merge gives: W + s·B·A, rows scaled by m/‖W + s·B·A‖ with DoRA
    /// (f32, [out, in]).
    pub fn merged_weight(&self, weight: &Tensor) -> Result<Tensor> {
        let w = (weight.to_dtype(DType::F32)? + self.delta_weight()?)?;
        match &self.magnitude {
            None => Ok(w),
            Some(m) => {
                let norm = w.sqr()?.sum_keepdim(1)?.sqrt()?;
                w.broadcast_mul(&m.unsqueeze(1)?.broadcast_div(&norm)?)
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct LoraLinear {
    /// Module path in the checkpoint, e.g. `model.layers.0.self_attn.q_proj`.
    pub path: String,
    /// Index of this layer in the model, used to derive its dropout stream.
    pub index: usize,
    /// Frozen [out, in] weight in the base dtype; a plain tensor, never a `Var`.
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// Adapters by slot; `None` where the slot does not target this layer.
    pub adapters: Vec<Option<LoraAdapter>>,
}

impl LoraLinear {
    pub fn new(path: String, index: usize, weight: Tensor, bias: Option<Tensor>) -> Self {
        LoraLinear {
            path,
            index,
            weight,
            bias,
            adapters: Vec::new(),
        }
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Put `adapter` into `slot` (growing the slot list as needed).
    pub fn set_adapter(&mut self, slot: usize, adapter: Option<LoraAdapter>) {
        if self.adapters.len() <= slot {
            self.adapters.resize(slot + 1, None);
        }
        self.adapters[slot] = adapter;
    }

    pub fn adapter(&self, slot: usize) -> Option<&LoraAdapter> {
        self.adapters.get(slot).and_then(|a| a.as_ref())
    }

    /// x [..., in] -> [..., out].
    pub fn forward(&self, x: &Tensor, ctx: &Fwd) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_f = self.in_features();
        let n: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((n, in_f))?;
        let ad = ctx.adapter.and_then(|s| self.adapter(s));
        if ctx.no_grad && ad.is_none_or(|a| a.magnitude.is_none()) {
            let lin = crate::model::ops::frozen::NoGradLinear {
                weight: &self.weight,
                bias: self.bias.as_ref(),
                adapter: ad.map(|a| (&a.a, &a.b, a.scale)),
            };
            if let Some(y) = crate::model::ops::frozen::lora_product_no_grad(&x2, &lin)? {
                return self.with_out_features(&y, dims);
            }
        }
        if let Some(y) = self.fused_train(&x2, ad, ctx)? {
            return self.with_out_features(&y, dims);
        }
        let base = matmul_frozen_t(&x2, &self.weight)?;
        let mut y = match &self.bias {
            Some(b) => add_frozen(&base, b)?,
            None => base.clone(),
        };
        if let Some(ad) = ctx.adapter.and_then(|s| self.adapter(s)) {
            let mut xa = x2.to_dtype(DType::F32)?;
            let dropped = matches!((ctx.dropout_seed, ad.dropout > 0.0), (Some(_), true));
            if let (Some(seed), true) = (ctx.dropout_seed, dropped) {
                xa = (xa * dropout_mask(n, in_f, ad.dropout, seed, self.index, x.device())?)?;
            }
            // Scale the rank-r intermediate, not the [N, out] product: one full-size tensor fewer.
            let h = (xa.matmul(&ad.a.t()?)? * ad.scale)?.matmul(&ad.b.t()?)?;
            match &ad.magnitude {
                None => {
                    let dt = y.dtype();
                    y = (y + h.to_dtype(dt)?)?;
                }
                Some(m) => {
                    // DoRA: g = m / ‖W + sBA‖ per output row, the norm detached (as PEFT).
                    let g = m.broadcast_div(&ad.row_norms(&self.weight)?)?.unsqueeze(0)?;
                    if dropped {
                        // y + (g − 1)·(x̃Wᵀ) + g·h, x̃ the dropped-out input.
                        let based = matmul_frozen_t(&xa.to_dtype(self.weight.dtype())?, &self.weight)?;
                        let d = (based.to_dtype(DType::F32)?.broadcast_mul(&(&g - 1.0)?)? + h.broadcast_mul(&g)?)?;
                        let dt = y.dtype();
                        y = (y + d.to_dtype(dt)?)?;
                    } else {
                        // Without dropout the same sum is g·(xWᵀ + h) (+ bias): one [N, out]
                        // product, and one [N, out] tensor kept for the backward pass.
                        let u = (base.to_dtype(DType::F32)? + h)?
                            .broadcast_mul(&g)?
                            .to_dtype(y.dtype())?;
                        y = match &self.bias {
                            Some(b) => add_frozen(&u, b)?,
                            None => u,
                        };
                    }
                }
            }
        }
        self.with_out_features(&y, dims)
    }
}

impl LoraLinear {
    /// The layer with a plain (non-DoRA) adapter as one op with its own backward
    /// ([`lora_linear`]), when the operands are f32 on the CPU; `None` otherwise.
    fn fused_train(&self, x2: &Tensor, ad: Option<&LoraAdapter>, ctx: &Fwd) -> Result<Option<Tensor>> {
        match self.fused_inputs(x2, ad, ctx)? {
            Some(p) => lora_linear(p),
            None => Ok(None),
        }
    }

    /// y [N, out] reshaped to the input's leading dims `dims` [..., in] with `out` last.
    fn with_out_features(&self, y: &Tensor, mut dims: Vec<usize>) -> Result<Tensor> {
        if let Some(last) = dims.last_mut() {
            *last = self.out_features();
        }
        y.reshape(dims)
    }

    /// The operands of the fused op for input x2 [N, in], when it applies.
    fn fused_inputs<'a>(
        &'a self,
        x2: &'a Tensor,
        ad: Option<&'a LoraAdapter>,
        ctx: &Fwd,
    ) -> Result<Option<LoraInputs<'a>>> {
        let Some(ad) = ad.filter(|a| a.magnitude.is_none()) else {
            return Ok(None);
        };
        if !(x2.device().is_cpu() && x2.dtype() == DType::F32 && self.weight.dtype() == DType::F32) {
            return Ok(None);
        }
        let (n, in_f) = x2.dims2()?;
        let mask = match ctx.dropout_seed {
            Some(seed) if ad.dropout > 0.0 => Some(dropout_mask(n, in_f, ad.dropout, seed, self.index, x2.device())?),
            _ => None,
        };
        Ok(Some(LoraInputs {
            x: x2,
            weight: &self.weight,
            bias: self.bias.as_ref(),
            a: &ad.a,
            b: &ad.b,
            scale: ad.scale,
            mask,
        }))
    }

    /// The layer applied to silu(g)·u for g, u [..., in] (the MLP's down projection): in training
    /// with a plain adapter on f32 CPU tensors one op that never keeps the product
    /// ([`lora_linear_glu`]), otherwise the fused or composed activation and then
    /// [`LoraLinear::forward`].
    pub fn forward_silu_glu(&self, g: &Tensor, u: &Tensor, ctx: &Fwd) -> Result<Tensor> {
        let ad = ctx.adapter.and_then(|s| self.adapter(s));
        if !ctx.no_grad && g.dims() == u.dims() {
            let dims = g.dims().to_vec();
            let n: usize = dims[..dims.len() - 1].iter().product();
            let (g2, u2) = (g.reshape((n, self.in_features()))?, u.reshape((n, self.in_features()))?);
            if let Some(p) = self.fused_inputs(&g2, ad, ctx)? {
                if let Some(y) = lora_linear_glu(&u2, p)? {
                    return self.with_out_features(&y, dims);
                }
            }
        }
        self.forward(&crate::model::ops::silu_mul(g, u)?, ctx)
    }
}

/// Inverted-dropout mask [n, d] with entries 0 or 1/(1-p), reproducible from (seed, layer).
fn dropout_mask(n: usize, d: usize, p: f32, seed: u64, layer: usize, device: &candle_core::Device) -> Result<Tensor> {
    let mut rng = Rng::stream(seed, layer as u64 + 1);
    let keep = 1.0 / (1.0 - p);
    let v: Vec<f32> = (0..n * d)
        .map(|_| if rng.next_f32() < p { 0.0 } else { keep })
        .collect();
    Tensor::from_vec(v, (n, d), device)
}
