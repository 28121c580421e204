//! AdamW as DESIGN §4 sets it: betas (0.9, 0.95), weight decay on matrices only, global grad-norm clipping.

use std::cell::Cell;

use burn::module::{Module, ModuleVisitor, Param, ParamGroup, ParamId};
use burn::optim::{
    AdamWConfig, AdamWState, AdaptiveMomentumState, GradientsParams, LearningRate, ModuleOptimizer, Optimizer,
};
use burn::tensor::{DType, Device, Tensor};

use crate::cpu_ops::{self, AdamWStep};
use crate::optim_gpu;

use crate::model::Ov3;

/// AdamW whose decay skips every parameter of rank < 2 (norms, biases, the logit scale).
pub fn adamw<M: Module>(model: &M, weight_decay: f32) -> ModuleOptimizer {
    let no_decay = ParamGroup::from_ids(no_decay_ids(model));
    ModuleOptimizer::from(AdamW::new(weight_decay)).with_group(no_decay, AdamW::new(0.0), None)
}

/// AdamW, betas (0.9, 0.95), epsilon 1e-8: burn's `AdamW` with each f32 parameter's update in one pass
/// instead of a dozen tensor ops that each read and write every parameter: `cpu_ops::adamw` on the CPU
/// backend, one kernel (`optim_gpu`, a CubeCL kernel) on wgpu, where every op is also a dispatch.
/// The state is burn's own (`AdamWState`), so checkpoints are the same either way; for other dtypes burn's
/// `AdamW` takes the step. `core/tests/cpu_ops.rs` and `core/tests/optim_gpu.rs` check both against
/// float64 code and burn's AdamW.
#[derive(Clone)]
pub struct AdamW {
    burn: burn::optim::AdamW,
    weight_decay: f32,
}

impl AdamW {
    const BETAS: (f32, f32) = (0.9, 0.95);
    const EPSILON: f32 = 1e-8;

    pub fn new(weight_decay: f32) -> Self {
        let config = AdamWConfig::new()
            .with_beta_1(Self::BETAS.0)
            .with_beta_2(Self::BETAS.1)
            .with_epsilon(Self::EPSILON)
            .with_weight_decay(weight_decay);
        Self { burn: config.build(), weight_decay }
    }
}

impl Optimizer for AdamW {
    type State<const D: usize> = AdamWState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let f32_moments = state
            .as_ref()
            .is_none_or(|s| s.momentum.moment_1.dtype() == DType::F32 && s.momentum.moment_2.dtype() == DType::F32);
        let grad_scale = GRAD_SCALE.get();
        let on_cpu = cpu_ops::fused(&tensor) && grad.dtype() == DType::F32;
        let on_gpu = optim_gpu::supports(&tensor, &grad);
        if !((on_cpu || on_gpu) && f32_moments) {
            let grad = if grad_scale == 1.0 { grad } else { grad.mul_scalar(grad_scale) };
            return self.burn.step(lr, tensor, grad, state);
        }
        let (time, m, v) = match state {
            Some(s) => (s.momentum.time + 1, s.momentum.moment_1, s.momentum.moment_2),
            None => (1, grad.zeros_like(), grad.zeros_like()),
        };
        let (beta_1, beta_2) = Self::BETAS;
        let t = i32::try_from(time).unwrap_or(i32::MAX);
        let step = AdamWStep {
            lr: lr as f32,
            beta_1,
            beta_2,
            epsilon: Self::EPSILON,
            decay: (1.0 - lr * self.weight_decay as f64) as f32,
            correction_1: 1.0 - beta_1.powi(t),
            correction_2: 1.0 - beta_2.powi(t),
            grad_scale: grad_scale as f32,
        };
        let (tensor, m, v) = match on_cpu {
            true => cpu_ops::adamw(step, tensor, grad, m, v),
            false => optim_gpu::adamw(step, tensor, grad, m, v),
        };
        (tensor, Some(AdamWState::new(AdaptiveMomentumState::new(time, m, v))))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        <burn::optim::AdamW as Optimizer>::to_device(state, device)
    }
}

/// Ids of the parameters that weight decay must not touch: every tensor of rank 0 or 1.
pub fn no_decay_ids<M: Module>(model: &M) -> Vec<ParamId> {
    struct Ranks(Vec<ParamId>);
    impl ModuleVisitor for Ranks {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if D < 2 {
                self.0.push(param.id);
            }
        }
    }
    let mut v = Ranks(Vec::new());
    model.visit(&mut v);
    v.0
}

/// Global grad-norm clipping (as PyTorch's `clip_grad_norm_`; burn's own clipping works per tensor): the
/// gradients' global L2 norm after dividing them by `loss_scale` (the f16 loss scale they were computed at;
/// 1 otherwise), and the factor that brings them to a norm of at most `max_norm` and undoes the loss scale.
/// The gradients are not touched: [`step_with_decoder_lr`] hands the factor to AdamW, which applies it as
/// it reads each gradient (one pass over each instead of two; on wgpu a launch per parameter fewer).
/// [`grad_sum_squares`] read back and [`Clip::from_sum_squares`]; the training step reads the sum with its loss
/// terms instead, in one transfer.
pub fn clip_grad_norm<M: Module>(model: &M, grads: &GradientsParams, max_norm: f64, loss_scale: f64) -> Clip {
    let sum_squares = grad_sum_squares(model, grads).map_or(0.0, |s| s.into_scalar::<f32>() as f64);
    Clip::from_sum_squares(sum_squares, max_norm, loss_scale)
}

/// The sum of the squares of every gradient element, as a one-element f32 tensor left on the device (`None`
/// without gradients): the square of [`clip_grad_norm`]'s norm times the loss scale.
pub fn grad_sum_squares<M: Module>(model: &M, grads: &GradientsParams) -> Option<Tensor<1>> {
    /// The gradients our kernel takes (flattened), and burn's running total of the others' squares.
    struct SumSq<'a>(&'a GradientsParams, Vec<Tensor<1>>, Option<Tensor<1>>);
    impl ModuleVisitor for SumSq<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.0.get::<D>(param.id) {
                if optim_gpu::supports_sum_squares(&g) {
                    let n = g.shape().num_elements();
                    self.1.push(g.reshape([n]));
                } else {
                    let sq = g.square().sum();
                    self.2 = Some(match self.2.take() {
                        Some(acc) => acc + sq,
                        None => sq,
                    });
                }
            }
        }
    }
    let mut sum = SumSq(grads, Vec::new(), None);
    model.visit(&mut sum);
    // On wgpu one kernel adds five gradients' squares to the running total (four burn ops each otherwise).
    // burn's total, if any, is the kernel's starting value (in f32, as the kernel keeps it).
    let start = sum.2.map(|acc| if acc.dtype() == DType::F32 { acc } else { acc.cast(DType::F32) });
    if sum.1.is_empty() { start } else { Some(optim_gpu::sum_squares_add(&sum.1, start)) }
}

impl Clip {
    /// The clip from the gradients' [`grad_sum_squares`] read back: the norm (loss scale divided out) and the
    /// factor for AdamW.
    pub fn from_sum_squares(sum_squares: f64, max_norm: f64, loss_scale: f64) -> Self {
        let norm = sum_squares.sqrt() / loss_scale;
        let clip = if norm > max_norm { max_norm / (norm + 1e-6) } else { 1.0 };
        Clip { norm, factor: clip / loss_scale }
    }
}

/// [`clip_grad_norm`]'s result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Clip {
    /// The global gradient norm before clipping, the loss scale divided out (NaN or infinite when an f16
    /// gradient overflowed).
    pub norm: f64,
    /// What every gradient element is multiplied by before the update: clipping's factor over the loss scale.
    pub factor: f64,
}

thread_local! {
    /// The gradient factor of the optimiser step running on this thread (1 outside [`step_scaled`]).
    /// burn's `ModuleOptimizer::step` hands an optimiser only the learning rate, so the factor reaches
    /// [`AdamW::step`] this way, set for the duration of one call and reset after it, even on a panic.
    static GRAD_SCALE: Cell<f64> = const { Cell::new(1.0) };
}

/// Moves the gradients of `part`'s parameters from `from` into `into`, so that one optimiser can step
/// them at another learning rate. (Scaling the gradients instead would do nothing: Adam's update does not
/// depend on the gradient's scale.)
fn move_grads<M: Module>(part: &M, from: &mut GradientsParams, into: &mut GradientsParams) {
    struct Move<'a>(&'a mut GradientsParams, &'a mut GradientsParams);
    impl ModuleVisitor for Move<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.0.remove::<D>(param.id) {
                self.1.register(param.id, g);
            }
        }
    }
    part.visit(&mut Move(from, into));
}

/// One optimiser step on the gradients times `grad_factor` ([`Clip::factor`]): the two generative decoders
/// (`decoder`, `text_decoder`) at `lr * lr_decoders`, every other parameter at `lr`.
pub fn step_with_decoder_lr(
    optim: &mut ModuleOptimizer,
    model: Ov3,
    mut grads: GradientsParams,
    lr: f64,
    lr_decoders: f64,
    grad_factor: f64,
) -> Ov3 {
    if lr_decoders == 1.0 {
        return step_scaled(optim, lr, model, grads, grad_factor);
    }
    let mut decoders = GradientsParams::new();
    move_grads(&model.decoder, &mut grads, &mut decoders);
    move_grads(&model.text_decoder, &mut grads, &mut decoders);
    let model = step_scaled(optim, lr * lr_decoders, model, decoders, grad_factor);
    step_scaled(optim, lr, model, grads, grad_factor)
}

/// `optim.step(lr, model, grads)` with every gradient multiplied by `grad_factor` as [`AdamW`] reads it
/// (`optim` from [`adamw`]: another optimiser would not see the factor), and on wgpu several parameters stepped
/// per launch.
pub fn step_scaled<M: Module>(
    optim: &mut ModuleOptimizer,
    lr: f64,
    model: M,
    grads: GradientsParams,
    grad_factor: f64,
) -> M {
    struct Reset(f64);
    impl Drop for Reset {
        fn drop(&mut self) {
            GRAD_SCALE.set(self.0);
        }
    }
    let _reset = Reset(GRAD_SCALE.replace(grad_factor));
    // On wgpu the parameters' updates share launches (`optim_gpu::gathered`), all launched before it returns.
    optim_gpu::gathered(|| optim.step(lr, model, grads))
}
