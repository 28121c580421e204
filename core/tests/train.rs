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

/// Requests a stop after step `at`, as Ctrl-C would.
struct StopAt<'a> {
    at: Option<u64>,
    stop: &'a AtomicBool,
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
    fn note(&mut self, _: &str) {}
}

/// The device RNG (initialisation, eq. 3 noise) is process-wide on flex: runs in parallel test threads
/// would re-seed each other's draws, so they take turns.
static ONE_RUN_AT_A_TIME: Mutex<()> = Mutex::new(());

fn run(dir: &Path, cfg: &TrainConfig, resume: bool, stop_at: Option<u64>) -> Result<Outcome, TrainError> {
    let _turn = ONE_RUN_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let stop = AtomicBool::new(false);
    train(dir, cfg, resume, &Device::flex().autodiff(), &stop, &mut StopAt { at: stop_at, stop: &stop })
}

fn steps(dir: &Path) -> Vec<StepRecord> {
    read(&dir.join("metrics.jsonl"))
        .expect("metrics")
        .into_iter()
        .filter_map(|r| if let Record::Step(s) = r { Some(s) } else { None })
        .collect()
}

fn final_weights(dir: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let last = checkpoint::latest(dir).expect("a checkpoint");
    named_values(&load_model(&last.join(MODEL_FILE), &Device::flex()).expect("loads").0)
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

#[test]
fn a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint() {
    let tmp = ov3_core::fsio::ScratchDir::new().expect("tmp");
    let mut cfg = config();
    cfg.checkpoint_every = 1;
    cfg.grad_clip = 1e30; // let the absurd learning rate through
    for s in &mut cfg.stages {
        (s.lr, s.warmup) = (1e32, 0);
    }
    match run(tmp.path(), &cfg, false, None) {
        Err(TrainError::NonFinite { step, term, value }) => {
            assert!(!value.is_finite(), "{term} = {value}");
            // Every checkpoint left behind is from before the failure and holds finite weights.
            let last = checkpoint::latest(tmp.path());
            if let Some(dir) = last {
                let n: u64 = dir.file_name().unwrap().to_str().unwrap()[5..].parse().unwrap();
                assert!(n <= step, "checkpoint {n} after the failing step {step}");
                for (name, _, v) in final_weights(tmp.path()) {
                    assert!(v.iter().all(|x| x.is_finite()), "{name} not finite in the kept checkpoint");
                }
            }
        }
        other => panic!("expected a non-finite loss error, got {other:?}"),
    }
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
    assert!(checkpoint::latest(tmp.path()).unwrap().ends_with("step-00000002"));
    load_model(&root.join("step-00000002").join(MODEL_FILE), &Device::flex()).expect("previous checkpoint loads");
    // Resume starts from step 2 and finishes; the torn folder is cleared when step 4 is written.
    let out = run(tmp.path(), &cfg, true, None).expect("resume past a torn write");
    assert!(matches!(out, Outcome::Finished { step: 6, .. }));
    assert!(!torn.exists());
    assert!(checkpoint::latest(tmp.path()).unwrap().ends_with("step-00000006"));
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
    let last = checkpoint::latest(tmp.path()).expect("a checkpoint");
    let (model, model_cfg) = load_model(&last.join(MODEL_FILE), &Device::flex()).expect("loads");
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
        optim::step_with_decoder_lr(&mut opt, model.clone(), grads(&model), lr, lr_decoders)
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
