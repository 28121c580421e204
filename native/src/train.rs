//! `ov3 train`: the main job. A TOML config or the built-in quick recipe, optional overrides, a progress
//! bar, Ctrl-C that checkpoints and exits, plots and a report in the run folder at the end.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use burn::tensor::Device;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use ov3_core::device::{self, BackendChoice};
use ov3_core::eval::EvalReport;
use ov3_core::parallel::{Group, GroupExt};
use ov3_core::train::config::SYNTHETIC_WORDS;
use ov3_core::train::log::StepRecord;
use ov3_core::train::run::CONFIG_FILE;
use ov3_core::train::{Observer, Outcome, StageConfig, TrainConfig, train};
use ov3_core::{Precision, Preset};

use crate::report::print_report;

#[derive(Args)]
pub struct TrainArgs {
    /// Training recipe (TOML, DESIGN §4). Without it: the quick recipe (tiny preset, embedded data, ~8 min on
    /// a 2-core CPU); `ov3 train --print-config` shows it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Built-in recipe when no --config is given: quick (the main job, ~8 min on 2 CPU cores), demo (the
    /// shipped checkpoint's, ~3.5 hours) or paper (Table 1 of the paper at a batch one machine holds: 128 px at
    /// batch 256, then 256 px at batch 128, base LR 8e-6 then 4e-7 per 256 images; use with --preset).
    /// Default: quick; with --resume, the run's own config (a recipe named with --resume is used, so a run of
    /// an older recipe with fewer stages continues into the new ones).
    #[arg(long, conflicts_with = "config")]
    recipe: Option<Recipe>,
    /// Overrides of the recipe.
    #[arg(long)]
    preset: Option<Preset>,
    #[arg(long)]
    data: Option<String>,
    #[arg(long)]
    eval_data: Option<String>,
    /// Frozen VAE weights (FLUX.1 ae.safetensors, a diffusers folder, TAEF1); default: the embedded one.
    #[arg(long)]
    vae: Option<String>,
    /// Fine-tune: start from this model file (`ov3 export`, a checkpoint's model.safetensors, the demo
    /// checkpoint) instead of a fresh initialisation, with a fresh optimiser. Its architecture, tokenizer and
    /// VAE must be the recipe's (a mismatch is refused, naming both; see --init-other-vae); its noise bound tau
    /// may differ (the recipe's is used and recorded). Recorded in the run's config.toml.
    #[arg(long)]
    init: Option<String>,
    /// With --init: the model file was trained with another VAE than --vae (or the embedded one); move it onto
    /// this one's latents. Worth it only when the two autoencoders are related (one continued from the other).
    #[arg(long, requires = "init")]
    init_other_vae: bool,
    /// With --init: the recipe's ViT decoder (its `decoder` key) may be deeper than the model file's, at the
    /// same width and heads; the added blocks start as the identity, so training starts from the file's exact
    /// reconstructions with more decoder capacity.
    #[arg(long, requires = "init")]
    init_grow_decoder: bool,
    /// LPIPS weights (safetensors; see tools/lpips_weights.py): enables the lambda term of eq. 4.
    #[arg(long, requires = "lpips_heads")]
    lpips_trunk: Option<String>,
    #[arg(long, requires = "lpips_trunk")]
    lpips_heads: Option<String>,
    /// Caption tokenizer: a HuggingFace tokenizer.json, or synthetic-words (the embedded world's words, the
    /// quick recipe's); default: the built-in byte-level tokenizer.
    #[arg(long)]
    tokenizer: Option<String>,
    /// Caption length in tokens, BOS and EOS included (default: the preset's, 80).
    #[arg(long)]
    context_length: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    /// What the transformer blocks compute in: f32, f16 (mixed precision with dynamic loss scaling; GPUs
    /// through wgpu) or bf16 (where the backend has it). Weights and optimiser state stay f32.
    #[arg(long)]
    precision: Option<Precision>,
    /// Multiplies every stage's peak learning rate. With --resume it continues a run at another rate (after
    /// a NaN stop, say); the change is logged in metrics.jsonl and config.toml. A resume may change only the
    /// learning-rate schedule and the logging, evaluation and checkpoint settings, and append stages (with
    /// --config or --recipe: a finished run trained further).
    #[arg(long)]
    lr_scale: Option<f64>,
    /// Run folder (checkpoints, metrics.jsonl, grids, plots, eval.json). Default: runs/<preset>-<unix time>.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the latest checkpoint in --out.
    #[arg(long, requires = "out")]
    resume: bool,
    #[arg(long, default_value = "auto")]
    backend: BackendChoice,
    /// Print the resolved recipe as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

pub fn run(args: TrainArgs, group: &dyn Group) -> anyhow::Result<()> {
    let read = |path: &std::path::Path| -> anyhow::Result<TrainConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        TrainConfig::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    };
    let mut cfg = match (&args.config, &args.out) {
        (Some(path), _) => read(path)?,
        // Resuming without a config continues with the one the run was started with.
        (None, Some(out)) if args.resume && args.recipe.is_none() => read(&out.join(CONFIG_FILE))?,
        (None, _) => match args.recipe.unwrap_or(Recipe::Quick) {
            Recipe::Quick => TrainConfig::quick(),
            Recipe::Demo => TrainConfig::demo(),
            Recipe::Paper => TrainConfig::paper(args.preset.unwrap_or(Preset::Base)),
        },
    };
    if let Some(p) = args.preset {
        cfg.preset = p;
    }
    if let Some(d) = args.data {
        // The embedded world's word list cannot spell other captions: other data gets the byte-level
        // tokenizer unless --tokenizer names one.
        if !d.starts_with("synthetic:") && cfg.tokenizer.as_deref() == Some(SYNTHETIC_WORDS) {
            eprintln!("note: {d} is not the embedded world: captions use the byte-level tokenizer");
            (cfg.tokenizer, cfg.context_length) = (None, None);
        }
        cfg.data = d;
    }
    if let Some(d) = args.eval_data {
        cfg.eval_data = d;
    }
    if let Some(v) = args.vae {
        cfg.vae = Some(v);
    }
    if let Some(m) = args.init {
        cfg.init = Some(m);
    }
    cfg.init_other_vae |= args.init_other_vae;
    cfg.init_grow_decoder |= args.init_grow_decoder;
    if let (Some(t), Some(h)) = (args.lpips_trunk, args.lpips_heads) {
        (cfg.lpips_trunk, cfg.lpips_heads) = (Some(t), Some(h));
    }
    if let Some(s) = args.seed {
        cfg.seed = s;
    }
    if let Some(p) = args.precision {
        cfg.precision = p;
    }
    if let Some(scale) = args.lr_scale {
        anyhow::ensure!(scale.is_finite() && scale > 0.0, "--lr-scale must be positive and finite, got {scale}");
        cfg.scale_lr(scale);
    }
    if let Some(t) = args.tokenizer {
        cfg.tokenizer = Some(t);
    }
    if let Some(n) = args.context_length {
        cfg.context_length = Some(n);
    }
    cfg.validate().map_err(|e| anyhow::anyhow!("config: {e}"))?;
    if args.print_config {
        print!("{}", cfg.to_toml());
        return Ok(());
    }
    let out = args.out.unwrap_or_else(|| {
        let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        PathBuf::from(format!("runs/{}-{secs}", cfg.preset.name()))
    });

    let selected = device::select_for(args.backend, group.local_rank()).map_err(anyhow::Error::msg)?;
    crate::say_rank(group, &selected.reason);
    let device = selected.device.autodiff();
    let stop = stop_on_signal()?;
    if group.is_writer() {
        crate::say(&format!("run folder: {}", out.display()));
        if group.size() > 1 {
            let n = group.size();
            crate::say(&format!(
                "data parallel: {n} processes, each with 1/{n} of every global batch (images/s are global)"
            ));
        }
    }
    let outcome = train_with_progress(&out, &cfg, args.resume, &device, group, &stop)?;
    if !group.is_writer() {
        return Ok(());
    }
    match outcome {
        Outcome::Finished { step, report } => {
            println!("finished {step} steps in {}", out.display());
            if let Some(report) = report {
                print_report(&report);
            }
            println!("plots: {}", out.join("plots").display());
            println!("reconstructions: {}", out.join("grids/latest.png").display());
        }
        Outcome::Interrupted { step, checkpoint } => {
            println!(
                "interrupted at step {step}; checkpoint {}; continue with: ov3 train --out {} --resume",
                checkpoint.display(),
                out.display()
            );
        }
    }
    Ok(())
}

/// A flag raised by Ctrl-C, SIGTERM or SIGHUP (`docker stop`, `kill`, Slurm preemption): the trainer finishes
/// the step, writes a checkpoint and returns. A second signal leaves at once. Call once per process.
pub fn stop_on_signal() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\nstopping: writing a checkpoint (signal again to quit without one)");
    })?;
    Ok(stop)
}

/// [`train`] with a progress bar on rank 0 (the other ranks train quietly), then the run's plots.
pub fn train_with_progress(
    out: &Path,
    cfg: &TrainConfig,
    resume: bool,
    device: &Device,
    group: &dyn Group,
    stop: &AtomicBool,
) -> anyhow::Result<Outcome> {
    if !group.is_writer() {
        return Ok(train(out, cfg, resume, device, group, stop, &mut Quiet)?);
    }
    let mut bar = Bar::default();
    let outcome = train(out, cfg, resume, device, group, stop, &mut bar)?;
    bar.bar.finish_and_clear();
    crate::plots::plot_run(out)?;
    Ok(outcome)
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Recipe {
    Quick,
    Demo,
    Paper,
}

/// The observer of ranks other than 0: it says nothing.
struct Quiet;

impl Observer for Quiet {
    fn started(&mut self, _: u64, _: u64) {}
    fn stage(&mut self, _: usize, _: &StageConfig) {}
    fn step(&mut self, _: &StepRecord) {}
    fn evaluated(&mut self, _: u64, _: &EvalReport) {}
    fn note(&mut self, _: &str) {}
}

/// indicatif progress: one bar for the run, the latest losses in its message.
struct Bar {
    bar: ProgressBar,
}

impl Default for Bar {
    fn default() -> Self {
        Self { bar: ProgressBar::hidden() }
    }
}

impl Bar {
    /// A line above the bar, or on stderr when the bar is hidden (println drops it then).
    fn say(&self, line: &str) {
        if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }
}

impl Observer for Bar {
    fn started(&mut self, total: u64, at: u64) {
        self.bar = ProgressBar::new(total).with_position(at);
        self.bar.set_style(
            ProgressStyle::with_template("{bar:24} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]")
                .expect("valid template"),
        );
    }

    fn stage(&mut self, index: usize, stage: &StageConfig) {
        self.say(&format!(
            "stage {} `{}`: {} px, {} steps, batch {} x {}, peak lr {:.2e}",
            index + 1,
            stage.name,
            stage.resolution,
            stage.steps,
            stage.batch,
            stage.accumulate,
            stage.peak_lr()
        ));
    }

    fn step(&mut self, r: &StepRecord) {
        let opt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.3}"));
        let message = format!(
            "loss {:.3} rec {} cap {} con {} lr {:.1e} {:.1} img/s",
            r.total,
            opt(r.rec),
            opt(r.caption),
            opt(r.contrastive),
            r.lr,
            r.images_per_s
        );
        // Without a terminal (logs, CI) the bar is hidden: print a line every 10 steps instead.
        if self.bar.is_hidden() && r.step % 10 == 0 {
            eprintln!("step {}: {message}", r.step);
        }
        self.bar.set_message(message);
        self.bar.set_position(r.step);
    }

    fn evaluated(&mut self, step: u64, r: &EvalReport) {
        self.say(&format!(
            "step {step}: held-out PSNR {:.2} dB (VAE {:.2}), recall@1 i2t {:.3} t2i {:.3} (chance {:.3}), zero-shot {}, caption {:.3}",
            r.psnr,
            r.psnr_vae,
            r.i2t_recall_at_1,
            r.t2i_recall_at_1,
            r.chance_recall_at_1,
            r.zero_shot_accuracy.map_or("-".into(), |a| format!("{a:.3}")),
            r.caption_loss
        ));
    }

    fn note(&mut self, message: &str) {
        self.say(message);
    }
}
