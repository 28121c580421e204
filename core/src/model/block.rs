//! The pre-LayerNorm transformer block (ViT / CLIP): x + attn(norm1(x)), then x + mlp(norm2(x)).

use burn::module::Module;
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::tensor::{Device, Tensor};

use super::attention::{Attention, AttentionMask, KeyValues, Masks};
use super::norm::LayerNorm;
use super::precision::{linear, linear_to_f32};
use crate::config::{ModelConfig, Precision, TowerConfig};

/// MLP with ratio 4 and exact (erf) GELU, no dropout; computes in its input's dtype, returns f32.
#[derive(Module, Debug)]
pub struct Mlp {
    pub fc1: Linear,
    pub fc2: Linear,
}

impl Mlp {
    pub fn new(width: usize, device: &Device) -> Self {
        let init = Initializer::XavierUniform { gain: 1.0 };
        Self {
            fc1: LinearConfig::new(width, 4 * width).with_initializer(init.clone()).init(device),
            fc2: LinearConfig::new(4 * width, width).with_initializer(init).init(device),
        }
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        linear_to_f32(&self.fc2, crate::cpu_ops::gelu(linear(&self.fc1, x)))
    }
}

#[derive(Module, Debug)]
pub struct Block {
    pub norm1: LayerNorm,
    pub attn: Attention,
    pub norm2: LayerNorm,
    pub mlp: Mlp,
    /// The dtype both residual branches compute in (`Ov3::with_precision`); the residual stream stays f32.
    #[module(skip)]
    pub precision: Precision,
}

impl Block {
    pub fn new(t: &TowerConfig, cfg: &ModelConfig, device: &Device) -> Self {
        let (width, eps) = (t.width, cfg.norm_eps);
        Self {
            norm1: LayerNorm::new(width, eps, device),
            attn: Attention::new(width, t.heads, device),
            norm2: LayerNorm::new(width, eps, device),
            mlp: Mlp::new(width, device),
            precision: Precision::F32,
        }
    }

    pub fn forward(&self, x: Tensor<3>, mask: &Masks) -> Tensor<3> {
        self.residuals(x, |h| self.attn.forward(h, mask))
    }

    /// [`Self::forward`] for tokens that follow those in `cache` (see [`Attention::forward_cached`]).
    pub fn forward_cached(&self, x: Tensor<3>, mask: &Masks, cache: &mut KeyValues) -> Tensor<3> {
        self.residuals(x, |h| self.attn.forward_cached(h, mask, cache))
    }

    /// The layer norms in f32, each branch in `precision`, its output back in f32 (by its last linear layer,
    /// `precision::linear_to_f32`) for the residual add.
    fn residuals(&self, x: Tensor<3>, attn: impl FnOnce(Tensor<3>) -> Tensor<3>) -> Tensor<3> {
        let compute = self.precision.dtype();
        let x = x.clone() + attn(self.norm1.forward_as(x, compute));
        x.clone() + self.mlp.forward(self.norm2.forward_as(x, compute))
    }
}

/// A stack of blocks sharing one mask, prepared once for all of them.
pub fn run_blocks(blocks: &[Block], mut x: Tensor<3>, mask: AttentionMask) -> Tensor<3> {
    let [_, n, _] = x.dims();
    let masks = mask.prepare(n, &x.device());
    for block in blocks {
        x = block.forward(x, &masks);
    }
    x
}

/// A tower's stack of blocks (the text encoder's), xavier throughout.
pub fn blocks(t: &TowerConfig, cfg: &ModelConfig, device: &Device) -> Vec<Block> {
    (0..t.depth).map(|_| Block::new(t, cfg, device)).collect()
}

/// A tower's stack of blocks, each starting as the identity: the output projections of both residual
/// branches (`attn.proj`, `mlp.fc2`, weight and bias) start at zero, so at step 0 the tower passes its
/// input through unchanged (Fixup / ReZero / DiT's adaLN-Zero). For the ViT encoder and decoder this makes
/// the reconstruction start from a linear autoencoder it fits in tens of steps, and the caption decoder
/// starts as a bigram model. Not for the text encoder: its feature is the one EOS token, which learns
/// about the caption only through attention (measured in docs/DECISIONS.md).
pub fn identity_blocks(t: &TowerConfig, cfg: &ModelConfig, device: &Device) -> Vec<Block> {
    let zero = |d_in: usize| LinearConfig::new(d_in, t.width).with_initializer(Initializer::Zeros).init(device);
    blocks(t, cfg, device)
        .into_iter()
        .map(|mut block| {
            block.attn.proj = zero(t.width);
            block.mlp.fc2 = zero(4 * t.width);
            block
        })
        .collect()
}
