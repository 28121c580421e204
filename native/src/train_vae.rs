//! `ov3 train-vae`: train the embedded default autoencoder (TAEF1 architecture, reduced width) on the
//! embedded captioned world, then freeze it into a safetensors file.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::Instant;

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Tensor};
use clap::Args;
use indicatif::ProgressBar;

use crate::progress;
use ov3_core::data::decode::DecodeLimits;
use ov3_core::data::pipeline::{Augment, HostBatch, LoaderConfig, Position, spawn_loader};
use ov3_core::data::rng::SplitMix64;
use ov3_core::data::source::{DataError, Source, Spec};
use ov3_core::data::synthetic::{Split, World};
use ov3_core::image_io::to_tensor;
use ov3_core::metrics::psnr;
use ov3_core::vae::embedded::{EMBEDDED_WIDTH, load_tiny, save_tiny};
use ov3_core::vae::taef1::{TinyAutoencoder, TinyConfig};

use ov3_core::parallel::{Group, GroupExt, mean_gradients};

use crate::Common;

#[derive(Args)]
pub struct TrainVaeArgs {
    #[command(flatten)]
    common: Common,
    /// Where to write the frozen weights.
    #[arg(long, default_value = "assets/ae/ov3_tiny_ae.safetensors")]
    out: PathBuf,
    /// Stop after this many minutes (or --steps, whichever comes first); a checkpoint is written every 200 steps.
    #[arg(long, default_value_t = 25.0)]
    minutes: f64,
    #[arg(long, default_value_t = 100_000)]
    steps: usize,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Scenes are rendered at this resolution (a multiple of 8)...
    #[arg(long, default_value_t = 128)]
    res: u32,
    /// ...and trained on random crops of this size: the network is convolutional, so crops keep the scale
    /// of objects while costing (crop/res)^2 of the compute.
    #[arg(long, default_value_t = 64)]
    crop: u32,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = EMBEDDED_WIDTH)]
    width: usize,
    /// Continue from weights written by an earlier `ov3 train-vae` (their width wins over --width).
    #[arg(long)]
    init: Option<PathBuf>,
    /// Real images to train on as well (a data SPEC, e.g. DIR/train from `ov3 data prepare real`): random
    /// crops at random scales, mixed with the embedded world's scenes.
    #[arg(long)]
    data: Option<String>,
    /// With --data, the share of each batch drawn from the embedded world.
    #[arg(long, default_value_t = 0.25)]
    world_share: f64,
    /// Real images to score at the end (a data SPEC, e.g. DIR/heldout), beside 8x block averaging.
    #[arg(long)]
    heldout: Option<String>,
}

/// Images in [-1, 1] through the encoder and decoder; returns (reconstruction, latents).
fn reconstruct(ae: &TinyAutoencoder, x: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
    let z = ae.encoder.forward(x.add_scalar(1.0).div_scalar(2.0));
    (ae.decoder.forward(z.clone()).mul_scalar(2.0).sub_scalar(1.0), z)
}

/// Batches of `batch` real images at `res` px: random-resized crops of 20–100% of the area at any aspect
/// in [3/4, 4/3], flipped half the time, so a few hundred photographs give many scales and views.
fn real_loader(
    spec: &str,
    batch: usize,
    res: u32,
    seed: u64,
) -> anyhow::Result<Receiver<Result<HostBatch, DataError>>> {
    let source = Arc::new(Source::open(&Spec::parse(spec)?)?);
    let augment = Augment { resolution: res, random_crop: true, min_scale: 0.2, hflip: true };
    let cfg = LoaderConfig { batch, seed, workers: 2, prefetch: 4, augment, limits: DecodeLimits::default() };
    Ok(spawn_loader(source, cfg, Position::default()))
}

/// `n` scenes from index `first`, each cropped to `crop` px at a position drawn from its index.
fn batch(world: &World, first: u64, n: usize, res: u32, crop: u32, device: &Device) -> Tensor<4> {
    let images = (first..first + n as u64).map(|i| {
        let img = world.sample(i, res).image;
        let mut g = SplitMix64::new(0xC209, i);
        let (x, y) = (g.below((res - crop + 1) as usize) as u32, g.below((res - crop + 1) as usize) as u32);
        to_tensor(&image::imageops::crop_imm(&img, x, y, crop, crop).to_image(), device)
    });
    Tensor::cat(images.collect(), 0)
}

/// Under `mpirun -np N`, `--batch` is global: each rank renders and steps on its `batch / N` scenes, the
/// gradients are averaged over the group, and rank 0 writes the weights and reports.
pub fn run(args: TrainVaeArgs, group: &dyn Group) -> anyhow::Result<()> {
    anyhow::ensure!(args.res >= 32 && args.res % 8 == 0, "--res must be a multiple of 8 and at least 32");
    anyhow::ensure!(
        args.crop % 8 == 0 && (8..=args.res).contains(&args.crop),
        "--crop must be a multiple of 8, at most --res"
    );
    anyhow::ensure!(
        args.batch >= 1 && args.width % 8 == 0 && args.width > 0,
        "--batch >= 1 and --width a multiple of 8"
    );
    anyhow::ensure!(
        args.batch % group.size() == 0,
        "--batch {} is the global batch and must divide among {} processes",
        args.batch,
        group.size()
    );
    anyhow::ensure!((0.0..=1.0).contains(&args.world_share), "--world-share must be between 0 and 1");
    let share = args.batch / group.size();
    // Per rank: scenes from the world, the rest real crops from --data.
    let n_world = match args.data {
        Some(_) => (share as f64 * args.world_share).round() as usize,
        None => share,
    };
    let real = match &args.data {
        Some(spec) if n_world < share => {
            Some(real_loader(spec, (share - n_world) * group.size(), args.res, args.common.seed)?)
        }
        _ => None,
    };
    let writer = group.is_writer();
    let device = args.common.device_in(group)?.device.autodiff();
    let (mut ae, cfg) = match &args.init {
        Some(path) => {
            let (ae, cfg) = load_tiny(path, &device)?;
            (ae.set_require_grad(true), cfg)
        }
        None => {
            let cfg = TinyConfig::taef1(args.width);
            (ov3_core::device::seeded(&device, args.common.seed, || TinyAutoencoder::new(&cfg, &device)), cfg)
        }
    };
    let mut optim = AdamWConfig::new().with_beta_2(0.99).with_weight_decay(0.0).init();
    let world = World::new(args.common.seed, Split::Train);
    let heldout = World::new(args.common.seed, Split::Heldout);

    let bar = match writer {
        true => progress::bar(args.steps as u64, "{bar:30} {pos} steps {msg} [{elapsed_precise}]")?,
        false => ProgressBar::hidden(),
    };
    let start = Instant::now();
    let mut step = 0;
    // Every rank stops at the same step and follows the same LR: both come from the group's mean clock.
    let mut elapsed = 0.0;
    while step < args.steps && !group.any(elapsed >= args.minutes * 60.0) {
        let first = (step * args.batch + group.rank() * share) as u64;
        let mut parts = Vec::new();
        if n_world > 0 {
            parts.push(batch(&world, first, n_world, args.res, args.crop, &device));
        }
        if let Some(loader) = &real {
            let host = loader.recv().map_err(|_| anyhow::anyhow!("the data loader stopped"))??;
            let mut g = SplitMix64::new(0xC20A, first);
            let crops = host.share(group.rank(), group.size()).iter().map(|e| {
                let (cx, cy) = (
                    g.below((args.res - args.crop + 1) as usize) as u32,
                    g.below((args.res - args.crop + 1) as usize) as u32,
                );
                to_tensor(&image::imageops::crop_imm(&e.image, cx, cy, args.crop, args.crop).to_image(), &device)
            });
            parts.extend(crops);
        }
        let x = Tensor::cat(parts, 0);
        let (x_hat, z) = reconstruct(&ae, x.clone());
        // L1 reconstruction, plus a weak pull of the latents towards unit scale (the tokenizer's convention).
        let loss = (x - x_hat).abs().mean() + z.powi_scalar(2).mean().mul_scalar(1e-3);
        let local = loss.clone().into_scalar::<f32>();
        let mut grads = GradientsParams::from_grads(loss.backward(), &ae);
        let mut shared = [local, start.elapsed().as_secs_f32()];
        mean_gradients(&ae, &mut grads, &mut shared, group);
        let [value, clock] = shared;
        anyhow::ensure!(value.is_finite(), "loss became {value} at step {step}");
        elapsed = clock as f64;
        // Cosine decay to 10% over the time budget.
        let progress = (elapsed / (args.minutes * 60.0)).min(1.0);
        let lr = args.lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()));
        ae = optim.step(lr, ae, grads);
        step += 1;
        bar.set_position(step as u64);
        bar.set_message(format!("L1 {value:.4} lr {lr:.1e}"));
        if writer && step % 200 == 0 {
            save_tiny(&ae, &cfg, &args.out, &format!("checkpoint at step {step}"))?;
        }
    }
    bar.finish();
    if !writer {
        return Ok(());
    }
    let note = format!(
        "ov3 train-vae{}: TAEF1 architecture, width {}, {} steps of batch {} ({} px crops of {} px scenes) on synthetic seed {}{} ({:.1} min, {} process(es))",
        args.init.as_ref().map(|p| format!(" (continued from {})", p.display())).unwrap_or_default(),
        cfg.width,
        step,
        args.batch,
        args.crop,
        args.res,
        args.common.seed,
        args.data
            .as_ref()
            .map(|d| format!(" and {d} ({:.0}% world)", 100.0 * n_world as f64 / share as f64))
            .unwrap_or_default(),
        start.elapsed().as_secs_f64() / 60.0,
        group.size()
    );
    save_tiny(&ae, &cfg, &args.out, &note)?;
    eprintln!("{note}\nwrote {}", args.out.display());

    let x = batch(&heldout, 0, 32, args.res, args.res, &device);
    let (x_hat, z) = reconstruct(&ae, x.clone());
    let scores = psnr(x, x_hat)?;
    let std = z.powi_scalar(2).mean().sqrt().into_scalar::<f32>();
    println!(
        "held-out synthetic PSNR {:.2} dB over {} images at {} px; latent RMS {std:.3}",
        scores.iter().sum::<f64>() / scores.len() as f64,
        scores.len(),
        args.res
    );
    if let Some(spec) = &args.heldout {
        let images = crate::vae_cmd::spec_images(spec, args.res)?;
        let pixels: Vec<_> = images.iter().map(|(_, img)| img.clone()).collect();
        let s = crate::vae_cmd::score_images(&pixels, |x| reconstruct(&ae, x).0, &device)?;
        println!(
            "{spec}: PSNR {:.2} dB over {} images at {} px; 8x block average {:.2} dB; worst margin {:+.2} dB, {}",
            s.mean_ours(),
            images.len(),
            args.res,
            s.mean_block(),
            s.worst_margin(),
            s.worst_image(&images)
        );
    }
    Ok(())
}
