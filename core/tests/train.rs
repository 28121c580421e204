//! The trainer: resume equivalence, non-finite losses, interrupted checkpoint writes, refused mismatches,
//! the weight-decay mask, the shipped demo recipe. All on the flex CPU backend with the tiny preset at
//! 32/48 px.

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Device, Tensor};
use ov3_core::eval::EvalReport;
use ov3_core::model_file::load_model;
use ov3_core::parallel::Single;
use ov3_core::params::named_values;
use ov3_core::train::checkpoint::{self, MODEL_FILE};
use ov3_core::train::log::{Record, StepRecord, read};
use ov3_core::train::{Observer, Outcome, StageConfig, TrainConfig, TrainError, train};
use ov3_core::{Ov3, Preset, optim};

/// Two short stages (32 px, then 48 px) so a resume also crosses a stage boundary.
fn config() -> TrainConfig {
    let text = r#"
        preset = "tiny"
        seed = 7
        data = "synthetic:40"
        eval_data = "synthetic:6:0:heldout"
        eval_size = 4
        log_every = 1
        eval_every = 0
        checkpoint_every = 2
        keep_checkpoints = 2
        [[stages]]
        name = "a"
        resolution = 32
        steps = 3
        batch = 4
        lr = 0.1
        warmup = 1
        [[stages]]
        name = "b"
        resolution = 48
        steps = 3
        batch = 3
        accumulate = 2
        lr = 0.1
        warmup = 1
        pixel_loss = false
    "#;
    TrainConfig::from_toml(text).expect("valid test config")
}

/// Requests a stop after step `at`, as Ctrl-C would, and keeps the trainer's notes.
struct StopAt<'a> {
    at: Option<u64>,
    stop: &'a AtomicBool,
    notes: Vec<String>,
}

impl Observer for StopAt<'_> {
    fn started(&mut self, _: u64, _: u64) {}
    fn stage(&mut self, _: usize, _: &StageConfig) {}
    fn step(&mut self, r: &StepRecord) {
        if Some(r.step) == self.at {
            self.stop.store(true, Ordering::SeqCst);
        }
    }
    fn evaluated(&mut self, _: u64, _: &EvalReport) {}
    fn note(&mut self, message: &str) {
        self.notes.push(message.to_string());
    }
}

/// The device RNG (initialisation, eq. 3 noise) is process-wide on flex: runs in parallel test threads
/// would re-seed each other's draws, so they take turns. So does every test that builds a model (`Ov3::new`
/// draws all its weights at once).
static ONE_RUN_AT_A_TIME: Mutex<()> = Mutex::new(());

fn turn() -> std::sync::MutexGuard<'static, ()> {
    ONE_RUN_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `load_model` on flex, in turn: filling a new model's parameters draws their (discarded) initial values.
fn load(path: &Path) -> (Ov3, ov3_core::ModelConfig) {
    let _turn = turn();
    load_model(path, &Device::flex()).expect("the model file loads")
}

fn run(dir: &Path, cfg: &TrainConfig, resume: bool, stop_at: Option<u64>) -> Result<Outcome, TrainError> {
    run_noted(dir, cfg, resume, stop_at).0
}

/// [`run`], with the notes the trainer gave its observer.
fn run_noted(
    dir: &Path,
    cfg: &TrainConfig,
    resume: bool,
    stop_at: Option<u64>,
) -> (Result<Outcome, TrainError>, Vec<String>) {
    let _turn = turn();
    let stop = AtomicBool::new(false);
    let mut observer = StopAt { at: stop_at, stop: &stop, notes: vec![] };
    let out = train(dir, cfg, resume, &Device::flex().autodiff(), &Single, &stop, &mut observer);
    (out, observer.notes)
}

fn steps(dir: &Path) -> Vec<StepRecord> {
    read(&dir.join("metrics.jsonl"))
        .expect("metrics")
        .into_iter()
        .filter_map(|r| if let Record::Step(s) = r { Some(s) } else { None })
        .collect()
}

fn final_weights(dir: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let last = checkpoint::latest_intact(dir).0.expect("a checkpoint");
    named_values(&load(&last.join(MODEL_FILE)).0)
}

#[test]
fn resume_after_interrupt_matches_a_straight_run() {
    let tmp = ov3_core::fsio::ScratchDir::new().expect("tmp");
    let (straight, split) = (tmp.path().join("straight"), tmp.path().join("split"));
    let cfg = config();
    assert!(matches!(run(&straight, &cfg, false, None), Ok(Outcome::Finished { step: 6, .. })));
    match run(&split, &cfg, false, Some(4)) {
        Ok(Outcome::Interrupted { step: 4, checkpoint }) => assert!(checkpoint.ends_with("step-00000004")),
        other => panic!("expected an interruption at step 4, got {other:?}"),
    }
    // A crash after the checkpoint would leave later lines in the log; resume must drop them.
    let resumed = run(&split, &cfg, true, None).expect("resume");
    assert!(matches!(resumed, Outcome::Finished { step: 6, .. }));

    // Same steps, same losses, same final weights. Tolerance: flex reductions are deterministic for one
    // shape, so only float formatting differs; 1e-5 relative leaves room for thread-count changes.
    let (a, b) = (steps(&straight), steps(&split));
    assert_eq!(a.iter().map(|r| r.step).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(b.iter().map(|r| r.step).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5, 6]);
    for (x, y) in a.iter().zip(&b) {
        for ((name, u), (_, v)) in x.terms().into_iter().zip(y.terms()) {
            assert!((u - v).abs() <= 1e-5 * u.abs().max(1.0), "step {} {name}: {u} vs {v}", x.step);
        }
        assert_eq!(x.lr, y.lr);
    }
    for ((name, _, u), (_, _, v)) in final_weights(&straight).iter().zip(final_weights(&split)) {
        let worst = u.iter().zip(&v).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-5, "{name}: weights differ by {worst}");
    }
}

/// A finished run trained further: a resume whose config appends a stage continues from the last
/// checkpoint and ends with the weights of a run that had the extra stage from the start (each stage has its
/// own schedule, seed and data stream). The added stage is logged; removing a stage is refused.
#[test]
fn appending_a_stage_to_a_finished_run_matches_a_straight_run_with_it() {
    let tmp = ov3_core::fsio::ScratchDir::new().expect("tmp");
    let (straight, extended) = (tmp.path().join("straight"), tmp.path().join("extended"));
    let short = config();
    let mut long = short.clone();
    let mut more = long.stages[1].clone();
    (more.name, more.steps, more.lr) = ("c".into(), 2, 0.05);
    long.stages.push(more);
    assert!(matches!(run(&straight, &long, false, None), Ok(Outcome::Finished { step: 8, .. })));
    assert!(matches!(run(&extended, &short, false, None), Ok(Outcome::Finished { step: 6, .. })));
    let (resumed, notes) = run_noted(&extended, &long, true, None);
    assert!(matches!(resumed, Ok(Outcome::Finished { step: 8, .. })), "{resumed:?}");
    assert!(notes.iter().any(|n| n.contains("stages[2]: added")), "{notes:?}");

    let (a, b) = (steps(&straight), steps(&extended));
    assert_eq!(b.iter().map(|r| r.step).collect::<Vec<_>>(), (1..=8).collect::<Vec<_>>());
    for (x, y) in a.iter().zip(&b) {
        for ((name, u), (_, v)) in x.terms().into_iter().zip(y.terms()) {
            assert!((u - v).abs() <= 1e-5 * u.abs().max(1.0), "step {} {name}: {u} vs {v}", x.step);
        }
    }
    for ((name, _, u), (_, _, v)) in final_weights(&straight).iter().zip(final_weights(&extended)) {
        let worst = u.iter().zip(&v).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-5, "{name}: weights differ by {worst}");
    }
    let err = run(&extended, &short, true, None).expect_err("a resume that drops a stage");
    assert!(err.to_string().contains("not removed"), "{err}");
}

/// The largest |weight| of a checkpoint.
fn max_abs_weight(dir: &Path) -> f32 {
    named_values(&load(&dir.join(MODEL_FILE)).0)
        .iter()
        .flat_map(|(_, _, v)| v.iter().map(|x| x.abs()))
        .fold(0f32, f32::max)
}

/// A learning rate that blows the weights up in the second stage. The step that does it has a finite loss
/// (it was computed before the step), so a checkpoint of it used to be written and kept: ~1e30 weights
/// that `--resume` would continue from. Now the checkpoint of the step whose weights give the non-finite
/// loss is moved aside, every kept checkpoint holds the sane weights of stage one, and a resume with a
/// lower learning rate (a resumable change, logged) finishes the run.
#[test]
fn a_diverged_step_is_not_resumed_from_and_a_lower_lr_continues_the_run() {
    let tmp = ov3_core::fsio::ScratchDir::new().expect("tmp");
    let mut cfg = config();
    cfg.checkpoint_every = 1;
    cfg.keep_checkpoints = 10;
    cfg.grad_clip = 1e30; // let the absurd learning rate through
    (cfg.stages[1].lr, cfg.stages[1].warmup) = (1e32, 0);
    let (out, _) = run_noted(tmp.path(), &cfg, false, None);
    let step = match out {
        Err(TrainError::NonFinite { step, what, .. }) => {
            assert!(what.contains("NaN") || what.contains("inf"), "{what}");
            step
        }
        other => panic!("expected a non-finite stop, got {other:?}"),
    };
    assert!(step >= 3, "stage one (steps 1-3) has a sane learning rate; diverged at {step}");
    let (last, _) = checkpoint::latest_intact(tmp.path());
    let last = last.expect("stage one's checkpoints are kept");
    let n: u64 = last.file_name().unwrap().to_str().unwrap()[5..].parse().unwrap();
    assert!(n < step, "checkpoint {n} is the step that gave the non-finite loss ({step})");
    for dir in checkpoint::list(tmp.path()) {
        let worst = max_abs_weight(&dir);
        assert!(worst < 1e3, "{} holds |w| up to {worst}", dir.display());
    }

    let mut lower = cfg.clone();
    lower.stages[1].lr = 0.1;
    let (resumed, notes) = run_noted(tmp.path(), &lower, true, None);
    assert!(matches!(resumed, Ok(Outcome::Finished { step: 6, .. })), "{resumed:?}");
    assert!(notes.iter().any(|n| n.contains("stages[1].lr")), "{notes:?}");
    let logged = read(&tmp.path().join("metrics.jsonl")).expect("metrics");
    assert!(
        logged
            .iter()
            .any(|r| matches!(r, Record::Resume { changes, .. } if changes.iter().any(|c| c.contains("stages[1].lr"))))
    );
    // What a resume may not change is still refused, naming the key.
    let mut other = lower.clone();
    other.stages[1].batch = 5;
    let err = run(tmp.path(), &other, true, None).expect_err("a resume that changes the batch");
    assert!(err.to_string().contains("stages[1].batch"), "{err}");
}

/// A checkpoint is never written with a NaN weight or optimizer state: the write is refused, naming the
/// tensor, and nothing appears under the step's name.
#[test]
fn a_non_finite_weight_is_never_checkpointed() {
    let _turn = turn();
    use burn::module::ModuleMapper;
    let tmp = ov3_core::fsio::ScratchDir::new().expect("tmp");
    let device = Device::flex();
    let model_cfg = Preset::Tiny.config();
    let model = Ov3::new(&model_cfg, &device);
    let optim = optim::adamw(&model, 0.05);
    struct Poison(bool);
    impl ModuleMapper for Poison {
        fn map_float<const D: usize>(&mut self, p: Param<Tensor<D>>) -> Param<Tensor<D>> {
            if std::mem::replace(&mut self.0, false) {
                return p.map(|t| t.mul_scalar(f32::NAN));
            }
            p
        }
    }
    let poisoned = model.map(&mut Poison(true));
    let state = checkpoint::TrainState {
        step: 3,
        position: Default::default(),
        seed: 0,
        data: None,
        ranks: None,
        loss_scale: None,
    };
    let err = checkpoint::save(tmp.path(), &poisoned, &model_cfg, &optim, &state, 2).expect_err("NaN weight");
    let first = named_values(&poisoned).into_iter().find(|(_, _, v)| v.iter().any(|x| x.is_nan())).unwrap().0;
    assert!(err.to_string().contains(&first), "the message names `{first}`: {err}");
    assert!(checkpoint::list(tmp.path()).is_empty());
}

/// A model file with a NaN weight is refused when loaded, naming the tensor (it used to load and give NaN
/// reconstructions and captions).
#[test]
fn a_model_file_with_a_nan_weight_is_refused_by_name() {
    let _turn = turn();
    let tmp = ov3_core::fsio::ScratchDir::new().expect("tmp");
    let device = Device::flex();
    let cfg = Preset::Tiny.config();
    let good = tmp.path().join("good.safetensors");
    ov3_core::model_file::save_model(&good, &Ov3::new(&cfg, &device), &cfg).expect("save");
    let bytes = std::fs::read(&good).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let victim = "decoder.blocks.0.mlp.fc1.weight";
    let mut data: Vec<(String, Vec<u8>, Vec<usize>)> = vec![];
    for (name, view) in file.tensors() {
        let mut raw = view.data().to_vec();
        if name == victim {
            raw[40..44].copy_from_slice(&f32::NAN.to_le_bytes());
        }
        data.push((name, raw, view.shape().to_vec()));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, d, s)| {
            (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d).unwrap())
        })
        .collect();
    let bad = tmp.path().join("bad.safetensors");
    std::fs::write(&bad, safetensors::serialize(views, meta.metadata().clone()).unwrap()).unwrap();
    let err = load_model(&bad, &device).err().expect("a NaN weight is refused").to_string();
    assert!(err.contains(victim) && err.contains("NaN"), "{err}");
}

/// A corrupt newest checkpoint (one flipped byte in the weights, which still parse) and a partial one
/// (truncated) are skipped on resume with a note, and the run continues from the newest intact one.
#[test]
fn resume_skips_a_corrupt_or_partial_latest_checkpoint() {
    let tmp = ov3_core::fsio::ScratchDir::new().expect("tmp");
    let mut cfg = config();
    cfg.keep_checkpoints = 3;
    run(tmp.path(), &cfg, false, Some(4)).expect("interrupted run");
    let root = checkpoint::checkpoints_dir(tmp.path());
    // step 4: flip a byte deep in the tensor data.
    let model4 = root.join("step-00000004").join(MODEL_FILE);
    let mut bytes = std::fs::read(&model4).unwrap();
    let at = bytes.len() - 1000;
    bytes[at] ^= 0x40;
    std::fs::write(&model4, bytes).unwrap();
    let (out, notes) = run_noted(tmp.path(), &cfg, true, Some(4));
    assert!(matches!(out, Ok(Outcome::Interrupted { step: 4, .. })), "{out:?}");
    assert!(notes.iter().any(|n| n.contains("step-00000004") && n.contains("checksum")), "{notes:?}");
    assert!(root.join("step-00000004.corrupt").exists());
    // The new step 4 is intact; truncate its optimizer state: a partial checkpoint.
    let optim4 = root.join("step-00000004").join(checkpoint::OPTIMIZER_FILE);
    let len = std::fs::metadata(&optim4).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&optim4).unwrap().set_len(len / 2).unwrap();
    let (out, notes) = run_noted(tmp.path(), &cfg, true, None);
    assert!(matches!(out, Ok(Outcome::Finished { step: 6, .. })), "{out:?}");
    assert!(notes.iter().any(|n| n.contains("step-00000004") && n.contains("truncated")), "{notes:?}");
    // `--run` users (eval, reconstruct) get the newest intact checkpoint too.
    assert!(checkpoint::latest_intact(tmp.path()).0.unwrap().ends_with("step-00000006"));
}

/// What a kill between the two renames of a re-save leaves — the new copy complete under `.step-N.tmp`,
/// no `step-N` — is recovered on resume instead of losing the step, and junk temporary folders of
/// interrupted writes are removed.
#[test]
fn resume_recovers_a_checkpoint_caught_between_renames_and_cleans_temporary_folders() {
    let tmp = ov3_core::fsio::ScratchDir::new().expect("tmp");
    let cfg = config();
    run(tmp.path(), &cfg, false, Some(4)).expect("interrupted run");
    let root = checkpoint::checkpoints_dir(tmp.path());
    std::fs::rename(root.join("step-00000004"), root.join(".step-00000004.tmp")).unwrap();
    let junk = root.join(".step-00000003.tmp");
    std::fs::create_dir_all(&junk).unwrap();
    std::fs::write(junk.join(MODEL_FILE), b"half a header").unwrap();
    let old = root.join(".step-00000001.old");
    std::fs::create_dir_all(&old).unwrap();
    let (out, notes) = run_noted(tmp.path(), &cfg, true, Some(5));
    assert!(matches!(out, Ok(Outcome::Interrupted { step: 5, .. })), "{out:?}");
    assert!(notes.iter().any(|n| n.contains("recovered checkpoint step-00000004")), "{notes:?}");
    assert!(!junk.exists() && !old.exists(), "stale temporary folders are removed");
    // It continued from step 4, not step 2: only step 5 was trained in that session.
    let logged: Vec<u64> = steps(tmp.path()).iter().map(|r| r.step).collect();
    assert_eq!(logged, vec![1, 2, 3, 4, 5]);
}

/// The data a run was trained on is recorded in its checkpoints: a folder whose contents changed under
/// the same path is refused on resume (its saved position would now point at other images).
#[test]
fn resume_refuses_data_that_changed_under_the_same_path() {
    let tmp = ov3_core::fsio::ScratchDir::new().expect("tmp");
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let write = |i: u32| {
        let img = image::RgbImage::from_fn(32, 32, |x, y| image::Rgb([(x * 8) as u8, (y * 8) as u8, (i * 40) as u8]));
        img.save(data.join(format!("{i:02}.png"))).unwrap();
        std::fs::write(data.join(format!("{i:02}.txt")), format!("picture number {i}")).unwrap();
    };
    (0..6).for_each(write);
    let mut cfg = config();
    cfg.data = data.display().to_string();
    cfg.tokenizer = None;
    let run_dir = tmp.path().join("run");
    run(&run_dir, &cfg, false, Some(2)).expect("interrupted run on a folder");
    write(6);
    let err = run(&run_dir, &cfg, true, None).expect_err("resume after the folder changed");
    assert!(err.to_string().contains("the data is now"), "{err}");
    std::fs::remove_file(data.join("06.png")).unwrap();
    std::fs::remove_file(data.join("06.txt")).unwrap();
    assert!(matches!(run(&run_dir, &cfg, true, None), Ok(Outcome::Finished { step: 6, .. })));
}

/// metrics.jsonl keeps a NaN (written as "NaN", once `null`, which made the line unreadable and dropped on
/// resume), and a torn last line never swallows the next record.
#[test]
fn the_metrics_log_survives_nan_values_and_torn_lines() {
    use ov3_core::train::log::MetricsLog;
    let tmp = ov3_core::fsio::ScratchDir::new().expect("tmp");
    let mut log = MetricsLog::open(tmp.path(), None).unwrap();
    let step = |n: u64, total: f64, caption: Option<f64>| {
        Record::Step(StepRecord { step: n, total, caption, ..StepRecord::default() })
    };
    log.append(&step(1, 2.0, Some(f64::NAN))).unwrap();
    log.append(&step(2, f64::INFINITY, None)).unwrap();
    log.append(&step(3, 1.0, Some(0.5))).unwrap();
    drop(log);
    let path = tmp.path().join("metrics.jsonl");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("{\"kind\":\"step\",\"step\":4,\"sta"); // a crash mid-line
    std::fs::write(&path, text).unwrap();
    // Resumed from step 3: everything up to it stays, the torn line goes, new records follow.
    let mut log = MetricsLog::open(tmp.path(), Some(3)).unwrap();
    log.append(&step(4, 0.75, None)).unwrap();
    let back: Vec<StepRecord> =
        read(&path).unwrap().into_iter().filter_map(|r| if let Record::Step(s) = r { Some(s) } else { None }).collect();
    assert_eq!(back.iter().map(|r| r.step).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    assert!(back[0].caption.is_some_and(f64::is_nan), "NaN caption term kept as NaN, not absent");
    assert_eq!(back[1].total, f64::INFINITY);
    assert_eq!(back[1].caption, None);
    // A fresh open of a log whose last line is torn starts the next record on a new line.
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("{\"kind\":");
    std::fs::write(&path, text).unwrap();
    let mut log = MetricsLog::open(tmp.path(), None).unwrap();
    log.append(&step(5, 0.5, None)).unwrap();
    assert_eq!(read(&path).unwrap().last().map(Record::step), Some(5));
}

#[test]
fn an_interrupted_checkpoint_write_leaves_the_previous_one_loadable() {
    let tmp = ov3_core::fsio::ScratchDir::new().expect("tmp");
    let cfg = config();
    run(tmp.path(), &cfg, false, Some(2)).expect("interrupted run");
    // What a kill during the next write leaves: a half-filled temporary folder (the final name only
    // appears by a rename once every file is written and synced).
    let root = checkpoint::checkpoints_dir(tmp.path());
    let torn = root.join(".step-00000004.tmp");
    std::fs::create_dir_all(&torn).unwrap();
    std::fs::write(torn.join(MODEL_FILE), b"half a safetensors header").unwrap();
    assert!(checkpoint::latest_intact(tmp.path()).0.unwrap().ends_with("step-00000002"));
    load(&root.join("step-00000002").join(MODEL_FILE));
    // Resume starts from step 2 and finishes; the torn folder is cleared when step 4 is written.
    let out = run(tmp.path(), &cfg, true, None).expect("resume past a torn write");
    assert!(matches!(out, Outcome::Finished { step: 6, .. }));
    assert!(!torn.exists());
    assert!(checkpoint::latest_intact(tmp.path()).0.unwrap().ends_with("step-00000006"));
}

#[test]
fn mismatched_runs_are_refused_with_a_reason() {
    let tmp = ov3_core::fsio::ScratchDir::new().expect("tmp");
    let cfg = config();
    run(tmp.path(), &cfg, false, Some(1)).expect("short run");
    let err = run(tmp.path(), &cfg, false, None).expect_err("a second fresh run into the same folder");
    assert!(err.to_string().contains("already holds a run"), "{err}");
    let mut other = cfg.clone();
    other.preset = Preset::Small;
    let err = run(tmp.path(), &other, true, None).expect_err("resume with another preset");
    assert!(err.to_string().contains("`preset` differs"), "{err}");
    // A fine-tune may train at another noise bound
    // (`init_starts_from_the_model_files_weights_and_refuses_another_model`); a resume may not.
    let mut noisier = cfg.clone();
    noisier.tau = 0.25;
    let err = run(tmp.path(), &noisier, true, None).expect_err("resume with another tau");
    assert!(err.to_string().contains("`tau` differs"), "{err}");
    let empty = ov3_core::fsio::ScratchDir::new().expect("tmp");
    let err = run(empty.path(), &cfg, true, None).expect_err("resume of nothing");
    assert!(err.to_string().contains("config.toml"), "{err}");
}

#[test]
fn a_run_with_a_tokenizer_json_trains_saves_it_and_refuses_another_on_resume() {
    let tmp = ov3_core::fsio::ScratchDir::new().expect("tmp");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizer");
    let mut cfg = config();
    cfg.tokenizer = Some(fixtures.join("tokenizer.json").display().to_string());
    cfg.context_length = Some(24);
    run(tmp.path(), &cfg, false, Some(2)).expect("short run with a HuggingFace tokenizer");
    let last = checkpoint::latest_intact(tmp.path()).0.expect("a checkpoint");
    let (model, model_cfg) = load(&last.join(MODEL_FILE));
    let tokenizer = cfg.tokenizer().expect("tokenizer");
    assert_eq!(model.tokenizer.spec(), tokenizer.spec(), "the checkpoint carries the tokenizer");
    assert_eq!((model_cfg.vocab_size, model_cfg.context_length), (tokenizer.vocab_size(), 24));
    assert!(steps(tmp.path()).iter().all(|r| r.caption.is_some_and(f64::is_finite)));

    // The same config path with other contents: the resumed run must not read captions another way.
    let changed = tmp.path().join("tokenizer.json");
    let json = std::fs::read_to_string(fixtures.join("tokenizer.json")).expect("fixture");
    // Same vocabulary and special ids, but text lower-cased first: only the tokenizer check can tell.
    std::fs::write(&changed, json.replace("\"normalizer\": null", "\"normalizer\": {\"type\": \"Lowercase\"}"))
        .expect("write");
    std::fs::write(
        tmp.path().join("config.toml"),
        std::fs::read_to_string(tmp.path().join("config.toml"))
            .expect("config")
            .replace(&fixtures.join("tokenizer.json").display().to_string(), &changed.display().to_string()),
    )
    .expect("write");
    let mut other = cfg.clone();
    other.tokenizer = Some(changed.display().to_string());
    let err = run(tmp.path(), &other, true, None).expect_err("resume with another tokenizer");
    assert!(err.to_string().contains("checkpoint's tokenizer"), "{err}");
}

#[test]
fn weight_decay_skips_exactly_the_vectors_and_scalars() {
    let _turn = turn();
    let model = Ov3::new(&Preset::Tiny.config(), &Device::flex());
    let skipped = optim::no_decay_ids(&model);
    struct Ranks(Vec<(burn::module::ParamId, usize)>);
    impl ModuleVisitor for Ranks {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
            self.0.push((p.id, D));
        }
    }
    let mut all = Ranks(vec![]);
    model.visit(&mut all);
    let low: Vec<_> = all.0.iter().filter(|(_, d)| *d < 2).map(|(id, _)| *id).collect();
    assert_eq!(skipped, low);
    // The logit scale, LayerNorm gains and biases are among them; the attention matrices are not.
    assert!(skipped.contains(&model.logit_scale.id));
    assert!(!skipped.contains(&model.encoder.blocks[0].attn.qkv.weight.id));
    assert!(low.len() > 10 && low.len() < all.0.len());
}

#[test]
fn lr_decoders_scales_the_first_step_of_the_two_decoders_only() {
    let _turn = turn();
    use burn::optim::GradientsParams;
    use burn::tensor::TensorData;
    // The optimiser updates autodiff parameters; gradients live on the inner device.
    let device = Device::flex();
    let model = Ov3::new(&Preset::Tiny.config(), &device.clone().autodiff());
    // The same gradient for every parameter in both runs: a fixed pseudo-random sequence, in visit order.
    let grads = |model: &Ov3| {
        struct Fill(GradientsParams, Device, u64);
        impl ModuleVisitor for Fill {
            fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
                let shape = p.val().shape();
                let values: Vec<f32> = (0..shape.num_elements())
                    .map(|_| {
                        self.2 = self.2.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        (self.2 >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                    })
                    .collect();
                self.0.register(p.id, Tensor::<D>::from_data(TensorData::new(values, shape), &self.1));
            }
        }
        let mut fill = Fill(GradientsParams::new(), device.clone(), 11);
        model.visit(&mut fill);
        fill.0
    };
    let (lr, k) = (1e-3, 3.0);
    let step = |lr_decoders: f64| {
        let mut opt = optim::adamw(&model, 0.2);
        optim::step_with_decoder_lr(&mut opt, model.clone(), grads(&model), lr, lr_decoders, 1.0)
    };
    let (plain, scaled) = (step(1.0), step(k));
    let before = named_values(&model);
    let decoder_keys = |name: &str| name.starts_with("decoder.") || name.starts_with("text_decoder.");
    let (mut decoders, mut others) = (0, 0);
    for ((name, _, w0), ((_, _, a), (_, _, b))) in
        before.iter().zip(named_values(&plain).iter().zip(named_values(&scaled).iter()))
    {
        // AdamW's first step moves a weight by lr * (g / (|g| + eps) + wd * w): linear in the rate.
        let expect = if decoder_keys(name) { k } else { 1.0 };
        for ((w, a), b) in w0.iter().zip(a).zip(b) {
            let (da, db) = ((a - w) as f64, (b - w) as f64);
            assert!(
                (db - expect * da).abs() <= 1e-3 * expect * lr + 1e-4 * db.abs(),
                "{name}: {db} vs {expect} x {da}"
            );
        }
        if decoder_keys(name) { decoders += 1 } else { others += 1 }
    }
    assert!(decoders > 10 && others > 10, "{decoders} decoder and {others} other tensors");
}

#[test]
fn stage_values_out_of_range_are_refused_with_one_line() {
    let text = config().to_toml();
    for (key, bad) in
        [("lr_decoders = 1.0", "lr_decoders = 0.0"), ("lr = 0.1", "lr = -0.1"), ("warmup = 1", "warmup = 9")]
    {
        assert!(text.contains(key), "{key} not in the test config");
        let err = TrainConfig::from_toml(&text.replacen(key, bad, 1)).expect_err(bad);
        assert_eq!(err.lines().count(), 1, "{bad}: {err}");
        assert!(err.contains("stage `a`") && err.contains("lr_decoders > 0"), "{bad}: {err}");
    }
}

/// assets/demo/recipe.toml is the config the shipped checkpoint was trained with; `--recipe demo` must still
/// be that recipe, or its model card's "trained with `ov3 train --recipe demo`" is no longer true.
#[test]
fn the_demo_recipe_is_the_one_the_shipped_checkpoint_was_trained_with() {
    let shipped = include_str!("../../assets/demo/recipe.toml");
    let shipped = TrainConfig::from_toml(shipped).expect("the shipped recipe parses");
    assert_eq!(shipped.to_toml(), TrainConfig::demo().to_toml());
}

/// The demo card's fine-tuning chain: every `assets/demo/refine-N.toml` parses and validates, and each file
/// that continues a run folder with `--resume` (refine-5 after refine-4, refine-7 and refine-8 after the one
/// before, refine-11 after refine-10, refine-13 after refine-12, refine-16 after refine-15, refine-17 after
/// refine-16, and refine-19 to refine-22 each after the one before) is accepted as that resume, its one change
/// the appended stage; refine-9, refine-10 and refine-12 are refine-6 on other caches; refine-14 is refine-12
/// with the `RecOnly` objective, refine-15 is refine-14 with a noise bound (`tau`) of 0.1, and refine-18 is
/// refine-15 renamed.
#[test]
fn the_demo_fine_tuning_recipes_chain_as_their_card_says() {
    let parse = |text: &str| TrainConfig::from_toml(text).expect("a shipped recipe parses");
    let files = [
        parse(include_str!("../../assets/demo/refine-4.toml")),
        parse(include_str!("../../assets/demo/refine-5.toml")),
        parse(include_str!("../../assets/demo/refine-6.toml")),
        parse(include_str!("../../assets/demo/refine-7.toml")),
        parse(include_str!("../../assets/demo/refine-8.toml")),
        parse(include_str!("../../assets/demo/refine-9.toml")),
        parse(include_str!("../../assets/demo/refine-10.toml")),
        parse(include_str!("../../assets/demo/refine-11.toml")),
        parse(include_str!("../../assets/demo/refine-12.toml")),
        parse(include_str!("../../assets/demo/refine-13.toml")),
        parse(include_str!("../../assets/demo/refine-14.toml")),
        parse(include_str!("../../assets/demo/refine-15.toml")),
        parse(include_str!("../../assets/demo/refine-16.toml")),
        parse(include_str!("../../assets/demo/refine-17.toml")),
        parse(include_str!("../../assets/demo/refine-18.toml")),
        parse(include_str!("../../assets/demo/refine-19.toml")),
        parse(include_str!("../../assets/demo/refine-20.toml")),
        parse(include_str!("../../assets/demo/refine-21.toml")),
        parse(include_str!("../../assets/demo/refine-22.toml")),
    ];
    for cfg in &files {
        cfg.validate().expect("a shipped recipe is valid");
        assert!(cfg.stages.iter().all(|s| s.resolution == 128), "the refine stages are at 128 px");
    }
    for (saved, resumed) in [
        (&files[0], &files[1]),
        (&files[2], &files[3]),
        (&files[3], &files[4]),
        (&files[6], &files[7]),
        (&files[8], &files[9]),
        (&files[11], &files[12]),
        (&files[12], &files[13]),
        (&files[14], &files[15]),
        (&files[15], &files[16]),
        (&files[16], &files[17]),
        (&files[17], &files[18]),
    ] {
        let changes = resumed.resume_changes(saved).expect("the next recipe resumes the previous run");
        let last = &resumed.stages.last().unwrap().name;
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert!(changes[0].contains("added") && changes[0].contains(last.as_str()), "{changes:?}");
    }
    assert!(files[2..].iter().all(|f| f.data.starts_with("cache:")), "refine-6 onwards train from a crops cache");
    // refine-9 starts fresh (`--init`) on a second cache of other crops: refine-6's stage renamed, its data the
    // new cache, nothing else changed.
    // So do refine-10 and refine-12 (`--init` from the model file before them with `--init-other-vae`: caches
    // of the retrained embedded autoencoders' latents).
    let six = &files[2];
    for fresh in [&files[5], &files[6], &files[8]] {
        assert_ne!(six.data, fresh.data, "{} trains from another cache", fresh.stages[0].name);
        assert_eq!(fresh.stages.len(), 1);
        let mut renamed = six.clone();
        renamed.data = fresh.data.clone();
        renamed.stages[0].name = fresh.stages[0].name.clone();
        assert_eq!(renamed.to_toml(), fresh.to_toml(), "{} is refine-6 on another cache", fresh.stages[0].name);
    }
    assert!(files[5].data != files[6].data && files[6].data != files[8].data);
    // refine-14 (`--init` from refine-13's final checkpoint) is refine-12's stage with reconstruction alone
    // reaching the encoder (`RecOnly`; the understanding heads go on training as probes), evaluated at its end
    // only and checkpointed every 600 steps; nothing else changed.
    let (twelve, fourteen) = (&files[8], &files[10]);
    assert_eq!(fourteen.objective, ov3_core::Objective::RecOnly);
    let mut expected = twelve.clone();
    expected.objective = ov3_core::Objective::RecOnly;
    expected.stages[0].name = "refine-14".into();
    (expected.eval_every, expected.checkpoint_every) = (0, 600);
    assert_eq!(expected.to_toml(), fourteen.to_toml(), "refine-14 is refine-12 with the RecOnly objective");
    // refine-15 (`--init` from refine-14's final checkpoint) is refine-14 with eq. 3's noise bound at 0.1.
    let fifteen = &files[11];
    let mut expected = fourteen.clone();
    expected.tau = 0.1;
    expected.stages[0].name = "refine-15".into();
    assert_eq!(expected.to_toml(), fifteen.to_toml(), "refine-15 is refine-14 with tau 0.1");
    // refine-18 (`--init` from the shipped refine-17 file, f16 weights and a fresh AdamW: refine-17's f32
    // checkpoint did not outlive its machine) is refine-15's stage again, renamed.
    let mut expected = fifteen.clone();
    expected.stages[0].name = "refine-18".into();
    assert_eq!(expected.to_toml(), files[14].to_toml(), "refine-18 is refine-15 renamed");
}

#[test]
fn the_paper_recipe_follows_its_table_1() {
    // OpenVision 3, Table 1: (global batch, base LR, epochs, warm-up epochs, lambda) per stage.
    let table = [(8192.0, 8e-6, 4000.0, 40.0, 0.0), (4096.0, 4e-7, 400.0, 20.0, 0.5)];
    for preset in Preset::ALL {
        let cfg = TrainConfig::paper(preset);
        cfg.validate().expect("the paper recipe is valid");
        let [s1, s2] = [&cfg.stages[0], &cfg.stages[1]];
        assert_eq!((s1.resolution, s2.resolution), (128, 256));
        // Base LRs are per 256 images on both sides, so they carry over; the batch halves as the paper's does.
        for (stage, (_, lr, epochs, warmup, lambda)) in cfg.stages.iter().zip(table) {
            assert_eq!((stage.lr, stage.lambda), (lr, lambda), "{}", stage.name);
            let warmup_share = stage.warmup as f64 / stage.steps as f64;
            assert!((warmup_share - warmup / epochs).abs() < 1e-9, "{}: warm-up share {warmup_share}", stage.name);
            assert!(stage.pixel_loss && stage.lr_decoders == 1.0);
        }
        assert_eq!(s1.effective_batch() as f64 / s2.effective_batch() as f64, table[0].0 / table[1].0);
        let images = |s: &StageConfig| (s.steps * s.effective_batch() as u64) as f64;
        assert_eq!(images(s1) / images(s2), table[0].2 / table[1].2, "the 10:1 epoch ratio");
    }
}

#[test]
fn pixel_space_is_a_recipe_key_the_trainer_and_evaluation_honour() {
    let mut text = config().to_toml();
    assert!(text.contains("input_space = \"latents\""), "{text}");
    let bad = text.replace("input_space = \"latents\"", "input_space = \"rgb\"");
    let err = TrainConfig::from_toml(&bad).expect_err("an unknown input space is refused");
    assert!(err.contains("\"latents\" or \"pixels\""), "{err}");
    text = text.replace("input_space = \"latents\"", "input_space = \"pixels\"");
    let mut cfg = TrainConfig::from_toml(&text).expect("pixels parse");
    cfg.stages.truncate(1);
    cfg.eval_size = 4;
    let tmp = ov3_core::fsio::ScratchDir::new().expect("tmp");
    let Ok(Outcome::Finished { step: 3, report: Some(report) }) = run(tmp.path(), &cfg, false, None) else {
        panic!("the pixel-space run does not finish with a report");
    };
    assert!(report.psnr.is_finite() && report.psnr > 0.0 && report.i2t_recall_at_1.is_finite());
    let last = checkpoint::latest_intact(tmp.path()).0.expect("a checkpoint");
    let (model, model_cfg) = load(&last.join(MODEL_FILE));
    assert_eq!(model_cfg.input_space, ov3_core::InputSpace::Pixels);
    // 16x16 RGB patches in, 16x16 RGB patches out.
    assert_eq!(model.encoder.patch_embed.proj.weight.val().dims(), [192, 3, 16, 16]);
    assert_eq!(model.decoder.pred.weight.val().dims()[1], 3 * 16 * 16);
}

/// `precision = "f16"` is a recipe key: the run trains with its blocks in f16, logs the loss scale of every
/// step, checkpoints the scaler in `state.json`, and a resume continues it (same steps, same scaler state:
/// without it a resumed run would start again at 2^16 with its clean-step count at zero). An unknown
/// precision is refused with the choices.
#[test]
fn f16_is_a_recipe_key_and_its_loss_scale_survives_a_resume() {
    let text = config().to_toml();
    assert!(text.contains("precision = \"f32\""), "{text}");
    let err = TrainConfig::from_toml(&text.replace("precision = \"f32\"", "precision = \"f8\"")).expect_err("f8");
    assert!(err.contains("f32, f16 or bf16"), "{err}");
    let mut cfg = TrainConfig::from_toml(&text.replace("precision = \"f32\"", "precision = \"f16\"")).expect("f16");
    cfg.stages[0].lr = 1e-3;
    cfg.stages[1].lr = 1e-3;
    let tmp = ov3_core::fsio::ScratchDir::new().expect("tmp");
    let (straight, split) = (tmp.path().join("straight"), tmp.path().join("split"));
    assert!(matches!(run(&straight, &cfg, false, None), Ok(Outcome::Finished { step: 6, .. })));
    assert!(matches!(run(&split, &cfg, false, Some(4)), Ok(Outcome::Interrupted { step: 4, .. })));
    assert!(matches!(run(&split, &cfg, true, None), Ok(Outcome::Finished { step: 6, .. })));
    let (a, b) = (steps(&straight), steps(&split));
    assert!(a.iter().all(|r| r.loss_scale.is_some_and(|s| s >= 1.0 && s.log2().fract() == 0.0)), "{a:?}");
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.loss_scale, y.loss_scale, "step {}", x.step);
        for ((name, u), (_, v)) in x.terms().into_iter().zip(y.terms()) {
            assert!((u - v).abs() <= 1e-5 * u.abs().max(1.0), "step {} {name}: {u} vs {v}", x.step);
        }
    }
    let scaler = |dir: &Path| {
        let last = checkpoint::latest_intact(dir).0.expect("a checkpoint");
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(last.join(checkpoint::STATE_FILE)).expect("state")).expect("json");
        state["loss_scale"].clone()
    };
    assert!(scaler(&straight)["good_steps"].as_u64().is_some_and(|n| n > 0), "{}", scaler(&straight));
    assert_eq!(scaler(&straight), scaler(&split), "the resumed run continues the scaler");
}

/// The model file of a two-step run of `config()` (the embedded autoencoder) in `dir/source`: an init file.
fn init_file(dir: &Path) -> std::path::PathBuf {
    let source = dir.join("source");
    run(&source, &config(), false, Some(2)).expect("a short run");
    checkpoint::latest_intact(&source).0.expect("a checkpoint").join(MODEL_FILE)
}

/// `init` (fine-tuning): a run starts from exactly the model file's weights, not the seeded ones (one step at
/// a learning rate far too small to move an f32 weight leaves every weight as the file has it; the seeded
/// initialisation is two steps at lr 0.1 away from it), and says so; a model of another architecture and a
/// missing file are refused, naming the file.
#[test]
fn init_starts_from_the_model_files_weights_and_refuses_another_model() {
    let tmp = ov3_core::fsio::ScratchDir::new().expect("tmp");
    let tuned = tmp.path().join("tuned");
    let file = init_file(tmp.path());

    let mut fine = config();
    fine.init = Some(file.display().to_string());
    fine.stages.truncate(1);
    (fine.stages[0].steps, fine.stages[0].warmup, fine.stages[0].lr) = (1, 1, 1e-30);
    let (outcome, notes) = run_noted(&tuned, &fine, false, None);
    assert!(matches!(outcome, Ok(Outcome::Finished { step: 1, .. })), "{outcome:?}");
    assert!(notes.iter().any(|n| n.contains("initialised from") && n.contains(&*file.to_string_lossy())), "{notes:?}");
    let want = named_values(&load(&file).0);
    let got = final_weights(&tuned);
    assert_eq!(got.len(), want.len());
    for ((name, shape, a), (_, want_shape, b)) in got.iter().zip(&want) {
        assert_eq!(shape, want_shape, "{name}");
        let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(worst <= 1e-20, "{name}: differs from the init file by {worst}");
    }
    assert!(std::fs::read_to_string(tuned.join("config.toml")).expect("config").contains("init = "));

    // The noise bound of eq. 3 is a training setting: a fine-tune may change it, says so, and its files
    // record the new one. A resume may not (`mismatched_runs_are_refused_with_a_reason`).
    let mut noisier = fine.clone();
    noisier.tau = 0.25;
    let (outcome, notes) = run_noted(&tmp.path().join("noisier"), &noisier, false, None);
    assert!(matches!(outcome, Ok(Outcome::Finished { step: 1, .. })), "{outcome:?}");
    assert!(notes.iter().any(|n| n.contains("trained at tau 0.5, fine-tuned at the config's tau 0.25")), "{notes:?}");
    let last = checkpoint::latest_intact(&tmp.path().join("noisier")).0.expect("a checkpoint");
    assert_eq!(load(&last.join(MODEL_FILE)).1.tau, 0.25);

    let mut other = fine.clone();
    other.context_length = Some(40);
    let err = run(&tmp.path().join("other"), &other, false, None).expect_err("another architecture");
    assert!(matches!(err, TrainError::Refused(_)) && err.to_string().contains("init model's model"), "{err}");
    assert!(err.to_string().contains("context_length: 80 in the file, 40 in the config"), "{err}");
    assert!(!tmp.path().join("other").exists(), "a refused init leaves no run folder behind");
    other = fine.clone();
    other.init = Some(tmp.path().join("missing.safetensors").display().to_string());
    let err = run(&tmp.path().join("missing"), &other, false, None).expect_err("a missing file");
    assert!(err.to_string().contains("init:") && err.to_string().contains("missing.safetensors"), "{err}");
}

/// `init_grow_decoder`: a model file's ViT decoder deepened to the config's keeps every one of the file's
/// weights, and the grown model reconstructs what the file's did (its added blocks start as the identity:
/// max |difference| of the decoded latents <= 1e-5 on random tokens, f32 rounding only). Without the key
/// the deeper config is refused with a pointer to it; another width, or a shallower decoder, is refused.
#[test]
fn init_grow_decoder_adds_identity_blocks_and_keeps_the_files_reconstructions() {
    let tmp = ov3_core::fsio::ScratchDir::new().expect("tmp");
    let grown_dir = tmp.path().join("grown");
    let file = init_file(tmp.path());
    let (before, saved) = load(&file);
    let was = saved.decoder.clone();

    let mut grown = config();
    grown.init = Some(file.display().to_string());
    grown.decoder = Some(ov3_core::config::TowerConfig { depth: was.depth + 2, ..was.clone() });
    grown.stages.truncate(1);
    (grown.stages[0].steps, grown.stages[0].warmup, grown.stages[0].lr) = (1, 1, 1e-30);
    let err = run(&tmp.path().join("refused"), &grown, false, None).expect_err("a deeper decoder, not asked for");
    assert!(err.to_string().contains("decoder:") && err.to_string().contains("init_grow_decoder"), "{err}");
    assert!(!tmp.path().join("refused").exists(), "a refused init leaves no run folder behind");

    grown.init_grow_decoder = true;
    let (outcome, notes) = run_noted(&grown_dir, &grown, false, None);
    assert!(matches!(outcome, Ok(Outcome::Finished { step: 1, .. })), "{outcome:?}");
    let note = format!("decoder grown from {} to {} blocks", was.depth, was.depth + 2);
    assert!(notes.iter().any(|n| n.contains(&note)), "{notes:?}");
    let last = checkpoint::latest_intact(&grown_dir).0.expect("a checkpoint").join(MODEL_FILE);
    let (after, after_cfg) = load(&last);
    assert_eq!(after_cfg.decoder.depth, was.depth + 2);
    let want = named_values(&before);
    let got = named_values(&after);
    assert_eq!(got.len(), want.len() + 2 * (want.iter().filter(|(n, ..)| n.starts_with("decoder.blocks.0.")).count()));
    for (name, shape, b) in &want {
        let (_, got_shape, a) = got.iter().find(|(n, ..)| n == name).unwrap_or_else(|| panic!("{name} is gone"));
        assert_eq!(got_shape, shape, "{name}");
        let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(worst <= 1e-20, "{name}: differs from the init file by {worst}");
    }
    // The same reconstructions: both decoders read the same random tokens on a 4x4 grid.
    let device = Device::flex();
    let tokens = {
        let _turn = turn();
        ov3_core::device::seeded(&device, 3, || {
            Tensor::<3>::random([2, 16, saved.encoder.width], burn::tensor::Distribution::Normal(0.0, 1.0), &device)
        })
    };
    let (a, b) = (before.decode(tokens.clone(), (4, 4)), after.decode(tokens, (4, 4)));
    let diff = (a - b).abs().max().into_scalar::<f32>();
    assert!(diff <= 1e-5, "the grown decoder reconstructs differently: max |difference| {diff}");

    for (width, depth, why) in
        [(was.width + 32 * was.heads, was.depth + 2, "a wider decoder"), (was.width, 1, "a shallower one")]
    {
        let mut other = grown.clone();
        other.decoder = Some(ov3_core::config::TowerConfig { width, depth, ..was.clone() });
        let err = run(&tmp.path().join("other"), &other, false, None).expect_err(why);
        let text = err.to_string();
        assert!(text.contains("init_grow_decoder adds blocks") && text.contains(&format!("{width} wide")), "{text}");
    }
}

/// `init_other_vae`: a model file trained with one VAE is refused as the init of a run with another, with both
/// named and the key that allows it; with the key the run starts, its log names both VAEs, and its checkpoints
/// record the new one (what `--resume`, `ov3 eval` and the page check), not the init file's.
#[test]
fn init_moves_a_model_onto_another_vae_only_when_asked() {
    let tmp = ov3_core::fsio::ScratchDir::new().expect("tmp");
    let moved_dir = tmp.path().join("moved");
    let file = init_file(tmp.path());
    let before = load(&file).1.vae.expect("the model file names its VAE");
    assert_eq!(before.source, "embedded");

    let world_only = concat!(env!("CARGO_MANIFEST_DIR"), "/../assets/ae/world-only-w32.safetensors");
    let mut moved = config();
    (moved.init, moved.vae) = (Some(file.display().to_string()), Some(world_only.to_string()));
    moved.stages.truncate(1);
    moved.stages[0].steps = 2;
    let err = run(&tmp.path().join("refused"), &moved, false, None).expect_err("another VAE, not asked for");
    let text = err.to_string();
    assert!(matches!(err, TrainError::Refused(_)), "{err}");
    assert!(
        text.contains(&before.identity) && text.contains("world-only-w32") && text.contains("init_other_vae"),
        "{text}"
    );
    assert!(!tmp.path().join("refused").exists(), "a refused init leaves no run folder behind");

    moved.init_other_vae = true;
    let (outcome, notes) = run_noted(&moved_dir, &moved, false, None);
    assert!(matches!(outcome, Ok(Outcome::Finished { step: 2, .. })), "{outcome:?}");
    assert!(notes.iter().any(|n| n.contains("moved onto") && n.contains(&before.identity)), "{notes:?}");
    let last = checkpoint::latest_intact(&moved_dir).0.expect("a checkpoint").join(MODEL_FILE);
    let after = load(&last).1.vae.expect("the checkpoint names its VAE");
    assert!(after.source.ends_with("world-only-w32.safetensors") && after.identity != before.identity, "{after:?}");
    assert!(std::fs::read_to_string(moved_dir.join("config.toml")).expect("config").contains("init_other_vae = true"));

    let mut stray = config();
    stray.init_other_vae = true;
    assert!(stray.validate().expect_err("init_other_vae without init").contains("needs init"));
}
