//! Element-wise loops of the CPU kernels that call `exp`: softmax rows, log-sum-exp, the
//! log-softmax gradient and the SiLU gate. `exp` here is branch-free (range reduction to
//! [-ln2/2, ln2/2], a degree-6 polynomial, the power of two built from its bits), so the loops
//! vectorise; each is compiled twice, for the baseline target and with AVX2+FMA, and the CPU
//! picks at run time. Against the C library's `expf` it is within 2 ulp over the range where the
//! result is a normal float.

/// e^x for f32: 0 below -86.64 (where e^x < 2^-125), +inf above 88.7228, NaN for NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LO: f32 = -86.64;
    const HI: f32 = 88.722_83;
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts, so that n·ln2 is subtracted without rounding error for |n| ≤ 128.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2^23: adding it rounds to an integer, held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    // NaN stays NaN.
    let xc = x.clamp(LO, HI);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let ni = t.to_bits() as i32 - ROUND.to_bits() as i32;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^(n-1)·2, so that n = 128 (x near HI) still has a representable first factor.
    let half = f32::from_bits(((ni + 126) << 23) as u32);
    let e = y * half * 2.0;
    if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        e
    }
}

/// Whether this CPU runs the AVX2+FMA versions (checked once).
#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    use std::sync::OnceLock;
    static YES: OnceLock<bool> = OnceLock::new();
    *YES.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// Defines `fn $name(args) -> ret` that runs `body` compiled with AVX2+FMA when the CPU has
/// them and for the baseline target otherwise.
macro_rules! dispatched {
    ($(#[$m:meta])* pub fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty $body:block) => {
        $(#[$m])*
        pub fn $name($($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn imp($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn wide($($arg: $ty),*) -> $ret {
                    imp($($arg),*)
                }
                if has_avx2() {
                    // SAFETY: the CPU has AVX2 and FMA (checked at run time).
                    return unsafe { wide($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}

/// Σ x, in eight interleaved partial sums (so that it vectorises).
#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    let tail: f32 = chunks.remainder().iter().sum();
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = a.max(v);
        }
    }
    let tail = chunks.remainder().iter().copied().fold(f32::NEG_INFINITY, f32::max);
    acc.iter().copied().fold(tail, f32::max)
}

dispatched! {
    /// row = softmax(scale · row + mask) in place (`None`: nothing masked).
    pub fn softmax_row(row: &mut [f32], mask: Option<&[f32]>, scale: f32) -> () {
        match mask {
            Some(m) => row.iter_mut().zip(m).for_each(|(o, &mv)| *o = *o * scale + mv),
            None => row.iter_mut().for_each(|o| *o *= scale),
        }
        let top = max(row);
        row.iter_mut().for_each(|o| *o = exp(*o - top));
        let inv = 1.0 / sum(row);
        row.iter_mut().for_each(|o| *o *= inv);
    }
}

dispatched! {
    /// log Σ e^x (−inf for an empty or all −inf row; NaN propagates).
    pub fn log_sum_exp(x: &[f32]) -> f32 {
        let m = max(x);
        if !m.is_finite() {
            return m;
        }
        let mut buf = [0f32; 256];
        let mut total = 0f32;
        for c in x.chunks(256) {
            let b = &mut buf[..c.len()];
            b.iter_mut().zip(c).for_each(|(o, &v)| *o = exp(v - m));
            total += sum(b);
        }
        m + total.ln()
    }
}

dispatched! {
    /// d = −g · e^(x − lse): the log-softmax gradient of one row but its label's term, for the
    /// row's upstream gradient g. `d` and `x` may be the same row (`d` then holds x on entry).
    pub fn neg_softmax_grad(d: &mut [f32], x: Option<&[f32]>, lse: f32, g: f32) -> () {
        match x {
            Some(x) => d.iter_mut().zip(x).for_each(|(o, &v)| *o = -g * exp(v - lse)),
            None => d.iter_mut().for_each(|o| *o = -g * exp(*o - lse)),
        }
    }
}

dispatched! {
    /// y = silu(g) · u.
    pub fn silu_mul(y: &mut [f32], g: &[f32], u: &[f32]) -> () {
        for ((o, &gv), &uv) in y.iter_mut().zip(g).zip(u) {
            *o = gv / (1.0 + exp(-gv)) * uv;
        }
    }
}

dispatched! {
    /// dg, du of y = silu(g) · u for the upstream gradient dy, written into dg and du.
    pub fn silu_mul_grad(dg: &mut [f32], du: &mut [f32], g: &[f32], u: &[f32], dy: &[f32]) -> () {
        let n = g.len().min(u.len()).min(dy.len()).min(dg.len()).min(du.len());
        let (dg, du, g, u, dy) = (&mut dg[..n], &mut du[..n], &g[..n], &u[..n], &dy[..n]);
        for i in 0..n {
            let (gv, uv, d) = (g[i], u[i], dy[i]);
            let s = 1.0 / (1.0 + exp(-gv));
            du[i] = d * gv * s;
            dg[i] = d * uv * s * (1.0 + gv * (1.0 - s));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place between two positive normal floats.
    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_within_two_ulp_of_libm() {
        let mut worst = 0;
        let mut x = -86.0f32;
        while x < 88.7 {
            worst = worst.max(ulps(exp(x), x.exp()));
            x += 0.000_731;
        }
        assert!(worst <= 2, "{worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn row_kernels_match_scalar_versions() {
        let x: Vec<f32> = (0..1003).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.21).collect();
        let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = m + x.iter().map(|v| (v - m).exp()).sum::<f32>().ln();
        assert!((log_sum_exp(&x) - lse).abs() < 1e-5);
        assert_eq!(log_sum_exp(&[f32::NEG_INFINITY; 3]), f32::NEG_INFINITY);
        assert!(log_sum_exp(&[1.0, f32::NAN]).is_nan());

        let mut row = x.clone();
        let mask: Vec<f32> = (0..x.len())
            .map(|i| if i % 3 == 0 { f32::NEG_INFINITY } else { 0.0 })
            .collect();
        softmax_row(&mut row, Some(&mask), 0.5);
        let top = x
            .iter()
            .zip(&mask)
            .map(|(v, mv)| v * 0.5 + mv)
            .fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = x.iter().zip(&mask).map(|(v, mv)| (v * 0.5 + mv - top).exp()).collect();
        let total: f32 = e.iter().sum();
        for (i, (p, w)) in row.iter().zip(&e).enumerate() {
            assert!((p - w / total).abs() < 1e-7, "{i}: {p} vs {}", w / total);
            if i % 3 == 0 {
                assert_eq!(*p, 0.0);
            }
        }

        let mut d = vec![0f32; x.len()];
        neg_softmax_grad(&mut d, Some(&x), lse, 0.7);
        let mut same = x.clone();
        neg_softmax_grad(&mut same, None, lse, 0.7);
        for ((a, b), v) in d.iter().zip(&same).zip(&x) {
            let want = -0.7 * (v - lse).exp();
            assert!((a - want).abs() <= 1e-6 * want.abs().max(1e-30) + 1e-12 && a == b);
        }
    }

    #[test]
    fn silu_kernels_match_scalar_versions() {
        let g: Vec<f32> = (0..517).map(|i| (i as f32 - 258.0) * 0.07).collect();
        let u: Vec<f32> = (0..517).map(|i| ((i * 13 % 29) as f32 - 14.0) * 0.1).collect();
        let dy: Vec<f32> = (0..517).map(|i| ((i * 7 % 31) as f32 - 15.0) * 0.05).collect();
        let sig = |x: f32| 1.0 / (1.0 + (-x).exp());
        let mut y = vec![0f32; g.len()];
        silu_mul(&mut y, &g, &u);
        let (mut dg, mut du) = (vec![0f32; g.len()], vec![0f32; g.len()]);
        silu_mul_grad(&mut dg, &mut du, &g, &u, &dy);
        for i in 0..g.len() {
            let s = sig(g[i]);
            assert!((y[i] - g[i] * s * u[i]).abs() < 1e-6);
            assert!((du[i] - dy[i] * g[i] * s).abs() < 1e-6);
            assert!((dg[i] - dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s))).abs() < 1e-6);
        }
    }
}
