//! Where image-caption pairs come from (DESIGN §6 data SPEC): a folder of `name.{jpg,png,...}` + `name.txt`,
//! a `.jsonl` / `.csv` table with `image` and `caption` fields, WebDataset `.tar` shards (brace ranges,
//! members `key.jpg` + `key.txt` / `key.json`, read in place, never unpacked), or `synthetic:N[:seed]`.
//!
//! Opening a source indexes it; items that cannot be used (a missing caption file, a truncated shard's
//! last members) are skipped and counted by reason. A source with no usable item is an error.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::decode::{DecodeLimits, decode_rgb};
use super::idx::IdxDataset;
use super::latent_cache::LatentCache;
use super::rng::SplitMix64;
use super::skips::{Skip, SkipCounts};
use super::synthetic::{Split, World};

pub const IMAGE_EXTENSIONS: [&str; 7] = ["jpg", "jpeg", "png", "webp", "bmp", "gif", "jfif"];

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("bad data spec '{spec}': {reason}")]
    Spec { spec: String, reason: String },
    #[error("{path}: {reason}")]
    Source { path: String, reason: String },
    #[error("{source_name}: no usable image-caption pair ({skips})")]
    Empty { source_name: String, skips: String },
}

/// Caption templates for class-labelled sources when the folder has no `templates.txt`: OpenCLIP's
/// "a photo of a {}." and a few of its ImageNet variants (`{}` is the class name).
pub const DEFAULT_TEMPLATES: [&str; 6] = [
    "a photo of a {}.",
    "a picture of a {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a cropped photo of a {}.",
    "a good photo of a {}.",
];

/// A parsed data SPEC.
#[derive(Debug, Clone, PartialEq)]
pub enum Spec {
    /// `name.jpg` + `name.txt`; with `first_line` only the caption file's first line (`firstline:DIR`:
    /// Tux Paint keeps translations below it).
    Folder(PathBuf),
    FolderFirstLine(PathBuf),
    /// `imagefolder:DIR`: `DIR/<class name>/*.jpg`, captions from templates (torchvision's ImageFolder).
    ImageFolder(PathBuf),
    /// `idx:IMAGES,LABELS[,CLASSES]`: MNIST-format files, class names from CLASSES (one per line) or known.
    Idx {
        images: PathBuf,
        labels: PathBuf,
        classes: Option<PathBuf>,
    },
    Table(PathBuf),
    Shards(Vec<PathBuf>),
    Synthetic {
        n: u64,
        seed: u64,
        split: Split,
    },
    /// A latent cache made by `ov3 cache`.
    Cache(PathBuf),
    /// `A+B+...`: the items of every part in one index (e.g. real photographs + the embedded world; the
    /// share of each is its item count, so `synthetic:N` sets the world's). At most one `synthetic:`, one
    /// `idx:` and one set of shards; no latent cache.
    Mix(Vec<Spec>),
}

impl Spec {
    pub fn parse(spec: &str) -> Result<Self, DataError> {
        let bad = |reason: &str| DataError::Spec { spec: spec.to_string(), reason: reason.to_string() };
        // `A+B`, unless the whole SPEC names an existing file or folder with a '+' in it.
        if spec.contains('+') && !Path::new(spec).exists() {
            let parts = spec.split('+').map(str::trim).collect::<Vec<_>>();
            if parts.iter().any(|p| p.is_empty()) {
                return Err(bad("expected SPEC+SPEC[+...], each part non-empty"));
            }
            let parts = parts.into_iter().map(Spec::parse).collect::<Result<Vec<_>, _>>()?;
            let count = |f: fn(&Spec) -> bool| parts.iter().filter(|p| f(p)).count();
            if count(|p| matches!(p, Spec::Cache(_))) > 0 {
                return Err(bad("a latent cache cannot be mixed with other sources"));
            }
            for (kind, n) in [
                ("synthetic:", count(|p| matches!(p, Spec::Synthetic { .. }))),
                ("idx:", count(|p| matches!(p, Spec::Idx { .. }))),
                (".tar shards", count(|p| matches!(p, Spec::Shards(_)))),
            ] {
                if n > 1 {
                    return Err(bad(&format!("at most one {kind} part in a mix")));
                }
            }
            return Ok(Spec::Mix(parts));
        }
        if let Some(rest) = spec.strip_prefix("synthetic:") {
            let mut parts = rest.split(':');
            let n = parts.next().and_then(|n| n.parse::<u64>().ok()).filter(|&n| n > 0);
            let seed =
                parts.next().map(|s| s.parse::<u64>()).transpose().map_err(|_| bad("the seed must be an integer"))?;
            let split = match parts.next() {
                None | Some("train") => Some(Split::Train),
                Some("heldout") => Some(Split::Heldout),
                Some(_) => None,
            };
            return match (n, split, parts.next()) {
                (Some(n), Some(split), None) => Ok(Spec::Synthetic { n, seed: seed.unwrap_or(0), split }),
                _ => Err(bad("expected synthetic:N[:SEED[:train|heldout]] with N > 0")),
            };
        }
        if let Some(dir) = spec.strip_prefix("cache:") {
            return Ok(Spec::Cache(PathBuf::from(dir)));
        }
        let folder = |dir: &str| {
            let path = PathBuf::from(dir);
            if path.is_dir() { Ok(path) } else { Err(bad("no such folder")) }
        };
        if let Some(dir) = spec.strip_prefix("imagefolder:") {
            return Ok(Spec::ImageFolder(folder(dir)?));
        }
        if let Some(dir) = spec.strip_prefix("firstline:") {
            return Ok(Spec::FolderFirstLine(folder(dir)?));
        }
        if let Some(files) = spec.strip_prefix("idx:") {
            let parts: Vec<&str> = files.split(',').collect();
            return match parts[..] {
                [images, labels] | [images, labels, _] => Ok(Spec::Idx {
                    images: images.into(),
                    labels: labels.into(),
                    classes: parts.get(2).map(PathBuf::from),
                }),
                _ => Err(bad("expected idx:IMAGES,LABELS[,CLASSES]")),
            };
        }
        if spec.ends_with(".tar") {
            return Ok(Spec::Shards(
                expand_braces(spec).map_err(|r| bad(&r))?.into_iter().map(PathBuf::from).collect(),
            ));
        }
        let path = PathBuf::from(spec);
        match path.extension().and_then(|e| e.to_str()).map(str::to_lowercase).as_deref() {
            Some("jsonl") | Some("csv") => Ok(Spec::Table(path)),
            _ if path.is_dir() => Ok(Spec::Folder(path)),
            _ if !path.exists() => Err(bad("no such file or folder")),
            _ => Err(bad("expected a folder, a .jsonl/.csv table, .tar shards or synthetic:N")),
        }
    }
}

/// Expands every `{A..B}` range (zero padding kept from A): `s-{000..002}.tar` -> s-000, s-001, s-002.
pub fn expand_braces(pattern: &str) -> Result<Vec<String>, String> {
    let Some(open) = pattern.find('{') else { return Ok(vec![pattern.to_string()]) };
    let close = pattern[open..].find('}').map(|c| open + c).ok_or("unclosed '{'")?;
    let (a, b) = pattern[open + 1..close].split_once("..").ok_or("expected {A..B}")?;
    let (lo, hi) = (
        a.parse::<u64>().map_err(|_| "range bounds must be integers")?,
        b.parse::<u64>().map_err(|_| "range bounds must be integers")?,
    );
    if lo > hi || hi - lo > 1_000_000 {
        return Err(format!("bad range {{{a}..{b}}}"));
    }
    let width = a.len();
    let mut out = Vec::new();
    for i in lo..=hi {
        let head = format!("{}{:0width$}", &pattern[..open], i);
        for tail in expand_braces(&pattern[close + 1..])? {
            out.push(format!("{head}{tail}"));
        }
    }
    Ok(out)
}

/// Where an item's bytes live.
#[derive(Debug, Clone)]
pub enum Bytes {
    File(PathBuf),
    Member { shard: usize, offset: u64, size: u64 },
}

#[derive(Debug, Clone)]
pub enum CaptionSource {
    Text(String),
    File(PathBuf),
    /// The first non-empty line of a file.
    FirstLine(PathBuf),
    /// A class name, put into one of the source's templates at random.
    Class(String),
    Member {
        shard: usize,
        offset: u64,
        size: u64,
        json: bool,
    },
}

#[derive(Debug, Clone)]
pub enum Item {
    Stored {
        key: String,
        image: Bytes,
        caption: CaptionSource,
    },
    Synthetic(u64),
    /// Rows of the source's latent cache: one item's crops (one row unless it was cached as random crops).
    Cached(std::ops::Range<usize>),
    /// Image `i` of the source's IDX files.
    Idx(usize),
}

/// Which data a run was trained on: recorded in every checkpoint and compared on resume, so that a folder
/// or table whose items changed under the same path is not silently continued at a position that now
/// means other images.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DataIdentity {
    pub name: String,
    pub items: usize,
    /// CRC-32 over the items' keys in index order (and, for a latent cache, the VAE that made it).
    pub fingerprint: String,
}

impl std::fmt::Display for DataIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({} items, fingerprint {})", self.name, self.items, self.fingerprint)
    }
}

/// An indexed source.
pub struct Source {
    pub name: String,
    pub items: Vec<Item>,
    pub shards: Vec<PathBuf>,
    pub world: Option<World>,
    pub cache: Option<LatentCache>,
    pub idx: Option<IdxDataset>,
    /// Caption templates for [`CaptionSource::Class`] (`{}` = the class name).
    pub templates: Vec<String>,
    /// What indexing skipped.
    pub index_skips: SkipCounts,
    /// Image bytes -> RGB8 ([`decode_rgb`] unless a test swaps in another).
    pub decode: fn(&[u8], DecodeLimits) -> Result<image::RgbImage, Skip>,
}

impl Source {
    pub fn open(spec: &Spec) -> Result<Self, DataError> {
        let Spec::Mix(parts) = spec else { return Self::open_one(spec) };
        let mut parts = parts.iter().map(Self::open_one).collect::<Result<Vec<_>, _>>()?.into_iter();
        let mut mix = parts.next().ok_or_else(|| DataError::Spec { spec: "".into(), reason: "an empty mix".into() })?;
        for part in parts {
            let custom = |s: &Source| s.templates.iter().ne(DEFAULT_TEMPLATES.iter());
            if custom(&part) {
                if custom(&mix) && mix.templates != part.templates {
                    return Err(DataError::Spec {
                        spec: format!("{}+{}", mix.name, part.name),
                        reason: "two image folders with different templates.txt".into(),
                    });
                }
                mix.templates = part.templates;
            }
            mix.name = format!("{}+{}", mix.name, part.name);
            mix.items.extend(part.items);
            mix.shards.extend(part.shards);
            mix.world = mix.world.or(part.world);
            mix.idx = mix.idx.or(part.idx);
            mix.index_skips.merge(&part.index_skips);
        }
        Ok(mix)
    }

    fn open_one(spec: &Spec) -> Result<Self, DataError> {
        let mut skips = SkipCounts::default();
        let mut cache = None;
        let mut idx = None;
        let mut templates: Vec<String> = DEFAULT_TEMPLATES.iter().map(|t| t.to_string()).collect();
        let (name, items, shards, world) = match spec {
            Spec::FolderFirstLine(dir) => {
                let mut items = index_folder(dir, &mut skips)?;
                for item in &mut items {
                    if let Item::Stored { caption: caption @ CaptionSource::File(_), .. } = item
                        && let CaptionSource::File(p) = caption.clone()
                    {
                        *caption = CaptionSource::FirstLine(p);
                    }
                }
                (format!("firstline:{}", dir.display()), items, vec![], None)
            }
            Spec::ImageFolder(dir) => {
                if let Some(t) = read_templates(dir)? {
                    templates = t;
                }
                (format!("imagefolder:{}", dir.display()), index_image_folder(dir, &mut skips)?, vec![], None)
            }
            Spec::Idx { images, labels, classes } => {
                let names = match classes {
                    Some(p) => Some(
                        std::fs::read_to_string(p)
                            .map_err(|e| DataError::Source { path: p.display().to_string(), reason: e.to_string() })?
                            .lines()
                            .map(str::trim)
                            .filter(|l| !l.is_empty())
                            .map(str::to_string)
                            .collect(),
                    ),
                    None => None,
                };
                let set = IdxDataset::open(images, labels, names)
                    .map_err(|reason| DataError::Source { path: images.display().to_string(), reason })?;
                let items = (0..set.len()).map(Item::Idx).collect();
                idx = Some(set);
                (format!("idx:{}", images.display()), items, vec![], None)
            }
            Spec::Cache(dir) => {
                let c = LatentCache::open(dir)?;
                let items = c.manifest.items().into_iter().map(Item::Cached).collect();
                cache = Some(c);
                (format!("cache:{}", dir.display()), items, vec![], None)
            }
            Spec::Synthetic { n, seed, split } => (
                format!("synthetic:{n}:{seed}{}", if *split == Split::Heldout { ":heldout" } else { "" }),
                (0..*n).map(Item::Synthetic).collect(),
                vec![],
                Some(World::new(*seed, *split)),
            ),
            Spec::Folder(dir) => (dir.display().to_string(), index_folder(dir, &mut skips)?, vec![], None),
            Spec::Table(path) => (path.display().to_string(), index_table(path, &mut skips)?, vec![], None),
            Spec::Shards(paths) => {
                let mut items = Vec::new();
                for (i, p) in paths.iter().enumerate() {
                    index_shard(p, i, &mut items, &mut skips);
                }
                let name = match paths.len() {
                    1 => paths[0].display().to_string(),
                    n => format!("{} (+{} shards)", paths[0].display(), n - 1),
                };
                (name, items, paths.clone(), None)
            }
            Spec::Mix(_) => {
                return Err(DataError::Spec { spec: format!("{spec:?}"), reason: "a mix inside a mix".into() });
            }
        };
        if items.is_empty() {
            return Err(DataError::Empty { source_name: name, skips: skips.summary() });
        }
        Ok(Self { name, items, shards, world, cache, idx, templates, index_skips: skips, decode: decode_rgb })
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn identity(&self) -> DataIdentity {
        let mut h = crc32fast::Hasher::new();
        if let Some(cache) = &self.cache {
            h.update(cache.manifest.vae_identity.as_bytes());
        }
        for item in &self.items {
            match item {
                Item::Stored { key, .. } => h.update(key.as_bytes()),
                Item::Synthetic(i) => h.update(&i.to_le_bytes()),
                Item::Idx(i) => h.update(&(*i as u64).to_le_bytes()),
                Item::Cached(rows) => {
                    for row in rows.clone() {
                        match self.cache.as_ref().and_then(|c| c.manifest.entries.get(row)) {
                            Some(entry) => h.update(entry.key.as_bytes()),
                            None => h.update(&row.to_le_bytes()),
                        }
                    }
                }
            }
            h.update(&[0]);
        }
        DataIdentity { name: self.name.clone(), items: self.len(), fingerprint: format!("{:08x}", h.finalize()) }
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The raw bytes of an image or caption.
    pub fn read(&self, bytes: &Bytes) -> Result<Vec<u8>, Skip> {
        match bytes {
            Bytes::File(p) => std::fs::read(p).map_err(|_| Skip::Unreadable),
            Bytes::Member { shard, offset, size } => read_member(&self.shards[*shard], *offset, *size),
        }
    }

    /// The caption text: UTF-8, trimmed, non-empty. `g` picks a class caption's template.
    pub fn caption(&self, caption: &CaptionSource, g: &mut SplitMix64) -> Result<String, Skip> {
        let raw = match caption {
            CaptionSource::Text(t) => t.clone().into_bytes(),
            CaptionSource::File(p) => std::fs::read(p).map_err(|_| Skip::MissingCaption)?,
            CaptionSource::FirstLine(p) => {
                let text = String::from_utf8(std::fs::read(p).map_err(|_| Skip::MissingCaption)?)
                    .map_err(|_| Skip::NonUtf8Caption)?;
                text.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or_default().as_bytes().to_vec()
            }
            CaptionSource::Class(name) => self.class_caption(name, g).into_bytes(),
            CaptionSource::Member { shard, offset, size, json } => {
                let bytes = read_member(&self.shards[*shard], *offset, *size)?;
                if *json {
                    let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| Skip::BadCaption)?;
                    let text = ["caption", "txt", "text"].iter().find_map(|k| v.get(*k).and_then(|t| t.as_str()));
                    text.ok_or(Skip::MissingCaption)?.as_bytes().to_vec()
                } else {
                    bytes
                }
            }
        };
        let text = String::from_utf8(raw).map_err(|_| Skip::NonUtf8Caption)?;
        let text = text.trim();
        if text.is_empty() {
            return Err(Skip::EmptyCaption);
        }
        Ok(text.to_string())
    }
}

impl Source {
    /// A class name in one of the templates, drawn by `g`.
    pub fn class_caption(&self, class: &str, g: &mut SplitMix64) -> String {
        let template = &self.templates[g.below(self.templates.len())];
        template.replace("{}", class)
    }
}

/// `DIR/templates.txt`: one caption template per line, each with one `{}`; `None` when there is none.
fn read_templates(dir: &Path) -> Result<Option<Vec<String>>, DataError> {
    let path = dir.join("templates.txt");
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(None) };
    let templates: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect();
    match templates.iter().find(|t| t.matches("{}").count() != 1) {
        Some(bad) => Err(DataError::Source {
            path: path.display().to_string(),
            reason: format!("template '{bad}' must hold exactly one {{}} (where the class name goes)"),
        }),
        None if templates.is_empty() => {
            Err(DataError::Source { path: path.display().to_string(), reason: "no templates in it".into() })
        }
        None => Ok(Some(templates)),
    }
}

/// `DIR/<class>/<image>`: every image file one level down, its folder's name (underscores as spaces) the class.
fn index_image_folder(dir: &Path, skips: &mut SkipCounts) -> Result<Vec<Item>, DataError> {
    let err = |e: std::io::Error| DataError::Source { path: dir.display().to_string(), reason: e.to_string() };
    let mut classes: Vec<PathBuf> =
        std::fs::read_dir(dir).map_err(err)?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_dir()).collect();
    classes.sort();
    let mut items = Vec::new();
    for class_dir in classes {
        let class = class_dir.file_name().map(|s| s.to_string_lossy().replace('_', " ")).unwrap_or_default();
        let Ok(entries) = std::fs::read_dir(&class_dir) else {
            skips.add(Skip::Unreadable);
            continue;
        };
        let mut images: Vec<PathBuf> =
            entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| is_image(p)).collect();
        images.sort();
        for image in images {
            let key = image.strip_prefix(dir).unwrap_or(&image).display().to_string();
            items.push(Item::Stored { key, image: Bytes::File(image), caption: CaptionSource::Class(class.clone()) });
        }
    }
    Ok(items)
}

/// `size` bytes at `offset` of a file (a shard member, a cache row); a short file is a truncated shard.
pub(crate) fn read_member(shard: &Path, offset: u64, size: u64) -> Result<Vec<u8>, Skip> {
    let mut f = File::open(shard).map_err(|_| Skip::MissingShard)?;
    // The size comes from a header (tar, safetensors): check it against the file before allocating it.
    let len = f.metadata().map_err(|_| Skip::Unreadable)?.len();
    if offset.checked_add(size).is_none_or(|end| end > len) {
        return Err(Skip::TruncatedShard);
    }
    f.seek(SeekFrom::Start(offset)).map_err(|_| Skip::TruncatedShard)?;
    let mut buf = vec![0; size as usize];
    f.read_exact(&mut buf).map_err(|_| Skip::TruncatedShard)?;
    Ok(buf)
}

fn is_image(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_lowercase().as_str()))
}

fn index_folder(dir: &Path, skips: &mut SkipCounts) -> Result<Vec<Item>, DataError> {
    let err = |e: std::io::Error| DataError::Source { path: dir.display().to_string(), reason: e.to_string() };
    let mut images: Vec<PathBuf> =
        std::fs::read_dir(dir).map_err(err)?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| is_image(p)).collect();
    images.sort();
    let mut items = Vec::new();
    for image in images {
        let caption = image.with_extension("txt");
        if !caption.exists() {
            skips.add(Skip::MissingCaption);
            continue;
        }
        let key = image.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        items.push(Item::Stored { key, image: Bytes::File(image), caption: CaptionSource::File(caption) });
    }
    Ok(items)
}

fn index_table(path: &Path, skips: &mut SkipCounts) -> Result<Vec<Item>, DataError> {
    let err = |reason: String| DataError::Source { path: path.display().to_string(), reason };
    let base = path.parent().unwrap_or(Path::new("."));
    let text = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let mut rows: Vec<(Option<String>, Option<String>)> = Vec::new();
    if path.extension().and_then(|e| e.to_str()).is_some_and(|e| e.eq_ignore_ascii_case("csv")) {
        let mut reader = csv::Reader::from_reader(text.as_slice());
        let headers = reader.headers().map_err(|e| err(format!("bad CSV header: {e}")))?.clone();
        let col = |name: &str| headers.iter().position(|h| h.trim() == name);
        let (Some(ic), Some(cc)) = (col("image"), col("caption")) else {
            return Err(err("the CSV header needs `image` and `caption` columns".into()));
        };
        for record in reader.records() {
            match record {
                Ok(r) => rows.push((r.get(ic).map(str::to_string), r.get(cc).map(str::to_string))),
                Err(_) => skips.add(Skip::BadRow),
            }
        }
    } else {
        for line in text.split(|&b| b == b'\n').filter(|l| !l.iter().all(u8::is_ascii_whitespace)) {
            match serde_json::from_slice::<serde_json::Value>(line) {
                Ok(v) => rows.push((
                    v.get("image").and_then(|x| x.as_str()).map(str::to_string),
                    v.get("caption").and_then(|x| x.as_str()).map(str::to_string),
                )),
                Err(_) => skips.add(Skip::BadRow),
            }
        }
    }
    let mut items = Vec::new();
    for (image, caption) in rows {
        match (image, caption) {
            (Some(image), Some(caption)) => items.push(Item::Stored {
                key: image.clone(),
                image: Bytes::File(base.join(&image)),
                caption: CaptionSource::Text(caption),
            }),
            (None, _) => skips.add(Skip::BadRow),
            (_, None) => skips.add(Skip::MissingCaption),
        }
    }
    Ok(items)
}

/// Indexes one shard's members by key without reading their data. A missing shard, or the unreadable tail
/// of a truncated one, is counted and skipped.
fn index_shard(path: &Path, shard: usize, items: &mut Vec<Item>, skips: &mut SkipCounts) {
    let Ok(file) = File::open(path) else {
        skips.add(Skip::MissingShard);
        return;
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut archive = tar::Archive::new(file);
    let Ok(entries) = archive.entries_with_seek() else {
        skips.add(Skip::TruncatedShard);
        return;
    };
    // key -> (image member, caption member); BTreeMap keeps the shard's own key order deterministic.
    let mut members: BTreeMap<String, (Option<Bytes>, Option<CaptionSource>)> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for entry in entries {
        let Ok(entry) = entry else {
            skips.add(Skip::TruncatedShard);
            break;
        };
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let (offset, size) = (entry.raw_file_position(), entry.size());
        if offset + size > len {
            skips.add(Skip::TruncatedShard);
            break;
        }
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let base_start = name.rfind('/').map_or(0, |i| i + 1);
        let Some(dot) = name[base_start..].find('.').map(|d| base_start + d) else { continue };
        let (key, ext) = (name[..dot].to_string(), name[dot + 1..].to_lowercase());
        let slot = members.entry(key.clone()).or_insert_with(|| {
            order.push(key.clone());
            (None, None)
        });
        if IMAGE_EXTENSIONS.contains(&ext.as_str()) {
            slot.0 = Some(Bytes::Member { shard, offset, size });
        } else if ext == "txt" || ext == "json" {
            // A .txt caption wins over a .json one.
            if ext == "txt" || slot.1.is_none() {
                slot.1 = Some(CaptionSource::Member { shard, offset, size, json: ext == "json" });
            }
        }
    }
    for key in order {
        match members.remove(&key) {
            Some((Some(image), Some(caption))) => items.push(Item::Stored { key, image, caption }),
            Some((Some(_), None)) => skips.add(Skip::MissingCaption),
            Some((None, _)) => skips.add(Skip::MissingImage),
            None => {}
        }
    }
}
