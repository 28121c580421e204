//! Shared by the integration tests: the devices to run on, a frozen fixture decoder, f64 helpers.
#![allow(dead_code)] // each test binary uses a different subset

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Device, Tensor};
use ov3_core::autoencoder::LatentDecoder;
use ov3_core::device::{BackendChoice, select};
use ov3_core::model::vit::unpatchify;
use ov3_core::parallel::Single;
use ov3_core::random_batch::random_batch;
use ov3_core::step::{StepSpec, train_step};
use ov3_core::{ModelConfig, Ov3, optim};

/// flex always; wgpu too when an adapter exists. With `OV3_TEST_WGPU=1` (CI) a missing adapter is a
/// failure, not a skip.
pub fn devices() -> Vec<(&'static str, Device)> {
    let mut out = vec![("flex", Device::flex())];
    match select(BackendChoice::Wgpu) {
        Ok(s) => out.push(("wgpu", s.device)),
        Err(e) if std::env::var("OV3_TEST_WGPU").as_deref() == Ok("1") => panic!("OV3_TEST_WGPU=1 but {e}"),
        Err(e) => eprintln!("skipping wgpu: {e}"),
    }
    out
}

/// A frozen linear "VAE decoder" for tests: each latent position becomes an 8x8 RGB patch.
/// Its parameters never require gradients, like the real frozen VAE.
#[derive(Module, Debug)]
pub struct LinearPatchDecoder {
    pub proj: Linear,
}

impl LinearPatchDecoder {
    pub fn new(channels: usize, device: &Device) -> Self {
        Self { proj: LinearConfig::new(channels, 8 * 8 * 3).init(device) }.no_grad()
    }
}

impl LatentDecoder for LinearPatchDecoder {
    fn decode(&self, latents: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = latents.dims();
        let tokens = latents.reshape([b, c, h * w]).swap_dims(1, 2);
        unpatchify(self.proj.forward(tokens), (h, w), 8, 3).tanh()
    }
}

pub fn to_f64<const D: usize>(t: &Tensor<D>) -> Vec<f64> {
    t.to_data().convert::<f32>().try_to_vec::<f32>().expect("f32 data").into_iter().map(f64::from).collect()
}

pub fn param_f64<const D: usize>(p: &Param<Tensor<D>>) -> Vec<f64> {
    to_f64(&p.val())
}

/// max |a - b| / max |b|: the error relative to the reference's scale.
pub fn rel_err(actual: &[f64], reference: &[f64]) -> f64 {
    assert_eq!(actual.len(), reference.len(), "length mismatch");
    let scale = reference.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    actual.iter().zip(reference).fold(0f64, |m, (a, b)| m.max((a - b).abs())) / scale
}

/// The wgpu device when an adapter exists; `None` (the caller skips) otherwise, unless
/// `OV3_TEST_WGPU=1` makes a missing adapter a failure.
pub fn wgpu_device() -> Option<Device> {
    devices().into_iter().find(|(name, _)| *name == "wgpu").map(|(_, d)| d)
}

/// The model after one AdamW step (lr 1e-3) on a fresh random batch. Every tower's residual branches
/// start at zero (`model::block::blocks`), which blocks the gradient to everything before them at
/// step 0; tests of gradient routing take this step first so that every path is open.
pub fn after_one_step(model: Ov3, cfg: &ModelConfig, device: &Device) -> Ov3 {
    let mut optim = optim::adamw(&model, 0.0);
    let batch = random_batch(cfg, 2, 64, device);
    let spec = StepSpec::plain(cfg.tau, 1e-3, 1.0);
    train_step(model, &mut optim, &spec, &Single, || Ok::<_, ()>(batch.clone())).expect("a finite step").model
}

/// A gzipped IDX file (unsigned bytes) with the given dimensions: the MNIST / Fashion-MNIST format.
pub fn idx_gz(path: &std::path::Path, dims: &[u32], data: &[u8]) {
    use std::io::Write;
    let mut bytes = vec![0, 0, 8, dims.len() as u8];
    dims.iter().for_each(|d| bytes.extend(d.to_be_bytes()));
    bytes.extend_from_slice(data);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&bytes).expect("gzip");
    std::fs::write(path, gz.finish().expect("gzip")).expect("write");
}

/// A deterministic pseudo-random sequence in [-1, 1) (splitmix64), so kernels' inputs need no device.
pub fn noise(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        })
        .collect()
}

/// One AdamW step (betas 0.9, 0.95, epsilon 1e-8, decoupled decay `wd`) in float64 from the same state, at
/// step `t` (from 1): `(p', m', v')`.
#[allow(clippy::too_many_arguments)]
pub fn adamw_f64(p: f64, g: f64, m: f64, v: f64, lr: f64, wd: f64, t: i32) -> (f64, f64, f64) {
    let (b1, b2, eps) = (0.9f64, 0.95f64, 1e-8);
    let m = b1 * m + (1.0 - b1) * g;
    let v = b2 * v + (1.0 - b2) * g * g;
    let update = (m / (1.0 - b1.powi(t))) / ((v / (1.0 - b2.powi(t))).sqrt() + eps);
    (p * (1.0 - lr * wd) - lr * update, m, v)
}

/// The kernels' constants for the step [`adamw_f64`] takes (its betas and epsilon, decay `wd`, step `t` from 1), with
/// the gradient multiplied by `grad_scale` as it is read.
pub fn adamw_step(lr: f64, wd: f64, t: i32, grad_scale: f64) -> ov3_core::optim_gpu::AdamWStep {
    ov3_core::optim_gpu::AdamWStep {
        lr: lr as f32,
        beta_1: 0.9,
        beta_2: 0.95,
        epsilon: 1e-8,
        decay: (1.0 - lr * wd) as f32,
        correction_1: 1.0 - 0.9f32.powi(t),
        correction_2: 1.0 - 0.95f32.powi(t),
        grad_scale: grad_scale as f32,
    }
}

/// Kernel launches by name while `f` runs. cubecl's launch observer is process-wide: a test binary whose other
/// tests launch kernels in parallel must serialise them around a count.
pub fn launches<T>(f: impl FnOnce() -> T) -> (T, std::collections::HashMap<&'static str, usize>) {
    use cubecl::logging::{LaunchObservation, LaunchObserver};
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    #[derive(Default)]
    struct Count(Mutex<HashMap<&'static str, usize>>);
    impl LaunchObserver for Count {
        fn launched(&self, kernel: &'static str) {
            *self.0.lock().unwrap().entry(kernel).or_default() += 1;
        }
    }
    let count = Arc::new(Count::default());
    let watching = LaunchObservation::new(count.clone());
    let out = f();
    drop(watching);
    let map = std::mem::take(&mut *count.0.lock().unwrap());
    (out, map)
}

/// One optimiser's run in [`adamw_against_burn`]: the final weight and bias, and per step the launches of
/// kernels whose name contains the given part.
pub struct AdamWRun {
    pub weight: Vec<f64>,
    pub bias: Vec<f64>,
    pub launches: Vec<usize>,
}

/// `optim::adamw` (ov3's AdamW) and burn's AdamW with the same settings and parameter groups (decay 0.2 on the
/// weight, none on the bias) over four steps of a small Linear on `device` (autodiff): `[ours, burn's]` and
/// the initial weight. Steps 1 and 3 take a gradient factor of 0.3 (grad-norm clipping's): ours through
/// `optim::step_scaled`, burn's on a loss scaled by 0.3. Each step's count includes reading the parameters back, so burn's fusion backend
/// (`--features fusion`) runs what it queued inside it.
pub fn adamw_against_burn(device: &Device, kernel: &str) -> ([AdamWRun; 2], Vec<f64>) {
    use burn::module::ParamGroup;
    use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
    use burn::tensor::Distribution;

    let model: Linear = ov3_core::device::seeded(device, 3, || LinearConfig::new(37, 21).init(device));
    let x =
        ov3_core::device::seeded(device, 4, || Tensor::<2>::random([5, 37], Distribution::Normal(0.0, 1.0), device));
    let burn_adamw = || {
        let base = AdamWConfig::new().with_beta_1(0.9).with_beta_2(0.95).with_epsilon(1e-8);
        let no_decay = ParamGroup::from_ids(optim::no_decay_ids(&model));
        base.clone().with_weight_decay(0.2).init().with_group(no_decay, base.with_weight_decay(0.0).build(), None)
    };
    let values = |m: &Linear| (to_f64(&m.weight.val()), to_f64(&m.bias.as_ref().expect("bias").val()));
    let run = |mut optimizer: ModuleOptimizer, scale_loss: bool| {
        let mut m = model.clone();
        let mut counts = Vec::new();
        for step in 0..4 {
            let factor = if step % 2 == 1 { 0.3 } else { 1.0 };
            let loss = (m.forward(x.clone()).powi_scalar(2) * (step as f64 + 1.0)).mean();
            let (loss, ours_factor) = if scale_loss { (loss * factor, 1.0) } else { (loss, factor) };
            let grads = GradientsParams::from_grads(loss.backward(), &m);
            let (stepped, count) = launches(|| {
                let m = optim::step_scaled(&mut optimizer, 0.05, m, grads, ours_factor);
                let _ = values(&m);
                m
            });
            m = stepped;
            counts.push(count.iter().filter(|(k, _)| k.contains(kernel)).map(|(_, c)| c).sum());
        }
        let (weight, bias) = values(&m);
        AdamWRun { weight, bias, launches: counts }
    };
    ([run(optim::adamw(&model, 0.2), false), run(burn_adamw(), true)], to_f64(&model.weight.val()))
}

/// Layer norm over rows of `d` in float64: `(x - mean) / sqrt(var + eps) * gamma + beta`, the biased variance.
pub fn layer_norm_f64(x: &[f64], gamma: &[f64], beta: &[f64], d: usize, eps: f64) -> Vec<f64> {
    x.chunks(d)
        .flat_map(|row| {
            let mean = row.iter().sum::<f64>() / d as f64;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d as f64;
            (0..d).map(move |j| (row[j] - mean) / (var + eps).sqrt() * gamma[j] + beta[j])
        })
        .collect()
}

/// d/dv_i of `sum(w * f(v))` by central differences in f64 (step 1e-5: error ~1e-10 for these smooth
/// functions), for every i: the gradient a backward pass must return for upstream gradient `w`.
pub fn numeric_grad(v: &[f64], w: &[f64], f: &dyn Fn(&[f64]) -> Vec<f64>) -> Vec<f64> {
    let h = 1e-5;
    let loss = |v: &[f64]| f(v).iter().zip(w).map(|(a, b)| a * b).sum::<f64>();
    (0..v.len())
        .map(|i| {
            let (mut up, mut down) = (v.to_vec(), v.to_vec());
            up[i] += h;
            down[i] -= h;
            (loss(&up) - loss(&down)) / (2.0 * h)
        })
        .collect()
}

/// Softmax over rows of `d` in float64, max-shifted.
pub fn softmax_f64(x: &[f64], d: usize) -> Vec<f64> {
    x.chunks(d)
        .flat_map(|row| {
            let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = row.iter().map(|v| (v - max).exp()).sum();
            row.iter().map(move |v| (v - max).exp() / sum)
        })
        .collect()
}

/// Exact (erf) GELU in float64.
pub fn gelu_f64(x: f64) -> f64 {
    0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))
}
