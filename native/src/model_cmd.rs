//! Commands on a trained model (DESIGN §6): `ov3 eval`, `ov3 reconstruct`, `ov3 encode`, `ov3 caption`,
//! `ov3 export`. The model comes from a run folder (its latest checkpoint), a model file, or — with
//! neither — the demo checkpoint shipped in assets/.

use std::path::{Path, PathBuf};

use anyhow::Context;
use burn::tensor::{Device, Distribution, Tensor};
use clap::Args;
use ov3_core::data::decode::check_resolution;
use ov3_core::data::rng::SplitMix64;
use ov3_core::device::{self, BackendChoice};
use ov3_core::eval::{EvalSet, evaluate, generate_captions, rows, text_embeddings};
use ov3_core::image_io::{grid, load_rgb, save_png, tensor_to_rgb, to_tensor};
use ov3_core::inference::{Tokens, prepare, rank as inference_rank, to_pixels, tokenize, with_noise};
use ov3_core::lpips::Lpips;
use ov3_core::metrics::{block_average_8x, psnr};
use ov3_core::model_file::{Dtype, load_model, save_model_as};
use ov3_core::train::TrainConfig;
use ov3_core::train::checkpoint::{self, MODEL_FILE};
use ov3_core::train::run::CONFIG_FILE;
use ov3_core::vae::{Vae, VaeRecord};
use ov3_core::weights::save_f32;
use ov3_core::{ModelConfig, Ov3};

use crate::report::print_report;

/// The demo checkpoint committed in the repository (tiny preset, embedded data and autoencoder).
pub const DEMO_CHECKPOINT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../assets/demo/ov3-tiny-demo.safetensors");
/// The demo checkpoint's file name wherever it is installed.
pub const DEMO_FILE: &str = "ov3-tiny-demo.safetensors";

/// Where the default model is looked for, in order: `$OV3_DEMO_MODEL`; `<dir of the ov3 binary>/../share/ov3/`
/// (what `cargo install --root R` plus a copy to `R/share/ov3/` gives, and the usual Unix layout);
/// `$XDG_DATA_HOME/ov3/` or `~/.local/share/ov3/`; the source tree this binary was built from.
pub fn demo_places() -> Vec<PathBuf> {
    let mut places = Vec::new();
    if let Some(p) = std::env::var_os("OV3_DEMO_MODEL") {
        places.push(PathBuf::from(p));
    }
    if let Some(bin) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        places.push(bin.join("../share/ov3").join(DEMO_FILE));
    }
    let data_home = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")));
    if let Some(d) = data_home {
        places.push(d.join("ov3").join(DEMO_FILE));
    }
    places.push(PathBuf::from(DEMO_CHECKPOINT));
    places
}

/// Where the model (and its VAE) come from.
#[derive(Args, Clone)]
pub struct ModelSource {
    /// A run folder: its latest checkpoint and the VAE of its config.
    #[arg(long)]
    run: Option<PathBuf>,
    /// An ov3 model file (a checkpoint's model.safetensors or an export).
    #[arg(long, conflicts_with = "run")]
    model: Option<PathBuf>,
    /// Frozen VAE weights; default: the run's, else the embedded autoencoder.
    #[arg(long)]
    vae: Option<PathBuf>,
    #[arg(long, default_value = "auto")]
    backend: BackendChoice,
}

pub struct Loaded {
    pub model: Ov3,
    pub cfg: ModelConfig,
    pub vae: Vae,
    pub device: Device,
    pub path: PathBuf,
}

impl ModelSource {
    pub fn load(&self) -> anyhow::Result<Loaded> {
        let (path, run_vae) = match (&self.run, &self.model) {
            (Some(run), _) => {
                let (dir, skipped) = checkpoint::latest_intact(run);
                skipped.iter().for_each(|note| eprintln!("{note}"));
                let dir = dir.with_context(|| format!("{}: no intact checkpoint in this run", run.display()))?;
                let cfg_path = run.join(CONFIG_FILE);
                let text = std::fs::read_to_string(&cfg_path)
                    .with_context(|| format!("{}: cannot read", cfg_path.display()))?;
                let cfg = TrainConfig::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", cfg_path.display()))?;
                (dir.join(MODEL_FILE), cfg.vae.map(PathBuf::from))
            }
            (None, Some(model)) => (model.clone(), None),
            (None, None) => {
                let places = demo_places();
                let demo = places.iter().find(|p| p.is_file()).cloned().with_context(|| {
                    let list: Vec<String> = places.iter().map(|p| p.display().to_string()).collect();
                    format!(
                        "no --run or --model given, and the demo checkpoint ({DEMO_FILE}) is in none of: {}; \
                         copy it from the repository's assets/demo/ to one of them, set OV3_DEMO_MODEL, or train a \
                         model with `ov3 train`",
                        list.join(", ")
                    )
                })?;
                (demo, None)
            }
        };
        let selected = device::select(self.backend).map_err(anyhow::Error::msg)?;
        eprintln!("{}", selected.reason);
        let device = selected.device;
        let (model, cfg) = load_model(&path, &device)?;
        // The VAE: --vae, the run's, else the file the model names when it is still there, else the
        // embedded one; then it must be the one the model was trained with (DESIGN §8).
        let named = cfg.vae.as_ref().map(|r| PathBuf::from(&r.source)).filter(|p| p.exists());
        let vae = Vae::load_or_embedded(self.vae.as_deref().or(run_vae.as_deref()).or(named.as_deref()), &device)?;
        match &cfg.vae {
            Some(record) => record.check(&vae).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
            None if self.vae.is_none() => eprintln!("{}: {}", path.display(), VaeRecord::unnamed(&vae)),
            None => {}
        }
        eprintln!("model: {} ({} VAE)", path.display(), vae.source);
        Ok(Loaded { model, cfg, vae, device, path })
    }
}

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    source: ModelSource,
    /// Evaluation data (DESIGN §6 data spec).
    #[arg(long, default_value = "synthetic:256:0:heldout")]
    data: String,
    #[arg(long, default_value_t = 128)]
    res: u32,
    /// At most this many images.
    #[arg(long)]
    n: Option<usize>,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Greedy captions to show.
    #[arg(long, default_value_t = 4)]
    captions: usize,
    /// Where the JSON report goes; default: RUN/eval.json for --run, else eval.json.
    #[arg(long)]
    json: Option<PathBuf>,
    /// LPIPS weights (safetensors): a torchvision VGG16/AlexNet trunk and the lpips heads.
    #[arg(long, requires = "lpips_heads")]
    lpips_trunk: Option<PathBuf>,
    #[arg(long, requires = "lpips_trunk")]
    lpips_heads: Option<PathBuf>,
    /// Also write input | VAE only | ov3 for the first 8 images to this PNG.
    #[arg(long)]
    grid: Option<PathBuf>,
}

pub fn eval(args: EvalArgs) -> anyhow::Result<()> {
    check_res(args.res)?;
    let m = args.source.load()?;
    let set = EvalSet::load(&args.data, args.res, args.n.unwrap_or(usize::MAX))?;
    if set.skips.total() > 0 {
        eprintln!("skipped {}", set.skips.summary());
    }
    let lpips = match (&args.lpips_trunk, &args.lpips_heads) {
        (Some(trunk), Some(heads)) => Some(Lpips::load(trunk, heads, &m.device)?),
        _ => None,
    };
    let (report, outputs) =
        evaluate(&m.model, &m.cfg, &m.vae, lpips.as_ref(), &set, args.batch.max(2), args.captions, &m.device)?;
    print_report(&report);
    let json =
        args.json.unwrap_or_else(|| args.source.run.as_ref().map_or("eval.json".into(), |r| r.join("eval.json")));
    std::fs::write(&json, serde_json::to_vec_pretty(&report)?).with_context(|| json.display().to_string())?;
    println!("report: {}", json.display());
    if let Some(path) = args.grid {
        let rows: Vec<Vec<_>> = (0..8.min(set.len()))
            .map(|i| vec![&set.images[i], &outputs.vae_only[i], &outputs.reconstructions[i]])
            .collect();
        save_png(&grid(&rows, 2), &path)?;
        println!("grid: {}", path.display());
    }
    Ok(())
}

#[derive(Args)]
pub struct ImageArgs {
    #[command(flatten)]
    source: ModelSource,
    #[arg(long)]
    image: PathBuf,
    /// The image is resized (shorter side) and center-cropped to RES x RES (a multiple of 16).
    #[arg(long, default_value_t = 128)]
    res: u32,
}

impl ImageArgs {
    /// The model, and the prepared image `[1, 3, R, R]` with its unified tokens.
    fn tokens(&self) -> anyhow::Result<(Loaded, Tokens)> {
        check_res(self.res)?;
        let img = load_rgb(&self.image)?;
        let img = prepare(&img, self.res).map_err(|e| anyhow::anyhow!("{}: {e}", self.image.display()))?;
        let m = self.source.load()?;
        let tokens = tokenize(&m.model, &m.vae, to_tensor(&img, &m.device));
        Ok((m, tokens))
    }
}

#[derive(Args)]
pub struct ReconstructArgs {
    #[command(flatten)]
    image: ImageArgs,
    /// Noise added to the unified tokens before decoding: z_u + S * eps (eq. 3 with sigma fixed at S).
    #[arg(long, default_value_t = 0.0)]
    noise: f64,
    #[arg(long)]
    seed: Option<u64>,
    /// The reconstruction (PNG).
    #[arg(long)]
    out: PathBuf,
    /// Also write input | 8x block average | VAE only | ov3 side by side.
    #[arg(long)]
    compare: Option<PathBuf>,
}

pub fn reconstruct(args: ReconstructArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.noise >= 0.0 && args.noise.is_finite(), "--noise must be finite and >= 0");
    let (m, t) = args.image.tokens()?;
    let eps = ov3_core::device::seeded(&m.device, args.seed.unwrap_or(0), || {
        Tensor::<3>::random(t.z_u.dims(), Distribution::Normal(0.0, 1.0), &m.device)
    });
    let rec = to_pixels(m.model.input_space, &m.vae, m.model.decode(with_noise(t.z_u, eps, args.noise), t.grid));
    let vae_only = to_pixels(m.model.input_space, &m.vae, t.inputs);
    let block = block_average_8x(t.image.clone());
    let score = |x: &Tensor<4>| psnr(t.image.clone(), x.clone()).map(|db| db[0]);
    let (p, p_vae, p_block) = (score(&rec)?, score(&vae_only)?, score(&block)?);
    save_png(&tensor_to_rgb(&rec), &args.out)?;
    println!(
        "psnr {p:.2} dB (VAE only {p_vae:.2} dB; 8x block average {p_block:.2} dB) at noise {}: {}",
        args.noise,
        args.out.display()
    );
    if let Some(path) = args.compare {
        let images = [tensor_to_rgb(&t.image), tensor_to_rgb(&block), tensor_to_rgb(&vae_only), tensor_to_rgb(&rec)];
        save_png(&grid(&[images.iter().collect()], 2), &path)?;
        println!("input | 8x block average | VAE only | ov3: {}", path.display());
    }
    Ok(())
}

#[derive(Args)]
pub struct EncodeArgs {
    #[command(flatten)]
    image: ImageArgs,
    /// safetensors with `tokens` [1, N, D] (z_u), `latents` (scaled VAE latents) and `embedding` (contrastive).
    #[arg(long)]
    out: PathBuf,
}

pub fn encode(args: EncodeArgs) -> anyhow::Result<()> {
    let (m, Tokens { inputs: latents, z_u, .. }) = args.image.tokens()?;
    let embedding = m.model.image_embedding(z_u.clone());
    let host = |dims: &[usize], data: burn::tensor::TensorData| {
        (dims.to_vec(), data.convert::<f32>().try_to_vec::<f32>().expect("f32 data"))
    };
    let (t, l, e) = (
        host(&z_u.dims(), z_u.into_data()),
        host(&latents.dims(), latents.into_data()),
        host(&embedding.dims(), embedding.into_data()),
    );
    let tensors = [("tokens", t.0, t.1), ("latents", l.0, l.1), ("embedding", e.0, e.1)];
    save_f32(&args.out, &tensors)?;
    println!("{} tokens of width {}: {}", tensors[0].1[1], tensors[0].1[2], args.out.display());
    Ok(())
}

#[derive(Args)]
pub struct CaptionArgs {
    #[command(flatten)]
    image: ImageArgs,
    /// Sample from the K most likely tokens instead of greedy decoding.
    #[arg(long)]
    top_k: Option<usize>,
    /// Captions to sample with --top-k.
    #[arg(long, default_value_t = 1)]
    samples: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn caption(args: CaptionArgs) -> anyhow::Result<()> {
    let (m, Tokens { z_u, .. }) = args.image.tokens()?;
    match args.top_k {
        None => println!("{}", generate_captions(&m.model, z_u, &m.cfg, None)[0]),
        Some(k) => {
            let mut rng = SplitMix64::new(args.seed, 0);
            for _ in 0..args.samples.max(1) {
                println!("{}", generate_captions(&m.model, z_u.clone(), &m.cfg, Some((k, &mut rng)))[0]);
            }
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct RankArgs {
    #[command(flatten)]
    image: ImageArgs,
    /// A text file with one caption per line (empty lines are ignored).
    #[arg(long)]
    captions: PathBuf,
}

pub fn rank(args: RankArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.captions).with_context(|| args.captions.display().to_string())?;
    let texts: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    anyhow::ensure!(!texts.is_empty(), "{}: no captions in this file", args.captions.display());
    let (m, Tokens { z_u, .. }) = args.image.tokens()?;
    let image = rows(m.model.image_embedding(z_u)).remove(0);
    let rows = text_embeddings(&m.model, &m.cfg, &texts, 16, &m.device);
    for (i, sim) in inference_rank(&image, &rows) {
        println!("{sim:+.4}  {}", texts[i]);
    }
    Ok(())
}

#[derive(Args)]
pub struct ExportArgs {
    #[command(flatten)]
    source: ModelSource,
    /// The model file to write (f16 unless --f32).
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    f32: bool,
}

pub fn export(args: ExportArgs) -> anyhow::Result<()> {
    let m = args.source.load()?;
    let dtype = if args.f32 { Dtype::F32 } else { Dtype::F16 };
    if let Some(parent) = args.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| parent.display().to_string())?;
    }
    save_model_as(&args.out, &m.model, &m.cfg, dtype)?;
    let size = std::fs::metadata(&args.out).map(|m| m.len()).unwrap_or(0);
    println!("{} ({:.1} MB, {dtype:?}) from {}", args.out.display(), size as f64 / 1e6, m.path.display());
    Ok(())
}

fn check_res(res: u32) -> anyhow::Result<()> {
    check_resolution(res, 16).map_err(|e| anyhow::anyhow!("--res: {e}"))
}
