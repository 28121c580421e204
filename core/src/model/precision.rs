//! Mixed precision inside the transformer blocks (`crate::config::Precision`): what PyTorch's autocast does
//! for a matmul, written out. A block casts its normalised input to the compute dtype, its linear layers cast
//! their f32 (master) weights to the input's dtype, and the branch output is cast back to f32 before the
//! residual add. burn's autodiff carries each cast backwards (the gradient is cast to the source's dtype), so
//! the parameters receive f32 gradients. Under f32 every cast here is a no-op: the f32 graph is unchanged.

use burn::nn::Linear;
use burn::tensor::{DType, Tensor};

/// `layer.forward(x)` in `x`'s dtype: `W` and `b` cast from their f32 parameters (the same op as
/// `Linear::forward`, which is what this computes under f32).
pub fn linear<const D: usize>(layer: &Linear, x: Tensor<D>) -> Tensor<D> {
    let dtype = x.dtype();
    let bias = layer.bias.as_ref().map(|b| b.val().cast(dtype));
    burn::tensor::module::linear(x, layer.weight.val().cast(dtype), bias)
}

/// Back to f32, the dtype of the residual stream and of everything outside the blocks.
pub fn to_f32<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    x.cast(DType::F32)
}
