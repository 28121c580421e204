//! From a source to batches: decode, convert to RGB8, resize and crop (random-resized-crop + optional flip
//! for training, center crop for evaluation), in a deterministic order per seed and epoch, decoded by worker
//! threads ahead of the trainer with bounded memory, and resumable from a (epoch, index) position.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, sync_channel};

use image::RgbImage;

use super::decode::DecodeLimits;
use super::rng::SplitMix64;
use super::skips::{Skip, SkipCounts};
use super::source::{DataError, Item, Source};
use crate::image_io::{FilterType, resize_center_crop, resize_region};

/// How images become training inputs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Augment {
    pub resolution: u32,
    /// Random-resized-crop (area fraction in [min_scale, 1], aspect in [3/4, 4/3]); otherwise center crop.
    pub random_crop: bool,
    pub min_scale: f64,
    /// Horizontal flips with probability 1/2. Off by default: captions may say "left" and "right".
    pub hflip: bool,
}

impl Augment {
    pub fn eval(resolution: u32) -> Self {
        Self { resolution, random_crop: false, min_scale: 1.0, hflip: false }
    }

    pub fn train(resolution: u32) -> Self {
        Self { resolution, random_crop: true, min_scale: 0.8, hflip: false }
    }
}

/// Where the next batch starts: the epoch and the index into that epoch's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Position {
    pub epoch: u64,
    pub index: u64,
}

/// One decoded example.
#[derive(Debug, Clone)]
pub struct Example {
    pub key: String,
    pub image: RgbImage,
    pub caption: String,
    pub label: Option<usize>,
    /// `[C, H/8, W/8]` VAE latents when the example comes from a latent cache.
    pub latents: Option<Vec<f32>>,
}

/// A batch on the host, ready to become tensors.
#[derive(Debug, Clone)]
pub struct HostBatch {
    pub examples: Vec<Example>,
    /// Where the batch after this one starts (what a checkpoint saves).
    pub next: Position,
    /// Items skipped while assembling this batch.
    pub skips: SkipCounts,
}

impl HostBatch {
    /// Rank `rank`'s share of this global batch in a group of `size` processes: its `1 / size` of the
    /// examples, in order. Every rank assembles the same global batch (same order, same skips, same next
    /// position) and converts only its share, so the data is sharded deterministically and a checkpoint's
    /// position means the same for any number of processes.
    pub fn share(&self, rank: usize, size: usize) -> &[Example] {
        let per = self.examples.len() / size;
        &self.examples[rank * per..(rank + 1) * per]
    }

    /// `[B, 3, R, R]` values in [-1, 1], row-major, of `examples`.
    pub fn pixels(examples: &[Example]) -> Vec<f32> {
        let mut out = Vec::new();
        for e in examples {
            let (w, h) = e.image.dimensions();
            let plane = (w * h) as usize;
            let start = out.len();
            out.resize(start + 3 * plane, 0.0);
            for (i, p) in e.image.pixels().enumerate() {
                for c in 0..3 {
                    out[start + c * plane + i] = p.0[c] as f32 / 127.5 - 1.0;
                }
            }
        }
        out
    }
}

/// The permutation of `0..len` for `epoch`: a Fisher-Yates shuffle seeded by (seed, epoch).
pub fn epoch_order(len: usize, seed: u64, epoch: u64) -> Vec<u32> {
    let mut order: Vec<u32> = (0..len as u32).collect();
    let mut g = SplitMix64::new(seed, epoch);
    for i in (1..len).rev() {
        order.swap(i, g.below(i + 1));
    }
    order
}

/// Decodes item `index` and prepares it; the augmentation draws from (seed, epoch, index) only, so the
/// result never depends on thread timing. A panic while decoding (a codec bug on one file) is caught and
/// counted as [`Skip::DecoderPanic`]: it costs that item, not the run, nor every resume after it (which
/// would replay the same file).
pub fn load_example(
    source: &Source,
    index: usize,
    aug: &Augment,
    limits: DecodeLimits,
    g: &mut SplitMix64,
) -> Result<Example, Skip> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| load_uncaught(source, index, aug, limits, g)))
        .unwrap_or(Err(Skip::DecoderPanic))
}

fn load_uncaught(
    source: &Source,
    index: usize,
    aug: &Augment,
    limits: DecodeLimits,
    g: &mut SplitMix64,
) -> Result<Example, Skip> {
    match &source.items[index] {
        Item::Synthetic(i) => {
            let world = source.world.as_ref().expect("a synthetic source has a world");
            let s = world.sample(*i, aug.resolution);
            Ok(Example {
                key: format!("synthetic-{i}"),
                image: s.image,
                caption: s.caption,
                label: Some(s.label),
                latents: None,
            })
        }
        // Cached crops are fixed: the cache was made for one resolution and crops; of an item's several
        // random crops, one per visit.
        Item::Cached(rows) => {
            let row = rows.start + if rows.len() > 1 { g.below(rows.len()) } else { 0 };
            source.cache.as_ref().expect("a cache source has a cache").example(row)
        }
        Item::Idx(i) => {
            let set = source.idx.as_ref().expect("an IDX source has its files");
            let (img, class) = set.get(*i);
            let caption = source.class_caption(class, g);
            // `label` is the embedded world's shape (zero-shot prompts are written for it), not any class id.
            Ok(Example { key: format!("idx-{i}"), image: prepare(&img, aug, g), caption, label: None, latents: None })
        }
        Item::Stored { key, image, caption } => {
            let caption = source.caption(caption, g)?;
            let img = (source.decode)(&source.read(image)?, limits)?;
            Ok(Example { key: key.clone(), image: prepare(&img, aug, g), caption, label: None, latents: None })
        }
    }
}

fn prepare(img: &RgbImage, aug: &Augment, g: &mut SplitMix64) -> RgbImage {
    let res = aug.resolution;
    let mut out = if aug.random_crop {
        let (w, h) = (img.width() as f64, img.height() as f64);
        let area = w * h * (aug.min_scale + (1.0 - aug.min_scale) * g.unit());
        let ratio = ((3.0f64 / 4.0).ln() + g.unit() * ((4.0f64 / 3.0).ln() - (3.0f64 / 4.0).ln())).exp();
        let cw = ((area * ratio).sqrt().min(w).max(1.0)) as u32;
        let ch = ((area / ratio).sqrt().min(h).max(1.0)) as u32;
        let x = g.below((img.width() - cw + 1) as usize) as u32;
        let y = g.below((img.height() - ch + 1) as usize) as u32;
        resize_region(img, Some((x as f64, y as f64, cw as f64, ch as f64)), res, FilterType::Bilinear)
    } else {
        resize_center_crop(img, res)
    };
    if aug.hflip && g.unit() < 0.5 {
        image::imageops::flip_horizontal_in_place(&mut out);
    }
    out
}

/// Batching settings.
#[derive(Debug, Clone, Copy)]
pub struct LoaderConfig {
    pub batch: usize,
    pub seed: u64,
    pub workers: usize,
    /// Batches decoded ahead of the consumer (bounds memory).
    pub prefetch: usize,
    pub augment: Augment,
    pub limits: DecodeLimits,
}

/// Starts a producer thread that yields batches forever from `start`. A source where a whole epoch yields
/// nothing usable sends one error and stops.
pub fn spawn_loader(source: Arc<Source>, cfg: LoaderConfig, start: Position) -> Receiver<Result<HostBatch, DataError>> {
    let (tx, rx) = sync_channel(cfg.prefetch.max(1));
    std::thread::spawn(move || {
        let mut pos = start;
        let mut order = epoch_order(source.len(), cfg.seed, pos.epoch);
        let mut since_success = 0usize;
        loop {
            let mut batch = HostBatch { examples: Vec::new(), next: pos, skips: SkipCounts::default() };
            while batch.examples.len() < cfg.batch {
                if pos.index as usize >= order.len() {
                    pos = Position { epoch: pos.epoch + 1, index: 0 };
                    order = epoch_order(source.len(), cfg.seed, pos.epoch);
                }
                let want = (cfg.batch - batch.examples.len()).min(order.len() - pos.index as usize);
                let indices: Vec<(u64, usize)> =
                    (0..want as u64).map(|k| (pos.index + k, order[(pos.index + k) as usize] as usize)).collect();
                for (result, _) in decode_parallel(&source, &indices, pos.epoch, &cfg) {
                    match result {
                        Ok(example) => {
                            batch.examples.push(example);
                            since_success = 0;
                        }
                        Err(skip) => {
                            batch.skips.add(skip);
                            since_success += 1;
                        }
                    }
                }
                pos.index += want as u64;
                if since_success >= source.len() {
                    let reason = format!("nothing in a whole epoch could be used ({})", batch.skips);
                    let _ = tx.send(Err(DataError::Source { path: source.name.clone(), reason }));
                    return;
                }
            }
            batch.next = pos;
            if tx.send(Ok(batch)).is_err() {
                return; // the consumer is gone
            }
        }
    });
    rx
}

/// Decodes `(position in order, item index)` pairs on `cfg.workers` threads, results in input order.
fn decode_parallel(
    source: &Source,
    indices: &[(u64, usize)],
    epoch: u64,
    cfg: &LoaderConfig,
) -> Vec<(Result<Example, Skip>, u64)> {
    let workers = cfg.workers.clamp(1, indices.len().max(1));
    let mut results: Vec<Option<(Result<Example, Skip>, u64)>> = (0..indices.len()).map(|_| None).collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                scope.spawn(move || {
                    indices
                        .iter()
                        .enumerate()
                        .skip(w)
                        .step_by(workers)
                        .map(|(slot, &(at, item))| {
                            let mut g = SplitMix64::new(cfg.seed ^ epoch.wrapping_mul(0x9E37), at);
                            (slot, load_example(source, item, &cfg.augment, cfg.limits, &mut g), at)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            for (slot, r, at) in h.join().expect("decoder thread") {
                results[slot] = Some((r, at));
            }
        }
    });
    results.into_iter().map(|r| r.expect("every slot decoded")).collect()
}
