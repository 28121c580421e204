//! The latent cache (DESIGN §4): the VAE is frozen, so each image's latents at one resolution and crop never
//! change. `ov3 cache` encodes a source once — center crop, optionally its mirror image too, or several
//! random crops of each item (the training augmentation, drawn once) — into
//! safetensors shards (`latents` f32 `[n, C, R/8, R/8]`, `images` u8 `[n, 3, R, R]`) with a `manifest.json`
//! naming the VAE by a hash of its weights. Training from `cache:DIR` reads rows by offset (no VAE pass;
//! of an item cached as several crops, one drawn per visit);
//! a cache made by another VAE or at another resolution is refused instead of silently used.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use image::RgbImage;
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use super::decode::DecodeLimits;
use super::pipeline::{Augment, Example, load_example};
use super::rng::SplitMix64;
use super::skips::{Skip, SkipCounts};
use super::source::{DataError, Source, read_member};
use crate::fsio::atomic_write;
use crate::vae::Vae;

pub const MANIFEST: &str = "manifest.json";
const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub key: String,
    pub caption: String,
    pub label: Option<usize>,
    pub shard: usize,
    pub row: usize,
    /// The item this row is one crop of (a random-crop cache: an item's rows are consecutive); absent: the
    /// row is an item of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<usize>,
}

/// Which crops a cache holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crops {
    /// Each item's center crop, and with `flip` its mirror image as another item.
    Center { flip: bool },
    /// Up to this many random-resized crops per item (the training augmentation, `Augment::train`, drawn
    /// once, seeded by item and crop), training then drawing one per visit: a run that visits each item more
    /// often than this runs the VAE on each crop once instead of on every visit. Crops that come out the
    /// same (the embedded world renders its scenes at the resolution asked, uncropped) are stored once.
    /// `first` skips that many crops of each item's sequence: `{ count: 3, first: 3 }` holds crops 3-5, the
    /// ones a 6-crop cache adds to a 3-crop one (a fresh cache for a run that has fitted an earlier one).
    Random { count: u32, first: u32 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    /// [`Vae::identity`] of the VAE that made the latents.
    pub vae_identity: String,
    pub vae_source: String,
    pub source: String,
    pub resolution: u32,
    /// Center crops, plus each one mirrored when `flip`.
    pub flip: bool,
    /// Random crops per item ([`Crops::Random`]); 0 for center crops.
    #[serde(default)]
    pub crops: u32,
    /// The index of the first of each item's random crops ([`Crops::Random`]'s `first`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub first_crop: u32,
    pub latent_shape: [usize; 3],
    pub shards: Vec<String>,
    /// Each shard's size in bytes when written (a shard replaced or truncated since is refused).
    #[serde(default)]
    pub shard_bytes: Vec<u64>,
    pub entries: Vec<Entry>,
    pub skips: SkipCounts,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Manifest {
    /// The cache's items as ranges of rows: an item cached as several crops is one range (training draws
    /// one of its rows per visit), any other row an item of its own.
    pub fn items(&self) -> Vec<Range<usize>> {
        let mut items: Vec<Range<usize>> = vec![];
        let entries = &self.entries;
        for (row, e) in entries.iter().enumerate() {
            match items.last_mut() {
                Some(last) if e.item.is_some() && entries[last.start].item == e.item => last.end = row + 1,
                _ => items.push(row..row + 1),
            }
        }
        items
    }
}

/// Encodes every usable item of `source` and writes the cache into `out`. `progress(done, total)` is called
/// after each batch.
pub fn build(
    source: &Source,
    vae: &Vae,
    resolution: u32,
    crops: Crops,
    out: &Path,
    device: &Device,
    progress: impl FnMut(usize, usize),
) -> Result<Manifest, DataError> {
    build_sharded(source, vae, resolution, crops, out, device, ROWS_PER_SHARD, progress)
}

/// How many rows [`build`] writes to a shard before it starts the next (a shard may hold a few more: the
/// crops of one encoded batch stay together).
pub const ROWS_PER_SHARD: usize = 1024;

/// [`build`] with shards of about `rows_per_shard` rows (tests use small ones to cross shard boundaries).
#[allow(clippy::too_many_arguments)]
pub fn build_sharded(
    source: &Source,
    vae: &Vae,
    resolution: u32,
    crops: Crops,
    out: &Path,
    device: &Device,
    rows_per_shard: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<Manifest, DataError> {
    let io = |e: std::io::Error| DataError::Source { path: out.display().to_string(), reason: e.to_string() };
    std::fs::create_dir_all(out).map_err(io)?;
    // A rebuild first takes the old manifest away: killed half-way, it leaves a folder that `open` refuses
    // (no manifest), never an old manifest describing new shards. The manifest is written last.
    match std::fs::remove_file(out.join(MANIFEST)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
        _ => crate::fsio::sync_parent(&out.join(MANIFEST)).map_err(io)?,
    }
    let (aug, flip, n_crops, first_crop) = match crops {
        Crops::Center { flip } => (Augment::eval(resolution), flip, 0, 0),
        Crops::Random { count: 0, .. } => {
            return Err(DataError::Source {
                path: out.display().to_string(),
                reason: "0 random crops per item".into(),
            });
        }
        Crops::Random { count, first } => (Augment::train(resolution), false, count, first),
    };
    let batch = 16usize;
    let row_bytes = 3 * (resolution * resolution) as usize;
    let mut manifest = Manifest {
        version: VERSION,
        vae_identity: vae.identity(),
        vae_source: vae.source.clone(),
        source: source.name.clone(),
        resolution,
        flip,
        crops: n_crops,
        first_crop,
        latent_shape: [0; 3],
        shards: vec![],
        shard_bytes: vec![],
        entries: vec![],
        skips: source.index_skips.clone(),
    };
    // Examples waiting to be encoded, each with the item it is a crop of (random crops only).
    let mut pending: Vec<(Example, Option<usize>)> = vec![];
    let (mut latents, mut images): (Vec<f32>, Vec<u8>) = (vec![], vec![]);
    let total = source.len();
    let mut items = 0;
    for index in 0..total {
        if n_crops > 0 {
            let mut these: Vec<Example> = vec![];
            // u64: `first_crop + n_crops` cannot overflow, whatever a caller passes.
            for k in u64::from(first_crop)..u64::from(first_crop) + u64::from(n_crops) {
                let mut g = SplitMix64::new(1 + k, index as u64);
                match load_example(source, index, &aug, DecodeLimits::default(), &mut g) {
                    Ok(mut e) => {
                        if !these.iter().any(|t| t.image == e.image && t.caption == e.caption) {
                            e.key.push_str(&format!("#crop{k}"));
                            these.push(e);
                        }
                    }
                    Err(skip) => {
                        manifest.skips.add(skip);
                        these.clear();
                        break;
                    }
                }
            }
            if !these.is_empty() {
                pending.extend(these.into_iter().map(|e| (e, Some(items))));
                items += 1;
            }
        } else {
            match load_example(source, index, &aug, DecodeLimits::default(), &mut SplitMix64::new(0, index as u64)) {
                Ok(e) => {
                    if flip {
                        let mut mirrored = e.clone();
                        image::imageops::flip_horizontal_in_place(&mut mirrored.image);
                        mirrored.key.push_str("#flip");
                        pending.push((e, None));
                        pending.push((mirrored, None));
                    } else {
                        pending.push((e, None));
                    }
                }
                Err(skip) => manifest.skips.add(skip),
            }
        }
        let last = index + 1 == total;
        if pending.len() >= batch || (last && !pending.is_empty()) {
            let (z, shape) = encode(vae, pending.iter().map(|(e, _)| e), device);
            manifest.latent_shape = shape;
            for (e, item) in pending.drain(..) {
                // The row within the shard being filled: a batch of random crops varies in size, so shards do
                // not hold exactly `rows_per_shard` rows and the entry count says nothing about the row.
                let (shard, row) = (manifest.shards.len(), images.len() / row_bytes);
                manifest.entries.push(Entry { key: e.key, caption: e.caption, label: e.label, shard, row, item });
                images.extend(chw_bytes(&e.image));
            }
            latents.extend(z);
            let rows = images.len() / row_bytes;
            if rows >= rows_per_shard || last {
                write_shard(out, &mut manifest, &mut latents, &mut images, rows).map_err(io)?;
            }
            progress(index + 1, total);
        }
    }
    if manifest.entries.is_empty() {
        return Err(DataError::Empty { source_name: source.name.clone(), skips: manifest.skips.summary() });
    }
    let json = serde_json::to_vec(&manifest).expect("manifest serialises");
    atomic_write(&out.join(MANIFEST), &json).map_err(io)?;
    // Shards of an earlier, larger build that this manifest does not name.
    for entry in std::fs::read_dir(out).map_err(io)?.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("shard-") && name.ends_with(".safetensors") && !manifest.shards.contains(&name) {
            std::fs::remove_file(entry.path()).map_err(io)?;
        }
    }
    Ok(manifest)
}

fn encode<'a>(vae: &Vae, examples: impl Iterator<Item = &'a Example>, device: &Device) -> (Vec<f32>, [usize; 3]) {
    let images: Vec<Tensor<4>> = examples.map(|e| crate::image_io::to_tensor(&e.image, device)).collect();
    let z = vae.encode(Tensor::cat(images, 0));
    let [_, c, h, w] = z.dims();
    (z.into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 data"), [c, h, w])
}

fn chw_bytes(img: &RgbImage) -> Vec<u8> {
    let plane = (img.width() * img.height()) as usize;
    let mut out = vec![0u8; 3 * plane];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = p.0[c];
        }
    }
    out
}

fn write_shard(
    out: &Path,
    m: &mut Manifest,
    latents: &mut Vec<f32>,
    images: &mut Vec<u8>,
    rows: usize,
) -> std::io::Result<()> {
    let name = format!("shard-{:05}.safetensors", m.shards.len());
    let r = m.resolution as usize;
    let [c, h, w] = m.latent_shape;
    let latent_bytes: Vec<u8> = latents.iter().flat_map(|v| v.to_le_bytes()).collect();
    let views = HashMap::from([
        (
            "latents".to_string(),
            safetensors::tensor::TensorView::new(Dtype::F32, vec![rows, c, h, w], &latent_bytes)
                .map_err(std::io::Error::other)?,
        ),
        (
            "images".to_string(),
            safetensors::tensor::TensorView::new(Dtype::U8, vec![rows, 3, r, r], images)
                .map_err(std::io::Error::other)?,
        ),
    ]);
    let bytes = safetensors::serialize(views, None).map_err(std::io::Error::other)?;
    atomic_write(&out.join(&name), &bytes)?;
    m.shards.push(name);
    m.shard_bytes.push(bytes.len() as u64);
    latents.clear();
    images.clear();
    Ok(())
}

/// An opened cache: the manifest and where each shard's two tensors start.
#[derive(Debug)]
pub struct LatentCache {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// Per shard: byte offsets of the `latents` and `images` data.
    offsets: Vec<(u64, u64)>,
}

/// Where one shard's two tensors are, read from its header and checked against the manifest.
struct ShardLayout {
    rows: usize,
    latents_at: u64,
    images_at: u64,
}

impl LatentCache {
    pub fn open(dir: &Path) -> Result<Self, DataError> {
        let bad = |reason: String| DataError::Source { path: dir.display().to_string(), reason };
        let text = std::fs::read(dir.join(MANIFEST))
            .map_err(|e| bad(format!("no readable {MANIFEST} ({e}); build it with `ov3 cache`")))?;
        let manifest: Manifest = serde_json::from_slice(&text).map_err(|e| bad(format!("bad {MANIFEST}: {e}")))?;
        if manifest.version != VERSION {
            return Err(bad(format!("cache format {} (this ov3 reads {VERSION}); rebuild it", manifest.version)));
        }
        let layouts = validate(dir, &manifest).map_err(bad)?;
        let offsets = layouts.iter().map(|l| (l.latents_at, l.images_at)).collect();
        Ok(Self { dir: dir.to_path_buf(), manifest, offsets })
    }

    /// Refuses a cache the current VAE or resolution did not make.
    pub fn check(&self, vae: &Vae, resolution: u32) -> Result<(), String> {
        let m = &self.manifest;
        if m.vae_identity != vae.identity() {
            return Err(format!(
                "{}: stale latent cache: made by the VAE {} ({}), but this run uses {} ({}); rebuild it with `ov3 cache`",
                self.dir.display(),
                m.vae_source,
                m.vae_identity,
                vae.source,
                vae.identity()
            ));
        }
        if m.resolution != resolution {
            return Err(format!(
                "{}: the cache holds {} px crops, the stage trains at {resolution} px",
                self.dir.display(),
                m.resolution
            ));
        }
        Ok(())
    }

    /// Row `index` as an example with its latents.
    pub fn example(&self, index: usize) -> Result<Example, Skip> {
        let e = &self.manifest.entries[index];
        let r = self.manifest.resolution as usize;
        let [c, h, w] = self.manifest.latent_shape;
        let (lat_at, img_at) = self.offsets[e.shard];
        let path = self.dir.join(&self.manifest.shards[e.shard]);
        let (latent_len, pixel_len) = (4 * c * h * w, 3 * r * r);
        let latent_bytes = read_member(&path, lat_at + (e.row * latent_len) as u64, latent_len as u64)?;
        let pixels = read_member(&path, img_at + (e.row * pixel_len) as u64, pixel_len as u64)?;
        let plane = r * r;
        let image = RgbImage::from_fn(r as u32, r as u32, |x, y| {
            let i = y as usize * r + x as usize;
            image::Rgb([pixels[i], pixels[plane + i], pixels[2 * plane + i]])
        });
        let latents = latent_bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        Ok(Example { key: e.key.clone(), image, caption: e.caption.clone(), label: e.label, latents: Some(latents) })
    }
}

/// Every check a manifest and its shards must pass before a row is read: the latent shape fits the
/// resolution, each shard's header holds `latents` f32 `[rows, C, H, W]` and `images` u8 `[rows, 3, R, R]`
/// whose data lies inside the file (of the size the manifest recorded), and every entry points at a row
/// that exists, each row used once.
fn validate(dir: &Path, m: &Manifest) -> Result<Vec<ShardLayout>, String> {
    let [c, h, w] = m.latent_shape;
    let r = m.resolution as usize;
    if c == 0 || r == 0 || r % 8 != 0 || h * 8 != r || w * 8 != r {
        return Err(format!("bad {MANIFEST}: latent shape {:?} does not fit {r} px crops", m.latent_shape));
    }
    if !m.shard_bytes.is_empty() && m.shard_bytes.len() != m.shards.len() {
        return Err(format!("bad {MANIFEST}: {} shard sizes for {} shards", m.shard_bytes.len(), m.shards.len()));
    }
    let mut layouts = vec![];
    for (i, name) in m.shards.iter().enumerate() {
        if name.contains('/') || name.contains('\\') || name.starts_with('.') {
            return Err(format!("bad {MANIFEST}: shard name `{name}` is not a file of this folder"));
        }
        let layout = shard_layout(&dir.join(name), [c, h, w], r, m.shard_bytes.get(i).copied())
            .map_err(|e| format!("{name}: {e}; rebuild the cache with `ov3 cache`"))?;
        layouts.push(layout);
    }
    let mut used: Vec<Vec<bool>> = layouts.iter().map(|l| vec![false; l.rows]).collect();
    for e in &m.entries {
        let slot = used.get_mut(e.shard).and_then(|rows| rows.get_mut(e.row));
        match slot {
            None => {
                return Err(format!(
                    "bad {MANIFEST}: entry `{}` points at shard {} row {}, which does not exist",
                    e.key, e.shard, e.row
                ));
            }
            Some(true) => return Err(format!("bad {MANIFEST}: shard {} row {} is listed twice", e.shard, e.row)),
            Some(seen) => *seen = true,
        }
    }
    Ok(layouts)
}

/// Reads and checks one shard's safetensors header.
fn shard_layout(
    path: &Path,
    [c, h, w]: [usize; 3],
    r: usize,
    expected_bytes: Option<u64>,
) -> Result<ShardLayout, String> {
    use std::io::Read;
    let mut f = File::open(path).map_err(|e| e.to_string())?;
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    if let Some(expected) = expected_bytes.filter(|&b| b != len) {
        return Err(format!("{len} bytes, {expected} when written (truncated or replaced)"));
    }
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|e| e.to_string())?;
    let n = u64::from_le_bytes(n);
    if n > (1 << 24) || 8 + n > len {
        return Err("not a safetensors file".into());
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| e.to_string())?;
    let header: serde_json::Value = serde_json::from_slice(&header).map_err(|e| e.to_string())?;
    let tensor = |name: &str, dtype: &str, item: usize| -> Result<(usize, Vec<usize>, u64), String> {
        let t = &header[name];
        if t["dtype"].as_str() != Some(dtype) {
            return Err(format!("`{name}` is not {dtype}"));
        }
        let shape: Vec<usize> = t["shape"]
            .as_array()
            .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
            .ok_or_else(|| format!("no `{name}` tensor"))?;
        let (start, end) = match t["data_offsets"].as_array().map(|a| a.as_slice()) {
            Some([s, e]) => (s.as_u64().unwrap_or(u64::MAX), e.as_u64().unwrap_or(0)),
            _ => return Err(format!("`{name}` has no data offsets")),
        };
        let size = shape.iter().try_fold(item, |acc, &d| acc.checked_mul(d));
        if start > end || size != Some((end - start) as usize) || 8 + n + end > len {
            return Err(format!("`{name}`'s data does not match its shape {shape:?} or lies past the end of the file"));
        }
        Ok((shape.first().copied().unwrap_or(0), shape, 8 + n + start))
    };
    let (rows, latent_shape, latents_at) = tensor("latents", "F32", 4)?;
    let (image_rows, image_shape, images_at) = tensor("images", "U8", 1)?;
    if latent_shape.get(1..) != Some(&[c, h, w][..])
        || image_shape.get(1..) != Some(&[3, r, r][..])
        || rows != image_rows
    {
        return Err(format!(
            "holds latents {latent_shape:?} and images {image_shape:?}, the manifest says [rows, {c}, {h}, {w}] and [rows, 3, {r}, {r}]"
        ));
    }
    Ok(ShardLayout { rows, latents_at, images_at })
}

/// Latents of examples that carry them, as one `[B, C, H, W]` tensor; `None` if any lacks them.
pub fn cached_latents(examples: &[Example], shape: [usize; 3], device: &Device) -> Option<Tensor<4>> {
    let mut values = Vec::with_capacity(examples.len() * shape.iter().product::<usize>());
    for e in examples {
        values.extend_from_slice(e.latents.as_ref()?);
    }
    let [c, h, w] = shape;
    Some(Tensor::from_data(TensorData::new(values, [examples.len(), c, h, w]), device))
}
