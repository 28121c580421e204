//! One optimisation step of the whole model: forward, backward, clip, AdamW.

use burn::optim::{GradientsParams, ModuleOptimizer};

use crate::model::{Batch, Frozen, LossOutput, LossWeights, Ov3};
use crate::optim::clip_grad_norm;

/// Runs one step on an autodiff device and returns the updated model, its losses and the gradient norm.
pub fn train_step(
    model: Ov3,
    optim: &mut ModuleOptimizer,
    batch: &Batch,
    weights: &LossWeights,
    tau: f64,
    frozen: Frozen,
    lr: f64,
    clip: f64,
) -> (Ov3, LossOutput, f64) {
    let out = model.losses(batch, weights, tau, frozen);
    let grads = out.total.backward();
    let mut grads = GradientsParams::from_grads(grads, &model);
    let norm = clip_grad_norm(&model, &mut grads, clip);
    let model = optim.step(lr, model, grads);
    (model, out, norm)
}
