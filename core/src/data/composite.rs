//! Cut-outs with alpha (Tux Paint's photo stamps) pasted onto backgrounds, so that a few hundred objects
//! become many scenes: the object is trimmed to its visible pixels, scaled, placed, and blended with
//! premultiplied alpha (no dark fringes where a transparent pixel stores black).

use image::{Rgb, RgbImage, RgbaImage, imageops};

use super::rng::SplitMix64;
use crate::image_io::{FilterType, resize_region};

/// The smallest box holding every pixel with alpha > 0; `None` when the image is fully transparent.
pub fn trim_alpha(img: &RgbaImage) -> Option<RgbaImage> {
    let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
    for (x, y, p) in img.enumerate_pixels() {
        if p.0[3] > 0 {
            (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
        }
    }
    (x0 <= x1).then(|| imageops::crop_imm(img, x0, y0, x1 - x0 + 1, y1 - y0 + 1).to_image())
}

/// Pastes `cutout` onto `background` with its top-left corner at `(x, y)` (it may hang over the edges; what
/// falls outside is dropped): out = premultiplied cut-out + background * (1 - alpha).
pub fn paste(background: &mut RgbImage, cutout: &RgbaImage, x: i64, y: i64) {
    let (bw, bh) = (background.width() as i64, background.height() as i64);
    for (cx, cy, p) in cutout.enumerate_pixels() {
        let (px, py) = (x + cx as i64, y + cy as i64);
        if px < 0 || py < 0 || px >= bw || py >= bh {
            continue;
        }
        let a = p.0[3] as u32;
        let under = background.get_pixel_mut(px as u32, py as u32);
        for c in 0..3 {
            under.0[c] = ((p.0[c] as u32 * a + under.0[c] as u32 * (255 - a) + 127) / 255) as u8;
        }
    }
}

/// Resizes an RGBA image to `w` x `h` in premultiplied alpha and back, so transparent pixels' stored colour
/// does not bleed into the edge.
fn resize_premultiplied(img: &RgbaImage, w: u32, h: u32) -> RgbaImage {
    let mut pre = img.clone();
    for p in pre.pixels_mut() {
        let a = p.0[3] as u32;
        for c in 0..3 {
            p.0[c] = ((p.0[c] as u32 * a + 127) / 255) as u8;
        }
    }
    let mut out = imageops::resize(&pre, w.max(1), h.max(1), imageops::FilterType::Triangle);
    for p in out.pixels_mut() {
        let a = p.0[3] as u32;
        for c in 0..3 {
            p.0[c] = if a == 0 { 0 } else { ((p.0[c] as u32 * 255 + a / 2) / a).min(255) as u8 };
        }
    }
    out
}

/// A `res` x `res` background: a random square region (at least a third of the shorter side) of one of
/// `photos`, or, when there are none or one time in four, a plain colour or a vertical two-colour gradient.
pub fn background(photos: &[RgbImage], res: u32, g: &mut SplitMix64) -> RgbImage {
    if !photos.is_empty() && g.unit() < 0.75 {
        let photo = &photos[g.below(photos.len())];
        let (w, h) = (photo.width() as f64, photo.height() as f64);
        let side = w.min(h) * (1.0 / 3.0 + 2.0 / 3.0 * g.unit());
        let (x, y) = (g.unit() * (w - side), g.unit() * (h - side));
        return resize_region(photo, Some((x, y, side, side)), res, FilterType::Bilinear);
    }
    let mut colour = || Rgb([g.below(256) as u8, g.below(256) as u8, g.below(256) as u8]);
    let (top, bottom) = (colour(), colour());
    let plain = g.unit() < 0.5;
    RgbImage::from_fn(res, res, |_, y| {
        if plain {
            return top;
        }
        let t = y as f64 / (res - 1).max(1) as f64;
        Rgb(std::array::from_fn(|c| (top.0[c] as f64 * (1.0 - t) + bottom.0[c] as f64 * t).round() as u8))
    })
}

/// One scene: `cutout` (trimmed) scaled so its longer side is 45–90% of `res`, placed at random wholly
/// inside a background drawn by [`background`]. `None` for a fully transparent cut-out.
pub fn scene(cutout: &RgbaImage, photos: &[RgbImage], res: u32, g: &mut SplitMix64) -> Option<RgbImage> {
    let object = trim_alpha(cutout)?;
    let mut out = background(photos, res, g);
    let long = object.width().max(object.height()) as f64;
    let scale = res as f64 * (0.45 + 0.45 * g.unit()) / long;
    let (w, h) = (
        ((object.width() as f64 * scale).round() as u32).clamp(1, res),
        ((object.height() as f64 * scale).round() as u32).clamp(1, res),
    );
    let object = resize_premultiplied(&object, w, h);
    let (x, y) = (g.below((res - w + 1) as usize) as i64, g.below((res - h + 1) as usize) as i64);
    paste(&mut out, &object, x, y);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgba;

    #[test]
    fn half_transparent_red_over_blue_is_their_average_and_clear_pixels_leave_the_background() {
        let mut bg = RgbImage::from_pixel(4, 4, Rgb([0, 0, 200]));
        let mut cut = RgbaImage::from_pixel(2, 2, Rgba([255, 0, 0, 128]));
        cut.put_pixel(1, 1, Rgba([0, 255, 0, 0]));
        paste(&mut bg, &cut, 1, 1);
        // 255 * 128/255 + 0 = 128 red; blue 200 * 127/255 = 99.6
        assert_eq!(bg.get_pixel(1, 1).0, [128, 0, 100]);
        assert_eq!(bg.get_pixel(2, 2).0, [0, 0, 200], "alpha 0 leaves the background");
        assert_eq!(bg.get_pixel(0, 0).0, [0, 0, 200]);
        // Hanging over the edge is clipped, not a panic.
        paste(&mut bg, &cut, 3, -1);
        assert_eq!(bg.get_pixel(3, 0).0, [128, 0, 100]);
    }

    #[test]
    fn trimming_keeps_exactly_the_visible_box() {
        let mut img = RgbaImage::from_pixel(10, 8, Rgba([9, 9, 9, 0]));
        img.put_pixel(2, 3, Rgba([1, 2, 3, 255]));
        img.put_pixel(6, 5, Rgba([1, 2, 3, 10]));
        let t = trim_alpha(&img).expect("visible pixels");
        assert_eq!(t.dimensions(), (5, 3));
        assert_eq!(t.get_pixel(0, 0).0, [1, 2, 3, 255]);
        assert!(trim_alpha(&RgbaImage::new(3, 3)).is_none());
    }

    #[test]
    fn an_opaque_edge_keeps_its_colour_after_premultiplied_resizing() {
        // A white square on transparent *black*: straight-alpha resizing darkens the edge towards black.
        let mut img = RgbaImage::from_pixel(8, 8, Rgba([0, 0, 0, 0]));
        for y in 2..6 {
            for x in 2..6 {
                img.put_pixel(x, y, Rgba([255, 255, 255, 255]));
            }
        }
        let small = resize_premultiplied(&img, 4, 4);
        for p in small.pixels().filter(|p| p.0[3] > 0) {
            assert!(p.0[0] >= 250, "edge pixel {:?} darkened", p.0);
        }
    }
}
