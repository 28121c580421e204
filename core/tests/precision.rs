//! Mixed precision (`config::Precision`): the tiny preset trained 50 steps with its transformer blocks in f16
//! (dynamic loss scaling) or bf16 must follow the f32 loss curve, step by step, on every device that has the
//! dtype; and the loss-scale machinery must unscale gradients and recover from an overflow.
//!
//! Tolerances: each step's total loss within 1.5% (f16) / 3% (bf16, 8 mantissa bits) of the f32 run's, and
//! the first step's gradient norm within 0.5% / 1%. Measured on this project's 2-core machine (flex):
//! 0.42% / 0.86% for the losses, 0.002% / 0.026% for the norm (docs/PERFORMANCE.md, "Mixed precision"). A
//! missing unscale is off by the loss scale (2^15 or more); a parameter cut off from its gradient by a cast
//! stops learning and leaves the curve.

mod common;

use burn::tensor::Device;
use ov3_core::config::{AttentionImpl, Precision};
use ov3_core::device::seeded;
use ov3_core::parallel::Single;
use ov3_core::random_batch::random_batch;
use ov3_core::step::{LossScale, StepSpec, train_step};
use ov3_core::{Batch, ModelConfig, Ov3, Preset, optim};

/// Steps per curve: 50 on the CPU; on wgpu 12 by default, since lavapipe (CI's adapter) takes ~8 minutes
/// per 50-step curve on 2 cores. `OV3_PRECISION_STEPS=50` runs the full curve everywhere.
const STEPS: usize = 50;
const WGPU_STEPS: usize = 12;

fn config() -> ModelConfig {
    ModelConfig { context_length: 16, ..Preset::Tiny.config() }
}

struct Curve {
    totals: Vec<f64>,
    grad_norms: Vec<f64>,
    scales: Vec<Option<f64>>,
}

/// `steps` AdamW steps (lr 5e-4) of the tiny preset on random batches of 4 at 64 px (batch and noise seeded
/// per step: the same stream for every precision).
fn curve(device: &Device, precision: Precision, attention: AttentionImpl, steps: usize) -> Curve {
    let cfg = config();
    let model = seeded(device, 3, || Ov3::new(&cfg, device)).with_precision(precision).with_attention(attention);
    let mut optim = optim::adamw(&model, 0.0);
    let mut model = Some(model);
    let mut scale = LossScale::for_precision(precision);
    let mut out = Curve { totals: vec![], grad_norms: vec![], scales: vec![] };
    for step in 0..steps {
        let batch: Batch = seeded(device, 1000 + step as u64, || random_batch(&cfg, 4, 64, device));
        let spec = StepSpec { noise_seed: step as u64, loss_scale: scale, ..StepSpec::plain(cfg.tau, 5e-4, 1.0) };
        let m = model.take().expect("model");
        let stepped = train_step(m, &mut optim, &spec, &Single, || Ok::<_, ()>(batch.clone()))
            .unwrap_or_else(|e| panic!("{precision:?} step {step}: {e:?}"));
        model = Some(stepped.model);
        scale = stepped.loss_scale;
        out.totals.push(stepped.record.total);
        out.grad_norms.push(stepped.record.grad_norm);
        out.scales.push(stepped.record.loss_scale);
    }
    out
}

fn max_rel_dev(a: &[f64], b: &[f64]) -> (f64, usize) {
    a.iter()
        .zip(b)
        .enumerate()
        .map(|(i, (x, y))| ((x - y).abs() / y.abs(), i))
        .fold((0.0, 0), |m, d| if d.0 > m.0 { d } else { m })
}

#[test]
fn half_precision_follows_the_f32_loss_curve() {
    let steps_env = std::env::var("OV3_PRECISION_STEPS").ok().and_then(|s| s.parse().ok());
    for (name, device) in common::devices() {
        let device = device.autodiff();
        let steps = steps_env.unwrap_or(if name == "wgpu" { WGPU_STEPS } else { STEPS });
        let reference = curve(&device, Precision::F32, AttentionImpl::Reference, steps);
        let first = reference.totals[0];
        let last = *reference.totals.last().expect("steps");
        eprintln!("{name} f32, {steps} steps: total {first:.4} -> {last:.4}");
        assert!(reference.scales.iter().all(Option::is_none), "f32 has no loss scale");
        assert!(last < 0.8 * first, "{name}: the f32 loss must fall for the comparison to mean something");
        // On wgpu, f16 through our fused attention kernels too (they read and write f16 where the adapter has it).
        let fused = (name == "wgpu").then_some((Precision::F16, AttentionImpl::Fused, 0.015, 0.005));
        let variants = [(Precision::F16, AttentionImpl::Reference, 0.015, 0.005)].into_iter().chain(fused).chain([(
            Precision::Bf16,
            AttentionImpl::Reference,
            0.03,
            0.01,
        )]);
        for (precision, attention, tol_loss, tol_norm) in variants {
            if let Err(refusal) = precision.check(&device) {
                eprintln!("{name}: {refusal}; skipped");
                continue;
            }
            let half = curve(&device, precision, attention, steps);
            if std::env::var_os("OV3_PRECISION_PRINT").is_some() {
                for (i, (h, r)) in half.totals.iter().zip(&reference.totals).enumerate() {
                    eprintln!("{i} {r:.4} {h:.4} {:.4} {:.4}", reference.grad_norms[i], half.grad_norms[i]);
                }
            }
            let (dev, at) = max_rel_dev(&half.totals, &reference.totals);
            let norm_dev = (half.grad_norms[0] - reference.grad_norms[0]).abs() / reference.grad_norms[0];
            eprintln!(
                "{name} {precision:?} {attention:?}: total {:.4} -> {:.4}; max deviation from f32 {:.3}% (step {at}); first grad \
                 norm {:.4} vs {:.4} ({:.3}%); loss scale {:?} -> {:?}",
                half.totals[0],
                half.totals.last().expect("steps"),
                100.0 * dev,
                half.grad_norms[0],
                reference.grad_norms[0],
                100.0 * norm_dev,
                half.scales[0],
                half.scales.last().expect("steps"),
            );
            assert!(dev < tol_loss, "{name} {precision:?}: step {at}'s loss is {:.2}% off f32's", 100.0 * dev);
            assert!(norm_dev < tol_norm, "{name} {precision:?}: first gradient norm {:.2}% off", 100.0 * norm_dev);
            let scaled = precision == Precision::F16;
            assert!(half.scales.iter().all(|s| s.is_some() == scaled), "{precision:?}: loss scale recorded iff f16");
        }
    }
}

/// A step whose f16 gradients overflow is computed again at half the scale until they are finite: started
/// at 2^40, the step succeeds at a lower scale and gives exactly the weights of a step started there
/// (the scale is a power of two, so unscaling is exact), and the next scale is that one.
#[test]
fn an_overflowing_loss_scale_backs_off() {
    let device = Device::flex().autodiff();
    let cfg = config();
    let batch = seeded(&device, 4, || random_batch(&cfg, 4, 64, &device));
    let step_from = |scale: f64| {
        let model = seeded(&device, 3, || Ov3::new(&cfg, &device)).with_precision(Precision::F16);
        let mut optim = optim::adamw(&model, 0.0);
        let loss_scale = LossScale { scale, ..LossScale::for_precision(Precision::F16) };
        let spec = StepSpec { loss_scale, ..StepSpec::plain(cfg.tau, 1e-3, 1.0) };
        train_step(model, &mut optim, &spec, &Single, || Ok::<_, ()>(batch.clone())).expect("a finite step")
    };
    let high = step_from(2f64.powi(40));
    let landed = high.record.loss_scale.expect("f16 records its scale");
    assert!(landed < 2f64.powi(40) && landed >= 1.0, "backed off to {landed}");
    assert_eq!(high.loss_scale.scale, landed, "the next step continues at the scale that worked");
    let direct = step_from(landed);
    assert_eq!(direct.record.loss_scale, Some(landed), "no overflow when started there");
    // fc2: a residual branch's output projection starts at zero but has a gradient at step 0 (fc1 has none yet).
    let weights = |m: &Ov3| common::param_f64(&m.encoder.blocks[0].mlp.fc2.weight);
    assert!(weights(&high.model).iter().any(|w| *w != 0.0), "the step moved fc2 off its zero start");
    assert_eq!(weights(&high.model), weights(&direct.model), "the retried step is the step at the landed scale");
    assert_eq!(high.record.grad_norm, direct.record.grad_norm);
    eprintln!("2^40 backed off to {landed} (2^{})", landed.log2());
}
