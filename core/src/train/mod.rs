//! Training ov3 end to end (DESIGN §4): stages of resolutions, AdamW with warmup + cosine, gradient
//! accumulation, periodic evaluation and reconstruction grids, atomic checkpoints with resume, and a stop
//! on the first non-finite loss term.

pub mod checkpoint;
pub mod config;
pub mod log;
mod prefetch;
pub mod run;
pub mod schedule;

pub use config::{StageConfig, TrainConfig};
pub use run::{Observer, Outcome, TrainError, train};
