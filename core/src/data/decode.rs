//! Bytes -> RGB8 image, refusing decompression bombs before decoding and tiny images after.

use std::io::Cursor;

use image::{DynamicImage, ImageReader, Limits, RgbImage, RgbaImage};

use super::skips::Skip;

/// The most pixels any image ov3 reads (a training item, a CLI input, an upload to the page) may have:
/// 64 Mi pixels, 192 MiB as RGB8. Checked from the header, before decoding.
pub const MAX_PIXELS: u64 = 64 * 1024 * 1024;
/// The largest side a model or VAE command works at (`--res`, a stage's resolution): 4096 px.
pub const MAX_RESOLUTION: u32 = 4096;

/// `--res` and stage resolutions: a multiple of `multiple` (16 for the model's 2x2 patches of 8x latents, 8
/// for the VAE alone) from `multiple` to [`MAX_RESOLUTION`].
pub fn check_resolution(res: u32, multiple: u32) -> Result<(), String> {
    if res < multiple || res % multiple != 0 || res > MAX_RESOLUTION {
        return Err(format!(
            "resolution {res} is not a multiple of {multiple} between {multiple} and {MAX_RESOLUTION}"
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeLimits {
    /// Largest width x height accepted (checked from the header, before any pixel is decoded).
    pub max_pixels: u64,
    /// Smallest side accepted.
    pub min_side: u32,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self { max_pixels: MAX_PIXELS, min_side: 16 }
    }
}

/// Any format and mode the `image` crate reads (grayscale, alpha, 16-bit, palette, CMYK JPEG) -> RGB8.
/// Transparent pixels are composited onto white (what a page behind the image shows), not dropped to
/// whatever colour the file stores under alpha 0.
pub fn decode_rgb(bytes: &[u8], limits: DecodeLimits) -> Result<RgbImage, Skip> {
    let img = decode(bytes, limits)?;
    if !img.color().has_alpha() {
        return Ok(img.into_rgb8());
    }
    let rgba = img.into_rgba8();
    Ok(RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let p = rgba.get_pixel(x, y).0;
        let a = p[3] as u32;
        image::Rgb(std::array::from_fn(|c| ((p[c] as u32 * a + 255 * (255 - a) + 127) / 255) as u8))
    }))
}

/// Like [`decode_rgb`] but keeping the alpha channel (opaque formats get alpha 255): cut-outs to composite.
pub fn decode_rgba(bytes: &[u8], limits: DecodeLimits) -> Result<RgbaImage, Skip> {
    Ok(decode(bytes, limits)?.into_rgba8())
}

fn decode(bytes: &[u8], limits: DecodeLimits) -> Result<DynamicImage, Skip> {
    if bytes.is_empty() {
        return Err(Skip::CorruptImage);
    }
    let reader = || ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|_| Skip::CorruptImage);
    // Only the header is read here; our own pixel limit decides, not the crate's default allocation cap.
    let mut probe = reader()?;
    probe.no_limits();
    let (w, h) = probe.into_dimensions().map_err(classify)?;
    if w as u64 * h as u64 > limits.max_pixels {
        return Err(Skip::TooLarge);
    }
    if w.min(h) < limits.min_side {
        return Err(Skip::TooSmall);
    }
    let mut reader = reader()?;
    let mut l = Limits::default();
    l.max_image_width = Some(w);
    l.max_image_height = Some(h);
    l.max_alloc = Some(limits.max_pixels.saturating_mul(16).max(1 << 26));
    reader.limits(l);
    reader.decode().map_err(classify)
}

fn classify(e: image::ImageError) -> Skip {
    match e {
        image::ImageError::Limits(_) => Skip::TooLarge,
        _ => Skip::CorruptImage,
    }
}
