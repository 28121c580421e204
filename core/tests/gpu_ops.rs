//! The GPU ops (`ov3_core::gpu_ops`: layer norm, softmax and GELU, shaders/layer_norm_*.wgsl, softmax_*.wgsl,
//! gelu.wgsl) on wgpu: values and gradients through burn's autodiff against float64 code (forward against the
//! textbook formulas, gradients against central differences of them), the same on a strided input against
//! burn's own composite ops, and the launches they make (also those of the attention op, `gpu_ops::attention`).
//! Every kernel output is NaN-filled before its launch, so an element a kernel forgets to write fails.
//!
//! The kernels run on burn's wgpu backend only: on a machine without an adapter these tests are skipped,
//! unless `OV3_TEST_WGPU=1` (CI, on lavapipe) makes that a failure.

mod common;

use std::sync::Mutex;

use burn::tensor::{DType, Device, Distribution, Tensor, TensorData};
use common::{gelu_f64, launches, layer_norm_f64, noise, numeric_grad, rel_err, softmax_f64, to_f64, wgpu_device};
use ov3_core::{cpu_ops, flash, gpu_ops};

fn tensor<const D: usize>(values: &[f64], shape: [usize; D], device: &Device) -> Tensor<D> {
    let data: Vec<f32> = values.iter().map(|&x| x as f32).collect();
    Tensor::from_data(TensorData::new(data, shape), device)
}

/// `v` rounded to f32 and back: the inputs the kernels see, exactly.
fn exact(v: Vec<f64>) -> Vec<f64> {
    v.into_iter().map(|x| f64::from(x as f32)).collect()
}

/// The launch observer is process-wide and tests run on parallel threads: every test here holds this lock.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Launches of our kernels in a [`launches`] count.
fn ours_in(count: &std::collections::HashMap<&str, usize>) -> usize {
    count.iter().filter(|(k, _)| k.contains("GpuOpKernel")).map(|(_, n)| n).sum()
}

/// A test's turn ([`serial`]) during which every kernel output is NaN-filled before its launch; dropping it
/// (also on a failed assertion) turns that off before the next test's turn.
struct Turn(#[allow(dead_code)] std::sync::MutexGuard<'static, ()>);

impl Drop for Turn {
    fn drop(&mut self) {
        flash::set_poison_outputs(false);
    }
}

/// The turn and the wgpu device with autodiff, outputs poisoned; `None` (the test is skipped) without an adapter.
fn poisoned_wgpu() -> Option<(Turn, Device)> {
    let turn = Turn(serial());
    let device = wgpu_device()?;
    flash::set_poison_outputs(true);
    Some((turn, device.autodiff()))
}

/// `rows` rows of width `d` of different scales and offsets, row 5 (when there is one) nearly constant (where
/// rstd is large), through `gpu_ops::layer_norm` forward and backward with upstream gradient `w`:
/// forward to 1e-5 of each row's scale plus the f32 rounding of its mean (as `cpu_ops.rs` states it), `dx` row
/// by row and `dgamma`, `dbeta` to 1e-4 relative against central differences of the float64 formula.
/// With `half` the output is f16 (and so the upstream gradient): the forward may also be off by f16's rounding
/// (2^-11 of each value), the gradients are held to the same bounds against the f16-rounded `w`.
fn matches_f64(device: &Device, rows: usize, d: usize, half: bool, check_row: impl Fn(usize) -> bool) {
    let eps = 1e-6;
    let mut x = noise(rows * d, 1);
    for (r, row) in x.chunks_mut(d).enumerate() {
        let (scale, shift) = (0.1 + (r % 97) as f64 * 0.3, (r % 61) as f64 - 30.0);
        row.iter_mut().for_each(|v| *v = *v * scale + shift);
    }
    if rows > 5 {
        x[5 * d..6 * d].iter_mut().enumerate().for_each(|(j, v)| *v = 2.0 + 1e-3 * j as f64);
    }
    let x = exact(x);
    let gamma = exact(noise(d, 2).iter().map(|v| 1.0 + v).collect());
    let beta = exact(noise(d, 3));
    let w = exact(noise(rows * d, 4));
    let w = if half { w.iter().map(|&v| half::f16::from_f64(v).to_f64()).collect() } else { w };

    let xt = tensor(&x, [rows, d], device).require_grad();
    let gt = tensor(&gamma, [d], device).require_grad();
    let bt = tensor(&beta, [d], device).require_grad();
    assert!(gpu_ops::supports_layer_norm(&xt, &gt, &bt), "an f32 tensor on wgpu must take the kernels");
    let y = gpu_ops::layer_norm(xt.clone(), gt.clone(), bt.clone(), eps, half);
    assert_eq!(y.dtype(), if half { DType::F16 } else { DType::F32 }, "the output's dtype");
    let grads = (y.clone() * tensor(&w, [rows, d], device).cast(y.dtype())).sum().backward();
    let (y, dx) = (to_f64(&y), to_f64(&xt.grad(&grads).expect("dx")));

    let want = layer_norm_f64(&x, &gamma, &beta, d, eps);
    let max_gamma = gamma.iter().fold(0f64, |m, g| m.max(g.abs()));
    for r in (0..rows).filter(|&r| check_row(r)) {
        let span = r * d..(r + 1) * d;
        let row = &x[span.clone()];
        let mean = row.iter().sum::<f64>() / d as f64;
        let rstd = 1.0 / (row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d as f64 + eps).sqrt();
        let scale = want[span.clone()].iter().fold(0f64, |m, v| m.max(v.abs()));
        let rounding = if half { 2f64.powi(-11) * scale } else { 0.0 };
        let allowed = 1e-5 * scale + 2.0 * f64::from(f32::EPSILON) * mean.abs() * rstd * max_gamma + rounding;
        let err = y[span.clone()].iter().zip(&want[span.clone()]).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(err <= allowed, "{rows}x{d}, forward row {r}: error {err:.2e} > {allowed:.2e}");
        let want_dx = numeric_grad(row, &w[span.clone()], &|v| layer_norm_f64(v, &gamma, &beta, d, eps));
        let err = rel_err(&dx[span], &want_dx);
        assert!(err < 1e-4, "{rows}x{d}, dx row {r}: relative error {err:.2e}");
    }
    let want = numeric_grad(&gamma, &w, &|g| layer_norm_f64(&x, g, &beta, d, eps));
    let err = rel_err(&to_f64(&gt.grad(&grads).expect("dgamma")), &want);
    assert!(err < 1e-4, "{rows}x{d}, dgamma: relative error {err:.2e}");
    let want = numeric_grad(&beta, &w, &|b| layer_norm_f64(&x, &gamma, b, d, eps));
    let err = rel_err(&to_f64(&bt.grad(&grads).expect("dbeta")), &want);
    assert!(err < 1e-4, "{rows}x{d}, dbeta: relative error {err:.2e}");
}

/// Rows narrower than the 64-invocation workgroup, a row of one value (variance 0: y = beta), rows wider
/// than it with a ragged last share (300 = 4 x 64 + 44), and more rows than one chunk of the parameter
/// gradients' first sum (5,000 rows: 79 chunks and a reduction).
#[test]
fn layer_norm_matches_f64() {
    let Some((_turn, device)) = poisoned_wgpu() else { return };
    for (rows, d) in [(70, 24), (9, 1), (7, 300), (5_000, 16)] {
        matches_f64(&device, rows, d, false, |_| true);
    }
}

/// The same with the output in f16, as a mixed-precision block takes it (`cpu_ops::layer_norm_as`): written as
/// f16 by the kernel and its f16 gradient read as such where the adapter has shader-f16 (lavapipe has).
#[test]
fn layer_norm_with_f16_output_matches_f64() {
    let Some((_turn, device)) = poisoned_wgpu() else { return };
    for (rows, d) in [(70, 24), (7, 300), (5_000, 16)] {
        matches_f64(&device, rows, d, true, |_| true);
    }
}

/// More rows than one grid dimension's 65,535 workgroups (the kernels' 2-D grid and its surplus workgroups,
/// which must write nothing): the first 100 rows and the last 200 (past the first grid row) checked row by
/// row, the parameter gradients over all of them.
#[test]
fn layer_norm_covers_a_two_dimensional_grid() {
    let Some((_turn, device)) = poisoned_wgpu() else { return };
    let rows = 65_535 + 1_234;
    matches_f64(&device, rows, 8, false, |r| r < 100 || r + 200 >= rows);
}

/// `cpu_ops::layer_norm` (what the model calls) on wgpu with autodiff against burn's composite op on the same
/// device, on a strided input (a transposed view) of a [2, 24, 40] tensor, values and all three gradients to
/// 1e-5 relative; it takes the kernels (one launch forward, two backward), burn's op takes none of them.
#[test]
fn model_layer_norm_on_wgpu_matches_burn_op() {
    let _serial = serial();
    let Some(device) = wgpu_device() else { return };
    let device = device.autodiff();
    let base = Tensor::<3>::random([2, 40, 24], Distribution::Normal(0.5, 2.0), &device);
    let gamma = Tensor::<1>::random([40], Distribution::Normal(1.0, 0.5), &device);
    let beta = Tensor::<1>::random([40], Distribution::Normal(0.0, 0.5), &device);
    let upstream = Tensor::<3>::random([2, 24, 40], Distribution::Normal(0.0, 1.0), &device);
    let run = |ours: bool| {
        let x = base.clone().require_grad();
        let (g, b) = (gamma.clone().require_grad(), beta.clone().require_grad());
        let input = x.clone().swap_dims(1, 2); // [2, 24, 40]: last dim 40, strided
        // Each count reads its results back inside it, so burn's fusion backend (`--features fusion`), which
        // queues operations, runs what it queued there.
        let ((y, y_values), forward) = launches(|| {
            let y = if ours {
                cpu_ops::layer_norm(input, g.clone(), b.clone(), 1e-5)
            } else {
                burn::tensor::module::layer_norm(input, g.clone(), Some(b.clone()), 1e-5)
            };
            let values = to_f64(&y);
            (y, values)
        });
        let loss = (y * upstream.clone()).sum();
        let (grads, backward) = launches(|| {
            let grads = loss.backward();
            let grad = |t: &Tensor<1>| to_f64(&t.grad(&grads).expect("gradient"));
            (to_f64(&x.grad(&grads).expect("gradient")), grad(&g), grad(&b))
        });
        let values = (y_values, grads.0, grads.1, grads.2);
        (values, [ours_in(&forward), ours_in(&backward)])
    };
    let ((ours, ours_launches), (reference, burn_launches)) = (run(true), run(false));
    assert_eq!(ours_launches, [1, 2], "one kernel forward, two backward (48 rows: one chunk, no reduction)");
    assert_eq!(burn_launches, [0, 0], "burn's op does not use the kernels");
    for (what, a, b) in [
        ("forward", &ours.0, &reference.0),
        ("dx", &ours.1, &reference.1),
        ("dgamma", &ours.2, &reference.2),
        ("dbeta", &ours.3, &reference.3),
    ] {
        let err = rel_err(a, b);
        assert!(err < 1e-5, "{what}: relative error {err:.2e}");
    }
}

/// d/dx of the exact GELU in float64, by central differences (step 1e-6).
fn gelu_grad_f64(x: f64) -> f64 {
    (gelu_f64(x + 1e-6) - gelu_f64(x - 1e-6)) / 2e-6
}

/// `softmax(scale * x)`, scale 0.35 as in attention, rows narrower and wider than the workgroup (24; 300 =
/// 4 x 64 + 44), with the model's masked logits (-1e9) in some rows and a row of large logits (where an
/// unshifted exp overflows): forward to 1e-5 relative against float64 on the f32 products scale * x, each row
/// summing to 1 within 1e-5, the gradient row by row to 1e-5 relative against central differences. (The CPU
/// kernels are held to 1e-6 forward; Vulkan lets a GPU's exp be 3 + 2|x| ulp off.)
#[test]
fn softmax_matches_f64() {
    let Some((_turn, device)) = poisoned_wgpu() else { return };
    let scale = 0.35f32;
    for (rows, d) in [(70, 24), (9, 300)] {
        let mut x: Vec<f64> = noise(rows * d, 5).iter().map(|v| 4.0 * v).collect();
        for r in (0..rows).step_by(7) {
            x[r * d + d / 2..(r + 1) * d].iter_mut().for_each(|v| *v = -1.0e9);
        }
        x[3 * d..4 * d].iter_mut().for_each(|v| *v += 500.0);
        let x = exact(x);
        let w = exact(noise(rows * d, 6));
        let xt = tensor(&x, [rows, d], &device).require_grad();
        assert!(gpu_ops::supports(&xt));
        let y = gpu_ops::softmax_last(xt.clone(), f64::from(scale));
        let grads = (y.clone() * tensor(&w, [rows, d], &device)).sum().backward();
        let (y, dx) = (to_f64(&y), to_f64(&xt.grad(&grads).expect("dx")));
        let logits: Vec<f64> = x.iter().map(|&v| f64::from(scale * v as f32)).collect();
        let err = rel_err(&y, &softmax_f64(&logits, d));
        assert!(err < 1e-5, "{rows}x{d}: softmax forward: relative error {err:.2e}");
        for (r, row) in y.chunks(d).enumerate() {
            let sum: f64 = row.iter().sum();
            assert!((sum - 1.0).abs() < 1e-5, "{rows}x{d}: softmax row {r} sums to {sum}");
        }
        let scaled = |v: &[f64]| softmax_f64(&v.iter().map(|u| u * f64::from(scale)).collect::<Vec<_>>(), d);
        for r in 0..rows {
            let span = r * d..(r + 1) * d;
            // Central differences cannot step a -1e9 logit usefully; those entries' gradient is exactly 0.
            let want = numeric_grad(&x[span.clone()], &w[span.clone()], &|v| scaled(v));
            let err = rel_err(&dx[span], &want);
            assert!(err < 1e-5, "{rows}x{d}: softmax dx, row {r}: relative error {err:.2e}");
        }
    }
}

/// Exact GELU over [-8, 8] in steps of 1e-3 (erf's two approximations meet at |x / sqrt 2| = 0.75): forward
/// and gradient to 2e-6 relative against float64 (the CPU kernels are held to 1e-6; Vulkan lets a GPU's exp be
/// 3 + 2|x| ulp off); then more elements than one grid dimension's 65,535 workgroups of 256 hold, checked on
/// every 997th element and the last 3,000.
#[test]
fn gelu_matches_f64() {
    let Some((_turn, device)) = poisoned_wgpu() else { return };
    let check = |x: &[f64], pick: &dyn Fn(usize) -> bool| {
        let n = x.len();
        let w = exact(noise(n, 7));
        let xt = tensor(x, [n], &device).require_grad();
        let y = gpu_ops::gelu(xt.clone());
        let grads = (y.clone() * tensor(&w, [n], &device)).sum().backward();
        let idx: Vec<usize> = (0..n).filter(|&i| pick(i)).collect();
        let (y, dx) = (to_f64(&y), to_f64(&xt.grad(&grads).expect("dx")));
        let got = |v: &[f64]| idx.iter().map(|&i| v[i]).collect::<Vec<_>>();
        let want: Vec<f64> = idx.iter().map(|&i| gelu_f64(x[i])).collect();
        let err = rel_err(&got(&y), &want);
        assert!(err < 2e-6, "n {n}: gelu forward: relative error {err:.2e}");
        let want: Vec<f64> = idx.iter().map(|&i| w[i] * gelu_grad_f64(x[i])).collect();
        let err = rel_err(&got(&dx), &want);
        assert!(err < 2e-6, "n {n}: gelu backward: relative error {err:.2e}");
    };
    let grid: Vec<f64> = exact((0..=16_000).map(|i| -8.0 + i as f64 * 1e-3).collect());
    check(&grid, &|_| true);
    let n = 65_535 * 256 + 4_321;
    let big = exact(noise(n, 8).iter().map(|v| 6.0 * v).collect());
    check(&big, &|i| i % 997 == 0 || i + 3_000 >= n);
}

/// GELU on f16 tensors (mixed precision's activations) over [-8, 8]: values and gradient to 1e-3 relative
/// against float64 on the same f16 inputs (f16 keeps 11 bits: rounding the result costs up to 4.9e-4), in
/// `x`'s dtype. On an adapter with shader-f16 (lavapipe has it) the kernel reads and writes f16 itself: one
/// launch each way and no casts.
#[test]
fn gelu_in_f16_matches_f64() {
    let Some((_turn, device)) = poisoned_wgpu() else { return };
    let x: Vec<f64> = (0..=4_000).map(|i| f64::from(half::f16::from_f64(-8.0 + i as f64 * 4e-3))).collect();
    let w: Vec<f64> = noise(x.len(), 9).iter().map(|&v| f64::from(half::f16::from_f64(v))).collect();
    let n = x.len();
    let xt = tensor(&x, [n], &device).cast(burn::tensor::DType::F16).require_grad();
    let wt = tensor(&w, [n], &device).cast(burn::tensor::DType::F16);
    assert!(gpu_ops::supports_gelu(&xt));
    // The inputs' casts run now, before the counts (burn's fusion backend queues them until a read).
    let _ = (to_f64(&xt), to_f64(&wt));
    // Each count reads its results back inside it (burn's fusion backend runs what it queued there).
    let ((y, y_values), forward) = launches(|| {
        let y = gpu_ops::gelu(xt.clone());
        let values = to_f64(&y);
        (y, values)
    });
    assert_eq!(y.dtype(), burn::tensor::DType::F16);
    let ((dx, dx_values), backward) = launches(|| {
        let dx = xt.grad(&(y * wt).sum().backward()).expect("dx");
        let values = to_f64(&dx);
        (dx, values)
    });
    assert_eq!(dx.dtype(), burn::tensor::DType::F16);
    let err = rel_err(&y_values, &x.iter().map(|&v| gelu_f64(v)).collect::<Vec<_>>());
    assert!(err < 1e-3, "f16 gelu forward: relative error {err:.2e}");
    let want: Vec<f64> = x.iter().zip(&w).map(|(&v, &g)| g * gelu_grad_f64(v)).collect();
    let err = rel_err(&dx_values, &want);
    assert!(err < 1e-3, "f16 gelu backward: relative error {err:.2e}");
    let f16_kernels = device.supports_dtype(burn::tensor::DType::F16);
    eprintln!("adapter shader-f16: {f16_kernels}");
    let casts = |c: &std::collections::HashMap<&str, usize>| {
        c.iter().filter(|(k, _)| k.to_lowercase().contains("cast")).map(|(_, n)| n).sum::<usize>()
    };
    assert_eq!([ours_in(&forward), ours_in(&backward)], [1, 1], "one kernel forward, one backward");
    if f16_kernels {
        assert_eq!(casts(&forward), 0, "no cast forward: {forward:?}");
    }
}

/// `cpu_ops::softmax_last` and `cpu_ops::gelu` (what the model calls) on wgpu with autodiff, on a strided input
/// (a transposed view), values and gradients to 1e-5 relative: the softmax against burn's composite op on the
/// same device, the GELU against float64 (burn's GELU gradient on wgpu is itself ~5e-4 off float64 here, its
/// erf approximation's, so it cannot be the reference). Each takes its kernels (one launch forward, one
/// backward), burn's ops take none of them.
#[test]
fn model_softmax_and_gelu_on_wgpu_match_burn_ops() {
    let _serial = serial();
    let Some(device) = wgpu_device() else { return };
    let device = device.autodiff();
    let base = Tensor::<3>::random([2, 40, 24], Distribution::Normal(0.0, 2.0), &device);
    let upstream = Tensor::<3>::random([2, 24, 40], Distribution::Normal(0.0, 1.0), &device);
    for op in ["softmax", "gelu"] {
        let run = |ours: bool| {
            let x = base.clone().require_grad();
            let input = x.clone().swap_dims(1, 2); // [2, 24, 40]: last dim 40, strided
            // Each count reads its results back inside it (burn's fusion backend runs what it queued there).
            let ((y, y_values), forward) = launches(|| {
                let y = match (op, ours) {
                    ("softmax", true) => cpu_ops::softmax_last(input, 0.4),
                    ("softmax", false) => burn::tensor::activation::softmax(input.mul_scalar(0.4), 2),
                    (_, true) => cpu_ops::gelu(input),
                    (_, false) => burn::tensor::activation::gelu(input),
                };
                let values = to_f64(&y);
                (y, values)
            });
            // The gradient in the input's layout ([2, 24, 40]), as y and the upstream gradient are.
            let (dx, backward) = launches(|| {
                let grads = (y * upstream.clone()).sum().backward();
                to_f64(&x.grad(&grads).expect("gradient").swap_dims(1, 2))
            });
            ((y_values, dx), [ours_in(&forward), ours_in(&backward)])
        };
        let ((ours, ours_launches), (mut reference, burn_launches)) = (run(true), run(false));
        if op == "gelu" {
            let (input, w) = (to_f64(&base.clone().swap_dims(1, 2)), to_f64(&upstream));
            let burn_err =
                rel_err(&reference.1, &input.iter().zip(&w).map(|(&v, &g)| g * gelu_grad_f64(v)).collect::<Vec<_>>());
            eprintln!("burn's gelu gradient on wgpu: relative error {burn_err:.2e} against float64");
            reference = (
                input.iter().map(|&v| gelu_f64(v)).collect(),
                input.iter().zip(&w).map(|(&v, &g)| g * gelu_grad_f64(v)).collect(),
            );
        }
        assert_eq!(ours_launches, [1, 1], "{op}: one kernel forward, one backward");
        assert_eq!(burn_launches, [0, 0], "{op}: burn's op does not use the kernels");
        let err = rel_err(&ours.0, &reference.0);
        assert!(err < 1e-5, "{op} forward: relative error {err:.2e}");
        let err = rel_err(&ours.1, &reference.1);
        assert!(err < 1e-5, "{op} gradient: relative error {err:.2e}");
    }
}

/// `wgsl::set_enabled(false)` (`ov3 bench step --wgpu-ops burn`, `OV3_WGPU_OPS=burn`) leaves the model's layer
/// norm, softmax and GELU to burn's ops on wgpu: none of our kernels launch; switched back on, each launches one.
/// AdamW, clipping's sum of squares and the fused attention decline their kernels with them.
#[test]
fn switched_off_the_model_ops_are_burns() {
    let _serial = serial();
    let Some(device) = wgpu_device() else { return };
    let x = Tensor::<2>::random([6, 40], Distribution::Normal(0.0, 1.0), &device);
    let (gamma, beta) = (Tensor::<1>::ones([40], &device), Tensor::<1>::zeros([40], &device));
    let ours = |on: bool| {
        ov3_core::wgsl::set_enabled(on);
        let (_, count) = launches(|| {
            let y = cpu_ops::layer_norm(x.clone(), gamma.clone(), beta.clone(), 1e-5);
            // Read back inside the count: burn's fusion backend runs what it queued there.
            to_f64(&cpu_ops::gelu(cpu_ops::softmax_last(y, 0.5)))
        });
        ours_in(&count)
    };
    let off = ours(false);
    let on = ours(true);
    assert_eq!((off, on), (0, 3), "kernel launches switched off, then on");
    let p = Tensor::<1>::zeros([8], &device);
    let takes = |on: bool| {
        ov3_core::wgsl::set_enabled(on);
        [
            ov3_core::optim_gpu::supports(&p, &p),
            ov3_core::optim_gpu::supports_sum_squares(&p),
            flash::supports(&device, 64),
        ]
    };
    assert_eq!((takes(false), takes(true)), ([false; 3], [true; 3]), "AdamW, clipping, fused attention: off, then on");
}

/// Where our WGSL kernels run (`wgsl::runs_here`, which every caller of theirs asks): a wgpu device, plain or
/// with autodiff, in this (WGSL-compiling) build, whose cubecl runtime says so (`device::compiler`: `wgpu<wgsl>`,
/// no cooperative-matrix shapes, since WGSL has none); never flex, which has no compiler to name. A
/// `--features vulkan` build on a Vulkan adapter answers `wgpu<spirv>` and routes to burn's ops instead
/// (docs/GPU.md "A SPIR-V build"; not built by CI: on lavapipe it answers `wgpu<spirv>`, session 39). Our CubeCL
/// kernels (`wgsl::cube_runs_here`: AdamW's) run on either.
#[test]
fn wgsl_kernels_run_where_the_runtime_compiles_wgsl() {
    use ov3_core::{device, wgsl};
    let flex = Device::flex();
    assert!(!wgsl::runs_here(&flex) && !wgsl::runs_here(&flex.clone().autodiff()), "flex runs no WGSL");
    assert!(!wgsl::cube_runs_here(&flex), "flex runs no CubeCL kernel of ours");
    assert_eq!(device::compiler(&flex), None);
    let _serial = serial();
    let Some(device) = wgpu_device() else { return };
    let compiler = device::compiler(&device).expect("a wgpu device has a compiler");
    if cfg!(feature = "vulkan") {
        let wgsl_runtime = compiler.runtime == "wgpu<wgsl>";
        assert_eq!(wgsl::runs_here(&device), wgsl_runtime, "{compiler}");
    } else {
        assert_eq!(compiler.runtime, "wgpu<wgsl>", "{compiler}");
        assert!(compiler.cmma.is_empty(), "WGSL has no cooperative-matrix operations: {compiler}");
        assert!(wgsl::runs_here(&device) && wgsl::runs_here(&device.clone().autodiff()));
    }
    assert!(wgsl::cube_runs_here(&device) && wgsl::cube_runs_here(&device.autodiff()));
}

/// The attention op (`gpu_ops::attention`) against the model's previous formulation in burn's tensor ops (heads
/// split by `narrow`, `scaled_dot_product_attention`, heads merged), forward and backward of a layer without a
/// mask: the op splits the heads with one copy forward and joins their gradients with one kernel,
/// where burn's autodiff makes a zero fill, a slice-assign and an add of the whole projection's size per head
/// group. Values are checked in `flash_attention.rs`; here the launches.
#[test]
fn attention_op_launches_fewer_kernels_than_burn_ops() {
    use ov3_core::model::attention::{AttentionMask, scaled_dot_product_attention};
    let _serial = serial();
    let Some(device) = wgpu_device() else { return };
    let device = device.autodiff();
    let [b, h, n, dh] = [2, 2, 16, 32];
    let masks = AttentionMask::None.prepare(n, &device);
    let qkv = Tensor::<3>::random([b, n, 3 * h * dh], Distribution::Normal(0.0, 1.0), &device);
    let count = |burn_ops: bool| {
        let qkv = qkv.clone().require_grad();
        let (_, count) = launches(|| {
            let out = if burn_ops {
                let x = qkv.clone().reshape([b, n, 3, h, dh]).permute([2, 0, 3, 1, 4]);
                let part = |i: usize| x.clone().narrow(0, i, 1).reshape([b, h, n, dh]);
                scaled_dot_product_attention(part(0), part(1), part(2), None).swap_dims(1, 2).reshape([b, n, h * dh])
            } else {
                gpu_ops::attention(qkv.clone(), h, &masks, false)
            };
            // Read back inside the count: burn's fusion backend runs what it queued there.
            to_f64(&qkv.grad(&out.sum().backward()).expect("a gradient"))
        });
        let fills = count.iter().filter(|(k, _)| k.contains("Full")).map(|(_, n)| n).sum::<usize>();
        (count.values().sum::<usize>(), fills)
    };
    let (op, op_fills) = count(false);
    let (burn, burn_fills) = count(true);
    eprintln!("attention forward + backward: {op} launches through the op, {burn} through burn's ops");
    // Both count the fills of the loss's own backward (its ones); burn's ops add one per narrowed head group.
    assert!(burn_fills >= op_fills + 3, "zero fills: op {op_fills}, burn's ops {burn_fills}");
    assert!(op + 6 <= burn, "launches: op {op}, burn's ops {burn}");
}

/// `wgsl::every_kernel` (what `ov3 info --wgsl` writes and the browser test has Chromium compile) holds every
/// file of `shaders/`, each name once: a new kernel cannot miss the Tint check by being left off the list.
#[test]
fn every_shader_file_is_in_the_listed_kernels() {
    let kernels = ov3_core::wgsl::every_kernel();
    let mut names: Vec<&str> = kernels.iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), kernels.len(), "kernel names repeat");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shaders");
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).expect("shaders/") {
        let path = entry.expect("a shaders/ entry").path();
        if path.extension().is_some_and(|e| e == "wgsl") {
            let text = std::fs::read_to_string(&path).expect("a WGSL file");
            let listed = kernels.iter().any(|(_, src)| src.contains(text.trim()));
            assert!(listed, "{} is in none of wgsl::every_kernel's sources", path.display());
            files += 1;
        }
    }
    assert!(files >= 14, "{files} WGSL files found in {}", dir.display());
}

/// No `var` without an initializer below a function's top level in any kernel: Chromium's Tint (156, on
/// SwiftShader) zero-initialised such a variable declared inside a loop once, not on every iteration as WGSL says,
/// so an accumulator declared `var s: array<vec4<f32>, SPLIT>;` in a loop summed over every iteration there while
/// naga's kernels were right (session 39: the page's fused attention lost 3 dB). Declared `var s =
/// array<vec4<f32>, SPLIT>();` it is re-zeroed everywhere. Function-level declarations (4 spaces in) run once.
#[test]
fn no_block_local_var_relies_on_implicit_zero_initialisation() {
    for (name, src) in ov3_core::wgsl::every_kernel() {
        for (i, line) in src.lines().enumerate() {
            let indent = line.len() - line.trim_start().len();
            let decl = line.trim_start().strip_prefix("var ").map(|rest| rest.split(['=', ';']).next().unwrap_or(""));
            if let Some(decl) = decl.filter(|_| indent > 4 && !line.contains('=')) {
                panic!("{name}, line {}: `var {decl}` inside a block needs an initializer (Tint): {line}", i + 1);
            }
        }
    }
}
