//! AdamW as SPEC §4 sets it: betas (0.9, 0.95), weight decay on matrices only, global grad-norm clipping.

use burn::module::{Module, ModuleVisitor, Param, ParamGroup, ParamId};
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::Tensor;

/// AdamW whose decay skips every parameter of rank < 2 (norms, biases, the logit scale).
pub fn adamw<M: Module>(model: &M, weight_decay: f32) -> ModuleOptimizer {
    let base = AdamWConfig::new().with_beta_1(0.9).with_beta_2(0.95).with_epsilon(1e-8);
    let no_decay = ParamGroup::from_ids(no_decay_ids(model));
    base.clone().with_weight_decay(weight_decay).init().with_group(no_decay, base.with_weight_decay(0.0).build(), None)
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

/// Scales all gradients together so their global L2 norm is at most `max_norm` (as PyTorch's
/// `clip_grad_norm_`; burn's own clipping works per tensor). Returns the norm before clipping.
pub fn clip_grad_norm<M: Module>(model: &M, grads: &mut GradientsParams, max_norm: f64) -> f64 {
    struct SumSq<'a>(&'a GradientsParams, Option<Tensor<1>>);
    impl ModuleVisitor for SumSq<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.0.get::<D>(param.id) {
                let s = g.powi_scalar(2).sum();
                self.1 = Some(match self.1.take() {
                    Some(acc) => acc + s,
                    None => s,
                });
            }
        }
    }
    struct Scale<'a>(&'a mut GradientsParams, f64);
    impl ModuleVisitor for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.0.remove::<D>(param.id) {
                self.0.register(param.id, g.mul_scalar(self.1));
            }
        }
    }
    let mut sum = SumSq(grads, None);
    model.visit(&mut sum);
    let norm = sum.1.map(|s| (s.into_scalar::<f32>() as f64).sqrt()).unwrap_or(0.0);
    if norm.is_finite() && norm > max_norm {
        model.visit(&mut Scale(grads, max_norm / (norm + 1e-6)));
    }
    norm
}
