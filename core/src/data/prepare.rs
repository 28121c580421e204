//! `ov3 data prepare real --out DIR`: a mixed dataset of real images assembled from files that Debian and
//! PyPI packages install (nothing downloaded from a model or dataset hub), written as two folder sources,
//! `DIR/train` and `DIR/heldout` (`name.png` + `name.txt`), plus `DIR/manifest.json` and `DIR/LICENSES.md`
//! naming every source, its package and its licence.
//!
//! The split is by *source image*: every scene, crop or composite made from one original file (and from the
//! pairs that show the same scene, like a stereo pair) lands in the same split, so a held-out score is never
//! inflated by a sibling crop in training. The four photographs in `assets/photos` are held out from
//! everything and never read here.
//!
//! Sources (each optional; a missing one is reported with the command that installs it):
//! - Tux Paint stamps (`apt install tuxpaint-stamps-default`, GPL-2): PNG cut-outs with alpha and an
//!   English first line in `X.txt`; each becomes several scenes on photo crops, gradients and plain colours.
//! - OpenCV's sample photographs (`apt install opencv-doc`, Apache-2.0): a curated list with captions
//!   written for ov3, each cut into several crops at random scales.
//! - Fashion-MNIST (`apt install dataset-fashion-mnist`, MIT): 28x28 product photos with class captions.
//! - scikit-image's sample photographs (`pip install scikit-image`, CC0 / public domain), those not in
//!   `assets/photos`.

use std::path::{Path, PathBuf};

use image::RgbImage;

use super::composite::scene;
use super::decode::{DecodeLimits, decode_rgb, decode_rgba};
use super::idx::IdxDataset;
use super::rng::SplitMix64;
use crate::image_io::{FilterType, resize_region, save_png};

/// Where the packages put their files on Debian (and where pip put scikit-image, if found).
#[derive(Debug, Clone)]
pub struct RealPaths {
    pub tuxpaint: PathBuf,
    pub opencv: PathBuf,
    pub fashion_mnist: PathBuf,
    pub skimage: Option<PathBuf>,
}

impl Default for RealPaths {
    fn default() -> Self {
        Self {
            tuxpaint: "/usr/share/tuxpaint/stamps".into(),
            opencv: "/usr/share/doc/opencv-doc/examples/data".into(),
            fashion_mnist: "/usr/share/datasets/fashion-mnist".into(),
            skimage: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// Side of every written scene and crop (the loader resizes again to the training resolution).
    pub res: u32,
    /// Scenes per Tux Paint cut-out in the training split (one per held-out cut-out).
    pub scenes_per_stamp: usize,
    /// Crops per photograph in the training split (a quarter of that, at least 2, when held out).
    pub crops_per_photo: usize,
    /// Fashion-MNIST images taken from its training file (and a tenth of that from its test file, held out).
    pub fashion: usize,
    /// One source image in `heldout_every` (by a hash of its group) goes to the held-out split.
    pub heldout_every: u64,
    pub seed: u64,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        Self { res: 256, scenes_per_stamp: 4, crops_per_photo: 12, fashion: 1000, heldout_every: 8, seed: 0 }
    }
}

/// One source as the manifest records it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SourceRecord {
    pub name: String,
    pub install: String,
    pub path: String,
    pub licence: String,
    pub found: bool,
    /// Original files read, and items written per split.
    pub originals: usize,
    pub train: usize,
    pub heldout: usize,
    pub skipped: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Manifest {
    pub options: String,
    pub sources: Vec<SourceRecord>,
    pub train: usize,
    pub heldout: usize,
}

/// OpenCV sample photographs worth training on, with captions written for ov3, and the group that keeps
/// two views of one scene in one split. Drawings, charts, text and masks in the same folder are left out.
const OPENCV_PHOTOS: &[(&str, &str, &str)] = &[
    ("aero1.jpg", "aero", "an aerial photo of a town beside a lake"),
    ("aero3.jpg", "aero", "an aerial photo of a town beside a lake"),
    ("aloeL.jpg", "aloe", "an aloe plant in a pot"),
    ("aloeR.jpg", "aloe", "an aloe plant in a pot"),
    ("apple.jpg", "apple", "a red apple"),
    ("baboon.jpg", "baboon", "the face of a mandrill"),
    ("board.jpg", "board", "a green circuit board"),
    ("building.jpg", "building", "a white hotel building behind trees"),
    ("butterfly.jpg", "butterfly", "a black and white butterfly on a leaf"),
    ("ela_original.jpg", "notebook", "a black notebook with a green band"),
    ("fruits.jpg", "fruits", "sliced oranges, lemons, limes and a kiwi"),
    ("home.jpg", "home", "a yellow palace under a blue sky"),
    ("leuvenA.jpg", "leuven", "old brick houses on a cobbled street"),
    ("leuvenB.jpg", "leuven", "old brick houses on a cobbled street"),
    ("licenseplate_motion.jpg", "car", "the back of a silver car, blurred by motion"),
    ("messi5.jpg", "football", "a football player kicking a ball on a pitch"),
    ("orange.jpg", "orange", "an orange"),
    ("squirrel_cls.jpg", "squirrel", "a red squirrel on a branch"),
    ("starry_night.jpg", "starry", "a painting of a starry night over a village"),
    ("stuff.jpg", "stuff", "a pencil, a lighter and a coin on a table"),
    ("left.jpg", "books", "books on a desk"),
    ("right.jpg", "books", "books on a desk"),
    ("left01.jpg", "chessboard", "a man holding a chessboard in front of a computer"),
    ("right01.jpg", "chessboard", "a man holding a chessboard in front of a computer"),
    ("basketball1.png", "basketball", "two men throwing a ball in a corridor"),
    ("box_in_scene.png", "box", "boxes and books in a cluttered pile"),
    ("cards.png", "cards", "playing cards scattered on a table"),
    ("chicky_512.png", "dog", "a small brown dog with its mouth open"),
    ("graf1.png", "graffiti", "graffiti on a wall"),
    ("graf3.png", "graffiti", "graffiti on a wall"),
    ("rubberwhale1.png", "toys", "toys on a table in front of a fence"),
    ("smarties.png", "sweets", "coloured sweets on a white table"),
    ("sudoku.png", "sudoku", "a sudoku puzzle printed on paper"),
];

/// scikit-image photographs not already in `assets/photos`, with captions written for ov3.
const SKIMAGE_PHOTOS: &[(&str, &str, &str)] = &[
    ("hubble_deep_field.jpg", "hubble", "galaxies in the deep sky"),
    ("retina.jpg", "retina", "a photo of the back of an eye"),
    ("ihc.png", "ihc", "a stained tissue sample under a microscope"),
    ("brick.png", "brick", "a brick wall"),
    ("grass.png", "grass", "grass"),
    ("gravel.png", "gravel", "gravel"),
];

/// Fashion-MNIST captions: its class names in a sentence.
fn fashion_caption(class: &str) -> String {
    format!("a photo of a {}", class.to_lowercase())
}

struct Writer {
    out: PathBuf,
    train: usize,
    heldout: usize,
}

impl Writer {
    fn write(&mut self, heldout: bool, name: &str, img: &RgbImage, caption: &str) -> std::io::Result<()> {
        let (dir, n) = if heldout { ("heldout", &mut self.heldout) } else { ("train", &mut self.train) };
        let stem = format!("{:06}-{}", *n, name);
        let dir = self.out.join(dir);
        save_png(img, &dir.join(format!("{stem}.png"))).map_err(std::io::Error::other)?;
        std::fs::write(dir.join(format!("{stem}.txt")), format!("{caption}\n"))?;
        *n += 1;
        Ok(())
    }
}

/// Whether a source image's group goes to the held-out split: a CRC of the group name, so the split never
/// depends on which other files exist.
pub fn is_heldout(group: &str, every: u64) -> bool {
    crc32fast::hash(group.as_bytes()) as u64 % every == 0
}

/// A random square crop of `photo` (a side of 35–100% of its shorter side) resized to `res`.
fn random_crop(photo: &RgbImage, res: u32, g: &mut SplitMix64) -> RgbImage {
    let (w, h) = (photo.width() as f64, photo.height() as f64);
    let side = w.min(h) * (0.35 + 0.65 * g.unit());
    let (x, y) = (g.unit() * (w - side), g.unit() * (h - side));
    resize_region(photo, Some((x, y, side, side)), res, FilterType::Lanczos3)
}

/// The first line of a Tux Paint description (later lines are translations), or `None` when empty.
pub fn first_line(text: &str) -> Option<String> {
    text.lines().next().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string)
}

fn collect_files(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for p in paths {
        if p.is_dir() {
            collect_files(&p, ext, out);
        } else if p.extension().is_some_and(|e| e.eq_ignore_ascii_case(ext)) {
            out.push(p);
        }
    }
}

fn read_image(path: &Path) -> Option<RgbImage> {
    decode_rgb(&std::fs::read(path).ok()?, DecodeLimits::default()).ok()
}

/// Assembles the dataset; `progress(source, done, total)` is called as items are written.
pub fn prepare_real(
    out: &Path,
    paths: &RealPaths,
    opts: &PrepareOptions,
    mut progress: impl FnMut(&str, usize, usize),
) -> Result<Manifest, String> {
    let io = |e: std::io::Error| format!("{}: {e}", out.display());
    for split in ["train", "heldout"] {
        let dir = out.join(split);
        if dir.exists() && std::fs::read_dir(&dir).map_err(io)?.next().is_some() {
            return Err(format!("{} is not empty: give a new --out folder", dir.display()));
        }
        std::fs::create_dir_all(&dir).map_err(io)?;
    }
    let mut w = Writer { out: out.to_path_buf(), train: 0, heldout: 0 };
    let mut sources = Vec::new();
    let res = opts.res;

    // Photographs first: their crops are also the composites' backgrounds (of the same split).
    let mut backgrounds: [Vec<RgbImage>; 2] = [Vec::new(), Vec::new()];
    for (name, dir, table, install, licence) in [
        (
            "opencv",
            Some(paths.opencv.clone()),
            OPENCV_PHOTOS,
            "apt install opencv-doc",
            "Apache-2.0 (Debian opencv copyright, Files: *)",
        ),
        (
            "skimage",
            paths.skimage.clone(),
            SKIMAGE_PHOTOS,
            "pip install scikit-image",
            "CC0 / public domain (per image in skimage/data/_fetchers.py)",
        ),
    ] {
        let mut rec = record(name, install, dir.as_deref(), licence);
        if let Some(dir) = dir.filter(|d| d.is_dir()) {
            rec.found = true;
            for (i, (file, group, caption)) in table.iter().enumerate() {
                progress(name, i, table.len());
                let Some(photo) = read_image(&dir.join(file)) else {
                    rec.skipped += 1;
                    continue;
                };
                rec.originals += 1;
                let held = is_heldout(&format!("{name}/{group}"), opts.heldout_every);
                let crops = if held { (opts.crops_per_photo / 4).max(2) } else { opts.crops_per_photo };
                let mut g = SplitMix64::new(opts.seed ^ 0x0C1, crc32fast::hash(file.as_bytes()) as u64);
                for k in 0..crops {
                    let crop = random_crop(&photo, res, &mut g);
                    let stem =
                        Path::new(file).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                    w.write(held, &format!("{name}-{stem}-{k}"), &crop, caption).map_err(io)?;
                    *if held { &mut rec.heldout } else { &mut rec.train } += 1;
                }
                backgrounds[held as usize].push(photo);
            }
        }
        sources.push(rec);
    }

    // Tux Paint cut-outs composited onto scenes.
    let mut rec = record(
        "tuxpaint",
        "apt install tuxpaint-stamps-default",
        Some(&paths.tuxpaint),
        "GPL-2.0 (Debian tuxpaint-stamps copyright)",
    );
    if paths.tuxpaint.is_dir() {
        rec.found = true;
        let mut pngs = Vec::new();
        collect_files(&paths.tuxpaint, "png", &mut pngs);
        for (i, png) in pngs.iter().enumerate() {
            progress("tuxpaint", i, pngs.len());
            let caption = std::fs::read_to_string(png.with_extension("txt")).ok().and_then(|t| first_line(&t));
            let cutout = std::fs::read(png).ok().and_then(|b| decode_rgba(&b, DecodeLimits::default()).ok());
            let (Some(caption), Some(cutout)) = (caption, cutout) else {
                rec.skipped += 1;
                continue;
            };
            rec.originals += 1;
            let rel = png.strip_prefix(&paths.tuxpaint).unwrap_or(png).display().to_string();
            let held = is_heldout(&format!("tuxpaint/{rel}"), opts.heldout_every);
            let n = if held { 1 } else { opts.scenes_per_stamp };
            let mut g = SplitMix64::new(opts.seed ^ 0x7A9, crc32fast::hash(rel.as_bytes()) as u64);
            let stem = png.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            for k in 0..n {
                let Some(img) = scene(&cutout, &backgrounds[held as usize], res, &mut g) else {
                    rec.skipped += 1;
                    break;
                };
                w.write(held, &format!("tuxpaint-{stem}-{k}"), &img, &caption).map_err(io)?;
                *if held { &mut rec.heldout } else { &mut rec.train } += 1;
            }
        }
    }
    sources.push(rec);

    // Fashion-MNIST: the test file is the held-out split (its own split, disjoint by construction).
    let mut rec = record(
        "fashion-mnist",
        "apt install dataset-fashion-mnist",
        Some(&paths.fashion_mnist),
        "MIT (Debian dataset-fashion-mnist copyright)",
    );
    if paths.fashion_mnist.is_dir() && opts.fashion > 0 {
        for (file, held, count) in [("train", false, opts.fashion), ("t10k", true, (opts.fashion / 10).max(1))] {
            let dir = &paths.fashion_mnist;
            let set = IdxDataset::open(
                &dir.join(format!("{file}-images-idx3-ubyte.gz")),
                &dir.join(format!("{file}-labels-idx1-ubyte.gz")),
                None,
            )?;
            rec.found = true;
            for i in 0..count.min(set.len()) {
                progress("fashion-mnist", i, count);
                let (img, class) = set.get(i);
                rec.originals += 1;
                w.write(held, &format!("fashion-{file}-{i}"), &img, &fashion_caption(class)).map_err(io)?;
                *if held { &mut rec.heldout } else { &mut rec.train } += 1;
            }
        }
    }
    sources.push(rec);

    if w.train == 0 || w.heldout == 0 {
        let missing: Vec<String> =
            sources.iter().filter(|s| !s.found).map(|s| format!("{} ({})", s.name, s.install)).collect();
        return Err(format!(
            "no real images found (train {}, held out {}); install at least one of: {}",
            w.train,
            w.heldout,
            missing.join(", ")
        ));
    }
    let manifest = Manifest { options: format!("{opts:?}"), sources, train: w.train, heldout: w.heldout };
    let json = serde_json::to_string_pretty(&manifest).map_err(|e| e.to_string())?;
    std::fs::write(out.join("manifest.json"), json).map_err(io)?;
    std::fs::write(out.join("LICENSES.md"), licences(&manifest)).map_err(io)?;
    Ok(manifest)
}

fn record(name: &str, install: &str, path: Option<&Path>, licence: &str) -> SourceRecord {
    SourceRecord {
        name: name.into(),
        install: install.into(),
        path: path.map(|p| p.display().to_string()).unwrap_or_else(|| "(not found)".into()),
        licence: licence.into(),
        found: false,
        originals: 0,
        train: 0,
        heldout: 0,
        skipped: 0,
    }
}

fn licences(m: &Manifest) -> String {
    let mut s = String::from(
        "# Sources of this dataset\n\nMade by `ov3 data prepare real`. Images are derived from the files below \
         (crops, composites); keep this file with them. Do not redistribute the images under other terms.\n\n\
         | source | installed by | path | licence | originals | train | held out |\n|---|---|---|---|---|---|---|\n",
    );
    for r in m.sources.iter().filter(|r| r.found) {
        s += &format!(
            "| {} | `{}` | {} | {} | {} | {} | {} |\n",
            r.name, r.install, r.path, r.licence, r.originals, r.train, r.heldout
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_line_is_the_english_description() {
        assert_eq!(first_line("A pelican.\nfr.utf8=Un pélican.\n").as_deref(), Some("A pelican."));
        assert_eq!(first_line("\n"), None);
    }

    #[test]
    fn the_split_follows_the_group_not_the_file() {
        let held: Vec<bool> = (0..200).map(|i| is_heldout(&format!("g{i}"), 8)).collect();
        let n = held.iter().filter(|&&h| h).count();
        assert!((10..=45).contains(&n), "{n} of 200 held out at 1 in 8");
        assert_eq!(is_heldout("opencv/aloe", 8), is_heldout("opencv/aloe", 8));
    }
}
