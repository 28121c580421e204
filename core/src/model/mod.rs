//! OpenVision 3, top to bottom: latents -> ViT encoder -> unified tokens z_u, read by a reconstruction
//! branch (noise, ViT decoder, frozen VAE decoder) and an understanding branch (contrastive + captioning).

pub mod attention;
pub mod block;
pub mod norm;
pub mod posemb;
pub mod precision;
pub mod text;
pub mod vit;

use burn::module::{Module, Param};
use burn::tensor::{Device, Distribution, Int, Tensor};

use crate::autoencoder::LatentDecoder;
use crate::config::{AttentionImpl, InputSpace, ModelConfig, Objective, Precision};
use crate::losses::{self, Perceptual, RecTerms};
use crate::parallel::{Group, GroupExt};
use crate::tokenizer::Tokenizer;
use norm::LayerNorm;
use text::{TextDecoder, TextEncoder, projection};
use vit::{VitDecoder, VitEncoder};

/// Image embedding for the contrastive loss: mean of z_u over tokens -> LayerNorm -> Linear (no bias).
#[derive(Module, Debug)]
pub struct ImageHead {
    pub norm: LayerNorm,
    pub proj: burn::nn::Linear,
}

#[derive(Module, Debug)]
pub struct Ov3 {
    pub encoder: VitEncoder,
    pub decoder: VitDecoder,
    pub image_head: ImageHead,
    pub text_encoder: TextEncoder,
    pub text_decoder: TextDecoder,
    /// ln of the contrastive temperature's inverse, initialised to ln(1/0.07).
    pub logit_scale: Param<Tensor<1>>,
    #[module(skip)]
    pub input_space: InputSpace,
    #[module(skip)]
    pub pad_id: usize,
    /// How captions become ids; a model file carries it (byte-level unless trained with a tokenizer.json).
    #[module(skip)]
    pub tokenizer: Tokenizer,
}

/// One training batch. `inputs` are what the encoder reads: VAE latents (scaled, DESIGN §1) or, in the
/// no-VAE ablation, the images themselves.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[B, 3, H, W]` in [-1, 1].
    pub images: Tensor<4>,
    /// `[B, C, H/8, W/8]` latents, or the images in the no-VAE ablation.
    pub inputs: Tensor<4>,
    /// `[B, T]` caption token ids (BOS ... EOS PAD*).
    pub tokens: Tensor<2, Int>,
}

/// Loss weights of eqs. 4-6 and which objectives are on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossWeights {
    pub objective: Objective,
    pub w_rec: f64,
    pub w_und: f64,
    pub beta: f64,
    pub alpha: f64,
    pub lambda: f64,
}

impl Default for LossWeights {
    fn default() -> Self {
        Self { objective: Objective::Full, w_rec: 0.5, w_und: 1.0, beta: 0.4, alpha: 1.0, lambda: 0.0 }
    }
}

/// Every loss term of one forward pass. Both branches are always computed (DESIGN §3.1); only the pixel and
/// LPIPS terms can be absent (no VAE decoder in the loop, no LPIPS weights, or lambda 0).
#[derive(Debug, Clone)]
pub struct LossOutput {
    pub total: Tensor<1>,
    pub rec: Tensor<1>,
    pub rec_terms: RecTerms,
    pub und: Tensor<1>,
    pub caption: Tensor<1>,
    pub contrastive: Tensor<1>,
}

/// The frozen parts the reconstruction branch needs beyond the model itself.
#[derive(Clone, Copy, Default)]
pub struct Frozen<'a> {
    /// Latents -> pixels, for the pixel L1 and LPIPS terms. Without it only the latent term is computed.
    pub vae_decoder: Option<&'a dyn LatentDecoder>,
    pub perceptual: Option<&'a dyn Perceptual>,
}

impl Ov3 {
    /// A new model whose initial weights are drawn now, in module order, from the device RNG: they depend
    /// on the seed alone. (burn initialises parameters lazily, on first use; a forward pass would then draw
    /// them interleaved with the noise of eq. 3, which differs between data-parallel ranks.)
    pub fn new(cfg: &ModelConfig, device: &Device) -> Self {
        let model = Self::uninitialized(cfg, device);
        crate::params::materialize(&model);
        model
    }

    fn uninitialized(cfg: &ModelConfig, device: &Device) -> Self {
        let d = cfg.encoder.width;
        Self {
            encoder: VitEncoder::new(cfg, device),
            decoder: VitDecoder::new(cfg, device),
            image_head: ImageHead {
                norm: LayerNorm::new(d, cfg.norm_eps, device),
                proj: projection(d, cfg.embed_dim, device),
            },
            text_encoder: TextEncoder::new(cfg, device),
            text_decoder: TextDecoder::new(cfg, device),
            logit_scale: Param::from_tensor(Tensor::from_floats([(1.0f32 / 0.07).ln()], device)),
            input_space: cfg.input_space,
            pad_id: cfg.pad_id,
            tokenizer: Tokenizer::Bytes,
        }
    }

    /// The same weights with every transformer block on `implementation` (see [`AttentionImpl`]).
    pub fn with_attention(mut self, implementation: AttentionImpl) -> Self {
        for block in self.blocks_mut() {
            block.attn.implementation = implementation;
        }
        self
    }

    /// The same weights with every transformer block computing in `precision` (see [`Precision`]).
    pub fn with_precision(mut self, precision: Precision) -> Self {
        for block in self.blocks_mut() {
            block.precision = precision;
        }
        self
    }

    fn blocks_mut(&mut self) -> impl Iterator<Item = &mut block::Block> {
        let towers = [
            &mut self.encoder.blocks,
            &mut self.decoder.blocks,
            &mut self.text_encoder.blocks,
            &mut self.text_decoder.blocks,
        ];
        towers.into_iter().flatten()
    }

    /// Unified tokens z_u `[B, N, D]` from encoder inputs `[B, C, H', W']`.
    pub fn encode(&self, inputs: Tensor<4>) -> Tensor<3> {
        self.encoder.forward(inputs)
    }

    /// Reconstruct encoder inputs from (possibly noised) tokens on a `grid` of `(H/16, W/16)`.
    pub fn decode(&self, tokens: Tensor<3>, grid: (usize, usize)) -> Tensor<4> {
        self.decoder.forward(tokens, grid)
    }

    pub fn image_embedding(&self, z_u: Tensor<3>) -> Tensor<2> {
        let [b, _, d] = z_u.dims();
        let pooled = z_u.mean_dim(1).reshape([b, d]);
        self.image_head.proj.forward(self.image_head.norm.forward(pooled))
    }

    pub fn text_embedding(&self, tokens: Tensor<2, Int>) -> Tensor<2> {
        self.text_encoder.forward(tokens)
    }

    pub fn caption_logits(&self, z_u: Tensor<3>, tokens: Tensor<2, Int>) -> Tensor<3> {
        self.text_decoder.forward(z_u, tokens)
    }

    /// All loss terms for a batch. `noise` is eq. 3's ([`Noise::NONE`] at evaluation).
    ///
    /// Both branches are always computed. With `RecOnly` or `UndOnly` the switched-off branch is a *probe*
    /// (DESIGN §3.1): it reads a detached copy of z_u, so its heads still train on their own loss (which is
    /// thereby measured every step) while none of its gradient reaches the encoder. `total` is what the
    /// training step differentiates: the objective of eq. 6 plus, under an ablation, the probe's loss.
    ///
    /// In a data-parallel `group` the batch is this rank's share of the global batch, and every term is this
    /// rank's share of the global term: the group's mean of each value, and of each gradient, is the value and
    /// gradient of one process holding the whole global batch (see [`Ov3::understanding_terms`]). Alone
    /// ([`crate::parallel::Single`]) the terms are the batch's own.
    pub fn losses(
        &self,
        batch: &Batch,
        weights: &LossWeights,
        noise: Noise,
        frozen: Frozen,
        group: &dyn Group,
    ) -> LossOutput {
        let [_, _, h, w] = batch.inputs.dims();
        let patch = self.decoder.patch;
        let grid = (h / patch, w / patch);
        let z_u = self.encode(batch.inputs.clone());
        // What each branch reads: z_u itself, or a detached copy where that branch is only probed.
        let read = |probe_only: bool| if probe_only { z_u.clone().detach() } else { z_u.clone() };

        let z_hat = self.decode(add_noise(read(weights.objective == Objective::UndOnly), noise), grid);
        let rec_terms = self.reconstruction_terms(batch, z_hat, weights.lambda, frozen);
        let rec = losses::reconstruction_loss(&rec_terms, weights.beta, weights.lambda);

        let (caption, contrastive) =
            self.understanding_terms(read(weights.objective == Objective::RecOnly), &batch.tokens, group);
        let und = losses::understanding_loss(caption.clone(), contrastive.clone(), weights.alpha);

        let total = losses::total_loss(rec.clone(), und.clone(), weights.w_rec, weights.w_und);
        LossOutput { total, rec, rec_terms, und, caption, contrastive }
    }

    /// The caption and contrastive terms of eq. 5 for tokens `z_u` and captions `tokens`.
    ///
    /// Data parallel, the contrastive loss is OpenCLIP's over the global batch: every rank gathers all
    /// image and text embeddings (its own rows live, the others constant) and computes the same global loss;
    /// its gradient is scaled by the group size (value unchanged), so that the group's mean gradient sums
    /// each rank's own-row contributions, i.e. the full gradient; the logit scale, live on every rank, has
    /// its gradient divided by the size to match. The caption loss is a mean over non-padding tokens, whose
    /// number differs between ranks: it is weighted by this rank's share of the global token count.
    fn understanding_terms(
        &self,
        z_u: Tensor<3>,
        tokens: &Tensor<2, Int>,
        group: &dyn Group,
    ) -> (Tensor<1>, Tensor<1>) {
        let n = group.size() as f64;
        let image = group.gather_rows(self.image_embedding(z_u.clone()));
        let text = group.gather_rows(self.text_embedding(tokens.clone()));
        let scale = scale_grad(self.logit_scale.val(), 1.0 / n);
        let contrastive = scale_grad(losses::contrastive_loss(image, text, scale), n);
        let logits = self.caption_logits(z_u, tokens.clone());
        let mut caption = losses::caption_loss(logits, tokens.clone(), self.pad_id);
        if group.size() > 1 {
            caption = caption.mul_scalar(group.share(losses::caption_targets(tokens, self.pad_id)));
        }
        (caption, contrastive)
    }

    /// The three terms of eq. 4 for a prediction `z_hat` of the encoder inputs.
    fn reconstruction_terms(&self, batch: &Batch, z_hat: Tensor<4>, lambda: f64, frozen: Frozen) -> RecTerms {
        let (x_hat, latent_l1) = match self.input_space {
            // No VAE: the decoder predicts pixels, so the "latent" term would repeat the pixel term.
            InputSpace::Pixels => (Some(z_hat), None),
            InputSpace::VaeLatents => {
                let latent_l1 = losses::l1(batch.inputs.clone(), z_hat.clone());
                (frozen.vae_decoder.map(|vae| vae.decode(z_hat)), Some(latent_l1))
            }
        };
        let pixel_l1 = x_hat.as_ref().map(|x_hat| losses::l1(batch.images.clone(), x_hat.clone()));
        let lpips = match (x_hat, frozen.perceptual) {
            (Some(x_hat), Some(p)) if lambda > 0.0 => Some(p.distance(batch.images.clone(), x_hat)),
            _ => None,
        };
        RecTerms { pixel_l1, latent_l1, lpips }
    }
}

/// `x` with its gradient multiplied by `k` and its value unchanged (exactly: `x - detach(x)` is 0).
fn scale_grad<const D: usize>(x: Tensor<D>, k: f64) -> Tensor<D> {
    if k == 1.0 {
        return x;
    }
    let constant = x.clone().detach();
    constant.clone() + (x - constant).mul_scalar(k)
}

/// The noise of eq. 3 for one forward pass: its bound `tau` and the seed its draws come from (the trainer
/// derives it from the run's seed, the rank and the step, so a resumed run draws what the straight one did).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Noise {
    pub tau: f64,
    pub seed: u64,
}

impl Noise {
    /// No noise: the decoder reads z_u itself.
    pub const NONE: Noise = Noise { tau: 0.0, seed: 0 };
}

/// eq. 3: `z~ = z_u + sigma * eps`, `eps ~ N(0, I)`, with `sigma ~ U[0, tau]` drawn once per sample.
pub fn add_noise(z_u: Tensor<3>, noise: Noise) -> Tensor<3> {
    if noise.tau <= 0.0 {
        return z_u;
    }
    let [b, n, d] = z_u.dims();
    let device = z_u.device();
    let (sigma, eps) = crate::device::seeded(&device, noise.seed, || {
        let sigma = Tensor::<3>::random([b, 1, 1], Distribution::Uniform(0.0, noise.tau), &device);
        (sigma, Tensor::<3>::random([b, n, d], Distribution::Normal(0.0, 1.0), &device))
    });
    z_u + eps * sigma
}
