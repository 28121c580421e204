//! Image quality metrics on images in [-1, 1].

use burn::tensor::Tensor;

/// An image with a NaN or infinite pixel has no PSNR: reporting one (the 120 dB that a NaN error used to
/// become) would be a wrong number, so it is an error.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[error("the reconstruction has non-finite pixels (mean squared error {0}): no PSNR")]
pub struct NonFiniteImage(pub f64);

/// Peak signal-to-noise ratio in dB, per image, on the [0, 1] scale (images clamped to [-1, 1] first).
/// Pass the images as they come out of a decoder, before any clamp: a NaN pixel must reach [`mse_01`].
pub fn psnr(x: Tensor<4>, y: Tensor<4>) -> Result<Vec<f64>, NonFiniteImage> {
    let mse = mse_01(x, y).into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 data");
    mse.into_iter().map(|m| psnr_db(m as f64)).collect()
}

/// Per-image mean squared error `[B]` on the [0, 1] scale, left on the device (the browser awaits it).
/// The comparison clamps both images to [-1, 1], but an image holding a NaN or an infinity gets a NaN error
/// (a clamp may turn NaN into a bound, depending on the backend; `0 * sum` keeps it NaN).
pub fn mse_01(x: Tensor<4>, y: Tensor<4>) -> Tensor<1> {
    let [b, _, _, _] = x.dims();
    let poison = |t: &Tensor<4>| t.clone().reshape([b as i32, -1]).sum_dim(1).reshape([b]).mul_scalar(0.0);
    let non_finite = poison(&x) + poison(&y);
    let diff = (x.clamp(-1.0, 1.0) - y.clamp(-1.0, 1.0)).div_scalar(2.0);
    diff.powi_scalar(2).reshape([b as i32, -1]).mean_dim(1).reshape([b]) + non_finite
}

/// PSNR in dB of a mean squared error on the [0, 1] scale (floored at 1e-12: identical images give
/// 120 dB). A NaN, infinite or negative error is refused, never turned into a number.
pub fn psnr_db(mse: f64) -> Result<f64, NonFiniteImage> {
    if !mse.is_finite() || mse < 0.0 {
        return Err(NonFiniteImage(mse));
    }
    Ok(-10.0 * mse.max(1e-12).log10())
}

/// The naive baseline an 8x autoencoder must beat: average each 8x8 block, then repeat it (3 numbers per
/// block, against the autoencoder's 16 latent channels).
pub fn block_average_8x(x: Tensor<4>) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    let means = x.reshape([b, c, h / 8, 8, w / 8, 8]).mean_dim(5).mean_dim(3);
    means.expand([b, c, h / 8, 8, w / 8, 8]).reshape([b, c, h, w])
}

/// The weakest baseline: every pixel replaced by the image's mean colour.
pub fn mean_colour(x: Tensor<4>) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    x.mean_dim(3).mean_dim(2).expand([b, c, h, w])
}

/// SSIM of two RGB8 images as Wang et al. (2004) define it and scikit-image computes it with
/// `gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=-1`:
/// 11x11 Gaussian windows (truncate 3.5), reflected borders, the mean taken away from a 5-pixel border,
/// averaged over channels. Computed in f64 on the host.
pub fn ssim(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions(), "SSIM needs two images of the same size");
    let (w, h) = (a.width() as usize, a.height() as usize);
    let (c1, c2) = ((0.01f64 * 255.0).powi(2), (0.03f64 * 255.0).powi(2));
    let kernel = gaussian_kernel(1.5, 5);
    let pad = 5;
    let mut total = 0.0;
    for c in 0..3 {
        let x: Vec<f64> = a.pixels().map(|p| p.0[c] as f64).collect();
        let y: Vec<f64> = b.pixels().map(|p| p.0[c] as f64).collect();
        let product = |u: &[f64], v: &[f64]| u.iter().zip(v).map(|(p, q)| p * q).collect::<Vec<f64>>();
        let blur = |v: &[f64]| gaussian_blur(v, w, h, &kernel);
        let (ux, uy) = (blur(&x), blur(&y));
        let (uxx, uyy, uxy) = (blur(&product(&x, &x)), blur(&product(&y, &y)), blur(&product(&x, &y)));
        let mut sum = 0.0;
        let mut count = 0usize;
        for row in pad..h.saturating_sub(pad) {
            for col in pad..w.saturating_sub(pad) {
                let i = row * w + col;
                let (vx, vy, vxy) = (uxx[i] - ux[i] * ux[i], uyy[i] - uy[i] * uy[i], uxy[i] - ux[i] * uy[i]);
                let num = (2.0 * ux[i] * uy[i] + c1) * (2.0 * vxy + c2);
                let den = (ux[i] * ux[i] + uy[i] * uy[i] + c1) * (vx + vy + c2);
                sum += num / den;
                count += 1;
            }
        }
        total += sum / count.max(1) as f64;
    }
    total / 3.0
}

/// Normalised 1-D Gaussian taps for `-radius..=radius` (scipy's `gaussian_filter` kernel).
fn gaussian_kernel(sigma: f64, radius: usize) -> Vec<f64> {
    let taps: Vec<f64> =
        (0..=2 * radius).map(|i| (-0.5 * ((i as f64 - radius as f64) / sigma).powi(2)).exp()).collect();
    let sum: f64 = taps.iter().sum();
    taps.into_iter().map(|t| t / sum).collect()
}

/// Separable blur with scipy's `reflect` border (d c b a | a b c d).
fn gaussian_blur(v: &[f64], w: usize, h: usize, kernel: &[f64]) -> Vec<f64> {
    let r = kernel.len() / 2;
    let reflect = |i: isize, n: usize| -> usize {
        let n = n as isize;
        let period = 2 * n;
        let m = i.rem_euclid(period);
        (if m < n { m } else { period - 1 - m }) as usize
    };
    let mut rows = vec![0.0; v.len()];
    for y in 0..h {
        for x in 0..w {
            rows[y * w + x] = kernel
                .iter()
                .enumerate()
                .map(|(k, t)| t * v[y * w + reflect(x as isize + k as isize - r as isize, w)])
                .sum();
        }
    }
    let mut out = vec![0.0; v.len()];
    for y in 0..h {
        for x in 0..w {
            out[y * w + x] = kernel
                .iter()
                .enumerate()
                .map(|(k, t)| t * rows[reflect(y as isize + k as isize - r as isize, h) * w + x])
                .sum();
        }
    }
    out
}
