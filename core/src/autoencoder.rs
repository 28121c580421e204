//! The frozen VAE as the tokenizer sees it. Latents follow DESIGN §1: `z = posterior_mean * scaling_factor`
//! on the way in, and decoding divides by the same factor on the way out.

use burn::tensor::Tensor;

/// Latents (tokenizer convention, scaled) `[B, C, H/8, W/8]` -> images in [-1, 1] `[B, 3, H, W]`.
///
/// Implementations hold frozen weights: gradients flow through `decode` to its input and never to its
/// parameters.
pub trait LatentDecoder {
    fn decode(&self, latents: Tensor<4>) -> Tensor<4>;
}
