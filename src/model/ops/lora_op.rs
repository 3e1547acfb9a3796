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

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};

use super::frozen::strided_offsets;

/// A row-major view of a matrix inside a slice: element (i, j) at `i·rs + j·cs`.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    /// The contiguous [rows, cols] matrix in `data`.
    fn new(data: &'a [f32], rows: usize, cols: usize) -> Mat<'a> {
        Mat {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The same elements read as the transpose.
    fn t(self) -> Mat<'a> {
        Mat {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    fn fits(&self) -> bool {
        self.rows == 0 || self.cols == 0 || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// dst [m, n] (contiguous) = (dst if `accumulate`) + beta · lhs [m, k] · rhs [k, n].
fn gemm_into(dst: &mut [f32], lhs: Mat, rhs: Mat, beta: f32, accumulate: bool) -> Result<()> {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    if rhs.rows != k || dst.len() != m * n || !lhs.fits() || !rhs.fits() {
        candle_core::bail!(
            "lora linear: a [{m}, {k}]·[{}, {n}] product into {} elements",
            rhs.rows,
            dst.len()
        );
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return Ok(());
    }
    let threads = rayon::current_num_threads();
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every index the product reads or writes lies inside its slice (checked above by
    // `fits` and the length of dst), and dst does not alias lhs or rhs (it is borrowed mutably).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            par,
        );
    }
    Ok(())
}

/// The f32 elements of a CPU tensor in row-major order, borrowed when contiguous, handed to `f`.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (st, l) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(v)) = &*st else {
        candle_core::bail!("lora linear: expected an f32 CPU tensor")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => f(&v[a..b]),
        None => {
            let owned: Vec<f32> = strided_offsets(l).into_iter().map(|i| v[i]).collect();
            f(&owned)
        }
    }
}

fn storage_f32<'a>(s: &'a CpuStorage, l: &Layout) -> Result<std::borrow::Cow<'a, [f32]>> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("lora linear: expected f32")
    };
    Ok(match l.contiguous_offsets() {
        Some((a, b)) => std::borrow::Cow::Borrowed(&v[a..b]),
        None => std::borrow::Cow::Owned(strided_offsets(l).into_iter().map(|i| v[i]).collect()),
    })
}

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
        let (n, k) = xl.shape().dims2()?;
        let (r, out) = (al.dims()[0], bl.dims()[0]);
        let x = storage_f32(xs, xl)?;
        let (a, b) = (storage_f32(as_, al)?, storage_f32(bs, bl)?);
        let mut y = vec![0f32; n * out];
        with_f32(&self.weight, |w| {
            gemm_into(&mut y, Mat::new(&x, n, k), Mat::new(w, out, k).t(), 1.0, false)
        })?;
        let xd = self.dropped(&x)?;
        let mut xa = vec![0f32; n * r];
        gemm_into(&mut xa, Mat::new(&xd, n, k), Mat::new(&a, r, k).t(), 1.0, false)?;
        gemm_into(&mut y, Mat::new(&xa, n, r), Mat::new(&b, out, r).t(), self.scale, true)?;
        if let Some(bias) = &self.bias {
            for row in y.chunks_exact_mut(out) {
                row.iter_mut().zip(bias).for_each(|(o, b)| *o += b);
            }
        }
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
        let (n, k) = x.dims2()?;
        let (r, out) = (a.dim(0)?, b.dim(0)?);
        let dev = x.device();
        with_f32(x, |xv| {
            with_f32(grad, |g| {
                let (av, bv) = (a.flatten_all()?.to_vec1::<f32>()?, b.flatten_all()?.to_vec1::<f32>()?);
                let xd = self.dropped(xv)?;
                let gm = Mat::new(g, n, out);
                // s·g·B [N, r]: the gradient of the rank-r intermediate.
                let mut gb = vec![0f32; n * r];
                gemm_into(&mut gb, gm, Mat::new(&bv, out, r), self.scale, false)?;
                let db = if b.track_op() {
                    let mut xa = vec![0f32; n * r];
                    gemm_into(&mut xa, Mat::new(&xd, n, k), Mat::new(&av, r, k).t(), 1.0, false)?;
                    let mut db = vec![0f32; out * r];
                    gemm_into(&mut db, gm.t(), Mat::new(&xa, n, r), self.scale, false)?;
                    Some(Tensor::from_vec(db, (out, r), dev)?)
                } else {
                    None
                };
                let da = if a.track_op() {
                    let mut da = vec![0f32; r * k];
                    gemm_into(&mut da, Mat::new(&gb, n, r).t(), Mat::new(&xd, n, k), 1.0, false)?;
                    Some(Tensor::from_vec(da, (r, k), dev)?)
                } else {
                    None
                };
                let dx = if x.track_op() {
                    Some(Tensor::from_vec(self.input_grad(gm, &gb, &av, r)?, (n, k), dev)?)
                } else {
                    None
                };
                Ok((dx, da, db))
            })
        })
    }
}

impl LoraLinearOp {
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
        mask: p.mask,
    };
    Ok(Some(p.x.apply_op3(p.a, p.b, op)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn rand(shape: (usize, usize), seed: u64) -> Tensor {
        let mut rng = crate::rng::Rng::new(seed);
        let v: Vec<f32> = (0..shape.0 * shape.1).map(|_| rng.next_f32() * 2.0 - 1.0).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
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
            let mut composed = (xin.matmul(&w.t().unwrap()).unwrap()
                + (xd.matmul(&a.t().unwrap()).unwrap() * s)
                    .unwrap()
                    .matmul(&b.t().unwrap())
                    .unwrap())
            .unwrap();
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
