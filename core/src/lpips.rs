//! LPIPS (Zhang et al. 2018, v0.1): a perceptual distance from a frozen VGG16 or AlexNet trunk and the
//! official linear heads. Used as the lambda term of eq. 4 and as a metric.
//!
//! Weights come from two user-supplied safetensors files, keys as PyTorch names them: the torchvision
//! trunk (`features.{i}.weight/bias`; `classifier.*` is ignored) and the lpips package's heads
//! (`lin{k}.model.1.weight`). `tools/lpips_weights.py` converts the official `.pth` files.

use std::path::Path;

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::tensor::module::max_pool2d;
use burn::tensor::ops::MaxPoolOptions;
use burn::tensor::{Device, Tensor};

use crate::losses::Perceptual;
use crate::vae::layers::Loader;
use crate::weights::{Weights, WeightsError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trunk {
    Vgg16,
    Alex,
}

/// One step of a trunk, by its index in torchvision's `features`.
#[derive(Debug, Clone, Copy)]
enum Op {
    /// Conv (torchvision index, kernel, stride, padding) + ReLU; `tap` when LPIPS reads its output. Widths
    /// come from the weights, so reduced-width trunks (the test fixtures) load too.
    Conv { index: usize, k: usize, stride: usize, pad: usize, tap: bool },
    /// Max pool (kernel, stride).
    Pool { k: usize, stride: usize },
}

impl Trunk {
    fn plan(self) -> Vec<Op> {
        let conv = |index, tap| Op::Conv { index, k: 3, stride: 1, pad: 1, tap };
        let pool = |k, stride| Op::Pool { k, stride };
        match self {
            Trunk::Vgg16 => vec![
                conv(0, false),
                conv(2, true),
                pool(2, 2),
                conv(5, false),
                conv(7, true),
                pool(2, 2),
                conv(10, false),
                conv(12, false),
                conv(14, true),
                pool(2, 2),
                conv(17, false),
                conv(19, false),
                conv(21, true),
                pool(2, 2),
                conv(24, false),
                conv(26, false),
                conv(28, true),
            ],
            Trunk::Alex => vec![
                Op::Conv { index: 0, k: 11, stride: 4, pad: 2, tap: true },
                pool(3, 2),
                Op::Conv { index: 3, k: 5, stride: 1, pad: 2, tap: true },
                pool(3, 2),
                conv(6, true),
                conv(8, true),
                conv(10, true),
            ],
        }
    }

    /// The trunk of a torchvision `features` checkpoint: AlexNet opens with an 11x11 convolution.
    fn of_features(features: &Weights) -> Result<Self, WeightsError> {
        match features.shape("features.0.weight")?.as_slice() {
            [_, 3, 11, 11] => Ok(Trunk::Alex),
            [_, 3, 3, 3] if features.contains("features.28.weight") => Ok(Trunk::Vgg16),
            _ => Err(features.unknown_layout("not a torchvision VGG16 or AlexNet `features` trunk")),
        }
    }
}

/// The frozen LPIPS network.
#[derive(Module, Debug)]
pub struct Lpips {
    /// Trunk convolutions in order (the pooling between them is in `plan`).
    pub convs: Vec<Conv2d>,
    /// One 1x1 conv (no bias) per tapped layer.
    pub lins: Vec<Conv2d>,
    #[module(skip)]
    trunk: Trunk,
}

impl Lpips {
    /// Loads a trunk (VGG16 or AlexNet, told apart by its first layer) and its linear heads.
    pub fn load(trunk_path: &Path, heads_path: &Path, device: &Device) -> Result<Self, WeightsError> {
        // torchvision checkpoints carry the classifier too; LPIPS never uses it.
        let features = Weights::open(trunk_path)?.rename(|k| k.starts_with("features.").then(|| k.to_string()));
        let trunk = Trunk::of_features(&features)?;
        let loader = Loader { weights: &features, device };
        let (mut convs, mut taps, mut c_in) = (vec![], vec![], 3);
        for op in trunk.plan() {
            if let Op::Conv { index, k, stride, pad, tap } = op {
                let key = format!("features.{index}");
                let c_out = features.shape(&format!("{key}.weight"))?[0];
                convs.push(loader.conv(&key, c_in, c_out, k, stride, [pad; 4], true)?);
                if tap {
                    taps.push(c_out);
                }
                c_in = c_out;
            }
        }
        features.finish()?;
        let heads = Weights::open(heads_path)?;
        let head_loader = Loader { weights: &heads, device };
        let lins = taps
            .iter()
            .enumerate()
            .map(|(i, &c)| head_loader.conv(&format!("lin{i}.model.1"), c, 1, 1, 1, [0; 4], false))
            .collect::<Result<Vec<_>, _>>()?;
        heads.finish()?;
        Ok(Self { convs, lins, trunk }.no_grad())
    }

    /// Per-image LPIPS distance `[B]` between image batches in [-1, 1] (v0.1: scaling layer, unit-normalised
    /// features, squared difference, linear heads, spatial mean, sum over layers).
    pub fn forward(&self, x: Tensor<4>, y: Tensor<4>) -> Tensor<1> {
        let [b, _, _, _] = x.dims();
        let (fx, fy) = (self.features(scale(x)), self.features(scale(y)));
        let mut total: Option<Tensor<1>> = None;
        for ((a, c), lin) in fx.into_iter().zip(fy).zip(&self.lins) {
            let d = (unit_normalize(a) - unit_normalize(c)).powi_scalar(2);
            let layer = lin.forward(d).mean_dim(3).mean_dim(2).reshape([b]);
            total = Some(match total {
                Some(t) => t + layer,
                None => layer,
            });
        }
        total.expect("LPIPS has at least one layer")
    }

    fn features(&self, mut x: Tensor<4>) -> Vec<Tensor<4>> {
        let mut taps = vec![];
        let mut convs = self.convs.iter();
        for op in self.trunk.plan() {
            match op {
                Op::Conv { tap, .. } => {
                    x = burn::tensor::activation::relu(convs.next().expect("one conv per step").forward(x));
                    if tap {
                        taps.push(x.clone());
                    }
                }
                Op::Pool { k, stride } => x = max_pool2d(x, MaxPoolOptions::new([k, k]).with_stride([stride, stride])),
            }
        }
        taps
    }
}

impl Perceptual for Lpips {
    fn distance(&self, x: Tensor<4>, y: Tensor<4>) -> Tensor<1> {
        self.forward(x, y).mean()
    }
}

/// LPIPS v0.1's ScalingLayer: `(x - shift) / scale` per channel, for inputs in [-1, 1].
fn scale(x: Tensor<4>) -> Tensor<4> {
    let device = x.device();
    let shift = Tensor::<1>::from_floats([-0.030, -0.088, -0.188], &device).reshape([1, 3, 1, 1]);
    let scale = Tensor::<1>::from_floats([0.458, 0.448, 0.450], &device).reshape([1, 3, 1, 1]);
    (x - shift) / scale
}

/// Unit L2 norm over channels with the reference's epsilon outside the square root.
fn unit_normalize(x: Tensor<4>) -> Tensor<4> {
    let norm = x.clone().powi_scalar(2).sum_dim(1).sqrt();
    x / norm.add_scalar(1e-10)
}
