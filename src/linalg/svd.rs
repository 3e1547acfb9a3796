//! Truncated singular value decomposition (the SVD-based adapter combinations, PiSSA) and reduced
//! QR (OLoRA); candle has neither.
//!
//! * Small matrices (the smaller side at most [`EXACT_MAX`]): exact, in f64. A tall matrix is
//!   first reduced by a Householder QR, then the square factor is diagonalised by one-sided
//!   (Hestenes) Jacobi rotations, which are accurate for small singular values too.
//! * Larger matrices: block subspace iteration with Rayleigh–Ritz (the two big products per
//!   iteration run through candle in f64), stopped when the residual of every wanted singular
//!   triplet is below `1e-8·σ₁`. Only the top `k` triplets are ever needed.
//! * A matrix given as a product of thin factors `B·A` (the plain `svd` combination): QR of each
//!   factor and an exact SVD of the small core, without forming the product.
//!
//! Results are sorted by decreasing singular value. Signs of singular vectors are arbitrary, as
//! in LAPACK; `U·S` and `Vᵀ` together are what callers use.

use candle_core::{Device, Tensor};

use super::mat::Mat;
use crate::error::{Error, Result};
use crate::rng::Rng;

/// Largest smaller side decomposed exactly.
pub const EXACT_MAX: usize = 256;
const JACOBI_TOL: f64 = 1e-15;
const JACOBI_MAX_SWEEPS: usize = 80;
const ITER_TOL: f64 = 1e-8;
const ITER_MAX: usize = 300;

/// Which algorithm [`truncated_svd_with`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SvdMethod {
    /// Exact when the smaller side is at most [`EXACT_MAX`], else subspace iteration.
    Auto,
    Exact,
    Iterative,
}

/// The top `k` singular triplets of an `m × n` matrix.
#[derive(Debug, Clone)]
pub struct TruncatedSvd {
    /// `U·diag(S)`, `m × k`.
    pub us: Mat,
    pub s: Vec<f64>,
    /// `Vᵀ`, `k × n`.
    pub vt: Mat,
    /// Iterations used (0 for the exact paths).
    pub iterations: usize,
    /// Largest relative residual `‖A v − σ u‖ / σ₁` of the returned triplets (iterative path).
    pub residual: f64,
}

/// Column-major f64 matrix: column `j` is `d[j*m .. (j+1)*m]`.
#[derive(Debug, Clone)]
struct Cm {
    m: usize,
    n: usize,
    d: Vec<f64>,
}

impl Cm {
    fn zeros(m: usize, n: usize) -> Cm {
        Cm {
            m,
            n,
            d: vec![0.0; m * n],
        }
    }
    fn identity(m: usize, n: usize) -> Cm {
        let mut c = Cm::zeros(m, n);
        for j in 0..m.min(n) {
            c.d[j * m + j] = 1.0;
        }
        c
    }
    fn col(&self, j: usize) -> &[f64] {
        &self.d[j * self.m..(j + 1) * self.m]
    }
    fn col_mut(&mut self, j: usize) -> &mut [f64] {
        &mut self.d[j * self.m..(j + 1) * self.m]
    }
    fn get(&self, i: usize, j: usize) -> f64 {
        self.d[j * self.m + i]
    }
    /// From a row-major f32 matrix.
    fn from_mat(a: &Mat) -> Cm {
        let mut c = Cm::zeros(a.rows, a.cols);
        for i in 0..a.rows {
            for j in 0..a.cols {
                c.d[j * a.rows + i] = a.data[i * a.cols + j] as f64;
            }
        }
        c
    }
    /// From a row-major f32 matrix, transposed.
    fn from_mat_t(a: &Mat) -> Cm {
        Cm {
            m: a.cols,
            n: a.rows,
            d: a.data.iter().map(|&x| x as f64).collect(),
        }
    }
    fn transpose(&self) -> Cm {
        let mut t = Cm::zeros(self.n, self.m);
        for j in 0..self.n {
            for i in 0..self.m {
                t.d[i * self.n + j] = self.d[j * self.m + i];
            }
        }
        t
    }
    /// The first `k` columns.
    fn take_cols(&self, k: usize) -> Cm {
        Cm {
            m: self.m,
            n: k,
            d: self.d[..k * self.m].to_vec(),
        }
    }
    /// `self · other`, plain loops (for the small factors only).
    fn mul(&self, other: &Cm) -> Cm {
        debug_assert_eq!(self.n, other.m);
        let mut out = Cm::zeros(self.m, other.n);
        for j in 0..other.n {
            for l in 0..self.n {
                let f = other.get(l, j);
                if f == 0.0 {
                    continue;
                }
                let a = self.col(l);
                let o = &mut out.d[j * self.m..(j + 1) * self.m];
                for (oi, ai) in o.iter_mut().zip(a) {
                    *oi += f * ai;
                }
            }
        }
        out
    }
    /// Row-major f32 copy.
    fn to_mat(&self) -> Mat {
        let mut data = vec![0f32; self.m * self.n];
        for i in 0..self.m {
            for j in 0..self.n {
                data[i * self.n + j] = self.d[j * self.m + i] as f32;
            }
        }
        Mat {
            rows: self.m,
            cols: self.n,
            data,
        }
    }
    /// Row-major f32 copy of the transpose.
    fn to_mat_t(&self) -> Mat {
        Mat {
            rows: self.n,
            cols: self.m,
            data: self.d.iter().map(|&x| x as f32).collect(),
        }
    }
    /// As a row-major f64 candle tensor.
    fn to_tensor(&self) -> Result<Tensor> {
        // Column-major m×n is row-major n×m; transpose back.
        let t = Tensor::from_slice(&self.d, (self.n, self.m), &Device::Cpu)?;
        Ok(t.t()?.contiguous()?)
    }
    fn from_tensor(t: &Tensor) -> Result<Cm> {
        let (m, n) = t.dims2()?;
        let d = t.t()?.contiguous()?.flatten_all()?.to_vec1::<f64>()?;
        Ok(Cm { m, n, d })
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn norm(a: &[f64]) -> f64 {
    dot(a, a).sqrt()
}

/// Rotate columns `p` and `q` of `a`: `(a_p, a_q) ← (c·a_p − s·a_q, s·a_p + c·a_q)`.
fn rotate(a: &mut Cm, p: usize, q: usize, c: f64, s: f64) {
    let m = a.m;
    let (lo, hi) = a.d.split_at_mut(q * m);
    let cp = &mut lo[p * m..(p + 1) * m];
    let cq = &mut hi[..m];
    for (x, y) in cp.iter_mut().zip(cq.iter_mut()) {
        let (xp, yq) = (*x, *y);
        *x = c * xp - s * yq;
        *y = s * xp + c * yq;
    }
}

/// One-sided Jacobi on `a` (`m × n`, any shape with `m ≥ n` preferred): returns the rotated
/// matrix, whose columns are `σ_j u_j`, the singular values, and `V` (`n × n`), all sorted by
/// decreasing singular value.
fn jacobi(mut a: Cm) -> (Cm, Vec<f64>, Cm) {
    let n = a.n;
    let mut v = Cm::identity(n, n);
    let mut sq: Vec<f64> = (0..n).map(|j| dot(a.col(j), a.col(j))).collect();
    for _ in 0..JACOBI_MAX_SWEEPS {
        let mut rotated = false;
        for p in 0..n {
            for q in p + 1..n {
                let (alpha, beta) = (sq[p], sq[q]);
                if alpha == 0.0 || beta == 0.0 {
                    continue;
                }
                let gamma = dot(a.col(p), a.col(q));
                if gamma.abs() <= JACOBI_TOL * (alpha * beta).sqrt() {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                rotate(&mut a, p, q, c, s);
                rotate(&mut v, p, q, c, s);
                sq[p] = dot(a.col(p), a.col(p));
                sq[q] = dot(a.col(q), a.col(q));
            }
        }
        if !rotated {
            break;
        }
    }
    let s: Vec<f64> = (0..n).map(|j| norm(a.col(j))).collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&x, &y| s[y].total_cmp(&s[x]).then(x.cmp(&y)));
    let mut a2 = Cm::zeros(a.m, n);
    let mut v2 = Cm::zeros(n, n);
    for (dst, &src) in order.iter().enumerate() {
        a2.col_mut(dst).copy_from_slice(a.col(src));
        v2.col_mut(dst).copy_from_slice(v.col(src));
    }
    (a2, order.iter().map(|&j| s[j]).collect(), v2)
}

/// Householder QR of `a` (`m × n`), reduced as LAPACK's: `Q` (`m × k`) with orthonormal columns
/// and upper-trapezoidal `R` (`k × n`), `k = min(m, n)`; each reflector takes `R`'s diagonal
/// entry to the sign opposite its column's leading entry, as geqrf does.
fn householder_qr(a: &Cm) -> (Cm, Cm) {
    let (m, n) = (a.m, a.n);
    let k = m.min(n);
    let mut r = a.clone();
    let mut refl: Vec<(Vec<f64>, f64)> = Vec::with_capacity(k);
    for j in 0..k {
        let x = &r.col(j)[j..];
        let nx = norm(x);
        let mut v = x.to_vec();
        let alpha = if x[0] >= 0.0 { -nx } else { nx };
        v[0] -= alpha;
        let vv = dot(&v, &v);
        if nx == 0.0 || vv == 0.0 {
            refl.push((v, 0.0));
            continue;
        }
        for c in j..n {
            let col = &mut r.col_mut(c)[j..];
            let f = 2.0 * dot(&v, col) / vv;
            for (ci, vi) in col.iter_mut().zip(&v) {
                *ci -= f * vi;
            }
        }
        refl.push((v, vv));
    }
    let mut q = Cm::identity(m, k);
    for j in (0..k).rev() {
        let (v, vv) = &refl[j];
        if *vv == 0.0 {
            continue;
        }
        for c in 0..k {
            let col = &mut q.col_mut(c)[j..];
            let f = 2.0 * dot(v, col) / vv;
            for (ci, vi) in col.iter_mut().zip(v) {
                *ci -= f * vi;
            }
        }
    }
    let mut rr = Cm::zeros(k, n);
    for c in 0..n {
        for i in 0..=c.min(k - 1) {
            rr.d[c * k + i] = r.get(i, c);
        }
    }
    (q, rr)
}

/// Reduced QR of `a` (`m × n`) in f64: `Q` (`m × k`), `R` (`k × n`), `k = min(m, n)` (torch's
/// `linalg.qr` with mode "reduced").
pub fn qr(a: &Mat) -> (Mat, Mat) {
    let (q, r) = householder_qr(&Cm::from_mat(a));
    (q.to_mat(), r.to_mat())
}

/// Exact SVD of `a` with `m ≥ n`: (`U·S` as `m × n`, singular values, `V` as `n × n`).
fn exact_tall(a: Cm) -> (Cm, Vec<f64>, Cm) {
    if a.m > a.n + a.n / 2 {
        let (q, r) = householder_qr(&a);
        let (us_r, s, v) = jacobi(r);
        (q.mul(&us_r), s, v)
    } else {
        jacobi(a)
    }
}

/// Orthonormalise the columns of `x` in place (modified Gram–Schmidt, twice). A column that
/// vanishes (rank deficiency) is replaced by a random direction orthogonal to the others.
fn orthonormalize(x: &mut Cm, rng: &mut Rng) {
    let (m, n) = (x.m, x.n);
    for j in 0..n {
        let mut tries = 0;
        loop {
            let before = norm(x.col(j));
            for _ in 0..2 {
                for i in 0..j {
                    let (lo, hi) = x.d.split_at_mut(j * m);
                    let qi = &lo[i * m..(i + 1) * m];
                    let cj = &mut hi[..m];
                    let f = dot(qi, cj);
                    for (c, q) in cj.iter_mut().zip(qi) {
                        *c -= f * q;
                    }
                }
            }
            let after = norm(x.col(j));
            if after > 1e-10 * before.max(f64::MIN_POSITIVE) && after > 0.0 && tries < 8 {
                for c in x.col_mut(j) {
                    *c /= after;
                }
                break;
            }
            if tries >= 8 {
                // m < n cannot happen for the callers; leave a zero column rather than loop.
                for c in x.col_mut(j) {
                    *c = 0.0;
                }
                break;
            }
            tries += 1;
            for c in x.col_mut(j) {
                *c = rng.next_normal();
            }
        }
    }
}

/// The top `k` singular triplets of `a` (`m × n`).
pub fn truncated_svd(a: &Mat, k: usize) -> Result<TruncatedSvd> {
    truncated_svd_with(a, k, SvdMethod::Auto)
}

pub fn truncated_svd_with(a: &Mat, k: usize, method: SvdMethod) -> Result<TruncatedSvd> {
    let (m, n) = (a.rows, a.cols);
    // internal invariant: the merge checks --svd_rank against each module first
    if k == 0 || k > m.min(n) {
        return Err(Error::Msg(format!(
            "rank {k} is outside 1..={} for a {m}×{n} matrix",
            m.min(n)
        )));
    }
    let exact = match method {
        SvdMethod::Exact => true,
        SvdMethod::Iterative => false,
        SvdMethod::Auto => m.min(n) <= EXACT_MAX,
    };
    // Work on the tall orientation; transpose the result back when needed.
    let wide = m < n;
    if exact {
        let c = if wide { Cm::from_mat_t(a) } else { Cm::from_mat(a) };
        let (us, s, v) = exact_tall(c);
        return Ok(finish(us, s, v, k, wide, 0, 0.0));
    }
    iterative(a, k, wide)
}

/// Assemble the result from a tall-orientation decomposition `A' = (US)·Vᵀ`, where `A' = Aᵀ` when
/// `wide`.
fn finish(us: Cm, s: Vec<f64>, v: Cm, k: usize, wide: bool, iterations: usize, residual: f64) -> TruncatedSvd {
    let s_k: Vec<f64> = s[..k].to_vec();
    if !wide {
        TruncatedSvd {
            us: us.take_cols(k).to_mat(),
            s: s_k,
            vt: v.take_cols(k).to_mat_t(),
            iterations,
            residual,
        }
    } else {
        // Aᵀ = (U S) Vᵀ  ⇒  A = V (S Uᵀ): the roles swap; rescale so that U·S carries S.
        let mut vs = v.take_cols(k);
        let mut ut = us.take_cols(k);
        for (j, &sj) in s.iter().enumerate().take(k) {
            for x in vs.col_mut(j) {
                *x *= sj;
            }
            if sj > 0.0 {
                for x in ut.col_mut(j) {
                    *x /= sj;
                }
            } else {
                for x in ut.col_mut(j) {
                    *x = 0.0;
                }
            }
        }
        TruncatedSvd {
            us: vs.to_mat(),
            s: s_k,
            vt: ut.to_mat_t(),
            iterations,
            residual,
        }
    }
}

/// Subspace iteration with Rayleigh–Ritz for the top `k` triplets of a large matrix.
fn iterative(a: &Mat, k: usize, wide: bool) -> Result<TruncatedSvd> {
    // Tall orientation T (m × n, m ≥ n) as an f64 tensor; `t_t` is its transpose.
    let a64 = a.to_tensor()?.to_dtype(candle_core::DType::F64)?;
    let (t, t_t) = if wide {
        (a64.t()?.contiguous()?, a64)
    } else {
        let tt = a64.t()?.contiguous()?;
        (a64, tt)
    };
    let n = t.dims2()?.1;
    let b = n.min(2 * k + 16);
    let mut rng = Rng::new(0x5EED_5BD0);
    let mut omega = Cm::zeros(n, b);
    for x in omega.d.iter_mut() {
        *x = rng.next_normal();
    }
    let mut q = Cm::from_tensor(&t.matmul(&omega.to_tensor()?)?)?;
    orthonormalize(&mut q, &mut rng);
    let mut last = None;
    for it in 1..=ITER_MAX {
        // Bᵀ = Tᵀ Q (n × b); its SVD Bᵀ W = (σ_j v_j) gives the Ritz values and right vectors.
        let bt = Cm::from_tensor(&t_t.matmul(&q.to_tensor()?)?)?;
        let (c, s, w) = exact_tall(bt);
        let mut z = c.clone();
        orthonormalize(&mut z, &mut rng);
        let y = Cm::from_tensor(&t.matmul(&z.to_tensor()?)?)?;
        let u = q.mul(&w);
        let s0 = s[0];
        let mut res = 0f64;
        for (j, &sj) in s.iter().enumerate().take(k) {
            let r: f64 = y
                .col(j)
                .iter()
                .zip(u.col(j))
                .map(|(yi, ui)| (yi - sj * ui).powi(2))
                .sum::<f64>()
                .sqrt();
            res = res.max(r);
        }
        let rel = if s0 > 0.0 { res / s0 } else { 0.0 };
        if rel <= ITER_TOL || it == ITER_MAX {
            // U·S from the Ritz vectors; V from z, zeroed where σ vanishes.
            let mut us = u.take_cols(k);
            let mut v = z.take_cols(k);
            for (j, &sj) in s.iter().enumerate().take(k) {
                for x in us.col_mut(j) {
                    *x *= sj;
                }
                if sj <= s0 * 1e-13 {
                    for x in v.col_mut(j) {
                        *x = 0.0;
                    }
                }
            }
            return Ok(finish(us, s, v, k, wide, it, rel));
        }
        last = Some(rel);
        q = y;
        orthonormalize(&mut q, &mut rng);
    }
    Err(Error::SvdNotConverged { residual: last })
}

/// Top `k` triplets of the product `b·a` (`b`: `m × R`, `a`: `R × n`) without forming it: QR of
/// each factor, exact SVD of the `R × R` core. Needs `R ≤ min(m, n)`.
pub fn truncated_svd_of_product(b: &Mat, a: &Mat, k: usize) -> Result<TruncatedSvd> {
    let (m, r, n) = (b.rows, b.cols, a.cols);
    // internal invariants: the factors come from one module, the rank is checked by the merge
    if a.rows != r {
        return Err(Error::Msg(format!(
            "factor shapes {m}×{r} and {}×{n} do not chain",
            a.rows
        )));
    }
    if k == 0 || k > m.min(n) {
        return Err(Error::Msg(format!(
            "rank {k} is outside 1..={} for a {m}×{n} matrix",
            m.min(n)
        )));
    }
    if r > m.min(n) {
        return truncated_svd(&b.matmul(a)?, k);
    }
    let (q1, r1) = householder_qr(&Cm::from_mat(b));
    let (q2, r2) = householder_qr(&Cm::from_mat_t(a));
    let core = r1.mul(&r2.transpose());
    let (us_c, s, v_c) = exact_tall(core);
    let us = q1.mul(&us_c);
    let v = q2.mul(&v_c);
    // The core is R × R; pad with zero triplets when k > R.
    let (us, s, v) = if k > r {
        let mut us2 = Cm::zeros(m, k);
        us2.d[..us.d.len()].copy_from_slice(&us.d);
        let mut v2 = Cm::zeros(n, k);
        v2.d[..v.d.len()].copy_from_slice(&v.d);
        let mut s2 = s.clone();
        s2.resize(k, 0.0);
        (us2, s2, v2)
    } else {
        (us, s, v)
    };
    Ok(finish(us, s, v, k, false, 0, 0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(rows: usize, cols: usize, seed: u64) -> Mat {
        let mut rng = Rng::new(seed);
        Mat {
            rows,
            cols,
            data: (0..rows * cols).map(|_| rng.next_normal() as f32).collect(),
        }
    }

    fn reconstruct(t: &TruncatedSvd) -> Mat {
        t.us.matmul(&t.vt).unwrap()
    }

    fn max_diff(a: &Mat, b: &Mat) -> f32 {
        a.data
            .iter()
            .zip(&b.data)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn full_rank_reconstructs_exactly() {
        for (m, n) in [(7, 5), (5, 7), (40, 12), (12, 40), (9, 9)] {
            let a = random(m, n, 3);
            let t = truncated_svd(&a, m.min(n)).unwrap();
            assert!(max_diff(&reconstruct(&t), &a) < 1e-5, "{m}x{n}");
            assert!(t.s.windows(2).all(|w| w[0] >= w[1]));
            // Rows of Vᵀ are orthonormal.
            let g =
                t.vt.matmul(&Mat {
                    rows: t.vt.cols,
                    cols: t.vt.rows,
                    data: transpose(&t.vt),
                })
                .unwrap();
            for i in 0..g.rows {
                for j in 0..g.cols {
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!((g.data[i * g.cols + j] - want).abs() < 1e-5);
                }
            }
        }
    }

    fn transpose(a: &Mat) -> Vec<f32> {
        let mut out = vec![0f32; a.data.len()];
        for i in 0..a.rows {
            for j in 0..a.cols {
                out[j * a.rows + i] = a.data[i * a.cols + j];
            }
        }
        out
    }

    #[test]
    fn product_path_equals_dense_path() {
        let b = random(30, 6, 1);
        let a = random(6, 20, 2);
        let dense = truncated_svd(&b.matmul(&a).unwrap(), 4).unwrap();
        let fact = truncated_svd_of_product(&b, &a, 4).unwrap();
        for (x, y) in dense.s.iter().zip(&fact.s) {
            assert!((x - y).abs() < 1e-5 * dense.s[0]);
        }
        assert!(max_diff(&reconstruct(&dense), &reconstruct(&fact)) < 1e-4);
        // Asking for more than the rank pads with zero triplets.
        let big = truncated_svd_of_product(&b, &a, 9).unwrap();
        assert!(big.s[6..].iter().all(|&s| s == 0.0));
        assert!(max_diff(&reconstruct(&big), &b.matmul(&a).unwrap()) < 1e-4);
    }
}
