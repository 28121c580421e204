//! The backward passes of the fused CPU ops for burn's autodiff: each forward keeps what its one-pass
//! backward kernel reads (the input and row statistics, or the output).

use burn::backend::AutodiffBackend;
use burn::backend::Flex;
use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;

use super::{AdamWStep, FusedCpuBackend, forward, kernels, last_dim, slice, tensor, values};

#[derive(Debug)]
struct LayerNormBackward;

impl Backward<Flex, 3> for LayerNormBackward {
    /// The contiguous input, gamma, and each row's (mean, rstd).
    type State = (FlexTensor, FlexTensor, Vec<[f32; 2]>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node_x, node_gamma, node_beta] = ops.parents;
        let g = values(&grads.consume::<Flex>(&ops.node));
        let (x, gamma, stats) = ops.state;
        let d = last_dim(&x);
        let (dx, dgamma, dbeta) = kernels::layer_norm_backward(slice(&x), slice(&values(&gamma)), &stats, slice(&g), d);
        let shape_x = x.layout().shape().clone();
        let shape_p = gamma.layout().shape().clone();
        for (node, grad, shape) in
            [(node_x, dx, shape_x), (node_gamma, dgamma, shape_p.clone()), (node_beta, dbeta, shape_p)]
        {
            if let Some(node) = node {
                grads.register::<Flex>(node.id, tensor(grad, shape));
            }
        }
    }
}

#[derive(Debug)]
struct SoftmaxBackward;

impl Backward<Flex, 1> for SoftmaxBackward {
    /// The output and the scale.
    type State = (FlexTensor, f32);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let g = values(&grads.consume::<Flex>(&ops.node));
        let (y, scale) = ops.state;
        if let Some(node) = node_x {
            let dx = kernels::softmax_backward(slice(&y), slice(&g), last_dim(&y), scale);
            grads.register::<Flex>(node.id, tensor(dx, y.layout().shape().clone()));
        }
    }
}

#[derive(Debug)]
struct GeluBackward;

impl Backward<Flex, 1> for GeluBackward {
    /// The contiguous input.
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let g = values(&grads.consume::<Flex>(&ops.node));
        let x = ops.state;
        if let Some(node) = node_x {
            let dx = kernels::gelu_backward(slice(&x), slice(&g));
            grads.register::<Flex>(node.id, tensor(dx, x.layout().shape().clone()));
        }
    }
}

impl<C: CheckpointStrategy> FusedCpuBackend for Autodiff<Flex, C> {
    fn fused_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        match LayerNormBackward.prepare::<C>([x.node(), gamma.node(), beta.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let gamma = gamma.primitive().clone();
                let (y, x, stats) =
                    forward::layer_norm(x.primitive().clone(), gamma.clone(), beta.primitive().clone(), eps);
                prep.finish((x, gamma, stats), y)
            }
            OpsKind::UnTracked(prep) => prep
                .finish(forward::layer_norm(x.into_primitive(), gamma.into_primitive(), beta.into_primitive(), eps).0),
        }
    }

    fn fused_softmax(x: FloatTensor<Self>, scale: f64) -> FloatTensor<Self> {
        match SoftmaxBackward.prepare::<C>([x.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let y = forward::softmax(x.primitive().clone(), scale);
                prep.finish((y.clone(), scale as f32), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(forward::softmax(x.into_primitive(), scale)),
        }
    }

    fn fused_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        match GeluBackward.prepare::<C>([x.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (y, x) = forward::gelu(x.primitive().clone());
                prep.finish(x, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(forward::gelu(x.into_primitive()).0),
        }
    }

    /// Optimisers step the parameters' values, outside the graph: the result is a constant.
    fn fused_adamw(
        step: AdamWStep,
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let inner = |t: FloatTensor<Self>| <Self as AutodiffBackend>::inner(t);
        let (p, m, v) = Flex::fused_adamw(step, inner(param), inner(grad), inner(moment_1), inner(moment_2));
        let outer = <Self as AutodiffBackend>::from_inner;
        (outer(p), outer(m), outer(v))
    }
}
