//! `ov3 data check SPEC`: index a source, decode every item once, print the skip counts and a few samples.
//! `ov3 data prepare real --out DIR`: assemble a real-image dataset from installed packages (data::prepare).

use std::path::PathBuf;

use clap::{Args, Subcommand};
use ov3_core::data::decode::DecodeLimits;
use ov3_core::data::pipeline::{Augment, load_example};
use ov3_core::data::prepare::{PrepareOptions, RealPaths, prepare_real as prepare_real_dataset};
use ov3_core::data::rng::SplitMix64;
use ov3_core::data::skips::SkipCounts;
use ov3_core::data::source::{Source, Spec};

use crate::progress;

#[derive(Subcommand)]
pub enum DataCommand {
    /// Decode every item of SPEC once and report what would be skipped, by reason.
    Check(CheckArgs),
    /// Assemble a dataset from data that packages install (`ov3 data prepare real --out DIR`).
    Prepare {
        #[command(subcommand)]
        what: PrepareCommand,
    },
}

#[derive(Subcommand)]
pub enum PrepareCommand {
    /// Real photographs and photo cut-outs from Debian and PyPI packages (install them first:
    /// `apt install tuxpaint-stamps-default opencv-doc dataset-fashion-mnist`, `pip install scikit-image`)
    /// -> DIR/train and DIR/heldout folder sources, split by source image, with DIR/manifest.json and
    /// DIR/LICENSES.md.
    Real(RealArgs),
}

#[derive(Args)]
pub struct RealArgs {
    #[arg(long)]
    out: PathBuf,
    /// scikit-image's `skimage/data` folder (default: asks python3 where scikit-image is installed).
    #[arg(long)]
    skimage: Option<PathBuf>,
    /// Side of every written image.
    #[arg(long, default_value_t = PrepareOptions::default().res)]
    res: u32,
    /// Scenes composited from each Tux Paint cut-out (training split).
    #[arg(long, default_value_t = PrepareOptions::default().scenes_per_stamp)]
    scenes_per_stamp: usize,
    /// Crops cut from each photograph (training split).
    #[arg(long, default_value_t = PrepareOptions::default().crops_per_photo)]
    crops_per_photo: usize,
    /// Fashion-MNIST images (training split; a tenth of this from its test file is held out).
    #[arg(long, default_value_t = PrepareOptions::default().fashion)]
    fashion: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Where pip put scikit-image's sample data, if python3 can import it.
fn find_skimage() -> Option<PathBuf> {
    let out = std::process::Command::new("python3")
        .args(["-c", "import os, importlib.util as u; s = u.find_spec('skimage'); print(os.path.join(os.path.dirname(s.origin), 'data'))"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let dir = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    (out.status.success() && dir.is_dir()).then_some(dir)
}

fn prepare_real(args: RealArgs) -> anyhow::Result<()> {
    ov3_core::data::decode::check_resolution(args.res, 8).map_err(anyhow::Error::msg)?;
    let paths = RealPaths { skimage: args.skimage.or_else(find_skimage), ..RealPaths::default() };
    let opts = PrepareOptions {
        res: args.res,
        scenes_per_stamp: args.scenes_per_stamp.max(1),
        crops_per_photo: args.crops_per_photo.max(1),
        fashion: args.fashion,
        seed: args.seed,
        ..PrepareOptions::default()
    };
    let bar = progress::bar(0, "{msg:14} {bar:30} {pos}/{len} [{elapsed_precise}]")?;
    let manifest = prepare_real_dataset(&args.out, &paths, &opts, |source, done, total| {
        bar.set_message(source.to_string());
        bar.set_length(total as u64);
        bar.set_position(done as u64 + 1);
    })
    .map_err(anyhow::Error::msg)?;
    bar.finish_and_clear();
    for s in &manifest.sources {
        if s.found {
            println!(
                "{:14} {:5} originals -> {:5} train, {:4} held out ({} skipped)  {}",
                s.name, s.originals, s.train, s.heldout, s.skipped, s.licence
            );
        } else {
            println!("{:14} not found at {} (install: {})", s.name, s.path, s.install);
        }
    }
    println!(
        "wrote {} training and {} held-out images: train with --data {}, evaluate with --data {}",
        manifest.train,
        manifest.heldout,
        args.out.join("train").display(),
        args.out.join("heldout").display()
    );
    Ok(())
}

#[derive(Args)]
pub struct CheckArgs {
    /// A folder, a .jsonl/.csv table, .tar shards (brace ranges allowed) or synthetic:N[:seed].
    spec: String,
    /// Samples to show.
    #[arg(long, default_value_t = 3)]
    show: usize,
    /// Check at most this many items.
    #[arg(long)]
    limit: Option<usize>,
    /// Refuse images with more pixels than this (decompression bombs).
    #[arg(long, default_value_t = DecodeLimits::default().max_pixels)]
    max_pixels: u64,
}

pub fn run(cmd: DataCommand) -> anyhow::Result<()> {
    match cmd {
        DataCommand::Check(args) => check(args),
        DataCommand::Prepare { what: PrepareCommand::Real(args) } => prepare_real(args),
    }
}

fn check(args: CheckArgs) -> anyhow::Result<()> {
    let source = Source::open(&Spec::parse(&args.spec)?)?;
    let limits = DecodeLimits { max_pixels: args.max_pixels, ..DecodeLimits::default() };
    let n = args.limit.unwrap_or(source.len()).min(source.len());
    let mut skips = SkipCounts::default();
    let mut usable = 0;
    for i in 0..n {
        match load_example(&source, i, &Augment::eval(256), limits, &mut SplitMix64::new(0, i as u64)) {
            Ok(example) => {
                if usable < args.show {
                    println!(
                        "sample {}: {}x{} \"{}\"",
                        example.key,
                        example.image.width(),
                        example.image.height(),
                        example.caption
                    );
                }
                usable += 1;
            }
            Err(skip) => skips.add(skip),
        }
    }
    println!("source: {}", source.name);
    println!("indexed: {} items ({})", source.len(), source.index_skips);
    println!("checked: {n} items, {usable} usable ({skips})");
    anyhow::ensure!(usable > 0, "{}: nothing usable among {n} items ({skips})", source.name);
    Ok(())
}
