//! The latent cache: rows match a fresh VAE pass, mirrored crops are mirrored, stale caches are refused,
//! damaged shards are skipped, and training from it works.

use std::path::PathBuf;

use burn::tensor::Device;
use ov3_core::data::latent_cache::{LatentCache, build};
use ov3_core::data::skips::Skip;
use ov3_core::data::source::{Source, Spec};
use ov3_core::image_io::to_tensor;
use ov3_core::vae::Vae;

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(rel)
}

#[test]
fn cached_rows_equal_a_fresh_encode_and_flips_are_mirrors() {
    let device = Device::flex();
    let vae = Vae::embedded(&device).expect("embedded AE");
    let source = Source::open(&Spec::parse("synthetic:5").unwrap()).unwrap();
    let tmp = ov3_core::fsio::ScratchDir::new().unwrap();
    let manifest = build(&source, &vae, 32, true, tmp.path(), &device, |_, _| {}).expect("cache builds");
    assert_eq!(manifest.entries.len(), 10);
    assert_eq!(manifest.latent_shape, [16, 4, 4]);
    let cache = LatentCache::open(tmp.path()).expect("opens");
    for row in [0, 1, 8, 9] {
        let e = cache.example(row).expect("row reads");
        // Independent recomputation: encode the stored crop again (u8 pixels are what was encoded).
        let fresh = vae.encode(to_tensor(&e.image, &device)).into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
        let cached = e.latents.expect("latents");
        let worst = cached.iter().zip(&fresh).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-5, "row {row}: cached latents differ from a fresh encode by {worst}");
    }
    let (plain, mirrored) = (cache.example(2).unwrap().image, cache.example(3).unwrap().image);
    assert_eq!(image::imageops::flip_horizontal(&plain), mirrored);
    assert!(cache.manifest.entries[3].key.ends_with("#flip"));

    // Another VAE or another resolution: refused, with the reason.
    let other = Vae::load(&fixture("vae/taef1_original"), &device).expect("fixture VAE");
    assert!(cache.check(&other, 32).unwrap_err().contains("stale latent cache"));
    assert!(cache.check(&vae, 64).unwrap_err().contains("32 px"));
    assert!(cache.check(&vae, 32).is_ok());

    // A truncated shard: its rows are skipped as truncated, never read as garbage.
    let shard = tmp.path().join(&cache.manifest.shards[0]);
    let len = std::fs::metadata(&shard).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&shard).unwrap();
    f.set_len(len - 100).unwrap();
    assert_eq!(cache.example(9).unwrap_err(), Skip::TruncatedShard);
}
