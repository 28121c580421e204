//! Fused layer norm, softmax and GELU on burn's `flex` CPU backend, each a differentiable burn op with a
//! one-pass forward and a one-pass backward over rows, spread over flex's rayon pool.
//!
//! burn 0.22's autodiff builds a layer norm out of about eight elementwise ops forward (and more backward)
//! and a softmax out of five, each a separate pass on one thread with its own allocation; these were the
//! largest cost of the CPU training step after the matmuls (docs/PERFORMANCE.md). The kernels are in
//! [`kernels`], the `ov3-kernels` crate (kernels/), compiled
//! optimised in every profile; they are checked against float64 code in `core/tests/cpu_ops.rs`.
//!
//! The model calls [`layer_norm`], [`softmax_last`] and [`gelu`]; on wgpu these are our WGSL kernels
//! (`gpu_ops`; GELU in f32 or f16, the normalisations in f32 as the model asks), elsewhere burn's own ops, so
//! there is one model code path for every device.

mod autodiff;

pub use ov3_kernels as kernels;
pub use ov3_kernels::AdamWStep;

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, DispatchDevice, backend_extension};
use burn::tensor::{DType, Device, Tensor};

#[backend_extension(Flex, Autodiff)]
pub trait FusedCpuBackend: Backend {
    /// Layer norm over the last dim of `x` with `gamma`, `beta` `[d]`.
    fn fused_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self>;
    /// `softmax(scale * x)` over the last dim.
    fn fused_softmax(x: FloatTensor<Self>, scale: f64) -> FloatTensor<Self>;
    /// Exact (erf) GELU.
    fn fused_gelu(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// One AdamW step on a parameter (not differentiable): `(param, moment_1, moment_2)` after it.
    fn fused_adamw(
        step: AdamWStep,
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// Whether `x` takes the fused path: a non-empty f32 tensor on the flex device, with or without autodiff
/// (rows of length 0 go to burn's ops, which handle them).
pub fn fused<const D: usize>(x: &Tensor<D>) -> bool {
    x.dtype() == DType::F32 && D > 0 && x.dims()[D - 1] > 0 && is_flex(&x.device())
}

fn is_flex(device: &Device) -> bool {
    matches!(device.clone().inner().as_dispatch(), DispatchDevice::Flex(_))
}

/// Layer norm over the last dim: `(x - mean) / sqrt(var + eps) * gamma + beta`, the biased variance.
/// Half-precision inputs are normalised in f32 and cast back (as burn's `LayerNorm` does).
pub fn layer_norm<const D: usize>(x: Tensor<D>, gamma: Tensor<1>, beta: Tensor<1>, eps: f64) -> Tensor<D> {
    let dtype = x.dtype();
    if matches!(dtype, DType::F16 | DType::BF16) {
        return layer_norm(x.cast(DType::F32), gamma.cast(DType::F32), beta.cast(DType::F32), eps).cast(dtype);
    }
    if crate::gpu_ops::supports_layer_norm(&x, &gamma, &beta) {
        return crate::gpu_ops::layer_norm(x, gamma, beta, eps, false);
    }
    if !fused(&x) || gamma.dtype() != DType::F32 || beta.dtype() != DType::F32 {
        return burn::tensor::module::layer_norm(x, gamma, Some(beta), eps);
    }
    Tensor::from_dispatch(<Dispatch as FusedCpuBackend>::fused_layer_norm(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        eps,
    ))
}

/// [`layer_norm`] with its output in `dtype` (a mixed-precision block's normalised input): f32 inside, the output
/// cast, except on wgpu, where the kernel writes f16 itself and reads its f16 gradient (no cast either way).
pub fn layer_norm_as<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    eps: f64,
    dtype: DType,
) -> Tensor<D> {
    if dtype == DType::F16 && crate::gpu_ops::supports_layer_norm(&x, &gamma, &beta) {
        return crate::gpu_ops::layer_norm(x, gamma, beta, eps, true);
    }
    layer_norm(x, gamma, beta, eps).cast(dtype)
}

/// `softmax(scale * x)` over the last dim (attention's scaled logits in one pass).
pub fn softmax_last<const D: usize>(x: Tensor<D>, scale: f64) -> Tensor<D> {
    if crate::gpu_ops::supports(&x) {
        return crate::gpu_ops::softmax_last(x, scale);
    }
    if !fused(&x) {
        return burn::tensor::activation::softmax(x.mul_scalar(scale), D - 1);
    }
    Tensor::from_dispatch(<Dispatch as FusedCpuBackend>::fused_softmax(x.into_dispatch(), scale))
}

/// `burn::tensor::activation::gelu(x)`, the exact (erf) form.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if crate::gpu_ops::supports_gelu(&x) {
        return crate::gpu_ops::gelu(x);
    }
    if !fused(&x) {
        return burn::tensor::activation::gelu(x);
    }
    Tensor::from_dispatch(<Dispatch as FusedCpuBackend>::fused_gelu(x.into_dispatch()))
}

/// One AdamW step on a parameter in one pass (`kernels::adamw`): `(param, moment_1, moment_2)` after it.
/// Only for f32 tensors on the flex device ([`fused`]); `optim::AdamW` steps the others with burn's AdamW.
pub fn adamw<const D: usize>(
    step: AdamWStep,
    param: Tensor<D>,
    grad: Tensor<D>,
    moment_1: Tensor<D>,
    moment_2: Tensor<D>,
) -> (Tensor<D>, Tensor<D>, Tensor<D>) {
    let (p, m, v) = <Dispatch as FusedCpuBackend>::fused_adamw(
        step,
        param.into_dispatch(),
        grad.into_dispatch(),
        moment_1.into_dispatch(),
        moment_2.into_dispatch(),
    );
    (Tensor::from_dispatch(p), Tensor::from_dispatch(m), Tensor::from_dispatch(v))
}

/// A flex tensor's values as one contiguous f32 slice (copied only when it is a strided view).
fn values(t: &FlexTensor) -> FlexTensor {
    t.to_contiguous()
}

fn slice(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("cpu_ops: a contiguous f32 tensor")
}

/// A new contiguous flex tensor of `shape` holding `data`.
fn tensor(data: Vec<f32>, shape: burn::tensor::Shape) -> FlexTensor {
    FlexTensor::from_data(burn::tensor::TensorData::new(data, shape))
}

fn last_dim(t: &FlexTensor) -> usize {
    *t.layout().shape().last().expect("cpu_ops: a tensor of rank >= 1")
}

/// The forward passes, shared by the plain and the autodiff implementations.
pub(crate) mod forward {
    use super::*;

    /// `(y, x, stats)`: the output, the contiguous input and the per-row `(mean, rstd)`.
    pub fn layer_norm(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        eps: f64,
    ) -> (FlexTensor, FlexTensor, Vec<[f32; 2]>) {
        let (x, gamma, beta) = (values(&x), values(&gamma), values(&beta));
        let d = last_dim(&x);
        assert!(slice(&gamma).len() == d && slice(&beta).len() == d, "layer norm: gamma and beta must be [{d}]");
        let (y, stats) = kernels::layer_norm_forward(slice(&x), slice(&gamma), slice(&beta), d, eps as f32);
        (tensor(y, x.layout().shape().clone()), x, stats)
    }

    pub fn softmax(x: FlexTensor, scale: f64) -> FlexTensor {
        let x = values(&x);
        tensor(kernels::softmax_forward(slice(&x), last_dim(&x), scale as f32), x.layout().shape().clone())
    }

    /// `(y, x)`: the output and the contiguous input.
    pub fn gelu(x: FlexTensor) -> (FlexTensor, FlexTensor) {
        let x = values(&x);
        (tensor(kernels::gelu_forward(slice(&x)), x.layout().shape().clone()), x)
    }
}

impl FusedCpuBackend for Flex {
    fn fused_layer_norm(x: FlexTensor, gamma: FlexTensor, beta: FlexTensor, eps: f64) -> FlexTensor {
        forward::layer_norm(x, gamma, beta, eps).0
    }

    fn fused_softmax(x: FlexTensor, scale: f64) -> FlexTensor {
        forward::softmax(x, scale)
    }

    fn fused_gelu(x: FlexTensor) -> FlexTensor {
        forward::gelu(x).0
    }

    fn fused_adamw(
        step: AdamWStep,
        param: FlexTensor,
        grad: FlexTensor,
        moment_1: FlexTensor,
        moment_2: FlexTensor,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        // In place where the tensors are not shared (the optimiser's own), else on copies.
        let [mut p, g, mut m, mut v] = [param, grad, moment_1, moment_2].map(|t| values(&t));
        kernels::adamw(&step, p.storage_mut(), slice(&g), m.storage_mut(), v.storage_mut());
        (p, m, v)
    }
}
