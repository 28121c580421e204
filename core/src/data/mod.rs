//! Data: sources (folders, tables, WebDataset shards, the embedded world), decoding, and skip accounting.

pub mod composite;
pub mod decode;
pub mod font;
pub mod idx;
pub mod latent_cache;
pub mod pipeline;
pub mod prepare;
pub mod rng;
pub mod skips;
pub mod source;
pub mod synthetic;
