//! Fused layer norm, softmax, GELU and attention on burn's wgpu backend: our WGSL kernels
//! (`shaders/layer_norm_*.wgsl`, `softmax_*.wgsl`, `gelu.wgsl`) registered as differentiable burn ops, the GPU
//! counterparts of `cpu_ops`'s on flex (the model calls `cpu_ops::layer_norm`, `softmax_last` and `gelu`, which
//! pick the device's kernels).
//!
//! burn 0.22 builds a layer norm out of about ten tensor ops forward and more than twenty backward, each its
//! own GPU dispatch: the tiny preset's 40 layer norms were 1,679 of its training step's 3,879 kernel launches
//! (`ov3 bench step --kernels count`), and a GPU step is dispatch-bound at ov3's sizes (docs/PERFORMANCE.md
//! "Kernel launches per step"). Here the forward is one launch (one workgroup per row; it also keeps each row's
//! mean and rstd) and the backward two or three: the input gradient (one workgroup per row), the parameter
//! gradients summed over chunks of rows, and one reduction over the chunks when there is more than one.
//! Softmax (the reference attention's; burn's is five ops forward) is one row kernel each way, GELU (burn's erf
//! form, four ops forward) one element-wise kernel each way: 3879 -> 1821 launches in the tiny step in all
//! (1630 with clipping's sum of squares taking five gradients a launch, `optim_gpu`).
//! `core/tests/gpu_ops.rs` checks values and gradients against float64 code and against burn's own ops.
//!
//! The attention layer between its two projections is one op too ([`attention`], `attention.rs`): the head
//! split that burn's autodiff made a dozen launches per layer is one copy forward and one kernel backward
//! (`shaders/heads_join.wgsl`): 1630 -> 1396 launches in the tiny step.

mod attention;
mod autodiff;
pub(crate) mod kernels;

use burn::backend::tensor::{BoolTensor, FloatTensor, IntTensor};
use burn::backend::{Backend, DType, Dispatch, backend_extension};
use burn::tensor::{Bool, Int, Tensor};

use crate::flash::{FlashKernels, Rule};
use crate::model::attention::Masks;

/// The differentiable ops the model calls: on burn's autodiff backend each records its backward kernels
/// ([`GpuKernels`]) for the backward pass (`autodiff.rs`), on the plain backend it is the forward kernel alone.
#[backend_extension(Cube, Autodiff)]
pub trait GpuOpsBackend: Backend {
    /// Layer norm over the last dim of `x` (f32) with `gamma`, `beta` `[d]` (f32); the output in f16 with `half`
    /// (a mixed-precision block's input), else f32.
    fn gpu_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
        half: bool,
    ) -> FloatTensor<Self>;
    /// `softmax(scale * x)` over the last dim (f32).
    fn gpu_softmax(x: FloatTensor<Self>, scale: f64) -> FloatTensor<Self>;
    /// Exact (erf) GELU (f32 or f16).
    fn gpu_gelu(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// Multi-head self-attention from the fused projection `qkv` `[B, N, 3D]` to the heads' merged output
    /// `[B, N, D]`, in `qkv`'s dtype (`attention.rs`): the reference maths, under `mask` (broadcastable to
    /// `[B, H, N, N]`, true where masked) where `masked`, or with `fused` the flash kernels under `padding`
    /// (`[B, N]`, nonzero where the key is padding) and `rule`.
    #[allow(clippy::too_many_arguments)]
    fn gpu_attention(
        qkv: FloatTensor<Self>,
        heads: usize,
        mask: BoolTensor<Self>,
        masked: bool,
        padding: IntTensor<Self>,
        rule: Rule,
        fused: bool,
    ) -> FloatTensor<Self>;
}

/// The kernels themselves, on the backend that runs them: cubecl's, or (with burn's `fusion` feature) the
/// fusion backend wrapping it, which queues them as opaque operations between its fused element-wise blocks.
#[backend_extension(Cube, Fusion: cfg(feature = "fusion"))]
pub trait GpuKernels: Backend {
    /// The output (`x`'s shape; f16 with `half`, else f32) and each row's `(mean, rstd)`, `[rows, 2]`.
    #[fusion(meta = |x, _gamma, _beta, _eps, half| (output_spec(x, *half), stats_spec(x)))]
    fn layer_norm_forward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
        half: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// `(dx, dgamma, dbeta)` for the upstream gradient `g` (the output's dtype), from the input and the forward's
    /// `stats`; all three f32.
    #[fusion(meta = |x, gamma, _stats, _g| (x.clone(), gamma.clone(), gamma.clone()))]
    fn layer_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        g: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// `softmax(scale * x)` over the last dim.
    #[fusion(meta = |x, _scale| x.clone())]
    fn softmax_forward(x: FloatTensor<Self>, scale: f64) -> FloatTensor<Self>;

    /// The input gradient of [`GpuKernels::softmax_forward`] from its output `y` and the upstream gradient `g`.
    #[fusion(meta = |y, _g, _scale| y.clone())]
    fn softmax_backward(y: FloatTensor<Self>, g: FloatTensor<Self>, scale: f64) -> FloatTensor<Self>;

    /// Exact (erf) GELU.
    #[fusion(meta = |x| x.clone())]
    fn erf_gelu_forward(x: FloatTensor<Self>) -> FloatTensor<Self>;

    /// The input gradient of [`GpuKernels::erf_gelu_forward`] for the upstream gradient `g`.
    #[fusion(meta = |x, _g| x.clone())]
    fn erf_gelu_backward(x: FloatTensor<Self>, g: FloatTensor<Self>) -> FloatTensor<Self>;

    /// The gradients of an attention layer's q, k, v heads `[B, H, N, Dh]` -> that of the projection they were
    /// split from, `[B, N, 3 H Dh]`.
    #[fusion(meta = |dq, _dk, _dv| joined_spec(dq))]
    fn heads_join(dq: FloatTensor<Self>, dk: FloatTensor<Self>, dv: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// The layer norm output's shape and dtype for input `x`, for the fusion backend's queue.
#[cfg(feature = "fusion")]
fn output_spec(x: &burn::backend::fusion::custom::TensorSpec, half: bool) -> burn::backend::fusion::custom::TensorSpec {
    burn::backend::fusion::custom::TensorSpec::new(x.shape.clone(), if half { DType::F16 } else { DType::F32 })
}

/// The statistics' shape and dtype for input `x` (`[rows, 2]`, f32), for the fusion backend's queue.
#[cfg(feature = "fusion")]
fn stats_spec(x: &burn::backend::fusion::custom::TensorSpec) -> burn::backend::fusion::custom::TensorSpec {
    let dims = x.shape.clone();
    let d = dims[dims.num_dims() - 1];
    let shape = burn::tensor::Shape::from(vec![dims.num_elements() / d, 2]);
    burn::backend::fusion::custom::TensorSpec::new(shape, DType::F32)
}

/// The joined gradient's shape and dtype for head gradients like `dq` (`[B, N, 3 H Dh]`), for fusion's queue.
#[cfg(feature = "fusion")]
fn joined_spec(dq: &burn::backend::fusion::custom::TensorSpec) -> burn::backend::fusion::custom::TensorSpec {
    let [b, h, n, dh] = dq.shape.dims::<4>();
    burn::backend::fusion::custom::TensorSpec::new(burn::tensor::Shape::from(vec![b, n, 3 * h * dh]), dq.dtype)
}

impl GpuKernels for burn::backend::wgpu::CubeBackend {
    fn layer_norm_forward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
        half: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        kernels::layer_norm(x, gamma, beta, eps, half)
    }

    fn layer_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        g: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        kernels::layer_norm_backward(x, gamma, stats, g)
    }

    fn softmax_forward(x: FloatTensor<Self>, scale: f64) -> FloatTensor<Self> {
        kernels::softmax(x, scale)
    }

    fn softmax_backward(y: FloatTensor<Self>, g: FloatTensor<Self>, scale: f64) -> FloatTensor<Self> {
        kernels::softmax_backward(y, g, scale)
    }

    fn erf_gelu_forward(x: FloatTensor<Self>) -> FloatTensor<Self> {
        kernels::gelu(x, None)
    }

    fn erf_gelu_backward(x: FloatTensor<Self>, g: FloatTensor<Self>) -> FloatTensor<Self> {
        kernels::gelu(x, Some(g))
    }

    fn heads_join(dq: FloatTensor<Self>, dk: FloatTensor<Self>, dv: FloatTensor<Self>) -> FloatTensor<Self> {
        kernels::heads_join(dq, dk, dv)
    }
}

impl GpuOpsBackend for CubeDispatched {
    fn gpu_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
        half: bool,
    ) -> FloatTensor<Self> {
        Self::layer_norm_forward(x, gamma, beta, eps, half).0
    }

    fn gpu_softmax(x: FloatTensor<Self>, scale: f64) -> FloatTensor<Self> {
        Self::softmax_forward(x, scale)
    }

    fn gpu_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::erf_gelu_forward(x)
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
        attention::forward::<Self>(qkv, heads, attend::<Self>(masked.then_some(mask), padding, rule, fused)).0
    }
}

/// The attention op's arguments as the way its heads attend.
fn attend<B: GpuKernels + FlashKernels>(
    mask: Option<BoolTensor<B>>,
    padding: IntTensor<B>,
    rule: Rule,
    fused: bool,
) -> attention::Attend<B> {
    if fused {
        attention::Attend::Fused { padding: crate::flash::padding_as_float::<B>(padding), rule }
    } else {
        attention::Attend::Reference { mask }
    }
}

/// The backend burn's dispatch runs a wgpu device on: cubecl's, wrapped by fusion when that feature is on.
#[cfg(not(feature = "fusion"))]
type CubeDispatched = burn::backend::wgpu::CubeBackend;
#[cfg(feature = "fusion")]
type CubeDispatched = burn::backend::fusion::Fusion<burn::backend::wgpu::CubeBackend>;

/// Whether [`softmax_last`] takes `x` (and [`layer_norm`], with its parameters): a non-empty f32 tensor on a
/// wgpu device (with or without autodiff).
pub fn supports<const D: usize>(x: &Tensor<D>) -> bool {
    x.dtype() == DType::F32 && on_wgpu(x)
}

/// Whether [`gelu`] takes `x`: a non-empty f32 or f16 (mixed precision's) tensor on a wgpu device.
pub fn supports_gelu<const D: usize>(x: &Tensor<D>) -> bool {
    matches!(x.dtype(), DType::F32 | DType::F16) && on_wgpu(x)
}

fn on_wgpu<const D: usize>(x: &Tensor<D>) -> bool {
    D > 0 && x.shape().num_elements() > 0 && crate::wgsl::runs_here(&x.device())
}

/// Whether [`layer_norm`] takes `x`: a non-empty f32 tensor on a wgpu device (with or without autodiff), with
/// f32 `gamma` and `beta` as wide as its last dim.
pub fn supports_layer_norm<const D: usize>(x: &Tensor<D>, gamma: &Tensor<1>, beta: &Tensor<1>) -> bool {
    supports(x)
        && gamma.dtype() == DType::F32
        && beta.dtype() == DType::F32
        && gamma.dims() == [x.dims()[D - 1]]
        && beta.dims() == [x.dims()[D - 1]]
}

/// `(x - mean) / sqrt(var + eps) * gamma + beta` over the last dim (biased variance) through the kernels;
/// differentiable in all three. The output is f16 with `half` (written so by the kernel where the adapter has
/// shader-f16: a mixed-precision block's input without a cast of its own each way), else f32. Call only where
/// [`supports_layer_norm`] holds.
pub fn layer_norm<const D: usize>(x: Tensor<D>, gamma: Tensor<1>, beta: Tensor<1>, eps: f64, half: bool) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as GpuOpsBackend>::gpu_layer_norm(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        eps,
        half,
    ))
}

/// `softmax(scale * x)` over the last dim through the kernels; differentiable. Call only where [`supports`]
/// holds.
pub fn softmax_last<const D: usize>(x: Tensor<D>, scale: f64) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as GpuOpsBackend>::gpu_softmax(x.into_dispatch(), scale))
}

/// Whether [`attention`] takes the projection `qkv`: a non-empty float tensor on a wgpu device, with these ops on.
pub fn supports_attention(qkv: &Tensor<3>) -> bool {
    matches!(qkv.dtype(), DType::F32 | DType::F16 | DType::BF16) && on_wgpu(qkv)
}

/// Multi-head self-attention between the two projections: `qkv` `[B, N, 3D]` split into `heads` heads, each
/// attending under `mask` (by the flash kernels where `fused`, else by two matmuls around the softmax kernel),
/// merged into `[B, N, D]`; differentiable in `qkv`. Call only where [`supports_attention`] holds (and with
/// `fused` only where `flash::supports` does).
pub fn attention(qkv: Tensor<3>, heads: usize, mask: &Masks, fused: bool) -> Tensor<3> {
    let [b, n, _] = qkv.dims();
    let device = qkv.device();
    // The op takes every tensor argument either way (burn's extension macro passes no optional bool tensor);
    // those the chosen path does not read are empty stand-ins, which launch nothing.
    let (padding, rule, dense) = if fused {
        let (padding, rule) = crate::flash::padding_and_rule(&mask.rule, b, n, &device);
        (padding, rule, None)
    } else {
        (Tensor::<2, Int>::empty([1, 1], &device), Rule::All, mask.dense.clone())
    };
    let masked = dense.is_some();
    let dense = dense.unwrap_or_else(|| Tensor::<4, Bool>::empty([1, 1, 1, 1], &device));
    Tensor::from_dispatch(<Dispatch as GpuOpsBackend>::gpu_attention(
        qkv.into_dispatch(),
        heads,
        dense.into_dispatch(),
        masked,
        padding.into_dispatch(),
        rule,
        fused,
    ))
}

/// Exact (erf) GELU through the kernels, in `x`'s dtype; differentiable. Call only where [`supports_gelu`] holds.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as GpuOpsBackend>::gpu_gelu(x.into_dispatch()))
}
