//! The ViT encoder (latents -> unified tokens z_u) and the ViT decoder (noised z_u -> latents).

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::tensor::{Device, Tensor};

use super::attention::AttentionMask;
use super::block::{Block, identity_blocks, run_blocks};
use super::norm::LayerNorm;
use super::posemb::sincos_2d;
use crate::config::{ModelConfig, TowerConfig};

/// Conv2d(C -> D, kernel p, stride p, no bias): one token per p x p patch.
#[derive(Module, Debug)]
pub struct PatchEmbed {
    pub proj: Conv2d,
}

#[derive(Module, Debug)]
pub struct VitEncoder {
    pub patch_embed: PatchEmbed,
    pub blocks: Vec<Block>,
}

impl VitEncoder {
    pub fn new(cfg: &ModelConfig, device: &Device) -> Self {
        let (channels, patch) = cfg.patch_geometry();
        let t = &cfg.encoder;
        let proj = Conv2dConfig::new([channels, t.width], [patch, patch])
            .with_stride([patch, patch])
            .with_bias(false)
            .with_initializer(Initializer::XavierUniform { gain: 1.0 })
            .init(device);
        Self { patch_embed: PatchEmbed { proj }, blocks: identity_blocks(t, cfg, device) }
    }

    /// `[B, C, H', W']` -> `z_u` `[B, (H'/p)(W'/p), D]`: the final block outputs, with no final norm (DESIGN §2).
    pub fn forward(&self, input: Tensor<4>) -> Tensor<3> {
        let tokens = self.patch_embed.proj.forward(input);
        let [b, d, h, w] = tokens.dims();
        let tokens = tokens.reshape([b, d, h * w]).swap_dims(1, 2);
        let pos = sincos_2d(h, w, d, &tokens.device()).unsqueeze::<3>();
        run_blocks(&self.blocks, tokens + pos, AttentionMask::None)
    }
}

#[derive(Module, Debug)]
pub struct VitDecoder {
    /// Linear(D_enc -> D_dec).
    pub decoder_embed: Linear,
    pub blocks: Vec<Block>,
    pub norm: LayerNorm,
    /// Linear(D_dec -> p * p * C): one token back to a p x p patch of the encoder's input space.
    pub pred: Linear,
    #[module(skip)]
    pub channels: usize,
    #[module(skip)]
    pub patch: usize,
}

impl VitDecoder {
    pub fn new(cfg: &ModelConfig, device: &Device) -> Self {
        let (channels, patch) = cfg.patch_geometry();
        let t = &cfg.decoder;
        let init = Initializer::XavierUniform { gain: 1.0 };
        Self {
            decoder_embed: LinearConfig::new(cfg.encoder.width, t.width).with_initializer(init.clone()).init(device),
            blocks: identity_blocks(t, cfg, device),
            norm: LayerNorm::new(t.width, cfg.norm_eps, device),
            pred: LinearConfig::new(t.width, patch * patch * channels).with_initializer(init).init(device),
            channels,
            patch,
        }
    }

    /// The same decoder `depth` blocks deep: the blocks after its own start as the identity (see
    /// [`identity_blocks`]), so the grown decoder computes exactly what this one did and training goes on from
    /// there with the added capacity (`init_grow_decoder`). `cfg.decoder` must be this decoder's width and
    /// heads at the new depth; a depth not above the current one leaves it unchanged.
    pub fn grow(mut self, cfg: &ModelConfig, device: &Device) -> Self {
        let added = cfg.decoder.depth.saturating_sub(self.blocks.len());
        let more = TowerConfig { depth: added, ..cfg.decoder.clone() };
        let new = identity_blocks(&more, cfg, device);
        crate::params::materialize(&new);
        self.blocks.extend(new);
        self
    }

    /// Noised tokens `[B, h*w, D_enc]` on a `grid = (h, w)` -> `[B, C, h*p, w*p]`.
    pub fn forward(&self, tokens: Tensor<3>, grid: (usize, usize)) -> Tensor<4> {
        let (h, w) = grid;
        let x = self.decoder_embed.forward(tokens);
        let [_, n, d] = x.dims();
        assert_eq!(n, h * w, "decoder got {n} tokens for a {h}x{w} grid");
        let pos = sincos_2d(h, w, d, &x.device()).unsqueeze::<3>();
        let x = x + pos;
        let x = self.pred.forward(self.norm.forward(run_blocks(&self.blocks, x, AttentionMask::None)));
        unpatchify(x, grid, self.patch, self.channels)
    }
}

/// `[B, h*w, p*p*C]` (channel fastest, MAE order) -> `[B, C, h*p, w*p]`.
pub fn unpatchify(x: Tensor<3>, (h, w): (usize, usize), p: usize, c: usize) -> Tensor<4> {
    let [b, _, _] = x.dims();
    x.reshape([b, h, w, p, p, c]).permute([0, 5, 1, 3, 2, 4]).reshape([b, c, h * p, w * p])
}
