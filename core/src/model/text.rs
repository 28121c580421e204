//! The text towers: the text encoder (caption feature for the contrastive loss) and the text decoder
//! (captioning from z_u with prefix fusion). Names follow OpenCLIP (`token_embedding`,
//! `positional_embedding`, `ln_final`, `text_projection`).

use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, Initializer, Linear, LinearConfig};
use burn::tensor::{Device, Int, Tensor};

use super::attention::{AttentionMask, KeyValues};
use super::block::{Block, blocks, identity_blocks, run_blocks};
use super::norm::LayerNorm;
use crate::config::{ModelConfig, TowerConfig};

/// Token + learned position embedding for `[B, T]` token ids -> `[B, T, W]`.
#[derive(Module, Debug)]
pub struct TokenInput {
    pub token_embedding: Embedding,
    pub positional_embedding: Param<Tensor<2>>,
}

impl TokenInput {
    fn new(t: &TowerConfig, cfg: &ModelConfig, device: &Device) -> Self {
        let token_embedding = EmbeddingConfig::new(cfg.vocab_size, t.width)
            .with_initializer(Initializer::Normal { mean: 0.0, std: 0.02 })
            .init(device);
        let positional_embedding =
            Initializer::Normal { mean: 0.0, std: 0.01 }.init([cfg.context_length, t.width], device);
        Self { token_embedding, positional_embedding }
    }

    fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        self.forward_at(tokens, 0)
    }

    /// Tokens at caption positions `start..start + T`.
    fn forward_at(&self, tokens: Tensor<2, Int>, start: usize) -> Tensor<3> {
        let [_, t] = tokens.dims();
        let [max_t, _] = self.positional_embedding.dims();
        assert!(start + t <= max_t, "caption of {} tokens exceeds the context length {max_t}", start + t);
        let pos = self.positional_embedding.val().narrow(0, start, t).unsqueeze::<3>();
        self.token_embedding.forward(tokens) + pos
    }
}

#[derive(Module, Debug)]
pub struct TextEncoder {
    pub input: TokenInput,
    pub blocks: Vec<Block>,
    pub ln_final: LayerNorm,
    pub text_projection: Linear,
    #[module(skip)]
    pub eos_id: usize,
    #[module(skip)]
    pub pad_id: usize,
}

impl TextEncoder {
    pub fn new(cfg: &ModelConfig, device: &Device) -> Self {
        let t = &cfg.text_encoder;
        Self {
            input: TokenInput::new(t, cfg, device),
            blocks: blocks(t, cfg, device),
            ln_final: LayerNorm::new(t.width, cfg.norm_eps, device),
            text_projection: projection(t.width, cfg.embed_dim, device),
            eos_id: cfg.eos_id,
            pad_id: cfg.pad_id,
        }
    }

    /// `[B, T]` -> caption feature `[B, E]`: LayerNorm of the (first) EOS token's output, projected.
    /// Attention is bidirectional over the non-padding tokens.
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<2> {
        let [b, _] = tokens.dims();
        let mask = AttentionMask::KeyPadding(tokens.clone().equal_elem(self.pad_id as i64));
        let x = self.input.forward(tokens.clone());
        let [_, _, w] = x.dims();
        let x = run_blocks(&self.blocks, x, mask);
        // argmax returns the first maximum: the first EOS of each caption.
        let eos = tokens.equal_elem(self.eos_id as i64).int().argmax(1); // [B, 1]
        let pooled = x.gather(1, eos.reshape([b, 1, 1]).expand([b, 1, w])).reshape([b, w]);
        self.text_projection.forward(self.ln_final.forward(pooled))
    }
}

#[derive(Module, Debug)]
pub struct TextDecoder {
    /// Linear(D_enc -> W): the image tokens as the decoder's prefix.
    pub visual_proj: Linear,
    pub input: TokenInput,
    pub blocks: Vec<Block>,
    pub ln_final: LayerNorm,
    pub lm_head: Linear,
}

impl TextDecoder {
    pub fn new(cfg: &ModelConfig, device: &Device) -> Self {
        let t = &cfg.text_decoder;
        Self {
            visual_proj: LinearConfig::new(cfg.encoder.width, t.width)
                .with_initializer(Initializer::XavierUniform { gain: 1.0 })
                .init(device),
            input: TokenInput::new(t, cfg, device),
            blocks: identity_blocks(t, cfg, device),
            ln_final: LayerNorm::new(t.width, cfg.norm_eps, device),
            lm_head: projection(t.width, cfg.vocab_size, device),
        }
    }

    /// Prefix fusion: sequence = [visual_proj(z_u) ; embed(tokens)]. Returns next-token logits for each
    /// caption position, `[B, T, V]`: position i predicts token i + 1.
    pub fn forward(&self, z_u: Tensor<3>, tokens: Tensor<2, Int>) -> Tensor<3> {
        let [_, n_img, _] = z_u.dims();
        let x = self.sequence(z_u, tokens);
        let [b, n, w] = x.dims();
        let x = run_blocks(&self.blocks, x, AttentionMask::Prefix(n_img)).narrow(1, n_img, n - n_img);
        self.lm_head.forward(self.ln_final.forward(x.reshape([b, n - n_img, w])))
    }

    /// Incremental decoding, first step: next-token logits `[B, V]` after the first caption tokens
    /// `[B, T]` (usually BOS), and the cache that [`Self::next`] continues from. The logits are those of
    /// [`Self::forward`] at position T - 1.
    pub fn start(&self, z_u: Tensor<3>, tokens: Tensor<2, Int>) -> (Tensor<2>, DecoderCache) {
        let [_, n_img, _] = z_u.dims();
        let [_, t] = tokens.dims();
        let x = self.sequence(z_u, tokens);
        let mut cache = DecoderCache { blocks: vec![None; self.blocks.len()], tokens: t };
        let logits = self.run_cached(x, AttentionMask::Prefix(n_img), &mut cache);
        (logits, cache)
    }

    /// Incremental decoding, later steps: next-token logits `[B, V]` after one more token per caption
    /// (`[B, 1]`). Each step costs one token's work per block instead of a forward over the image prefix
    /// and the whole caption again, so greedy captioning is linear in its length rather than quadratic.
    pub fn next(&self, token: Tensor<2, Int>, cache: &mut DecoderCache) -> Tensor<2> {
        let [_, t] = token.dims();
        assert_eq!(t, 1, "incremental decoding takes one token per caption at a time");
        let x = self.input.forward_at(token, cache.tokens);
        cache.tokens += 1;
        // The newest token may see every earlier one: the prefix rule only restricts earlier queries.
        self.run_cached(x, AttentionMask::None, cache)
    }

    /// `[visual_proj(z_u) ; embed(tokens)]`: the image prefix, then the caption from position 0.
    fn sequence(&self, z_u: Tensor<3>, tokens: Tensor<2, Int>) -> Tensor<3> {
        Tensor::cat(vec![self.visual_proj.forward(z_u), self.input.forward(tokens)], 1)
    }

    fn run_cached(&self, mut x: Tensor<3>, mask: AttentionMask, cache: &mut DecoderCache) -> Tensor<2> {
        let [b, n, w] = x.dims();
        let masks = mask.prepare(n, &x.device());
        for (block, kv) in self.blocks.iter().zip(&mut cache.blocks) {
            x = block.forward_cached(x, &masks, kv);
        }
        let last = x.narrow(1, n - 1, 1).reshape([b, w]);
        self.lm_head.forward(self.ln_final.forward(last))
    }
}

/// Every decoder block's keys and values for the sequence decoded so far ([`TextDecoder::start`],
/// [`TextDecoder::next`]).
#[derive(Debug)]
pub struct DecoderCache {
    blocks: Vec<KeyValues>,
    /// Caption tokens seen so far: the position of the next one.
    tokens: usize,
}

/// Linear without bias, normal(0, 0.02): small logits at initialisation, so the losses start near
/// their uniform values (ln V for captioning).
pub fn projection(d_in: usize, d_out: usize, device: &Device) -> Linear {
    LinearConfig::new(d_in, d_out)
        .with_bias(false)
        .with_initializer(Initializer::Normal { mean: 0.0, std: 0.02 })
        .init(device)
}
