//! Downloading the model file with a progress bar, kept in the browser's Cache Storage so a second visit
//! (or a reload) reads it from disk instead of the network.

use js_sys::{Reflect, Uint8Array};
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;
use web_sys::{Cache, ReadableStreamDefaultReader, Response};

use crate::dom::js_error;

const CACHE_NAME: &str = "ov3-weights-v1";

/// The bytes at `url`; with `cached`, kept in Cache Storage under the URL and read from there next time
/// (a changed model should get a new file name). `progress(done, total)` is called as chunks arrive
/// (`total` is 0 when the server does not say). Returns the bytes and whether they came from the cache.
pub async fn fetch_bytes(
    url: &str,
    cached: bool,
    mut progress: impl FnMut(u64, u64),
) -> Result<(Vec<u8>, bool), String> {
    let window = web_sys::window().ok_or("no window")?;
    // Cache Storage exists only in secure contexts (https, localhost); elsewhere we simply download.
    let cache: Option<Cache> = match window.caches() {
        Ok(storage) if cached => JsFuture::from(storage.open(CACHE_NAME)).await.ok().and_then(|c| c.dyn_into().ok()),
        _ => None,
    };
    if let Some(cache) = &cache {
        let hit = JsFuture::from(cache.match_with_str(url)).await.map_err(js_error)?;
        if let Ok(response) = hit.dyn_into::<Response>() {
            return Ok((read_body(response, &mut progress).await?, true));
        }
    }
    let response: Response = JsFuture::from(window.fetch_with_str(url))
        .await
        .map_err(|e| format!("{url}: download failed: {}", js_error(e)))?
        .dyn_into()
        .map_err(|_| format!("{url}: not an HTTP response"))?;
    if !response.ok() {
        return Err(format!("{url}: HTTP {} {}", response.status(), response.status_text()));
    }
    if let Some(cache) = &cache {
        // The copy goes to the cache while we read the original; a failed put only costs a re-download.
        if let Ok(copy) = response.clone() {
            let _ = JsFuture::from(cache.put_with_str(url, &copy)).await;
        }
    }
    Ok((read_body(response, &mut progress).await?, false))
}

async fn read_body(response: Response, progress: &mut impl FnMut(u64, u64)) -> Result<Vec<u8>, String> {
    let total: u64 = response.headers().get("content-length").ok().flatten().and_then(|v| v.parse().ok()).unwrap_or(0);
    let body = response.body().ok_or("the response has no body")?;
    let reader: ReadableStreamDefaultReader =
        body.get_reader().dyn_into().map_err(|_| "cannot read the response body as a stream")?;
    // Content-Length is the server's word: reserve at most 64 MiB from it, grow past that as bytes arrive.
    let mut bytes = Vec::with_capacity(total.min(64 << 20) as usize);
    loop {
        let chunk = JsFuture::from(reader.read()).await.map_err(js_error)?;
        let done = Reflect::get(&chunk, &"done".into()).map_err(js_error)?.as_bool().unwrap_or(true);
        if done {
            break;
        }
        let value = Reflect::get(&chunk, &"value".into()).map_err(js_error)?;
        bytes.extend(Uint8Array::new(&value).to_vec());
        progress(bytes.len() as u64, total);
    }
    Ok(bytes)
}
