//! The backward pass of the fused attention for burn's autodiff: the forward keeps Q, K, V, O and
//! the log-sum-exp; the backward runs the two WGSL backward kernels ([`FlashKernels::flash_backward`]).

use std::marker::PhantomData;

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::{FloatTensor, IntTensor};

use super::{FlashAttentionBackend, FlashKernels, Rule, padding_as_float};

struct FlashBackward<B>(PhantomData<B>);

impl<B> std::fmt::Debug for FlashBackward<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FlashBackward")
    }
}

/// What the backward pass reads: q, k, v, the output, the log-sum-exp, the key padding, the rule.
type Saved<B> = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, Rule);

impl<B: FlashKernels> Backward<B, 3> for FlashBackward<B> {
    type State = Saved<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node_q, node_k, node_v] = ops.parents;
        let grad_out = grads.consume::<B>(&ops.node);
        let (q, k, v, out, lse, padding, rule) = ops.state;
        let (dq, dk, dv) = B::flash_backward(q, k, v, out, lse, grad_out, padding, rule);
        for (node, grad) in [(node_q, dq), (node_k, dk), (node_v, dv)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

impl<B: FlashKernels, C: CheckpointStrategy> FlashAttentionBackend for Autodiff<B, C> {
    fn flash_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_padding: IntTensor<Self>,
        rule: Rule,
    ) -> FloatTensor<Self> {
        let padding = padding_as_float::<B>(key_padding);
        let backward = FlashBackward::<B>(PhantomData);
        match backward.prepare::<C>([q.node(), k.node(), v.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (q, k, v) = (q.primitive().clone(), k.primitive().clone(), v.primitive().clone());
                let (out, lse) = B::flash_forward(q.clone(), k.clone(), v.clone(), padding.clone(), rule);
                prep.finish((q, k, v, out.clone(), lse, padding, rule), out)
            }
            OpsKind::UnTracked(prep) => prep
                .finish(B::flash_forward(q.into_primitive(), k.into_primitive(), v.into_primitive(), padding, rule).0),
        }
    }
}
