//! Mixed precision inside the transformer blocks (`crate::config::Precision`): what PyTorch's autocast does
//! for a matmul, written out. A block casts its normalised input to the compute dtype, its linear layers cast
//! their f32 (master) weights to the input's dtype, and the branch output is cast back to f32 before the
//! residual add (by its last linear layer, [`linear_to_f32`], which adds its bias in f32). burn's autodiff carries each cast backwards (the gradient is cast to the source's dtype), so
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
    let bias = layer.bias.as_ref().map(|b| b.val().cast(dtype));
    on_rows(x, |x| burn::tensor::module::linear(x, layer.weight.val().cast(dtype), bias))
}

/// `to_f32(linear(layer, x))`, as the last layer of a residual branch needs it, with the product in `x`'s dtype
/// cast up before the f32 bias is added (under f32: exactly [`linear`]). Against casting the whole output, a
/// half-precision step saves two kernel launches per such layer (the bias's cast forward, its gradient's cast
/// backward), and the bias add is not rounded to half precision.
pub fn linear_to_f32<const D: usize>(layer: &Linear, x: Tensor<D>) -> Tensor<D> {
    let dtype = x.dtype();
    if dtype == DType::F32 {
        return linear(layer, x);
    }
    on_rows(x, |x| {
        let y = to_f32(burn::tensor::module::linear(x, layer.weight.val().cast(dtype), None));
        match &layer.bias {
            Some(bias) => y + bias.val().unsqueeze(),
            None => y,
        }
    })
}

/// `f` on `x` with its leading dims folded into rows, `[rows, d_in]` -> `[rows, d_out]`, unfolded again.
fn on_rows<const D: usize>(x: Tensor<D>, f: impl FnOnce(Tensor<2>) -> Tensor<2>) -> Tensor<D> {
    let dims = x.dims();
    let rows = dims[..D - 1].iter().product::<usize>();
    let y = f(x.reshape([rows, dims[D - 1]]));
    let mut out = dims;
    out[D - 1] = y.dims()[1];
    y.reshape(out)
}

/// Back to f32, the dtype of the residual stream and of everything outside the blocks.
pub fn to_f32<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    x.cast(DType::F32)
}
