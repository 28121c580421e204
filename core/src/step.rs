//! One optimisation step of the whole model, the only one: the trainer, `ov3 bench step`, `ov3 overfit` and
//! the tests all call [`train_step`].
//!
//! forward + backward over `accumulate` micro-batches -> (data parallel) the group's mean gradient and loss
//! terms -> finite checks -> global grad-norm clipping (and f16 loss unscaling) -> AdamW, the generative
//! decoders at their own LR.

use burn::optim::{GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::config::Precision;
use crate::model::{Batch, Frozen, LossOutput, LossWeights, Noise, Ov3};
use crate::optim::{Clip, clip_grad_norm, grad_sum_squares, step_with_decoder_lr};
use crate::parallel::{Group, mean_gradients};
use crate::train::log::StepRecord;

/// Everything a step needs besides the model, the optimiser and the data.
#[derive(Clone, Copy)]
pub struct StepSpec<'a> {
    pub weights: LossWeights,
    /// The noise bound of eq. 3.
    pub tau: f64,
    /// The seed of the step's eq. 3 noise (micro-batch `i > 0` draws from a seed derived from it and `i`).
    pub noise_seed: u64,
    /// Micro-batches whose gradients are summed into one optimiser step (each weighs `1 / accumulate`).
    pub accumulate: usize,
    pub lr: f64,
    /// Learning-rate multiplier of the two generative decoders.
    pub lr_decoders: f64,
    /// Maximum global gradient norm.
    pub clip: f64,
    pub frozen: Frozen<'a>,
    /// The loss scale to start from: [`LossScale::NONE`] unless the blocks compute in f16.
    pub loss_scale: LossScale,
}

impl StepSpec<'_> {
    /// A plain step: default loss weights, no accumulation, decoders at the same LR.
    pub fn plain(tau: f64, lr: f64, clip: f64) -> Self {
        Self {
            weights: LossWeights::default(),
            tau,
            noise_seed: 0,
            accumulate: 1,
            lr,
            lr_decoders: 1.0,
            clip,
            frozen: Frozen::default(),
            loss_scale: LossScale::NONE,
        }
    }
}

/// Dynamic loss scaling for f16 (mixed precision, [`Precision::F16`]): the loss is multiplied by `scale`
/// before the backward pass so that small gradients survive in f16, and the gradients are divided by it
/// before clipping and AdamW. PyTorch's `GradScaler` policy: start at 2^16; a step whose gradient is not
/// finite is computed again at half the scale (on the same micro-batches and noise, so nothing is skipped);
/// after 2000 steps without an overflow the scale doubles. The trainer checkpoints it with the run state.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScale {
    pub scale: f64,
    /// Steps since the last overflow or growth.
    pub good_steps: u64,
    /// False: a fixed scale of 1 (f32, bf16), never adjusted.
    pub dynamic: bool,
}

impl LossScale {
    pub const NONE: Self = Self { scale: 1.0, good_steps: 0, dynamic: false };
    const INITIAL: f64 = 65536.0;
    const GROWTH_INTERVAL: u64 = 2000;

    /// Where a run computing in `precision` starts.
    pub fn for_precision(precision: Precision) -> Self {
        match precision {
            Precision::F16 => Self { scale: Self::INITIAL, good_steps: 0, dynamic: true },
            Precision::F32 | Precision::Bf16 => Self::NONE,
        }
    }

    /// The scale a run computing in `precision` continues with: the checkpointed one if it was computing in
    /// f16 too, else where `precision` starts. `None` outside f16.
    pub fn continued(precision: Precision, saved: Option<Self>) -> Option<Self> {
        let start = Self::for_precision(precision);
        start.dynamic.then(|| saved.filter(|s| s.dynamic).unwrap_or(start))
    }

    /// After a step whose gradients were finite.
    fn after_good_step(self) -> Self {
        if !self.dynamic {
            return self;
        }
        match self.good_steps + 1 {
            Self::GROWTH_INTERVAL => Self { scale: self.scale * 2.0, good_steps: 0, ..self },
            n => Self { good_steps: n, ..self },
        }
    }

    /// The scale to retry an overflowed step at, if there is one left (a scale below 1 would not help:
    /// the overflow is then in the forward pass or the model itself).
    fn backed_off(self) -> Option<Self> {
        (self.dynamic && self.scale >= 2.0).then_some(Self { scale: self.scale / 2.0, good_steps: 0, ..self })
    }
}

/// The model after the step, with the step's loss terms (the mean over micro-batches, and over the group)
/// and gradient norm (before clipping) filled into a [`StepRecord`], and the loss scale for the next step.
pub struct Stepped {
    pub model: Ov3,
    pub record: StepRecord,
    pub loss_scale: LossScale,
}

#[derive(Debug)]
pub enum StepError<E> {
    /// The batch source failed.
    Batch(E),
    /// A loss term or the gradient norm is NaN or infinite (the step was not applied). The same on every
    /// rank of a group, since it is checked on the group's values.
    NonFinite(String),
}

impl<E: std::fmt::Display> std::fmt::Display for StepError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StepError::Batch(e) => e.fmt(f),
            StepError::NonFinite(what) => write!(f, "{what}"),
        }
    }
}

/// One optimiser step on `accumulate` micro-batches from `next_batch`, as this rank of `group`.
pub fn train_step<E>(
    model: Ov3,
    optim: &mut ModuleOptimizer,
    spec: &StepSpec,
    group: &dyn Group,
    mut next_batch: impl FnMut() -> Result<Batch, E>,
) -> Result<Stepped, StepError<E>> {
    let mut batches = Vec::with_capacity(spec.accumulate);
    let mut scale = spec.loss_scale;
    loop {
        let mut accumulator = GradientsAccumulator::<Ov3>::new();
        let mut terms = Vec::with_capacity(spec.accumulate);
        for micro in 0..spec.accumulate {
            if batches.len() == micro {
                batches.push(next_batch().map_err(StepError::Batch)?);
            }
            let noise = Noise { tau: spec.tau, seed: micro_batch_seed(spec.noise_seed, micro) };
            let out = model.losses(&batches[micro], &spec.weights, noise, spec.frozen, group);
            terms.push(DeviceTerms::of(&out));
            let loss = out.total.div_scalar(spec.accumulate as f64);
            let grads = if scale.dynamic { loss.mul_scalar(scale.scale) } else { loss }.backward();
            accumulator.accumulate(&model, GradientsParams::from_grads(grads, &model));
        }
        let mut grads = accumulator.grads();
        let logit_scale = model.logit_scale.val().detach();
        // What the host needs of the step, read back in one transfer where it can be: a read waits for the device,
        // which then idles while the host queues what follows. A group's all-reduce needs the terms first.
        let (mut record, clip) = if group.size() > 1 {
            let (mut record, logit) = read_back(&terms, vec![logit_scale]);
            group_mean(&model, &mut grads, &mut record, group);
            record.logit_scale = logit[0];
            (record, clip_grad_norm(&model, &grads, spec.clip, scale.scale))
        } else {
            let sum_squares = grad_sum_squares(&model, &grads);
            let (mut record, values) =
                read_back(&terms, [Some(logit_scale), sum_squares].into_iter().flatten().collect());
            record.logit_scale = values[0];
            // No gradients, no sum: a norm of 0.
            (record, Clip::from_sum_squares(values.get(1).copied().unwrap_or(0.0), spec.clip, scale.scale))
        };
        // As the contrastive loss used it (`losses::contrastive_loss`).
        record.logit_scale = record.logit_scale.min(100f64.ln()).exp();
        if let Some((term, value)) = record.terms().into_iter().find(|(_, v)| !v.is_finite()) {
            return Err(StepError::NonFinite(format!("the {term} loss is {value}")));
        }
        record.grad_norm = clip.norm;
        record.loss_scale = scale.dynamic.then_some(scale.scale);
        if !record.grad_norm.is_finite() {
            // An f16 gradient overflowed (the same on every rank: the norm is the group's): again, at half the scale.
            match scale.backed_off() {
                Some(lower) => scale = lower,
                None => return Err(StepError::NonFinite(format!("the gradient norm is {}", record.grad_norm))),
            }
            continue;
        }
        let model = step_with_decoder_lr(optim, model, grads, spec.lr, spec.lr_decoders, clip.factor);
        return Ok(Stepped { model, record, loss_scale: scale.after_good_step() });
    }
}

/// The noise seed of micro-batch `micro` of a step seeded `seed`: the step's own for the first.
fn micro_batch_seed(seed: u64, micro: usize) -> u64 {
    if micro == 0 { seed } else { seed ^ (micro as u64).wrapping_mul(0xA24B_AED4_963E_E407) }
}

/// Replaces this rank's gradients and loss terms by the group's means, in one all-reduce. Every rank then
/// holds the gradient of the global batch, clips it identically and takes the same step.
fn group_mean(model: &Ov3, grads: &mut GradientsParams, record: &mut StepRecord, group: &dyn Group) {
    let slots = term_slots(record);
    let mut terms: Vec<f32> = slots.iter().map(|s| s.map_or(0.0, |v| v as f32)).collect();
    mean_gradients(model, grads, &mut terms, group);
    let mut reduced = terms.into_iter().map(f64::from);
    // Every slot was sent (absent ones as 0); an absent term stays absent.
    let mut take = |slot: Option<f64>| reduced.next().filter(|_| slot.is_some());
    *record = with_terms(slots.map(&mut take), std::mem::take(record));
}

/// The loss terms of a record in a fixed order, the total first (always present).
fn term_slots(r: &StepRecord) -> [Option<f64>; 8] {
    [Some(r.total), r.rec, r.pixel_l1, r.latent_l1, r.lpips, r.und, r.caption, r.contrastive]
}

/// One micro-batch's loss terms still on the device: which of [`term_slots`]' terms it has, and their values.
struct DeviceTerms {
    present: [bool; 8],
    values: Vec<Tensor<1>>,
}

impl DeviceTerms {
    fn of(out: &LossOutput) -> Self {
        let slots = [
            Some(&out.total),
            Some(&out.rec),
            out.rec_terms.pixel_l1.as_ref(),
            out.rec_terms.latent_l1.as_ref(),
            out.rec_terms.lpips.as_ref(),
            Some(&out.und),
            Some(&out.caption),
            Some(&out.contrastive),
        ];
        Self {
            present: slots.map(|s| s.is_some()),
            values: slots.iter().flatten().map(|t| (*t).clone().detach()).collect(),
        }
    }
}

/// The micro-batches' loss terms (their mean) and the one-element tensors `extra`, as f64, read from the device
/// in one transfer: `(record with the terms, extra's values)`.
fn read_back(micros: &[DeviceTerms], extra: Vec<Tensor<1>>) -> (StepRecord, Vec<f64>) {
    let all: Vec<Tensor<1>> = micros.iter().flat_map(|m| m.values.iter().cloned()).chain(extra).collect();
    let values = Tensor::cat(all, 0).into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 data");
    let mut values = values.into_iter().map(f64::from);
    let mut record = StepRecord::default();
    for micro in micros {
        let mut take = |present: bool| present.then(|| values.next().expect("a value per present term"));
        let terms = with_terms(micro.present.map(&mut take), StepRecord::default());
        add_terms(&mut record, &terms, 1.0 / micros.len() as f64);
    }
    (record, values.collect())
}

/// `record` with the loss terms of [`term_slots`]' order.
fn with_terms(slots: [Option<f64>; 8], record: StepRecord) -> StepRecord {
    let [total, rec, pixel_l1, latent_l1, lpips, und, caption, contrastive] = slots;
    StepRecord {
        total: total.unwrap_or(f64::NAN),
        rec,
        pixel_l1,
        latent_l1,
        lpips,
        und,
        caption,
        contrastive,
        ..record
    }
}

/// `acc += scale * terms`, term by term (accumulated micro-batches report their mean).
fn add_terms(acc: &mut StepRecord, terms: &StepRecord, scale: f64) {
    let add = |a: &mut Option<f64>, b: Option<f64>| {
        if let Some(b) = b {
            *a = Some(a.unwrap_or(0.0) + scale * b);
        }
    };
    acc.total += scale * terms.total;
    add(&mut acc.rec, terms.rec);
    add(&mut acc.pixel_l1, terms.pixel_l1);
    add(&mut acc.latent_l1, terms.latent_l1);
    add(&mut acc.lpips, terms.lpips);
    add(&mut acc.und, terms.und);
    add(&mut acc.caption, terms.caption);
    add(&mut acc.contrastive, terms.contrastive);
}
