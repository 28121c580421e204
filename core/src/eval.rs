//! Held-out evaluation of a model (DESIGN §6 `ov3 eval`): reconstruction (PSNR, SSIM; the VAE alone as the
//! ceiling), retrieval recall@1/@5 both ways, zero-shot accuracy where labels exist, caption loss and a
//! few greedy captions. The trainer runs the same code periodically.

use burn::tensor::{Device, ExecutionError, Int, Tensor, TensorData};

use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::config::{InputSpace, ModelConfig};
use crate::data::decode::DecodeLimits;
use crate::data::pipeline::{Augment, load_example};
use crate::data::rng::SplitMix64;
use crate::data::skips::SkipCounts;
use crate::data::source::{DataError, Source, Spec};
use crate::data::synthetic::{SHAPES, zero_shot_prompt};
use crate::image_io::{from_chw, to_tensor};
use crate::inference::{encoder_inputs, normalize_rows, to_pixels, token_grid};
use crate::losses;
use crate::lpips::Lpips;
use crate::metrics::{NonFiniteImage, block_average_8x, psnr, ssim};
use crate::model::Ov3;
use crate::vae::Vae;

/// Center-cropped examples of a data source at one resolution.
pub struct EvalSet {
    pub name: String,
    pub resolution: u32,
    pub images: Vec<RgbImage>,
    pub captions: Vec<String>,
    /// Zero-shot classes (the embedded world's shapes); `None` for unlabelled data.
    pub labels: Vec<Option<usize>>,
    pub skips: SkipCounts,
}

impl EvalSet {
    /// The first `limit` usable items of `spec`, in order.
    pub fn load(spec: &str, resolution: u32, limit: usize) -> Result<Self, DataError> {
        let source = Source::open(&Spec::parse(spec)?)?;
        let aug = Augment::eval(resolution);
        let mut set = Self {
            name: source.name.clone(),
            resolution,
            images: vec![],
            captions: vec![],
            labels: vec![],
            skips: source.index_skips.clone(),
        };
        for index in 0..source.len() {
            if set.images.len() == limit {
                break;
            }
            match load_example(&source, index, &aug, DecodeLimits::default(), &mut SplitMix64::new(0, index as u64)) {
                Ok(e) => {
                    set.images.push(e.image);
                    set.captions.push(e.caption);
                    set.labels.push(e.label);
                }
                Err(skip) => set.skips.add(skip),
            }
        }
        if set.images.len() < 2 {
            return Err(DataError::Empty { source_name: source.name, skips: set.skips.summary() });
        }
        Ok(set)
    }

    pub fn len(&self) -> usize {
        self.images.len()
    }

    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaptionSample {
    pub reference: String,
    pub generated: String,
}

/// Everything `ov3 eval` reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub data: String,
    pub n: usize,
    pub resolution: u32,
    /// ov3 at noise 0 through the VAE decoder vs the input.
    #[serde(with = "crate::json_float")]
    pub psnr: f64,
    #[serde(with = "crate::json_float")]
    pub ssim: f64,
    /// The frozen VAE alone (encode -> decode): the ceiling of ov3's reconstruction.
    #[serde(with = "crate::json_float")]
    pub psnr_vae: f64,
    #[serde(with = "crate::json_float")]
    pub ssim_vae: f64,
    /// The naive baseline: each 8x8 block replaced by its mean (3 numbers per block, where the VAE keeps 16).
    #[serde(default, with = "crate::json_float::option")]
    pub psnr_block8: Option<f64>,
    /// The smallest per-image margin of ov3's PSNR over the 8x block average (negative: worse on some image).
    #[serde(default, with = "crate::json_float::option")]
    pub psnr_min_margin_block8: Option<f64>,
    /// LPIPS of ov3's reconstruction, when LPIPS weights were given.
    #[serde(default, with = "crate::json_float::option")]
    pub lpips: Option<f64>,
    #[serde(with = "crate::json_float")]
    pub i2t_recall_at_1: f64,
    #[serde(with = "crate::json_float")]
    pub i2t_recall_at_5: f64,
    #[serde(with = "crate::json_float")]
    pub t2i_recall_at_1: f64,
    #[serde(with = "crate::json_float")]
    pub t2i_recall_at_5: f64,
    /// Recall@1 of a random ranking: 1 / `retrieval_items`.
    #[serde(with = "crate::json_float")]
    pub chance_recall_at_1: f64,
    /// Items the retrieval figures rank: the first of each distinct caption ([`distinct_captions`]); absent
    /// in reports written before 2026-11-27, which ranked all n with tied duplicates counted as misses.
    #[serde(default)]
    pub retrieval_items: Option<usize>,
    #[serde(default, with = "crate::json_float::option")]
    pub zero_shot_accuracy: Option<f64>,
    #[serde(default, with = "crate::json_float::option")]
    pub zero_shot_chance: Option<f64>,
    /// Mean caption cross-entropy per token (nats).
    #[serde(with = "crate::json_float")]
    pub caption_loss: f64,
    pub captions: Vec<CaptionSample>,
    /// The images on which ov3 gains least over the 8x block average (at most [`WORST_SHOWN`], lowest
    /// margin first): where to look when the mean hides a failure.
    #[serde(default)]
    pub worst_block8: Vec<ImageScore>,
}

/// How many of the lowest-margin images an [`EvalReport`] lists.
pub const WORST_SHOWN: usize = 5;

/// One image's PSNRs (dB) in an evaluation, named by its caption and its position among the evaluation
/// data's usable images (skipped items do not count).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageScore {
    pub index: usize,
    pub caption: String,
    #[serde(with = "crate::json_float")]
    pub psnr: f64,
    #[serde(with = "crate::json_float")]
    pub psnr_vae: f64,
    #[serde(with = "crate::json_float")]
    pub psnr_block8: f64,
}

/// The `k` images whose PSNR is lowest relative to the block average's, lowest first (ties by index).
pub fn worst_against_block(captions: &[String], psnr: &[f64], vae: &[f64], block: &[f64], k: usize) -> Vec<ImageScore> {
    let mut order: Vec<usize> = (0..psnr.len().min(block.len())).collect();
    order.sort_by(|&a, &b| (psnr[a] - block[a]).total_cmp(&(psnr[b] - block[b])).then(a.cmp(&b)));
    order
        .into_iter()
        .take(k)
        .map(|i| ImageScore {
            index: i,
            caption: captions[i].clone(),
            psnr: psnr[i],
            psnr_vae: vae[i],
            psnr_block8: block[i],
        })
        .collect()
}

/// Per-image outputs of one evaluation pass, before they are reduced to numbers.
pub struct Outputs {
    pub reconstructions: Vec<RgbImage>,
    pub vae_only: Vec<RgbImage>,
}

/// Evaluates `model` (use a non-autodiff copy: `model.valid()`) on `set` in chunks of `batch`, returning
/// the report and the reconstructions. `captions` greedy captions are generated.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    model: &Ov3,
    cfg: &ModelConfig,
    vae: &Vae,
    lpips: Option<&Lpips>,
    set: &EvalSet,
    batch: usize,
    captions: usize,
    device: &Device,
) -> Result<(EvalReport, Outputs), NonFiniteImage> {
    let n = set.len();
    let mut out = Outputs { reconstructions: vec![], vae_only: vec![] };
    let (mut image_emb, mut psnrs, mut psnrs_vae, mut psnrs_block) = (vec![], vec![], vec![], vec![]);
    let (mut caption_nll, mut caption_count) = (0.0, 0.0);
    let mut lpips_values: Vec<f32> = vec![];
    let mut samples = vec![];
    for start in (0..n).step_by(batch.max(1)) {
        let end = (start + batch).min(n);
        let images = Tensor::cat(set.images[start..end].iter().map(|i| to_tensor(i, device)).collect(), 0);
        let space = model.input_space;
        let inputs = encoder_inputs(space, vae, images.clone());
        let z_u = model.encode(inputs.clone());
        let grid = token_grid(model, &inputs);
        // The two VAE decodes are most of an evaluation; on the CPU backend each thread runs its own
        // operations, so the VAE-only one runs on a second core. (In pixel space the model needs no VAE; the
        // VAE alone is still reported, as the reference a latent-space model is bounded by.)
        let (rec, vae_only) = std::thread::scope(|s| {
            let vae_only = s.spawn(|| {
                let latents = encoder_inputs(InputSpace::VaeLatents, vae, images.clone());
                to_pixels(InputSpace::VaeLatents, vae, latents)
            });
            let rec = to_pixels(space, vae, model.decode(z_u.clone(), grid));
            (rec, vae_only.join().expect("the VAE-only decode does not panic"))
        });
        // Before the clamp below: a NaN pixel must make the PSNR an error, not a bound.
        psnrs.extend(psnr(images.clone(), rec.clone())?);
        psnrs_vae.extend(psnr(images.clone(), vae_only.clone())?);
        psnrs_block.extend(psnr(images.clone(), block_average_8x(images.clone()))?);
        let (rec, vae_only) = (rec.clamp(-1.0, 1.0), vae_only.clamp(-1.0, 1.0));
        if let Some(l) = lpips {
            lpips_values.extend(
                l.forward(images.clone(), rec.clone())
                    .into_data()
                    .convert::<f32>()
                    .try_to_vec::<f32>()
                    .expect("f32 data"),
            );
        }
        out.reconstructions.extend(split_images(&rec));
        out.vae_only.extend(split_images(&vae_only));
        image_emb.extend(rows(model.image_embedding(z_u.clone())));

        let tokens = model.tokenizer.batch(&set.captions[start..end], cfg.context_length, device);
        let (nll, count) = caption_nll_sum(model, z_u.clone(), tokens, cfg.pad_id);
        caption_nll += nll;
        caption_count += count;
        let wanted = captions.saturating_sub(samples.len()).min(end - start);
        if wanted > 0 {
            let generated = greedy_captions(model, z_u.narrow(0, 0, wanted), cfg);
            for (reference, generated) in set.captions[start..start + wanted].iter().zip(generated) {
                samples.push(CaptionSample { reference: reference.clone(), generated });
            }
        }
    }
    let keep = distinct_captions(&set.captions);
    let texts: Vec<String> = keep.iter().map(|&i| set.captions[i].clone()).collect();
    let text_emb = text_embeddings(model, cfg, &texts, batch, device);
    let sim = similarity(&keep.iter().map(|&i| image_emb[i].clone()).collect::<Vec<_>>(), &text_emb);
    let (i2t1, i2t5) = (recall_at(&sim, 1), recall_at(&sim, 5));
    let sim_t = transpose(&sim);
    let (t2i1, t2i5) = (recall_at(&sim_t, 1), recall_at(&sim_t, 5));

    let labelled: Vec<(usize, usize)> = set.labels.iter().enumerate().filter_map(|(i, l)| l.map(|l| (i, l))).collect();
    let (zero_shot_accuracy, zero_shot_chance) = if labelled.is_empty() {
        (None, None)
    } else {
        let prompts: Vec<String> = (0..SHAPES.len()).map(zero_shot_prompt).collect();
        let class_emb = text_embeddings(model, cfg, &prompts, batch, device);
        let images: Vec<Vec<f32>> = labelled.iter().map(|&(i, _)| image_emb[i].clone()).collect();
        let labels: Vec<usize> = labelled.iter().map(|&(_, l)| l).collect();
        (Some(zero_shot_accuracy(&similarity(&images, &class_emb), &labels)), Some(1.0 / SHAPES.len() as f64))
    };
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let ssims: Vec<f64> = set.images.iter().zip(&out.reconstructions).map(|(a, b)| ssim(a, b)).collect();
    let ssims_vae: Vec<f64> = set.images.iter().zip(&out.vae_only).map(|(a, b)| ssim(a, b)).collect();
    let worst = worst_against_block(&set.captions, &psnrs, &psnrs_vae, &psnrs_block, WORST_SHOWN);
    let report = EvalReport {
        data: set.name.clone(),
        n,
        resolution: set.resolution,
        psnr: mean(&psnrs),
        ssim: mean(&ssims),
        psnr_vae: mean(&psnrs_vae),
        psnr_block8: Some(mean(&psnrs_block)),
        psnr_min_margin_block8: worst.first().map(|w| w.psnr - w.psnr_block8),
        worst_block8: worst,
        ssim_vae: mean(&ssims_vae),
        lpips: lpips.map(|_| lpips_values.iter().map(|&v| v as f64).sum::<f64>() / n as f64),
        i2t_recall_at_1: i2t1,
        i2t_recall_at_5: i2t5,
        t2i_recall_at_1: t2i1,
        t2i_recall_at_5: t2i5,
        chance_recall_at_1: 1.0 / keep.len() as f64,
        retrieval_items: Some(keep.len()),
        zero_shot_accuracy,
        zero_shot_chance,
        caption_loss: caption_nll / caption_count.max(1.0),
        captions: samples,
    };
    Ok((report, out))
}

/// Sum of caption token negative log-likelihoods and the number of counted tokens.
fn caption_nll_sum(model: &Ov3, z_u: Tensor<3>, tokens: Tensor<2, Int>, pad_id: usize) -> (f64, f64) {
    let [_, t] = tokens.dims();
    let counted =
        tokens.clone().narrow(1, 1, t - 1).not_equal_elem(pad_id as i64).int().sum().into_scalar::<i64>() as f64;
    let mean =
        losses::caption_loss(model.caption_logits(z_u, tokens.clone()), tokens, pad_id).into_scalar::<f32>() as f64;
    (mean * counted, counted)
}

/// L2-normalised text embeddings of `texts`, one row each.
pub fn text_embeddings(
    model: &Ov3,
    cfg: &ModelConfig,
    texts: &[String],
    batch: usize,
    device: &Device,
) -> Vec<Vec<f32>> {
    texts
        .chunks(batch.max(1))
        .flat_map(|chunk| rows(model.text_embedding(model.tokenizer.batch(chunk, cfg.context_length, device))))
        .collect()
}

/// Greedy decoding from the unified tokens: start from BOS, append the most likely token until EOS or the
/// context length.
pub fn greedy_captions(model: &Ov3, z_u: Tensor<3>, cfg: &ModelConfig) -> Vec<String> {
    generate_captions(model, z_u, cfg, None)
}

/// Autoregressive captions from the unified tokens. `top_k = Some((k, rng))` samples each token from the
/// `k` most likely ones (softmax over their logits); `None` is greedy.
pub fn generate_captions(
    model: &Ov3,
    z_u: Tensor<3>,
    cfg: &ModelConfig,
    top_k: Option<(usize, &mut SplitMix64)>,
) -> Vec<String> {
    futures_lite::future::block_on(generate_captions_async(model, z_u, cfg, top_k))
        .expect("reading logits back from the device")
}

/// [`generate_captions`] awaiting each step's logits, for the browser where WebGPU cannot block.
pub async fn generate_captions_async(
    model: &Ov3,
    z_u: Tensor<3>,
    cfg: &ModelConfig,
    mut top_k: Option<(usize, &mut SplitMix64)>,
) -> Result<Vec<String>, ExecutionError> {
    let [b, _, _] = z_u.dims();
    let device = z_u.device();
    let column = |ids: &[Vec<usize>]| {
        let last: Vec<i64> = ids.iter().map(|seq| *seq.last().expect("BOS") as i64).collect();
        Tensor::<2, Int>::from_data(TensorData::new(last, [b, 1]), &device)
    };
    let mut ids: Vec<Vec<usize>> = vec![vec![cfg.bos_id]; b];
    let (mut logits, mut cache) = model.text_decoder.start(z_u, column(&ids));
    for t in 1..cfg.context_length {
        let rows = logits.into_data_async().await?.convert::<f32>().try_to_vec::<f32>().expect("f32 data");
        let mut done = true;
        for (seq, row) in ids.iter_mut().zip(rows.chunks(rows.len() / b)) {
            let finished = seq.last().is_some_and(|&l| l == cfg.eos_id);
            let next = if finished {
                cfg.eos_id
            } else {
                match top_k.as_mut() {
                    None => argmax(row),
                    Some((k, rng)) => sample_top_k(row, *k, rng),
                }
            };
            seq.push(next);
            done &= next == cfg.eos_id;
        }
        if done || t + 1 == cfg.context_length {
            break;
        }
        logits = model.text_decoder.next(column(&ids), &mut cache);
    }
    Ok(ids.iter().map(|seq| mark_cut(model.tokenizer.decode(seq), seq, cfg)).collect())
}

/// A caption whose body fills the context (`BOS body EOS`) may be one that training data cut to fit (the
/// byte-level context of 80 cuts the embedded world's longest captions mid-word): end it with "…" so a
/// reader does not take "backgr" for the model's spelling.
fn mark_cut(mut text: String, seq: &[usize], cfg: &ModelConfig) -> String {
    let body = seq.iter().skip(1).take_while(|&&id| id != cfg.eos_id).count();
    if body + 2 >= cfg.context_length {
        text.push('…');
    }
    text
}

fn argmax(row: &[f32]) -> usize {
    row.iter().enumerate().fold(0, |best, (j, v)| if *v > row[best] { j } else { best })
}

fn sample_top_k(row: &[f32], k: usize, rng: &mut SplitMix64) -> usize {
    let mut order: Vec<usize> = (0..row.len()).collect();
    order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
    order.truncate(k.max(1));
    let top = row[order[0]];
    let weights: Vec<f64> = order.iter().map(|&j| ((row[j] - top) as f64).exp()).collect();
    let mut u = rng.unit() * weights.iter().sum::<f64>();
    for (j, w) in order.iter().zip(&weights) {
        if u < *w {
            return *j;
        }
        u -= w;
    }
    order[0]
}

/// Rows of a `[N, E]` tensor, L2-normalised (read back from the device).
pub fn rows(x: Tensor<2>) -> Vec<Vec<f32>> {
    let [_, e] = x.dims();
    normalize_rows(&x.into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 data"), e)
}

fn split_images(x: &Tensor<4>) -> Vec<RgbImage> {
    let [_, c, h, w] = x.dims();
    let values = x.clone().into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 data");
    values.chunks(c * h * w).map(|v| from_chw(v, h, w)).collect()
}

/// Cosine similarities `queries x keys` (rows are already normalised).
pub fn similarity(queries: &[Vec<f32>], keys: &[Vec<f32>]) -> Vec<Vec<f32>> {
    queries.iter().map(|q| keys.iter().map(|k| q.iter().zip(k).map(|(a, b)| a * b).sum()).collect()).collect()
}

fn transpose(m: &[Vec<f32>]) -> Vec<Vec<f32>> {
    let cols = m.first().map_or(0, Vec::len);
    (0..cols).map(|j| m.iter().map(|row| row[j]).collect()).collect()
}

/// The items image-text retrieval ranks: the first item of each distinct caption. A set with class captions
/// ("a photo of a pullover" for ten pullovers) or several crops of one photo under one caption has identical
/// texts, whose embeddings tie exactly: ranked as they are, no pullover could ever find "its" caption, and
/// recall would measure the duplicates, not the model. Ranking one item per caption keeps the question
/// "which of these different captions belongs to this image" well posed (chance 1 / distinct captions).
pub fn distinct_captions(captions: &[String]) -> Vec<usize> {
    let mut seen = std::collections::HashSet::new();
    (0..captions.len()).filter(|&i| seen.insert(captions[i].as_str())).collect()
}

/// Fraction of queries `i` whose match `i` is among the `k` most similar keys. Ties count against the
/// query (a key scoring equal to the match ranks above it), so a constant model scores 0, not 1.
pub fn recall_at(sim: &[Vec<f32>], k: usize) -> f64 {
    let hits = sim
        .iter()
        .enumerate()
        .filter(|(i, row)| {
            let own = row[*i];
            row.iter().enumerate().filter(|(j, s)| *j != *i && **s >= own).count() < k
        })
        .count();
    hits as f64 / sim.len().max(1) as f64
}

/// Fraction of images whose most similar class prompt is their label (ties go to the lowest class).
pub fn zero_shot_accuracy(sim: &[Vec<f32>], labels: &[usize]) -> f64 {
    let correct = sim.iter().zip(labels).filter(|(row, label)| argmax(row) == **label).count();
    correct as f64 / labels.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worst_images_are_those_with_the_lowest_margin_over_the_block_average() {
        let captions: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        // margins: +2, -3 (the best absolute PSNR of all), +2, 0
        let (psnr, vae, block) = ([20.0, 30.0, 18.0, 15.0], [25.0, 31.0, 22.0, 19.0], [18.0, 33.0, 16.0, 15.0]);
        let worst = worst_against_block(&captions, &psnr, &vae, &block, 3);
        let got: Vec<(usize, &str)> = worst.iter().map(|w| (w.index, w.caption.as_str())).collect();
        assert_eq!(got, vec![(1, "b"), (3, "d"), (0, "a")]); // the tie at +2 goes to the lower index
        assert_eq!((worst[0].psnr, worst[0].psnr_vae, worst[0].psnr_block8), (30.0, 31.0, 33.0));
        assert_eq!(worst_against_block(&captions, &psnr, &vae, &block, 9).len(), 4);
    }

    #[test]
    fn retrieval_ranks_one_item_per_distinct_caption() {
        let captions: Vec<String> =
            ["a pullover", "a red apple", "a pullover", "a cat", "a red apple"].iter().map(|s| s.to_string()).collect();
        assert_eq!(distinct_captions(&captions), vec![0, 1, 3]);
        assert!(distinct_captions(&[]).is_empty());
    }

    #[test]
    fn recall_counts_ranks_and_penalises_ties() {
        let sim = vec![vec![0.9, 0.1, 0.2], vec![0.8, 0.5, 0.1], vec![0.3, 0.3, 0.3]];
        // query 0 ranks first; query 1 second (0.8 beats it); query 2 ties with two others: third.
        assert!((recall_at(&sim, 1) - 1.0 / 3.0).abs() < 1e-12);
        assert!((recall_at(&sim, 2) - 2.0 / 3.0).abs() < 1e-12);
        assert!((recall_at(&sim, 3) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn zero_shot_picks_the_most_similar_class() {
        let sim = vec![vec![0.1, 0.7, 0.2], vec![0.5, 0.1, 0.2], vec![0.1, 0.2, 0.3]];
        assert!((zero_shot_accuracy(&sim, &[1, 0, 0]) - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn a_caption_that_fills_the_context_is_marked_cut() {
        let cfg = crate::Preset::Tiny.config();
        let caption = |len: usize| {
            let mut seq = vec![cfg.bos_id];
            seq.extend(std::iter::repeat_n(b'a' as usize, len));
            seq.resize(cfg.context_length, cfg.eos_id);
            mark_cut("a".repeat(len), &seq, &cfg)
        };
        let full = cfg.context_length - 2;
        assert_eq!(caption(full), format!("{}…", "a".repeat(full)));
        assert_eq!(caption(full + 1), format!("{}…", "a".repeat(full + 1)), "no EOS at all");
        assert_eq!(caption(full - 1), "a".repeat(full - 1));
    }
}
