//! ov3 in the browser. The demo page (encode, tokens, reconstruct, caption on WebGPU) builds on this
//! crate; today it exposes the model's version and preset table to the page.

use wasm_bindgen::prelude::*;

/// The crate version, so the page can show which ov3 built it.
#[wasm_bindgen]
pub fn version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}
