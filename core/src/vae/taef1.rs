//! TAEF1, the tiny autoencoder for FLUX latents (madebyollin's TAESD architecture), and the architecture of
//! ov3's embedded default autoencoder.
//!
//! Checkpoints are flat `nn.Sequential`s: the original `taef1_encoder` / `taef1_decoder` files index the
//! layers from 0 (the decoder's layer 0 is the latent clamp, which has no weights); diffusers
//! `AutoencoderTiny` prefixes `encoder.layers.` / `decoder.layers.` and drops the clamp from the decoder's
//! list, so its decoder indices are one lower. [`TinyAutoencoder::load`] reads either through
//! [`sequential_index`].

use std::collections::BTreeMap;

use burn::module::Module;
use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};

use super::layers::{Loader, upsample_nearest_2x};
use crate::weights::{Weights, WeightsError};

/// TAESD's residual block: relu(conv(relu(conv(relu(conv(x))))) + skip(x)), all 3x3 convs with bias.
#[derive(Module, Debug)]
pub struct TinyBlock {
    pub conv_0: Conv2d,
    pub conv_2: Conv2d,
    pub conv_4: Conv2d,
    /// 1x1 without bias when the width changes.
    pub skip: Option<Conv2d>,
}

impl TinyBlock {
    fn load(l: &Loader, key: &str, c_in: usize, c_out: usize) -> Result<Self, WeightsError> {
        Ok(Self {
            conv_0: l.conv3(&format!("{key}.conv.0"), c_in, c_out)?,
            conv_2: l.conv3(&format!("{key}.conv.2"), c_out, c_out)?,
            conv_4: l.conv3(&format!("{key}.conv.4"), c_out, c_out)?,
            skip: if c_in != c_out {
                Some(l.conv(&format!("{key}.skip"), c_in, c_out, 1, 1, [0; 4], false)?)
            } else {
                None
            },
        })
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let h = self.conv_4.forward(relu(self.conv_2.forward(relu(self.conv_0.forward(x.clone())))));
        let skip = match &self.skip {
            Some(conv) => conv.forward(x),
            None => x,
        };
        relu(h + skip)
    }
}

/// One resolution level: an optional stride-2 conv (encoder) or upsample + conv (decoder), and blocks.
#[derive(Module, Debug)]
pub struct TinyStage {
    pub resample: Option<Conv2d>,
    pub blocks: Vec<TinyBlock>,
}

/// Image in [0, 1] -> latents: conv, then stages of (stride-2 conv, 3 blocks), then conv to latents.
#[derive(Module, Debug)]
pub struct TinyEncoder {
    pub conv_in: Conv2d,
    pub stages: Vec<TinyStage>,
    pub conv_out: Conv2d,
}

impl TinyEncoder {
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut h = self.conv_in.forward(x);
        for stage in &self.stages {
            if let Some(conv) = &stage.resample {
                h = conv.forward(h);
            }
            for block in &stage.blocks {
                h = block.forward(h);
            }
        }
        self.conv_out.forward(h)
    }
}

/// Latents -> image in [0, 1]-ish: soft clamp tanh(z/3)*3, conv, relu, stages of (3 blocks, upsample,
/// conv), then a last block and conv to RGB.
#[derive(Module, Debug)]
pub struct TinyDecoder {
    pub conv_in: Conv2d,
    pub stages: Vec<TinyStage>,
    pub conv_out: Conv2d,
}

impl TinyDecoder {
    pub fn forward(&self, z: Tensor<4>) -> Tensor<4> {
        let mut h = relu(self.conv_in.forward(z.div_scalar(3.0).tanh().mul_scalar(3.0)));
        for stage in &self.stages {
            for block in &stage.blocks {
                h = block.forward(h);
            }
            if let Some(conv) = &stage.resample {
                h = conv.forward(upsample_nearest_2x(h));
            }
        }
        self.conv_out.forward(h)
    }
}

/// Which of the two checkpoint layouts a weight set uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyLayout {
    /// `taef1_encoder.safetensors` + `taef1_decoder.safetensors`, keys `{i}.…`, merged as `encoder.{i}` /
    /// `decoder.{i}` (also what ov3 writes for its own embedded autoencoder).
    Original,
    /// diffusers `AutoencoderTiny`: `encoder.layers.{i}` / `decoder.layers.{i}`.
    Diffusers,
}

/// The flat layer index of a decoder or encoder layer in a layout.
pub fn sequential_index(side: &str, original_index: usize, layout: TinyLayout) -> String {
    match (layout, side) {
        (TinyLayout::Original, _) => format!("{side}.{original_index}"),
        (TinyLayout::Diffusers, "decoder") => format!("decoder.layers.{}", original_index - 1),
        (TinyLayout::Diffusers, _) => format!("{side}.layers.{original_index}"),
    }
}

#[derive(Module, Debug)]
pub struct TinyAutoencoder {
    pub encoder: TinyEncoder,
    pub decoder: TinyDecoder,
}

/// Hyper-parameters read off the weights: image channels, width, latent channels, blocks per stage.
#[derive(Debug, Clone, PartialEq)]
pub struct TinyConfig {
    pub width: usize,
    pub latent_channels: usize,
    pub encoder_blocks: Vec<usize>,
    pub decoder_blocks: Vec<usize>,
}

impl TinyConfig {
    /// TAEF1's own shape at `width` (64 for TAEF1): encoder blocks (1, 3, 3, 3), decoder (3, 3, 3, 1).
    pub fn taef1(width: usize) -> Self {
        Self { width, latent_channels: 16, encoder_blocks: vec![1, 3, 3, 3], decoder_blocks: vec![3, 3, 3, 1] }
    }

    fn infer(w: &Weights, layout: TinyLayout) -> Result<Self, WeightsError> {
        let conv_in = w.shape(&format!("{}.weight", sequential_index("encoder", 0, layout)))?;
        let dec_in = w.shape(&format!("{}.weight", sequential_index("decoder", 1, layout)))?;
        let cfg = Self::taef1(conv_in[0]);
        if dec_in[1] != cfg.latent_channels || conv_in[1] != 3 {
            return Err(w.invalid(format!(
                "expected a TAEF1-shaped model (3 image channels, 16 latent channels), found {} and {}",
                conv_in[1], dec_in[1]
            )));
        }
        Ok(cfg)
    }
}

/// Our module path of every layer (`encoder.stages.1.resample`) -> its side and index in the original
/// `nn.Sequential` checkpoints. The single source of the index arithmetic, for loading and for export.
pub fn layer_indices(cfg: &TinyConfig) -> BTreeMap<String, (&'static str, usize)> {
    let mut t = BTreeMap::new();
    t.insert("encoder.conv_in".to_string(), ("encoder", 0));
    let mut i = 1;
    for (s, &n) in cfg.encoder_blocks.iter().enumerate() {
        if s > 0 {
            t.insert(format!("encoder.stages.{s}.resample"), ("encoder", i));
            i += 1;
        }
        for b in 0..n {
            t.insert(format!("encoder.stages.{s}.blocks.{b}"), ("encoder", i + b));
        }
        i += n;
    }
    t.insert("encoder.conv_out".to_string(), ("encoder", i));
    // Decoder: 0 is the clamp, 1 conv_in, 2 relu; each stage but the last ends in upsample + conv.
    t.insert("decoder.conv_in".to_string(), ("decoder", 1));
    let mut i = 3;
    let last = cfg.decoder_blocks.len() - 1;
    for (s, &n) in cfg.decoder_blocks.iter().enumerate() {
        for b in 0..n {
            t.insert(format!("decoder.stages.{s}.blocks.{b}"), ("decoder", i + b));
        }
        i += n;
        if s < last {
            t.insert(format!("decoder.stages.{s}.resample"), ("decoder", i + 1));
            i += 2;
        }
    }
    t.insert("decoder.conv_out".to_string(), ("decoder", i));
    t
}

/// Our parameter path -> its key in the original layout (`encoder.stages.0.blocks.0.conv_0.weight` ->
/// `encoder.1.conv.0.weight`).
pub fn original_key(path: &str, cfg: &TinyConfig) -> Option<String> {
    let table = layer_indices(cfg);
    let (layer, param) = path.rsplit_once('.')?;
    let (layer, inner) = match layer.rsplit_once('.') {
        Some((l, inner @ ("conv_0" | "conv_2" | "conv_4" | "skip"))) => (l, Some(inner)),
        _ => (layer, None),
    };
    let (side, i) = table.get(layer)?;
    let inner = match inner {
        Some("skip") => ".skip".to_string(),
        Some(conv) => format!(".conv.{}", &conv[5..]),
        None => String::new(),
    };
    Some(format!("{side}.{i}{inner}.{param}"))
}

impl TinyAutoencoder {
    /// A randomly initialised (PyTorch-style Kaiming-uniform) trainable model of this shape, its weights drawn
    /// now from the device RNG (see [`crate::model::Ov3::new`]).
    pub fn new(cfg: &TinyConfig, device: &Device) -> Self {
        let conv = |c_in: usize, c_out: usize, k: usize, stride: usize, bias: bool| {
            Conv2dConfig::new([c_in, c_out], [k, k])
                .with_stride([stride, stride])
                .with_padding(PaddingConfig2d::Explicit(k / 2, k / 2, k / 2, k / 2))
                .with_bias(bias)
                .init(device)
        };
        let c = cfg.width;
        let block = || TinyBlock {
            conv_0: conv(c, c, 3, 1, true),
            conv_2: conv(c, c, 3, 1, true),
            conv_4: conv(c, c, 3, 1, true),
            skip: None,
        };
        let encoder = TinyEncoder {
            conv_in: conv(3, c, 3, 1, true),
            stages: cfg
                .encoder_blocks
                .iter()
                .enumerate()
                .map(|(s, &n)| TinyStage {
                    resample: (s > 0).then(|| conv(c, c, 3, 2, false)),
                    blocks: (0..n).map(|_| block()).collect(),
                })
                .collect(),
            conv_out: conv(c, cfg.latent_channels, 3, 1, true),
        };
        let last = cfg.decoder_blocks.len() - 1;
        let decoder = TinyDecoder {
            conv_in: conv(cfg.latent_channels, c, 3, 1, true),
            stages: cfg
                .decoder_blocks
                .iter()
                .enumerate()
                .map(|(s, &n)| TinyStage {
                    resample: (s < last).then(|| conv(c, c, 3, 1, false)),
                    blocks: (0..n).map(|_| block()).collect(),
                })
                .collect(),
            conv_out: conv(c, 3, 3, 1, true),
        };
        let model = Self { encoder, decoder };
        crate::params::materialize(&model);
        model
    }

    pub fn load(weights: &Weights, layout: TinyLayout, device: &Device) -> Result<(Self, TinyConfig), WeightsError> {
        let cfg = TinyConfig::infer(weights, layout)?;
        let l = Loader { weights, device };
        let c = cfg.width;
        let table = layer_indices(&cfg);
        let key = |ours: String| {
            let (side, i) = table[&ours];
            sequential_index(side, i, layout)
        };

        let blocks = |side: &str, s: usize, n: usize| -> Result<Vec<TinyBlock>, WeightsError> {
            (0..n).map(|b| TinyBlock::load(&l, &key(format!("{side}.stages.{s}.blocks.{b}")), c, c)).collect()
        };
        let mut stages = Vec::new();
        for (s, &n) in cfg.encoder_blocks.iter().enumerate() {
            let resample = match s {
                0 => None,
                _ => Some(l.conv(&key(format!("encoder.stages.{s}.resample")), c, c, 3, 2, [1; 4], false)?),
            };
            stages.push(TinyStage { resample, blocks: blocks("encoder", s, n)? });
        }
        let encoder = TinyEncoder {
            conv_in: l.conv3(&key("encoder.conv_in".into()), 3, c)?,
            stages,
            conv_out: l.conv3(&key("encoder.conv_out".into()), c, cfg.latent_channels)?,
        };
        let last = cfg.decoder_blocks.len() - 1;
        let mut stages = Vec::new();
        for (s, &n) in cfg.decoder_blocks.iter().enumerate() {
            let resample = match s < last {
                true => Some(l.conv(&key(format!("decoder.stages.{s}.resample")), c, c, 3, 1, [1; 4], false)?),
                false => None,
            };
            stages.push(TinyStage { resample, blocks: blocks("decoder", s, n)? });
        }
        let decoder = TinyDecoder {
            conv_in: l.conv3(&key("decoder.conv_in".into()), cfg.latent_channels, c)?,
            stages,
            conv_out: l.conv3(&key("decoder.conv_out".into()), c, 3)?,
        };
        weights.finish()?;
        Ok((Self { encoder, decoder }.no_grad(), cfg))
    }
}
