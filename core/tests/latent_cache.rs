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

/// A manifest is checked whole when the cache opens: entries that point past the shards or past a
/// shard's rows, or shards that do not match what the manifest says, are refused with a reason instead of
/// panicking on an index or reading image bytes as latents.
#[test]
fn a_bad_manifest_is_refused_when_the_cache_opens() {
    let device = Device::flex();
    let vae = Vae::embedded(&device).expect("embedded AE");
    let source = Source::open(&Spec::parse("synthetic:3").unwrap()).unwrap();
    let tmp = ov3_core::fsio::ScratchDir::new().unwrap();
    let good = build(&source, &vae, 32, false, tmp.path(), &device, |_, _| {}).expect("cache builds");
    let manifest_path = tmp.path().join("manifest.json");
    let write = |m: &serde_json::Value| std::fs::write(&manifest_path, serde_json::to_vec(m).unwrap()).unwrap();
    let original: serde_json::Value = serde_json::to_value(&good).unwrap();
    let refused = |edit: &dyn Fn(&mut serde_json::Value), expect: &str| {
        let mut m = original.clone();
        edit(&mut m);
        write(&m);
        let err = LatentCache::open(tmp.path()).expect_err(expect).to_string();
        assert!(err.contains(expect), "expected `{expect}` in: {err}");
    };
    refused(&|m| m["entries"][1]["shard"] = 7.into(), "does not exist");
    refused(&|m| m["entries"][2]["row"] = 3.into(), "does not exist");
    refused(&|m| m["entries"][2]["row"] = 0.into(), "listed twice");
    refused(&|m| m["latent_shape"] = serde_json::json!([16, 8, 8]), "does not fit 32 px");
    refused(&|m| m["resolution"] = 64.into(), "does not fit 64 px");
    refused(&|m| m["shards"][0] = "../elsewhere.safetensors".into(), "not a file of this folder");
    refused(&|m| m["shard_bytes"][0] = 12.into(), "truncated or replaced");
    write(&original);
    assert_eq!(LatentCache::open(tmp.path()).expect("the unedited manifest opens").manifest.entries.len(), 3);
}

/// A rebuild killed after writing new shards but before its manifest must not leave the old manifest
/// describing the new shards (here 32 px rows read as if they were 48 px ones).
#[test]
fn a_killed_rebuild_never_leaves_an_old_manifest_over_new_shards() {
    let device = Device::flex();
    let vae = Vae::embedded(&device).expect("embedded AE");
    let source = Source::open(&Spec::parse("synthetic:3").unwrap()).unwrap();
    let tmp = ov3_core::fsio::ScratchDir::new().unwrap();
    build(&source, &vae, 48, false, tmp.path(), &device, |_, _| {}).expect("first build");
    // The progress callback runs after the last shard is written and before the manifest: a panic there
    // is a kill at the worst moment.
    let killed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = build(&source, &vae, 32, false, tmp.path(), &device, |done, total| {
            if done == total {
                panic!("killed");
            }
        });
    }));
    assert!(killed.is_err());
    let err = LatentCache::open(tmp.path()).expect_err("a half-rebuilt cache must not open").to_string();
    assert!(err.contains("manifest.json"), "{err}");
    // Rebuilt to the end, it opens with the new resolution.
    build(&source, &vae, 32, false, tmp.path(), &device, |_, _| {}).expect("rebuild");
    assert_eq!(LatentCache::open(tmp.path()).unwrap().manifest.resolution, 32);
}
