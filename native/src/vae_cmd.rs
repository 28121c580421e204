//! `ov3 vae encode|decode`: the frozen autoencoder alone (DESIGN §6).

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor};
use clap::{Args, Subcommand};
use image::RgbImage;
use ov3_core::autoencoder::LatentDecoder;
use ov3_core::data::decode::{MAX_PIXELS, check_resolution};
use ov3_core::data::synthetic::{Split, World};
use ov3_core::image_io::{self, crop_to_multiple, load_rgb, resize_center_crop};
use ov3_core::metrics::{block_average_8x, mean_colour, psnr};
use ov3_core::vae::Vae;
use ov3_core::weights::{Weights, save_f32};

use crate::Common;

#[derive(Subcommand)]
pub enum VaeCommand {
    /// Image -> `latents` [1, 16, H/8, W/8] f32, the unscaled posterior mean, in a safetensors file.
    Encode(EncodeArgs),
    /// `latents` safetensors -> image (.png) or tensor `image` in [-1, 1] (.safetensors).
    Decode(DecodeArgs),
    /// Reconstruction PSNR on held-out synthetic scenes and on image files, beside two naive baselines.
    Check(CheckArgs),
}

#[derive(Args)]
pub struct CheckArgs {
    #[command(flatten)]
    common: Common,
    /// As for `encode`; default: the embedded autoencoder.
    #[arg(long)]
    vae: Option<PathBuf>,
    /// Image files to reconstruct (resized and center-cropped to --res).
    #[arg(long, num_args = 0..)]
    images: Vec<PathBuf>,
    /// A data SPEC to reconstruct every item of (e.g. the held-out split of `ov3 data prepare real`).
    #[arg(long)]
    data: Option<String>,
    /// Held-out synthetic scenes to reconstruct.
    #[arg(long, default_value_t = 32)]
    n: u64,
    #[arg(long, default_value_t = 128)]
    res: u32,
}

#[derive(Args)]
pub struct EncodeArgs {
    #[command(flatten)]
    common: Common,
    /// BFL ae.safetensors, a diffusers folder or its safetensors file, or a TAEF1 folder; default: the
    /// embedded autoencoder.
    #[arg(long)]
    vae: Option<PathBuf>,
    #[arg(long)]
    image: PathBuf,
    #[arg(long)]
    out: PathBuf,
    /// Resize the shorter side to RES and center-crop to RES x RES; without it the image is center-cropped
    /// to multiples of 8.
    #[arg(long)]
    res: Option<u32>,
}

#[derive(Args)]
pub struct DecodeArgs {
    #[command(flatten)]
    common: Common,
    /// As for `encode`; default: the embedded autoencoder.
    #[arg(long)]
    vae: Option<PathBuf>,
    #[arg(long)]
    latents: PathBuf,
    /// .png for an image, .safetensors for the tensor `image` in [-1, 1].
    #[arg(long)]
    out: PathBuf,
}

pub fn run(cmd: VaeCommand) -> anyhow::Result<()> {
    match cmd {
        VaeCommand::Encode(a) => encode(a),
        VaeCommand::Decode(a) => decode(a),
        VaeCommand::Check(a) => check(a),
    }
}

fn check(args: CheckArgs) -> anyhow::Result<()> {
    check_res(args.res)?;
    anyhow::ensure!(
        args.n > 0 || !args.images.is_empty() || args.data.is_some(),
        "nothing to check: --n 0 with no --images and no --data"
    );
    let device = args.common.device()?.device;
    let vae = Vae::load_or_embedded(args.vae.as_deref(), &device)?;
    let world = World::new(args.common.seed, Split::Heldout);
    // (row name, its images, whether it is one of --images)
    let mut rows: Vec<(String, Vec<(String, RgbImage)>, bool)> = vec![];
    if args.n > 0 {
        let scenes = (0..args.n).map(|i| (format!("synthetic-{i}"), world.sample(i, args.res).image));
        rows.push((format!("held-out synthetic ({} scenes)", args.n), scenes.collect(), false));
    }
    for path in &args.images {
        let name = path.display().to_string();
        rows.push((name.clone(), vec![(name, resize_center_crop(&load_rgb(path)?, args.res))], true));
    }
    if let Some(spec) = &args.data {
        let images = spec_images(spec, args.res)?;
        rows.push((format!("{spec} ({} images)", images.len()), images, false));
    }
    let mut worst = vec![];
    println!(
        "{:<48} {:>12} {:>16} {:>12} {:>14}",
        format!("PSNR at {} px (dB)", args.res),
        "autoencoder",
        "8x block average",
        "mean colour",
        "worst margin"
    );
    let print_row = |name: &str, s: &Scores| {
        let (ours, block, flat, margin) = (s.mean_ours(), s.mean_block(), s.mean_flat(), s.worst_margin());
        println!("{name:<48} {ours:>12.2} {block:>16.2} {flat:>12.2} {margin:>14.2}");
    };
    // The --images together, as one more row when there are several: issue 23's goals are on the average.
    let mut files = Scores::default();
    for (name, images, is_file) in rows {
        let pixels: Vec<RgbImage> = images.iter().map(|(_, img)| img.clone()).collect();
        let s = score_images(&pixels, |x| LatentDecoder::decode(&vae, vae.encode(x)), &device)?;
        if images.len() > 1 {
            worst.push(format!("{name}: {}", s.worst_image(&images)));
        }
        print_row(&name, &s);
        if is_file {
            files.extend(s);
        }
    }
    if args.images.len() > 1 {
        print_row(&format!("the {} --images, mean", args.images.len()), &files);
    }
    worst.iter().for_each(|w| println!("worst image of {w}"));
    Ok(())
}

/// PSNRs of a reconstruction and of the two naive baselines, per image.
#[derive(Debug, Default)]
pub struct Scores {
    pub ours: Vec<f64>,
    pub block: Vec<f64>,
    pub flat: Vec<f64>,
}

impl Scores {
    /// Appends another set's images.
    pub fn extend(&mut self, other: Scores) {
        self.ours.extend(other.ours);
        self.block.extend(other.block);
        self.flat.extend(other.flat);
    }
    fn mean(v: &[f64]) -> f64 {
        v.iter().sum::<f64>() / v.len().max(1) as f64
    }
    pub fn mean_ours(&self) -> f64 {
        Self::mean(&self.ours)
    }
    pub fn mean_block(&self) -> f64 {
        Self::mean(&self.block)
    }
    pub fn mean_flat(&self) -> f64 {
        Self::mean(&self.flat)
    }
    /// The smallest (reconstruction - 8x block average) over the images: the "on every photo" goal.
    pub fn worst_margin(&self) -> f64 {
        self.ours.iter().zip(&self.block).map(|(a, b)| a - b).fold(f64::INFINITY, f64::min)
    }

    /// The image with the smallest margin, named by its key: "KEY (autoencoder A dB, block average B dB)".
    pub fn worst_image<T>(&self, named: &[(String, T)]) -> String {
        let margins = self.ours.iter().zip(&self.block).map(|(a, b)| a - b);
        let Some((i, _)) = margins.enumerate().min_by(|a, b| a.1.total_cmp(&b.1)) else { return "none".into() };
        format!("{} (autoencoder {:.2} dB, 8x block average {:.2} dB)", named[i].0, self.ours[i], self.block[i])
    }
}

/// Reconstructs each image with `reconstruct` (images in [-1, 1] in and out) and scores it against the
/// 8x block average and the mean colour of the same crop.
pub fn score_images(
    images: &[RgbImage],
    reconstruct: impl Fn(Tensor<4>) -> Tensor<4>,
    device: &Device,
) -> anyhow::Result<Scores> {
    let mut s = Scores::default();
    for img in images {
        let x = image_io::to_tensor(img, device);
        s.ours.push(psnr(x.clone(), reconstruct(x.clone()))?[0]);
        s.block.push(psnr(x.clone(), block_average_8x(x.clone()))?[0]);
        s.flat.push(psnr(x.clone(), mean_colour(x))?[0]);
    }
    Ok(s)
}

/// Every usable item of a data SPEC with its key, resized and center-cropped to `res` (as evaluation sees them).
pub fn spec_images(spec: &str, res: u32) -> anyhow::Result<Vec<(String, RgbImage)>> {
    use ov3_core::data::decode::DecodeLimits;
    use ov3_core::data::pipeline::{Augment, load_example};
    use ov3_core::data::rng::SplitMix64;
    use ov3_core::data::source::{Source, Spec};
    let source = Source::open(&Spec::parse(spec)?)?;
    let images: Vec<(String, RgbImage)> = (0..source.len())
        .filter_map(|i| {
            load_example(&source, i, &Augment::eval(res), DecodeLimits::default(), &mut SplitMix64::new(0, i as u64))
                .ok()
                .map(|e| (e.key, e.image))
        })
        .collect();
    anyhow::ensure!(!images.is_empty(), "{spec}: no usable image");
    Ok(images)
}

fn encode(args: EncodeArgs) -> anyhow::Result<()> {
    let device = args.common.device()?.device;
    let img = load_rgb(&args.image)?;
    let img = match args.res {
        Some(res) => {
            check_res(res)?;
            resize_center_crop(&img, res)
        }
        None => crop_to_multiple(&img, 8),
    };
    anyhow::ensure!(img.width() >= 8 && img.height() >= 8, "{}: image smaller than 8x8", args.image.display());
    let vae = Vae::load_or_embedded(args.vae.as_deref(), &device)?;
    let mean = vae.posterior_mean(image_io::to_tensor(&img, &device));
    let shape = mean.dims().to_vec();
    let values = mean.into_data().convert::<f32>().try_to_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    save_f32(&args.out, &[("latents", shape.clone(), values)])?;
    eprintln!("wrote latents {shape:?} to {}", args.out.display());
    Ok(())
}

fn decode(args: DecodeArgs) -> anyhow::Result<()> {
    let device = args.common.device()?.device;
    let ext = extension(&args.out);
    anyhow::ensure!(ext == "png" || ext == "safetensors", "--out must end in .png or .safetensors");
    let file = Weights::open(&args.latents)?;
    let shape = file.shape("latents")?;
    let pixels = shape.iter().skip(2).product::<usize>() as u64 * 64 * shape.first().copied().unwrap_or(0) as u64;
    anyhow::ensure!(
        shape.len() == 4 && shape[0] >= 1 && shape[1] == 16 && shape[2] >= 1 && shape[3] >= 1 && pixels <= MAX_PIXELS,
        "{}: `latents` must be [B, 16, h, w] with B, h, w >= 1 and at most {MAX_PIXELS} decoded pixels (B x 8h x 8w), \
         found {shape:?}",
        args.latents.display()
    );
    let latents = file.tensor("latents", [shape[0], shape[1], shape[2], shape[3]], &device)?;
    let vae = Vae::load_or_embedded(args.vae.as_deref(), &device)?;
    let image = vae.decode_unscaled(latents);
    if ext == "png" {
        image_io::save_png(&image_io::tensor_to_rgb(&image), &args.out)?;
    } else {
        let dims = image.dims().to_vec();
        let values = image.into_data().convert::<f32>().try_to_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        save_f32(&args.out, &[("image", dims, values)])?;
    }
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

fn check_res(res: u32) -> anyhow::Result<()> {
    check_resolution(res, 8).map_err(|e| anyhow::anyhow!("--res: {e}"))
}

fn extension(path: &Path) -> String {
    path.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default()
}
