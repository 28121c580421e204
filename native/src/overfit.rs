//! `ov3 overfit`: train the whole model on one fixed batch and watch every loss fall.

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use ov3_core::random_batch::random_batch;
use ov3_core::step::train_step;
use ov3_core::{Frozen, LossWeights, Ov3, optim};

use crate::Common;

#[derive(Args)]
pub struct OverfitArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 300)]
    steps: usize,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Image resolution in pixels (a multiple of 16).
    #[arg(long, default_value_t = 128)]
    res: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
}

pub fn run(args: OverfitArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.res >= 16 && args.res % 16 == 0, "--res must be a positive multiple of 16, got {}", args.res);
    anyhow::ensure!(args.batch >= 2, "--batch must be at least 2 (the contrastive loss needs negatives)");
    let selected = args.common.device()?;
    let device = selected.device.autodiff();
    let cfg = args.common.preset.config();
    let batch = random_batch(&cfg, args.batch, args.res, &device);
    let mut model = Ov3::new(&cfg, &device);
    let mut optim = optim::adamw(&model, 0.0);
    let weights = LossWeights::default();
    eprintln!("no VAE yet: L_rec is the latent L1 term only (the pixel term needs the frozen VAE decoder)");

    let bar = ProgressBar::new(args.steps as u64);
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]")?);
    let mut first = None;
    let mut last = 0.0;
    for step in 0..args.steps {
        let (next, out, _) = train_step(model, &mut optim, &batch, &weights, cfg.tau, Frozen::default(), args.lr, 1.0);
        model = next;
        last = out.total.into_scalar::<f32>() as f64;
        anyhow::ensure!(last.is_finite(), "loss became {last} at step {step}");
        first.get_or_insert(last);
        bar.set_message(format!("loss {last:.4}"));
        bar.inc(1);
    }
    bar.finish();
    let first = first.unwrap_or(last);
    println!("total loss {first:.4} -> {last:.4} ({:.1}% lower) in {} steps", 100.0 * (1.0 - last / first), args.steps);
    Ok(())
}
