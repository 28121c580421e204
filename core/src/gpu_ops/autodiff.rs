//! The backward passes of the GPU ops for burn's autodiff: each forward keeps what its backward kernel reads
//! (the layer norm's input, gamma and row statistics; the softmax's output; the GELU's input; the attention's
//! heads and probabilities, or the flash kernels' output and log-sum-exp).

use std::marker::PhantomData;

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::{BoolTensor, FloatTensor, IntTensor};

use super::{GpuKernels, GpuOpsBackend, attend, attention};
use crate::flash::{FlashKernels, Rule};

struct LayerNormBackward<B>(PhantomData<B>);

impl<B> std::fmt::Debug for LayerNormBackward<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LayerNormBackward")
    }
}

impl<B: GpuKernels> Backward<B, 3> for LayerNormBackward<B> {
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

struct SoftmaxBackward<B>(PhantomData<B>);

impl<B> std::fmt::Debug for SoftmaxBackward<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SoftmaxBackward")
    }
}

impl<B: GpuKernels> Backward<B, 1> for SoftmaxBackward<B> {
    /// The output and the scale.
    type State = (FloatTensor<B>, f64);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let g = grads.consume::<B>(&ops.node);
        let (y, scale) = ops.state;
        if let Some(node) = node_x {
            grads.register::<B>(node.id, B::softmax_backward(y, g, scale));
        }
    }
}

struct GeluBackward<B>(PhantomData<B>);

impl<B> std::fmt::Debug for GeluBackward<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GeluBackward")
    }
}

impl<B: GpuKernels> Backward<B, 1> for GeluBackward<B> {
    /// The input.
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let g = grads.consume::<B>(&ops.node);
        if let Some(node) = node_x {
            grads.register::<B>(node.id, B::erf_gelu_backward(ops.state, g));
        }
    }
}

struct AttentionBackward<B>(PhantomData<B>);

impl<B> std::fmt::Debug for AttentionBackward<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AttentionBackward")
    }
}

impl<B: GpuKernels + FlashKernels> Backward<B, 1> for AttentionBackward<B> {
    type State = attention::Saved<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node_qkv] = ops.parents;
        let g = grads.consume::<B>(&ops.node);
        if let Some(node) = node_qkv {
            grads.register::<B>(node.id, attention::backward(ops.state, g));
        }
    }
}

impl<B: GpuKernels + FlashKernels, C: CheckpointStrategy> GpuOpsBackend for Autodiff<B, C> {
    fn gpu_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
        half: bool,
    ) -> FloatTensor<Self> {
        let backward = LayerNormBackward::<B>(PhantomData);
        match backward.prepare::<C>([x.node(), gamma.node(), beta.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (x, gamma) = (x.primitive().clone(), gamma.primitive().clone());
                let (y, stats) = B::layer_norm_forward(x.clone(), gamma.clone(), beta.primitive().clone(), eps, half);
                prep.finish((x, gamma, stats), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(
                B::layer_norm_forward(x.into_primitive(), gamma.into_primitive(), beta.into_primitive(), eps, half).0,
            ),
        }
    }

    fn gpu_softmax(x: FloatTensor<Self>, scale: f64) -> FloatTensor<Self> {
        match SoftmaxBackward::<B>(PhantomData).prepare::<C>([x.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let y = B::softmax_forward(x.primitive().clone(), scale);
                prep.finish((y.clone(), scale), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::softmax_forward(x.into_primitive(), scale)),
        }
    }

    fn gpu_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        match GeluBackward::<B>(PhantomData).prepare::<C>([x.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let x = x.primitive().clone();
                prep.finish(x.clone(), B::erf_gelu_forward(x))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::erf_gelu_forward(x.into_primitive())),
        }
    }

    fn gpu_attention(
        qkv: FloatTensor<Self>,
        heads: usize,
        mask: BoolTensor<Self>,
        masked: bool,
        padding: IntTensor<Self>,
        rule: Rule,
        fused: bool,
    ) -> FloatTensor<Self> {
        let how = attend::<B>(masked.then_some(mask), padding, rule, fused);
        match AttentionBackward::<B>(PhantomData).prepare::<C>([qkv.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (out, saved) = attention::forward::<B>(qkv.primitive().clone(), heads, how);
                prep.finish(saved, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(attention::forward::<B>(qkv.into_primitive(), heads, how).0),
        }
    }
}
