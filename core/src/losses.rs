//! The paper's objectives, one named function each (DESIGN §3).

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor};

/// A differentiable perceptual distance (LPIPS). Pluggable: without weights the term is absent and
/// lambda must be 0.
pub trait Perceptual {
    /// Mean LPIPS distance between two image batches in [-1, 1], `[B, 3, H, W]` -> scalar `[1]`.
    fn distance(&self, x: Tensor<4>, y: Tensor<4>) -> Tensor<1>;
}

/// Mean absolute error over every element.
pub fn l1<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> Tensor<1> {
    (a - b).abs().mean()
}

/// The terms of eq. 4, kept separately for logging.
#[derive(Debug, Clone)]
pub struct RecTerms {
    pub pixel_l1: Option<Tensor<1>>,
    pub latent_l1: Option<Tensor<1>>,
    pub lpips: Option<Tensor<1>>,
}

/// eq. 4: `L_rec = L1(x, x_hat) + beta * L1(z, z_hat) + lambda * LPIPS(x, x_hat)`.
///
/// An absent term (no pixel path, the no-VAE ablation's latent term, no LPIPS weights) counts as 0.
pub fn reconstruction_loss(terms: &RecTerms, beta: f64, lambda: f64) -> Tensor<1> {
    weighted_sum(&[(&terms.pixel_l1, 1.0), (&terms.latent_l1, beta), (&terms.lpips, lambda)])
        .expect("L_rec needs at least one of its terms")
}

/// Symmetric CLIP loss: cross-entropy over the batch of `scale * img_i . txt_j` both ways, with
/// L2-normalised embeddings and `scale = exp(min(logit_scale, ln 100))`.
pub fn contrastive_loss(image_emb: Tensor<2>, text_emb: Tensor<2>, logit_scale: Tensor<1>) -> Tensor<1> {
    let [b, _] = image_emb.dims();
    let device = image_emb.device();
    let scale = logit_scale.clamp_max(100f64.ln()).exp();
    let logits = l2_normalize(image_emb).matmul(l2_normalize(text_emb).transpose()) * scale.unsqueeze::<2>();
    let labels = Tensor::<1, Int>::arange(0..b as i64, &device);
    let i2t = cross_entropy(logits.clone(), labels.clone(), None);
    let t2i = cross_entropy(logits.transpose(), labels, None);
    (i2t + t2i).div_scalar(2.0)
}

/// Caption loss: next-token cross-entropy. `logits` `[B, T, V]` predict `tokens[:, 1:]`; targets equal to
/// `pad_id` are ignored.
pub fn caption_loss(logits: Tensor<3>, tokens: Tensor<2, Int>, pad_id: usize) -> Tensor<1> {
    let [b, t, v] = logits.dims();
    let logits = logits.narrow(1, 0, t - 1).reshape([b * (t - 1), v]);
    let targets = tokens.narrow(1, 1, t - 1).reshape([b * (t - 1)]);
    cross_entropy(logits, targets, Some(pad_id))
}

/// How many targets [`caption_loss`] counts in `tokens` (those after the first position that are not
/// `pad_id`).
pub fn caption_targets(tokens: &Tensor<2, Int>, pad_id: usize) -> usize {
    let [_, t] = tokens.dims();
    let counted = tokens.clone().narrow(1, 1, t - 1).not_equal_elem(pad_id as i64).int().sum();
    counted.into_scalar::<i64>().max(0) as usize
}

/// eq. 5: `L_und = L_caption + alpha * L_contrastive`.
pub fn understanding_loss(caption: Tensor<1>, contrastive: Tensor<1>, alpha: f64) -> Tensor<1> {
    caption + contrastive.mul_scalar(alpha)
}

/// eq. 6: `L = w_rec * L_rec + w_und * L_und`.
pub fn total_loss(rec: Tensor<1>, und: Tensor<1>, w_rec: f64, w_und: f64) -> Tensor<1> {
    rec.mul_scalar(w_rec) + und.mul_scalar(w_und)
}

/// Mean cross-entropy of `logits` `[N, V]` against class ids `[N]`, skipping targets equal to `ignore`.
pub fn cross_entropy(logits: Tensor<2>, targets: Tensor<1, Int>, ignore: Option<usize>) -> Tensor<1> {
    let [n, _] = logits.dims();
    let picked = log_softmax(logits, 1).gather(1, targets.clone().reshape([n, 1])).reshape([n]);
    match ignore {
        None => picked.mean().neg(),
        Some(id) => {
            let keep = targets.not_equal_elem(id as i64).float();
            // At least one counted target keeps an all-padding batch from dividing by zero.
            (picked * keep.clone()).sum().neg() / keep.sum().clamp_min(1.0)
        }
    }
}

fn l2_normalize(x: Tensor<2>) -> Tensor<2> {
    let norm = x.clone().powi_scalar(2).sum_dim(1).sqrt().clamp_min(1e-12);
    x / norm
}

fn weighted_sum(terms: &[(&Option<Tensor<1>>, f64)]) -> Option<Tensor<1>> {
    terms.iter().filter_map(|(t, w)| t.as_ref().map(|t| t.clone().mul_scalar(*w))).reduce(|a, b| a + b)
}
