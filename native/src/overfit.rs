//! `ov3 overfit`: train the whole model on one fixed batch and watch every loss fall.

use std::convert::Infallible;

use burn::tensor::Tensor;
use clap::Args;
use ov3_core::data::synthetic::{Split, World};
use ov3_core::image_io::to_tensor;
use ov3_core::inference::encoder_inputs;
use ov3_core::parallel::Single;
use ov3_core::step::{StepSpec, train_step};
use ov3_core::tokenizer::Tokenizer;
use ov3_core::vae::Vae;
use ov3_core::{Batch, Ov3, optim};

use crate::Common;
use crate::progress;

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
    // The first `batch` scenes of the embedded world, encoded once by the embedded (frozen) autoencoder.
    let world = World::new(args.common.seed, Split::Train);
    let samples: Vec<_> = (0..args.batch as u64).map(|i| world.sample(i, args.res as u32)).collect();
    let images = Tensor::cat(samples.iter().map(|s| to_tensor(&s.image, &device)).collect(), 0);
    let vae = Vae::embedded(&device)?;
    let inputs = encoder_inputs(cfg.input_space, &vae, images.clone());
    let captions: Vec<String> = samples.iter().map(|s| s.caption.clone()).collect();
    let batch = Batch { images, inputs, tokens: Tokenizer::Bytes.batch(&captions, cfg.context_length, &device) };
    let mut model = Ov3::new(&cfg, &device);
    let mut optim = optim::adamw(&model, 0.0);
    // Clipping at 1.0 as the trainer's default; the latent L1 term only (no VAE decoder pass).
    let spec = StepSpec::plain(cfg.tau, args.lr, 1.0);
    eprintln!(
        "overfitting {} embedded-world pairs (e.g. \"{}\"); L_rec uses the latent L1 term only here: back-propagating \
         through the VAE decoder every step would make this demo ~5x slower on a CPU",
        args.batch, captions[0]
    );

    let bar = progress::bar(args.steps as u64, "{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]")?;
    let mut first = None;
    let mut last = 0.0;
    for step in 0..args.steps {
        let stepped = train_step(model, &mut optim, &spec, &Single, || Ok::<_, Infallible>(batch.clone()))
            .map_err(|e| anyhow::anyhow!("step {step}: {e}"))?;
        model = stepped.model;
        last = stepped.record.total;
        first.get_or_insert(last);
        bar.set_message(format!("loss {last:.4}"));
        bar.inc(1);
    }
    bar.finish();
    let first = first.unwrap_or(last);
    println!("total loss {first:.4} -> {last:.4} ({:.1}% lower) in {} steps", 100.0 * (1.0 - last / first), args.steps);
    Ok(())
}
