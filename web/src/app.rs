//! The demo's state and its pipeline: device, model and VAE once; then per image the stages of
//! `ov3_core::inference`, each timed up to the read-back that ends it (WebGPU work is asynchronous, so a
//! stage is finished only when its output has reached the page).

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use burn::tensor::wgpu::wgpu;
use burn::tensor::{Device, Distribution, Tensor};
use image::RgbImage;
use ov3_core::ModelConfig;
use ov3_core::config::AttentionImpl;
use ov3_core::data::decode::{DecodeLimits, decode_rgb};
use ov3_core::data::skips::Skip;
use ov3_core::eval::generate_captions_async;
use ov3_core::flash;
use ov3_core::image_io::to_tensor;
use ov3_core::inference::{
    Tokens, encoder_inputs, normalize_rows, pca_rgb, prepare, rank, to_pixels, token_grid, with_noise,
};
use ov3_core::metrics::{mse_01, psnr_db};
use ov3_core::model::Ov3;
use ov3_core::model_file::load_model_bytes;
use ov3_core::vae::{Vae, VaeRecord};
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::{JsFuture, spawn_local};
use web_sys::{HtmlInputElement, HtmlTextAreaElement};

use crate::dom::{self, by_id, js_error, listen, message, now_ms, set_text};
use crate::fetch::fetch_bytes;
use crate::view;

/// The model file the page loads unless `?model=URL` names another (`ov3 export` writes one).
const DEFAULT_MODEL: &str = "ov3-tiny-demo.safetensors";
/// The embedded default autoencoder (`assets/ae/`), copied next to the page by web/build.sh.
const AE_FILE: &str = "ov3_tiny_ae.safetensors";
/// The side images are cropped to: the resolution the demo checkpoint was trained at last.
pub const RESOLUTION: u32 = 128;
/// Files larger than this are refused before reading them.
const MAX_FILE_BYTES: f64 = 50e6;
/// Images with more pixels than this are refused from their header, before decoding.
const MAX_PIXELS: u64 = 40_000_000;
/// Photos with more pixels than this (a phone's 4000x3000 JPEG) are decoded and shrunk by the browser
/// (`createImageBitmap`, off the page's thread) to [`BROWSER_SHORT_SIDE`] before ov3's own crop and resize;
/// the wasm decoder and resize would hold the page for seconds. Smaller ones take the CLI's exact path.
const BROWSER_DECODE_PIXELS: u64 = 4_000_000;
/// Four times the model's side, so that ov3's resize (`inference::prepare`) still does the final filtering.
const BROWSER_SHORT_SIDE: u32 = 4 * RESOLUTION;

pub struct App {
    model: Ov3,
    cfg: ModelConfig,
    vae: Vae,
    device: Device,
    current: RefCell<Option<Current>>,
    /// A decode is in flight; slider moves meanwhile only update `pending_sigma`.
    decoding: Cell<bool>,
    pending_sigma: Cell<Option<f64>>,
    /// Bumped for every new image, so that work for a replaced image stops drawing.
    generation: Cell<u64>,
}

#[derive(Clone)]
struct Current {
    tokens: Tokens,
    /// The noise direction of eq. 3, drawn once per image so the slider only scales it.
    eps: Tensor<3>,
    embedding: Vec<f32>,
    /// Which image this is ([`App::next_generation`]).
    generation: u64,
}

pub async fn run() -> Result<(), String> {
    set_text("status", "starting WebGPU…");
    let (device, backend) = init_device().await;
    set_text("backend", &backend);
    let url = model_url();
    set_text("status", &format!("loading {url}…"));
    let start = now_ms();
    let (bytes, cached) = fetch_bytes(&url, true, |d, t| view::download_progress("the model", d, t)).await?;
    let size = bytes.len();
    let (model, cfg) = load_model_bytes(bytes, &url, &device).map_err(|e| e.to_string())?;
    let (attention, note) = attention(&device, &cfg);
    let model = model.with_attention(attention);
    set_text("backend", &format!("{backend}{note}"));
    // The frozen VAE: the embedded default autoencoder, fetched like the model (the native binary has it
    // compiled in).
    let (ae, _) = fetch_bytes(AE_FILE, true, |d, t| view::download_progress("the autoencoder", d, t)).await?;
    let vae = Vae::from_bytes(ae, "embedded", &device).map_err(|e| e.to_string())?;
    // The page decodes with the embedded autoencoder only: a model trained on another one is refused, named.
    match &cfg.vae {
        Some(record) => {
            let identity = vae.identity_async().await.map_err(|e| format!("reading the autoencoder back: {e:?}"))?;
            record.check_identity(&vae, &identity).map_err(|e| format!("{url}: {e}"))?
        }
        None => message(&format!("{url}: {}", VaeRecord::unnamed(&vae))),
    }
    view::model_loaded(&url, size, cached, now_ms() - start, cfg.tau);
    let app = Rc::new(App {
        model,
        cfg,
        vae,
        device,
        current: RefCell::new(None),
        decoding: Cell::new(false),
        pending_sigma: Cell::new(None),
        generation: Cell::new(0),
    });
    wire(&app);
    load_samples(&app).await?;
    set_text("status", "ready: pick a sample, choose a file or drop an image");
    dom::set_attr("app", "data-state", "ready");
    Ok(())
}

/// WebGPU when the browser offers an adapter; otherwise burn's CPU backend compiled into the wasm.
async fn init_device() -> (Device, String) {
    let navigator = web_sys::window().map(|w| w.navigator());
    let has_webgpu = navigator.is_some_and(|n| js_sys::Reflect::has(&n, &"gpu".into()).unwrap_or(false));
    let why = if has_webgpu {
        match Device::wgpu_options().init_with_setup_async().await {
            Ok((device, setup)) => {
                let info = setup.adapter.get_info();
                // Browsers often hide the adapter's description; say so rather than print nothing.
                let name = if info.name.is_empty() { "adapter name hidden by the browser" } else { &info.name };
                let software = if info.device_type == wgpu::DeviceType::Cpu { ", a software fallback" } else { "" };
                return (device, format!("WebGPU — {name}{software}"));
            }
            Err(e) => {
                web_sys::console::warn_1(&format!("WebGPU could not start: {e}").into());
                "WebGPU is present but gave no usable adapter".to_string()
            }
        }
    } else {
        "this browser has no WebGPU".to_string()
    };
    (Device::flex(), format!("CPU (burn's flex backend in wasm; slower than a GPU) — {why}"))
}

/// `?name=value` of the page's address.
fn query_param(name: &str) -> Option<String> {
    web_sys::window()
        .and_then(|w| w.location().search().ok())
        .and_then(|q| web_sys::UrlSearchParams::new_with_str(&q).ok())
        .and_then(|p| p.get(name))
}

fn model_url() -> String {
    query_param("model").unwrap_or_else(|| DEFAULT_MODEL.to_string())
}

/// `?attention=fused` runs every transformer through our WGSL kernels (shaders/) on WebGPU; the CPU
/// fallback has none and keeps the reference path.
fn attention(device: &Device, cfg: &ModelConfig) -> (AttentionImpl, &'static str) {
    let fused = query_param("attention").as_deref() == Some("fused");
    match (fused, flash::supports(device, cfg.encoder.width / cfg.encoder.heads)) {
        (true, true) => (AttentionImpl::Fused, " · fused WGSL attention"),
        (true, false) => (AttentionImpl::Reference, " · fused attention needs WebGPU: reference path"),
        (false, _) => (AttentionImpl::Reference, ""),
    }
}

/// Event handlers: file input, drag and drop, the noise slider, the caption box.
fn wire(app: &Rc<App>) {
    let a = app.clone();
    listen("file", "change", move |_| {
        let input: HtmlInputElement = by_id("file");
        if let Some(file) = input.files().and_then(|f| f.get(0)) {
            spawn_local(a.clone().open_file(file));
        }
    });
    listen("drop", "dragover", |e| e.prevent_default());
    let a = app.clone();
    listen("drop", "drop", move |e| {
        e.prevent_default();
        let file = e
            .dyn_ref::<web_sys::DragEvent>()
            .and_then(|d| d.data_transfer())
            .and_then(|t| t.files())
            .and_then(|f| f.get(0));
        match file {
            Some(file) => spawn_local(a.clone().open_file(file)),
            None => message("nothing to open: drop an image file"),
        }
    });
    let a = app.clone();
    listen("noise", "input", move |_| {
        let sigma = by_id::<HtmlInputElement>("noise").value_as_number();
        a.pending_sigma.set(Some(sigma));
        if !a.decoding.get() {
            spawn_local(a.clone().decode_pending());
        }
    });
    let a = app.clone();
    listen("rank", "click", move |_| spawn_local(a.clone().rank_captions()));
}

/// The shipped samples as buttons; a click opens the image and puts every sample's caption in the box.
async fn load_samples(app: &Rc<App>) -> Result<(), String> {
    let (bytes, _) = fetch_bytes("samples/samples.json", false, |_, _| {}).await?;
    let samples: Vec<view::Sample> =
        serde_json::from_slice(&bytes).map_err(|e| format!("samples/samples.json: {e}"))?;
    view::samples(&samples);
    for (i, sample) in samples.iter().enumerate() {
        let a = app.clone();
        let all: Vec<String> = samples.iter().map(|s| s.caption.clone()).collect();
        let file = sample.file.clone();
        listen(&format!("sample-{i}"), "click", move |_| {
            by_id::<HtmlTextAreaElement>("captions").set_value(&all.join("\n"));
            spawn_local(a.clone().open_url(file.clone()));
        });
    }
    Ok(())
}

async fn file_bytes(file: &web_sys::File) -> Result<Vec<u8>, String> {
    if file.size() > MAX_FILE_BYTES {
        return Err(format!(
            "{}: {:.0} MB is too large (at most {:.0} MB)",
            file.name(),
            file.size() / 1e6,
            MAX_FILE_BYTES / 1e6
        ));
    }
    let buffer = JsFuture::from(file.array_buffer()).await.map_err(js_error)?;
    Ok(js_sys::Uint8Array::new(&buffer).to_vec())
}

/// Image bytes -> RGB, and how: ov3's decoder (as the CLI) unless the header says the photo is large, then the
/// browser's, shrunk on the way ([`BROWSER_DECODE_PIXELS`]). Either way alpha is composited onto white.
async fn decode(bytes: &[u8]) -> Result<(RgbImage, String), Skip> {
    let limits = DecodeLimits { max_pixels: MAX_PIXELS, ..DecodeLimits::default() };
    let dims = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .ok()
        .and_then(|r| r.into_dimensions().ok());
    if let Some((w, h)) = dims {
        let pixels = w as u64 * h as u64;
        if pixels > BROWSER_DECODE_PIXELS && pixels <= MAX_PIXELS {
            match browser_decode(bytes, w, h).await {
                Ok(img) => {
                    let how = format!("{w}x{h}, shrunk to {}x{} by the browser", img.width(), img.height());
                    return Ok((img, how));
                }
                // The browser could not: ov3's decoder says why (or manages).
                Err(e) => web_sys::console::warn_1(&format!("the browser could not decode the image: {e}").into()),
            }
        }
    }
    let img = decode_rgb(bytes, limits)?;
    let how = format!("{}x{}, decoded by ov3", img.width(), img.height());
    Ok((img, how))
}

/// `createImageBitmap` with a resize to a shorter side of [`BROWSER_SHORT_SIDE`] (decoded off the page's
/// thread), drawn onto white and read back as RGB.
async fn browser_decode(bytes: &[u8], w: u32, h: u32) -> Result<RgbImage, String> {
    let window = web_sys::window().ok_or("no window")?;
    let parts = js_sys::Array::of1(&js_sys::Uint8Array::from(bytes));
    let blob = web_sys::Blob::new_with_u8_array_sequence(&parts).map_err(js_error)?;
    let scale = BROWSER_SHORT_SIDE as f64 / w.min(h) as f64;
    let (tw, th) = (((w as f64 * scale).round() as u32).max(1), ((h as f64 * scale).round() as u32).max(1));
    let options = web_sys::ImageBitmapOptions::new();
    options.set_resize_width(tw);
    options.set_resize_height(th);
    options.set_resize_quality(web_sys::ResizeQuality::High);
    let promise = window.create_image_bitmap_with_blob_and_image_bitmap_options(&blob, &options).map_err(js_error)?;
    let bitmap: web_sys::ImageBitmap =
        JsFuture::from(promise).await.map_err(js_error)?.dyn_into().map_err(|_| "not an ImageBitmap")?;
    let canvas: web_sys::HtmlCanvasElement =
        dom::document().create_element("canvas").map_err(js_error)?.dyn_into().map_err(|_| "not a canvas")?;
    canvas.set_width(tw);
    canvas.set_height(th);
    let ctx: web_sys::CanvasRenderingContext2d = canvas
        .get_context("2d")
        .map_err(js_error)?
        .ok_or("no 2d context")?
        .dyn_into()
        .map_err(|_| "not a 2d context")?;
    ctx.set_fill_style_str("white");
    ctx.fill_rect(0.0, 0.0, tw as f64, th as f64);
    ctx.draw_image_with_image_bitmap(&bitmap, 0.0, 0.0).map_err(js_error)?;
    bitmap.close();
    let rgba = ctx.get_image_data(0.0, 0.0, tw as f64, th as f64).map_err(js_error)?.data();
    let rgb: Vec<u8> = rgba.chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect();
    RgbImage::from_raw(tw, th, rgb).ok_or_else(|| "unexpected pixel count from the canvas".to_string())
}

async fn read(t: Tensor<1>) -> Result<Vec<f32>, String> {
    read_any(t.into_data_async()).await
}

async fn read_any(
    data: impl std::future::Future<Output = Result<burn::tensor::TensorData, burn::tensor::ExecutionError>>,
) -> Result<Vec<f32>, String> {
    let data = data.await.map_err(|e| format!("reading back from the device failed: {e:?}"))?;
    data.convert::<f32>().try_to_vec::<f32>().map_err(|e| format!("unexpected tensor data: {e:?}"))
}

impl App {
    /// A new image was asked for: everything still running for an older one stops drawing from now on,
    /// even if its bytes arrive later than this one's (a large file read, then a small one dropped).
    fn next_generation(&self) -> u64 {
        let generation = self.generation.get() + 1;
        self.generation.set(generation);
        generation
    }

    /// Whether the image of `generation` has been replaced by a newer one.
    fn superseded(&self, generation: u64) -> bool {
        self.generation.get() != generation
    }

    async fn open_file(self: Rc<Self>, file: web_sys::File) {
        let generation = self.next_generation();
        let name = file.name();
        match file_bytes(&file).await {
            Ok(bytes) => self.process(&name, bytes, generation).await,
            Err(e) if !self.superseded(generation) => message(&e),
            Err(_) => {}
        }
    }

    async fn open_url(self: Rc<Self>, url: String) {
        let generation = self.next_generation();
        match fetch_bytes(&url, false, |_, _| {}).await {
            Ok((bytes, _)) => self.process(&url, bytes, generation).await,
            Err(e) if !self.superseded(generation) => message(&e),
            Err(_) => {}
        }
    }

    /// Decode -> crop -> tokens -> reconstruction, ranking and caption. Errors are shown and the page goes on.
    async fn process(self: Rc<Self>, name: &str, bytes: Vec<u8>, generation: u64) {
        if self.superseded(generation) {
            return;
        }
        dom::set_attr("app", "data-state", "working");
        message("");
        set_text("status", &format!("{name}: decoding…"));
        let t = now_ms();
        let prepared = match decode(&bytes).await {
            Ok((img, how)) => prepare(&img, RESOLUTION).map(|img| (img, how)).map_err(|e| format!("{name}: {e}")),
            Err(skip) => Err(format!("{name}: not an image this page can use ({})", skip.name())),
        };
        let result = match prepared {
            Ok((img, how)) => {
                dom::set_attr("original", "data-decoded", &how);
                let decode_ms = now_ms() - t;
                self.clone().run_pipeline(name, img, decode_ms, generation).await
            }
            Err(e) => Err(e),
        };
        if !self.superseded(generation) {
            if let Err(e) = result {
                message(&e);
            }
            dom::set_attr("app", "data-state", "done");
            // Tests wait for this counter to move: each finished image, good or bad, bumps it once.
            let runs: u64 =
                by_id::<web_sys::Element>("app").get_attribute("data-runs").and_then(|r| r.parse().ok()).unwrap_or(0);
            dom::set_attr("app", "data-runs", &(runs + 1).to_string());
        }
    }

    async fn run_pipeline(
        self: Rc<Self>,
        name: &str,
        img: RgbImage,
        decode_ms: f64,
        generation: u64,
    ) -> Result<(), String> {
        set_text("status", &format!("{name}: encoding…"));
        view::image("original", &img);
        let image = to_tensor(&img, &self.device);
        let mut timings = view::Timings { decode: decode_ms, ..view::Timings::default() };

        let t = now_ms();
        let inputs = encoder_inputs(self.model.input_space, &self.vae, image.clone());
        read_any(inputs.clone().sum().into_data_async()).await?;
        timings.vae_encoder = now_ms() - t;

        let t = now_ms();
        let z_u = self.model.encode(inputs.clone());
        let z = read_any(z_u.clone().into_data_async()).await?;
        timings.vit_encoder = now_ms() - t;
        if self.superseded(generation) {
            return Ok(());
        }
        let [_, n, d] = z_u.dims();
        let grid = token_grid(&self.model, &inputs);
        view::tokens(&pca_rgb(&z, n, d), grid, d);

        let embedding = self.model.image_embedding(z_u.clone());
        let embedding = normalize_rows(&read_any(embedding.into_data_async()).await?, self.cfg.embed_dim).remove(0);
        if self.superseded(generation) {
            return Ok(());
        }
        self.device.seed(0);
        let eps = Tensor::<3>::random(z_u.dims(), Distribution::Normal(0.0, 1.0), &self.device);
        let tokens = Tokens { image, inputs, z_u, grid };
        *self.current.borrow_mut() = Some(Current { tokens: tokens.clone(), eps, embedding, generation });

        let t = now_ms();
        let vae_only = to_pixels(self.model.input_space, &self.vae, tokens.inputs.clone());
        let (pixels, mse) =
            (read_any(vae_only.clone().into_data_async()).await?, read(mse_01(tokens.image.clone(), vae_only)).await?);
        timings.vae_only = now_ms() - t;
        if self.superseded(generation) {
            return Ok(());
        }
        view::reconstruction("vae-only", &pixels, RESOLUTION, psnr_db(mse[0] as f64).map_err(|e| e.to_string())?);

        let sigma = by_id::<HtmlInputElement>("noise").value_as_number();
        self.decode(sigma, &mut timings).await?;
        view::timings(&timings);
        if self.superseded(generation) {
            return Ok(());
        }
        self.rank_captions_now().await?;
        set_text("status", &format!("{name}: captioning…"));
        let t = now_ms();
        let caption = generate_captions_async(&self.model, tokens.z_u, &self.cfg, None)
            .await
            .map_err(|e| format!("captioning failed: {e:?}"))?;
        timings.caption = now_ms() - t;
        if !self.superseded(generation) {
            set_text("caption", &caption[0]);
            view::timings(&timings);
            set_text("status", &format!("{name}: done"));
        }
        Ok(())
    }

    /// ViT decoder + VAE decoder at noise `sigma`, drawn with its PSNR against the cropped input.
    async fn decode(&self, sigma: f64, timings: &mut view::Timings) -> Result<(), String> {
        let Some(cur) = self.current.borrow().clone() else { return Ok(()) };
        let t = now_ms();
        let predicted = self.model.decode(with_noise(cur.tokens.z_u, cur.eps, sigma), cur.tokens.grid);
        read_any(predicted.clone().sum().into_data_async()).await?;
        timings.vit_decoder = now_ms() - t;
        let t = now_ms();
        let rec = to_pixels(self.model.input_space, &self.vae, predicted);
        let pixels = read_any(rec.clone().into_data_async()).await?;
        timings.vae_decoder = now_ms() - t;
        let mse = read(mse_01(cur.tokens.image, rec)).await?;
        if self.superseded(cur.generation) {
            return Ok(()); // another image arrived while this one decoded: its own decode draws
        }
        view::reconstruction("ov3", &pixels, RESOLUTION, psnr_db(mse[0] as f64).map_err(|e| e.to_string())?);
        set_text("sigma", &format!("{sigma:.2}"));
        Ok(())
    }

    /// Re-decodes for the latest slider position until the slider stops moving.
    async fn decode_pending(self: Rc<Self>) {
        self.decoding.set(true);
        while let Some(sigma) = self.pending_sigma.take() {
            let mut timings = view::Timings::default();
            if let Err(e) = self.decode(sigma, &mut timings).await {
                message(&e);
            }
            dom::yield_to_browser().await;
        }
        self.decoding.set(false);
    }

    async fn rank_captions(self: Rc<Self>) {
        if let Err(e) = self.rank_captions_now().await {
            message(&e);
        }
    }

    /// The caption box's lines ranked by contrastive similarity to the current image.
    async fn rank_captions_now(&self) -> Result<(), String> {
        let Some(embedding) = self.current.borrow().as_ref().map(|c| c.embedding.clone()) else {
            return Err("open an image first".into());
        };
        let texts: Vec<String> = by_id::<HtmlTextAreaElement>("captions")
            .value()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .take(64)
            .map(String::from)
            .collect();
        if texts.is_empty() {
            view::ranking(&[], &[]);
            return Ok(());
        }
        let text = self.model.text_embedding(self.model.tokenizer.batch(&texts, self.cfg.context_length, &self.device));
        let rows = normalize_rows(&read_any(text.into_data_async()).await?, self.cfg.embed_dim);
        view::ranking(&texts, &rank(&embedding, &rows));
        Ok(())
    }
}
