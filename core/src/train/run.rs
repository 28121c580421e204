//! The training loop. One function, [`train`], top to bottom: prepare the run folder (or resume it), then
//! for every stage stream batches, step, log, evaluate and checkpoint.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::module::Module;
use burn::optim::ModuleOptimizer;
use burn::tensor::Device;

use super::checkpoint::{self, CheckpointError, TrainState};
use super::config::{StageConfig, TrainConfig};
use super::log::{MetricsLog, Record, StepRecord};
use super::prefetch::{Inputs, spawn_inputs};
use super::schedule::learning_rate;
use crate::config::ModelConfig;
use crate::data::decode::DecodeLimits;
use crate::data::pipeline::{Augment, HostBatch, LoaderConfig, Position, spawn_loader};
use crate::data::skips::SkipCounts;
use crate::data::source::{DataError, DataIdentity, Source, Spec};
use crate::eval::{EvalReport, EvalSet, evaluate};
use crate::image_io::{grid, save_png};
use crate::losses::Perceptual;
use crate::lpips::Lpips;
use crate::model::{Frozen, Ov3};
use crate::model_file::load_model;
use crate::optim::adamw;
use crate::parallel::{Group, GroupExt};
use crate::step::{LossScale, StepError, StepSpec, Stepped, train_step};
use crate::tokenizer::Tokenizer;
use crate::vae::Vae;

pub const CONFIG_FILE: &str = "config.toml";
pub const REPORT_FILE: &str = "eval.json";
/// Examples shown in a reconstruction grid.
const GRID_ROWS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Weights(#[from] crate::weights::WeightsError),
    #[error("held-out evaluation: {0}")]
    Evaluation(#[from] crate::metrics::NonFiniteImage),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error(
        "step {step}: {what}; the run stopped before saving it. {checkpoint} Continue at a lower learning rate \
         with `ov3 train --out {run} --resume --lr-scale 0.5`, or check the data"
    )]
    NonFinite { step: u64, what: String, run: String, checkpoint: String },
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io { path: path.display().to_string(), source }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Finished {
        step: u64,
        /// The final held-out evaluation (rank 0 of a data-parallel run evaluates; the others get `None`).
        report: Option<Box<EvalReport>>,
    },
    /// Stopped on request (Ctrl-C); a checkpoint at `step` holds everything to resume.
    Interrupted { step: u64, checkpoint: PathBuf },
}

/// What the trainer reports while it runs (the CLI draws a progress bar from it).
pub trait Observer {
    fn started(&mut self, total_steps: u64, at_step: u64);
    fn stage(&mut self, index: usize, stage: &StageConfig);
    fn step(&mut self, record: &StepRecord);
    fn evaluated(&mut self, step: u64, report: &EvalReport);
    fn note(&mut self, message: &str);
}

/// Trains into `run` with `cfg` on `device` (an autodiff device). `resume` continues the latest checkpoint
/// of `run` (with the config saved there; a different `cfg` is refused). `stop` is polled every step.
///
/// As one rank of a data-parallel `group` (src/parallel.rs), every rank calls this with the same arguments
/// but its own device: each takes its share of every global batch, the step averages gradients over the
/// group, and only rank 0 writes to `run` (config, metrics, grids, evaluations, checkpoints).
pub fn train(
    run: &Path,
    cfg: &TrainConfig,
    resume: bool,
    device: &Device,
    group: &dyn Group,
    stop: &AtomicBool,
    observer: &mut dyn Observer,
) -> Result<Outcome, TrainError> {
    check_config(cfg, group)?;
    let writer = group.is_writer();
    let tokenizer = cfg.tokenizer().map_err(TrainError::Refused)?;
    let vae = Arc::new(Vae::load_or_embedded(cfg.vae.as_deref().map(Path::new), device)?);
    let model_cfg = ModelConfig { vae: Some(vae.record()), ..cfg.model_config(&tokenizer) };
    let source = Arc::new(Source::open(&Spec::parse(&cfg.data)?)?);
    let prepared = writer_first(group, |writer| {
        let ranks = (writer, group.size());
        prepare_run(run, cfg, &model_cfg, &tokenizer, resume || !writer, source.identity(), device, ranks)
    })?;
    let (mut optim, mut state) = (prepared.optim, prepared.state);
    cfg.precision.check(device).map_err(TrainError::Refused)?;
    state.loss_scale = LossScale::continued(cfg.precision, state.loss_scale);
    let mut model = prepared.model.with_attention(cfg.attention).with_precision(cfg.precision);
    let mut log = open_log(run, writer, resume, state.step, prepared.notes, prepared.changes, observer)?;

    let eval_vae = vae.valid();
    observer.note(&format!(
        "training on {} ({} items) with the {} autoencoder; evaluating on {}",
        source.name,
        source.len(),
        vae.source,
        cfg.eval_data
    ));
    let lpips = load_lpips(cfg, device, observer)?;
    let eval_lpips = lpips.as_ref().map(Module::valid);
    observer.started(cfg.total_steps(), state.step);

    let total = cfg.total_steps();
    let mut eval_sets = vec![];
    let mut report = None;
    while state.step < total {
        let (index, in_stage) = cfg.stage_at(state.step);
        let stage = &cfg.stages[index];
        observer.stage(index, stage);
        if let Some(cache) = &source.cache {
            cache.check(&vae, stage.resolution).map_err(TrainError::Refused)?;
            observer.note(&cache_crops_note(&cache.manifest, stage));
        }
        // A stage starts its data stream at the beginning; a resumed one where its checkpoint left it.
        let start = if in_stage == 0 { Position::default() } else { state.position };
        let inputs = Inputs {
            vae: vae.clone(),
            space: model_cfg.input_space,
            cached: source.cache.as_ref().map(|c| c.manifest.latent_shape),
            context_length: model_cfg.context_length,
            tokenizer: model.tokenizer.clone(),
            device: device.clone(),
            share: (group.rank(), group.size()),
        };
        let batches = spawn_inputs(spawn_loader(source.clone(), loader_config(cfg, index), start), inputs);
        let perceptual = lpips.as_ref().filter(|_| stage.lambda > 0.0).map(|l| l as &dyn Perceptual);
        // LPIPS compares pixels: it needs the decoder pass, which brings the pixel L1 along.
        let decode = stage.pixel_loss || perceptual.is_some();
        let frozen = Frozen { vae_decoder: decode.then_some(&*vae as _), perceptual };
        let stage_end = state.step - in_stage + stage.steps;
        let mut epoch_skips = (start.epoch, SkipCounts::default());
        let mut timer = Instant::now();

        while state.step < stage_end {
            // Every rank stops at the same step (a signal may reach them at different times).
            if group.any(stop.load(Ordering::SeqCst)) {
                let dir = checkpoint::dir_of(run, state.step);
                if writer {
                    checkpoint::save(run, &model, &model_cfg, &optim, &state, cfg.keep_checkpoints)
                        .map_err(|e| save_failed(run, state.step, e))?;
                }
                group.wait_for_all();
                return Ok(Outcome::Interrupted { step: state.step, checkpoint: dir });
            }
            let spec = step_spec(cfg, index, stage_end, &state, group.rank(), frozen);
            let step = state.step;
            let stepped = train_step(model, &mut optim, &spec, group, || {
                let (host, batch) = batches.recv().map_err(|_| DataError::Source {
                    path: source.name.clone(),
                    reason: "the data loader stopped".into(),
                })??;
                count_skips(&host, &mut epoch_skips, step, &mut log, observer, run)?;
                state.position = host.next;
                Ok(batch)
            });
            let Stepped { model: next, record: terms, loss_scale } = match stepped {
                Ok(s) => s,
                Err(StepError::Batch(e)) => return Err(e),
                Err(StepError::NonFinite(what)) => return Err(diverged(run, state.step, what, writer)),
            };
            model = next;
            state.step += 1;
            state.loss_scale = Some(loss_scale).filter(|s| s.dynamic);

            let seconds = timer.elapsed().as_secs_f64();
            timer = Instant::now();
            let record = StepRecord {
                step: state.step,
                stage: stage.name.clone(),
                resolution: stage.resolution,
                lr: spec.lr,
                images_per_s: stage.effective_batch() as f64 / seconds.max(1e-9),
                ..terms
            };
            observer.step(&record);
            if state.step % cfg.log_every == 0 || state.step == stage_end {
                log.append(&Record::Step(record)).map_err(io_err(log.path()))?;
            }
            let last = state.step == total;
            // Rank 0 evaluates and checkpoints; the others wait for it at the next step's `group.any`.
            if writer && (last || (cfg.eval_every > 0 && state.step % cfg.eval_every == 0)) {
                // Periodic evaluations use `eval_size` images, the final one the whole held-out set.
                let size = if last { usize::MAX } else { cfg.eval_size };
                let set = eval_set(&mut eval_sets, &cfg.eval_data, stage.resolution, size)?;
                let r = evaluate_and_draw(
                    run,
                    &model,
                    &model_cfg,
                    (&eval_vae, eval_lpips.as_ref()),
                    set,
                    state.step,
                    stage.batch,
                    device,
                )?;
                observer.evaluated(state.step, &r);
                log.append(&Record::Eval { step: state.step, report: r.clone() }).map_err(io_err(log.path()))?;
                report = Some(r);
            }
            if writer && (last || state.step % cfg.checkpoint_every == 0) {
                checkpoint::save(run, &model, &model_cfg, &optim, &state, cfg.keep_checkpoints)
                    .map_err(|e| save_failed(run, state.step, e))?;
            }
        }
    }
    if !writer {
        group.wait_for_all();
        return Ok(Outcome::Finished { step: state.step, report: None });
    }
    let report = match report {
        Some(r) => r,
        // Resumed from the final checkpoint: evaluate it once more so the caller gets the report.
        None => {
            let res = cfg.stages.last().map_or(128, |s| s.resolution);
            let set = eval_set(&mut eval_sets, &cfg.eval_data, res, usize::MAX)?;
            evaluate_and_draw(run, &model, &model_cfg, (&eval_vae, eval_lpips.as_ref()), set, state.step, 16, device)?
        }
    };
    let path = run.join(REPORT_FILE);
    crate::fsio::atomic_write(&path, &serde_json::to_vec_pretty(&report).expect("report serialises"))
        .map_err(io_err(&path))?;
    group.wait_for_all();
    Ok(Outcome::Finished { step: state.step, report: Some(Box::new(report)) })
}

/// The checks that need the process group: every stage's global batch divides among the ranks.
fn check_config(cfg: &TrainConfig, group: &dyn Group) -> Result<(), TrainError> {
    cfg.validate().map_err(TrainError::Refused)?;
    match cfg.stages.iter().find(|s| s.batch % group.size() != 0) {
        Some(s) => Err(TrainError::Refused(format!(
            "stage {}: batch {} is the global batch and must divide among {} processes",
            s.name,
            s.batch,
            group.size()
        ))),
        None => Ok(()),
    }
}

/// Stage `index`'s data loader: its batch, augmentation and a seed of its own.
fn loader_config(cfg: &TrainConfig, index: usize) -> LoaderConfig {
    let stage = &cfg.stages[index];
    LoaderConfig {
        batch: stage.batch,
        seed: cfg.seed.wrapping_add(index as u64),
        workers: cfg.workers,
        prefetch: 2 * stage.accumulate,
        augment: Augment {
            resolution: stage.resolution,
            random_crop: stage.random_crop,
            min_scale: 0.8,
            hflip: stage.hflip,
        },
        limits: DecodeLimits::default(),
    }
}

/// The LPIPS network when the config names its weights; without them a lambda > 0 is noted, not an error.
fn load_lpips(cfg: &TrainConfig, device: &Device, observer: &mut dyn Observer) -> Result<Option<Lpips>, TrainError> {
    let lpips = match (&cfg.lpips_trunk, &cfg.lpips_heads) {
        (Some(trunk), Some(heads)) => Some(Lpips::load(Path::new(trunk), Path::new(heads), device)?),
        _ => None,
    };
    if lpips.is_none() && cfg.stages.iter().any(|s| s.lambda > 0.0) {
        observer.note("no LPIPS weights given: the LPIPS term of eq. 4 is absent (lambda acts as 0)");
    }
    Ok(lpips)
}

/// The metrics log (rank 0's; the others discard), after telling the observer the preparation's notes and
/// recording the settings a resume changed.
fn open_log(
    run: &Path,
    writer: bool,
    resume: bool,
    step: u64,
    notes: Vec<String>,
    changes: Vec<String>,
    observer: &mut dyn Observer,
) -> Result<MetricsLog, TrainError> {
    let mut log = match writer {
        true => MetricsLog::open(run, resume.then_some(step)).map_err(io_err(run))?,
        false => MetricsLog::discard(run),
    };
    notes.iter().for_each(|n| observer.note(n));
    if !changes.is_empty() {
        observer.note(&format!("resuming with changed settings: {}", changes.join(", ")));
        log.append(&Record::Resume { step, changes }).map_err(io_err(log.path()))?;
    }
    Ok(log)
}

/// Rank 0 runs `f(true)` first (it creates, recovers or refuses the run folder); then the others run
/// `f(false)`, which reads what it left.
fn writer_first<T>(group: &dyn Group, f: impl Fn(bool) -> Result<T, TrainError>) -> Result<T, TrainError> {
    if group.is_writer() {
        let result = f(true);
        group.wait_for_all();
        result
    } else {
        group.wait_for_all();
        f(false)
    }
}

/// What [`prepare_run`] hands the loop: the model, optimizer and state to continue from, and what the
/// observer and the log should hear about.
struct Prepared {
    model: Ov3,
    optim: ModuleOptimizer,
    state: TrainState,
    /// Recovered or skipped checkpoints, a checkpoint without a data record.
    notes: Vec<String>,
    /// Settings changed on resume (`stages[0].lr: 0.001 -> 0.0005`).
    changes: Vec<String>,
}

/// A fresh run (refusing a folder that already holds one) or the newest intact checkpoint of an existing
/// one (refusing a config that differs from the one it was started with outside the resumable keys, and
/// data that changed). Only a `writer` (rank 0) creates, recovers or rewrites anything in `run`.
fn prepare_run(
    run: &Path,
    cfg: &TrainConfig,
    model_cfg: &ModelConfig,
    tokenizer: &Tokenizer,
    resume: bool,
    data: DataIdentity,
    device: &Device,
    (writer, ranks): (bool, usize),
) -> Result<Prepared, TrainError> {
    let config_path = run.join(CONFIG_FILE);
    let make_optim = |m: &Ov3| adamw(m, cfg.weight_decay as f32);
    if resume {
        let saved = std::fs::read_to_string(&config_path).map_err(io_err(&config_path))?;
        let saved = TrainConfig::from_toml(&saved)
            .map_err(|e| TrainError::Refused(format!("{}: {e}", config_path.display())))?;
        let changes = cfg.resume_changes(&saved).map_err(|difference| {
            TrainError::Refused(format!(
                "{} was started with a different config ({difference}); a resume may change only the learning-rate \
                 schedule and the logging/evaluation/checkpoint settings, and append stages; train into a new --out",
                run.display()
            ))
        })?;
        // The changed settings are kept only once the resume is accepted.
        let keep_changes = || match changes.is_empty() || !writer {
            true => Ok(()),
            false => crate::fsio::atomic_write(&config_path, cfg.to_toml().as_bytes()).map_err(io_err(&config_path)),
        };
        let mut notes = if writer { checkpoint::recover(run) } else { vec![] };
        if checkpoint::list(run).is_empty() {
            // Stopped (killed) before its first checkpoint: nothing to lose, so start it over.
            notes.push(format!("{} has no checkpoint yet: starting from step 0", run.display()));
            keep_changes()?;
            let (model, optim, state, init_notes) = fresh(cfg, model_cfg, tokenizer, data, device, ranks)?;
            notes.extend(init_notes);
            return Ok(Prepared { model, optim, state, notes, changes });
        }
        let loaded = checkpoint::load_latest(run, device, make_optim)?;
        notes.extend(loaded.notes);
        same_model(&loaded.dir, &loaded.cfg, &loaded.model, model_cfg, tokenizer, Weights::Checkpoint)?;
        let dir = &loaded.dir;
        match &loaded.state.data {
            Some(saved) if *saved != data => {
                return Err(TrainError::Refused(format!(
                    "{}: the run was trained on {saved}, but the data is now {data}: its saved position would \
                     continue over other images; restore the data or train into a new --out",
                    dir.display()
                )));
            }
            Some(_) => {}
            None => {
                notes.push(format!("{}: written before checkpoints recorded their data; not checked", dir.display()))
            }
        }
        let was = loaded.state.ranks.unwrap_or(1);
        if was != ranks {
            notes.push(format!(
                "{}: written by {was} process(es), continuing with {ranks}: the global batch and the data order are \
                 unchanged (every process assembles the same global batches); the noise draws of eq. 3 differ from \
                 an uninterrupted run",
                dir.display()
            ));
        }
        keep_changes()?;
        let state = TrainState { data: Some(data), ranks: Some(ranks), ..loaded.state };
        return Ok(Prepared { model: loaded.model, optim: loaded.optim, state, notes, changes });
    }
    if config_path.exists() || !checkpoint::list(run).is_empty() {
        return Err(TrainError::Refused(format!(
            "{} already holds a run; pass --resume to continue it or choose another --out",
            run.display()
        )));
    }
    // Before the folder exists: a refused init model leaves nothing behind that a corrected retry would trip on.
    let (model, optim, state, notes) = fresh(cfg, model_cfg, tokenizer, data, device, ranks)?;
    std::fs::create_dir_all(run).map_err(io_err(run))?;
    crate::fsio::atomic_write(&config_path, cfg.to_toml().as_bytes()).map_err(io_err(&config_path))?;
    Ok(Prepared { model, optim, state, notes, changes: vec![] })
}

/// A new model (seeded by the config, or the weights of its `init` file), its optimizer, step 0, and the
/// notes for the log (where an init model came from, and the VAE it leaves with `init_other_vae`).
fn fresh(
    cfg: &TrainConfig,
    model_cfg: &ModelConfig,
    tokenizer: &Tokenizer,
    data: DataIdentity,
    device: &Device,
    ranks: usize,
) -> Result<(Ov3, ModuleOptimizer, TrainState, Vec<String>), TrainError> {
    let mut notes = vec![];
    let model = match &cfg.init {
        None => {
            let mut model = crate::device::seeded(device, cfg.seed, || Ov3::new(model_cfg, device));
            model.tokenizer = tokenizer.clone();
            model
        }
        Some(path) => {
            let file = Path::new(path);
            let (mut model, mut saved) =
                load_model(file, device).map_err(|e| TrainError::Refused(format!("init: {e}")))?;
            notes.push(format!("initialised from {path} (fine-tuning; a fresh optimiser)"));
            if cfg.init_grow_decoder {
                let note;
                (model, note) = grow_decoder(file, model, &mut saved, model_cfg, cfg.seed, device)?;
                notes.push(note);
            }
            let what = Weights::InitModel { other_vae: cfg.init_other_vae };
            notes.extend(same_model(file, &saved, &model, model_cfg, tokenizer, what)?);
            model
        }
    };
    let optim = adamw(&model, cfg.weight_decay as f32);
    let position = Position::default();
    let state =
        TrainState { step: 0, position, seed: cfg.seed, data: Some(data), ranks: Some(ranks), loss_scale: None };
    Ok((model, optim, state, notes))
}

/// `init_grow_decoder`: the init model with its ViT decoder deepened to the config's (the added blocks start
/// as the identity: [`crate::model::vit::VitDecoder::grow`]), `saved` updated to match, and the note for the log.
/// Only depth may grow: another width or head count is refused, naming both decoders.
fn grow_decoder(
    file: &Path,
    model: Ov3,
    saved: &mut ModelConfig,
    model_cfg: &ModelConfig,
    seed: u64,
    device: &Device,
) -> Result<(Ov3, String), TrainError> {
    let (was, now) = (saved.decoder.clone(), model_cfg.decoder.clone());
    if was.width != now.width || was.heads != now.heads || now.depth < was.depth {
        return Err(TrainError::Refused(format!(
            "{}: init_grow_decoder adds blocks to the file's decoder at its width and heads: the file's decoder is \
             {} wide, {} deep, {} heads; the config's {} wide, {} deep, {} heads",
            file.display(),
            was.width,
            was.depth,
            was.heads,
            now.width,
            now.depth,
            now.heads
        )));
    }
    saved.decoder = now.clone();
    let decoder = crate::device::seeded(device, seed, || model.decoder.grow(model_cfg, device));
    let note = format!(
        "{}: decoder grown from {} to {} blocks (the added ones start as the identity)",
        file.display(),
        was.depth,
        now.depth
    );
    Ok((Ov3 { decoder, ..model }, note))
}

/// Which weights [`same_model`] checks: a checkpoint to resume, or an `init` model (which may move onto
/// another VAE when the config sets `init_other_vae`).
#[derive(Clone, Copy)]
enum Weights {
    Checkpoint,
    InitModel { other_vae: bool },
}

impl Weights {
    fn name(self) -> &'static str {
        match self {
            Weights::Checkpoint => "checkpoint",
            Weights::InitModel { .. } => "init model",
        }
    }
}

/// Refuses weights (a checkpoint to resume, an `init` model) trained with another VAE, another architecture
/// or another tokenizer than the config's, naming both. A file from before models recorded their VAE passes
/// that check (its next save records the config's). An init model with `init_other_vae` may have another
/// VAE, and any init model another noise bound `tau`: both are accepted and named in the notes returned.
fn same_model(
    file: &Path,
    saved: &ModelConfig,
    model: &Ov3,
    model_cfg: &ModelConfig,
    tokenizer: &Tokenizer,
    weights: Weights,
) -> Result<Vec<String>, TrainError> {
    let (file, what) = (file.display(), weights.name());
    let mut notes = vec![];
    if let (Some(saved), Some(now)) = (&saved.vae, &model_cfg.vae)
        && saved.identity != now.identity
    {
        let both = format!(
            "the {what} was trained with the VAE {} ({}, from {}), the config gives {} ({}, from {})",
            saved.kind, saved.identity, saved.source, now.kind, now.identity, now.source
        );
        let hint = match weights {
            Weights::InitModel { other_vae: true } => None,
            Weights::InitModel { other_vae: false } => Some(
                "; to move the model onto the config's autoencoder (worth it only when the two are related), set \
                 init_other_vae (--init-other-vae)",
            ),
            Weights::Checkpoint => Some(""),
        };
        if let Some(hint) = hint {
            return Err(TrainError::Refused(format!("{file}: {both}{hint}")));
        }
        notes.push(format!("{file}: {both}; moved onto the config's (init_other_vae)"));
    }
    // The noise bound of eq. 3 is a training setting, not architecture: a fine-tune may train at another one
    // (a resume continues its run's config, which may not change it).
    let mut saved = saved.clone();
    if matches!(weights, Weights::InitModel { .. }) && saved.tau != model_cfg.tau {
        notes.push(format!("{file}: trained at tau {}, fine-tuned at the config's tau {}", saved.tau, model_cfg.tau));
        saved.tau = model_cfg.tau;
    }
    let differences = model_differences(&saved, model_cfg);
    if !differences.is_empty() {
        let deeper = saved.decoder.width == model_cfg.decoder.width
            && saved.decoder.heads == model_cfg.decoder.heads
            && saved.decoder.depth < model_cfg.decoder.depth;
        let hint = match weights {
            Weights::InitModel { .. } if deeper => {
                "; its decoder can be deepened to the config's, the added blocks starting as the identity, with \
                 init_grow_decoder (--init-grow-decoder)"
            }
            _ => "",
        };
        return Err(TrainError::Refused(format!(
            "{file}: the {what}'s model is not the config's: {}{hint}",
            differences.join("; ")
        )));
    }
    if model.tokenizer.spec() != tokenizer.spec() {
        return Err(TrainError::Refused(format!(
            "{file}: the {what}'s tokenizer ({}) is not the config's ({})",
            model.tokenizer.describe(),
            tokenizer.describe()
        )));
    }
    Ok(notes)
}

/// Every model setting (VAE aside) in which `saved` differs from `now`, as `key: SAVED in the file, NOW in the
/// config` (`encoder: {"width":192,...} in the file, {...} in the config`).
fn model_differences(saved: &ModelConfig, now: &ModelConfig) -> Vec<String> {
    let fields = |c: &ModelConfig| match serde_json::to_value(ModelConfig { vae: None, ..c.clone() }) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    };
    let (a, b) = (fields(saved), fields(now));
    let show = |v: Option<&serde_json::Value>| v.map_or("(unset)".to_string(), |v| v.to_string());
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut differences: Vec<String> = keys
        .into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| format!("{k}: {} in the file, {} in the config", show(a.get(k)), show(b.get(k))))
        .collect();
    if differences.is_empty()
        && (ModelConfig { vae: None, ..saved.clone() }) != (ModelConfig { vae: None, ..now.clone() })
    {
        differences.push(format!("{saved:?} in the file, {now:?} in the config"));
    }
    differences
}

/// A failed [`checkpoint::save`] of `step`: non-finite weights or optimizer state (a step that diverged
/// before any loss showed it) stop the run like a NaN loss does; anything else is passed on.
fn save_failed(run: &Path, step: u64, e: CheckpointError) -> TrainError {
    use crate::weights::WeightsError;
    match e {
        CheckpointError::Weights(WeightsError::NonFinite { key, value, .. }) => {
            diverged(run, step, format!("the weight `{key}` is {value}"), true)
        }
        CheckpointError::NonFiniteOptimizer { tensor, value, .. } => {
            diverged(run, step, format!("the optimizer state of `{tensor}` is {value}"), true)
        }
        other => other.into(),
    }
}

/// The error for a run that diverged at `step`. A checkpoint of that very step holds the weights that gave
/// the non-finite value: it is moved aside, so that `--resume` continues from the one before.
fn diverged(run: &Path, step: u64, what: String, writer: bool) -> TrainError {
    // Only rank 0 of a data-parallel run touches the checkpoints; every rank gets the same error.
    let current = checkpoint::list(run).into_iter().filter(|_| writer).find(|d| d.ends_with(format!("step-{step:08}")));
    let rejected = current.map(|dir| checkpoint::reject(&dir));
    let checkpoint = match (rejected, checkpoint::latest_intact(run).0) {
        (Some(Err(e)), _) => format!("The checkpoint of step {step} could not be moved aside ({e})."),
        (Some(Ok(aside)), Some(last)) => {
            format!(
                "Its weights were checkpointed (moved to {}); the last good checkpoint is {}.",
                aside.display(),
                last.display()
            )
        }
        (Some(Ok(aside)), None) => {
            format!("Its weights were checkpointed (moved to {}); no earlier checkpoint.", aside.display())
        }
        (None, Some(last)) => format!("The last checkpoint, {}, is intact.", last.display()),
        (None, None) => "No checkpoint was written yet.".to_string(),
    };
    TrainError::NonFinite { step, what, run: run.display().to_string(), checkpoint }
}

/// What the step after `state` does, in stage `index` (which ends at step `stage_end`).
fn step_spec<'a>(
    cfg: &TrainConfig,
    index: usize,
    stage_end: u64,
    state: &TrainState,
    rank: usize,
    frozen: Frozen<'a>,
) -> StepSpec<'a> {
    let stage = &cfg.stages[index];
    StepSpec {
        weights: stage.loss_weights(cfg.objective),
        tau: cfg.tau,
        // Noise draws depend on (seed, rank, step) only: a resumed run draws what the straight one did.
        noise_seed: noise_seed(cfg.seed, rank, state.step),
        accumulate: stage.accumulate,
        lr: learning_rate(stage, state.step - (stage_end - stage.steps)),
        lr_decoders: stage.lr_decoders,
        clip: cfg.grad_clip,
        frozen,
        loss_scale: state.loss_scale.unwrap_or(LossScale::NONE),
    }
}

/// The device seed of `step` on `rank`: the noise of eq. 3 differs between ranks (each noises its own
/// share), and is the same as before for a single process (rank 0).
fn noise_seed(seed: u64, rank: usize, step: u64) -> u64 {
    let base = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(step);
    base ^ (rank as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)
}

/// Adds a batch's skips to its epoch's; when the stream enters a new epoch, the finished epoch's counts go
/// to the log and, if any, to the observer.
fn count_skips(
    host: &HostBatch,
    epoch: &mut (u64, SkipCounts),
    step: u64,
    log: &mut MetricsLog,
    observer: &mut dyn Observer,
    run: &Path,
) -> Result<(), TrainError> {
    if host.next.epoch != epoch.0 {
        let finished = std::mem::take(&mut epoch.1);
        if finished.total() > 0 {
            observer.note(&format!("epoch {}: skipped {}", epoch.0, finished.summary()));
        }
        log.append(&Record::Skips { step, epoch: epoch.0, counts: finished }).map_err(io_err(run))?;
        epoch.0 = host.next.epoch;
    }
    epoch.1.merge(&host.skips);
    Ok(())
}

/// The first `size` held-out examples at `resolution`, loaded once per (resolution, size).
fn eval_set<'a>(
    sets: &'a mut Vec<(u32, usize, EvalSet)>,
    spec: &str,
    resolution: u32,
    size: usize,
) -> Result<&'a EvalSet, TrainError> {
    if let Some(i) = sets.iter().position(|(r, n, _)| (*r, *n) == (resolution, size)) {
        return Ok(&sets[i].2);
    }
    sets.push((resolution, size, EvalSet::load(spec, resolution, size)?));
    Ok(&sets.last().expect("just pushed").2)
}

/// Evaluates a non-autodiff copy of the model and writes the reconstruction grid of this step.
#[allow(clippy::too_many_arguments)]
fn evaluate_and_draw(
    run: &Path,
    model: &Ov3,
    cfg: &ModelConfig,
    (vae, lpips): (&Vae, Option<&Lpips>),
    set: &EvalSet,
    step: u64,
    batch: usize,
    device: &Device,
) -> Result<EvalReport, TrainError> {
    let plain = device.clone().without_autodiff();
    let (report, outputs) = evaluate(&model.valid(), cfg, vae, lpips, set, batch, 4, &plain)?;
    let rows: Vec<Vec<_>> = (0..GRID_ROWS.min(set.len()))
        .map(|i| vec![&set.images[i], &outputs.vae_only[i], &outputs.reconstructions[i]])
        .collect();
    let dir = run.join("grids");
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let image = grid(&rows, 2);
    for name in [format!("step-{step:08}.png"), "latest.png".to_string()] {
        save_png(&image, &dir.join(name)).map_err(|e| TrainError::Io {
            path: dir.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        })?;
    }
    Ok(report)
}

/// What a stage trained from a latent cache gets instead of its own augmentation: the cache's fixed crops.
fn cache_crops_note(m: &crate::data::latent_cache::Manifest, stage: &StageConfig) -> String {
    let crops = match (m.crops, m.flip) {
        (0, false) => "center crops".to_string(),
        (0, true) => "center crops and their mirror images".to_string(),
        (k, _) => {
            let first = u64::from(m.first_crop);
            let range = match first {
                0 => String::new(),
                _ => format!(" (crops {first}-{} of each item's sequence)", first + u64::from(k) - 1),
            };
            format!("up to {k} random crops per item{range}, one drawn per visit")
        }
    };
    // Random crops are what a `--crops K` cache holds; flips are never applied to cached rows.
    let ignored = [(stage.random_crop && m.crops == 0, "random_crop"), (stage.hflip, "hflip")]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, key)| *key)
        .collect::<Vec<_>>();
    match ignored.is_empty() {
        true => format!("the latent cache holds {crops}"),
        false => format!("the latent cache holds {crops}; the stage's {} is not applied to it", ignored.join(" and ")),
    }
}
