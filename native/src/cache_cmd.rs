//! `ov3 cache`: encode a data source once with the frozen VAE into a latent cache (`cache:DIR` for
//! `ov3 train --data`).

use std::path::PathBuf;

use clap::Args;
use ov3_core::data::latent_cache::{Crops, build};
use ov3_core::data::source::{Source, Spec};
use ov3_core::vae::Vae;

use crate::Common;
use crate::progress;

#[derive(Args)]
pub struct CacheArgs {
    #[command(flatten)]
    common: Common,
    /// Data to encode (DESIGN §6 data spec).
    #[arg(long)]
    data: String,
    /// Crops of RES x RES (a multiple of 16): the resolution the stage will train at.
    #[arg(long, default_value_t = 128)]
    res: u32,
    /// Also store every center crop mirrored (doubles the cache; the captions are kept as they are).
    #[arg(long, conflicts_with = "crops")]
    flip: bool,
    /// Instead of the center crop, K random-resized crops of each item (the training augmentation, drawn
    /// once); training draws one per visit. Worth it when a run visits each item more than K times: the
    /// VAE then runs K times per item instead of once per visit (K times the cache's size).
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u32).range(1..=64))]
    crops: Option<u32>,
    /// With --crops K: start at crop N of each item's sequence of random crops (crops N..N+K-1; the seeds do
    /// not depend on K), e.g. `--crops 3 --first-crop 3` for three other crops than a `--crops 3` cache's.
    #[arg(long, value_name = "N", requires = "crops", default_value_t = 0,
        value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    first_crop: u32,
    /// Frozen VAE weights; default: the embedded autoencoder.
    #[arg(long)]
    vae: Option<PathBuf>,
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: CacheArgs) -> anyhow::Result<()> {
    ov3_core::data::decode::check_resolution(args.res, 16).map_err(|e| anyhow::anyhow!("--res: {e}"))?;
    let device = args.common.device()?.device;
    let vae = Vae::load_or_embedded(args.vae.as_deref(), &device)?;
    let source = Source::open(&Spec::parse(&args.data)?)?;
    let bar = progress::bar(source.len() as u64, "encoding {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}]")?;
    let crops = match args.crops {
        Some(count) => Crops::Random { count, first: args.first_crop },
        None => Crops::Center { flip: args.flip },
    };
    let manifest = build(&source, &vae, args.res, crops, &args.out, &device, |done, _| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    println!(
        "{} crops of {} items of {} at {} px in {} shard(s): {} (VAE {}, {}); skipped {}",
        manifest.entries.len(),
        manifest.items().len(),
        manifest.source,
        manifest.resolution,
        manifest.shards.len(),
        args.out.display(),
        manifest.vae_source,
        manifest.vae_identity,
        if manifest.skips.total() == 0 { "nothing".to_string() } else { manifest.skips.summary() }
    );
    println!("train from it with: ov3 train --data cache:{}", args.out.display());
    Ok(())
}
