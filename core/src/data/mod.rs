//! Data: the embedded captioned world and its deterministic generator.

pub mod font;
pub mod rng;
pub mod synthetic;
