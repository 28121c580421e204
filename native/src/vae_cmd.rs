//! `ov3 vae encode|decode`: the frozen autoencoder alone (SPEC §6).

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use ov3_core::image_io::{self, crop_to_multiple, load_rgb, resize_center_crop};
use ov3_core::vae::Vae;
use ov3_core::weights::{Weights, save_f32};

use crate::Common;

#[derive(Subcommand)]
pub enum VaeCommand {
    /// Image -> `latents` [1, 16, H/8, W/8] f32, the unscaled posterior mean, in a safetensors file.
    Encode(EncodeArgs),
    /// `latents` safetensors -> image (.png) or tensor `image` in [-1, 1] (.safetensors).
    Decode(DecodeArgs),
}

#[derive(Args)]
pub struct EncodeArgs {
    #[command(flatten)]
    common: Common,
    /// BFL ae.safetensors, a diffusers folder or its safetensors file, or a TAEF1 folder.
    #[arg(long)]
    vae: PathBuf,
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
    #[arg(long)]
    vae: PathBuf,
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
    }
}

fn encode(args: EncodeArgs) -> anyhow::Result<()> {
    let device = args.common.device()?.device;
    let img = load_rgb(&args.image)?;
    let img = match args.res {
        Some(res) => {
            anyhow::ensure!(res >= 8 && res % 8 == 0, "--res must be a positive multiple of 8, got {res}");
            resize_center_crop(&img, res)
        }
        None => crop_to_multiple(&img, 8),
    };
    anyhow::ensure!(img.width() >= 8 && img.height() >= 8, "{}: image smaller than 8x8", args.image.display());
    let vae = Vae::load(&args.vae, &device)?;
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
    anyhow::ensure!(
        shape.len() == 4 && shape[0] >= 1 && shape[1] == 16,
        "{}: `latents` must be [B, 16, h, w], found {shape:?}",
        args.latents.display()
    );
    let latents = file.tensor("latents", [shape[0], shape[1], shape[2], shape[3]], &device)?;
    let vae = Vae::load(&args.vae, &device)?;
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

fn extension(path: &Path) -> String {
    path.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default()
}
