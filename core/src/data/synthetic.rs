//! The embedded captioned world (`synthetic:N[:seed]`): procedurally rendered scenes with exact
//! compositional captions, so a fresh clone trains with nothing downloaded and retrieval, zero-shot accuracy
//! and captioning are measurable.
//!
//! A scene: a plain, striped, checkered or gradient background in one of eight colours; one or two kinds of
//! object (shape, colour, size), one or two of each, on a 3x3 grid; sometimes a short word in a 5x7 bitmap
//! font. Every index renders the same scene at any resolution; the held-out split is a disjoint stream.

use image::{Rgb, RgbImage};

use super::font;
use super::rng::SplitMix64;

pub const COLOURS: [(&str, [u8; 3]); 8] = [
    ("red", [220, 40, 40]),
    ("green", [40, 170, 60]),
    ("blue", [40, 80, 220]),
    ("yellow", [240, 210, 40]),
    ("purple", [140, 60, 180]),
    ("orange", [245, 140, 30]),
    ("white", [245, 245, 245]),
    ("black", [20, 20, 20]),
];
pub const SHAPES: [&str; 6] = ["circle", "square", "triangle", "star", "ring", "cross"];
pub const PATTERNS: [&str; 4] = ["plain", "striped", "checkered", "gradient"];
pub const WORDS: [&str; 8] = ["OV3", "CAT", "SUN", "MAP", "RUST", "GPU", "ZOO", "BOX"];
const POSITIONS: [&str; 9] =
    ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"];

/// The zero-shot prompt for class `label` (a shape).
pub fn zero_shot_prompt(label: usize) -> String {
    format!("a photo of a {}", SHAPES[label])
}

fn plural(shape: &str) -> String {
    if shape.ends_with('s') { format!("{shape}es") } else { format!("{shape}s") }
}

/// Every word the captions and zero-shot prompts use, in a fixed order: the vocabulary of the word-level
/// tokenizer `synthetic-words` (a test checks that every caption round-trips through it).
pub fn vocabulary() -> Vec<String> {
    let grammar = ["a", "two", "large", "small", "and", "at", "the", "on", "background", "with", "word", "photo", "of"];
    let mut words: Vec<String> = grammar.iter().map(|w| w.to_string()).collect();
    words.extend(COLOURS.iter().map(|(c, _)| c.to_string()));
    words.extend(SHAPES.iter().flat_map(|s| [s.to_string(), plural(s)]));
    words.extend(PATTERNS.iter().map(|p| p.to_string()));
    for w in POSITIONS.iter().flat_map(|p| p.split(' ')) {
        if !words.iter().any(|known| known == w) {
            words.push(w.to_string());
        }
    }
    words.extend(WORDS.iter().map(|w| format!("\"{w}\"")));
    words
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Heldout,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    pub shape: usize,
    pub colour: usize,
    pub large: bool,
    /// Cell of the 3x3 grid, row-major.
    pub cell: usize,
    /// Offset from the cell centre, in units of the image side.
    pub jitter: (f64, f64),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    pub pattern: usize,
    pub background: usize,
    pub objects: Vec<Object>,
    pub word: Option<(&'static str, usize)>,
}

/// One rendered example.
#[derive(Debug, Clone)]
pub struct Sample {
    pub image: RgbImage,
    pub caption: String,
    /// The shape of the first object: the zero-shot class.
    pub label: usize,
}

#[derive(Debug, Clone, Copy)]
pub struct World {
    seed: u64,
}

impl World {
    pub fn new(seed: u64, split: Split) -> Self {
        // The held-out split is another stream, never an index range of the training one.
        Self { seed: if split == Split::Train { seed } else { seed ^ 0x5EED_0000_0000_0001 } }
    }

    pub fn scene(&self, index: u64) -> Scene {
        let mut g = SplitMix64::new(self.seed, index);
        let background = g.below(COLOURS.len());
        let pattern = g.below(PATTERNS.len());
        let word = (g.unit() < 0.25).then(|| {
            let colour = loop {
                let c = g.below(COLOURS.len());
                if c != background {
                    break c;
                }
            };
            (*g.pick(&WORDS), colour)
        });
        // A word takes the middle row; objects share the remaining cells.
        let mut free: Vec<usize> = (0..9).filter(|c| word.is_none() || !(3..6).contains(c)).collect();
        let mut objects = Vec::new();
        for _ in 0..1 + g.below(2) {
            let shape = g.below(SHAPES.len());
            let colour = (background + 1 + g.below(COLOURS.len() - 1)) % COLOURS.len();
            let large = g.unit() < 0.5;
            if objects.iter().any(|o: &Object| o.shape == shape && o.colour == colour && o.large == large) {
                continue; // one kind per description
            }
            for _ in 0..1 + g.below(2) {
                let cell = free.remove(g.below(free.len()));
                let jitter = ((g.unit() - 0.5) * 0.06, (g.unit() - 0.5) * 0.06);
                objects.push(Object { shape, colour, large, cell, jitter });
            }
        }
        Scene { pattern, background, objects, word }
    }

    pub fn sample(&self, index: u64, resolution: u32) -> Sample {
        let scene = self.scene(index);
        Sample { image: render(&scene, resolution), caption: caption(&scene), label: scene.objects[0].shape }
    }
}

/// "two small red circles and a large blue star at the top on a striped green background with the word "CAT"".
pub fn caption(scene: &Scene) -> String {
    let mut kinds: Vec<(&Object, usize)> = Vec::new();
    for o in &scene.objects {
        match kinds.iter_mut().find(|(k, _)| k.shape == o.shape && k.colour == o.colour && k.large == o.large) {
            Some((_, n)) => *n += 1,
            None => kinds.push((o, 1)),
        }
    }
    let phrases: Vec<String> = kinds
        .iter()
        .map(|(o, n)| {
            let size = if o.large { "large" } else { "small" };
            let shape = SHAPES[o.shape];
            let (count, noun) = if *n == 1 { ("a", shape.to_string()) } else { ("two", plural(shape)) };
            format!("{count} {size} {} {noun}", COLOURS[o.colour].0)
        })
        .collect();
    let mut text = phrases.join(" and ");
    if scene.objects.len() == 1 {
        text += &format!(" at the {}", POSITIONS[scene.objects[0].cell]);
    }
    text += &format!(" on a {} {} background", PATTERNS[scene.pattern], COLOURS[scene.background].0);
    if let Some((word, _)) = scene.word {
        text += &format!(" with the word \"{word}\"");
    }
    text
}

fn scaled(c: [u8; 3], f: f64) -> [f64; 3] {
    c.map(|v| v as f64 * f)
}

/// Background colour at (u, v) in [0, 1)^2.
fn background(scene: &Scene, u: f64, v: f64) -> [f64; 3] {
    let c = COLOURS[scene.background].1;
    let dark = if scene.background == 7 { 2.5 } else { 0.7 }; // black gets a lighter second tone
    let f = match PATTERNS[scene.pattern] {
        "striped" => {
            if ((u + v) * 8.0).floor() as i64 % 2 == 0 {
                1.0
            } else {
                dark
            }
        }
        "checkered" => {
            if ((u * 6.0).floor() as i64 + (v * 6.0).floor() as i64) % 2 == 0 {
                1.0
            } else {
                dark
            }
        }
        "gradient" => 1.0 + (dark - 1.0) * v,
        _ => 1.0,
    };
    scaled(c, f).map(|x| x.min(255.0))
}

/// Is (dx, dy) (relative to the centre, in units of the radius) inside `shape`?
fn inside(shape: &str, dx: f64, dy: f64) -> bool {
    let d = (dx * dx + dy * dy).sqrt();
    match shape {
        "circle" => d < 1.0,
        "square" => dx.abs().max(dy.abs()) < 0.85,
        "triangle" => (-1.0..0.8).contains(&dy) && dx.abs() < (dy + 1.0) / 1.8,
        "star" => {
            let theta = dy.atan2(dx) + std::f64::consts::FRAC_PI_2;
            d < 0.45 + 0.55 * ((theta * 5.0).cos() * 0.5 + 0.5).powi(3)
        }
        "ring" => (0.55..1.0).contains(&d),
        "cross" => (dx.abs() < 0.3 && dy.abs() < 1.0) || (dy.abs() < 0.3 && dx.abs() < 1.0),
        _ => false,
    }
}

fn colour_at(scene: &Scene, u: f64, v: f64) -> [f64; 3] {
    let mut c = background(scene, u, v);
    for o in &scene.objects {
        let (cx, cy) =
            ((o.cell % 3) as f64 / 3.0 + 1.0 / 6.0 + o.jitter.0, (o.cell / 3) as f64 / 3.0 + 1.0 / 6.0 + o.jitter.1);
        let r = if o.large { 0.15 } else { 0.09 };
        if inside(SHAPES[o.shape], (u - cx) / r, (v - cy) / r) {
            c = scaled(COLOURS[o.colour].1, 1.0);
        }
    }
    if let Some((word, colour)) = scene.word {
        // The word spans the middle third: 6 font columns per letter (5 + spacing).
        let cols = word.len() * 6 - 1;
        let unit = 0.9 / cols.max(14) as f64;
        let (x0, y0) = (0.5 - unit * cols as f64 / 2.0, 0.5 - unit * 3.5);
        let (col, row) = (((u - x0) / unit).floor(), ((v - y0) / unit).floor());
        if col >= 0.0 && row >= 0.0 {
            let (col, row) = (col as usize, row as usize);
            if let Some(ch) = word.chars().nth(col / 6) {
                if col % 6 < 5 && font::ink(ch, col % 6, row) {
                    c = scaled(COLOURS[colour].1, 1.0);
                }
            }
        }
    }
    c
}

/// Renders with 2x2 supersampling, so edges are antialiased at every resolution.
pub fn render(scene: &Scene, resolution: u32) -> RgbImage {
    let n = resolution as f64;
    RgbImage::from_fn(resolution, resolution, |x, y| {
        let mut acc = [0.0; 3];
        for (sx, sy) in [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)] {
            let c = colour_at(scene, (x as f64 + sx) / n, (y as f64 + sy) / n);
            for i in 0..3 {
                acc[i] += c[i] / 4.0;
            }
        }
        Rgb(acc.map(|v| v.round().clamp(0.0, 255.0) as u8))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenes_are_deterministic_and_splits_differ() {
        let train = World::new(0, Split::Train);
        assert_eq!(train.scene(17), train.scene(17));
        assert_eq!(train.sample(17, 64).image, train.sample(17, 64).image);
        let held = World::new(0, Split::Heldout);
        let same = (0..50).filter(|&i| train.sample(i, 32).caption == held.sample(i, 32).caption).count();
        assert!(same < 10, "{same}/50 held-out captions equal the training ones at the same index");
    }

    #[test]
    fn every_caption_round_trips_through_the_word_tokenizer() {
        let tok = crate::tokenizer::Tokenizer::words(&vocabulary()).expect("a valid vocabulary");
        let quick = crate::train::TrainConfig::quick();
        let context = quick.context_length.expect("the quick recipe sets its context length");
        assert_eq!(quick.tokenizer.as_deref(), Some(crate::train::config::SYNTHETIC_WORDS));
        let prompts = (0..SHAPES.len()).map(zero_shot_prompt);
        let captions = [Split::Train, Split::Heldout]
            .into_iter()
            .flat_map(|split| (0..3000).map(move |i| caption(&World::new(5, split).scene(i))));
        let mut longest = 0;
        for text in captions.chain(prompts) {
            let ids = tok.encode(&text, context);
            assert!(!ids.contains(&0), "a word of `{text}` is outside the vocabulary");
            assert_eq!(tok.decode(&ids), text, "cut or changed by the context length {context}");
            longest = longest.max(text.split(' ').count());
        }
        // The longest caption the grammar allows: two kinds of two objects and a word.
        assert_eq!(longest, 18);
    }

    #[test]
    fn captions_describe_what_is_drawn() {
        let world = World::new(3, Split::Train);
        for i in 0..200 {
            let scene = world.scene(i);
            let text = caption(&scene);
            for o in &scene.objects {
                assert!(text.contains(SHAPES[o.shape]) && text.contains(COLOURS[o.colour].0), "{text}");
            }
            assert!(text.contains(PATTERNS[scene.pattern]) && text.contains(COLOURS[scene.background].0));
            assert_eq!(scene.word.is_some(), text.contains("with the word"));
            assert!(!text.contains("crosss"), "{text}");
            // The object's colour is really in the image, at its centre.
            let img = render(&scene, 96);
            let o = &scene.objects[0];
            let (cx, cy) = (
                (o.cell % 3) as f64 / 3.0 + 1.0 / 6.0 + o.jitter.0,
                (o.cell / 3) as f64 / 3.0 + 1.0 / 6.0 + o.jitter.1,
            );
            if SHAPES[o.shape] != "ring" {
                let p = img.get_pixel((cx * 96.0) as u32, (cy * 96.0) as u32).0;
                let want = COLOURS[o.colour].1;
                assert!((0..3).all(|c| (p[c] as i32 - want[c] as i32).abs() < 40), "{text}: centre {p:?} vs {want:?}");
            }
        }
    }

    #[test]
    fn font_draws_every_character_differently() {
        let bitmaps: Vec<Vec<bool>> =
            font::alphabet().map(|c| (0..35).map(|i| font::ink(c, i % 5, i / 5)).collect()).collect();
        for (i, a) in bitmaps.iter().enumerate() {
            assert!(a.iter().any(|&b| b));
            assert!(bitmaps[i + 1..].iter().all(|b| b != a), "two glyphs are identical");
        }
    }
}
