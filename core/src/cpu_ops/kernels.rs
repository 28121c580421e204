//! The row kernels behind [`super`]: plain f32 slices in, plain f32 slices out, one pass over the data
//! each, split into fixed-size chunks across flex's rayon pool (sequential on wasm).
//!
//! Sums over rows (the layer norm's gamma and beta gradients) are taken per chunk of [`ROW_CHUNK`] rows
//! and the chunk sums added in order, so the result does not depend on the number of threads.

/// Rows per parallel task: large enough that a task outweighs rayon's scheduling, small enough that
/// the model's smallest activations (a few hundred rows) still split across cores.
pub const ROW_CHUNK: usize = 32;

/// Elements per parallel task for the elementwise kernels.
const ELEM_CHUNK: usize = 16 * 1024;

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
        let first = i * ROW_CHUNK;
        for (r, (yr, st)) in y.chunks_mut(d).zip(stats.iter_mut()).enumerate() {
            let xr = &x[(first + r) * d..(first + r + 1) * d];
            let mean = xr.iter().sum::<f32>() / d as f32;
            let var = xr.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
            let rstd = 1.0 / (var + eps).sqrt();
            for j in 0..d {
                yr[j] = (xr[j] - mean) * rstd * gamma[j] + beta[j];
            }
            *st = [mean, rstd];
        }
    });
    (y, stats)
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
        let (dgamma, dbeta) = part.split_at_mut(d);
        let first = i * ROW_CHUNK;
        for (r, dxr) in dx.chunks_mut(d).enumerate() {
            let row = first + r;
            let [mean, rstd] = stats[row];
            let xr = &x[row * d..(row + 1) * d];
            let gr = &g[row * d..(row + 1) * d];
            let (mut sum_gh, mut sum_ghx) = (0.0f32, 0.0f32);
            for j in 0..d {
                let xhat = (xr[j] - mean) * rstd;
                let gh = gr[j] * gamma[j];
                sum_gh += gh;
                sum_ghx += gh * xhat;
                dgamma[j] += gr[j] * xhat;
                dbeta[j] += gr[j];
            }
            let (mean_gh, mean_ghx) = (sum_gh / d as f32, sum_ghx / d as f32);
            for j in 0..d {
                let xhat = (xr[j] - mean) * rstd;
                dxr[j] = rstd * (gr[j] * gamma[j] - mean_gh - xhat * mean_ghx);
            }
        }
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

/// Softmax over rows of length `d`, max-shifted.
pub fn softmax_forward(x: &[f32], d: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; x.len()];
    par_chunks_mut(&mut y, ROW_CHUNK * d, |i, y| {
        let first = i * ROW_CHUNK;
        for (r, yr) in y.chunks_mut(d).enumerate() {
            let xr = &x[(first + r) * d..(first + r + 1) * d];
            let max = xr.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let mut sum = 0.0f32;
            for (o, &v) in yr.iter_mut().zip(xr) {
                *o = (v - max).exp();
                sum += *o;
            }
            let inv = 1.0 / sum;
            yr.iter_mut().for_each(|o| *o *= inv);
        }
    });
    y
}

/// Gradient of [`softmax_forward`] from its output `y` and the output gradient `g`:
/// `dx = y * (g - sum(g * y))` per row.
pub fn softmax_backward(y: &[f32], g: &[f32], d: usize) -> Vec<f32> {
    let mut dx = vec![0.0f32; y.len()];
    par_chunks_mut(&mut dx, ROW_CHUNK * d, |i, dx| {
        let first = i * ROW_CHUNK;
        for (r, dxr) in dx.chunks_mut(d).enumerate() {
            let span = (first + r) * d..(first + r + 1) * d;
            let (yr, gr) = (&y[span.clone()], &g[span]);
            let dot: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
            for j in 0..d {
                dxr[j] = yr[j] * (gr[j] - dot);
            }
        }
    });
    dx
}

/// erf(x) for f32 without branches or library calls but one `exp`: the Maclaurin series to x^19 for
/// |x| < 0.75 (truncation below 1e-10), else Abramowitz & Stegun 7.1.26 on |x| (absolute error below
/// 1.5e-7) with the sign restored. Checked against libm's f64 erf in `core/tests/cpu_ops.rs`.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
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
    let tail = (1.0 - poly * (-a * a).exp()).copysign(x);
    if a < 0.75 { series } else { tail }
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi).
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// Exact (erf) GELU: `x * Phi(x)`, `Phi(x) = (1 + erf(x / sqrt 2)) / 2`.
pub fn gelu_forward(x: &[f32]) -> Vec<f32> {
    let mut y = vec![0.0f32; x.len()];
    par_chunks_mut(&mut y, ELEM_CHUNK, |i, y| {
        let x = &x[i * ELEM_CHUNK..i * ELEM_CHUNK + y.len()];
        for (o, &v) in y.iter_mut().zip(x) {
            *o = 0.5 * v * (1.0 + erf(v * FRAC_1_SQRT_2));
        }
    });
    y
}

/// Gradient of [`gelu_forward`]: `g * (Phi(x) + x * phi(x))`, `phi` the standard normal density.
pub fn gelu_backward(x: &[f32], g: &[f32]) -> Vec<f32> {
    let mut dx = vec![0.0f32; x.len()];
    par_chunks_mut(&mut dx, ELEM_CHUNK, |i, dx| {
        let span = i * ELEM_CHUNK..i * ELEM_CHUNK + dx.len();
        let (x, g) = (&x[span.clone()], &g[span]);
        for j in 0..dx.len() {
            let v = x[j];
            let cdf = 0.5 * (1.0 + erf(v * FRAC_1_SQRT_2));
            let pdf = INV_SQRT_2PI * (-0.5 * v * v).exp();
            dx[j] = g[j] * (cdf + v * pdf);
        }
    });
    dx
}
