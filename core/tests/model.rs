//! The model on the CPU backend: shapes for every preset, parameter counts, losses at initialisation,
//! and overfitting one batch. (Gradient routing per objective: tests/objectives.rs.)

mod common;

use burn::tensor::{Device, Tensor};
use common::{LinearPatchDecoder, rel_err, to_f64};
use ov3_core::autoencoder::LatentDecoder;
use ov3_core::config::AttentionImpl;
use ov3_core::model::block::blocks;
use ov3_core::model::{Noise, add_noise};
use ov3_core::parallel::Single;
use ov3_core::random_batch::random_batch;
use ov3_core::step::{StepSpec, train_step};
use ov3_core::{Batch, Frozen, LossWeights, Ov3, Preset, optim, params};

/// Tests run on parallel threads and share each device's RNG: a draw of one test between another's seeding and
/// its draw would change what the other draws (`noise_is_per_sample_and_off_at_tau_zero` checks that the same
/// seed gives the same noise). Every test here takes its turn with the RNGs.
fn rng_turn() -> std::sync::MutexGuard<'static, ()> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn shapes(preset: Preset, res: usize, device: &Device) {
    let cfg = preset.config();
    cfg.validate().expect("preset config is valid");
    let model = Ov3::new(&cfg, device);
    let batch = random_batch(&cfg, 2, res, device);
    let z_u = model.encode(batch.inputs.clone());
    let n = (res / 16) * (res / 16);
    assert_eq!(z_u.dims(), [2, n, cfg.encoder.width], "{preset:?} z_u at {res} px");
    let z_hat = model.decode(z_u.clone(), (res / 16, res / 16));
    assert_eq!(z_hat.dims(), [2, 16, res / 8, res / 8], "{preset:?} reconstructed latents at {res} px");
    assert_eq!(model.image_embedding(z_u.clone()).dims(), [2, cfg.embed_dim]);
    assert_eq!(model.text_embedding(batch.tokens.clone()).dims(), [2, cfg.embed_dim]);
    let logits = model.caption_logits(z_u, batch.tokens);
    assert_eq!(logits.dims(), [2, cfg.context_length, cfg.vocab_size]);
}

fn shapes_at_128_and_256(presets: [Preset; 2]) {
    let device = Device::flex();
    for preset in presets {
        for res in [128, 256] {
            shapes(preset, res, &device);
        }
    }
}

#[test]
fn shapes_tiny_and_small_at_128_and_256() {
    let _rng = rng_turn();
    shapes_at_128_and_256([Preset::Tiny, Preset::Small]);
}

#[test]
fn shapes_base_and_large_at_128_and_256() {
    let _rng = rng_turn();
    // Base and large are too slow to train on a CPU, not to run forward once.
    shapes_at_128_and_256([Preset::Base, Preset::Large]);
}

#[test]
fn no_vae_ablation_reads_and_predicts_pixels() {
    let _rng = rng_turn();
    let device = Device::flex();
    let cfg = Preset::Tiny.config().with_input_space(ov3_core::InputSpace::Pixels);
    let model = Ov3::new(&cfg, &device);
    let batch = random_batch(&cfg, 2, 128, &device);
    assert_eq!(batch.inputs.dims(), [2, 3, 128, 128]);
    let z_u = model.encode(batch.inputs.clone());
    assert_eq!(z_u.dims(), [2, 64, 192]);
    assert_eq!(model.decode(z_u, (8, 8)).dims(), [2, 3, 128, 128]);
    let out = model.losses(&batch, &LossWeights::default(), Noise::NONE, Frozen::default(), &Single);
    assert!(out.rec_terms.pixel_l1.is_some() && out.rec_terms.latent_l1.is_none());
}

#[test]
fn base_encoder_has_vit_b_parameter_count() {
    let _rng = rng_turn();
    let model = Ov3::new(&Preset::Base.config(), &Device::flex());
    let parts = params::count_by_part(&model);
    let encoder = parts.iter().find(|(p, _)| p == "encoder").expect("encoder part").1 as f64;
    // ViT-B/16 has 86.6M parameters (timm vit_base_patch16_224 without its classifier: 85.8M).
    let rel = (encoder - 86.0e6).abs() / 86.0e6;
    assert!(rel < 0.02, "base encoder has {encoder} parameters, {:.1}% from ViT-B's 86M", rel * 100.0);
}

#[test]
fn losses_at_initialisation_are_near_chance() {
    let _rng = rng_turn();
    let device = Device::flex();
    device.seed(7);
    let cfg = Preset::Tiny.config();
    let model = Ov3::new(&cfg, &device);
    for b in [8usize, 32] {
        let batch = random_batch(&cfg, b, 128, &device);
        let out = model.losses(&batch, &LossWeights::default(), Noise::NONE, Frozen::default(), &Single);
        let contrastive = out.contrastive.into_scalar::<f32>() as f64;
        let caption = out.caption.into_scalar::<f32>() as f64;
        let ln_b = (b as f64).ln();
        let ln_v = (cfg.vocab_size as f64).ln();
        assert!((contrastive - ln_b).abs() / ln_b < 0.1, "batch {b}: contrastive {contrastive:.3} vs ln(B) {ln_b:.3}");
        assert!((caption - ln_v).abs() / ln_v < 0.1, "caption {caption:.3} vs ln(V) {ln_v:.3}");
    }
}

#[test]
fn noise_is_per_sample_and_off_at_tau_zero() {
    let _rng = rng_turn();
    let device = Device::flex();
    let z = Tensor::<3>::zeros([64, 16, 8], &device);
    let same = add_noise(z.clone(), Noise::NONE);
    assert_eq!(same.abs().sum().into_scalar::<f32>(), 0.0);
    // The draws depend on the noise's seed alone (whatever the device RNG did in between).
    let noise = Noise { tau: 0.5, seed: 11 };
    let once = common::to_f64(&add_noise(z.clone(), noise));
    device.seed(99);
    let _ = Tensor::<3>::random([4, 4, 4], burn::tensor::Distribution::Default, &device);
    assert_eq!(once, common::to_f64(&add_noise(z.clone(), noise)), "same seed, same noise");
    assert_ne!(once, common::to_f64(&add_noise(z.clone(), Noise { seed: 12, ..noise })), "another seed, other noise");
    // Each sample's noise std is its own sigma ~ U[0, 0.5]: the per-sample stds spread over that range.
    let noisy = add_noise(z, noise);
    let stds: Vec<f64> = common::to_f64(&noisy.powi_scalar(2).mean_dim(2).mean_dim(1).sqrt().reshape([64, 1, 1]));
    let (lo, hi) = stds.iter().fold((f64::MAX, 0f64), |(l, h), s| (l.min(*s), h.max(*s)));
    assert!(lo < 0.1 && hi > 0.4 && hi < 0.6, "per-sample noise stds span [{lo:.3}, {hi:.3}], expected ~[0, 0.5]");
}

#[test]
fn overfits_a_fixed_batch_of_eight() {
    let _rng = rng_turn();
    let device = Device::flex().autodiff();
    device.seed(5);
    let cfg = Preset::Tiny.config();
    let vae = LinearPatchDecoder::new(16, &device);
    let mut batch = random_batch(&cfg, 8, 128, &device);
    // Images the frozen decoder can produce, as a real VAE reproduces its own inputs.
    batch = Batch { images: vae.decode(batch.inputs.clone()).detach(), ..batch };
    let mut model = Ov3::new(&cfg, &device);
    let mut optim = optim::adamw(&model, 0.0);
    let frozen = Frozen { vae_decoder: Some(&vae), perceptual: None };
    let spec = StepSpec { frozen, ..StepSpec::plain(cfg.tau, 1e-3, 1.0) };
    // "Within 300 steps": stop at the first step whose loss is at most 20% of the first step's.
    let mut first = None;
    let mut last = f64::NAN;
    for step in 0..300 {
        let stepped = train_step(model, &mut optim, &spec, &Single, || Ok::<_, ()>(batch.clone()))
            .unwrap_or_else(|e| panic!("step {step}: {e:?}"));
        model = stepped.model;
        last = stepped.record.total;
        if last <= 0.2 * *first.get_or_insert(last) {
            eprintln!("80% drop reached at step {step}: {:.3} -> {last:.3}", first.unwrap_or(last));
            return;
        }
    }
    panic!("total loss {:.3} -> {last:.3}: less than an 80% drop in 300 steps", first.unwrap_or(last));
}

/// The cached decoding that generates captions (`TextDecoder::start`/`next`) gives the full forward's
/// logits at every position: f32, relative error < 1e-5. On wgpu the fused kernels take the first step.
#[test]
fn incremental_decoding_matches_the_full_forward() {
    let _rng = rng_turn();
    for (name, device) in common::devices() {
        let cfg = Preset::Tiny.config();
        let mut model = Ov3::new(&cfg, &device);
        if name == "wgpu" {
            model = model.with_attention(AttentionImpl::Fused);
        }
        // Random blocks instead of the identity start, whose zero attention output would hide a wrong cache.
        let mut fresh = blocks(&cfg.text_decoder, &cfg, &device);
        for (block, old) in fresh.iter_mut().zip(&model.text_decoder.blocks) {
            block.attn.implementation = old.attn.implementation;
        }
        model.text_decoder.blocks = fresh;
        let batch = random_batch(&cfg, 2, 64, &device);
        let z_u = model.encode(batch.inputs);
        let (first, len) = (3, 12);
        let tokens = batch.tokens.narrow(1, 0, len);
        let full = model.caption_logits(z_u.clone(), tokens.clone());
        let (mut logits, mut cache) = model.text_decoder.start(z_u, tokens.clone().narrow(1, 0, first));
        for t in first - 1..len {
            if t >= first {
                logits = model.text_decoder.next(tokens.clone().narrow(1, t, 1), &mut cache);
            }
            let reference = full.clone().narrow(1, t, 1).reshape([2, cfg.vocab_size]);
            let err = rel_err(&to_f64(&logits), &to_f64(&reference));
            assert!(err < 1e-5, "{name}: position {t}: relative error {err:.2e}");
        }
    }
}
