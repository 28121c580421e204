//! The backward pass of the GPU layer norm for burn's autodiff: the forward keeps the input, gamma and each
//! row's (mean, rstd); the backward runs [`NormKernels::layer_norm_backward`].

use std::marker::PhantomData;

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;

use super::{GpuNormBackend, NormKernels};

struct LayerNormBackward<B>(PhantomData<B>);

impl<B> std::fmt::Debug for LayerNormBackward<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LayerNormBackward")
    }
}

impl<B: NormKernels> Backward<B, 3> for LayerNormBackward<B> {
    /// The input, gamma, and the rows' statistics.
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node_x, node_gamma, node_beta] = ops.parents;
        let g = grads.consume::<B>(&ops.node);
        let (x, gamma, stats) = ops.state;
        let (dx, dgamma, dbeta) = B::layer_norm_backward(x, gamma, stats, g);
        for (node, grad) in [(node_x, dx), (node_gamma, dgamma), (node_beta, dbeta)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

impl<B: NormKernels, C: CheckpointStrategy> GpuNormBackend for Autodiff<B, C> {
    fn gpu_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        let backward = LayerNormBackward::<B>(PhantomData);
        match backward.prepare::<C>([x.node(), gamma.node(), beta.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (x, gamma) = (x.primitive().clone(), gamma.primitive().clone());
                let (y, stats) = B::layer_norm_forward(x.clone(), gamma.clone(), beta.primitive().clone(), eps);
                prep.finish((x, gamma, stats), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(
                B::layer_norm_forward(x.into_primitive(), gamma.into_primitive(), beta.into_primitive(), eps).0,
            ),
        }
    }
}
