//! Checkpoints: `RUN/checkpoints/step-NNNNNNNN/` holding the model file, the optimizer state (burn's
//! burnpack bytes) and `state.json` (step, data position, seed). A checkpoint is assembled in a hidden
//! temporary folder, every file fsynced, then renamed into place: a crash at any moment leaves the
//! previous checkpoints untouched and never a half-written one under a final name.

use std::path::{Path, PathBuf};

use burn::optim::ModuleOptimizer;
use burn::tensor::{Bytes, Device};
use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::data::pipeline::Position;
use crate::fsio::{atomic_write, sync_parent};
use crate::model::Ov3;
use crate::model_file::{load_model, save_model};

pub const MODEL_FILE: &str = "model.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.bpk";
const STATE_FILE: &str = "state.json";

/// What besides the weights a run needs to continue where it stopped.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimiser steps completed.
    pub step: u64,
    /// Where the current stage's data stream continues.
    pub position: Position,
    /// The run's seed; the device RNG is re-seeded from (seed, step) every step, so no RNG state is stored.
    pub seed: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {reason}")]
    Io { path: String, reason: String },
    #[error(transparent)]
    Weights(#[from] crate::weights::WeightsError),
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> CheckpointError + '_ {
    move |e| CheckpointError::Io { path: path.display().to_string(), reason: e.to_string() }
}

pub fn checkpoints_dir(run: &Path) -> PathBuf {
    run.join("checkpoints")
}

/// Writes a checkpoint for `state.step` and keeps only the newest `keep`. Returns its folder.
pub fn save(
    run: &Path,
    model: &Ov3,
    cfg: &ModelConfig,
    optim: &ModuleOptimizer,
    state: &TrainState,
    keep: usize,
) -> Result<PathBuf, CheckpointError> {
    let root = checkpoints_dir(run);
    std::fs::create_dir_all(&root).map_err(io(&root))?;
    let name = format!("step-{:08}", state.step);
    let tmp = root.join(format!(".{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir(&tmp).map_err(io(&tmp))?;
    save_model(&tmp.join(MODEL_FILE), model, cfg)?;
    let optim_bytes = optim.into_bytes().map_err(|e| CheckpointError::Io {
        path: tmp.display().to_string(),
        reason: format!("optimizer state: {e}"),
    })?;
    atomic_write(&tmp.join(OPTIMIZER_FILE), &optim_bytes).map_err(io(&tmp))?;
    let json = serde_json::to_vec_pretty(state).expect("state serialises");
    atomic_write(&tmp.join(STATE_FILE), &json).map_err(io(&tmp))?;
    let dir = root.join(&name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
    }
    std::fs::rename(&tmp, &dir).map_err(io(&dir))?;
    sync_parent(&dir).map_err(io(&dir))?;
    for old in list(run).into_iter().rev().skip(keep) {
        std::fs::remove_dir_all(&old).map_err(io(&old))?;
    }
    Ok(dir)
}

/// Complete checkpoints of a run, oldest first (temporary folders of an interrupted write are ignored).
pub fn list(run: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(checkpoints_dir(run)) else { return vec![] };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("step-")))
        .filter(|p| p.join(STATE_FILE).is_file())
        .collect();
    dirs.sort();
    dirs
}

pub fn latest(run: &Path) -> Option<PathBuf> {
    list(run).pop()
}

/// Loads a checkpoint folder: model, its config, the optimizer state into `optim`'s groups, and the state.
pub fn load(
    dir: &Path,
    device: &Device,
    make_optim: impl FnOnce(&Ov3) -> ModuleOptimizer,
) -> Result<(Ov3, ModelConfig, ModuleOptimizer, TrainState), CheckpointError> {
    let (model, cfg) = load_model(&dir.join(MODEL_FILE), device)?;
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read(&state_path).map_err(io(&state_path))?;
    let state: TrainState = serde_json::from_slice(&text)
        .map_err(|e| CheckpointError::Io { path: state_path.display().to_string(), reason: e.to_string() })?;
    let optim_path = dir.join(OPTIMIZER_FILE);
    let bytes = std::fs::read(&optim_path).map_err(io(&optim_path))?;
    let optim = make_optim(&model)
        .from_bytes(Bytes::from_bytes_vec(bytes))
        .map_err(|e| CheckpointError::Io { path: optim_path.display().to_string(), reason: e.to_string() })?;
    Ok((model, cfg, optim, state))
}
