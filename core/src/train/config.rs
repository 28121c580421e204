//! The training recipe as a TOML file (DESIGN §4, §6): model, data, optimiser and a list of stages, each with
//! its own resolution, length, batch, learning rate and loss weights. Unknown keys are errors, so a typo
//! never trains silently with a default.

use serde::{Deserialize, Serialize};

use crate::config::{AttentionImpl, InputSpace, ModelConfig, Objective, Precision, Preset, TowerConfig};
use crate::model::LossWeights;
use crate::tokenizer::Tokenizer;

/// The `tokenizer` naming the word-level tokenizer over the embedded world's vocabulary.
pub const SYNTHETIC_WORDS: &str = "synthetic-words";

/// Where `--recipe demo` reads its real photographs: the folder `ov3 data prepare real --out data/real` writes.
pub const DEMO_REAL_DATA: &str = "data/real";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub preset: Preset,
    /// Noise bound of eq. 3 (DESIGN §2; not published, so a knob).
    #[serde(default = "default_tau")]
    pub tau: f64,
    #[serde(default = "default_objective")]
    pub objective: Objective,
    /// What the ViT encoder reads: `"latents"` of the frozen VAE (the paper) or `"pixels"`, the no-VAE
    /// ablation (16x16 pixel patches, the decoder predicts pixels; DESIGN §2).
    #[serde(default = "default_input_space", with = "input_space_key")]
    pub input_space: InputSpace,
    /// The ViT decoder's `width`, `depth` and `heads` when not the preset's: the decoder-size ablation
    /// (the paper's Fig. 6, `ov3 ablate decoder`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoder: Option<TowerConfig>,
    pub seed: u64,
    /// Training data (DESIGN §6 data spec); `synthetic:N` is the embedded world.
    pub data: String,
    /// Held-out evaluation data.
    pub eval_data: String,
    /// Images of `eval_data` used by the periodic evaluation (all of them at the end of the run).
    #[serde(default = "default_eval_size")]
    pub eval_size: usize,
    /// The frozen VAE: a FLUX.1 / TAEF1 file or folder; absent = the embedded autoencoder.
    #[serde(default)]
    pub vae: Option<String>,
    /// Fine-tuning: start from this model file's weights (`ov3 export`, a checkpoint's `model.safetensors`,
    /// the demo checkpoint) instead of a seeded initialisation, with a fresh optimiser. Its architecture,
    /// tokenizer and VAE must be the config's (see `init_other_vae`). A resume ignores it (the checkpoint's
    /// weights continue).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<String>,
    /// With `init`: the model file was trained with another VAE than the config's, and the run moves it onto
    /// this one's latents. Worth it only when the two autoencoders' latents are related (one continued from
    /// the other: the demo checkpoint moved to a retrained embedded autoencoder this way); a model's latents
    /// mean nothing to an unrelated one. The run notes both VAEs; without this a mismatch is refused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub init_other_vae: bool,
    /// With `init`: the config's ViT decoder (`decoder`) may be deeper than the file's, at the same width and
    /// heads. The file's blocks are kept and the added ones start as the identity, so the run starts from
    /// exactly the file's reconstructions with more decoder capacity to train. The run notes both depths.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub init_grow_decoder: bool,
    /// LPIPS weights (safetensors): a torchvision VGG16/AlexNet trunk and the lpips linear heads. Both or
    /// neither; without them the LPIPS term is absent whatever lambda says.
    #[serde(default)]
    pub lpips_trunk: Option<String>,
    #[serde(default)]
    pub lpips_heads: Option<String>,
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    #[serde(default = "default_clip")]
    pub grad_clip: f64,
    /// Decoder threads of the data pipeline.
    #[serde(default = "default_workers")]
    pub workers: usize,
    #[serde(default = "default_log_every")]
    pub log_every: u64,
    /// Held-out evaluation and a reconstruction grid every this many steps (0 = only at the end).
    #[serde(default = "default_eval_every")]
    pub eval_every: u64,
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// Checkpoints kept on disk (the newest ones).
    #[serde(default = "default_keep")]
    pub keep_checkpoints: usize,
    /// The caption tokenizer: `synthetic-words` (the embedded world's words, one token each), or a
    /// HuggingFace `tokenizer.json` path; absent = the built-in byte-level tokenizer.
    #[serde(default)]
    pub tokenizer: Option<String>,
    /// Caption length in tokens, BOS and EOS included (longer captions are cut, EOS kept); absent = the
    /// preset's (80).
    #[serde(default)]
    pub context_length: Option<usize>,
    /// `Reference` (default) or `Fused`: our WGSL attention kernels on wgpu (see shaders/README.md).
    #[serde(default = "default_attention")]
    pub attention: AttentionImpl,
    /// `"f32"` (default), `"f16"` or `"bf16"`: what the transformer blocks compute in (mixed precision, master
    /// weights and optimiser state in f32; `config::Precision`). f16 runs with dynamic loss scaling.
    #[serde(default = "default_precision", with = "precision_key")]
    pub precision: Precision,
    pub stages: Vec<StageConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    pub name: String,
    /// Image side in pixels (a multiple of 16).
    pub resolution: u32,
    /// Optimiser steps in this stage.
    pub steps: u64,
    /// Images per micro-batch.
    pub batch: usize,
    /// Micro-batches per optimiser step. The contrastive logits span one micro-batch, not the effective batch.
    #[serde(default = "one")]
    pub accumulate: usize,
    /// Peak learning rate for an effective batch of 256; the stage uses `lr * batch * accumulate / 256`.
    pub lr: f64,
    pub warmup: u64,
    /// The cosine decays to `lr * min_lr_ratio` at the end of the stage.
    #[serde(default = "default_min_lr_ratio")]
    pub min_lr_ratio: f64,
    /// Learning-rate multiplier for the two generative decoders (`decoder`, `text_decoder`). The
    /// contrastive towers collapse above ~5e-4 at batch 32, while the decoders, which no contrastive
    /// gradient reaches, learn faster at a higher rate (docs/DECISIONS.md).
    #[serde(default = "one_f")]
    pub lr_decoders: f64,
    #[serde(default = "default_w_rec")]
    pub w_rec: f64,
    #[serde(default = "one_f")]
    pub w_und: f64,
    #[serde(default = "default_beta")]
    pub beta: f64,
    #[serde(default = "one_f")]
    pub alpha: f64,
    /// LPIPS weight; needs LPIPS weights (without them it must be 0).
    #[serde(default)]
    pub lambda: f64,
    /// The pixel L1 of eq. 4 back-propagates through the frozen VAE decoder, the most expensive part of a
    /// step on a CPU; off, L_rec keeps its latent term only.
    #[serde(default = "yes")]
    pub pixel_loss: bool,
    /// Random-resized-crop (else center crop) for stored images; the embedded world renders at resolution.
    #[serde(default = "yes")]
    pub random_crop: bool,
    #[serde(default)]
    pub hflip: bool,
}

impl StageConfig {
    pub fn effective_batch(&self) -> usize {
        self.batch * self.accumulate
    }

    /// Peak learning rate after the batch/256 scaling of DESIGN §4.
    pub fn peak_lr(&self) -> f64 {
        self.lr * self.effective_batch() as f64 / 256.0
    }

    pub fn loss_weights(&self, objective: Objective) -> LossWeights {
        LossWeights {
            objective,
            w_rec: self.w_rec,
            w_und: self.w_und,
            beta: self.beta,
            alpha: self.alpha,
            lambda: self.lambda,
        }
    }
}

/// Top-level keys a resumed run may change (see [`TrainConfig::resume_changes`]).
pub const RESUMABLE_KEYS: [&str; 14] = [
    "attention",
    "init",
    "init_other_vae",
    "init_grow_decoder",
    "precision",
    "grad_clip",
    "weight_decay",
    "workers",
    "log_every",
    "eval_every",
    "eval_size",
    "eval_data",
    "checkpoint_every",
    "keep_checkpoints",
];
/// Stage keys a resumed run may change: the learning-rate schedule.
pub const RESUMABLE_STAGE_KEYS: [&str; 4] = ["lr", "warmup", "min_lr_ratio", "lr_decoders"];

impl TrainConfig {
    /// The README's main job: the tiny preset on the embedded world, sized to finish in about 8 minutes on
    /// a 2-core CPU. Two stages at 10:1 like the paper's recipe, at 64 then 128 px (a quarter of the paper's
    /// pixels, which the CPU can afford), with the latent term of L_rec only (`pixel_loss = false`). Batch 16
    /// for twice the steps of batch 32 over the same images (+0.95 dB PSNR, higher recall), captions as words
    /// (a quarter of the byte-level tokens: the step is 1.7x faster); docs/DECISIONS.md, docs/PERFORMANCE.md.
    pub fn quick() -> Self {
        let mut cfg = Self::embedded_recipe(640, 64);
        cfg.tokenizer = Some(SYNTHETIC_WORDS.into());
        cfg.context_length = Some(24);
        cfg.eval_every = 320;
        cfg
    }

    /// The recipe of the shipped demo checkpoint: the quick recipe over 4.5x its low-res steps and 9x its
    /// high-res ones (2880 + 576), then three more stages at 128 px (1728 each), with byte-level captions, so
    /// that the browser demo can rank whatever the user types, on real photographs and the embedded world in
    /// about equal shares (`ov3 data prepare real --out data/real` first: it needs the packages the README
    /// names); about 3.5 hours on 2 cores. Twice the steps of the first demo recipe (1440 + 144) gave +1.6 dB
    /// on real held-out photographs, the third stage another +1.1 dB, the fourth +1.0, the fifth +0.7
    /// (assets/demo/README.md).
    pub fn demo() -> Self {
        let mut cfg = Self::embedded_recipe(2880, 576);
        cfg.data = format!("{DEMO_REAL_DATA}/train+synthetic:4000");
        cfg.eval_data = format!("{DEMO_REAL_DATA}/heldout");
        cfg.eval_every = 960;
        // A third stage at the demo's resolution, 3x the second's steps at twice its rate (half the full one):
        // the 128 px reconstruction was still improving when the second stage's schedule ended.
        // A fourth and a fifth, the same again (each its own warmup and cosine): each left it still improving.
        let mut refine = cfg.stages[1].clone();
        (refine.name, refine.steps, refine.warmup, refine.lr) = ("refine".into(), 1728, 172, 2.0 * refine.lr);
        let refine_2 = StageConfig { name: "refine-2".into(), ..refine.clone() };
        let refine_3 = StageConfig { name: "refine-3".into(), ..refine.clone() };
        cfg.stages.extend([refine, refine_2, refine_3]);
        cfg
    }

    fn embedded_recipe(low_res_steps: u64, high_res_steps: u64) -> Self {
        let batch = 16;
        let stage = |name: &str, resolution, steps: u64| StageConfig {
            name: name.into(),
            resolution,
            steps,
            batch,
            accumulate: 1,
            // A peak of 5e-4 after the batch/256 scaling, whatever the batch. At 2e-3 (batch 32) both
            // contrastive embeddings collapse within the warm-up (mean pairwise cosine 0.9999 by step 10,
            // loss stuck at ln 32 for 100+ steps); at 5e-4 they stay apart and the loss falls from the
            // start (docs/DECISIONS.md).
            lr: 5e-4 * 256.0 / batch as f64,
            warmup: steps / 10,
            min_lr_ratio: 0.1,
            // A sweep of the quick recipe (docs/DECISIONS.md): the decoders at 4x the rate learn captioning
            // 3x faster, and at this length the reconstruction is what lags: w_rec 2 (rather than the
            // paper's 0.5) gave +1.5 dB PSNR, w_rec 4 another +0.6 dB for a small cost in recall.
            lr_decoders: 4.0,
            w_rec: 4.0,
            w_und: 1.0,
            beta: default_beta(),
            alpha: 1.0,
            lambda: 0.0,
            pixel_loss: false,
            random_crop: true,
            hflip: false,
        };
        let mut high_res = stage("high-res", 128, high_res_steps);
        // A short 128 px stage is too short to warm up to the full rate again: at a quarter of it the quick
        // recipe ends with +0.9 dB PSNR and higher recall than at the full rate (docs/DECISIONS.md).
        high_res.lr /= 4.0;
        Self {
            preset: Preset::Tiny,
            tau: default_tau(),
            objective: Objective::Full,
            input_space: InputSpace::VaeLatents,
            decoder: None,
            seed: 0,
            data: "synthetic:50000".into(),
            eval_data: "synthetic:256:0:heldout".into(),
            eval_size: 128,
            vae: None,
            init: None,
            init_other_vae: false,
            init_grow_decoder: false,
            lpips_trunk: None,
            lpips_heads: None,
            weight_decay: default_weight_decay(),
            grad_clip: default_clip(),
            workers: default_workers(),
            log_every: default_log_every(),
            eval_every: 120,
            checkpoint_every: default_checkpoint_every(),
            keep_checkpoints: default_keep(),
            tokenizer: None,
            context_length: None,
            attention: default_attention(),
            precision: default_precision(),
            stages: vec![stage("low-res", 64, low_res_steps), high_res],
        }
    }

    /// The paper's recipe (Table 1 of OpenVision 3) for a preset, at a batch one machine can hold. The paper
    /// trains 128 px at global batch 8192 with base LR 8e-6 for 4000 epochs (40 of warm-up, lambda 0), then
    /// 256 px at batch 4096 with base LR 4e-7 for 400 epochs (20 of warm-up, lambda 0.5). "Base" LRs are per
    /// 256 images, as ours are (peak = lr * batch / 256: the linear scaling rule), so they carry over
    /// unchanged to any batch; here stage 1 uses batch 256 and stage 2 half of it, as the paper halves it.
    /// Steps keep the paper's 10:1 epoch ratio (stage 2 sees a tenth of the images at half the batch: a fifth
    /// of the steps) and warm-ups keep their share (1% and 5% of each stage). The pixel L1 through the frozen
    /// VAE decoder is on in both stages, the paper's loss weights and one learning rate for the whole model.
    pub fn paper(preset: Preset) -> Self {
        let mut cfg = Self::quick();
        cfg.preset = preset;
        cfg.data = "synthetic:1000000".into();
        cfg.eval_size = 256;
        cfg.eval_every = 2000;
        cfg.checkpoint_every = 1000;
        let stages = [(128, 100_000, 256, 8e-6, 100, 0.0), (256, 20_000, 128, 4e-7, 20, 0.5)];
        for (stage, (res, steps, batch, lr, warmup_div, lambda)) in cfg.stages.iter_mut().zip(stages) {
            stage.resolution = res;
            stage.steps = steps;
            stage.batch = batch;
            stage.lr = lr;
            stage.warmup = steps / warmup_div;
            stage.lambda = lambda;
            stage.pixel_loss = true;
            stage.w_rec = default_w_rec();
            stage.lr_decoders = 1.0;
        }
        cfg
    }

    pub fn from_toml(text: &str) -> Result<Self, String> {
        let cfg: Self = toml::from_str(text).map_err(|e| e.to_string())?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a train config always serialises")
    }

    /// The caption tokenizer this config names.
    pub fn tokenizer(&self) -> Result<Tokenizer, String> {
        match &self.tokenizer {
            None => Ok(Tokenizer::Bytes),
            Some(name) if name == SYNTHETIC_WORDS => Tokenizer::words(&crate::data::synthetic::vocabulary()),
            Some(path) => Tokenizer::from_file(std::path::Path::new(path)),
        }
    }

    /// The preset's model with this config's tau, context length and `tokenizer`'s vocabulary.
    pub fn model_config(&self, tokenizer: &Tokenizer) -> ModelConfig {
        let mut m = self.preset.config();
        m.tau = self.tau;
        m.input_space = self.input_space;
        if let Some(d) = &self.decoder {
            m.decoder = d.clone();
        }
        if let Some(n) = self.context_length {
            m.context_length = n;
        }
        tokenizer.configure(&mut m);
        m
    }

    /// What a resumed run changes relative to the config it was started with, one line per key
    /// (`stages[1].lr: 0.0005 -> 0.00025`). Only keys that leave the data stream, the model and the meaning
    /// of the saved position alone may change ([`RESUMABLE_KEYS`], [`RESUMABLE_STAGE_KEYS`]: the learning
    /// rate after a NaN stop, how often to evaluate or checkpoint...), and stages may be appended (a
    /// finished run trained further, as a run with all the stages from the start would have been); any
    /// other difference is refused, naming the key.
    pub fn resume_changes(&self, saved: &TrainConfig) -> Result<Vec<String>, String> {
        let table = |c: &TrainConfig| match toml::Value::try_from(c) {
            Ok(toml::Value::Table(t)) => Ok(t),
            _ => Err("the config does not serialise".to_string()),
        };
        let (new, old) = (table(self)?, table(saved)?);
        let mut changes = vec![];
        let mut compare = |key: String, a: Option<&toml::Value>, b: Option<&toml::Value>, allowed: bool| {
            if a == b {
                return Ok(());
            }
            let show = |v: Option<&toml::Value>| v.map_or("(unset)".to_string(), |v| v.to_string());
            if !allowed {
                return Err(format!("`{key}` differs ({} -> {})", show(b), show(a)));
            }
            changes.push(format!("{key}: {} -> {}", show(b), show(a)));
            Ok(())
        };
        for key in new.keys().chain(old.keys()).filter(|k| *k != "stages").collect::<std::collections::BTreeSet<_>>() {
            compare(key.clone(), new.get(key), old.get(key), RESUMABLE_KEYS.contains(&key.as_str()))?;
        }
        // Stages may be appended (a finished run trained further): each stage has its own schedule, data
        // stream and seed, so the stages already run mean what they meant. Removing one would not.
        if self.stages.len() < saved.stages.len() {
            return Err(format!(
                "the number of stages differs ({} -> {}); stages may be added at the end, not removed",
                saved.stages.len(),
                self.stages.len()
            ));
        }
        let stages = |t: &toml::Table| t.get("stages").and_then(|s| s.as_array()).cloned().unwrap_or_default();
        for (i, (a, b)) in stages(&new).iter().zip(stages(&old).iter()).enumerate() {
            let (Some(a), Some(b)) = (a.as_table(), b.as_table()) else { continue };
            for key in a.keys().chain(b.keys()).collect::<std::collections::BTreeSet<_>>() {
                let allowed = RESUMABLE_STAGE_KEYS.contains(&key.as_str());
                compare(format!("stages[{i}].{key}"), a.get(key), b.get(key), allowed)?;
            }
        }
        for (i, s) in self.stages.iter().enumerate().skip(saved.stages.len()) {
            changes.push(format!("stages[{i}]: added (`{}`, {} px, {} steps)", s.name, s.resolution, s.steps));
        }
        Ok(changes)
    }

    /// Multiplies every stage's peak learning rate by `scale` (`ov3 train --lr-scale`).
    pub fn scale_lr(&mut self, scale: f64) {
        for s in &mut self.stages {
            s.lr *= scale;
        }
    }

    pub fn total_steps(&self) -> u64 {
        self.stages.iter().map(|s| s.steps).sum()
    }

    /// The stage holding global step `step` and the step within it (the last stage past the end).
    pub fn stage_at(&self, step: u64) -> (usize, u64) {
        let mut start = 0;
        for (i, s) in self.stages.iter().enumerate() {
            if step < start + s.steps {
                return (i, step - start);
            }
            start += s.steps;
        }
        let last = self.stages.len() - 1;
        (last, self.stages[last].steps)
    }

    /// Every check that can fail before a run starts, each with the field named.
    pub fn validate(&self) -> Result<(), String> {
        self.model_config(&self.tokenizer()?).validate()?;
        if self.init_other_vae && self.init.is_none() {
            return Err("init_other_vae moves an init model onto this config's VAE: it needs init".into());
        }
        if self.init_grow_decoder && self.init.is_none() {
            return Err("init_grow_decoder deepens an init model's decoder: it needs init".into());
        }
        if self.lpips_trunk.is_some() != self.lpips_heads.is_some() {
            return Err("lpips_trunk and lpips_heads go together: give both or neither".into());
        }
        if self.stages.is_empty() {
            return Err("at least one [[stages]] entry is needed".into());
        }
        if self.keep_checkpoints == 0 || self.workers == 0 || self.log_every == 0 || self.checkpoint_every == 0 {
            return Err("keep_checkpoints, workers, log_every and checkpoint_every must be positive".into());
        }
        if !(self.grad_clip > 0.0) || !(self.weight_decay >= 0.0) || self.eval_size < 2 {
            return Err("grad_clip > 0, weight_decay >= 0 and eval_size >= 2 are required".into());
        }
        for s in &self.stages {
            let name = &s.name;
            if let Err(e) = crate::data::decode::check_resolution(s.resolution, 16) {
                return Err(format!("stage `{name}`: {e}"));
            }
            if s.steps == 0 || s.batch < 2 || s.accumulate == 0 {
                return Err(format!(
                    "stage `{name}`: steps > 0, batch >= 2 (contrastive negatives) and accumulate > 0"
                ));
            }
            let positive = |x: f64| x > 0.0 && x.is_finite();
            if !positive(s.lr)
                || !positive(s.lr_decoders)
                || !(0.0..=1.0).contains(&s.min_lr_ratio)
                || s.warmup > s.steps
            {
                return Err(format!(
                    "stage `{name}`: lr > 0, lr_decoders > 0, min_lr_ratio in [0, 1] and warmup <= steps are required"
                ));
            }
            if [s.w_rec, s.w_und, s.beta, s.alpha, s.lambda].iter().any(|w| !(w.is_finite() && *w >= 0.0)) {
                return Err(format!("stage `{name}`: loss weights must be finite and >= 0"));
            }
        }
        Ok(())
    }
}

fn default_tau() -> f64 {
    0.5
}
fn default_objective() -> Objective {
    Objective::Full
}
fn default_eval_size() -> usize {
    256
}
fn default_attention() -> AttentionImpl {
    AttentionImpl::Reference
}
fn default_weight_decay() -> f64 {
    0.2
}
fn default_clip() -> f64 {
    1.0
}
fn default_workers() -> usize {
    2
}
fn default_input_space() -> InputSpace {
    InputSpace::VaeLatents
}
fn default_precision() -> Precision {
    Precision::F32
}

/// `precision` in a recipe: `"f32"`, `"f16"` or `"bf16"`.
mod precision_key {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::config::Precision;

    pub fn serialize<S: Serializer>(p: &Precision, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(p.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Precision, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// `input_space` in a recipe: `"latents"` or `"pixels"`.
mod input_space_key {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::config::InputSpace;

    pub fn serialize<S: Serializer>(space: &InputSpace, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match space {
            InputSpace::VaeLatents => "latents",
            InputSpace::Pixels => "pixels",
        })
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<InputSpace, D::Error> {
        match String::deserialize(d)?.as_str() {
            "latents" => Ok(InputSpace::VaeLatents),
            "pixels" => Ok(InputSpace::Pixels),
            other => {
                Err(serde::de::Error::custom(format!("input_space `{other}`: expected \"latents\" or \"pixels\"")))
            }
        }
    }
}

fn default_log_every() -> u64 {
    10
}
fn default_eval_every() -> u64 {
    250
}
fn default_checkpoint_every() -> u64 {
    100
}
fn default_keep() -> usize {
    3
}
fn one() -> usize {
    1
}
fn one_f() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}
fn default_min_lr_ratio() -> f64 {
    0.1
}
fn default_w_rec() -> f64 {
    0.5
}
fn default_beta() -> f64 {
    0.4
}
