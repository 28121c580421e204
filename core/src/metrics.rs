//! Image quality metrics on images in [-1, 1].

use burn::tensor::Tensor;

/// Peak signal-to-noise ratio in dB, per image, on the [0, 1] scale (images clamped to [-1, 1] first).
pub fn psnr(x: Tensor<4>, y: Tensor<4>) -> Vec<f64> {
    let [b, _, _, _] = x.dims();
    let diff = (x.clamp(-1.0, 1.0) - y.clamp(-1.0, 1.0)).div_scalar(2.0);
    let mse = diff.powi_scalar(2).reshape([b as i32, -1]).mean_dim(1);
    let mse = mse.into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 data");
    mse.into_iter().map(|m| -10.0 * (m.max(1e-12) as f64).log10()).collect()
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
