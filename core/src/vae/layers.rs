//! Layers shared by the autoencoders, built straight from weight files: convolutions, GroupNorm, swish,
//! nearest 2x upsampling.

use burn::module::Param;
use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, PaddingConfig2d};
use burn::tensor::activation::sigmoid;
use burn::tensor::{Device, Tensor};

use crate::weights::{Weights, WeightsError};

/// Reads tensors under a key prefix onto one device.
pub struct Loader<'a> {
    pub weights: &'a Weights,
    pub device: &'a Device,
}

impl Loader<'_> {
    /// Conv2d `key` with `c_in -> c_out`, square kernel `k`, stride `stride` and `padding` (top, left,
    /// bottom, right); `bias` says whether the file must hold one.
    pub fn conv(
        &self,
        key: &str,
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        padding: [usize; 4],
        bias: bool,
    ) -> Result<Conv2d, WeightsError> {
        let weight = self.weights.tensor(&format!("{key}.weight"), [c_out, c_in, k, k], self.device)?;
        let bias = if bias {
            Some(Param::from_tensor(self.weights.tensor(&format!("{key}.bias"), [c_out], self.device)?))
        } else {
            None
        };
        let [t, l, b, r] = padding;
        Ok(Conv2d {
            weight: Param::from_tensor(weight),
            bias,
            stride: [stride, stride],
            kernel_size: [k, k],
            dilation: [1, 1],
            groups: 1,
            padding: PaddingConfig2d::Explicit(t, l, b, r),
        })
    }

    /// A 3x3 "same" conv with bias.
    pub fn conv3(&self, key: &str, c_in: usize, c_out: usize) -> Result<Conv2d, WeightsError> {
        self.conv(key, c_in, c_out, 3, 1, [1; 4], true)
    }

    /// A 1x1 conv with bias; also accepts a Linear `[c_out, c_in]` weight (diffusers' attention).
    pub fn conv1(&self, key: &str, c_in: usize, c_out: usize) -> Result<Conv2d, WeightsError> {
        let weight_key = format!("{key}.weight");
        let weight = if self.weights.shape(&weight_key)?.len() == 2 {
            self.weights.tensor(&weight_key, [c_out, c_in], self.device)?.reshape([c_out, c_in, 1, 1])
        } else {
            self.weights.tensor(&weight_key, [c_out, c_in, 1, 1], self.device)?
        };
        let bias = self.weights.tensor(&format!("{key}.bias"), [c_out], self.device)?;
        Ok(Conv2d {
            weight: Param::from_tensor(weight),
            bias: Some(Param::from_tensor(bias)),
            stride: [1, 1],
            kernel_size: [1, 1],
            dilation: [1, 1],
            groups: 1,
            padding: PaddingConfig2d::Valid,
        })
    }

    /// GroupNorm(32 groups, eps 1e-6, affine) over `channels`.
    pub fn group_norm(&self, key: &str, channels: usize) -> Result<GroupNorm, WeightsError> {
        if channels % 32 != 0 {
            return Err(self.weights.invalid(format!("`{key}` has {channels} channels, not a multiple of 32 groups")));
        }
        Ok(GroupNorm {
            gamma: Some(Param::from_tensor(self.weights.tensor(&format!("{key}.weight"), [channels], self.device)?)),
            beta: Some(Param::from_tensor(self.weights.tensor(&format!("{key}.bias"), [channels], self.device)?)),
            num_groups: 32,
            num_channels: channels,
            epsilon: 1e-6,
            affine: true,
        })
    }
}

/// x * sigmoid(x).
pub fn swish(x: Tensor<4>) -> Tensor<4> {
    x.clone() * sigmoid(x)
}

/// Nearest-neighbour 2x upsampling: every pixel becomes a 2x2 block.
pub fn upsample_nearest_2x(x: Tensor<4>) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    x.reshape([b, c, h, 1, w, 1]).expand([b, c, h, 2, w, 2]).reshape([b, c, 2 * h, 2 * w])
}
