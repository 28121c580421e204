//! Every source type and every kind of bad input, with the bad files made here. The WebDataset shards are
//! written by Python's `tarfile`, the reference writer, and must read back byte for byte.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::{ImageBuffer, Luma, Rgb, Rgba};
use ov3_core::data::decode::DecodeLimits;
use ov3_core::data::pipeline::{Augment, LoaderConfig, Position, load_example, spawn_loader};
use ov3_core::data::rng::SplitMix64;
use ov3_core::data::skips::{Skip, SkipCounts};
use ov3_core::data::source::{Bytes, Item, Source, Spec};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/data").join(name)
}

fn png_bytes(img: image::DynamicImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).expect("encode png");
    out.into_inner()
}

fn rgb(w: u32, h: u32) -> Vec<u8> {
    png_bytes(ImageBuffer::from_fn(w, h, |x, y| Rgb([(x * 7) as u8, (y * 5) as u8, 90])).into())
}

/// A 54-byte BMP header that claims 60000 x 60000 pixels (3.6 Gpx) and holds none.
fn bomb_bmp() -> Vec<u8> {
    let mut b = b"BM".to_vec();
    for v in [54u32, 0, 54, 40] {
        b.extend(v.to_le_bytes());
    }
    b.extend(60_000i32.to_le_bytes());
    b.extend(60_000i32.to_le_bytes());
    b.extend(1u16.to_le_bytes());
    b.extend(24u16.to_le_bytes());
    b.extend([0u8; 24]);
    b
}

/// (file name, image bytes, caption bytes or None) of every case; the good ones first.
fn cases() -> Vec<(&'static str, Vec<u8>, Option<Vec<u8>>)> {
    let good_caption = |s: &str| Some(s.as_bytes().to_vec());
    let rgb16: image::DynamicImage =
        ImageBuffer::from_fn(20, 20, |x, _| Rgb([x as u16 * 3000, 100u16, 65535u16])).into();
    let gray: image::DynamicImage = ImageBuffer::from_fn(20, 18, |x, _| Luma([x as u8 * 10])).into();
    let rgba: image::DynamicImage = ImageBuffer::from_fn(18, 20, |x, _| Rgba([200, x as u8, 0, 128])).into();
    let valid = rgb(32, 32);
    vec![
        ("rgb.png", valid.clone(), good_caption("an rgb image")),
        ("rgb16.png", png_bytes(rgb16), good_caption("sixteen bits per channel")),
        ("gray.png", png_bytes(gray), good_caption("a grayscale image")),
        ("rgba.png", png_bytes(rgba), good_caption("an image with alpha")),
        ("cmyk.jpg", std::fs::read(fixture("cmyk.jpg")).expect("fixture"), good_caption("a CMYK jpeg")),
        ("palette.gif", std::fs::read(fixture("palette.gif")).expect("fixture"), good_caption("a palette gif")),
        ("long.png", rgb(24, 24), Some("very long ".repeat(2000).into_bytes())),
        ("zero.png", vec![], good_caption("zero bytes")),
        ("truncated.png", valid[..valid.len() / 2].to_vec(), good_caption("truncated")),
        ("corrupt.jpg", (0..500u32).map(|i| (i * 31 % 251) as u8).collect(), good_caption("random bytes")),
        ("text.png", b"this is not an image".to_vec(), good_caption("text")),
        ("tiny.png", rgb(1, 1), good_caption("one pixel")),
        ("bomb.bmp", bomb_bmp(), good_caption("a decompression bomb")),
        ("empty.png", rgb(20, 20), good_caption("   ")),
        ("latin1.png", rgb(20, 20), Some(vec![0x63, 0x61, 0x66, 0xE9, 0xFF])),
        ("nocaption.png", rgb(20, 20), None),
    ]
}

const USABLE: usize = 7;

fn expected_load_skips() -> SkipCounts {
    let mut s = SkipCounts::default();
    for (skip, n) in [
        (Skip::CorruptImage, 4),
        (Skip::TooSmall, 1),
        (Skip::TooLarge, 1),
        (Skip::EmptyCaption, 1),
        (Skip::NonUtf8Caption, 1),
    ] {
        for _ in 0..n {
            s.add(skip);
        }
    }
    s
}

fn write_folder(dir: &Path) {
    for (name, image, caption) in cases() {
        std::fs::write(dir.join(name), image).expect("write image");
        if let Some(c) = caption {
            std::fs::write(dir.join(name).with_extension("txt"), c).expect("write caption");
        }
    }
}

/// Decodes every item once: (usable count, skips).
fn check_all(source: &Source) -> (usize, SkipCounts) {
    let mut skips = SkipCounts::default();
    let mut usable = 0;
    for i in 0..source.len() {
        match load_example(source, i, &Augment::eval(32), DecodeLimits::default(), &mut SplitMix64::new(0, i as u64)) {
            Ok(e) => {
                assert_eq!(e.image.dimensions(), (32, 32), "{}", e.key);
                usable += 1;
            }
            Err(s) => skips.add(s),
        }
    }
    (usable, skips)
}

#[test]
fn folder_source_skips_and_counts_every_bad_case() {
    let dir = ov3_core::fsio::ScratchDir::new().expect("temp dir");
    write_folder(dir.path());
    let source = Source::open(&Spec::parse(dir.path().to_str().expect("utf-8")).expect("spec")).expect("opens");
    assert_eq!(source.index_skips.get(Skip::MissingCaption), 1, "{}", source.index_skips);
    assert_every_case_classified(&source);
}

/// All of [`cases`] indexed: the good ones usable, each bad one skipped for its own reason.
fn assert_every_case_classified(source: &Source) {
    let (usable, skips) = check_all(source);
    assert_eq!(usable, USABLE, "{skips}");
    assert_eq!(skips, expected_load_skips(), "{skips}");
}

#[test]
fn jsonl_and_csv_tables_resolve_paths_relative_to_the_file() {
    let dir = ov3_core::fsio::ScratchDir::new().expect("temp dir");
    let images = dir.path().join("img");
    std::fs::create_dir(&images).expect("mkdir");
    write_folder(&images);
    let jsonl = "{\"image\": \"img/rgb.png\", \"caption\": \"from jsonl\"}\n\
                 {\"image\": \"img/gray.png\", \"caption\": \"second\"}\n\
                 not json at all\n\
                 {\"image\": \"img/rgba.png\"}\n\
                 {\"image\": \"img/missing.png\", \"caption\": \"no such file\"}\n";
    std::fs::write(dir.path().join("pairs.jsonl"), jsonl).expect("write");
    let csv = "image,caption\nimg/rgb.png,\"from csv, with a comma\"\nimg/zero.png,zero\n";
    std::fs::write(dir.path().join("pairs.csv"), csv).expect("write");

    let s =
        Source::open(&Spec::parse(dir.path().join("pairs.jsonl").to_str().expect("p")).expect("spec")).expect("opens");
    assert_eq!((s.len(), s.index_skips.get(Skip::BadRow), s.index_skips.get(Skip::MissingCaption)), (3, 1, 1));
    let (usable, skips) = check_all(&s);
    assert_eq!((usable, skips.get(Skip::Unreadable)), (2, 1), "{skips}");

    let s =
        Source::open(&Spec::parse(dir.path().join("pairs.csv").to_str().expect("p")).expect("spec")).expect("opens");
    let Item::Stored { caption, .. } = &s.items[0] else { panic!("stored item") };
    assert_eq!(s.caption(caption, &mut SplitMix64::new(0, 0)).expect("caption"), "from csv, with a comma");
    let (usable, skips) = check_all(&s);
    assert_eq!((usable, skips.get(Skip::CorruptImage)), (1, 1));
}

/// Writes shards with Python's tarfile: each case as `key.ext` + `key.txt` (the gif's caption as `key.json`).
fn python_shards(dir: &Path, names: &[&str], shards: usize) {
    let script = r#"
import io, json, os, sys, tarfile
src, out, shards = sys.argv[1], sys.argv[2], int(sys.argv[3])
names = sys.argv[4:]
for s in range(shards):
    with tarfile.open(os.path.join(out, "shard-%03d.tar" % s), "w") as tar:
        for n in names[s::shards]:
            key, ext = n.rsplit(".", 1)
            tar.add(os.path.join(src, n), arcname="sub/" + key + "." + ext)
            cap = os.path.join(src, key + ".txt")
            if ext == "gif":
                data = json.dumps({"caption": open(cap, encoding="utf-8").read()}).encode()
                info = tarfile.TarInfo("sub/" + key + ".json"); info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            elif os.path.exists(cap):
                tar.add(cap, arcname="sub/" + key + ".txt")
"#;
    let src = dir.join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    write_folder(&src);
    let status = std::process::Command::new("python3")
        .args(["-c", script, src.to_str().expect("p"), dir.to_str().expect("p"), &shards.to_string()])
        .args(names)
        .status()
        .expect("python3 runs");
    assert!(status.success(), "python tarfile failed");
}

#[test]
fn webdataset_shards_from_python_tarfile_read_back_identically() {
    let dir = ov3_core::fsio::ScratchDir::new().expect("temp dir");
    let names: Vec<&str> = cases().iter().map(|c| c.0).collect();
    python_shards(dir.path(), &names, 2);
    // shard-002 does not exist: counted, not fatal.
    let spec = format!("{}/shard-{{000..002}}.tar", dir.path().display());
    let source = Source::open(&Spec::parse(&spec).expect("spec")).expect("opens");
    assert_eq!(source.index_skips.get(Skip::MissingShard), 1);
    assert_eq!(source.index_skips.get(Skip::MissingCaption), 1, "{}", source.index_skips);
    for item in &source.items {
        let Item::Stored { key, image, caption } = item else { panic!("stored") };
        let file = cases()
            .into_iter()
            .find(|c| c.0.starts_with(&format!("{}.", key.trim_start_matches("sub/"))))
            .expect("known key");
        assert!(matches!(image, Bytes::Member { .. }), "read in place, not unpacked");
        assert_eq!(source.read(image).expect("member bytes"), file.1, "{key}: image bytes differ");
        if let (Ok(text), Some(expected)) = (source.caption(caption, &mut SplitMix64::new(0, 0)), file.2.clone()) {
            assert_eq!(text, String::from_utf8(expected).expect("utf-8").trim(), "{key}: caption differs");
        }
    }
    assert_every_case_classified(&source);
}

#[test]
fn a_truncated_shard_keeps_its_complete_members() {
    let dir = ov3_core::fsio::ScratchDir::new().expect("temp dir");
    python_shards(dir.path(), &["rgb.png", "gray.png", "rgba.png", "rgb16.png"], 1);
    let shard = dir.path().join("shard-000.tar");
    let bytes = std::fs::read(&shard).expect("shard");
    std::fs::write(&shard, &bytes[..bytes.len() * 2 / 3]).expect("truncate");
    let source = Source::open(&Spec::parse(shard.to_str().expect("p")).expect("spec")).expect("opens");
    assert!(source.index_skips.get(Skip::TruncatedShard) >= 1, "{}", source.index_skips);
    assert!((1..4).contains(&source.len()), "{} items survive", source.len());
    assert_eq!(check_all(&source).0, source.len());
}

#[test]
fn nothing_usable_is_one_clear_error() {
    let dir = ov3_core::fsio::ScratchDir::new().expect("temp dir");
    let msg = match Source::open(&Spec::parse(dir.path().to_str().expect("p")).expect("spec")) {
        Ok(_) => panic!("an empty folder opened"),
        Err(e) => e.to_string(),
    };
    assert!(msg.contains("no usable image-caption pair") && msg.lines().count() == 1, "{msg}");
    for bad in ["synthetic:0", "synthetic:x", "synthetic:4:y", "/no/such/dir", "a-{3..1}.tar", "b-{1..2.tar"] {
        let err = Spec::parse(bad).err().unwrap_or_else(|| panic!("{bad} parsed"));
        assert!(err.to_string().contains(bad), "{err}");
    }
    // Every item corrupt: the loader reports it instead of spinning.
    std::fs::write(dir.path().join("a.png"), b"junk").expect("write");
    std::fs::write(dir.path().join("a.txt"), b"caption").expect("write");
    let source = Arc::new(Source::open(&Spec::parse(dir.path().to_str().expect("p")).expect("spec")).expect("indexes"));
    let cfg = LoaderConfig {
        batch: 2,
        seed: 0,
        workers: 2,
        prefetch: 1,
        augment: Augment::eval(32),
        limits: DecodeLimits::default(),
    };
    let err = spawn_loader(source, cfg, Position::default()).recv().expect("a message").err().expect("an error");
    assert!(err.to_string().contains("nothing in a whole epoch"), "{err}");
}

#[test]
fn loader_order_is_deterministic_and_resumable() {
    let source = Arc::new(Source::open(&Spec::parse("synthetic:10:4").expect("spec")).expect("opens"));
    let cfg = LoaderConfig {
        batch: 4,
        seed: 1,
        workers: 2,
        prefetch: 2,
        augment: Augment::train(32),
        limits: DecodeLimits::default(),
    };
    type Rx = std::sync::mpsc::Receiver<Result<ov3_core::data::pipeline::HostBatch, ov3_core::data::source::DataError>>;
    let keys = |rx: &Rx, n: usize| -> Vec<(Vec<String>, Position, Vec<u8>)> {
        (0..n)
            .map(|_| {
                let b: ov3_core::data::pipeline::HostBatch = rx.recv().expect("batch").expect("ok");
                let pixels = b.examples.iter().flat_map(|e| e.image.as_raw().clone()).collect();
                (b.examples.iter().map(|e| e.key.clone()).collect(), b.next, pixels)
            })
            .collect()
    };
    let straight = keys(&spawn_loader(source.clone(), cfg, Position::default()), 4);
    let again = keys(&spawn_loader(source.clone(), cfg, Position::default()), 4);
    assert_eq!(straight, again, "same seed, different batches");
    let resumed = keys(&spawn_loader(source.clone(), cfg, straight[1].1), 2);
    assert_eq!(&straight[2..], &resumed[..], "resuming from the saved position changed the data");
    // 10 items, batches of 4: the third batch crosses into epoch 1, and each epoch visits every item once.
    assert_eq!(straight[2].1.epoch, 1);
    let first_epoch: std::collections::BTreeSet<String> =
        straight[0].0.iter().chain(&straight[1].0).chain(&straight[2].0[..2]).cloned().collect();
    assert_eq!(first_epoch.len(), 10);
}

/// A decoder that panics on one file (a codec bug) costs that item, counted with its reason; the loader
/// keeps producing batches. Without containment the panic killed the loader thread, so the run died — and
/// every resume replayed the same file.
#[test]
fn a_panicking_decoder_skips_the_item_and_the_loader_goes_on() {
    let dir = ov3_core::fsio::ScratchDir::new().expect("temp dir");
    for i in 0..6u32 {
        // Item 3 is 40 px wide: the test decoder panics on exactly that one.
        let w = if i == 3 { 40 } else { 32 };
        std::fs::write(dir.path().join(format!("{i}.png")), rgb(w, 32)).unwrap();
        std::fs::write(dir.path().join(format!("{i}.txt")), format!("caption {i}")).unwrap();
    }
    let mut source = Source::open(&Spec::parse(dir.path().to_str().unwrap()).unwrap()).expect("opens");
    source.decode = |bytes, limits| {
        let img = ov3_core::data::decode::decode_rgb(bytes, limits)?;
        assert_ne!(img.width(), 40, "a codec bug");
        Ok(img)
    };
    let cfg = LoaderConfig {
        batch: 5,
        seed: 3,
        workers: 2,
        prefetch: 1,
        augment: Augment::train(32),
        limits: DecodeLimits::default(),
    };
    let rx = spawn_loader(Arc::new(source), cfg, Position::default());
    let mut skips = SkipCounts::default();
    let mut keys = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let batch = rx.recv().expect("the loader survives the panic").expect("a batch");
        assert_eq!(batch.examples.len(), 5);
        skips.merge(&batch.skips);
        keys.extend(batch.examples.iter().map(|e| e.key.clone()));
    }
    assert!(skips.get(Skip::DecoderPanic) >= 3, "one panic per epoch, counted: {skips}");
    assert_eq!(skips.total(), skips.get(Skip::DecoderPanic), "{skips}");
    assert_eq!(keys.len(), 5, "every other item was used: {keys:?}");
    assert!(!keys.iter().any(|k| k.starts_with('3')));
}

fn load(source: &Source, i: usize, seed: u64) -> ov3_core::data::pipeline::Example {
    load_example(source, i, &Augment::eval(32), DecodeLimits::default(), &mut SplitMix64::new(seed, i as u64))
        .unwrap_or_else(|s| panic!("item {i}: {s:?}"))
}

#[test]
fn image_folder_captions_come_from_the_class_folder_through_the_templates() {
    let dir = ov3_core::fsio::ScratchDir::new().expect("temp dir");
    for (class, n) in [("golden_retriever", 2), ("tabby cat", 1)] {
        std::fs::create_dir_all(dir.path().join(class)).expect("mkdir");
        for i in 0..n {
            std::fs::write(dir.path().join(class).join(format!("{i}.png")), rgb(32, 32)).expect("write");
        }
    }
    std::fs::write(dir.path().join("stray.png"), rgb(32, 32)).expect("a file at the top is not a class");
    let spec = format!("imagefolder:{}", dir.path().display());
    let source = Source::open(&Spec::parse(&spec).expect("spec")).expect("opens");
    assert_eq!(source.len(), 3);
    // Default templates; the class name with underscores as spaces; the template drawn from the item's RNG.
    let captions: std::collections::BTreeSet<String> = (0..40).map(|seed| load(&source, 0, seed).caption).collect();
    assert!(captions.len() > 1, "several templates are drawn: {captions:?}");
    assert!(captions.iter().all(|c| c.contains("golden retriever") && c.starts_with('a')), "{captions:?}");
    assert_eq!(load(&source, 2, 3).caption, load(&source, 2, 3).caption, "deterministic per (seed, index)");
    assert!(load(&source, 2, 0).caption.contains("tabby cat"));

    std::fs::write(dir.path().join("templates.txt"), "itap of a {}\n\n").expect("write");
    let source = Source::open(&Spec::parse(&spec).expect("spec")).expect("opens");
    assert_eq!(load(&source, 0, 5).caption, "itap of a golden retriever");
    std::fs::write(dir.path().join("templates.txt"), "no placeholder\n").expect("write");
    let err = Source::open(&Spec::parse(&spec).expect("spec")).err().expect("a template without {} is refused");
    assert!(err.to_string().contains("exactly one {}"), "{err}");
}

#[test]
fn first_line_folders_drop_the_translations_below() {
    let dir = ov3_core::fsio::ScratchDir::new().expect("temp dir");
    std::fs::write(dir.path().join("pelican.png"), rgb(32, 32)).expect("write");
    std::fs::write(dir.path().join("pelican.txt"), "\nA pelican.\nfr.utf8=Un pélican.\n").expect("write");
    let plain = Source::open(&Spec::parse(dir.path().to_str().expect("p")).expect("spec")).expect("opens");
    assert!(load(&plain, 0, 0).caption.contains("fr.utf8"), "a plain folder keeps the whole file");
    let spec = format!("firstline:{}", dir.path().display());
    let first = Source::open(&Spec::parse(&spec).expect("spec")).expect("opens");
    assert_eq!(load(&first, 0, 0).caption, "A pelican.");
}

#[test]
fn idx_files_give_grey_images_captioned_by_class() {
    let dir = ov3_core::fsio::ScratchDir::new().expect("temp dir");
    let (images, labels, classes) =
        (dir.path().join("imgs-idx3-ubyte.gz"), dir.path().join("labels-idx1-ubyte.gz"), dir.path().join("c.txt"));
    // Two 20x20 images: a horizontal ramp and a constant 200.
    let mut data: Vec<u8> = (0..400).map(|i| (i % 20 * 10) as u8).collect();
    data.extend([200u8; 400]);
    common::idx_gz(&images, &[2, 20, 20], &data);
    common::idx_gz(&labels, &[2], &[1, 0]);
    std::fs::write(&classes, "boot\nsandal\n").expect("write");
    let spec = format!("idx:{},{},{}", images.display(), labels.display(), classes.display());
    let source = Source::open(&Spec::parse(&spec).expect("spec")).expect("opens");
    assert_eq!(source.len(), 2);
    let (a, b) = (load(&source, 0, 0), load(&source, 1, 0));
    assert!(a.caption.contains("sandal") && b.caption.contains("boot"), "{} / {}", a.caption, b.caption);
    let p = b.image.get_pixel(10, 10).0;
    assert_eq!(p, [200, 200, 200], "grey replicated to RGB");
    assert!(a.image.get_pixel(31, 16).0[0] > a.image.get_pixel(0, 16).0[0], "the ramp survives resizing");

    // Without class names, and with names that do not say (fashion-)mnist: refused, with what to give.
    let spec = format!("idx:{},{}", images.display(), labels.display());
    let err = Source::open(&Spec::parse(&spec).expect("spec")).err().expect("no class names");
    assert!(err.to_string().contains("CLASSES"), "{err}");
    // A label beyond the class list, and a count mismatch, are refused naming the file.
    common::idx_gz(&labels, &[2], &[1, 2]);
    let spec = format!("idx:{},{},{}", images.display(), labels.display(), classes.display());
    assert!(Source::open(&Spec::parse(&spec).expect("spec")).err().expect("label 2").to_string().contains("label 2"));
    common::idx_gz(&labels, &[3], &[0, 0, 0]);
    assert!(Source::open(&Spec::parse(&spec).expect("spec")).is_err(), "3 labels for 2 images");
}

#[test]
fn transparent_pixels_become_white_not_their_stored_colour() {
    let rgba: image::DynamicImage =
        ImageBuffer::from_fn(20, 20, |x, _| if x < 10 { Rgba([0u8, 0, 0, 0]) } else { Rgba([255u8, 0, 0, 255]) })
            .into();
    let img = ov3_core::data::decode::decode_rgb(&png_bytes(rgba), DecodeLimits::default()).expect("decodes");
    assert_eq!(img.get_pixel(2, 2).0, [255, 255, 255]);
    assert_eq!(img.get_pixel(15, 2).0, [255, 0, 0]);
}

#[test]
fn a_mix_indexes_every_part_and_each_item_keeps_its_own_kind() {
    let dir = ov3_core::fsio::ScratchDir::new().expect("temp dir");
    for (name, caption) in [("a", "a red kite."), ("b", "a blue boat.")] {
        std::fs::write(dir.path().join(format!("{name}.png")), rgb(40, 40)).expect("write");
        std::fs::write(dir.path().join(format!("{name}.txt")), caption).expect("write");
    }
    let folder = dir.path().display().to_string();
    let source = Source::open(&Spec::parse(&format!("{folder}+synthetic:3:7")).expect("spec")).expect("opens");
    assert_eq!(source.len(), 5, "2 photos + 3 scenes");
    assert_eq!(source.name, format!("{folder}+synthetic:3:7"));
    assert_eq!(load(&source, 1, 0).caption, "a blue boat.");
    // The scenes are the same as those of synthetic:3:7 alone: the same world, the same indices.
    let world = Source::open(&Spec::parse("synthetic:3:7").expect("spec")).expect("opens");
    for i in 0..3 {
        let (mixed, alone) = (load(&source, 2 + i, 1), load(&world, i, 1));
        assert_eq!((mixed.caption, mixed.image), (alone.caption, alone.image), "scene {i}");
    }
    // The identity (recorded for resume) changes with either part.
    let other = Source::open(&Spec::parse(&format!("{folder}+synthetic:4:7")).expect("spec")).expect("opens");
    assert_ne!(source.identity().fingerprint, other.identity().fingerprint);

    for (bad, why) in [
        ("synthetic:3+synthetic:4", "at most one synthetic:"),
        (&format!("{folder}+"), "each part non-empty"),
        (&format!("cache:{folder}+synthetic:3"), "latent cache"),
        (&format!("{folder}+/no/such/folder"), "no such file"),
    ] {
        let err = Spec::parse(bad).err().unwrap_or_else(|| panic!("{bad} parsed"));
        assert!(err.to_string().contains(why), "{bad}: {err}");
    }
    // A folder whose own name has a '+' is that folder, not a mix.
    let plus = dir.path().join("c+d");
    std::fs::create_dir(&plus).expect("mkdir");
    assert_eq!(Spec::parse(plus.to_str().expect("p")).expect("spec"), Spec::Folder(plus.clone()));
}
