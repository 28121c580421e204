//! Checkpoints: `RUN/checkpoints/step-NNNNNNNN/` holding the model file, the optimizer state (burn's
//! burnpack bytes), `state.json` (step, data position, seed, what data) and `checksums.json` (length and
//! CRC-32 of each of the three, written last).
//!
//! Writing: the weights and the optimizer state are checked finite first (a diverged step is never saved),
//! then everything is assembled in a hidden `.step-N.tmp` folder, every file fsynced, and renamed into
//! place. Re-saving a step that exists moves the old folder aside (`.step-N.old`) before the rename and
//! deletes it after, so at every moment one complete copy of the step exists under some name.
//! [`recover`] finishes or undoes whatever a crash interrupted and removes stale temporary folders.
//!
//! Reading: [`load_latest`] takes the newest checkpoint that verifies against its checksums and loads,
//! skipping (and saying why) any newer one that is corrupt or partial; a corrupt folder is renamed
//! `step-N.corrupt` so that it is neither used nor counted among the kept checkpoints.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::optim::ModuleOptimizer;
use burn::tensor::{Bytes, Device};
use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::data::pipeline::Position;
use crate::data::source::DataIdentity;
use crate::fsio::{atomic_write, sync_parent};
use crate::model::Ov3;
use crate::model_file::{load_model, param_ids, save_model};

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.bpk";
pub const STATE_FILE: &str = "state.json";
pub const CHECKSUMS_FILE: &str = "checksums.json";
const FILES: [&str; 3] = [MODEL_FILE, OPTIMIZER_FILE, STATE_FILE];

/// What besides the weights a run needs to continue where it stopped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimiser steps completed.
    pub step: u64,
    /// Where the current stage's data stream continues.
    pub position: Position,
    /// The run's seed; the device RNG is re-seeded from (seed, step) every step, so no RNG state is stored.
    pub seed: u64,
    /// The training data the position refers to (absent in checkpoints written before it was recorded).
    #[serde(default)]
    pub data: Option<DataIdentity>,
    /// Processes of the data-parallel run that wrote it (absent: 1, or written before it was recorded).
    #[serde(default)]
    pub ranks: Option<usize>,
    /// The f16 loss scale to continue with (absent: the run does not compute in f16, or was written before).
    #[serde(default)]
    pub loss_scale: Option<crate::step::LossScale>,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {reason}")]
    Io { path: String, reason: String },
    #[error(transparent)]
    Weights(#[from] crate::weights::WeightsError),
    #[error("refusing to write checkpoint step {step}: the optimizer state `{tensor}` holds {value}")]
    NonFiniteOptimizer { step: u64, tensor: String, value: f32 },
    #[error("{run}: no usable checkpoint ({reasons})")]
    NoneUsable { run: String, reasons: String },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> CheckpointError + '_ {
    move |e| CheckpointError::Io { path: path.display().to_string(), reason: e.to_string() }
}

pub fn checkpoints_dir(run: &Path) -> PathBuf {
    run.join("checkpoints")
}

fn step_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// The step of a final checkpoint folder name (`step-00000012` -> 12); `None` for anything else.
fn parse_step(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    (digits.len() == 8 && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok())?
}

/// The folder [`save`] writes the checkpoint of `step` to.
pub fn dir_of(run: &Path, step: u64) -> PathBuf {
    checkpoints_dir(run).join(step_name(step))
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
    recover(run);
    let optim_bytes = optim.into_bytes().map_err(|e| CheckpointError::Io {
        path: root.display().to_string(),
        reason: format!("optimizer state: {e}"),
    })?;
    check_optimizer_finite(&optim_bytes, model, state.step)?;

    let name = step_name(state.step);
    let tmp = root.join(format!(".{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir(&tmp).map_err(io(&tmp))?;
    let written = (|| {
        // save_model refuses non-finite weights, naming the tensor.
        save_model(&tmp.join(MODEL_FILE), model, cfg)?;
        atomic_write(&tmp.join(OPTIMIZER_FILE), &optim_bytes).map_err(io(&tmp))?;
        let json = serde_json::to_vec_pretty(state).expect("state serialises");
        atomic_write(&tmp.join(STATE_FILE), &json).map_err(io(&tmp))?;
        write_checksums(&tmp)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }

    let dir = root.join(&name);
    let old = root.join(format!(".{name}.old"));
    if dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(io(&old))?;
        }
        std::fs::rename(&dir, &old).map_err(io(&dir))?;
    }
    std::fs::rename(&tmp, &dir).map_err(io(&dir))?;
    sync_parent(&dir).map_err(io(&dir))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(io(&old))?;
    }
    for stale in list(run).into_iter().rev().skip(keep) {
        std::fs::remove_dir_all(&stale).map_err(io(&stale))?;
    }
    Ok(dir)
}

/// Finishes or undoes what a crash during [`save`] left behind, and removes stale temporary folders:
/// a `.step-N.tmp` or `.step-N.old` that verifies and has no `step-N` becomes `step-N` (the crash came
/// between the renames); every other one is deleted. Returns what it did, for the log.
pub fn recover(run: &Path) -> Vec<String> {
    let root = checkpoints_dir(run);
    let Ok(entries) = std::fs::read_dir(&root) else { return vec![] };
    let mut hidden: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(".step-") && (n.ends_with(".tmp") || n.ends_with(".old")))
        })
        .collect();
    // Every `.tmp` (a new copy) before any `.old` (the copy it replaces): a verified new copy wins.
    hidden.sort_by_key(|p| (p.extension().is_some_and(|e| e == "old"), p.clone()));
    let mut notes = vec![];
    for path in hidden {
        let file = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let final_name = file.trim_start_matches('.').trim_end_matches(".tmp").trim_end_matches(".old").to_string();
        let target = root.join(&final_name);
        let promotable = parse_step(&final_name).is_some() && !target.exists() && verify(&path).is_ok();
        if promotable && std::fs::rename(&path, &target).is_ok() {
            let _ = sync_parent(&target);
            notes.push(format!("recovered checkpoint {final_name} from an interrupted write ({file})"));
            continue;
        }
        if std::fs::remove_dir_all(&path).is_ok() {
            notes.push(format!("removed {file}, left by an interrupted checkpoint write"));
        }
    }
    notes
}

/// Complete checkpoints of a run, oldest first (temporary, corrupt and rejected folders are not listed).
pub fn list(run: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(checkpoints_dir(run)) else { return vec![] };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).and_then(parse_step).is_some())
        .filter(|p| p.join(STATE_FILE).is_file())
        .collect();
    dirs.sort();
    dirs
}

/// The newest checkpoint that verifies against its checksums, with a line for each newer one skipped.
pub fn latest_intact(run: &Path) -> (Option<PathBuf>, Vec<String>) {
    let mut notes = vec![];
    for dir in list(run).into_iter().rev() {
        match verify(&dir) {
            Ok(()) => return (Some(dir), notes),
            Err(reason) => notes.push(skip_note(&dir, &reason)),
        }
    }
    (None, notes)
}

fn skip_note(dir: &Path, reason: &str) -> String {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    format!("skipping checkpoint {name}: {reason}")
}

/// A loaded checkpoint.
pub struct Loaded {
    pub dir: PathBuf,
    pub model: Ov3,
    pub cfg: ModelConfig,
    pub optim: ModuleOptimizer,
    pub state: TrainState,
    /// One line per newer checkpoint that was corrupt or partial and skipped.
    pub notes: Vec<String>,
}

/// The newest checkpoint of `run` that verifies and loads. A newer one that fails is renamed
/// `step-N.corrupt` and named in [`Loaded::notes`]; none usable is an error listing every reason.
pub fn load_latest(
    run: &Path,
    device: &Device,
    make_optim: impl Fn(&Ov3) -> ModuleOptimizer,
) -> Result<Loaded, CheckpointError> {
    let mut notes = vec![];
    for dir in list(run).into_iter().rev() {
        let loaded = verify(&dir).and_then(|()| load(&dir, device, &make_optim).map_err(|e| e.to_string()));
        match loaded {
            Ok((model, cfg, optim, state)) => return Ok(Loaded { dir, model, cfg, optim, state, notes }),
            Err(reason) => {
                let mut note = skip_note(&dir, &reason);
                let aside = dir.with_file_name(format!(
                    "{}.corrupt",
                    dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
                ));
                if !aside.exists() && std::fs::rename(&dir, &aside).is_ok() {
                    note.push_str(&format!(" (moved to {})", aside.display()));
                }
                notes.push(note);
            }
        }
    }
    let reasons = if notes.is_empty() { "the run holds none".to_string() } else { notes.join("; ") };
    Err(CheckpointError::NoneUsable { run: run.display().to_string(), reasons })
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

/// Moves a checkpoint aside as `step-N.diverged` (the weights of a step whose loss was not finite), so that
/// a resume continues from the one before. Returns the new path.
pub fn reject(dir: &Path) -> std::io::Result<PathBuf> {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let aside = dir.with_file_name(format!("{name}.diverged"));
    if aside.exists() {
        std::fs::remove_dir_all(&aside)?;
    }
    std::fs::rename(dir, &aside)?;
    sync_parent(&aside)?;
    Ok(aside)
}

/// `{file: [length, crc32]}` of the three checkpoint files.
type Checksums = BTreeMap<String, (u64, u32)>;

fn checksum(path: &Path) -> std::io::Result<(u64, u32)> {
    let bytes = std::fs::read(path)?;
    Ok((bytes.len() as u64, crc32fast::hash(&bytes)))
}

fn write_checksums(dir: &Path) -> Result<(), CheckpointError> {
    let mut sums = Checksums::new();
    for file in FILES {
        let path = dir.join(file);
        sums.insert(file.to_string(), checksum(&path).map_err(io(&path))?);
    }
    let json = serde_json::to_vec_pretty(&sums).expect("checksums serialise");
    atomic_write(&dir.join(CHECKSUMS_FILE), &json).map_err(io(dir))
}

/// Checks every file of a checkpoint folder against `checksums.json`. Folders written before checksums
/// existed only need their three files present.
pub fn verify(dir: &Path) -> Result<(), String> {
    let sums_path = dir.join(CHECKSUMS_FILE);
    let sums: Option<Checksums> = match std::fs::read(&sums_path) {
        Ok(bytes) => Some(serde_json::from_slice(&bytes).map_err(|e| format!("{CHECKSUMS_FILE} unreadable: {e}"))?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(format!("{CHECKSUMS_FILE}: {e}")),
    };
    for file in FILES {
        let path = dir.join(file);
        match &sums {
            None if path.is_file() => {}
            None => return Err(format!("{file} is missing")),
            Some(sums) => {
                let expected = sums.get(file).ok_or_else(|| format!("{CHECKSUMS_FILE} does not list {file}"))?;
                let found = checksum(&path).map_err(|e| format!("{file}: {e}"))?;
                if found.0 != expected.0 {
                    return Err(format!(
                        "{file} is {} bytes, {} when written (truncated or replaced)",
                        found.0, expected.0
                    ));
                }
                if found.1 != expected.1 {
                    return Err(format!("{file} does not match its checksum (corrupt)"));
                }
            }
        }
    }
    Ok(())
}

/// Refuses an optimizer state holding a NaN or an infinity, naming the parameter it belongs to.
fn check_optimizer_finite(bytes: &Bytes, model: &Ov3, step: u64) -> Result<(), CheckpointError> {
    let bad = |reason: String| CheckpointError::Io { path: OPTIMIZER_FILE.into(), reason };
    let reader = burn_pack::Reader::from_bytes(bytes.clone()).map_err(|e| bad(e.to_string()))?;
    let names: BTreeMap<u64, String> = param_ids(model).into_iter().map(|(name, id)| (id, name)).collect();
    for tensor in reader.into_tensors().map_err(|e| bad(e.to_string()))? {
        let (name, dtype, _, param, data) = tensor.into_parts().map_err(|e| bad(e.to_string()))?;
        let values: Vec<f32> = match dtype {
            burn_pack::DType::F32 => {
                data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
            }
            burn_pack::DType::F16 => {
                data.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
            }
            burn_pack::DType::BF16 => {
                data.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
            }
            _ => continue,
        };
        if let Some(value) = values.into_iter().find(|v| !v.is_finite()) {
            let field = name.split_once('.').map_or(name.as_str(), |(_, f)| f);
            let tensor = match param.and_then(|id| names.get(&id)) {
                Some(param) => format!("{param} ({field})"),
                None => name.clone(),
            };
            return Err(CheckpointError::NonFiniteOptimizer { step, tensor, value });
        }
    }
    Ok(())
}
