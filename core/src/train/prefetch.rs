//! Host batches -> model inputs on a thread of their own, one batch ahead of the training step.
//!
//! Encoding a batch with the frozen VAE is a large share of a step (on the CPU backend at 64 px, batch 32:
//! 1.5 s of 3.6 s). burn's CPU backend runs each thread's operations on that thread (apart from large matmuls
//! and reductions, which it spreads over its rayon pool), so on a 2-core machine the encoder of the next batch
//! keeps one core busy while the step runs on the other (docs/PERFORMANCE.md).
//! The encoder is deterministic and draws no random numbers, so the device RNG the step seeds is untouched
//! and a resumed run sees the same inputs as a straight one.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, sync_channel};

use burn::tensor::{Device, Tensor, TensorData};

use crate::config::InputSpace;
use crate::data::latent_cache::cached_latents;
use crate::data::pipeline::HostBatch;
use crate::data::source::DataError;
use crate::inference::encoder_inputs;
use crate::model::Batch;
use crate::tokenizer::Tokenizer;
use crate::vae::Vae;

/// What turns a host batch into tensors.
pub struct Inputs {
    pub vae: Arc<Vae>,
    /// What the encoder reads (latents, or the pixels in the no-VAE ablation).
    pub space: InputSpace,
    /// The latent shape of the source's latent cache, if it has one (then the VAE is not run).
    pub cached: Option<[usize; 3]>,
    /// Caption length in tokens.
    pub context_length: usize,
    pub tokenizer: Tokenizer,
    pub device: Device,
    /// (rank, size) of the data-parallel group: which share of every global batch this process converts.
    pub share: (usize, usize),
}

impl Inputs {
    /// Pixels, the encoder's inputs (latents from the latent cache, else [`encoder_inputs`]: the frozen VAE, or
    /// the pixels themselves), with no gradient either way, and caption tokens, of this process's share of `host`.
    pub fn batch(&self, host: &HostBatch) -> Batch {
        let examples = host.share(self.share.0, self.share.1);
        let b = examples.len();
        let (w, h) = examples[0].image.dimensions();
        let pixels = HostBatch::pixels(examples);
        let images = Tensor::<4>::from_data(TensorData::new(pixels, [b, 3, h as usize, w as usize]), &self.device);
        let cached = self.cached.filter(|_| self.space == InputSpace::VaeLatents);
        let inputs = cached
            .and_then(|shape| cached_latents(examples, shape, &self.device))
            .unwrap_or_else(|| encoder_inputs(self.space, &self.vae, images.clone()));
        let captions: Vec<String> = examples.iter().map(|e| e.caption.clone()).collect();
        Batch { images, inputs, tokens: self.tokenizer.batch(&captions, self.context_length, &self.device) }
    }
}

/// Starts the thread that converts every batch of `host`, keeping one converted batch ready. It stops when
/// the returned receiver is dropped (at the end of a stage) or after forwarding the loader's error.
pub fn spawn_inputs(
    host: Receiver<Result<HostBatch, DataError>>,
    inputs: Inputs,
) -> Receiver<Result<(HostBatch, Batch), DataError>> {
    let (tx, rx) = sync_channel(1);
    std::thread::spawn(move || {
        for next in host {
            let converted = next.map(|h| {
                let batch = inputs.batch(&h);
                (h, batch)
            });
            let failed = converted.is_err();
            if tx.send(converted).is_err() || failed {
                return;
            }
        }
    });
    rx
}
