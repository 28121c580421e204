//! The ov3 demo page, compiled to wasm: an image goes through the frozen VAE encoder and the ViT encoder
//! on WebGPU (burn's wgpu backend; burn's CPU backend when the browser has no WebGPU), the unified tokens
//! are shown as a picture, reconstructed with a live noise slider, matched against typed captions and
//! captioned. The markup lives in `index.html`; this crate fills it in.

mod app;
mod dom;
mod fetch;
mod view;

use wasm_bindgen::prelude::*;

#[wasm_bindgen(start)]
pub fn start() {
    // A panic must reach the page, not only the console: the page would otherwise just stop.
    std::panic::set_hook(Box::new(|info| dom::fatal(&format!("internal error: {info}"))));
    wasm_bindgen_futures::spawn_local(async {
        if let Err(e) = app::run().await {
            dom::fatal(&e);
        }
    });
}
