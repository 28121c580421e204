//! Images in and out: any file the `image` crate decodes becomes RGB8, then a `[1, 3, H, W]` tensor in
//! [-1, 1] (DESIGN §1); tensors go back to PNG with clamping.

use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
pub use fast_image_resize::FilterType;
use image::RgbImage;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: cannot read image: {reason}")]
    Read { path: String, reason: String },
    #[error("{path}: cannot write image: {reason}")]
    Write { path: String, reason: String },
    #[error("{path}: image is {width}x{height}; at least {min}x{min} pixels are needed")]
    TooSmall { path: String, width: u32, height: u32, min: u32 },
}

/// Decodes any supported file (grayscale, alpha, 16-bit, palette...) to RGB8, through the same decoder and
/// pixel limit as the data pipeline ([`crate::data::decode::decode_rgb`]): a decompression bomb is refused
/// from its header.
pub fn load_rgb(path: &Path) -> Result<RgbImage, ImageError> {
    use crate::data::decode::{DecodeLimits, MAX_PIXELS, decode_rgb};
    use crate::data::skips::Skip;
    let read = |reason: String| ImageError::Read { path: path.display().to_string(), reason };
    let bytes = std::fs::read(path).map_err(|e| read(e.to_string()))?;
    decode_rgb(&bytes, DecodeLimits { max_pixels: MAX_PIXELS, min_side: 1 }).map_err(|skip| match skip {
        Skip::TooLarge => read(format!("more than {MAX_PIXELS} pixels (the limit; refused before decoding)")),
        other => read(other.name().to_string()),
    })
}

/// Resizes the shorter side to `res` (Lanczos3, antialiased) and center-crops to `res` x `res`, in one pass
/// over the source region that survives the crop.
pub fn resize_center_crop(img: &RgbImage, res: u32) -> RgbImage {
    resize_region(img, None, res, FilterType::Lanczos3)
}

/// Resizes `region` (left, top, width, height; `None`: the largest centered square) of `img` to
/// `res` x `res` with an antialiasing `filter`. SIMD convolution from `fast_image_resize`.
pub fn resize_region(img: &RgbImage, region: Option<(f64, f64, f64, f64)>, res: u32, filter: FilterType) -> RgbImage {
    use fast_image_resize::images::{Image, ImageRef};
    use fast_image_resize::{PixelType, ResizeAlg, ResizeOptions, Resizer};
    let (w, h) = img.dimensions();
    let src = ImageRef::new(w, h, img.as_raw(), PixelType::U8x3).expect("an RgbImage buffer matches its size");
    let mut dst = Image::new(res, res, PixelType::U8x3);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(filter));
    let options = match region {
        Some((left, top, width, height)) => options.crop(left, top, width, height),
        None => options.fit_into_destination(Some((0.5, 0.5))),
    };
    Resizer::new().resize(&src, &mut dst, &options).expect("same pixel type, non-empty sizes");
    RgbImage::from_raw(res, res, dst.into_vec()).expect("the destination holds res x res RGB pixels")
}

/// Center-crops to the largest size whose sides are multiples of `multiple`.
pub fn crop_to_multiple(img: &RgbImage, multiple: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let (cw, ch) = (w / multiple * multiple, h / multiple * multiple);
    image::imageops::crop_imm(img, (w - cw) / 2, (h - ch) / 2, cw, ch).to_image()
}

/// RGB8 -> `[1, 3, H, W]` in [-1, 1].
pub fn to_tensor(img: &RgbImage, device: &Device) -> Tensor<4> {
    let (w, h) = img.dimensions();
    let (w, h) = (w as usize, h as usize);
    let mut data = vec![0f32; 3 * h * w];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            data[c * h * w + i] = p.0[c] as f32 / 127.5 - 1.0;
        }
    }
    Tensor::from_data(TensorData::new(data, [1, 3, h, w]), device)
}

/// `[3, H, W]` values in [-1, 1] (row-major, as `into_data` gives) -> RGB8, clamped and rounded.
pub fn from_chw(values: &[f32], h: usize, w: usize) -> RgbImage {
    RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let at = |c: usize| {
            let v = values[c * h * w + y as usize * w + x as usize];
            ((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8
        };
        image::Rgb([at(0), at(1), at(2)])
    })
}

/// The first image of a `[B, 3, H, W]` tensor -> RGB8.
pub fn tensor_to_rgb(t: &Tensor<4>) -> RgbImage {
    let [_, _, h, w] = t.dims();
    let values = t.clone().narrow(0, 0, 1).into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 data");
    from_chw(&values, h, w)
}

pub fn save_png(img: &RgbImage, path: &Path) -> Result<(), ImageError> {
    img.save(path).map_err(|e| ImageError::Write { path: path.display().to_string(), reason: e.to_string() })
}

/// Equally sized images laid out row by row with a `gap`-pixel white border: e.g. one row per example
/// of input | VAE only | ov3.
pub fn grid(rows: &[Vec<&RgbImage>], gap: u32) -> RgbImage {
    let (w, h) = rows.first().and_then(|r| r.first()).map_or((1, 1), |i| i.dimensions());
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0) as u32;
    let n = rows.len() as u32;
    let mut out = RgbImage::from_pixel(cols * (w + gap) + gap, n * (h + gap) + gap, image::Rgb([255, 255, 255]));
    for (r, row) in rows.iter().enumerate() {
        for (c, img) in row.iter().enumerate() {
            let (x, y) = (gap + c as u32 * (w + gap), gap + r as u32 * (h + gap));
            image::imageops::replace(&mut out, *img, x as i64, y as i64);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the `image` crate's own Lanczos3 (resize the shorter side, then crop): same picture within a
    /// few levels on a smooth image (the two differ only in kernel support details and rounding).
    #[test]
    fn center_crop_resize_matches_the_image_crate() {
        let img = RgbImage::from_fn(300, 200, |x, y| {
            let (fx, fy) = (x as f32 / 300.0, y as f32 / 200.0);
            image::Rgb([(255.0 * fx) as u8, (255.0 * fy) as u8, (127.0 + 100.0 * (6.0 * fx + 3.0 * fy).sin()) as u8])
        });
        let ours = resize_center_crop(&img, 64);
        let wide = image::imageops::resize(&img, 96, 64, image::imageops::FilterType::Lanczos3);
        let reference = image::imageops::crop_imm(&wide, 16, 0, 64, 64).to_image();
        let worst = ours.as_raw().iter().zip(reference.as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap_or(0);
        assert_eq!(ours.dimensions(), (64, 64));
        assert!(worst <= 4, "largest difference {worst} levels");
    }
}
