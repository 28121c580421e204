//! `ov3 data check SPEC`: index a source, decode every item once, print the skip counts and a few samples.

use clap::{Args, Subcommand};
use ov3_core::data::decode::DecodeLimits;
use ov3_core::data::pipeline::{Augment, load_example};
use ov3_core::data::rng::SplitMix64;
use ov3_core::data::skips::SkipCounts;
use ov3_core::data::source::{Source, Spec};

#[derive(Subcommand)]
pub enum DataCommand {
    /// Decode every item of SPEC once and report what would be skipped, by reason.
    Check(CheckArgs),
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
    let DataCommand::Check(args) = cmd;
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
