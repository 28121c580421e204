//! Bounded mutation fuzzing of the readers that take bytes from outside: the image decoder and its limits,
//! the safetensors / model-file reader, and the WebDataset tar index. A small harness of our own (no extra
//! dependency, so `cargo test` keeps the CLI's feature set): valid seed inputs made here, 1-4 random
//! mutations each (bit flips, boundary bytes and u32s, digit swaps in text headers, truncation, deleted
//! and duplicated chunks), for `OV3_FUZZ_SECONDS` per target (default 3; CI runs 30), from
//! `OV3_FUZZ_SEED` (default 0, so a run is repeatable on one machine). Each target checks that nothing
//! panics and that whatever is accepted respects the limits; a failing input is written to the temporary
//! directory and named in the message.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ov3_core::data::decode::{DecodeLimits, decode_rgb};
use ov3_core::data::rng::SplitMix64;
use ov3_core::data::source::{Item, Source, Spec};
use ov3_core::weights::Weights;

fn budget() -> Duration {
    let secs = std::env::var("OV3_FUZZ_SECONDS").ok().and_then(|s| s.parse::<f64>().ok()).unwrap_or(3.0);
    Duration::from_secs_f64(secs)
}

fn seed() -> u64 {
    std::env::var("OV3_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// 1-4 random mutations of `input`.
fn mutate(input: &[u8], g: &mut SplitMix64) -> Vec<u8> {
    let mut b = input.to_vec();
    for _ in 0..1 + g.below(4) {
        if b.is_empty() {
            b.push(g.below(256) as u8);
            continue;
        }
        let at = g.below(b.len());
        match g.below(7) {
            0 => b[at] ^= 1 << g.below(8),
            1 => b[at] = [0u8, 1, 0x7f, 0x80, 0xff][g.below(5)],
            2 => {
                let v = [0u32, 1, 0xffff, 0x7fff_ffff, 0xffff_ffff, g.below(1 << 20) as u32][g.below(6)];
                let bytes = if g.below(2) == 0 { v.to_le_bytes() } else { v.to_be_bytes() };
                for (k, x) in bytes.into_iter().enumerate() {
                    if let Some(slot) = b.get_mut(at + k) {
                        *slot = x;
                    }
                }
            }
            3 => {
                // A digit of a text header (safetensors JSON, tar octal sizes) swapped for another.
                if let Some(i) = (at..b.len()).chain(0..at).find(|&i| b[i].is_ascii_digit()) {
                    b[i] = b'0' + g.below(10) as u8;
                }
            }
            4 => b.truncate(at),
            5 => {
                let end = (at + 1 + g.below(64)).min(b.len());
                b.drain(at..end);
            }
            _ => {
                let end = (at + 1 + g.below(64)).min(b.len());
                let chunk = b[at..end].to_vec();
                let to = g.below(b.len() + 1);
                b.splice(to..to, chunk);
            }
        }
    }
    b
}

/// Runs `check` on mutations of the seeds until the budget is spent; a panic fails with the input saved.
fn fuzz(target: &str, seeds: &[Vec<u8>], budget: Duration, check: impl Fn(&[u8])) -> usize {
    let mut g = SplitMix64::new(seed(), target.len() as u64);
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < budget {
        let input = mutate(&seeds[g.below(seeds.len())], &mut g);
        if catch_unwind(AssertUnwindSafe(|| check(&input))).is_err() {
            let path = std::env::temp_dir().join(format!("ov3-fuzz-{target}-{n}.bin"));
            std::fs::write(&path, &input).expect("save the failing input");
            panic!("{target}: iteration {n} (OV3_FUZZ_SEED={}) failed on {}", seed(), path.display());
        }
        n += 1;
    }
    eprintln!("{target}: {n} inputs in {:.1} s", start.elapsed().as_secs_f64());
    n
}

fn encoded(img: image::DynamicImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).expect("encode");
    out.into_inner()
}

#[test]
fn image_decoder_never_panics_and_keeps_its_limits() {
    let rgb = image::RgbImage::from_fn(24, 20, |x, y| image::Rgb([(x * 9) as u8, (y * 11) as u8, 77]));
    let rgba = image::RgbaImage::from_fn(20, 24, |x, y| image::Rgba([(x * 5) as u8, 9, (y * 3) as u8, 200]));
    let seeds = vec![
        encoded(rgb.clone().into(), image::ImageFormat::Png),
        encoded(rgba.clone().into(), image::ImageFormat::Png),
        encoded(rgb.clone().into(), image::ImageFormat::Jpeg),
        encoded(rgb.into(), image::ImageFormat::Bmp),
        encoded(rgba.into(), image::ImageFormat::Gif),
    ];
    let limits = DecodeLimits { max_pixels: 64 * 64, min_side: 4 };
    let n = fuzz("image", &seeds, budget(), |bytes| {
        if let Ok(img) = decode_rgb(bytes, limits) {
            let (w, h) = img.dimensions();
            assert!((w as u64) * (h as u64) <= limits.max_pixels && w.min(h) >= limits.min_side, "{w}x{h} accepted");
        }
    });
    assert!(n > 0);
}

/// A safetensors file like ov3's: three dtypes and the model-config metadata.
fn weights_seed() -> Vec<u8> {
    use safetensors::tensor::TensorView;
    let f32s: Vec<u8> = (0..24).flat_map(|i| (i as f32 * 0.25).to_le_bytes()).collect();
    let f16s: Vec<u8> = (0..8).flat_map(|i| half::f16::from_f32(i as f32).to_le_bytes()).collect();
    let bf16s: Vec<u8> = (0..6).flat_map(|i| half::bf16::from_f32(-(i as f32)).to_le_bytes()).collect();
    let views = vec![
        ("a.weight".to_string(), TensorView::new(safetensors::Dtype::F32, vec![4, 6], &f32s).unwrap()),
        ("b.bias".to_string(), TensorView::new(safetensors::Dtype::F16, vec![8], &f16s).unwrap()),
        ("c.scale".to_string(), TensorView::new(safetensors::Dtype::BF16, vec![2, 3], &bf16s).unwrap()),
    ];
    let cfg = serde_json::to_string(&ov3_core::Preset::Tiny.config()).unwrap();
    let metadata = std::collections::HashMap::from([(ov3_core::model_file::CONFIG_KEY.to_string(), cfg)]);
    safetensors::serialize(views, Some(metadata)).unwrap()
}

#[test]
fn safetensors_reader_never_panics() {
    let seeds = vec![weights_seed()];
    let n = fuzz("safetensors", &seeds, budget(), |bytes| {
        let Ok(w) = Weights::from_bytes(bytes.to_vec(), "fuzz".into()) else { return };
        let keys: Vec<String> = w.keys().map(String::from).collect();
        for key in keys {
            if let Ok(shape) = w.shape(&key) {
                if let Ok(values) = w.values(&key, &shape) {
                    assert_eq!(values.len(), shape.iter().product::<usize>(), "{key}");
                    assert!(values.iter().all(|v| v.is_finite()), "{key}: a non-finite value was accepted");
                }
            }
        }
        let _ = ov3_core::model_file::model_config(&w);
    });
    assert!(n > 0);
}

/// Whole model files through `load_model_bytes` (the page's path): the shipped demo checkpoint with its
/// header mutated (a model is built per input, so this target runs fewer inputs).
#[test]
fn model_file_reader_never_panics_on_a_damaged_header() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets/demo/ov3-tiny-demo.safetensors");
    let file = std::fs::read(path).expect("the demo checkpoint");
    let header = 8 + u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let device = burn::tensor::Device::flex();
    let mut g = SplitMix64::new(seed(), 99);
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < budget() || n < 3 {
        let mut bytes = mutate(&file[..header], &mut g);
        bytes.extend_from_slice(&file[header..]);
        let result = catch_unwind(AssertUnwindSafe(|| {
            let _ = ov3_core::model_file::load_model_bytes(bytes.clone(), "fuzz", &device);
        }));
        if result.is_err() {
            let out = std::env::temp_dir().join(format!("ov3-fuzz-model-{n}.safetensors"));
            std::fs::write(&out, &bytes).unwrap();
            panic!("model file: iteration {n} (OV3_FUZZ_SEED={}) failed on {}", seed(), out.display());
        }
        n += 1;
    }
    eprintln!("model file: {n} inputs");
}

/// A WebDataset shard: image + txt, image + json caption, a caption-less image.
fn tar_seed() -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let png = encoded(image::RgbImage::from_pixel(16, 16, image::Rgb([1, 2, 3])).into(), image::ImageFormat::Png);
    let members: Vec<(&str, Vec<u8>)> = vec![
        ("a/000.png", png.clone()),
        ("a/000.txt", b"a small square".to_vec()),
        ("a/001.png", png.clone()),
        ("a/001.json", br#"{"caption": "another"}"#.to_vec()),
        ("a/002.png", png),
    ];
    for (name, data) in members {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, name, data.as_slice()).unwrap();
    }
    builder.into_inner().unwrap()
}

#[test]
fn tar_index_never_panics_or_reads_past_the_file() {
    let dir = ov3_core::fsio::ScratchDir::new().unwrap();
    let path = dir.path().join("shard.tar");
    let seeds = vec![tar_seed()];
    let n = fuzz("tar", &seeds, budget(), |bytes| {
        std::fs::write(&path, bytes).unwrap();
        let Ok(source) = Source::open(&Spec::Shards(vec![path.clone()])) else { return };
        for item in &source.items {
            if let Item::Stored { image, caption, .. } = item {
                if let Ok(data) = source.read(image) {
                    assert!(data.len() <= bytes.len(), "read more bytes than the shard holds");
                    let _ = decode_rgb(&data, DecodeLimits::default());
                }
                let _ = source.caption(caption, &mut ov3_core::data::rng::SplitMix64::new(0, 0));
            }
        }
    });
    assert!(n > 0);
}
