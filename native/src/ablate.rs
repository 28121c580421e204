//! `ov3 ablate`: the paper's ablations at a scale this machine affords, each a set of ordinary training runs
//! (resumable, each in its own run folder) summarised by one JSON file and one figure.
//!
//! - `synergy` (Sec. 5.1, Figs. 4 and 5): the full objective, reconstruction only and understanding only, from
//!   the same initial weights, data order and noise draws. Under an ablation the switched-off branch is a
//!   probe on a detached z_u (DESIGN §3.1), so every loss term is measured at every logged step of every run.
//! - `input-space` (Tables 6-8): the ViT on VAE latents against the same ViT on pixels (16x16 patches).
//! - `tau` (Fig. 6): the noise bound of eq. 3.
//!
//! Every run of an ablation starts from the same seed-determined weights and data order (per seed), so the
//! runs differ only in what the ablation changes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use ov3_core::config::{InputSpace, Objective, TowerConfig};
use ov3_core::device::{self, BackendChoice};
use ov3_core::eval::EvalReport;
use ov3_core::parallel::{Group, GroupExt};
use ov3_core::train::log::{METRICS_FILE, Record, StepRecord};
use ov3_core::train::run::{CONFIG_FILE, REPORT_FILE};
use ov3_core::train::{Outcome, TrainConfig};
use ov3_core::{Preset, fsio};
use serde_json::{Value, json};

use crate::plots::{Series, draw};
use crate::train::{stop_on_signal, train_with_progress};

#[derive(Subcommand)]
pub enum AblateCommand {
    /// Sec. 5.1 (Figs. 4-5): full, rec-only and und-only runs from one initialisation and data order; writes
    /// DIR/synergy.json and DIR/synergy.png (every loss term of every run; seeds as a band).
    Synergy(AblationArgs),
    /// Tables 6-8: latents of the frozen VAE vs pixels as the ViT's input; writes DIR/input_space.json and
    /// DIR/input_space.png (held-out PSNR, SSIM, retrieval over training).
    InputSpace(AblationArgs),
    /// Fig. 6: the size of the ViT decoder (WIDTHxDEPTH, heads of 64 channels), one stage like synergy,
    /// every loss term at every logged step; writes DIR/decoder.json and DIR/decoder.png.
    Decoder {
        #[command(flatten)]
        args: AblationArgs,
        /// Decoder sizes as WIDTHxDEPTH (the tiny preset's is 192x4).
        #[arg(long, value_delimiter = ',', default_value = "128x2,192x4,256x8")]
        sizes: Vec<String>,
    },
    /// The noise bound tau of eq. 3; writes DIR/tau.json and DIR/tau.png.
    Tau {
        #[command(flatten)]
        args: AblationArgs,
        /// The values of tau to train with.
        #[arg(long, value_delimiter = ',', default_value = "0,0.25,0.5,1")]
        taus: Vec<f64>,
    },
}

#[derive(Args)]
pub struct AblationArgs {
    /// Folder of the runs (DIR/<run>/seed-<s>/) and of the summary JSON and figure. Rerunning with the same
    /// folder continues unfinished runs and skips finished ones.
    #[arg(long)]
    out: PathBuf,
    /// Optimiser steps per run at 64 px (the quick recipe's first stage, this long); input-space and tau add
    /// the quick recipe's 128 px stage at a tenth of it.
    #[arg(long, default_value_t = 640)]
    steps: u64,
    #[arg(long, default_value = "tiny")]
    preset: Preset,
    /// Runs per variant, seeds `seed`, `seed + 1`, ...: the figures shade their range.
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The pixel L1 term of eq. 4 through the frozen VAE decoder in every step (the paper's setting; several
    /// times slower on a CPU). Without it L_rec is its latent term.
    #[arg(long)]
    pixel_loss: bool,
    /// Held-out images of each evaluation.
    #[arg(long, default_value_t = 256)]
    eval_size: usize,
    #[arg(long, default_value = "auto")]
    backend: BackendChoice,
    /// The frozen VAE (a FLUX.1 / TAEF1 file or folder); default: the embedded autoencoder. The figures in
    /// docs/TUTORIAL.md were made with `assets/ae/world-only-w32.safetensors`, the one embedded before 2026-11-27.
    #[arg(long)]
    vae: Option<PathBuf>,
}

/// The runs of the synergy ablation: (name in synergy.json and on disk, objective).
pub const SYNERGY_RUNS: [(&str, Objective); 3] =
    [("full", Objective::Full), ("rec_only", Objective::RecOnly), ("und_only", Objective::UndOnly)];

pub fn run(cmd: AblateCommand, group: &dyn Group) -> anyhow::Result<()> {
    let (args, name, variants): (&AblationArgs, &str, Vec<(String, Box<dyn Fn(u64) -> TrainConfig + '_>)>) = match &cmd
    {
        AblateCommand::Synergy(a) => (a, "synergy", {
            SYNERGY_RUNS
                .iter()
                .map(|&(n, o)| (n.to_string(), Box::new(move |s| synergy_recipe(a, o, s)) as _))
                .collect()
        }),
        AblateCommand::InputSpace(a) => (a, "input_space", {
            [("latents", InputSpace::VaeLatents), ("pixels", InputSpace::Pixels)]
                .into_iter()
                .map(|(n, space)| {
                    let recipe = move |s| TrainConfig { input_space: space, ..scaled_quick(a, s) };
                    (n.to_string(), Box::new(recipe) as _)
                })
                .collect()
        }),
        AblateCommand::Decoder { args: a, sizes } => (a, "decoder", {
            let mut variants: Vec<(String, Box<dyn Fn(u64) -> TrainConfig + '_>)> = vec![];
            for size in sizes {
                let decoder = parse_decoder(size)?;
                let recipe =
                    move |s| TrainConfig { decoder: Some(decoder.clone()), ..synergy_recipe(a, Objective::Full, s) };
                variants.push((format!("decoder-{size}"), Box::new(recipe)));
            }
            variants
        }),
        AblateCommand::Tau { args: a, taus } => (a, "tau", {
            anyhow::ensure!(taus.iter().all(|t| t.is_finite() && *t >= 0.0), "--taus must be >= 0");
            taus.iter()
                .map(|&t| (format!("tau-{t}"), Box::new(move |s| TrainConfig { tau: t, ..scaled_quick(a, s) }) as _))
                .collect()
        }),
    };
    anyhow::ensure!(
        args.steps > 0 && args.seeds > 0 && args.eval_size > 0,
        "--steps, --seeds and --eval-size must be positive"
    );
    let seeds: Vec<u64> = (args.seed..args.seed + args.seeds).collect();
    let selected = device::select_for(args.backend, group.local_rank()).map_err(anyhow::Error::msg)?;
    crate::say_rank(group, &selected.reason);
    let device = selected.device.autodiff();
    let stop = stop_on_signal()?;
    for (variant, recipe) in &variants {
        for &seed in &seeds {
            let run = args.out.join(variant).join(format!("seed-{seed}"));
            if run.join(REPORT_FILE).exists() {
                crate::say_rank(group, &format!("{}: finished earlier", run.display()));
                continue;
            }
            let resume = run.join(CONFIG_FILE).exists();
            crate::say_rank(group, &format!("{}: {}", run.display(), if resume { "continuing" } else { "starting" }));
            if let Outcome::Interrupted { .. } =
                train_with_progress(&run, &recipe(seed), resume, &device, group, &stop)?
            {
                anyhow::bail!("interrupted; rerun the same command to continue");
            }
        }
    }
    if !group.is_writer() {
        return Ok(());
    }
    let names: Vec<&str> = variants.iter().map(|(n, _)| n.as_str()).collect();
    let terms: &[Term] = match cmd {
        AblateCommand::Synergy(_) | AblateCommand::Decoder { .. } => &LOSS_TERMS,
        _ => &EVAL_TERMS,
    };
    let summary = summarise(&args.out, &names, &seeds, terms)?;
    let json_path = args.out.join(format!("{name}.json"));
    let text = serde_json::to_string_pretty(&summary)? + "\n";
    fsio::atomic_write(&json_path, text.as_bytes()).with_context(|| json_path.display().to_string())?;
    let png = draw(&args.out.join(format!("{name}.png")), &panels(&summary, &names, terms))?;
    println!("{}\n{}", json_path.display(), png.display());
    print_table(&summary, &names, terms);
    Ok(())
}

/// `WIDTHxDEPTH` -> a decoder tower with heads of 64 channels (the presets' head size).
fn parse_decoder(size: &str) -> anyhow::Result<TowerConfig> {
    let parsed = size.split_once('x').and_then(|(w, d)| Some((w.parse::<usize>().ok()?, d.parse::<usize>().ok()?)));
    match parsed {
        Some((width, depth)) if width >= 64 && width % 64 == 0 && depth > 0 => {
            Ok(TowerConfig { width, depth, heads: width / 64 })
        }
        _ => anyhow::bail!("--sizes: '{size}' is not WIDTHxDEPTH with WIDTH a multiple of 64 and DEPTH > 0"),
    }
}

/// The recipe of one synergy run: the quick recipe's first stage, `steps` long, logged ~100 times.
pub fn synergy_recipe(args: &AblationArgs, objective: Objective, seed: u64) -> TrainConfig {
    let mut cfg = scaled_quick(args, seed);
    cfg.objective = objective;
    cfg.stages.truncate(1);
    cfg.eval_every = 0;
    cfg.log_every = (args.steps / 100).max(1);
    cfg
}

/// The quick recipe (both stages) with `steps` at 64 px and a tenth of them at 128 px, evaluated 4 times.
fn scaled_quick(args: &AblationArgs, seed: u64) -> TrainConfig {
    let mut cfg = TrainConfig::quick();
    (cfg.preset, cfg.seed, cfg.eval_size) = (args.preset, seed, args.eval_size);
    cfg.vae = args.vae.as_ref().map(|p| p.display().to_string());
    for (stage, steps) in cfg.stages.iter_mut().zip([args.steps, (args.steps / 10).max(1)]) {
        stage.steps = steps;
        stage.warmup = steps / 10;
        stage.pixel_loss = args.pixel_loss;
    }
    let total = cfg.total_steps();
    cfg.log_every = (total / 100).max(1);
    cfg.eval_every = (total / 4).max(1);
    cfg.checkpoint_every = (total / 4).max(1);
    cfg
}

/// A quantity summarised across runs: (key in the JSON, figure title, its value in a metrics record).
type Term = (&'static str, &'static str, fn(&Record) -> Option<f64>);

fn step_term(r: &Record, f: fn(&StepRecord) -> Option<f64>) -> Option<f64> {
    if let Record::Step(s) = r { f(s) } else { None }
}

fn eval_term(r: &Record, f: fn(&EvalReport) -> f64) -> Option<f64> {
    if let Record::Eval { report, .. } = r { Some(f(report)) } else { None }
}

/// The loss terms of every logged training step (synergy).
const LOSS_TERMS: [Term; 5] = [
    ("rec", "L_rec (eq. 4)", |r| step_term(r, |s| s.rec)),
    ("pixel", "pixel L1 |x - x^| (with --pixel-loss)", |r| step_term(r, |s| s.pixel_l1)),
    ("latent", "latent L1 |z - z^|", |r| step_term(r, |s| s.latent_l1)),
    ("con", "contrastive loss", |r| step_term(r, |s| s.contrastive)),
    ("cap", "caption loss (nats/token)", |r| step_term(r, |s| s.caption)),
];

/// The held-out evaluations (input-space, tau).
const EVAL_TERMS: [Term; 6] = [
    ("psnr", "held-out PSNR (dB)", |r| eval_term(r, |e| e.psnr)),
    ("ssim", "held-out SSIM", |r| eval_term(r, |e| e.ssim)),
    ("i2t_recall_at_1", "image->text recall@1", |r| eval_term(r, |e| e.i2t_recall_at_1)),
    ("t2i_recall_at_1", "text->image recall@1", |r| eval_term(r, |e| e.t2i_recall_at_1)),
    ("caption_loss", "held-out caption loss (nats/token)", |r| eval_term(r, |e| e.caption_loss)),
    ("chance_recall_at_1", "chance recall@1", |r| eval_term(r, |e| e.chance_recall_at_1)),
];

fn step_of(r: &Record) -> Option<u64> {
    match r {
        Record::Step(s) => Some(s.step),
        Record::Eval { step, .. } => Some(*step),
        _ => None,
    }
}

/// `terms` of every run at every step they were recorded: `runs.<name>` holds the mean over seeds (at the
/// steps every seed recorded), `seeds.<name>` each seed's own series.
fn summarise(out: &Path, names: &[&str], seeds: &[u64], terms: &[Term]) -> anyhow::Result<Value> {
    let (mut runs, mut per_seed) = (serde_json::Map::new(), serde_json::Map::new());
    for name in names {
        let mut series: Vec<BTreeMap<u64, Vec<Option<f64>>>> = vec![];
        for seed in seeds {
            let metrics = out.join(name).join(format!("seed-{seed}")).join(METRICS_FILE);
            let records = ov3_core::train::log::read(&metrics).with_context(|| metrics.display().to_string())?;
            // The last record of a step wins (a resumed run repeats the steps after its checkpoint).
            let by_step: BTreeMap<u64, Vec<Option<f64>>> = records
                .iter()
                .filter_map(|r| {
                    let values: Vec<Option<f64>> = terms.iter().map(|(_, _, f)| f(r)).collect();
                    values.iter().any(Option::is_some).then(|| (step_of(r).unwrap_or(0), values))
                })
                .collect();
            anyhow::ensure!(!by_step.is_empty(), "{}: nothing recorded", metrics.display());
            series.push(by_step);
        }
        let common: Vec<u64> = series[0].keys().copied().filter(|s| series.iter().all(|m| m.contains_key(s))).collect();
        let mut mean = serde_json::Map::new();
        mean.insert("step".into(), json!(common));
        for (i, (key, _, _)) in terms.iter().enumerate() {
            let values: Vec<Option<f64>> = common
                .iter()
                .map(|s| {
                    let v: Option<Vec<f64>> = series.iter().map(|m| m[s][i]).collect();
                    v.map(|v| v.iter().sum::<f64>() / v.len() as f64)
                })
                .collect();
            mean.insert((*key).into(), json!(values));
        }
        runs.insert((*name).into(), Value::Object(mean));
        let each: Vec<Value> = series
            .iter()
            .zip(seeds)
            .map(|(m, seed)| {
                let mut one = serde_json::Map::new();
                one.insert("seed".into(), json!(seed));
                one.insert("step".into(), json!(m.keys().collect::<Vec<_>>()));
                for (i, (key, _, _)) in terms.iter().enumerate() {
                    one.insert((*key).into(), json!(m.values().map(|v| v[i]).collect::<Vec<_>>()));
                }
                Value::Object(one)
            })
            .collect();
        per_seed.insert((*name).into(), json!(each));
    }
    Ok(json!({ "runs": runs, "seeds": per_seed }))
}

/// One panel per term, the runs overlaid (their seed mean), the seeds' range shaded.
fn panels(summary: &Value, names: &[&str], terms: &[Term]) -> Vec<(String, Vec<Series>)> {
    let mut panels = vec![];
    for (key, title, _) in terms {
        let mut lines = vec![];
        for name in names {
            let mean = &summary["runs"][name];
            let points = zip_steps(&mean["step"], &mean[key]);
            let each = summary["seeds"][name].as_array().cloned().unwrap_or_default();
            let mut band: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
            for one in &each {
                for (x, y) in zip_steps(&one["step"], &one[key]) {
                    let e = band.entry(x as u64).or_insert((y, y));
                    *e = (e.0.min(y), e.1.max(y));
                }
            }
            let band = if each.len() > 1 {
                band.into_iter().map(|(x, (lo, hi))| (x as f64, lo, hi)).collect()
            } else {
                vec![]
            };
            lines.push(Series { name: name.replace('_', "-"), points, band });
        }
        panels.push((title.to_string(), lines));
    }
    panels
}

fn zip_steps(steps: &Value, values: &Value) -> Vec<(f64, f64)> {
    let steps = steps.as_array().into_iter().flatten().filter_map(Value::as_f64);
    let values = values.as_array().into_iter().flatten().map(Value::as_f64);
    steps.zip(values).filter_map(|(x, y)| y.map(|y| (x, y))).collect()
}

/// Each term at the first and the last recorded step of each run (seed means).
fn print_table(summary: &Value, names: &[&str], terms: &[Term]) {
    print!("{:12} {:>10}", "run", "steps");
    for (key, _, _) in terms {
        print!(" {key:>19}");
    }
    println!();
    for name in names {
        let run = &summary["runs"][name];
        let steps = run["step"].as_array().cloned().unwrap_or_default();
        let (Some(first), Some(last)) = (steps.first(), steps.last()) else { continue };
        print!("{name:12} {:>10}", format!("{first}-{last}"));
        for (key, _, _) in terms {
            let at = |i: usize| run[key][i].as_f64().map_or("-".to_string(), |v| format!("{v:.4}"));
            print!(" {:>19}", format!("{} -> {}", at(0), at(steps.len() - 1)));
        }
        println!();
    }
}
