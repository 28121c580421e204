//! LayerNorm over the last dim with a learned scale and shift (`gamma`, `beta`: burn's names, the
//! checkpoint keys). The arithmetic is [`crate::cpu_ops::layer_norm`]: fused on the CPU, burn's op elsewhere.

use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::{DType, Device, Tensor};

#[derive(Module, Debug)]
pub struct LayerNorm {
    pub gamma: Param<Tensor<1>>,
    pub beta: Param<Tensor<1>>,
    #[module(skip)]
    pub epsilon: f64,
}

impl LayerNorm {
    /// gamma = 1, beta = 0.
    pub fn new(width: usize, epsilon: f64, device: &Device) -> Self {
        Self { gamma: Initializer::Ones.init([width], device), beta: Initializer::Zeros.init([width], device), epsilon }
    }

    /// `[..., width]` -> `[..., width]`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        crate::cpu_ops::layer_norm(x, self.gamma.val(), self.beta.val(), self.epsilon)
    }

    /// [`Self::forward`] with the output in `dtype` (computed in f32; see `cpu_ops::layer_norm_as`).
    pub fn forward_as<const D: usize>(&self, x: Tensor<D>, dtype: DType) -> Tensor<D> {
        crate::cpu_ops::layer_norm_as(x, self.gamma.val(), self.beta.val(), self.epsilon, dtype)
    }
}
