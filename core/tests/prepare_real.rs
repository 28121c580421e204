//! `ov3 data prepare real` on stand-ins for the package folders (the real packages are not installed in CI):
//! every source found is used, the split is by source image, the manifest counts what was written, and a
//! machine without any of the packages gets one error naming what to install.

mod common;

use std::path::Path;

use common::idx_gz;
use image::{ImageBuffer, Rgb, Rgba};
use ov3_core::data::prepare::{PrepareOptions, RealPaths, is_heldout, prepare_real};

fn png(path: &Path, img: image::DynamicImage) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    img.save(path).expect("save png");
}

#[test]
fn prepare_real_splits_by_source_image_and_records_every_source() {
    let root = ov3_core::fsio::ScratchDir::new().expect("tmp");
    let r = root.path();
    // Tux Paint: 24 cut-outs (a red disc on transparent), each with an English first line and a translation.
    for i in 0..24 {
        let stamp = r.join(format!("tux/animals/s{i}.png"));
        png(
            &stamp,
            ImageBuffer::from_fn(40, 30, |x, y| {
                let inside = (x as i32 - 20).pow(2) + (y as i32 - 15).pow(2) < 100;
                Rgba([200u8, 10, 10, if inside { 255 } else { 0 }])
            })
            .into(),
        );
        std::fs::write(stamp.with_extension("txt"), format!("Stamp number {i}.\nfr.utf8=Tampon {i}.\n")).expect("txt");
    }
    std::fs::write(r.join("tux/animals/blank.txt"), "no image beside this one").expect("txt");
    // OpenCV: two files of the curated list (a stereo pair sharing a group) and one not in it.
    for name in ["aloeL.jpg", "aloeR.jpg", "apple.jpg", "notes.png"] {
        png(&r.join("opencv").join(name), ImageBuffer::from_fn(120, 90, |x, y| Rgb([x as u8, y as u8, 77u8])).into());
    }
    // Fashion-MNIST: 12 training and 3 test images of 28x28.
    let fm = r.join("fashion");
    std::fs::create_dir_all(&fm).expect("mkdir");
    for (file, n) in [("train", 12u32), ("t10k", 3)] {
        idx_gz(&fm.join(format!("{file}-images-idx3-ubyte.gz")), &[n, 28, 28], &vec![128u8; (n * 784) as usize]);
        idx_gz(
            &fm.join(format!("{file}-labels-idx1-ubyte.gz")),
            &[n],
            &(0..n as u8).map(|l| l % 10).collect::<Vec<_>>(),
        );
    }
    let paths = RealPaths { tuxpaint: r.join("tux"), opencv: r.join("opencv"), fashion_mnist: fm, skimage: None };
    let opts =
        PrepareOptions { res: 64, scenes_per_stamp: 3, crops_per_photo: 4, fashion: 12, heldout_every: 4, seed: 0 };
    let out = r.join("out");
    let m = prepare_real(&out, &paths, &opts, |_, _, _| {}).expect("prepares");

    let count = |split: &str, ext: &str| {
        std::fs::read_dir(out.join(split))
            .expect("split")
            .filter(|e| e.as_ref().expect("entry").path().extension().is_some_and(|x| x == ext))
            .count()
    };
    assert_eq!((count("train", "png"), count("heldout", "png")), (m.train, m.heldout));
    assert_eq!((count("train", "txt"), count("heldout", "txt")), (m.train, m.heldout), "a caption per image");
    let source = |name: &str| m.sources.iter().find(|s| s.name == name).expect("source recorded");
    let tux = source("tuxpaint");
    assert_eq!(tux.originals, 24);
    // Each held-out stamp gives one scene, each training stamp three; which is which follows the group hash.
    let held = (0..24).filter(|i| is_heldout(&format!("tuxpaint/animals/s{i}.png"), 4)).count();
    assert!(held > 0 && held < 24, "the fixture exercises both splits ({held} held out)");
    assert_eq!((tux.train, tux.heldout), (3 * (24 - held), held));
    let cv = source("opencv");
    assert_eq!(cv.originals, 3, "the curated list only: notes.png is not a photograph");
    // The aloe stereo pair lands on one side: all 8 of its crops in one split.
    let aloe_in = |split: &str| {
        std::fs::read_dir(out.join(split))
            .expect("split")
            .filter(|e| e.as_ref().expect("entry").file_name().to_string_lossy().contains("-aloe"))
            .count()
    };
    assert!(aloe_in("train") == 0 || aloe_in("heldout") == 0, "{} / {}", aloe_in("train"), aloe_in("heldout"));
    let fmr = source("fashion-mnist");
    assert_eq!((fmr.train, fmr.heldout), (12, 1), "the test file is the held-out side");
    assert!(!source("skimage").found);

    // Captions: the first line only; a scene is the stamp over a background (red pixels and others).
    let first = std::fs::read_dir(out.join("train"))
        .expect("train")
        .map(|e| e.expect("e").path())
        .find(|p| p.to_string_lossy().contains("tuxpaint") && p.extension().is_some_and(|x| x == "txt"))
        .expect("a scene");
    let caption = std::fs::read_to_string(&first).expect("caption");
    assert!(caption.starts_with("Stamp number") && !caption.contains("fr.utf8"), "{caption}");
    let scene = image::open(first.with_extension("png")).expect("scene").to_rgb8();
    assert_eq!(scene.dimensions(), (64, 64));
    assert!(scene.pixels().any(|p| p.0 == [200, 10, 10]), "the opaque stamp is pasted as it is");
    let licences = std::fs::read_to_string(out.join("LICENSES.md")).expect("licences");
    assert!(licences.contains("GPL-2.0") && licences.contains("MIT") && licences.contains("Apache-2.0"));
    assert!(out.join("manifest.json").is_file());

    // A second run into the same folder is refused (nothing overwritten); no packages at all is one error.
    assert!(prepare_real(&out, &paths, &opts, |_, _, _| {}).expect_err("not empty").contains("not empty"));
    let none = RealPaths { tuxpaint: r.join("x"), opencv: r.join("y"), fashion_mnist: r.join("z"), skimage: None };
    let err = prepare_real(&r.join("out2"), &none, &opts, |_, _, _| {}).expect_err("nothing found");
    assert!(err.contains("apt install tuxpaint-stamps-default"), "{err}");
}
