//! A fixed batch of random encoder inputs with distinct captions: the workload of `ov3 bench step`,
//! the overfit demo and the model tests, before any VAE or dataset is involved.

use burn::tensor::{Device, Distribution, Tensor};

use crate::config::ModelConfig;
use crate::model::Batch;
use crate::tokenizer::Tokenizer;

/// Captions that differ early and in length, so neither tower can tell them apart by position alone.
pub fn caption(i: usize) -> String {
    const COLOURS: [&str; 8] = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"];
    const SHAPES: [&str; 6] = ["circle", "square", "triangle", "star", "ring", "cross"];
    let n = i / (COLOURS.len() * SHAPES.len()) + 1;
    format!("{n} {} {} on a grey background", COLOURS[i % COLOURS.len()], SHAPES[(i / COLOURS.len()) % SHAPES.len()])
}

/// `batch` images at `resolution` px: images U[-1, 1], inputs N(0, 1) in the config's input space.
/// Draws from the device RNG: call it inside [`crate::device::seeded`] for a repeatable batch.
pub fn random_batch(cfg: &ModelConfig, batch: usize, resolution: usize, device: &Device) -> Batch {
    let (channels, _) = cfg.patch_geometry();
    let side = resolution / cfg.input_stride();
    let images = Tensor::<4>::random([batch, 3, resolution, resolution], Distribution::Uniform(-1.0, 1.0), device);
    let inputs = Tensor::<4>::random([batch, channels, side, side], Distribution::Normal(0.0, 1.0), device);
    let captions: Vec<String> = (0..batch).map(caption).collect();
    Batch { images, inputs, tokens: Tokenizer::Bytes.batch(&captions, cfg.context_length, device) }
}
