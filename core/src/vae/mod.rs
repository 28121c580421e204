//! The frozen VAE: FLUX.1 AutoencoderKL or TAEF1, loaded from the files users downloaded, and the
//! tokenizer's latent convention on top (DESIGN §1: `z = posterior_mean * 0.3611`, no shift).

pub mod embedded;
pub mod flux;
pub mod layers;
pub mod taef1;

use std::path::Path;

use burn::module::Module;
use burn::tensor::{Device, ExecutionError, Tensor};

use crate::autoencoder::LatentDecoder;
use crate::weights::{Weights, WeightsError};
use embedded::{PREDECESSORS, WORLD_ONLY_FILE, predecessor};
use flux::{FLUX_SCALING_FACTOR, FluxAeConfig, FluxAutoencoder, diffusers_to_bfl};
use taef1::{TinyAutoencoder, TinyConfig, TinyLayout};

/// FLUX's latent shift, which TAEF1's latents include and ours do not.
pub const FLUX_SHIFT_FACTOR: f64 = 0.1159;

/// safetensors metadata key marking ov3's own embedded autoencoder (latents already in our convention).
pub const EMBEDDED_MARK: &str = "ov3_embedded_autoencoder";

/// What a model file records about its frozen VAE: what it is, a fingerprint of its weights
/// ([`Vae::identity`]) and where it was loaded from (a hint for the message when it is missing).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VaeRecord {
    pub kind: String,
    pub identity: String,
    pub source: String,
}

impl VaeRecord {
    /// The warning for a model file that names no VAE (written before model files recorded theirs, as every
    /// model before 2026-11-25 was): its latents may belong to another autoencoder than `vae`, and nothing
    /// can tell, so the user is told what is used and what the likely other one is.
    pub fn unnamed(vae: &Vae) -> String {
        format!(
            "warning: this model file does not name the VAE it was trained with (it predates model files \
             recording it); decoding with {} ({}). If it was trained with the autoencoder embedded before \
             2026-11-27, pass --vae {WORLD_ONLY_FILE}, or its reconstructions are wrong",
            vae.kind(),
            vae.source
        )
    }

    /// `Ok` when `vae` has the recorded weights; otherwise a message naming both and how to fix it.
    pub fn check(&self, vae: &Vae) -> Result<(), String> {
        self.check_identity(vae, &vae.identity())
    }

    /// [`VaeRecord::check`] with `vae`'s identity already computed ([`Vae::identity_async`] in the browser).
    pub fn check_identity(&self, vae: &Vae, identity: &str) -> Result<(), String> {
        if identity == self.identity {
            return Ok(());
        }
        let hint = if let Some(before) = predecessor(&self.identity) {
            format!("it was trained with the autoencoder {}: pass --vae {}", before.note, before.file)
        } else if self.source == "embedded" && vae.source == "embedded" {
            let kept: Vec<String> = PREDECESSORS.iter().map(|p| format!("{} ({})", p.file, p.note)).collect();
            format!(
                "it was trained with another build's embedded autoencoder, none of those kept in assets/ae/ ({}): \
                 retrain it, or pass that build's {} with --vae",
                kept.join("; "),
                embedded::EMBEDDED_FILE
            )
        } else if self.source == "embedded" {
            "leave out --vae to use the embedded autoencoder".to_string()
        } else {
            format!("pass the autoencoder it was trained with: --vae {}", self.source)
        };
        Err(format!(
            "this model was trained with the VAE {} ({}, from {}), not with {} ({}, from {}); its latents mean nothing to another autoencoder: {hint}",
            self.kind,
            self.identity,
            self.source,
            vae.kind(),
            identity,
            vae.source
        ))
    }
}

/// How a weight file lays out its keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    FluxBfl,
    FluxDiffusers,
    Tiny(TinyLayout),
}

#[derive(Debug)]
pub enum Architecture {
    Flux(FluxAutoencoder, FluxAeConfig),
    Tiny(TinyAutoencoder, TinyConfig),
}

/// A frozen autoencoder speaking the tokenizer's latent convention.
#[derive(Debug)]
pub struct Vae {
    pub arch: Architecture,
    pub layout: Layout,
    /// Where it came from, for messages and cache manifests.
    pub source: String,
    /// Added to the network's latent output to reach ours (TAEF1: +0.1159 * 0.3611), subtracted on decode.
    latent_offset: f64,
}

impl Vae {
    /// Loads `path`: a BFL `ae.safetensors`, a diffusers folder (`config.json` +
    /// `diffusion_pytorch_model.safetensors`) or that file alone, a TAEF1 folder (`taef1_encoder` +
    /// `taef1_decoder` safetensors) or a diffusers `AutoencoderTiny`. The layout is detected from the keys.
    pub fn load(path: &Path, device: &Device) -> Result<Self, WeightsError> {
        Self::from_weights(open_any(path)?, path.display().to_string(), device)
    }

    /// `--vae PATH` when given, else the embedded default.
    pub fn load_or_embedded(path: Option<&Path>, device: &Device) -> Result<Self, WeightsError> {
        match path {
            Some(p) => Self::load(p, device),
            None => Self::embedded(device),
        }
    }

    /// [`Vae::load`] from the bytes of one safetensors file (the browser fetches them); `source` names it.
    pub fn from_bytes(bytes: Vec<u8>, source: &str, device: &Device) -> Result<Self, WeightsError> {
        let weights = Weights::from_bytes(bytes, format!("<{source} autoencoder>"))?;
        Self::from_weights(weights, source.to_string(), device)
    }

    fn from_weights(weights: Weights, source: String, device: &Device) -> Result<Self, WeightsError> {
        let layout = detect_layout(&weights)?;
        match layout {
            Layout::FluxBfl | Layout::FluxDiffusers => {
                let weights = if layout == Layout::FluxDiffusers {
                    let levels = count_indices(&weights, "encoder.down_blocks.");
                    weights.rename(|k| Some(diffusers_to_bfl(k, levels)))
                } else {
                    weights
                };
                let (model, cfg) = FluxAutoencoder::load(&weights, device)?;
                let model = model.no_grad(); // frozen: gradients pass through, never into it
                if cfg.z_channels != 16 || cfg.downsample() != 8 {
                    return Err(weights.invalid(format!(
                        "a {}-channel, {}x autoencoder; the tokenizer needs 16 channels at 8x",
                        cfg.z_channels,
                        cfg.downsample()
                    )));
                }
                Ok(Self { arch: Architecture::Flux(model, cfg), layout, source, latent_offset: 0.0 })
            }
            Layout::Tiny(tiny) => {
                let embedded = weights.metadata(EMBEDDED_MARK).is_some();
                let (model, cfg) = TinyAutoencoder::load(&weights, tiny, device)?;
                let model = model.no_grad();
                let latent_offset = if embedded { 0.0 } else { FLUX_SHIFT_FACTOR * FLUX_SCALING_FACTOR };
                Ok(Self { arch: Architecture::Tiny(model, cfg), layout, source, latent_offset })
            }
        }
    }

    /// A fingerprint of the weights (FNV-1a over every parameter's name and f32 values): what a latent cache
    /// records, so latents from another VAE are never mixed in.
    pub fn identity(&self) -> String {
        futures_lite::future::block_on(self.identity_async()).expect("reading the VAE's weights back from the device")
    }

    /// [`Vae::identity`] awaiting each weight's read-back, for the browser where WebGPU cannot block.
    pub async fn identity_async(&self) -> Result<String, ExecutionError> {
        let params = match &self.arch {
            Architecture::Flux(m, _) => crate::params::named_flat(m),
            Architecture::Tiny(m, _) => crate::params::named_flat(m),
        };
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for b in bytes {
                h = (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3);
            }
        };
        for (name, _, values) in params {
            eat(name.as_bytes());
            let values = values.into_data_async().await?.convert::<f32>().try_to_vec::<f32>().expect("f32 weights");
            for v in values {
                eat(&v.to_le_bytes());
            }
        }
        eat(&self.latent_offset.to_le_bytes());
        Ok(format!("fnv64:{h:016x}"))
    }

    /// What the autoencoder is, in words: "FLUX.1 AutoencoderKL (BFL keys)", "TAEF1 (width 64)", "ov3
    /// embedded autoencoder (TAEF1 architecture, width 32)".
    pub fn kind(&self) -> String {
        match (&self.arch, self.layout) {
            (Architecture::Flux(..), Layout::FluxDiffusers) => "FLUX.1 AutoencoderKL (diffusers keys)".into(),
            (Architecture::Flux(..), _) => "FLUX.1 AutoencoderKL (BFL keys)".into(),
            (Architecture::Tiny(_, c), _) if self.latent_offset == 0.0 => {
                format!("ov3 embedded autoencoder (TAEF1 architecture, width {})", c.width)
            }
            (Architecture::Tiny(_, c), _) => format!("TAEF1 (width {})", c.width),
        }
    }

    /// What a model file trained on this VAE records ([`VaeRecord`]).
    pub fn record(&self) -> VaeRecord {
        VaeRecord { kind: self.kind(), identity: self.identity(), source: self.source.clone() }
    }

    /// A copy on the plain (non-autodiff) device, for evaluation next to training.
    pub fn valid(&self) -> Self {
        let arch = match &self.arch {
            Architecture::Flux(m, c) => Architecture::Flux(m.valid(), c.clone()),
            Architecture::Tiny(m, c) => Architecture::Tiny(m.valid(), c.clone()),
        };
        Self { arch, layout: self.layout, source: self.source.clone(), latent_offset: self.latent_offset }
    }

    /// Images `[B, 3, H, W]` in [-1, 1] -> the unscaled posterior mean `[B, 16, H/8, W/8]` (what
    /// `ov3 vae encode` writes). For TAEF1, its latents are mapped back through FLUX's scale and shift.
    pub fn posterior_mean(&self, images: Tensor<4>) -> Tensor<4> {
        self.encode(images).div_scalar(FLUX_SCALING_FACTOR)
    }

    /// Images in [-1, 1] -> tokenizer latents `posterior_mean * 0.3611`.
    pub fn encode(&self, images: Tensor<4>) -> Tensor<4> {
        match &self.arch {
            Architecture::Flux(ae, _) => ae.posterior_mean(images).mul_scalar(FLUX_SCALING_FACTOR),
            Architecture::Tiny(ae, _) => {
                ae.encoder.forward(images.add_scalar(1.0).div_scalar(2.0)).add_scalar(self.latent_offset)
            }
        }
    }

    /// Unscaled latents (the posterior mean's space) -> images in [-1, 1] (unclamped).
    pub fn decode_unscaled(&self, latents: Tensor<4>) -> Tensor<4> {
        self.decode(latents.mul_scalar(FLUX_SCALING_FACTOR))
    }
}

impl LatentDecoder for Vae {
    fn decode(&self, latents: Tensor<4>) -> Tensor<4> {
        match &self.arch {
            Architecture::Flux(ae, _) => ae.decoder.forward(latents.div_scalar(FLUX_SCALING_FACTOR)),
            Architecture::Tiny(ae, _) => {
                ae.decoder.forward(latents.sub_scalar(self.latent_offset)).mul_scalar(2.0).sub_scalar(1.0)
            }
        }
    }
}

/// One file, a diffusers folder, or a TAEF1 folder with separate encoder and decoder files.
fn open_any(path: &Path) -> Result<Weights, WeightsError> {
    if !path.is_dir() {
        return Weights::open(path);
    }
    let diffusers = path.join("diffusion_pytorch_model.safetensors");
    if diffusers.exists() {
        return Weights::open(&diffusers);
    }
    let (enc, dec) = (path.join("taef1_encoder.safetensors"), path.join("taef1_decoder.safetensors"));
    if enc.exists() && dec.exists() {
        return Ok(Weights::merge(vec![(Weights::open(&enc)?, "encoder"), (Weights::open(&dec)?, "decoder")]));
    }
    Err(WeightsError::UnknownLayout {
        path: path.display().to_string(),
        reason: "a folder needs diffusion_pytorch_model.safetensors (diffusers) or taef1_encoder.safetensors + \
                 taef1_decoder.safetensors"
            .into(),
    })
}

fn detect_layout(w: &Weights) -> Result<Layout, WeightsError> {
    let has = |k: &str| w.contains(k);
    if has("encoder.down.0.block.0.conv1.weight") {
        Ok(Layout::FluxBfl)
    } else if has("encoder.down_blocks.0.resnets.0.conv1.weight") {
        Ok(Layout::FluxDiffusers)
    } else if has("encoder.layers.0.weight") {
        Ok(Layout::Tiny(TinyLayout::Diffusers))
    } else if has("encoder.0.weight") && has("decoder.1.weight") {
        Ok(Layout::Tiny(TinyLayout::Original))
    } else {
        let sample: Vec<&str> = w.keys().take(3).collect();
        Err(w.unknown_layout(format!("neither FLUX (BFL or diffusers) nor TAEF1 key names; first keys: {sample:?}")))
    }
}

/// Number of distinct `{prefix}{i}.` indices.
fn count_indices(w: &Weights, prefix: &str) -> usize {
    (0..).take_while(|i| w.keys().any(|k| k.starts_with(&format!("{prefix}{i}.")))).count()
}
