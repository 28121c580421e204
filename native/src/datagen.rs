//! `ov3 datagen`: write the embedded captioned world in the folder format (`name.png` + `name.txt`).

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use ov3_core::data::synthetic::{Split, World};

use crate::progress;

#[derive(Clone, Copy, ValueEnum)]
enum SplitArg {
    Train,
    Heldout,
}

#[derive(Args)]
pub struct DatagenArgs {
    /// Number of image-caption pairs.
    #[arg(long)]
    n: u64,
    #[arg(long)]
    out: PathBuf,
    /// Image side in pixels.
    #[arg(long, default_value_t = 256)]
    res: u32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, value_enum, default_value = "train")]
    split: SplitArg,
    /// Image file format: png (lossless) or jpg (quality 90, like most web-scale datasets).
    #[arg(long, default_value = "png", value_parser = ["png", "jpg"])]
    format: String,
}

pub fn run(args: DatagenArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.n > 0 && (16..=4096).contains(&args.res), "--n must be positive and --res within 16..=4096");
    std::fs::create_dir_all(&args.out)
        .map_err(|e| anyhow::anyhow!("{}: cannot create folder: {e}", args.out.display()))?;
    let split = match args.split {
        SplitArg::Train => Split::Train,
        SplitArg::Heldout => Split::Heldout,
    };
    let world = World::new(args.seed, split);
    let bar = progress::bar(args.n, "{bar:30} {pos}/{len} images [{elapsed_precise}<{eta_precise}]")?;
    for i in 0..args.n {
        let sample = world.sample(i, args.res);
        let stem = args.out.join(format!("{i:06}"));
        sample.image.save(stem.with_extension(&args.format))?;
        std::fs::write(stem.with_extension("txt"), &sample.caption)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    eprintln!("wrote {} image-caption pairs to {}", args.n, args.out.display());
    Ok(())
}
