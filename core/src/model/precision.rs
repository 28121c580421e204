//! Mixed precision inside the transformer blocks (`crate::config::Precision`): what PyTorch's autocast does
//! for a matmul, written out. A block casts its normalised input to the compute dtype, its linear layers cast
//! their f32 (master) weights to the input's dtype, and the branch output is cast back to f32 before the
//! residual add. burn's autodiff carries each cast backwards (the gradient is cast to the source's dtype), so
//! the parameters receive f32 gradients. Under f32 every cast here is a no-op: the f32 graph is unchanged.

use burn::nn::Linear;
use burn::tensor::{DType, Tensor};

/// `layer.forward(x)` in `x`'s dtype: `W` and `b` cast from their f32 parameters.
///
/// The leading dims of `x` are folded into rows first, so the product is one `[rows, d_in] @ [d_in, d_out]`
/// matmul and the weight's gradient one `[d_in, rows] @ [rows, d_out]`, whatever the batch. (Left
/// `[B, N, d_in]`, burn keeps a batched matmul when N fills its row tiles, and the weight gradient becomes
/// B small matmuls and a sum: the largest item of the CPU step's backward pass, docs/PERFORMANCE.md.)
pub fn linear<const D: usize>(layer: &Linear, x: Tensor<D>) -> Tensor<D> {
    let dtype = x.dtype();
    let dims = x.dims();
    let rows = dims[..D - 1].iter().product::<usize>();
    let bias = layer.bias.as_ref().map(|b| b.val().cast(dtype));
    let y = burn::tensor::module::linear(x.reshape([rows, dims[D - 1]]), layer.weight.val().cast(dtype), bias);
    let mut out = dims;
    out[D - 1] = y.dims()[1];
    y.reshape(out)
}

/// Back to f32, the dtype of the residual stream and of everything outside the blocks.
pub fn to_f32<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    x.cast(DType::F32)
}
