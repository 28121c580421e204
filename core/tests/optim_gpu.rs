//! The optimiser's kernels (`ov3_core::optim_gpu`): AdamW (CubeCL kernels, in place and not) against float64
//! code step by step, and `optim::adamw` on wgpu against burn's AdamW (its tensor ops) over a few steps of a small model;
//! the sum of squares for grad-norm clipping (a CubeCL kernel, up to 16 tensors a launch) against float64 code, and
//! `optim::clip_grad_norm` on wgpu against the float64 norm of the same gradients. Launches are counted to
//! show the kernels are what ran.
//!
//! The kernel runs on burn's wgpu backend only: on a machine without an adapter these tests are skipped,
//! unless `OV3_TEST_WGPU=1` (CI, on lavapipe) makes that a failure.

mod common;

use std::sync::Mutex;

use burn::tensor::{Device, Distribution, Tensor, TensorData};
use common::{adamw_against_burn, adamw_f64, adamw_step, launches, noise, rel_err, to_f64, wgpu_device};
use ov3_core::optim;
use ov3_core::optim_gpu::{self, Gather};

fn tensor(values: &[f64], device: &Device) -> Tensor<1> {
    let data: Vec<f32> = values.iter().map(|&x| x as f32).collect();
    Tensor::from_data(TensorData::new(data, [values.len()]), device)
}

/// Five steps, each from the kernel's own previous state (so errors do not compound), on `n` elements with
/// gradients over four orders of magnitude, two of them with a gradient factor of 0.37: parameters and moments to 1e-6 relative (scale: max |value|),
/// the update itself (p' - decay p, of size lr) to 1e-4 of lr. Only the elements `check` picks are compared.
/// With `shared`, the test keeps a clone of the parameter and of each moment across the call, so the kernel
/// must leave them as they were and write new tensors (`AdamwKernel`); without, it owns them and writes over them
/// (`AdamwInPlaceKernel`, what the training step gets). Each call is checked to have launched the one it should.
fn kernel_matches_f64(device: &Device, n: usize, shared: bool, check: impl Fn(usize) -> bool) {
    let (lr, wd) = (3e-3f64, 0.2f64);
    let round = |v: Vec<f64>| v.into_iter().map(|x| f64::from(x as f32)).collect::<Vec<_>>();
    let mut p = round(noise(n, 11));
    let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
    for t in 1..=5 {
        // Steps 2 and 4 with a gradient factor (clipping's), applied by the kernel as it reads the gradient.
        let grad_scale = if t % 2 == 0 { 0.37f64 } else { 1.0 };
        let g: Vec<f64> =
            round(noise(n, 100 + t as u64).iter().enumerate().map(|(i, x)| x * 10f64.powi(i as i32 % 4 - 2)).collect());
        let step = adamw_step(lr, wd, t, grad_scale);
        let (pt, gt) = (tensor(&p, device), tensor(&g, device));
        assert!(optim_gpu::supports(&pt, &gt), "a wgpu f32 tensor must take the kernel");
        let (mt, vt) = (tensor(&m, device), tensor(&v, device));
        let kept = shared.then(|| (pt.clone(), mt.clone(), vt.clone()));
        // Read back inside the count: burn's fusion launches queued kernels only when something needs their output.
        let ((p2, m2, v2), count) = launches(|| {
            let (p2, m2, v2) = optim_gpu::adamw(step, pt, gt, mt, vt);
            (to_f64(&p2), to_f64(&m2), to_f64(&v2))
        });
        // Under burn's fusion its queue holds handles of its own, so which of the two runs there is its business
        // (unchecked); either way once.
        let ran = if shared { "::AdamwKernel" } else { "::AdamwInPlaceKernel" };
        let launched: Vec<_> = count.iter().filter(|(k, _)| k.contains("Adamw")).collect();
        let right = |k: &str| k.ends_with(ran) || cfg!(feature = "fusion");
        assert!(matches!(launched[..], [(k, 1)] if right(k)), "n {n}, step {t}: {count:?}");
        if let Some((pk, mk, vk)) = kept {
            let round_trip = |x: &[f64]| x.iter().map(|&v| f64::from(v as f32)).collect::<Vec<_>>();
            for (what, kept, was) in [("parameter", pk, &p), ("moment 1", mk, &m), ("moment 2", vk, &v)] {
                assert_eq!(to_f64(&kept), round_trip(was), "n {n}, step {t}: a {what} held elsewhere was written over");
            }
        }
        let idx: Vec<usize> = (0..n).filter(|&i| check(i)).collect();
        let want: Vec<(f64, f64, f64)> =
            idx.iter().map(|&i| adamw_f64(p[i], g[i] * grad_scale, m[i], v[i], lr, wd, t)).collect();
        let pick = |x: &[f64]| idx.iter().map(|&i| x[i]).collect::<Vec<_>>();
        for (what, got, want) in [
            ("parameter", pick(&p2), want.iter().map(|w| w.0).collect::<Vec<_>>()),
            ("moment 1", pick(&m2), want.iter().map(|w| w.1).collect()),
            ("moment 2", pick(&v2), want.iter().map(|w| w.2).collect()),
        ] {
            let err = rel_err(&got, &want);
            assert!(err < 1e-6, "n {n}, step {t}, {what}: relative error {err:.2e}");
        }
        let decay = 1.0 - lr * wd;
        let worst = idx
            .iter()
            .zip(&want)
            .map(|(&i, w)| ((p2[i] - p[i] * decay) - (w.0 - p[i] * decay)).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-4 * lr, "n {n}, step {t}: update error {worst:.2e}");
        (p, m, v) = (p2, m2, v2);
    }
}

#[test]
fn adamw_kernel_matches_f64() {
    let _serial = serial();
    let Some(device) = wgpu_device() else { return };
    // One element, less than a workgroup, several workgroups with a ragged last one.
    for n in [1, 200, 50_001] {
        for shared in [false, true] {
            kernel_matches_f64(&device, n, shared, |_| true);
        }
    }
}

/// More workgroups than one grid dimension holds (65,535 x 256 elements): the kernel's 2-D grid. Checked on
/// every 613th element and the last 5,000 (past the first row of workgroups).
#[test]
fn adamw_kernel_covers_a_two_dimensional_grid() {
    let _serial = serial();
    let Some(device) = wgpu_device() else { return };
    let n = 65_535 * 256 + 4_321;
    kernel_matches_f64(&device, n, false, |i| i % 613 == 0 || i + 5_000 >= n);
}

/// AdamW's updates gathered into shared launches (`optim_gpu::gathered`, the training step's optimiser): sixteen
/// parameters of lengths from 1 to 50,001 (several workgroups for some), even ones with weight decay and odd ones
/// without (two sets of scalars, interleaved as a model's weights and biases are), stepped inside it over three
/// steps (the second with a gradient factor) against float64, as [`kernel_matches_f64`] (1e-6 relative): the
/// kernel finds each element's parameter and each group its own scalars. Launches: per group, one per
/// `params_per_launch` parameters, a lone last one taking the plain in-place kernel (8 a group: on lavapipe's 7 a
/// launch, a full launch and a lone one); under burn's fusion each its own launch, unchecked. Gathering is
/// switched on for it (`Gather::On`: by default it is off on a CPU adapter such as lavapipe, which is checked too).
#[test]
fn gathered_adamw_matches_f64() {
    let _serial = serial();
    let Some(device) = wgpu_device() else { return };
    // Off, one launch a parameter; by default, on a machine with only CPU adapters (lavapipe), too.
    let before = optim_gpu::set_gather(Gather::Off);
    assert_eq!(optim_gpu::params_per_launch(&device), 1, "OV3_ADAMW_GATHER=off");
    optim_gpu::set_gather(Gather::Auto);
    if ov3_core::device::adapters().iter().all(|a| a.software) {
        assert_eq!(optim_gpu::params_per_launch(&device), 1, "gathered by default on a CPU adapter");
    }
    optim_gpu::set_gather(Gather::On);
    let per_launch = optim_gpu::params_per_launch(&device);
    assert!(
        per_launch >= 2 || cfg!(feature = "fusion"),
        "the adapter must take two a launch for this test: {per_launch}"
    );
    let lengths = [1, 200, 257, 50_001, 3, 4_096, 12, 77, 5, 9, 1_000, 2, 31, 64, 700, 6];
    let lr = 3e-3f64;
    let decays = |k: usize| if k % 2 == 0 { 0.2f64 } else { 0.0 };
    let round = |v: Vec<f64>| v.into_iter().map(|x| f64::from(x as f32)).collect::<Vec<_>>();
    let mut state: Vec<(Vec<f64>, Vec<f64>, Vec<f64>)> = lengths
        .iter()
        .enumerate()
        .map(|(k, &n)| (round(noise(n, 40 + k as u64)), vec![0.0; n], vec![0.0; n]))
        .collect();
    for t in 1..=3 {
        let grad_scale = if t == 2 { 0.37f64 } else { 1.0 };
        let grads: Vec<Vec<f64>> = lengths
            .iter()
            .enumerate()
            .map(|(k, &n)| {
                let g = noise(n, 1_000 * t as u64 + k as u64);
                round(g.iter().enumerate().map(|(i, x)| x * 10f64.powi(i as i32 % 4 - 2)).collect())
            })
            .collect();
        let step = |wd: f64| adamw_step(lr, wd, t, grad_scale);
        let (stepped, count) = launches(|| {
            optim_gpu::gathered(|| {
                state
                    .iter()
                    .zip(&grads)
                    .enumerate()
                    .map(|(k, ((p, m, v), g))| {
                        let [p, g, m, v] = [p, g, m, v].map(|x| tensor(x, &device));
                        optim_gpu::adamw(step(decays(k)), p, g, m, v)
                    })
                    .collect::<Vec<_>>()
            })
        });
        for (k, ((p2, m2, v2), ((p, m, v), g))) in stepped.iter().zip(state.iter().zip(&grads)).enumerate() {
            let want: Vec<(f64, f64, f64)> =
                (0..p.len()).map(|i| adamw_f64(p[i], g[i] * grad_scale, m[i], v[i], lr, decays(k), t)).collect();
            for (what, got, want) in [
                ("parameter", to_f64(p2), want.iter().map(|w| w.0).collect::<Vec<_>>()),
                ("moment 1", to_f64(m2), want.iter().map(|w| w.1).collect()),
                ("moment 2", to_f64(v2), want.iter().map(|w| w.2).collect()),
            ] {
                let err = rel_err(&got, &want);
                assert!(err < 1e-6, "step {t}, parameter {k} ({} elements), {what}: relative error {err:.2e}", p.len());
            }
        }
        if !cfg!(feature = "fusion") {
            let (mut gathered, mut alone) = (0, 0);
            for group in [lengths.len().div_ceil(2), lengths.len() / 2] {
                gathered += group / per_launch + usize::from(group % per_launch >= 2);
                alone += usize::from(group % per_launch == 1);
            }
            let got = |k: &str| count.iter().filter(|(name, _)| name.ends_with(k)).map(|(_, c)| *c).sum::<usize>();
            assert_eq!(
                (got("::AdamwInPlaceGatheredKernel"), got("::AdamwInPlaceKernel"), got("::AdamwKernel")),
                (gathered, alone, 0),
                "step {t}, {per_launch} parameters a launch: {count:?}"
            );
        }
        state = stepped.iter().map(|(p, m, v)| (to_f64(p), to_f64(m), to_f64(v))).collect();
    }
    optim_gpu::set_gather(before);
}

/// The launch observer is process-wide and tests run on parallel threads: every test here holds this lock,
/// so a count sees only its own test's launches.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `optim::adamw` on wgpu (the kernel) against burn's AdamW with the same settings and parameter groups
/// (decay on the weight, none on the bias), over four steps of a small model: parameters to 1e-6 relative.
/// Each step launches the kernel once per parameter (two here): from the second step on, the in-place one (the
/// first step's parameters are also the initial model's, which the test keeps).
#[test]
fn optim_adamw_on_wgpu_matches_burn_adamw() {
    let _serial = serial();
    let Some(device) = wgpu_device() else { return };
    if !cfg!(feature = "fusion") {
        let ([in_place, _], _) = adamw_against_burn(&device.clone().autodiff(), "AdamwInPlaceKernel");
        assert_eq!(in_place.launches, vec![0, 2, 2, 2], "in place once the optimiser owns the parameters");
    }
    let ([ours, reference], initial) = adamw_against_burn(&device.autodiff(), "Adamw");
    assert_eq!(ours.launches, vec![2; 4], "one kernel per parameter and step");
    assert_eq!(reference.launches, vec![0; 4], "burn's AdamW does not use the kernel");
    for (what, a, b) in [("weight", &ours.weight, &reference.weight), ("bias", &ours.bias, &reference.bias)] {
        let err = rel_err(a, b);
        assert!(err < 1e-6, "{what}: relative error {err:.2e}");
    }
    assert!(rel_err(&ours.weight, &initial) > 1e-3, "the steps must move the weights");
}

/// `acc + sum(x^2)` over lists of tensors against float64: lengths around the workgroup's 256 and far above
/// it, values over four orders of magnitude (a period of 5 elements, so no unit's share of a tensor is all of one
/// magnitude); one tensor, as many as a launch takes on this adapter (`sum_squares_per_launch`, at least WebGPU's
/// 5), one more (a second launch, chained through the running total) and more than two launches' worth, with and
/// without a starting total (left as it was): relative error < 1e-5 (f32 sums of up to 4,000 squares per
/// invocation). The launches are counted: one per `sum_squares_per_launch` tensors and one for the total.
#[test]
fn sum_squares_matches_f64() {
    let _serial = serial();
    let Some(device) = wgpu_device() else { return };
    let per = optim_gpu::sum_squares_per_launch(&device);
    assert!((5..=optim_gpu::SUM_SQUARES_MAX).contains(&per), "{per} tensors a launch");
    let big = [1, 255, 256, 257, 100_003, 1_000_000, 3, 77, 4_096, 12, 5];
    let lengths: Vec<usize> = big.iter().copied().chain((0..2 * per).map(|i| 1 + (i * 37) % 700)).collect();
    let xs: Vec<Vec<f64>> = lengths
        .iter()
        .enumerate()
        .map(|(seed, &n)| {
            let v = noise(n, seed as u64 + 1);
            v.iter().enumerate().map(|(i, v)| f64::from((v * 10f64.powi(i as i32 % 5 - 2)) as f32)).collect()
        })
        .collect();
    let all = lengths.len();
    for (take, acc) in [(1, Some(0.375f64)), (per, None), (per + 1, Some(2.5)), (all, None), (all, Some(0.125))] {
        let want = acc.unwrap_or(0.0) + xs[..take].iter().flatten().map(|v| v * v).sum::<f64>();
        let ts: Vec<Tensor<1>> = xs[..take].iter().map(|x| tensor(x, &device)).collect();
        assert!(ts.iter().all(optim_gpu::supports_sum_squares));
        let start = acc.map(|a| tensor(&[a], &device));
        let kept = start.clone();
        let (got, count) = launches(|| to_f64(&optim_gpu::sum_squares_add(&ts, start)));
        assert_eq!(got.len(), 1);
        let err = (got[0] - want).abs() / want;
        assert!(err < 1e-5, "{take} tensors: {} against {want}, relative error {err:.2e}", got[0]);
        let ours = count.iter().filter(|(k, _)| k.contains("SumSquares")).map(|(_, c)| c).sum::<usize>();
        assert_eq!(ours, take.div_ceil(per) + 1, "{take} tensors: a launch per {per} and the total's: {count:?}");
        if let (Some(kept), Some(a)) = (kept, acc) {
            assert_eq!(to_f64(&kept), [a], "a starting total held elsewhere was written over");
        }
    }
}

/// `optim::clip_grad_norm` on wgpu: the norm it returns against the float64 norm of the same gradients, and
/// its factor against float64 clipping's, both to 1e-5 relative; the gradients are left as they were (the
/// optimiser applies the factor); the kernel runs once for both parameters (after a fill of the zeros it adds
/// to, and before the total's launch), and nothing scales the gradients.
#[test]
fn clip_grad_norm_on_wgpu_matches_f64() {
    use burn::module::{Module, ModuleVisitor, Param};
    use burn::nn::{Linear, LinearConfig};
    use burn::optim::GradientsParams;

    struct Grads<'a>(&'a GradientsParams, Vec<Vec<f64>>);
    impl ModuleVisitor for Grads<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.0.get::<D>(param.id) {
                self.1.push(to_f64(&g));
            }
        }
    }
    let _serial = serial();
    let Some(device) = wgpu_device() else { return };
    let device = device.autodiff();
    let model: Linear = ov3_core::device::seeded(&device, 5, || LinearConfig::new(300, 70).init(&device));
    let x =
        ov3_core::device::seeded(&device, 6, || Tensor::<2>::random([9, 300], Distribution::Normal(0.0, 1.0), &device));
    let loss = (model.forward(x).powi_scalar(2) * 3.0).mean();
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let mut before = Grads(&grads, Vec::new());
    model.visit(&mut before);
    let before = before.1;
    assert_eq!(before.len(), 2, "weight and bias");
    let loss_scale = 4.0;
    let want = before.iter().flatten().map(|g| g * g).sum::<f64>().sqrt() / loss_scale;
    for (max_norm, want_factor) in
        [(want / 3.0, want / 3.0 / (want + 1e-6) / loss_scale), (want * 2.0, 1.0 / loss_scale)]
    {
        let (clip, count) = launches(|| optim::clip_grad_norm(&model, &grads, max_norm, loss_scale));
        assert!((clip.norm - want).abs() / want < 1e-5, "norm {} against {want}", clip.norm);
        let err = (clip.factor - want_factor).abs() / want_factor;
        assert!(err < 1e-5, "max norm {max_norm}: factor {} against {want_factor}", clip.factor);
        let ours = count.iter().filter(|(k, _)| k.contains("SumSquares")).map(|(_, c)| c).sum::<usize>();
        assert_eq!(ours, 2, "one launch for both parameters and the total's");
        // The zeros' fill and our two; scaling the gradients here would add a launch per parameter.
        let total = count.values().sum::<usize>();
        assert_eq!(total, 3, "launches: {count:?}");
    }
    let mut after = Grads(&grads, Vec::new());
    model.visit(&mut after);
    assert_eq!(before, after.1, "the gradients are untouched");
}
