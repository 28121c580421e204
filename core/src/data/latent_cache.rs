//! The latent cache (SPEC §4): the VAE is frozen, so each image's latents at one resolution and crop never
//! change. `ov3 cache` encodes a source once — center crop, optionally its mirror image too — into
//! safetensors shards (`latents` f32 `[n, C, R/8, R/8]`, `images` u8 `[n, 3, R, R]`) with a `manifest.json`
//! naming the VAE by a hash of its weights. Training from `cache:DIR` reads rows by offset (no VAE pass);
//! a cache made by another VAE or at another resolution is refused instead of silently used.

use std::collections::HashMap;
use std::fs::File;
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
    pub latent_shape: [usize; 3],
    pub shards: Vec<String>,
    pub entries: Vec<Entry>,
    pub skips: SkipCounts,
}

/// Encodes every usable item of `source` and writes the cache into `out`. `progress(done, total)` is called
/// after each batch.
pub fn build(
    source: &Source,
    vae: &Vae,
    resolution: u32,
    flip: bool,
    out: &Path,
    device: &Device,
    mut progress: impl FnMut(usize, usize),
) -> Result<Manifest, DataError> {
    let io = |e: std::io::Error| DataError::Source { path: out.display().to_string(), reason: e.to_string() };
    std::fs::create_dir_all(out).map_err(io)?;
    let aug = Augment::eval(resolution);
    let (rows_per_shard, batch) = (1024usize, 16usize);
    let mut manifest = Manifest {
        version: VERSION,
        vae_identity: vae.identity(),
        vae_source: vae.source.clone(),
        source: source.name.clone(),
        resolution,
        flip,
        latent_shape: [0; 3],
        shards: vec![],
        entries: vec![],
        skips: source.index_skips.clone(),
    };
    let mut pending: Vec<Example> = vec![];
    let (mut latents, mut images): (Vec<f32>, Vec<u8>) = (vec![], vec![]);
    let total = source.len();
    for index in 0..total {
        match load_example(source, index, &aug, DecodeLimits::default(), &mut SplitMix64::new(0, index as u64)) {
            Ok(e) => {
                if flip {
                    let mut mirrored = e.clone();
                    image::imageops::flip_horizontal_in_place(&mut mirrored.image);
                    mirrored.key.push_str("#flip");
                    pending.push(e);
                    pending.push(mirrored);
                } else {
                    pending.push(e);
                }
            }
            Err(skip) => manifest.skips.add(skip),
        }
        let last = index + 1 == total;
        if pending.len() >= batch || (last && !pending.is_empty()) {
            let (z, shape) = encode(vae, &pending, device);
            manifest.latent_shape = shape;
            for e in pending.drain(..) {
                let (shard, row) = (manifest.shards.len(), manifest.entries.len() % rows_per_shard);
                manifest.entries.push(Entry { key: e.key, caption: e.caption, label: e.label, shard, row });
                images.extend(chw_bytes(&e.image));
            }
            latents.extend(z);
            let rows = images.len() / (3 * (resolution * resolution) as usize);
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
    Ok(manifest)
}

fn encode(vae: &Vae, examples: &[Example], device: &Device) -> (Vec<f32>, [usize; 3]) {
    let images: Vec<Tensor<4>> = examples.iter().map(|e| crate::image_io::to_tensor(&e.image, device)).collect();
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

impl LatentCache {
    pub fn open(dir: &Path) -> Result<Self, DataError> {
        let bad = |reason: String| DataError::Source { path: dir.display().to_string(), reason };
        let text = std::fs::read(dir.join(MANIFEST))
            .map_err(|e| bad(format!("no readable {MANIFEST} ({e}); build it with `ov3 cache`")))?;
        let manifest: Manifest = serde_json::from_slice(&text).map_err(|e| bad(format!("bad {MANIFEST}: {e}")))?;
        if manifest.version != VERSION {
            return Err(bad(format!("cache format {} (this ov3 reads {VERSION}); rebuild it", manifest.version)));
        }
        let offsets = manifest
            .shards
            .iter()
            .map(|s| data_offsets(&dir.join(s)).map_err(|e| bad(format!("{s}: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
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

/// Absolute file offsets of the `latents` and `images` data in a shard (from its safetensors header).
fn data_offsets(path: &Path) -> Result<(u64, u64), String> {
    use std::io::Read;
    let mut f = File::open(path).map_err(|e| e.to_string())?;
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|e| e.to_string())?;
    let n = u64::from_le_bytes(n);
    if n > 1 << 24 {
        return Err("not a safetensors file".into());
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| e.to_string())?;
    let header: serde_json::Value = serde_json::from_slice(&header).map_err(|e| e.to_string())?;
    let start = |name: &str| {
        header[name]["data_offsets"][0].as_u64().map(|o| 8 + n + o).ok_or_else(|| format!("no `{name}` tensor"))
    };
    Ok((start("latents")?, start("images")?))
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
