//! ov3's CPU row kernels, behind `ov3_core::cpu_ops` (the burn ops and their autodiff): plain f32 slices in,
//! plain f32 slices out, one pass over the data each, split into fixed-size chunks across the rayon pool
//! burn's flex backend uses (sequential on wasm). Written without branches or library calls in the inner
//! loops ([`exp`], [`erf`]) so the compiler vectorises them.
//!
//! Sums over rows (the layer norm's gamma and beta gradients) are taken per chunk of [`ROW_CHUNK`] rows
//! and the chunk sums added in order, so the result does not depend on the number of threads.

/// Rows per parallel task: large enough that a task outweighs rayon's scheduling, small enough that
/// the model's smallest activations (a few hundred rows) still split across cores.
pub const ROW_CHUNK: usize = 32;

/// Elements per parallel task for the elementwise kernels.
const ELEM_CHUNK: usize = 16 * 1024;

/// A loop to run at the CPU's widest vector width. `run` must be `#[inline(always)]`: it is then compiled
/// inside pulp's dispatch, for the instructions that dispatch found (a closure would stay a separate function,
/// compiled for the baseline).
trait Loop {
    fn run(self);
}

#[cfg(target_arch = "x86_64")]
struct Widest<L>(L);

#[cfg(target_arch = "x86_64")]
impl<L: Loop> pulp::WithSimd for Widest<L> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        self.0.run()
    }
}

/// Runs `work` compiled for AVX-512 where the CPU has it (x86-64, pulp's runtime check), else as built.
#[inline(always)]
fn widest(work: impl Loop) {
    #[cfg(target_arch = "x86_64")]
    pulp::Arch::new().dispatch(Widest(work));
    #[cfg(not(target_arch = "x86_64"))]
    work.run();
}

/// Runs `f(chunk_index, chunk)` over `data` cut into `chunk`-element pieces, in parallel where rayon is.
fn par_chunks_mut<T: Send>(data: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync + Send) {
    #[cfg(not(target_arch = "wasm32"))]
    {
        use rayon::prelude::*;
        data.par_chunks_mut(chunk).enumerate().for_each(|(i, c)| f(i, c));
    }
    #[cfg(target_arch = "wasm32")]
    data.chunks_mut(chunk).enumerate().for_each(|(i, c)| f(i, c));
}

/// Sum of `f(0..n)` with eight independent accumulators, so the compiler can vectorise it (a float sum
/// taken one element after another cannot be); a fixed order, so the same bits every run.
#[inline(always)]
fn sum(n: usize, f: impl Fn(usize) -> f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let full = n / 8 * 8;
    for base in (0..full).step_by(8) {
        for (lane, a) in acc.iter_mut().enumerate() {
            *a += f(base + lane);
        }
    }
    for (lane, i) in (full..n).enumerate() {
        acc[lane] += f(i);
    }
    acc.iter().sum()
}

/// Layer norm over rows of length `d`: `y = (x - mean) * rstd * gamma + beta`, `rstd = 1/sqrt(var + eps)`
/// with the biased variance. Returns `y` and, per row, `(mean, rstd)` for the backward pass.
pub fn layer_norm_forward(x: &[f32], gamma: &[f32], beta: &[f32], d: usize, eps: f32) -> (Vec<f32>, Vec<[f32; 2]>) {
    let rows = x.len() / d;
    let mut y = vec![0.0f32; x.len()];
    let mut stats = vec![[0.0f32; 2]; rows];
    // Chunks of ROW_CHUNK rows: the statistics and the outputs are cut the same way.
    let mut pairs: Vec<(&mut [f32], &mut [[f32; 2]])> =
        y.chunks_mut(ROW_CHUNK * d).zip(stats.chunks_mut(ROW_CHUNK)).collect();
    par_chunks_mut(&mut pairs, 1, |i, pair| {
        let (y, stats) = &mut pair[0];
        let first = i * ROW_CHUNK * d;
        layer_norm_rows(&x[first..first + y.len()], gamma, beta, eps, y, stats);
    });
    (y, stats)
}

#[inline(never)]
fn layer_norm_rows(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, y: &mut [f32], stats: &mut [[f32; 2]]) {
    struct L<'a>(&'a [f32], &'a [f32], &'a [f32], f32, &'a mut [f32], &'a mut [[f32; 2]]);
    impl Loop for L<'_> {
        #[inline(always)]
        fn run(self) {
            let L(x, gamma, beta, eps, y, stats) = self;
            let d = gamma.len();
            for ((xr, yr), st) in x.chunks(d).zip(y.chunks_mut(d)).zip(stats.iter_mut()) {
                let mean = sum(d, |j| xr[j]) / d as f32;
                let var = sum(d, |j| (xr[j] - mean) * (xr[j] - mean)) / d as f32;
                let rstd = 1.0 / (var + eps).sqrt();
                for j in 0..d {
                    yr[j] = (xr[j] - mean) * rstd * gamma[j] + beta[j];
                }
                *st = [mean, rstd];
            }
        }
    }
    widest(L(x, gamma, beta, eps, y, stats));
}

/// Gradients of [`layer_norm_forward`] given the output gradient `g`: `(dx, dgamma, dbeta)`, with
/// `xhat = (x - mean) * rstd` and `gh = g * gamma`:
/// `dx = rstd * (gh - mean(gh) - xhat * mean(gh * xhat))`, `dgamma = sum_rows g * xhat`, `dbeta = sum_rows g`.
pub fn layer_norm_backward(
    x: &[f32],
    gamma: &[f32],
    stats: &[[f32; 2]],
    g: &[f32],
    d: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut dx = vec![0.0f32; x.len()];
    let chunks = stats.len().div_ceil(ROW_CHUNK);
    // Per chunk: dgamma then dbeta partial sums, 2d floats.
    let mut partial = vec![0.0f32; chunks * 2 * d];
    let mut pairs: Vec<(&mut [f32], &mut [f32])> =
        dx.chunks_mut(ROW_CHUNK * d).zip(partial.chunks_mut(2 * d)).collect();
    par_chunks_mut(&mut pairs, 1, |i, pair| {
        let (dx, part) = &mut pair[0];
        let rows = i * ROW_CHUNK..i * ROW_CHUNK + dx.len() / d;
        let span = rows.start * d..rows.end * d;
        layer_norm_backward_rows(&x[span.clone()], gamma, &stats[rows], &g[span], dx, part);
    });
    let (mut dgamma, mut dbeta) = (vec![0.0f32; d], vec![0.0f32; d]);
    for part in partial.chunks(2 * d) {
        for j in 0..d {
            dgamma[j] += part[j];
            dbeta[j] += part[d + j];
        }
    }
    (dx, dgamma, dbeta)
}

/// One chunk of rows: writes `dx` and adds this chunk's dgamma, dbeta to `part` (`[2, d]`).
#[inline(never)]
fn layer_norm_backward_rows(x: &[f32], gamma: &[f32], stats: &[[f32; 2]], g: &[f32], dx: &mut [f32], part: &mut [f32]) {
    struct L<'a>(&'a [f32], &'a [f32], &'a [[f32; 2]], &'a [f32], &'a mut [f32], &'a mut [f32]);
    impl Loop for L<'_> {
        #[inline(always)]
        fn run(self) {
            let L(x, gamma, stats, g, dx, part) = self;
            let d = gamma.len();
            let (dgamma, dbeta) = part.split_at_mut(d);
            for (((xr, gr), dxr), &[mean, rstd]) in x.chunks(d).zip(g.chunks(d)).zip(dx.chunks_mut(d)).zip(stats) {
                let xhat = |j: usize| (xr[j] - mean) * rstd;
                let mean_gh = sum(d, |j| gr[j] * gamma[j]) / d as f32;
                let mean_ghx = sum(d, |j| gr[j] * gamma[j] * xhat(j)) / d as f32;
                for j in 0..d {
                    dgamma[j] += gr[j] * xhat(j);
                    dbeta[j] += gr[j];
                    dxr[j] = rstd * (gr[j] * gamma[j] - mean_gh - xhat(j) * mean_ghx);
                }
            }
        }
    }
    widest(L(x, gamma, stats, g, dx, part));
}

/// `softmax(scale * x)` over rows of length `d`, max-shifted (attention scales its logits on the way in).
pub fn softmax_forward(x: &[f32], d: usize, scale: f32) -> Vec<f32> {
    let mut y = vec![0.0f32; x.len()];
    par_chunks_mut(&mut y, ROW_CHUNK * d, |i, y| {
        let first = i * ROW_CHUNK * d;
        softmax_rows(&x[first..first + y.len()], d, scale, y);
    });
    y
}

#[inline(never)]
fn softmax_rows(x: &[f32], d: usize, scale: f32, y: &mut [f32]) {
    struct L<'a>(&'a [f32], usize, f32, &'a mut [f32]);
    impl Loop for L<'_> {
        #[inline(always)]
        fn run(self) {
            let L(x, d, scale, y) = self;
            for (xr, yr) in x.chunks(d).zip(y.chunks_mut(d)) {
                let max = xr.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(scale * v));
                for j in 0..d {
                    yr[j] = exp(scale * xr[j] - max);
                }
                let inv = 1.0 / sum(d, |j| yr[j]);
                yr.iter_mut().for_each(|o| *o *= inv);
            }
        }
    }
    widest(L(x, d, scale, y));
}

/// Gradient of [`softmax_forward`] from its output `y` and the output gradient `g`:
/// `dx = scale * y * (g - sum(g * y))` per row.
pub fn softmax_backward(y: &[f32], g: &[f32], d: usize, scale: f32) -> Vec<f32> {
    let mut dx = vec![0.0f32; y.len()];
    par_chunks_mut(&mut dx, ROW_CHUNK * d, |i, dx| {
        let span = i * ROW_CHUNK * d..i * ROW_CHUNK * d + dx.len();
        softmax_backward_rows(&y[span.clone()], &g[span], d, scale, dx);
    });
    dx
}

#[inline(never)]
fn softmax_backward_rows(y: &[f32], g: &[f32], d: usize, scale: f32, dx: &mut [f32]) {
    struct L<'a>(&'a [f32], &'a [f32], usize, f32, &'a mut [f32]);
    impl Loop for L<'_> {
        #[inline(always)]
        fn run(self) {
            let L(y, g, d, scale, dx) = self;
            for ((yr, gr), dxr) in y.chunks(d).zip(g.chunks(d)).zip(dx.chunks_mut(d)) {
                let dot = sum(d, |j| yr[j] * gr[j]);
                for j in 0..d {
                    dxr[j] = scale * yr[j] * (gr[j] - dot);
                }
            }
        }
    }
    widest(L(y, g, d, scale, dx));
}

/// e^x for f32 in plain arithmetic (Cephes' `expf`): x = n ln2 + r with |r| <= ln2 / 2, e^r by a degree-6
/// polynomial, 2^n built in the exponent bits. Relative error about 2e-7 (checked against f64 in
/// `core/tests/cpu_ops.rs`). Below -87.3 it gives 0 (e^-87.3 is the smallest normal
/// f32), above 88.3 e^88.3 = 2e38 (not infinity); NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n * LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding and subtracting it rounds an f32 of magnitude < 2^22 to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    const C: [f32; 6] = [1.987_569_1e-4, 1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5.000_000_1e-1];
    let clamped = if x > 88.3 {
        88.3
    } else if x < -87.3 {
        -87.3
    } else {
        x
    };
    let t = clamped * LOG2E + ROUND;
    let n = t - ROUND;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let p = C.iter().fold(0.0f32, |acc, &c| acc * r + c);
    // 2^n from the integer n held in t's low mantissa bits: integer arithmetic only. `n as i32` would be
    // a saturating float-to-int conversion, which LLVM does not vectorise: the whole loop ran scalar, 4x slower.
    let two_n = f32::from_bits(t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23);
    let e = (1.0 + r + r * r * p) * two_n;
    // Below the smallest normal: 0, never a subnormal (a masked attention logit, -1e9, must give exactly 0:
    // subnormal probabilities would slow every matmul that reads them by 10x or more).
    if x < -87.3 { 0.0 } else { e }
}

/// erf(x) for f32 without branches or library calls but one `exp`: the Maclaurin series to x^19 for
/// |x| < 0.75 (truncation below 1e-10), else Abramowitz & Stegun 7.1.26 on |x| (absolute error below
/// 1.5e-7) with the sign restored. Checked against libm's f64 erf in `core/tests/cpu_ops.rs`.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    erf_given_exp(x, exp(-x * x))
}

/// [`erf`] given `e = exp(-x^2)`, which the GELU gradient needs anyway.
#[inline(always)]
fn erf_given_exp(x: f32, e: f32) -> f32 {
    // 2/sqrt(pi) * (-1)^n / (n! (2n + 1)), n = 0..=9.
    const S: [f32; 10] = [
        1.128_379_2,
        -0.376_126_38,
        0.112_837_92,
        -0.026_866_17,
        0.005_223_978,
        -8.548_327e-4,
        1.205_533_3e-4,
        -1.492_565e-5,
        1.646_211_4e-6,
        -1.636_584_5e-7,
    ];
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [0.254_829_6, -0.284_496_74, 1.421_413_7, -1.453_152_1, 1.061_405_4];
    let a = x.abs();
    let x2 = x * x;
    let series = x * S.iter().rev().fold(0.0f32, |acc, &c| acc * x2 + c);
    let t = 1.0 / (1.0 + P * a);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let tail = (1.0 - poly * e).copysign(x);
    if a < 0.75 { series } else { tail }
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi).
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// Exact (erf) GELU: `x * Phi(x)`, `Phi(x) = (1 + erf(x / sqrt 2)) / 2`.
pub fn gelu_forward(x: &[f32]) -> Vec<f32> {
    let mut y = vec![0.0f32; x.len()];
    par_chunks_mut(&mut y, ELEM_CHUNK, |i, y| gelu_chunk(&x[i * ELEM_CHUNK..i * ELEM_CHUNK + y.len()], y));
    y
}

#[inline(never)]
fn gelu_chunk(x: &[f32], y: &mut [f32]) {
    struct L<'a>(&'a [f32], &'a mut [f32]);
    impl Loop for L<'_> {
        #[inline(always)]
        fn run(self) {
            let L(x, y) = self;
            for (o, &v) in y.iter_mut().zip(x) {
                *o = v * normal_cdf_pdf(v).0;
            }
        }
    }
    widest(L(x, y));
}

/// `(Phi(v), phi(v))`: the standard normal distribution and density, sharing one `exp(-v^2 / 2)`.
#[inline(always)]
fn normal_cdf_pdf(v: f32) -> (f32, f32) {
    let e = exp(-0.5 * v * v);
    (0.5 * (1.0 + erf_given_exp(v * FRAC_1_SQRT_2, e)), INV_SQRT_2PI * e)
}

/// Gradient of [`gelu_forward`]: `g * (Phi(x) + x * phi(x))`, `phi` the standard normal density.
pub fn gelu_backward(x: &[f32], g: &[f32]) -> Vec<f32> {
    let mut dx = vec![0.0f32; x.len()];
    par_chunks_mut(&mut dx, ELEM_CHUNK, |i, dx| {
        let span = i * ELEM_CHUNK..i * ELEM_CHUNK + dx.len();
        gelu_backward_chunk(&x[span.clone()], &g[span], dx);
    });
    dx
}

#[inline(never)]
fn gelu_backward_chunk(x: &[f32], g: &[f32], dx: &mut [f32]) {
    struct L<'a>(&'a [f32], &'a [f32], &'a mut [f32]);
    impl Loop for L<'_> {
        #[inline(always)]
        fn run(self) {
            let L(x, g, dx) = self;
            for ((o, &v), &g) in dx.iter_mut().zip(x).zip(g) {
                let (cdf, pdf) = normal_cdf_pdf(v);
                *o = g * (cdf + v * pdf);
            }
        }
    }
    widest(L(x, g, dx));
}

/// One AdamW step's constants (Loshchilov & Hutter; burn's `AdamW` with `amsgrad` off computes the same).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta_1: f32,
    pub beta_2: f32,
    pub epsilon: f32,
    /// `1 - lr * weight_decay`: the decoupled decay's factor on the parameter.
    pub decay: f32,
    /// Bias corrections `1 - beta^t` of the two moments at this step `t` (from 1).
    pub correction_1: f32,
    pub correction_2: f32,
    /// The factor on every gradient element as it is read (`g <- grad_scale g`): global grad-norm clipping's
    /// factor over the loss scale, folded in here rather than a pass of its own over each gradient; 1 for none.
    pub grad_scale: f32,
}

/// AdamW on one tensor in one pass, in place: with `g = grad_scale * grad`, `m <- b1 m + (1 - b1) g`,
/// `v <- b2 v + (1 - b2) g^2`, `p <- decay p - lr (m / c1) / (sqrt(v / c2) + eps)`.
pub fn adamw(h: &AdamWStep, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    let n = p.len();
    assert!(g.len() == n && m.len() == n && v.len() == n, "adamw: parameter, gradient and moments differ in length");
    let mut parts: Vec<(&mut [f32], (&mut [f32], &mut [f32]))> =
        p.chunks_mut(ELEM_CHUNK).zip(m.chunks_mut(ELEM_CHUNK).zip(v.chunks_mut(ELEM_CHUNK))).collect();
    par_chunks_mut(&mut parts, 1, |i, part| {
        let (p, (m, v)) = &mut part[0];
        let g = &g[i * ELEM_CHUNK..i * ELEM_CHUNK + p.len()];
        adamw_chunk(h, g, [p, m, v]);
    });
}

#[inline(never)]
fn adamw_chunk(h: &AdamWStep, g: &[f32], state: [&mut [f32]; 3]) {
    struct L<'a>(&'a AdamWStep, &'a [f32], [&'a mut [f32]; 3]);
    impl Loop for L<'_> {
        #[inline(always)]
        fn run(self) {
            let L(h, g, [p, m, v]) = self;
            let n = p.len();
            let (g, m, v) = (&g[..n], &mut m[..n], &mut v[..n]);
            for (i, p) in p.iter_mut().enumerate() {
                let g = h.grad_scale * g[i];
                let m1 = h.beta_1 * m[i] + (1.0 - h.beta_1) * g;
                let v1 = h.beta_2 * v[i] + (1.0 - h.beta_2) * (g * g);
                let delta = (m1 / h.correction_1) / ((v1 / h.correction_2).sqrt() + h.epsilon);
                *p = h.decay * *p - h.lr * delta;
                m[i] = m1;
                v[i] = v1;
            }
        }
    }
    widest(L(h, g, state));
}
