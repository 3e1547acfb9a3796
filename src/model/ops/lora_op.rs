//! One LoRA linear layer as a single op with its own backward, for f32 on the CPU:
//! y = x·Wᵀ (+ bias) + s·((x⊙mask)·Aᵀ)·Bᵀ, W frozen, mask the optional dropout mask.
//!
//! Composed from tensor ops the layer keeps its base product, its adapter product and their sum
//! ([N, out] each) until the backward pass, and the backward allocates as many again. Here the
//! adapter product accumulates into the base product's buffer, the node keeps only x, A and B
//! (and the mask), and the backward recomputes the [N, r] product x·Aᵀ instead of keeping it:
//!
//! dB = s·gᵀ·(x̃Aᵀ), dA = s·(g·B)ᵀ·x̃, dx = g·W + (s·(g·B)·A)⊙mask, with x̃ = x⊙mask.
//!
//! The products run on the `gemm` crate (the kernels candle's CPU matmul uses), called directly
//! so that a product can accumulate into an existing buffer. Other dtypes and devices, and DoRA,
//! take the composed path in [`crate::model::linear`].

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::cpu::{gemm_into, storage_f32, with_f32, Mat};

struct LoraLinearOp {
    /// [out, in], f32, contiguous.
    weight: Tensor,
    /// [out], f32.
    bias: Option<Vec<f32>>,
    scale: f32,
    /// Inverted-dropout mask [N, in] (entries 0 or 1/(1−p)).
    mask: Option<Tensor>,
}

impl LoraLinearOp {
    /// x⊙mask, or x itself without dropout.
    fn dropped<'a>(&self, x: &'a [f32]) -> Result<std::borrow::Cow<'a, [f32]>> {
        match &self.mask {
            None => Ok(std::borrow::Cow::Borrowed(x)),
            Some(m) => with_f32(m, |mv| {
                Ok(std::borrow::Cow::Owned(x.iter().zip(mv).map(|(a, b)| a * b).collect()))
            }),
        }
    }
}

/// Which of A, B and x a backward pass asks gradients for.
#[derive(Clone, Copy)]
struct Wanted {
    x: bool,
    a: bool,
    b: bool,
}

impl LoraLinearOp {
    /// y [N, out] for x [N, in], A [r, in], B [out, r].
    fn forward(&self, x: &[f32], a: &[f32], b: &[f32], n: usize) -> Result<Vec<f32>> {
        let k = x.len() / n.max(1);
        let r = a.len() / k.max(1);
        let out = b.len() / r.max(1);
        let mut y = vec![0f32; n * out];
        with_f32(&self.weight, |w| {
            gemm_into(&mut y, Mat::new(x, n, k), Mat::new(w, out, k).t(), 1.0, false)
        })?;
        let xd = self.dropped(x)?;
        let mut xa = vec![0f32; n * r];
        gemm_into(&mut xa, Mat::new(&xd, n, k), Mat::new(a, r, k).t(), 1.0, false)?;
        gemm_into(&mut y, Mat::new(&xa, n, r), Mat::new(b, out, r).t(), self.scale, true)?;
        if let Some(bias) = &self.bias {
            for row in y.chunks_exact_mut(out) {
                row.iter_mut().zip(bias).for_each(|(o, b)| *o += b);
            }
        }
        Ok(y)
    }

    /// (dx, dA, dB), each only where `want` asks, given the output gradient g [N, out].
    fn backward(&self, x: &[f32], g: &[f32], (a, b): (&[f32], &[f32]), n: usize, want: Wanted) -> Result<Grads> {
        let k = x.len() / n.max(1);
        let r = a.len() / k.max(1);
        let out = b.len() / r.max(1);
        let xd = self.dropped(x)?;
        let gm = Mat::new(g, n, out);
        // s·g·B [N, r]: the gradient of the rank-r intermediate.
        let mut gb = vec![0f32; n * r];
        gemm_into(&mut gb, gm, Mat::new(b, out, r), self.scale, false)?;
        let db = if want.b {
            let mut xa = vec![0f32; n * r];
            gemm_into(&mut xa, Mat::new(&xd, n, k), Mat::new(a, r, k).t(), 1.0, false)?;
            let mut db = vec![0f32; out * r];
            gemm_into(&mut db, gm.t(), Mat::new(&xa, n, r), self.scale, false)?;
            Some(db)
        } else {
            None
        };
        let da = if want.a {
            let mut da = vec![0f32; r * k];
            gemm_into(&mut da, Mat::new(&gb, n, r).t(), Mat::new(&xd, n, k), 1.0, false)?;
            Some(da)
        } else {
            None
        };
        let dx = if want.x {
            Some(self.input_grad(gm, &gb, a, r)?)
        } else {
            None
        };
        Ok(Grads { dx, da, db })
    }

    /// dx = g·W + (gb·A)⊙mask for gb = s·g·B [N, r].
    fn input_grad(&self, g: Mat, gb: &[f32], a: &[f32], r: usize) -> Result<Vec<f32>> {
        let (n, out) = (g.rows, g.cols);
        let k = a.len() / r.max(1);
        let mut dx = vec![0f32; n * k];
        with_f32(&self.weight, |w| gemm_into(&mut dx, g, Mat::new(w, out, k), 1.0, false))?;
        match &self.mask {
            None => gemm_into(&mut dx, Mat::new(gb, n, r), Mat::new(a, r, k), 1.0, true)?,
            Some(m) => {
                let mut t = vec![0f32; n * k];
                gemm_into(&mut t, Mat::new(gb, n, r), Mat::new(a, r, k), 1.0, false)?;
                with_f32(m, |mv| {
                    for ((d, t), m) in dx.iter_mut().zip(&t).zip(mv) {
                        *d += t * m;
                    }
                    Ok(())
                })?;
            }
        }
        Ok(dx)
    }
}

struct Grads {
    dx: Option<Vec<f32>>,
    da: Option<Vec<f32>>,
    db: Option<Vec<f32>>,
}

fn tensor_of(data: Option<Vec<f32>>, like: &Tensor) -> Result<Option<Tensor>> {
    data.map(|d| Tensor::from_vec(d, like.shape(), like.device()))
        .transpose()
}

impl CustomOp3 for LoraLinearOp {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = xl.shape().dims2()?.0;
        let out = bl.dims()[0];
        let x = storage_f32(xs, xl)?;
        let y = self.forward(&x, &storage_f32(as_, al)?, &storage_f32(bs, bl)?, n)?;
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = x.dim(0)?;
        let want = Wanted {
            x: x.track_op(),
            a: a.track_op(),
            b: b.track_op(),
        };
        let gr = with_f32(x, |xv| {
            with_f32(grad, |g| {
                with_f32(a, |av| with_f32(b, |bv| self.backward(xv, g, (av, bv), n, want)))
            })
        })?;
        Ok((tensor_of(gr.dx, x)?, tensor_of(gr.da, a)?, tensor_of(gr.db, b)?))
    }
}

// ---------------------------------------------------------------------------------------------
// The MLP's down projection with the gated activation folded in: y = lora(silu(g)⊙u), so that
// the [N, intermediate] activation is never kept: the node keeps g and u (which the activation's
// backward needs anyway), and the backward recomputes silu(g)⊙u.

struct GluLoraOp {
    lin: LoraLinearOp,
    /// Elements of A [r, in] at the front of the packed adapter operand; B [out, r] follows.
    a_len: usize,
}

/// silu(g)⊙u.
fn glu(g: &[f32], u: &[f32]) -> Vec<f32> {
    let mut y = vec![0f32; g.len()];
    super::fused::silu_mul_into(&mut y, g, u);
    y
}

impl CustomOp3 for GluLoraOp {
    fn name(&self) -> &'static str {
        "lora-linear-glu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = gl.shape().dims2()?.0;
        let x = glu(&storage_f32(gs, gl)?, &storage_f32(us, ul)?);
        let packed = storage_f32(ps, pl)?;
        let (a, b) = packed.split_at(self.a_len.min(packed.len()));
        let y = self.lin.forward(&x, a, b, n)?;
        let out = y.len() / n.max(1);
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        packed: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = g.dim(0)?;
        let want = Wanted {
            x: g.track_op() || u.track_op(),
            a: packed.track_op(),
            b: packed.track_op(),
        };
        let (dg, du, dp) = with_f32(g, |gv| {
            with_f32(u, |uv| {
                let x = glu(gv, uv);
                let gr = with_f32(grad, |dy| {
                    with_f32(packed, |p| {
                        let (a, b) = p.split_at(self.a_len.min(p.len()));
                        self.lin.backward(&x, dy, (a, b), n, want)
                    })
                })?;
                drop(x);
                let (dg, du) = match gr.dx {
                    Some(dx) => {
                        let (dg, du) = super::fused::silu_mul_backward(gv, uv, &dx);
                        (Some(dg), Some(du))
                    }
                    None => (None, None),
                };
                let dp = match (gr.da, gr.db) {
                    (Some(mut da), Some(db)) => {
                        da.extend_from_slice(&db);
                        Some(da)
                    }
                    _ => None,
                };
                Ok((dg, du, dp))
            })
        })?;
        let dg = if g.track_op() { dg } else { None };
        let du = if u.track_op() { du } else { None };
        Ok((tensor_of(dg, g)?, tensor_of(du, u)?, tensor_of(dp, packed)?))
    }
}

/// The inputs of one fused LoRA linear product.
pub struct LoraInputs<'a> {
    /// x [N, in].
    pub x: &'a Tensor,
    /// Frozen W [out, in].
    pub weight: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    /// A [r, in], B [out, r].
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub scale: f64,
    /// Dropout mask [N, in], or `None`.
    pub mask: Option<Tensor>,
}

/// y = x·Wᵀ (+ bias) + s·((x⊙mask)·Aᵀ)·Bᵀ as one op when every operand is an f32 CPU tensor and
/// W is not itself tracked; `None` otherwise (the caller composes the product).
pub fn lora_linear(p: LoraInputs) -> Result<Option<Tensor>> {
    match checked_op(&p)? {
        Some(op) => Ok(Some(p.x.apply_op3(p.a, p.b, op)?)),
        None => Ok(None),
    }
}

/// The op for `p`, or `None` where the fused path does not apply.
fn checked_op(p: &LoraInputs) -> Result<Option<LoraLinearOp>> {
    let ok = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    let two = [p.x, p.weight, p.a, p.b].iter().all(|t| ok(t) && t.rank() == 2);
    let bias_ok = p.bias.is_none_or(|b| ok(b) && b.rank() == 1);
    let mask_ok = p.mask.as_ref().is_none_or(|m| ok(m) && m.dims() == p.x.dims());
    if !(two && bias_ok && mask_ok) || p.weight.track_op() {
        return Ok(None);
    }
    let (out, k) = p.weight.dims2()?;
    let (r, ka) = p.a.dims2()?;
    if p.x.dim(1)? != k || ka != k || p.b.dims() != [out, r] || p.bias.is_some_and(|b| b.dims() != [out]) {
        candle_core::bail!(
            "lora linear: x {:?}, W {:?}, A {:?}, B {:?} do not fit together",
            p.x.dims(),
            p.weight.dims(),
            p.a.dims(),
            p.b.dims()
        );
    }
    let op = LoraLinearOp {
        weight: p.weight.contiguous()?,
        bias: p.bias.map(|b| b.to_vec1::<f32>()).transpose()?,
        scale: p.scale as f32,
        mask: p.mask.clone(),
    };
    Ok(Some(op))
}

/// y = lora(silu(g)⊙u) for the gate g = `p.x` and `u` [N, in] (the MLP's down projection over
/// its gated activation) as one op that keeps g and u but not their product, under the same
/// conditions as [`lora_linear`]; `None` otherwise.
pub fn lora_linear_glu(u: &Tensor, p: LoraInputs) -> Result<Option<Tensor>> {
    if u.dims() != p.x.dims() || !(u.device().is_cpu() && u.dtype() == DType::F32) {
        return Ok(None);
    }
    let Some(op) = checked_op(&p)? else {
        return Ok(None);
    };
    let packed = Tensor::cat(&[p.a.flatten_all()?, p.b.flatten_all()?], 0)?;
    let op = GluLoraOp {
        lin: op,
        a_len: p.a.elem_count(),
    };
    Ok(Some(p.x.apply_op3(u, &packed, op)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::testing::{max_diff, uniform};
    use candle_core::Var;

    fn rand(shape: (usize, usize), seed: u64) -> Tensor {
        uniform(&[shape.0, shape.1], seed, 1.0)
    }

    /// x·Wᵀ + s·(x̃·Aᵀ)·Bᵀ from tensor ops, x̃ the dropped-out input.
    fn composed_layer(x: &Tensor, xd: &Tensor, w: &Tensor, (a, b): (&Tensor, &Tensor), s: f64) -> Tensor {
        let adapter = (xd.matmul(&a.t().unwrap()).unwrap() * s)
            .unwrap()
            .matmul(&b.t().unwrap())
            .unwrap();
        (x.matmul(&w.t().unwrap()).unwrap() + adapter).unwrap()
    }

    /// Forward and every gradient against the same layer composed from tensor ops, with and
    /// without bias and dropout, and with an untracked input (no dx asked for).
    #[test]
    fn matches_composed_layer() {
        let (n, k, out, r) = (13, 24, 17, 4);
        for (bias, dropout, track_x) in [(false, false, true), (true, true, true), (true, false, false)] {
            let x = Var::from_tensor(&rand((n, k), 1)).unwrap();
            let a = Var::from_tensor(&rand((r, k), 2)).unwrap();
            let b = Var::from_tensor(&rand((out, r), 3)).unwrap();
            let w = rand((out, k), 4);
            let bv = bias.then(|| rand((1, out), 5).squeeze(0).unwrap());
            let mask = dropout
                .then(|| rand((n, k), 6).ge(-0.5).unwrap().to_dtype(DType::F32).unwrap() * 2.0)
                .map(|m| m.unwrap());
            let xin = if track_x {
                x.as_tensor().clone()
            } else {
                x.as_tensor().detach()
            };
            let s = 1.75;
            let fused = lora_linear(LoraInputs {
                x: &xin,
                weight: &w,
                bias: bv.as_ref(),
                a: a.as_tensor(),
                b: b.as_tensor(),
                scale: s,
                mask: mask.clone(),
            })
            .unwrap()
            .unwrap();
            let xd = match &mask {
                Some(m) => (&xin * m).unwrap(),
                None => xin.clone(),
            };
            let mut composed = composed_layer(&xin, &xd, &w, (a.as_tensor(), b.as_tensor()), s);
            if let Some(bv) = &bv {
                composed = composed.broadcast_add(bv).unwrap();
            }
            assert!(max_diff(&fused, &composed) < 1e-5, "forward");
            let up = rand((n, out), 7);
            let gf = (&fused * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = (&composed * &up).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in [("A", &a), ("B", &b)] {
                let (f, c) = (gf.get(v).unwrap(), gc.get(v).unwrap());
                assert!(max_diff(f, c) < 1e-4, "d{name} differs by {}", max_diff(f, c));
            }
            match (gf.get(&x), gc.get(&x)) {
                (Some(f), Some(c)) => assert!(max_diff(f, c) < 1e-4, "dx differs by {}", max_diff(f, c)),
                (None, None) => assert!(!track_x),
                _ => panic!("dx present in one backward only"),
            }
        }
    }

    /// The down projection over silu(g)⊙u against the activation and the layer composed: the
    /// forward and the gradients of g, u, A and B, with and without dropout.
    #[test]
    fn glu_matches_activation_then_layer() {
        let (n, k, out, r) = (11, 20, 9, 3);
        for dropout in [false, true] {
            let g = Var::from_tensor(&rand((n, k), 11)).unwrap();
            let u = Var::from_tensor(&rand((n, k), 12)).unwrap();
            let a = Var::from_tensor(&rand((r, k), 13)).unwrap();
            let b = Var::from_tensor(&rand((out, r), 14)).unwrap();
            let w = rand((out, k), 15);
            let mask = dropout
                .then(|| rand((n, k), 16).ge(-0.4).unwrap().to_dtype(DType::F32).unwrap() * 1.5)
                .map(|m| m.unwrap());
            let s = 0.6;
            let fused = lora_linear_glu(
                u.as_tensor(),
                LoraInputs {
                    x: g.as_tensor(),
                    weight: &w,
                    bias: None,
                    a: a.as_tensor(),
                    b: b.as_tensor(),
                    scale: s,
                    mask: mask.clone(),
                },
            )
            .unwrap()
            .unwrap();
            let x = (g.as_tensor().silu().unwrap() * u.as_tensor()).unwrap();
            let xd = match &mask {
                Some(m) => (&x * m).unwrap(),
                None => x.clone(),
            };
            let composed = composed_layer(&x, &xd, &w, (a.as_tensor(), b.as_tensor()), s);
            assert!(max_diff(&fused, &composed) < 1e-5, "forward");
            let up = rand((n, out), 17);
            let gf = (&fused * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = (&composed * &up).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in [("g", &g), ("u", &u), ("A", &a), ("B", &b)] {
                let (f, c) = (
                    gf.get(v).expect("fused gradient"),
                    gc.get(v).expect("composed gradient"),
                );
                assert!(max_diff(f, c) < 1e-4, "d{name} differs by {}", max_diff(f, c));
            }
        }
    }

    #[test]
    fn declines_other_dtypes_and_rejects_mismatched_shapes() {
        let x = rand((3, 8), 1);
        let w = rand((5, 8), 2);
        let (a, b) = (rand((2, 8), 3), rand((5, 2), 4));
        let bf = x.to_dtype(DType::BF16).unwrap();
        let inputs = |x| LoraInputs {
            x,
            weight: &w,
            bias: None,
            a: &a,
            b: &b,
            scale: 1.0,
            mask: None,
        };
        assert!(lora_linear(inputs(&bf)).unwrap().is_none());
        let short = rand((3, 7), 5);
        assert!(lora_linear(inputs(&short)).is_err());
    }
}
