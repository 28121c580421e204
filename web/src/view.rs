//! What the page shows: download progress, the images with their PSNR, the token picture, the caption
//! ranking, per-stage timings. Values the browser test reads are also put in `data-value` attributes.

use image::RgbImage;
use ov3_core::image_io::from_chw;
use web_sys::{Element, HtmlInputElement};

use crate::dom::{by_id, document, draw_rgb, set_attr, set_text};

/// One shipped sample (`samples/samples.json`).
#[derive(serde::Deserialize)]
pub struct Sample {
    pub file: String,
    pub caption: String,
}

pub fn download_progress(what: &str, done: u64, total: u64) {
    let text = if total > 0 {
        set_attr("download", "value", &format!("{}", done as f64 / total as f64));
        format!("loading {what}: {:.1} / {:.1} MB", done as f64 / 1e6, total as f64 / 1e6)
    } else {
        format!("loading {what}: {:.1} MB", done as f64 / 1e6)
    };
    set_text("status", &text);
}

pub fn model_loaded(url: &str, bytes: usize, cached: bool, ms: f64, tau: f64) {
    set_attr("download", "value", "1");
    let from = if cached { "from the browser cache" } else { "downloaded" };
    set_text("model", &format!("{url}: {:.1} MB, {from}, ready in {:.1} s", bytes as f64 / 1e6, ms / 1e3));
    // The slider spans the noise range the decoder was trained on (eq. 3: sigma ~ U[0, tau]).
    let slider: HtmlInputElement = by_id("noise");
    slider.set_max(&format!("{tau}"));
    slider.set_step(&format!("{}", tau / 100.0));
    set_text("tau", &format!("{tau}"));
}

/// One button per sample, with its picture.
pub fn samples(samples: &[Sample]) {
    let list = by_id::<Element>("samples");
    list.set_inner_html("");
    for (i, s) in samples.iter().enumerate() {
        let button = document().create_element("button").expect("create button");
        button.set_id(&format!("sample-{i}"));
        button.set_attribute("title", &s.caption).expect("title");
        let img = document().create_element("img").expect("create img");
        img.set_attribute("src", &s.file).expect("src");
        img.set_attribute("alt", &s.caption).expect("alt");
        button.append_child(&img).expect("append");
        list.append_child(&button).expect("append");
    }
}

pub fn image(canvas: &str, img: &RgbImage) {
    draw_rgb(canvas, img.as_raw(), img.width(), img.height());
}

/// A decoded `[1, 3, R, R]` image in [-1, 1] and its PSNR against the cropped input.
pub fn reconstruction(canvas: &str, chw: &[f32], res: u32, psnr: f64) {
    image(canvas, &from_chw(chw, res as usize, res as usize));
    let id = format!("psnr-{canvas}");
    set_text(&id, &format!("{psnr:.2} dB"));
    set_attr(&id, "data-value", &format!("{psnr}"));
}

/// The token picture: one cell per token of the `(h, w)` grid, coloured by the PCA of z_u.
pub fn tokens(colours: &[[u8; 3]], (h, w): (usize, usize), width: usize) {
    let rgb: Vec<u8> = colours.iter().flatten().copied().collect();
    draw_rgb("tokens", &rgb, w as u32, h as u32);
    set_text("tokens-info", &format!("{} tokens ({h}x{w}) of width {width}", h * w));
}

/// Captions best first, with their cosine similarity.
pub fn ranking(texts: &[String], ranked: &[(usize, f32)]) {
    let list = by_id::<Element>("ranking");
    list.set_inner_html("");
    for &(i, sim) in ranked {
        let item = document().create_element("li").expect("create li");
        item.set_attribute("data-value", &format!("{sim}")).expect("data-value");
        let score = document().create_element("span").expect("create span");
        score.set_class_name("score");
        score.set_text_content(Some(&format!("{sim:+.3}")));
        let text = document().create_element("span").expect("create span");
        text.set_class_name("text");
        text.set_text_content(Some(&texts[i]));
        item.append_child(&score).expect("append");
        item.append_child(&text).expect("append");
        list.append_child(&item).expect("append");
    }
}

/// Milliseconds per stage of the last run (each up to the read-back that ends it).
#[derive(Default)]
pub struct Timings {
    /// Decoding, cropping and resizing the file.
    pub decode: f64,
    pub vae_encoder: f64,
    pub vit_encoder: f64,
    pub vae_only: f64,
    pub vit_decoder: f64,
    pub vae_decoder: f64,
    pub caption: f64,
}

pub fn timings(t: &Timings) {
    let rows = [
        ("decode", t.decode),
        ("VAE encoder", t.vae_encoder),
        ("ViT encoder", t.vit_encoder),
        ("VAE decoder (VAE only)", t.vae_only),
        ("ViT decoder", t.vit_decoder),
        ("VAE decoder", t.vae_decoder),
        ("caption", t.caption),
    ];
    let text: Vec<String> =
        rows.iter().filter(|(_, ms)| *ms > 0.0).map(|(name, ms)| format!("{name}: {ms:.0} ms")).collect();
    set_text("timings", &text.join(" · "));
}
