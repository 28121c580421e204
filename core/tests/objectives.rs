//! Which parameters each objective trains: the full loss reaches every parameter; under an ablation the
//! switched-off branch is a probe on detached tokens (DESIGN §3.1). A test binary of its own: these tests
//! compare runs that must draw the same weights and noise from flex's process-wide RNG, which other tests
//! running in parallel threads would advance.

mod common;

use burn::tensor::Device;
use common::{LinearPatchDecoder, after_one_step};
use ov3_core::model::Noise;
use ov3_core::parallel::Single;
use ov3_core::random_batch::random_batch;
use ov3_core::{Frozen, LossWeights, Objective, Ov3, Preset, params};

/// One seeded computation at a time (the tests of this binary run on parallel threads).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `(path, gradient abs sum)` of every parameter after one backward pass of `weights`' loss, one training
/// step after initialisation (see `after_one_step`). Same seed every call: the same weights, batch and noise.
fn gradients(weights: LossWeights) -> Vec<(String, Option<f64>)> {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let device = Device::flex().autodiff();
    device.seed(3);
    let cfg = Preset::Tiny.config();
    let model = after_one_step(Ov3::new(&cfg, &device), &cfg, &device);
    let vae = LinearPatchDecoder::new(16, &device);
    let batch = random_batch(&cfg, 4, 64, &device);
    let out = model.losses(
        &batch,
        &weights,
        Noise { tau: cfg.tau, seed: 0 },
        Frozen { vae_decoder: Some(&vae), perceptual: None },
        &Single,
    );
    let grads = out.total.backward();
    let mut frozen_with_grad = Vec::new();
    params::for_each_param(&vae, Some(&grads), |p, _, g| {
        if g.is_some() {
            frozen_with_grad.push(p.to_string())
        }
    });
    assert!(frozen_with_grad.is_empty(), "the frozen VAE received gradients: {frozen_with_grad:?}");
    let mut all = Vec::new();
    params::for_each_param(&model, Some(&grads), |p, _, g| all.push((p.to_string(), g)));
    all
}

fn full(w_rec: f64, w_und: f64) -> LossWeights {
    LossWeights { objective: Objective::Full, w_rec, w_und, lambda: 0.0, ..LossWeights::default() }
}

fn ablation(objective: Objective) -> LossWeights {
    LossWeights { objective, ..full(0.5, 1.0) }
}

#[test]
fn full_loss_reaches_every_parameter() {
    let missing: Vec<_> =
        gradients(full(0.5, 1.0)).into_iter().filter(|(_, g)| !matches!(g, Some(s) if *s > 0.0)).collect();
    assert!(missing.is_empty(), "parameters without a non-zero gradient: {missing:?}");
}

/// Under an ablation (DESIGN §3.1) the encoder gets exactly the gradient of the objective's own branch (that
/// of the full loss with the other branch's weight at 0), while every head, the probed branch's included,
/// gets its full-loss gradient: the probe trains on a detached z_u. Compared by each parameter's gradient
/// abs sum, relative 1e-5 (the same arithmetic in the same order, so differences are rounding at most).
fn check_probe(objective: Objective, objective_only: LossWeights) {
    let close = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => (a - b).abs() <= 1e-5 * a.abs().max(b.abs()) + 1e-12,
        (a, b) => a.unwrap_or(0.0) == b.unwrap_or(0.0),
    };
    let ablated = gradients(ablation(objective));
    let own = gradients(objective_only);
    let both = gradients(full(0.5, 1.0));
    let mut other_branch_reaches_encoder = false;
    for (((path, g), (_, g_own)), (_, g_both)) in ablated.into_iter().zip(own).zip(both) {
        if path.starts_with("encoder") {
            assert!(close(g, g_own), "{path}: {g:?} under {objective:?}, {g_own:?} from its branch alone");
            other_branch_reaches_encoder |= !close(g_own, g_both);
        } else {
            assert!(close(g, g_both), "{path}: {g:?} under {objective:?}, {g_both:?} under the full loss");
            assert!(g.unwrap_or(0.0) > 0.0, "{path} got no gradient under {objective:?}: its probe does not train");
        }
    }
    // Otherwise the comparison above could not tell a detached probe from an attached one.
    assert!(other_branch_reaches_encoder, "under the full loss the other branch never reached the encoder");
}

#[test]
fn rec_only_probes_understanding_on_detached_tokens() {
    check_probe(Objective::RecOnly, full(0.5, 0.0));
}

#[test]
fn und_only_probes_reconstruction_on_detached_tokens() {
    check_probe(Objective::UndOnly, full(0.0, 1.0));
}
