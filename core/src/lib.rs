//! ov3-core: OpenVision 3, a unified visual tokenizer, on burn. One code path for every device.

pub mod autoencoder;
pub mod config;
pub mod device;
pub mod losses;
pub mod model;
pub mod params;

pub use config::{InputSpace, ModelConfig, Objective, Preset, TowerConfig};
pub use model::{Batch, Frozen, LossOutput, LossWeights, Ov3};
pub mod optim;
pub mod step;
pub mod tokenizer;
pub mod random_batch;
pub mod vae;
pub mod weights;
pub mod image_io;
pub mod data;
pub mod metrics;
