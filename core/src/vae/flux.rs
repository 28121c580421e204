//! The FLUX.1 AutoencoderKL (BFL `ae.safetensors`; the diffusers layout is renamed onto it on load).
//! Module and field names are the BFL checkpoint keys. Widths come from the weights, so reduced-width
//! models of the family load too.

use burn::module::Module;
use burn::nn::GroupNorm;
use burn::nn::conv::Conv2d;
use burn::tensor::Tensor;
use burn::tensor::activation::softmax;

use super::layers::{Loader, swish, upsample_nearest_2x};
use crate::weights::{Weights, WeightsError};

/// The FLUX.1 latent scale (DESIGN §1 applies it without the shift).
pub const FLUX_SCALING_FACTOR: f64 = 0.3611;

/// Architecture hyper-parameters, read off the weights.
#[derive(Debug, Clone, PartialEq)]
pub struct FluxAeConfig {
    pub in_channels: usize,
    pub ch: usize,
    pub ch_mult: Vec<usize>,
    pub num_res_blocks: usize,
    pub z_channels: usize,
}

impl FluxAeConfig {
    /// Infers the config from a BFL-named weight set.
    pub fn infer(w: &Weights) -> Result<Self, WeightsError> {
        let conv_in = w.shape("encoder.conv_in.weight")?;
        let (ch, in_channels) = (conv_in[0], conv_in[1]);
        let levels = (0..).take_while(|i| w.contains(&format!("encoder.down.{i}.block.0.conv1.weight"))).count();
        let num_res_blocks =
            (0..).take_while(|j| w.contains(&format!("encoder.down.0.block.{j}.conv1.weight"))).count();
        if levels == 0 || num_res_blocks == 0 {
            return Err(w.invalid("no encoder.down.{i}.block.{j} resnet blocks found"));
        }
        let ch_mult = (0..levels)
            .map(|i| w.shape(&format!("encoder.down.{i}.block.0.conv2.weight")).map(|s| s[0] / ch))
            .collect::<Result<Vec<_>, _>>()?;
        let z_channels = w.shape("encoder.conv_out.weight")?[0] / 2;
        Ok(Self { in_channels, ch, ch_mult, num_res_blocks, z_channels })
    }

    /// Spatial downsampling factor: 2 per level but the last.
    pub fn downsample(&self) -> usize {
        1 << (self.ch_mult.len() - 1)
    }
}

#[derive(Module, Debug)]
pub struct ResnetBlock {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub nin_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn load(l: &Loader, key: &str, c_in: usize, c_out: usize) -> Result<Self, WeightsError> {
        Ok(Self {
            norm1: l.group_norm(&format!("{key}.norm1"), c_in)?,
            conv1: l.conv3(&format!("{key}.conv1"), c_in, c_out)?,
            norm2: l.group_norm(&format!("{key}.norm2"), c_out)?,
            conv2: l.conv3(&format!("{key}.conv2"), c_out, c_out)?,
            nin_shortcut: if c_in != c_out {
                Some(l.conv1(&format!("{key}.nin_shortcut"), c_in, c_out)?)
            } else {
                None
            },
        })
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let h = self.conv1.forward(swish(self.norm1.forward(x.clone())));
        let h = self.conv2.forward(swish(self.norm2.forward(h)));
        match &self.nin_shortcut {
            Some(shortcut) => shortcut.forward(x) + h,
            None => x + h,
        }
    }
}

/// Single-head self-attention over all positions, q/k/v/proj_out as 1x1 convs.
#[derive(Module, Debug)]
pub struct AttnBlock {
    pub norm: GroupNorm,
    pub q: Conv2d,
    pub k: Conv2d,
    pub v: Conv2d,
    pub proj_out: Conv2d,
}

impl AttnBlock {
    fn load(l: &Loader, key: &str, c: usize) -> Result<Self, WeightsError> {
        Ok(Self {
            norm: l.group_norm(&format!("{key}.norm"), c)?,
            q: l.conv1(&format!("{key}.q"), c, c)?,
            k: l.conv1(&format!("{key}.k"), c, c)?,
            v: l.conv1(&format!("{key}.v"), c, c)?,
            proj_out: l.conv1(&format!("{key}.proj_out"), c, c)?,
        })
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let n = self.norm.forward(x.clone());
        let tokens = |conv: &Conv2d| conv.forward(n.clone()).reshape([b, c, h * w]).swap_dims(1, 2); // [B, HW, C]
        let (q, k, v) = (tokens(&self.q), tokens(&self.k), tokens(&self.v));
        let attn = softmax(q.matmul(k.swap_dims(1, 2)).mul_scalar((c as f64).powf(-0.5)), 2);
        let out = attn.matmul(v).swap_dims(1, 2).reshape([b, c, h, w]);
        x + self.proj_out.forward(out)
    }
}

#[derive(Module, Debug)]
pub struct Mid {
    pub block_1: ResnetBlock,
    pub attn_1: AttnBlock,
    pub block_2: ResnetBlock,
}

impl Mid {
    fn load(l: &Loader, key: &str, c: usize) -> Result<Self, WeightsError> {
        Ok(Self {
            block_1: ResnetBlock::load(l, &format!("{key}.block_1"), c, c)?,
            attn_1: AttnBlock::load(l, &format!("{key}.attn_1"), c)?,
            block_2: ResnetBlock::load(l, &format!("{key}.block_2"), c, c)?,
        })
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.block_2.forward(self.attn_1.forward(self.block_1.forward(x)))
    }
}

/// Stride-2 3x3 conv after padding one pixel on the right and bottom only (BFL / diffusers).
#[derive(Module, Debug)]
pub struct Downsample {
    pub conv: Conv2d,
}

#[derive(Module, Debug)]
pub struct Upsample {
    pub conv: Conv2d,
}

#[derive(Module, Debug)]
pub struct DownLevel {
    pub block: Vec<ResnetBlock>,
    pub downsample: Option<Downsample>,
}

#[derive(Module, Debug)]
pub struct UpLevel {
    pub block: Vec<ResnetBlock>,
    pub upsample: Option<Upsample>,
}

#[derive(Module, Debug)]
pub struct Encoder {
    pub conv_in: Conv2d,
    pub down: Vec<DownLevel>,
    pub mid: Mid,
    pub norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

impl Encoder {
    fn load(l: &Loader, cfg: &FluxAeConfig) -> Result<Self, WeightsError> {
        let mut c = cfg.ch;
        let mut down = Vec::new();
        for (i, mult) in cfg.ch_mult.iter().enumerate() {
            let c_out = cfg.ch * mult;
            let mut block = Vec::new();
            for j in 0..cfg.num_res_blocks {
                block.push(ResnetBlock::load(l, &format!("encoder.down.{i}.block.{j}"), c, c_out)?);
                c = c_out;
            }
            let downsample = if i + 1 < cfg.ch_mult.len() {
                Some(Downsample {
                    conv: l.conv(&format!("encoder.down.{i}.downsample.conv"), c, c, 3, 2, [0, 0, 1, 1], true)?,
                })
            } else {
                None
            };
            down.push(DownLevel { block, downsample });
        }
        Ok(Self {
            conv_in: l.conv3("encoder.conv_in", cfg.in_channels, cfg.ch)?,
            down,
            mid: Mid::load(l, "encoder.mid", c)?,
            norm_out: l.group_norm("encoder.norm_out", c)?,
            conv_out: l.conv3("encoder.conv_out", c, 2 * cfg.z_channels)?,
        })
    }

    /// Image `[B, 3, H, W]` in [-1, 1] -> moments `[B, 2 z, H/f, W/f]` (mean, then log-variance).
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut h = self.conv_in.forward(x);
        for level in &self.down {
            for block in &level.block {
                h = block.forward(h);
            }
            if let Some(d) = &level.downsample {
                h = d.conv.forward(h);
            }
        }
        self.conv_out.forward(swish(self.norm_out.forward(self.mid.forward(h))))
    }
}

#[derive(Module, Debug)]
pub struct Decoder {
    pub conv_in: Conv2d,
    pub mid: Mid,
    /// `up.0` is the full-resolution level; the forward pass runs them from the last to `up.0`.
    pub up: Vec<UpLevel>,
    pub norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

impl Decoder {
    fn load(l: &Loader, cfg: &FluxAeConfig) -> Result<Self, WeightsError> {
        let levels = cfg.ch_mult.len();
        let mut c = cfg.ch * cfg.ch_mult[levels - 1];
        let conv_in = l.conv3("decoder.conv_in", cfg.z_channels, c)?;
        let mid = Mid::load(l, "decoder.mid", c)?;
        let mut up: Vec<UpLevel> = Vec::new();
        for i in (0..levels).rev() {
            let c_out = cfg.ch * cfg.ch_mult[i];
            let mut block = Vec::new();
            for j in 0..=cfg.num_res_blocks {
                block.push(ResnetBlock::load(l, &format!("decoder.up.{i}.block.{j}"), c, c_out)?);
                c = c_out;
            }
            let upsample = if i > 0 {
                Some(Upsample { conv: l.conv3(&format!("decoder.up.{i}.upsample.conv"), c, c)? })
            } else {
                None
            };
            up.insert(0, UpLevel { block, upsample });
        }
        Ok(Self {
            conv_in,
            mid,
            up,
            norm_out: l.group_norm("decoder.norm_out", c)?,
            conv_out: l.conv3("decoder.conv_out", c, cfg.in_channels)?,
        })
    }

    /// Unscaled latents `[B, z, h, w]` -> image `[B, 3, h f, w f]` (not clamped).
    pub fn forward(&self, z: Tensor<4>) -> Tensor<4> {
        let mut h = self.mid.forward(self.conv_in.forward(z));
        for level in self.up.iter().rev() {
            for block in &level.block {
                h = block.forward(h);
            }
            if let Some(u) = &level.upsample {
                h = u.conv.forward(upsample_nearest_2x(h));
            }
        }
        self.conv_out.forward(swish(self.norm_out.forward(h)))
    }
}

#[derive(Module, Debug)]
pub struct FluxAutoencoder {
    pub encoder: Encoder,
    pub decoder: Decoder,
    #[module(skip)]
    pub z_channels: usize,
}

impl FluxAutoencoder {
    /// Builds the model from BFL-named weights; every tensor in the file must be used.
    pub fn load(weights: &Weights, device: &burn::tensor::Device) -> Result<(Self, FluxAeConfig), WeightsError> {
        let cfg = FluxAeConfig::infer(weights)?;
        let l = Loader { weights, device };
        let model =
            Self { encoder: Encoder::load(&l, &cfg)?, decoder: Decoder::load(&l, &cfg)?, z_channels: cfg.z_channels };
        weights.finish()?;
        Ok((model.no_grad(), cfg))
    }

    /// The unscaled posterior mean (the posterior is never sampled).
    pub fn posterior_mean(&self, x: Tensor<4>) -> Tensor<4> {
        self.encoder.forward(x).narrow(1, 0, self.z_channels)
    }
}

/// diffusers `AutoencoderKL` key -> BFL key, for a model with `levels` resolution levels.
pub fn diffusers_to_bfl(key: &str, levels: usize) -> String {
    let parts: Vec<&str> = key.split('.').collect();
    let rest = |from: usize| parts[from..].join(".");
    let renamed = match parts.as_slice() {
        [side, "down_blocks", i, "resnets", j, ..] => format!("{side}.down.{i}.block.{j}.{}", rest(5)),
        [side, "down_blocks", i, "downsamplers", "0", ..] => format!("{side}.down.{i}.downsample.{}", rest(5)),
        [side, "up_blocks", i, "resnets", j, ..] => {
            let level = levels - 1 - i.parse::<usize>().unwrap_or(0);
            format!("{side}.up.{level}.block.{j}.{}", rest(5))
        }
        [side, "up_blocks", i, "upsamplers", "0", ..] => {
            let level = levels - 1 - i.parse::<usize>().unwrap_or(0);
            format!("{side}.up.{level}.upsample.{}", rest(5))
        }
        [side, "mid_block", "resnets", j, ..] => {
            format!("{side}.mid.block_{}.{}", if *j == "0" { 1 } else { 2 }, rest(4))
        }
        [side, "mid_block", "attentions", "0", "group_norm", ..] => format!("{side}.mid.attn_1.norm.{}", rest(5)),
        [side, "mid_block", "attentions", "0", "to_out", "0", ..] => format!("{side}.mid.attn_1.proj_out.{}", rest(6)),
        [side, "mid_block", "attentions", "0", proj, ..] if proj.starts_with("to_") => {
            format!("{side}.mid.attn_1.{}.{}", &proj[3..], rest(5))
        }
        [side, "conv_norm_out", ..] => format!("{side}.norm_out.{}", rest(2)),
        _ => key.to_string(),
    };
    renamed.replace(".conv_shortcut.", ".nin_shortcut.")
}
