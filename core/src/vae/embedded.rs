//! ov3's embedded default autoencoder: TAEF1's architecture at reduced width, trained by `tools/train_ae.py`
//! on real photographs from Debian/PyPI packages (`ov3 data prepare real`) plus the embedded captioned world,
//! and shipped in `assets/` as f16, so a fresh clone runs with no weights downloaded. Its latents are in the
//! tokenizer's convention already (no shift). Its predecessors are kept for the models trained with them
//! ([`PREDECESSORS`]).

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::Device;

use super::taef1::{TinyAutoencoder, TinyConfig, TinyLayout, original_key};
use super::{EMBEDDED_MARK, Vae};
use crate::params::named_values;
use crate::weights::{Weights, WeightsError, save_f32_with_metadata};

/// The shipped weights, compiled into the native binary. The wasm module leaves them out (2.8 MB that gzip
/// cannot shrink); the web page fetches the same file and calls [`Vae::from_bytes`].
#[cfg(not(target_arch = "wasm32"))]
pub const EMBEDDED_WEIGHTS: &[u8] = include_bytes!("../../../assets/ae/ov3_tiny_ae.safetensors");
#[cfg(target_arch = "wasm32")]
pub const EMBEDDED_WEIGHTS: &[u8] = &[];

/// Where the embedded autoencoder's file lives in the repository (and, by name, in the web bundle).
pub const EMBEDDED_FILE: &str = "assets/ae/ov3_tiny_ae.safetensors";

/// The embedded autoencoder before 2026-11-27 (TAEF1 at width 32, trained on the embedded world only): models
/// trained with it, the ablations of docs/ablations among them, decode with `--vae` and this file.
pub const WORLD_ONLY_FILE: &str = "assets/ae/world-only-w32.safetensors";

/// An autoencoder embedded before [`EMBEDDED_FILE`]'s, kept in `assets/ae/` for the models trained with it:
/// a model file records its VAE's identity, so a refusal can name the file that decodes it.
pub struct Predecessor {
    /// The file, from the repository root.
    pub file: &'static str,
    /// Its [`Vae::identity`] (what model files trained with it record).
    pub identity: &'static str,
    /// When it was the embedded one, and which shipped models use it.
    pub note: &'static str,
}

/// Every earlier embedded autoencoder, newest first (checked against the files by the tests).
pub const PREDECESSORS: &[Predecessor] = &[
    Predecessor {
        file: "assets/ae/real-w48-2026-12-06.safetensors",
        identity: "fnv64:2bcc1646f8674893",
        note: "embedded on 2026-12-06 before the bf16 CPU run; the demo checkpoints refine-10 and refine-11",
    },
    Predecessor {
        file: "assets/ae/real-w48-2026-11-27.safetensors",
        identity: "fnv64:1f5fdf4e9e86f237",
        note: "embedded from 2026-11-27 to 2026-12-06; the demo checkpoints before refine-10",
    },
    Predecessor {
        file: WORLD_ONLY_FILE,
        identity: "fnv64:e09f3a89098fc6ec",
        note: "embedded before 2026-11-27, trained on the world only; the ablations of docs/ablations",
    },
];

/// The earlier embedded autoencoder whose weights have this identity, if one is kept.
pub fn predecessor(identity: &str) -> Option<&'static Predecessor> {
    PREDECESSORS.iter().find(|p| p.identity == identity)
}

/// Width of the embedded autoencoder (TAEF1 uses 64; 48 is ~1.8x cheaper and fits the browser budget).
pub const EMBEDDED_WIDTH: usize = 48;

impl Vae {
    /// The embedded default autoencoder.
    pub fn embedded(device: &Device) -> Result<Self, WeightsError> {
        if EMBEDDED_WEIGHTS.is_empty() {
            return Err(WeightsError::Invalid {
                path: "<embedded autoencoder>".into(),
                reason: format!("not compiled into the wasm build; load {EMBEDDED_FILE} with Vae::from_bytes"),
            });
        }
        Self::from_bytes(EMBEDDED_WEIGHTS.to_vec(), "embedded", device)
    }
}

/// Writes a (trained) tiny autoencoder in TAEF1's original layout, marked as ov3's own convention.
pub fn save_tiny(model: &TinyAutoencoder, cfg: &TinyConfig, path: &Path, note: &str) -> Result<(), WeightsError> {
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = named_values(model)
        .into_iter()
        .map(|(p, shape, v)| (original_key(&p, cfg).unwrap_or_else(|| panic!("no checkpoint key for {p}")), shape, v))
        .collect();
    let refs: Vec<(&str, Vec<usize>, Vec<f32>)> =
        tensors.iter().map(|(k, s, v)| (k.as_str(), s.clone(), v.clone())).collect();
    let metadata = HashMap::from([(EMBEDDED_MARK.to_string(), note.to_string())]);
    save_f32_with_metadata(path, &refs, Some(metadata))
}

/// Loads a file written by [`save_tiny`] as a trainable model (to continue training).
pub fn load_tiny(path: &Path, device: &Device) -> Result<(TinyAutoencoder, TinyConfig), WeightsError> {
    let weights = Weights::open(path)?;
    TinyAutoencoder::load(&weights, TinyLayout::Original, device)
}
