//! Small helpers over web-sys: find elements by id, set text, draw RGB pixels, listen to events.

use wasm_bindgen::prelude::*;
use wasm_bindgen::{Clamped, JsCast};
use web_sys::{CanvasRenderingContext2d, Document, Element, HtmlCanvasElement, ImageData};

pub fn document() -> Document {
    web_sys::window().and_then(|w| w.document()).expect("a page has a document")
}

/// The element with `id`, cast to `T`. The ids are those of `index.html`; a missing one is a bug there.
pub fn by_id<T: JsCast>(id: &str) -> T {
    document()
        .get_element_by_id(id)
        .unwrap_or_else(|| panic!("index.html has no element #{id}"))
        .dyn_into::<T>()
        .unwrap_or_else(|_| panic!("#{id} is not the expected kind of element"))
}

pub fn set_text(id: &str, text: &str) {
    by_id::<Element>(id).set_text_content(Some(text));
}

pub fn set_attr(id: &str, name: &str, value: &str) {
    by_id::<Element>(id).set_attribute(name, value).expect("setting an attribute");
}

/// Milliseconds since the page started.
pub fn now_ms() -> f64 {
    web_sys::window().and_then(|w| w.performance()).map_or(0.0, |p| p.now())
}

/// Lets the browser paint (and run other tasks) before long work continues.
pub async fn yield_to_browser() {
    let promise = js_sys::Promise::new(&mut |resolve, _| {
        web_sys::window()
            .expect("a window")
            .set_timeout_with_callback_and_timeout_and_arguments_0(&resolve, 0)
            .expect("setTimeout");
    });
    let _ = wasm_bindgen_futures::JsFuture::from(promise).await;
}

/// Draws `w x h` RGB pixels (row-major) on the canvas `id`, resizing it to `w x h`.
pub fn draw_rgb(id: &str, rgb: &[u8], w: u32, h: u32) {
    let canvas: HtmlCanvasElement = by_id(id);
    canvas.set_width(w);
    canvas.set_height(h);
    let mut rgba = Vec::with_capacity((w * h * 4) as usize);
    for p in rgb.chunks(3) {
        rgba.extend_from_slice(&[p[0], p[1], p[2], 255]);
    }
    let ctx: CanvasRenderingContext2d =
        canvas.get_context("2d").ok().flatten().and_then(|c| c.dyn_into().ok()).expect("a 2d canvas context");
    let data = ImageData::new_with_u8_clamped_array_and_sh(Clamped(&rgba), w, h).expect("ImageData of w x h");
    ctx.put_image_data(&data, 0.0, 0.0).expect("putImageData");
}

/// Calls `f` on every `event` of element `id`, for the life of the page.
pub fn listen(id: &str, event: &str, f: impl FnMut(web_sys::Event) + 'static) {
    let closure = Closure::<dyn FnMut(web_sys::Event)>::new(f);
    by_id::<Element>(id)
        .add_event_listener_with_callback(event, closure.as_ref().unchecked_ref())
        .expect("addEventListener");
    closure.forget();
}

/// Shows an error the user can act on, in the page's message line.
pub fn message(text: &str) {
    set_text("message", text);
    set_attr("message", "class", if text.is_empty() { "" } else { "error" });
}

/// The page cannot go on: say why, in the page (and the console).
pub fn fatal(text: &str) {
    web_sys::console::error_1(&text.into());
    let doc = web_sys::window().and_then(|w| w.document());
    if let Some(el) = doc.as_ref().and_then(|d| d.get_element_by_id("message")) {
        el.set_text_content(Some(text));
        let _ = el.set_attribute("class", "error");
    }
    if let Some(app) = doc.and_then(|d| d.get_element_by_id("app")) {
        let _ = app.set_attribute("data-state", "failed");
    }
}

/// A JS exception or value as text.
pub fn js_error(e: JsValue) -> String {
    e.dyn_ref::<js_sys::Error>().map_or_else(|| format!("{e:?}"), |e| String::from(e.message()))
}
