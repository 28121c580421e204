//! The latent cache: rows match a fresh VAE pass, mirrored crops are mirrored, stale caches are refused,
//! damaged shards are skipped, and training from it works.

use std::path::PathBuf;

use burn::tensor::Device;
use ov3_core::data::latent_cache::{Crops, LatentCache, build};
use ov3_core::data::skips::Skip;
use ov3_core::data::source::{Source, Spec};
use ov3_core::image_io::to_tensor;
use ov3_core::vae::Vae;

/// A folder of PNG "photographs" NAME.png, each captioned "photo NAME" in NAME.txt, of `size` pixels whose
/// channels are `pixel(image index, x, y)` modulo 256.
fn photo_folder(
    names: &[&str],
    size: (u32, u32),
    pixel: impl Fn(u32, u32, u32) -> [u32; 3],
) -> ov3_core::fsio::ScratchDir {
    let dir = ov3_core::fsio::ScratchDir::new().unwrap();
    for (i, name) in names.iter().enumerate() {
        let img = image::RgbImage::from_fn(size.0, size.1, |x, y| image::Rgb(pixel(i as u32, x, y).map(|c| c as u8)));
        img.save(dir.path().join(format!("{name}.png"))).unwrap();
        std::fs::write(dir.path().join(format!("{name}.txt")), format!("photo {name}")).unwrap();
    }
    dir
}

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(rel)
}

#[test]
fn cached_rows_equal_a_fresh_encode_and_flips_are_mirrors() {
    let device = Device::flex();
    let vae = Vae::embedded(&device).expect("embedded AE");
    let source = Source::open(&Spec::parse("synthetic:5").unwrap()).unwrap();
    let tmp = ov3_core::fsio::ScratchDir::new().unwrap();
    let manifest =
        build(&source, &vae, 32, Crops::Center { flip: true }, tmp.path(), &device, |_, _| {}).expect("cache builds");
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
    let good =
        build(&source, &vae, 32, Crops::Center { flip: false }, tmp.path(), &device, |_, _| {}).expect("cache builds");
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
    build(&source, &vae, 48, Crops::Center { flip: false }, tmp.path(), &device, |_, _| {}).expect("first build");
    // The progress callback runs after the last shard is written and before the manifest: a panic there
    // is a kill at the worst moment.
    let killed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = build(&source, &vae, 32, Crops::Center { flip: false }, tmp.path(), &device, |done, total| {
            if done == total {
                panic!("killed");
            }
        });
    }));
    assert!(killed.is_err());
    let err = LatentCache::open(tmp.path()).expect_err("a half-rebuilt cache must not open").to_string();
    assert!(err.contains("manifest.json"), "{err}");
    // Rebuilt to the end, it opens with the new resolution.
    build(&source, &vae, 32, Crops::Center { flip: false }, tmp.path(), &device, |_, _| {}).expect("rebuild");
    assert_eq!(LatentCache::open(tmp.path()).unwrap().manifest.resolution, 32);
}

/// `Crops::Random { count: 4, first: 0 }` over three photographs and two scenes of the embedded world: four
/// different random crops per photograph, none of them its center crop; the world's scenes (rendered at the resolution asked,
/// uncropped) stored once; rows equal a fresh encode of their pixels; the opened source has one item per
/// original item, and loading an item draws one of its own crops, several different ones over visits.
#[test]
fn random_crops_are_one_item_each_and_one_is_drawn_per_visit() {
    use std::collections::BTreeSet;

    use ov3_core::data::decode::DecodeLimits;
    use ov3_core::data::pipeline::{Augment, load_example};
    use ov3_core::data::rng::SplitMix64;

    let device = Device::flex();
    let vae = Vae::embedded(&device).expect("embedded AE");
    let photos = photo_folder(&["a", "b", "c"], (96, 64), |i, x, y| [x * 2 + i * 40, y * 3, (x * y) % 251]);
    let spec = format!("{}+synthetic:2", photos.path().display());
    let source = Source::open(&Spec::parse(&spec).unwrap()).unwrap();
    assert_eq!(source.len(), 5);
    let tmp = ov3_core::fsio::ScratchDir::new().unwrap();
    assert!(
        build(&source, &vae, 32, Crops::Random { count: 0, first: 0 }, tmp.path(), &device, |_, _| {}).is_err(),
        "0 crops refused"
    );
    let manifest = build(&source, &vae, 32, Crops::Random { count: 4, first: 0 }, tmp.path(), &device, |_, _| {})
        .expect("cache builds");
    assert_eq!(manifest.crops, 4);
    let items = manifest.items();
    let sizes: Vec<usize> = items.iter().map(|r| r.len()).collect();
    assert_eq!(sizes, vec![4, 4, 4, 1, 1], "four crops per photograph, one per scene");
    let cache = LatentCache::open(tmp.path()).expect("opens");
    for (p, rows) in items.iter().take(3).enumerate() {
        let center = load_example(&source, p, &Augment::eval(32), DecodeLimits::default(), &mut SplitMix64::new(0, 0))
            .unwrap()
            .image;
        let crops: Vec<_> = rows.clone().map(|r| cache.example(r).unwrap()).collect();
        for (k, c) in crops.iter().enumerate() {
            assert_ne!(c.image, center, "photo {p} crop {k} is the center crop");
            assert_eq!(c.caption, format!("photo {}", ["a", "b", "c"][p]));
            assert!(crops[..k].iter().all(|o| o.image != c.image), "photo {p}: crop {k} repeats an earlier one");
        }
    }
    let e = cache.example(5).unwrap();
    let fresh = vae.encode(to_tensor(&e.image, &device)).into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
    let worst = e.latents.unwrap().iter().zip(&fresh).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-5, "cached latents differ from a fresh encode by {worst}");

    let cached = Source::open(&Spec::parse(&format!("cache:{}", tmp.path().display())).unwrap()).unwrap();
    assert_eq!(cached.len(), 5, "one item per original item");
    let aug = Augment::train(32);
    let drawn: BTreeSet<String> = (0..24)
        .map(|visit| {
            load_example(&cached, 1, &aug, DecodeLimits::default(), &mut SplitMix64::new(visit, 1)).unwrap().key
        })
        .collect();
    let own: BTreeSet<String> = items[1].clone().map(|r| cache.manifest.entries[r].key.clone()).collect();
    assert!(drawn.is_subset(&own), "{drawn:?} drawn, the item's crops are {own:?}");
    assert!(drawn.len() >= 3, "24 visits drew only {drawn:?}");
}

/// Random crops make encoded batches of varying size, so shards do not end at a multiple of the shard size:
/// every manifest entry must still point at its own crop's pixels (a cache of 16,525 crops was refused when
/// rows were numbered by entry count: "shard 0 row 0 is listed twice").
#[test]
fn random_crop_entries_point_at_their_own_rows_across_shards() {
    use ov3_core::data::decode::DecodeLimits;
    use ov3_core::data::latent_cache::build_sharded;
    use ov3_core::data::pipeline::{Augment, load_example};
    use ov3_core::data::rng::SplitMix64;

    let device = Device::flex();
    let vae = Vae::embedded(&device).expect("embedded AE");
    let photos =
        photo_folder(&["p0", "p1", "p2", "p3", "p4", "p5"], (80, 48), |i, x, y| [x * 3 + i * 30, y * 5, (x ^ y) * 7]);
    let source = Source::open(&Spec::parse(&format!("{}+synthetic:2", photos.path().display())).unwrap()).unwrap();
    let tmp = ov3_core::fsio::ScratchDir::new().unwrap();
    // 6 photos x 4 crops + 2 scenes = 26 rows; batches of 16 rows and shards of 10 make two shards of 16 and 10.
    let manifest =
        build_sharded(&source, &vae, 32, Crops::Random { count: 4, first: 0 }, tmp.path(), &device, 10, |_, _| {})
            .expect("cache builds");
    assert_eq!(manifest.entries.len(), 26);
    assert!(manifest.shards.len() >= 2, "{} shard(s)", manifest.shards.len());
    let cache = LatentCache::open(tmp.path()).expect("a cache whose shards are not all full opens");
    for (i, rows) in manifest.items().iter().enumerate() {
        for (k, r) in rows.clone().enumerate() {
            // The crop recomputed from the source with the seed the build draws crop k of item i with.
            let expected = load_example(
                &source,
                i,
                &Augment::train(32),
                DecodeLimits::default(),
                &mut SplitMix64::new(1 + k as u64, i as u64),
            )
            .unwrap();
            let got = cache.example(r).unwrap();
            assert!(got.image == expected.image, "entry {r} (item {i} crop {k}) holds another crop's pixels");
        }
    }
}

/// `first` starts each item at a later crop of the same sequence: a `{ count: 2, first: 2 }` cache holds
/// exactly the pixels and keys of crops 2 and 3 of a `{ count: 4, first: 0 }` cache of the same source,
/// none of crops 0 and 1, and its manifest says where its crops start.
#[test]
fn a_first_crop_cache_holds_the_later_crops_of_a_longer_one() {
    let device = Device::flex();
    let vae = Vae::embedded(&device).expect("embedded AE");
    let photos = photo_folder(&["q0", "q1", "q2"], (72, 56), |i, x, y| [x * 3 + i * 50, y * 4, (x * 7 + y * 11) % 253]);
    let source = Source::open(&Spec::parse(&photos.path().display().to_string()).unwrap()).unwrap();
    let (long_dir, late_dir) = (ov3_core::fsio::ScratchDir::new().unwrap(), ov3_core::fsio::ScratchDir::new().unwrap());
    let long = build(&source, &vae, 32, Crops::Random { count: 4, first: 0 }, long_dir.path(), &device, |_, _| {})
        .expect("4-crop cache builds");
    let late = build(&source, &vae, 32, Crops::Random { count: 2, first: 2 }, late_dir.path(), &device, |_, _| {})
        .expect("later-crops cache builds");
    assert_eq!((long.first_crop, late.first_crop, late.crops), (0, 2, 2));
    let (long_cache, late_cache) =
        (LatentCache::open(long_dir.path()).unwrap(), LatentCache::open(late_dir.path()).unwrap());
    assert_eq!(late_cache.manifest.first_crop, 2, "the manifest read back keeps where the crops start");
    let (long_items, late_items) = (long.items(), late.items());
    assert_eq!(late_items.iter().map(|r| r.len()).collect::<Vec<_>>(), vec![2, 2, 2]);
    for (i, (l, t)) in long_items.iter().zip(&late_items).enumerate() {
        let early: Vec<_> = l.clone().take(2).map(|r| long_cache.example(r).unwrap().image).collect();
        for (k, (lr, tr)) in l.clone().skip(2).zip(t.clone()).enumerate() {
            let (a, b) = (long_cache.example(lr).unwrap(), late_cache.example(tr).unwrap());
            assert!(a.image == b.image, "item {i}: the late cache's crop {k} is not the long cache's crop {}", k + 2);
            assert!(!early.contains(&b.image), "item {i}: the late cache holds one of crops 0-1");
            assert_eq!(long.entries[lr].key, late.entries[tr].key);
            assert!(late.entries[tr].key.ends_with(&format!("#crop{}", k + 2)), "{}", late.entries[tr].key);
        }
    }
}
