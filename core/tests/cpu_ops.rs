//! The fused CPU ops (`ov3_core::cpu_ops`): the row kernels against float64 code (forward values against
//! the textbook formulas, gradients against central differences of those formulas), and the burn ops
//! (autodiff on flex) against burn's own composite ops. Tolerances are stated per test.

mod common;

use burn::tensor::{Device, Distribution, Tensor};
use common::{adamw_f64, adamw_step, gelu_f64, layer_norm_f64, noise, numeric_grad, rel_err, softmax_f64, to_f64};
use ov3_core::cpu_ops::{self, kernels};

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

// 70 rows: two full chunks of kernels::ROW_CHUNK and a partial one.
const ROWS: usize = 70;
const D: usize = 24;

/// Forward against f64 to 1e-5 relative per row (plus the f32 rounding of the mean, below); the gradients against
/// f64 central differences to 1e-4 relative (the gradient of a normalisation sums cancelling terms).
#[test]
fn layer_norm_kernels_match_f64() {
    let eps = 1e-6;
    // Rows of different scales and offsets, one nearly constant (where rstd is large).
    let mut x = noise(ROWS * D, 1);
    for (r, row) in x.chunks_mut(D).enumerate() {
        let (scale, shift) = (0.1 + r as f64 * 0.3, r as f64 - 30.0);
        row.iter_mut().for_each(|v| *v = *v * scale + shift);
    }
    x[5 * D..6 * D].iter_mut().enumerate().for_each(|(j, v)| *v = 2.0 + 1e-3 * j as f64);
    let x = f64s(&f32s(&x)); // the f32 inputs, exactly
    let gamma = f64s(&f32s(&noise(D, 2).iter().map(|v| 1.0 + v).collect::<Vec<_>>()));
    let beta = f64s(&f32s(&noise(D, 3)));
    let w = f64s(&f32s(&noise(ROWS * D, 4)));

    let (y, stats) = kernels::layer_norm_forward(&f32s(&x), &f32s(&gamma), &f32s(&beta), D, eps as f32);
    // Row by row: 1e-5 of the row's scale, plus what rounding the mean to f32 costs once it is multiplied
    // by rstd (2 ulp of |mean| x rstd x max |gamma|: ~1e-4 for the nearly constant row, rstd ~ 150).
    let want = layer_norm_f64(&x, &gamma, &beta, D, eps);
    let max_gamma = gamma.iter().fold(0f64, |m, g| m.max(g.abs()));
    for r in 0..ROWS {
        let span = r * D..(r + 1) * D;
        let row = &x[span.clone()];
        let mean = row.iter().sum::<f64>() / D as f64;
        let rstd = 1.0 / (row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / D as f64 + eps).sqrt();
        let scale = want[span.clone()].iter().fold(0f64, |m, v| m.max(v.abs()));
        let allowed = 1e-5 * scale + 2.0 * f64::from(f32::EPSILON) * mean.abs() * rstd * max_gamma;
        let err = f64s(&y[span.clone()]).iter().zip(&want[span]).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(err <= allowed, "layer norm forward, row {r}: error {err:.2e} > {allowed:.2e}");
    }

    let (dx, dgamma, dbeta) = kernels::layer_norm_backward(&f32s(&x), &f32s(&gamma), &stats, &f32s(&w), D);
    // dx row by row (each row's gradient has its own scale: rstd differs by 1000x between rows).
    for r in 0..ROWS {
        let span = r * D..(r + 1) * D;
        let want = numeric_grad(&x[span.clone()], &w[span.clone()], &|v| layer_norm_f64(v, &gamma, &beta, D, eps));
        let err = rel_err(&f64s(&dx[span]), &want);
        assert!(err < 1e-4, "layer norm dx, row {r}: relative error {err:.2e}");
    }
    let want = numeric_grad(&gamma, &w, &|g| layer_norm_f64(&x, g, &beta, D, eps));
    let err = rel_err(&f64s(&dgamma), &want);
    assert!(err < 1e-4, "layer norm dgamma: relative error {err:.2e}");
    let want = numeric_grad(&beta, &w, &|b| layer_norm_f64(&x, &gamma, b, D, eps));
    let err = rel_err(&f64s(&dbeta), &want);
    assert!(err < 1e-4, "layer norm dbeta: relative error {err:.2e}");
}

/// `softmax(scale * x)`, scale 0.35 as in attention: forward to 1e-6 relative, gradient to 1e-5 relative,
/// with the model's masked logits (-1e9) in some rows and a row of large logits (where an unshifted exp
/// overflows).
#[test]
fn softmax_kernels_match_f64() {
    let mut x: Vec<f64> = noise(ROWS * D, 5).iter().map(|v| 4.0 * v).collect();
    for r in (0..ROWS).step_by(7) {
        x[r * D + D / 2..(r + 1) * D].iter_mut().for_each(|v| *v = -1.0e9);
    }
    x[3 * D..4 * D].iter_mut().for_each(|v| *v += 500.0);
    let x = f64s(&f32s(&x));
    let w = f64s(&f32s(&noise(ROWS * D, 6)));

    let scale = 0.35f32;
    let scaled = |v: &[f64]| softmax_f64(&v.iter().map(|u| u * f64::from(scale)).collect::<Vec<_>>(), D);
    let y = kernels::softmax_forward(&f32s(&x), D, scale);
    // The logits an f32 softmax sees are the f32 products scale * x (a logit of 175 carries 8e-6 of rounding).
    let logits: Vec<f64> = x.iter().map(|&v| f64::from(scale * v as f32)).collect();
    let err = rel_err(&f64s(&y), &softmax_f64(&logits, D));
    assert!(err < 1e-6, "softmax forward: relative error {err:.2e}");
    for (r, row) in y.chunks(D).enumerate() {
        let sum: f32 = row.iter().sum();
        assert!((sum - 1.0).abs() < 1e-5, "softmax row {r} sums to {sum}");
    }

    let dx = kernels::softmax_backward(&y, &f32s(&w), D, scale);
    for r in 0..ROWS {
        let span = r * D..(r + 1) * D;
        // Central differences cannot step a -1e9 logit usefully; those entries' gradient is exactly 0.
        let want = numeric_grad(&x[span.clone()], &w[span.clone()], &|v| scaled(v));
        let err = rel_err(&f64s(&dx[span]), &want);
        assert!(err < 1e-5, "softmax dx, row {r}: relative error {err:.2e}");
    }
}

/// exp to 3e-7 relative over [-87, 88] against f64; the clamped ends and NaN.
#[test]
fn exp_kernel_matches_f64() {
    let worst = (0..=175_000)
        .map(|i| -87.0 + i as f64 * 1e-3)
        .map(|v| {
            let v = f64::from(v as f32);
            let want = v.exp();
            (f64::from(kernels::exp(v as f32)) - want).abs() / want
        })
        .fold(0.0, f64::max);
    eprintln!("exp: max relative error {worst:.2e}");
    assert!(worst < 3e-7, "exp: max relative error {worst:.2e}");
    // A masked logit gives exactly 0, not a subnormal (which would slow the matmuls reading it).
    assert_eq!(kernels::exp(-1.0e9), 0.0);
    assert!(kernels::exp(-87.0).is_normal());
    assert!(kernels::exp(1.0e9).is_finite() && kernels::exp(1.0e9) > 1e38);
    assert!(kernels::exp(f32::NAN).is_nan());
}

/// erf to 3e-7 absolute over [-8, 8] against libm's f64 erf (the approximation's 1.5e-7 plus f32
/// rounding); GELU and its derivative to 1e-6 relative (scale: max |value| over the grid).
#[test]
fn erf_and_gelu_kernels_match_f64() {
    let grid: Vec<f64> = (0..=16_000).map(|i| -8.0 + i as f64 * 1e-3).collect();
    let worst = grid
        .iter()
        .map(|&v| (f64::from(kernels::erf(v as f32)) - libm::erf(f64::from(v as f32))).abs())
        .fold(0.0, f64::max);
    eprintln!("erf: max absolute error {worst:.2e}");
    assert!(worst < 3e-7, "erf: max absolute error {worst:.2e}");
    assert_eq!(kernels::erf(f32::INFINITY), 1.0);
    assert_eq!(kernels::erf(f32::NEG_INFINITY), -1.0);
    assert!(kernels::erf(f32::NAN).is_nan());

    let x = f64s(&f32s(&grid));
    let y = kernels::gelu_forward(&f32s(&x));
    let want: Vec<f64> = x.iter().map(|&v| gelu_f64(v)).collect();
    let err = rel_err(&f64s(&y), &want);
    assert!(err < 1e-6, "gelu forward: relative error {err:.2e}");

    let w = f64s(&f32s(&noise(x.len(), 7)));
    let dx = kernels::gelu_backward(&f32s(&x), &f32s(&w));
    let want: Vec<f64> =
        x.iter().zip(&w).map(|(&v, &g)| g * (gelu_f64(v + 1e-6) - gelu_f64(v - 1e-6)) / 2e-6).collect();
    let err = rel_err(&f64s(&dx), &want);
    assert!(err < 1e-6, "gelu backward: relative error {err:.2e}");
}

/// The kernels give the same bits on one thread and on several: sums over rows are taken per fixed chunk.
#[test]
fn kernels_do_not_depend_on_the_thread_count() {
    let (rows, d) = (1000, 48);
    let x = f32s(&noise(rows * d, 8));
    let gamma = f32s(&noise(d, 9));
    let beta = f32s(&noise(d, 10));
    let g = f32s(&noise(rows * d, 11));
    let run = || {
        let (y, stats) = kernels::layer_norm_forward(&x, &gamma, &beta, d, 1e-6);
        let (dx, dgamma, dbeta) = kernels::layer_norm_backward(&x, &gamma, &stats, &g, d);
        let s = kernels::softmax_forward(&x, d, 0.5);
        (y, dx, dgamma, dbeta, kernels::softmax_backward(&s, &g, d, 0.5), kernels::gelu_backward(&x, &g))
    };
    let pool = |n| rayon::ThreadPoolBuilder::new().num_threads(n).build().expect("thread pool");
    let one = pool(1).install(run);
    let three = pool(3).install(run);
    assert!(one == three, "results differ between 1 and 3 threads");
}

/// The burn ops on flex with autodiff against burn's composite ops on the same device, values and
/// gradients, on a non-contiguous input (a transposed view): relative error < 1e-5.
#[test]
fn fused_ops_match_burn_ops_through_autodiff() {
    let device = Device::flex().autodiff();
    let base = Tensor::<3>::random([2, 24, 9], Distribution::Normal(0.0, 2.0), &device);
    let gamma = Tensor::<1>::random([9], Distribution::Normal(1.0, 0.5), &device);
    let beta = Tensor::<1>::random([9], Distribution::Normal(0.0, 0.5), &device);
    let upstream = Tensor::<3>::random([2, 9, 24], Distribution::Normal(0.0, 1.0), &device);
    // Each op reads x = base^T ([2, 9, 24], strided); its last dim is 24 wide.
    let run = |fused: bool| {
        let x = base.clone().require_grad();
        let (g, b) = (gamma.clone().require_grad(), beta.clone().require_grad());
        let xt = x.clone().swap_dims(1, 2);
        let (ln, sm, ge) = if fused {
            let norm_in = xt.clone().swap_dims(1, 2); // [2, 24, 9]: last dim 9, strided
            (
                cpu_ops::layer_norm(norm_in, g.clone(), b.clone(), 1e-5).swap_dims(1, 2),
                cpu_ops::softmax_last(xt.clone(), 0.4),
                cpu_ops::gelu(xt.clone()),
            )
        } else {
            let norm_in = xt.clone().swap_dims(1, 2);
            (
                burn::tensor::module::layer_norm(norm_in, g.clone(), Some(b.clone()), 1e-5).swap_dims(1, 2),
                burn::tensor::activation::softmax(xt.clone().mul_scalar(0.4), 2),
                burn::tensor::activation::gelu(xt.clone()),
            )
        };
        let outputs = [to_f64(&ln), to_f64(&sm), to_f64(&ge)];
        let loss = ((ln + sm * 3.0 + ge) * upstream.clone()).sum();
        let grads = loss.backward();
        let grad = |t: &Tensor<1>| to_f64(&t.grad(&grads).expect("gradient"));
        (outputs, to_f64(&x.grad(&grads).expect("gradient")), grad(&g), grad(&b))
    };
    assert!(cpu_ops::fused(&base), "flex with autodiff must take the fused path");
    let (fused, reference) = (run(true), run(false));
    for (what, a, b) in [("layer norm", 0, 0), ("softmax", 1, 1), ("gelu", 2, 2)] {
        let err = rel_err(&fused.0[a], &reference.0[b]);
        assert!(err < 1e-5, "{what} forward: relative error {err:.2e}");
    }
    for (what, a, b) in
        [("dx", &fused.1, &reference.1), ("dgamma", &fused.2, &reference.2), ("dbeta", &fused.3, &reference.3)]
    {
        let err = rel_err(a, b);
        assert!(err < 1e-5, "{what}: relative error {err:.2e}");
    }
}

/// Rows of length 0 do not reach the kernels (which cut data into rows): the ops return empty tensors.
#[test]
fn empty_rows_are_left_to_burn() {
    let device = Device::flex();
    let x = Tensor::<2>::zeros([3, 0], &device);
    assert!(!cpu_ops::fused(&x));
    assert_eq!(cpu_ops::gelu(x.clone()).dims(), [3, 0]);
    assert_eq!(cpu_ops::softmax_last(x, 0.5).dims(), [3, 0]);
}

/// The AdamW kernel against float64 code, each of five steps (two with a gradient factor of 0.37) from the
/// kernel's own previous state (so errors do not compound): parameters and moments to 1e-6 relative (scale: max |value|), over 50,000
/// elements (several parallel chunks, a ragged last one) with gradients over four orders of magnitude.
#[test]
fn adamw_kernel_matches_f64() {
    let n = 50_000;
    let mut p = f32s(&noise(n, 11));
    let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
    let (lr, wd) = (3e-3f64, 0.2f64);
    for t in 1..=5 {
        // Steps 2 and 4 with a gradient factor (clipping's), applied by the kernel as it reads the gradient.
        let grad_scale = if t % 2 == 0 { 0.37f64 } else { 1.0 };
        let g: Vec<f32> = noise(n, 100 + t as u64)
            .iter()
            .enumerate()
            .map(|(i, x)| (x * 10f64.powi(i as i32 % 4 - 2)) as f32)
            .collect();
        let step = adamw_step(lr, wd, t, grad_scale);
        let (mut p2, mut m2, mut v2) = (p.clone(), m.clone(), v.clone());
        kernels::adamw(&step, &mut p2, &g, &mut m2, &mut v2);
        let want: Vec<(f64, f64, f64)> = (0..n)
            .map(|i| adamw_f64(p[i].into(), f64::from(g[i]) * grad_scale, m[i].into(), v[i].into(), lr, wd, t))
            .collect();
        for (what, got, want) in [
            ("parameter", f64s(&p2), want.iter().map(|w| w.0).collect::<Vec<_>>()),
            ("moment 1", f64s(&m2), want.iter().map(|w| w.1).collect()),
            ("moment 2", f64s(&v2), want.iter().map(|w| w.2).collect()),
        ] {
            let err = rel_err(&got, &want);
            assert!(err < 1e-6, "step {t}, {what}: relative error {err:.2e}");
        }
        // The update itself (p' - decay p), whose size is lr per element, to 1e-4 of lr.
        let worst = (0..n)
            .map(|i| {
                ((f64::from(p2[i]) - f64::from(p[i]) * (1.0 - lr * wd))
                    - (want[i].0 - f64::from(p[i]) * (1.0 - lr * wd)))
                    .abs()
            })
            .fold(0.0, f64::max);
        assert!(worst < 1e-4 * lr, "step {t}: update error {worst:.2e}");
        (p, m, v) = (p2, m2, v2);
    }
}

/// `optim::adamw` (the fused step on flex) against burn's AdamW (its tensor ops) with the same settings
/// and parameter groups, over four steps of a small model: parameters to 1e-6 relative.
#[test]
fn fused_adamw_matches_burn_adamw() {
    let device = Device::flex().autodiff();
    assert!(cpu_ops::fused(&Tensor::<2>::zeros([5, 37], &device)), "flex must take the fused path");
    let ([fused, reference], initial) = common::adamw_against_burn(&device, "");
    for (what, a, b) in [("weight", &fused.weight, &reference.weight), ("bias", &fused.bias, &reference.bias)] {
        let err = rel_err(a, b);
        assert!(err < 1e-6, "{what}: relative error {err:.2e}");
    }
    assert!(rel_err(&fused.weight, &initial) > 1e-3, "the steps must move the weights");
}
