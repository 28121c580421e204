//! One image through a trained tokenizer, the way `ov3 reconstruct/encode/caption` and the browser demo
//! run it: prepared pixels -> frozen VAE encoder -> ViT encoder (the unified tokens z_u) -> optional noise
//! -> ViT decoder -> frozen VAE decoder. Nothing here reads tensors back; callers choose how (blocking
//! natively, `await` in the browser, where WebGPU cannot block).

use burn::tensor::Tensor;
use image::RgbImage;

use crate::autoencoder::LatentDecoder;
use crate::config::InputSpace;
use crate::eval::similarity;
use crate::image_io::resize_center_crop;
use crate::model::Ov3;
use crate::vae::Vae;

/// Images smaller than this on either side are refused rather than blown up.
pub const MIN_SIDE: u32 = 16;

/// Resizes the shorter side to `res` and center-crops: what the model saw in evaluation.
pub fn prepare(img: &RgbImage, res: u32) -> Result<RgbImage, String> {
    let (w, h) = img.dimensions();
    if w < MIN_SIDE || h < MIN_SIDE {
        return Err(format!("the image is {w}x{h}; at least {MIN_SIDE}x{MIN_SIDE} pixels are needed"));
    }
    if res == 0 || res % 16 != 0 {
        return Err(format!("resolution {res} is not a positive multiple of 16"));
    }
    Ok(resize_center_crop(img, res))
}

/// An image and what the encoders made of it.
#[derive(Clone)]
pub struct Tokens {
    /// `[1, 3, R, R]` in [-1, 1].
    pub image: Tensor<4>,
    /// The encoder's input: scaled VAE latents `[1, 16, R/8, R/8]` (or the pixels for a pixel-space model).
    pub inputs: Tensor<4>,
    /// z_u `[1, N, D]`.
    pub z_u: Tensor<3>,
    /// The token grid `(R/16, R/16)`.
    pub grid: (usize, usize),
}

/// VAE encoder (unless the model reads pixels) then the ViT encoder.
pub fn tokenize(model: &Ov3, vae: &Vae, image: Tensor<4>) -> Tokens {
    let inputs = encoder_inputs(model.input_space, vae, image.clone());
    let z_u = model.encode(inputs.clone());
    let grid = token_grid(model, &inputs);
    Tokens { image, inputs, z_u, grid }
}

/// The token grid `(H', W')` the ViT makes of encoder inputs, which the decoder needs to unpatchify.
pub fn token_grid(model: &Ov3, inputs: &Tensor<4>) -> (usize, usize) {
    let [_, _, h, w] = inputs.dims();
    (h / model.decoder.patch, w / model.decoder.patch)
}

/// What the ViT encoder reads: the frozen VAE's (scaled) latents, or the image itself in pixel space. The
/// one way from images to encoder inputs: training (prefetch), evaluation, inference and the benchmarks.
/// No gradient flows back through it (the VAE is frozen).
pub fn encoder_inputs(space: InputSpace, vae: &Vae, image: Tensor<4>) -> Tensor<4> {
    match space {
        InputSpace::VaeLatents => vae.encode(image).detach(),
        InputSpace::Pixels => image.detach(),
    }
}

/// Back to pixels from encoder inputs (VAE decoder, or nothing for a pixel-space model), not clamped: the
/// PSNR ([`crate::metrics::psnr`]) and the conversions to RGB8 clamp, and a NaN must reach the PSNR.
pub fn to_pixels(space: InputSpace, vae: &Vae, inputs: Tensor<4>) -> Tensor<4> {
    match space {
        InputSpace::VaeLatents => vae.decode(inputs),
        InputSpace::Pixels => inputs,
    }
}

/// eq. 3 with sigma fixed: `z_u + sigma * eps`, so a slider can move sigma over the same `eps`.
pub fn with_noise(z_u: Tensor<3>, eps: Tensor<3>, sigma: f64) -> Tensor<3> {
    if sigma == 0.0 { z_u } else { z_u + eps.mul_scalar(sigma) }
}

/// L2-normalises each row of a row-major `[rows, width]` matrix.
pub fn normalize_rows(values: &[f32], width: usize) -> Vec<Vec<f32>> {
    values
        .chunks(width)
        .map(|r| {
            let norm = r.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            r.iter().map(|v| v / norm).collect()
        })
        .collect()
}

/// `texts` ranked by cosine similarity to one image embedding: (index, similarity), best first.
pub fn rank(image: &[f32], texts: &[Vec<f32>]) -> Vec<(usize, f32)> {
    let mut scored: Vec<(usize, f32)> =
        similarity(&[image.to_vec()], texts).remove(0).into_iter().enumerate().collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1));
    scored
}

/// The first three principal components of the tokens `[N, D]` (row-major), as one RGB colour per token:
/// each component is min-max scaled over the tokens. Tokens that the encoder treats alike get alike
/// colours, so the picture shows how z_u carves up the image. Signs are fixed (the token farthest along a
/// component is positive) so the colours do not flip between runs.
pub fn pca_rgb(tokens: &[f32], n: usize, d: usize) -> Vec<[u8; 3]> {
    assert_eq!(tokens.len(), n * d, "tokens must be n x d");
    let components = principal_scores(tokens, n, d, 3);
    (0..n)
        .map(|i| {
            let mut rgb = [0u8; 3];
            for (c, scores) in components.iter().enumerate() {
                let (lo, hi) = scores.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &s| (lo.min(s), hi.max(s)));
                let t = if hi - lo > 1e-12 { (scores[i] - lo) / (hi - lo) } else { 0.5 };
                rgb[c] = (t * 255.0).round() as u8;
            }
            rgb
        })
        .collect()
}

/// Scores of the `k` leading principal components of the centred rows, in f64: power iteration with
/// deflation on the `n x n` Gram matrix (n tokens is smaller than their width in every preset). A
/// component whose variance is nil scores 0 everywhere.
pub fn principal_scores(x: &[f32], n: usize, d: usize, k: usize) -> Vec<Vec<f64>> {
    let mean: Vec<f64> = (0..d).map(|j| (0..n).map(|i| x[i * d + j] as f64).sum::<f64>() / n as f64).collect();
    let centred: Vec<Vec<f64>> = (0..n).map(|i| (0..d).map(|j| x[i * d + j] as f64 - mean[j]).collect()).collect();
    let mut gram: Vec<Vec<f64>> = (0..n)
        .map(|i| (0..n).map(|j| centred[i].iter().zip(&centred[j]).map(|(a, b)| a * b).sum()).collect())
        .collect();
    let mut out = Vec::with_capacity(k);
    for c in 0..k {
        // A fixed, generic start vector keeps the result deterministic.
        let mut v: Vec<f64> = (0..n).map(|i| 1.0 + ((i * 7 + c * 13) % 11) as f64 / 10.0).collect();
        let mut lambda = 0.0;
        for _ in 0..500 {
            let w: Vec<f64> = gram.iter().map(|row| row.iter().zip(&v).map(|(a, b)| a * b).sum()).collect();
            let norm = w.iter().map(|a| a * a).sum::<f64>().sqrt();
            if norm < 1e-30 {
                lambda = 0.0;
                break;
            }
            lambda = norm;
            v = w.into_iter().map(|a| a / norm).collect();
        }
        // Gram eigenvector u with eigenvalue lambda: the scores are u * sqrt(lambda).
        let scale = lambda.max(0.0).sqrt();
        let mut scores: Vec<f64> = v.iter().map(|u| u * scale).collect();
        let far = scores.iter().fold(0.0f64, |m, s| if s.abs() > m.abs() { *s } else { m });
        if far < 0.0 {
            scores.iter_mut().for_each(|s| *s = -*s);
        }
        for (i, row) in gram.iter_mut().enumerate() {
            for (j, g) in row.iter_mut().enumerate() {
                *g -= lambda * v[i] * v[j];
            }
        }
        out.push(scores);
    }
    out
}
