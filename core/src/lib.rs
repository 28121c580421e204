//! ov3-core: OpenVision 3, a unified visual tokenizer, on burn. One code path for every device.

pub mod autoencoder;
pub mod config;
pub mod cpu_ops;
pub mod device;
pub mod losses;
pub mod lpips;
pub mod model;
pub mod params;

pub use config::{InputSpace, ModelConfig, Objective, Precision, Preset, TowerConfig};
pub use model::{Batch, Frozen, LossOutput, LossWeights, Ov3};
pub mod data;
pub mod eval;
pub mod flash;
pub mod fsio;
pub mod gpu_ops;
pub mod image_io;
pub mod inference;
pub mod json_float;
pub mod metrics;
pub mod model_file;
pub mod optim;
pub mod optim_gpu;
pub mod parallel;
pub mod random_batch;
pub mod step;
pub mod tokenizer;
pub mod train;
pub mod vae;
pub mod weights;
pub mod wgsl;
