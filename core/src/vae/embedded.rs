//! ov3's embedded default autoencoder: TAEF1's architecture at reduced width, trained by `ov3 train-vae` on
//! the embedded captioned world and shipped in `assets/`, so a fresh clone runs with no weights downloaded.
//! Its latents are in the tokenizer's convention already (no shift).

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::Device;

use super::taef1::{TinyAutoencoder, TinyConfig, TinyLayout, original_key};
use super::{EMBEDDED_MARK, Vae};
use crate::params::named_values;
use crate::weights::{Weights, WeightsError, save_f32_with_metadata};

/// The shipped weights, compiled into the native binary. The wasm module leaves them out (2.5 MB that gzip
/// cannot shrink); the web page fetches the same file and calls [`Vae::from_bytes`].
#[cfg(not(target_arch = "wasm32"))]
pub const EMBEDDED_WEIGHTS: &[u8] = include_bytes!("../../../assets/ae/ov3_tiny_ae.safetensors");
#[cfg(target_arch = "wasm32")]
pub const EMBEDDED_WEIGHTS: &[u8] = &[];

/// Where the embedded autoencoder's file lives in the repository (and, by name, in the web bundle).
pub const EMBEDDED_FILE: &str = "assets/ae/ov3_tiny_ae.safetensors";

/// Width of the embedded autoencoder (TAEF1 uses 64; 32 is ~4x cheaper and trains on a CPU).
pub const EMBEDDED_WIDTH: usize = 32;

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
