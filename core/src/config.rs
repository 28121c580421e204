//! Model configuration: the presets of DESIGN §2 and the ablation switches of DESIGN §3.

use burn::config::Config;
use serde::{Deserialize, Serialize};

/// Width, depth and heads of one transformer tower.
#[derive(Config, Debug, PartialEq)]
pub struct TowerConfig {
    pub width: usize,
    pub depth: usize,
    pub heads: usize,
}

impl TowerConfig {
    fn of(width: usize, depth: usize, heads: usize) -> Self {
        Self { width, depth, heads }
    }
}

/// What the ViT encoder reads and the ViT decoder predicts.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum InputSpace {
    /// Latents of the frozen VAE (16 channels at H/8), 2x2 patches: 16x total downsampling (the paper).
    VaeLatents,
    /// The "no VAE" ablation: RGB pixels with 16x16 patches, the decoder predicts pixels.
    Pixels,
}

/// Which loss terms train the encoder (DESIGN §3, Sec. 5.1 of the paper). Under an ablation the other branch
/// is a probe on a detached z_u (DESIGN §3.1): its heads train and its losses are measured, the encoder gets
/// none of its gradient.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum Objective {
    /// eq. 6: w_rec * L_rec + w_und * L_und.
    Full,
    /// Reconstruction only: the understanding heads (image head, text towers, logit scale) are probes.
    RecOnly,
    /// Understanding only: the ViT decoder is a probe.
    UndOnly,
}

/// Which attention implementation the four transformers run: a runtime choice (`Ov3::with_attention`,
/// the training TOML's `attention`), not part of the model or its files — both compute the same function.
/// The reference path is the default because it measured faster on the only adapter we could test
/// (lavapipe, docs/PERFORMANCE.md); the fused kernels hold memory linear in the sequence length.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum AttentionImpl {
    /// Our fused WGSL kernels (`shaders/`, forward and backward) where the device runs them (wgpu),
    /// the reference path elsewhere.
    Fused,
    /// The unfused matmul-softmax-matmul of `model::attention` everywhere.
    Reference,
}

/// The arithmetic of the transformer blocks in training: a runtime choice (`Ov3::with_precision`, the
/// training TOML's `precision`), not part of the model or its files. Parameters, optimiser state, layer norms,
/// softmax, losses and everything outside the blocks stay f32 (master weights); under `F16` / `Bf16` the
/// blocks' matmuls, GELU and attention products run in half precision, as PyTorch's autocast does
/// (`crate::model::precision`). f16 needs loss scaling (`crate::step::LossScale`); bf16 has f32's range.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    /// IEEE half: wgpu's `shader-f16` (most Vulkan, Metal and DX12 GPUs; lavapipe too).
    F16,
    /// bfloat16, where the backend has it (not wgpu today; flex on the CPU).
    Bf16,
}

impl Precision {
    pub const ALL: [Precision; 3] = [Precision::F32, Precision::F16, Precision::Bf16];

    /// The name recipes, flags and benchmark output use: `f32`, `f16`, `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
        }
    }

    pub fn dtype(self) -> burn::tensor::DType {
        match self {
            Precision::F32 => burn::tensor::DType::F32,
            Precision::F16 => burn::tensor::DType::F16,
            Precision::Bf16 => burn::tensor::DType::BF16,
        }
    }

    /// Whether `device` computes in this precision: a clear refusal, not a panic inside a kernel launch.
    pub fn check(self, device: &burn::tensor::Device) -> Result<(), String> {
        if device.supports_dtype(self.dtype()) {
            Ok(())
        } else {
            Err(format!(
                "precision {} is not available on this device; use f16 or f32 (bf16 needs a backend with \
                 bfloat16 matmuls: the CPU's flex has them, wgpu's WGSL does not; a `--features vulkan` build \
                 may, on a driver with bfloat16 shaders)",
                self.name()
            ))
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let name = s.to_ascii_lowercase();
        Self::ALL.into_iter().find(|p| p.name() == name).ok_or(format!("precision must be f32, f16 or bf16, got '{s}'"))
    }
}

/// The whole model: towers, token geometry, text vocabulary and the noise of eq. 3.
#[derive(Config, Debug, PartialEq)]
pub struct ModelConfig {
    pub encoder: TowerConfig,
    pub decoder: TowerConfig,
    pub text_encoder: TowerConfig,
    pub text_decoder: TowerConfig,
    /// Dimension of the shared image/text embedding of the contrastive loss.
    pub embed_dim: usize,
    #[config(default = "InputSpace::VaeLatents")]
    pub input_space: InputSpace,
    /// Channels of the VAE latent space (16 for FLUX.1 and TAEF1).
    #[config(default = 16)]
    pub latent_channels: usize,
    /// Text vocabulary size; the default is the byte-level tokenizer (256 bytes + BOS, EOS, PAD).
    #[config(default = 259)]
    pub vocab_size: usize,
    /// Maximum caption length in tokens, BOS and EOS included.
    #[config(default = 80)]
    pub context_length: usize,
    /// Special token ids (defaults: the byte-level tokenizer's).
    #[config(default = 256)]
    pub bos_id: usize,
    #[config(default = 257)]
    pub eos_id: usize,
    #[config(default = 258)]
    pub pad_id: usize,
    /// Upper bound of the per-sample noise scale sigma ~ U[0, tau] (eq. 3). Not published; ablate it.
    #[config(default = 0.5)]
    pub tau: f64,
    #[config(default = 1e-6)]
    pub norm_eps: f64,
    /// The frozen VAE the model was trained with (DESIGN §8): a model decodes only through the latent space
    /// it learned, so `ov3` and the page refuse another. `None` in files written before it was recorded.
    pub vae: Option<crate::vae::VaeRecord>,
}

/// The named presets of DESIGN §2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    Tiny,
    Small,
    Base,
    Large,
}

impl Preset {
    pub const ALL: [Preset; 4] = [Preset::Tiny, Preset::Small, Preset::Base, Preset::Large];

    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Small => "small",
            Preset::Base => "base",
            Preset::Large => "large",
        }
    }

    /// The towers of the DESIGN §2 table, everything else at its default.
    pub fn config(self) -> ModelConfig {
        let t = TowerConfig::of;
        let (enc, dec, txt_enc, txt_dec, embed) = match self {
            Preset::Tiny => (t(192, 6, 3), t(192, 4, 3), t(128, 4, 2), t(128, 4, 2), 128),
            Preset::Small => (t(384, 12, 6), t(384, 8, 6), t(256, 6, 4), t(256, 6, 4), 256),
            Preset::Base => (t(768, 12, 12), t(768, 12, 12), t(512, 12, 8), t(512, 12, 8), 512),
            Preset::Large => (t(1024, 24, 16), t(768, 12, 12), t(768, 12, 12), t(768, 12, 12), 768),
        };
        ModelConfig::new(enc, dec, txt_enc, txt_dec, embed)
    }
}

impl std::str::FromStr for Preset {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Preset::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| format!("unknown preset '{s}' (expected tiny, small, base or large)"))
    }
}

impl ModelConfig {
    /// Channels the encoder reads per spatial position and the patch size that gives 16x total downsampling.
    pub fn patch_geometry(&self) -> (usize, usize) {
        match self.input_space {
            InputSpace::VaeLatents => (self.latent_channels, 2),
            InputSpace::Pixels => (3, 16),
        }
    }

    /// Spatial downsampling from pixels to the encoder input (8 for the VAE, 1 for pixels).
    pub fn input_stride(&self) -> usize {
        match self.input_space {
            InputSpace::VaeLatents => 8,
            InputSpace::Pixels => 1,
        }
    }

    /// Number of unified tokens for a square image of `resolution` pixels: (H/16) * (W/16).
    pub fn num_tokens(&self, resolution: usize) -> usize {
        (resolution / 16) * (resolution / 16)
    }

    /// One line of validation before anything is allocated, so a bad config is a message, not a panic.
    pub fn validate(&self) -> Result<(), String> {
        for (name, t) in [
            ("encoder", &self.encoder),
            ("decoder", &self.decoder),
            ("text_encoder", &self.text_encoder),
            ("text_decoder", &self.text_decoder),
        ] {
            if t.width == 0 || t.depth == 0 || t.heads == 0 || t.width % t.heads != 0 {
                return Err(format!(
                    "{name}: width {} must be a positive multiple of heads {} and depth {} positive",
                    t.width, t.heads, t.depth
                ));
            }
        }
        if self.encoder.width % 4 != 0 || self.decoder.width % 4 != 0 {
            return Err("encoder and decoder widths must be multiples of 4 (2-D sin-cos embedding)".into());
        }
        if [self.bos_id, self.eos_id, self.pad_id].iter().any(|&id| id >= self.vocab_size) {
            return Err(format!("special token ids must be below vocab_size {}", self.vocab_size));
        }
        if self.context_length < 2 || self.vocab_size < 4 || self.embed_dim == 0 {
            return Err("context_length >= 2, vocab_size >= 4 and embed_dim > 0 are required".into());
        }
        if !(self.tau >= 0.0 && self.tau.is_finite()) {
            return Err(format!("tau must be finite and >= 0, got {}", self.tau));
        }
        Ok(())
    }
}
