//! `ov3 bench ...`: timings reported with the machine and adapter, for docs/PERFORMANCE.md.

use std::time::Instant;

use burn::tensor::Tensor;
use clap::{Args, Subcommand};
use ov3_core::config::{AttentionImpl, Precision};
use ov3_core::device::BackendChoice;
use ov3_core::inference::encoder_inputs;
use ov3_core::parallel::{Group, GroupExt, Single};
use ov3_core::random_batch::random_batch;
use ov3_core::step::{LossScale, StepError, StepSpec, train_step};
use ov3_core::{Ov3, optim};

use crate::Common;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Time one training step (forward + backward + AdamW) of the whole model on a random batch.
    Step(StepArgs),
    /// Images/s of decode + resize (shorter side) + center crop for every image file in a folder.
    Data(DataArgs),
    /// One training step with latents from the frozen VAE every step vs read from a latent cache.
    Cache(CacheArgs),
    /// Fused WGSL attention vs burn's unfused path vs burn's built-in op (wgpu).
    Attention(crate::bench_attention::AttentionArgs),
}

#[derive(Args)]
pub struct CacheArgs {
    #[command(flatten)]
    common: Common,
    /// Frozen VAE weights (e.g. FLUX.1 ae.safetensors); default: the embedded autoencoder.
    #[arg(long)]
    vae: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 256)]
    res: u32,
    #[arg(long, default_value_t = 3)]
    steps: usize,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
}

#[derive(Args)]
pub struct DataArgs {
    /// Folder of image files (e.g. `ov3 datagen --format jpg --res 512`).
    #[arg(long)]
    dir: std::path::PathBuf,
    #[arg(long, default_value_t = 256)]
    res: u32,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

#[derive(Args)]
pub struct StepArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Image resolution in pixels (a multiple of 16).
    #[arg(long, default_value_t = 128)]
    res: usize,
    /// Timed steps, after the warm-up.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Untimed steps first (kernel compilation, autotuning, allocator warm-up).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Attention implementation: reference (the default) or fused (our WGSL kernels on wgpu).
    #[arg(long, default_value = "reference")]
    attention: String,
    /// Caption tokens per image (byte-level; 24 gives the quick recipe's shapes); the preset's by default.
    #[arg(long)]
    context: Option<usize>,
    /// What the transformer blocks compute in: f32, f16 (mixed precision with loss scaling) or bf16.
    #[arg(long, default_value = "f32")]
    precision: Precision,
    /// wgpu: after the timed steps, one more step with its GPU kernel launches counted (`count`), or also
    /// each timed on the device and waited for (`time`: kernels then run one at a time); prints a `kernels`
    /// JSON line with the totals and the most expensive kernels.
    #[arg(long)]
    kernels: Option<KernelsMode>,
    /// wgpu: layer norm, softmax, GELU, the attention layers' head split, AdamW and clipping as ov3's WGSL
    /// kernels (`ov3`, what training uses) or as burn's composite ops (`burn`, for comparison; fused attention
    /// then takes the reference path); `$OV3_WGPU_OPS` (`burn` or not) by default.
    #[arg(long, value_parser = ["ov3", "burn"])]
    wgpu_ops: Option<String>,
    /// On wgpu's no-op adapter (dressed as this machine's first adapter): every command is validated and
    /// recorded, none runs, so the time is the step's host cost (burn, cubecl, wgpu) alone, the floor under a step
    /// on any GPU; the values computed are meaningless.
    #[arg(long)]
    noop: bool,
}

/// What `--kernels` observes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum KernelsMode {
    Count,
    Time,
}

impl std::str::FromStr for KernelsMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "count" => Ok(Self::Count),
            "time" => Ok(Self::Time),
            other => Err(format!("expected count or time, got '{other}'")),
        }
    }
}

pub fn run(cmd: BenchCommand, group: &dyn Group) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Step(args) => step(args, group),
        BenchCommand::Data(args) => data(args),
        BenchCommand::Cache(args) => cache(args),
        BenchCommand::Attention(args) => crate::bench_attention::run(args),
    }
}

fn data(args: DataArgs) -> anyhow::Result<()> {
    use ov3_core::data::decode::{DecodeLimits, decode_rgb};
    use ov3_core::image_io::resize_center_crop;
    let mut files: Vec<_> = std::fs::read_dir(&args.dir)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e != "txt"))
        .collect();
    files.sort();
    anyhow::ensure!(!files.is_empty() && args.threads >= 1, "{}: no image files (or --threads 0)", args.dir.display());
    let bytes: Vec<Vec<u8>> = files.iter().map(std::fs::read).collect::<Result<_, _>>()?;
    let start = Instant::now();
    let threads = args.threads.min(bytes.len());
    let ok: usize = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let bytes = &bytes;
                s.spawn(move || {
                    bytes
                        .iter()
                        .skip(t)
                        .step_by(threads)
                        .filter(|b| {
                            decode_rgb(b, DecodeLimits::default()).map(|img| resize_center_crop(&img, args.res)).is_ok()
                        })
                        .count()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("bench worker")).sum()
    });
    let secs = start.elapsed().as_secs_f64();
    anyhow::ensure!(ok == bytes.len(), "{} of {} files failed to decode", bytes.len() - ok, bytes.len());
    println!(
        "{{\"bench\":\"data\",\"impl\":\"ov3\",\"threads\":{threads},\"images\":{ok},\"res\":{},\"images_per_s\":{:.1}}}",
        args.res,
        ok as f64 / secs
    );
    Ok(())
}

/// `--batch` is the global batch: under `mpirun -np N` each rank steps on `batch / N` images, gradients are
/// averaged over the group, and rank 0 prints images/s of the whole group.
fn step(args: StepArgs, group: &dyn Group) -> anyhow::Result<()> {
    let res = u32::try_from(args.res).unwrap_or(u32::MAX);
    ov3_core::data::decode::check_resolution(res, 16).map_err(|e| anyhow::anyhow!("--res: {e}"))?;
    anyhow::ensure!(args.batch >= 2 && args.steps >= 1, "--batch >= 2 and --steps >= 1 are required");
    anyhow::ensure!(
        args.batch % group.size() == 0,
        "--batch {} is the global batch and must divide among {} processes",
        args.batch,
        group.size()
    );
    let selected = match args.noop {
        true => {
            anyhow::ensure!(group.size() == 1, "--noop times one process's host cost: run it without mpirun");
            anyhow::ensure!(
                args.common.backend != BackendChoice::Cpu,
                "--noop is a wgpu adapter: not with --backend cpu"
            );
            let selected = ov3_core::device::noop().map_err(anyhow::Error::msg)?;
            eprintln!("{}", selected.reason);
            selected.device.seed(args.common.seed);
            selected
        }
        false => args.common.device_in(group)?,
    };
    if let Some(ops) = &args.wgpu_ops {
        ov3_core::wgsl::set_enabled(ops == "ov3");
    }
    // Our kernels run where they are on and the runtime compiles WGSL (not under the `vulkan` feature's SPIR-V).
    let ours = ov3_core::wgsl::runs_here(&selected.device);
    // Which of our kernels ran: all (`ov3`), only the CubeCL ones (AdamW's: a `vulkan` build's SPIR-V), or none.
    let wgpu_ops = match (ours, ov3_core::wgsl::cube_runs_here(&selected.device)) {
        (true, _) => "ov3",
        (false, true) => "cubecl",
        (false, false) => "burn",
    };
    let compiler = ov3_core::device::compiler(&selected.device).map_or("flex", |c| c.runtime);
    // cubecl's matmul autotuning effort (how many candidate kernels it times per shape); cubecl reads the
    // variable itself, `balanced` when it is unset or not one of its levels.
    let autotune = match std::env::var("CUBECL_AUTOTUNE_LEVEL").as_deref() {
        Ok("minimal" | "0") => "minimal",
        Ok("extensive" | "2") => "extensive",
        Ok("full" | "3") => "full",
        _ => "balanced",
    };
    anyhow::ensure!(
        args.kernels.is_none() || selected.kind == BackendChoice::Wgpu,
        "--kernels needs --backend wgpu (the CPU backend launches no GPU kernels)"
    );
    let device = selected.device.clone().autodiff();
    let attention = match args.attention.as_str() {
        "fused" => AttentionImpl::Fused,
        "reference" => AttentionImpl::Reference,
        other => anyhow::bail!("--attention must be fused or reference, got '{other}'"),
    };
    let mut cfg = args.common.preset.config();
    if let Some(context) = args.context {
        anyhow::ensure!(context >= 4, "--context must be at least 4 tokens");
        cfg.context_length = context;
    }
    // Every rank starts from the same weights (seeded before the batch draw) and steps on a batch of its own.
    let seed = args.common.seed;
    args.precision.check(&device).map_err(anyhow::Error::msg)?;
    let model = ov3_core::device::seeded(&device, seed, || Ov3::new(&cfg, &device))
        .with_attention(attention)
        .with_precision(args.precision);
    let share = args.batch / group.size();
    let batch = ov3_core::device::seeded(&device, seed.wrapping_add(group.rank() as u64 + 1), || {
        random_batch(&cfg, share, args.res, &device)
    });
    let mut optim = optim::adamw(&model, 0.2);

    let mut model = Some(model);
    let mut scale = LossScale::for_precision(args.precision);
    let median = median_time(args.warmup, args.steps, |_| {
        let m = model.take().expect("model between steps");
        model = Some(train_once(m, &mut optim, &batch, cfg.tau, &mut scale, group)?);
        Ok(())
    })?;
    // Every rank takes the observed step (its gradients are all-reduced like the others').
    let launches = match args.kernels {
        Some(mode) => {
            let (stepped, launches) = crate::bench_kernels::observe(mode == KernelsMode::Time, || {
                train_once(model.take().expect("model between steps"), &mut optim, &batch, cfg.tau, &mut scale, group)
            });
            drop(stepped?);
            Some(launches)
        }
        None => None,
    };
    if !group.is_writer() {
        return Ok(());
    }
    // The fused kernels' lanes per row group (`OV3_FLASH_SPLIT`), where they run.
    let split = if attention == AttentionImpl::Fused && ours { ov3_core::flash::split() } else { 1 };
    let device_mem = selected.device.memory_pool_usage().map(|u| u.bytes_reserved);
    let peak_mib = device_mem.map(|b| b as f64).unwrap_or_else(process_peak_bytes) / (1 << 20) as f64;
    let adapter = selected.adapter.as_ref().map(|a| a.to_string()).unwrap_or_else(|| "cpu (flex)".into());
    println!(
        "{{\"bench\":\"step\",\"impl\":\"ov3\",\"backend\":\"{:?}\",\"adapter\":\"{}\",\"preset\":\"{}\",\"attention\":\"{}\",\"split\":{},\"adamw_per_launch\":{},\"wgpu_ops\":\"{}\",\"compiler\":\"{}\",\"fusion\":{},\"noop\":{},\"memory\":\"{}\",\"autotune\":\"{}\",\"precision\":\"{}\",\"batch\":{},\"res\":{},\"context\":{},\
         \"ms_per_step\":{:.1},\"images_per_s\":{:.2},\"peak_mib\":{:.0},\"peak_kind\":\"{}\",\"threads\":{},\"ranks\":{}}}",
        selected.kind,
        adapter,
        args.common.preset.name(),
        args.attention,
        split,
        // Parameters AdamW steps per launch (`OV3_ADAMW_GATHER`; 1 off wgpu).
        ov3_core::optim_gpu::params_per_launch(&selected.device),
        wgpu_ops,
        compiler,
        cfg!(feature = "fusion"),
        args.noop,
        // cubecl's memory pool on wgpu (`OV3_WGPU_MEMORY`, checked at device selection).
        match ov3_core::device::memory_config() {
            Ok(Some(_)) => "exclusive",
            _ => "adaptive",
        },
        autotune,
        args.precision.name(),
        args.batch,
        args.res,
        cfg.context_length,
        median * 1e3,
        args.batch as f64 / median,
        peak_mib,
        if device_mem.is_some() { "device pool reserved" } else { "process peak RSS" },
        ov3_core::device::cpu_threads(),
        group.size(),
    );
    if let Some(launches) = launches {
        let context = serde_json::json!({
            "adapter": adapter, "preset": args.common.preset.name(), "attention": args.attention,
            "wgpu_ops": wgpu_ops, "compiler": compiler, "fusion": cfg!(feature = "fusion"), "autotune": autotune, "precision": args.precision.name(), "batch": args.batch,
            "res": args.res,
        });
        println!("{}", launches.json(12, &context, median * 1e3));
    }
    Ok(())
}

fn cache(args: CacheArgs) -> anyhow::Result<()> {
    use ov3_core::data::latent_cache::{Crops, LatentCache, build, cached_latents};
    use ov3_core::data::pipeline::{Augment, load_example};
    use ov3_core::data::rng::SplitMix64;
    use ov3_core::data::source::{Source, Spec};
    use ov3_core::image_io::to_tensor;
    use ov3_core::vae::Vae;

    anyhow::ensure!(
        args.res >= 16 && args.res % 16 == 0 && args.batch >= 2 && args.steps >= 1,
        "bad --res/--batch/--steps"
    );
    let selected = args.common.device()?;
    let device = selected.device.clone().autodiff();
    let vae = Vae::load_or_embedded(args.vae.as_deref(), &device)?;
    let cfg = args.common.preset.config();
    let n = args.batch * (args.warmup + args.steps);
    let source = Source::open(&Spec::parse(&format!("synthetic:{n}"))?)?;
    let dir = std::env::temp_dir().join(format!("ov3-bench-cache-{}", std::process::id()));
    let start = Instant::now();
    build(&source, &vae, args.res, Crops::Center { flip: false }, &dir, &device, |_, _| {})?;
    let build_s = start.elapsed().as_secs_f64();
    let cached = Source::open(&Spec::parse(&format!("cache:{}", dir.display()))?)?;
    let cache: &LatentCache = cached.cache.as_ref().expect("a cache source");
    let shape = cache.manifest.latent_shape;

    // The same model, optimiser and batches both ways; only where the latents come from differs.
    let time = |from_cache: bool| -> anyhow::Result<f64> {
        let mut model = Some(ov3_core::device::seeded(&device, args.common.seed, || Ov3::new(&cfg, &device)));
        let mut optim = optim::adamw(model.as_ref().expect("model"), 0.2);
        median_time(args.warmup, args.steps, |i| {
            let rows = i * args.batch..(i + 1) * args.batch;
            let aug = Augment::eval(args.res);
            let examples: Vec<_> = rows
                .map(|r| match from_cache {
                    true => cache.example(r),
                    false => load_example(&source, r, &aug, Default::default(), &mut SplitMix64::new(0, r as u64)),
                })
                .collect::<Result<_, _>>()
                .map_err(|s| anyhow::anyhow!("reading the batch: {}", s.name()))?;
            let images = Tensor::cat(examples.iter().map(|e| to_tensor(&e.image, &device)).collect(), 0);
            let inputs = match from_cache {
                true => cached_latents(&examples, shape, &device).expect("cached rows carry latents"),
                false => encoder_inputs(cfg.input_space, &vae, images.clone()),
            };
            let captions: Vec<String> = examples.into_iter().map(|e| e.caption).collect();
            let batch = ov3_core::Batch {
                images,
                inputs,
                tokens: ov3_core::tokenizer::Tokenizer::Bytes.batch(&captions, cfg.context_length, &device),
            };
            let m = model.take().expect("model between steps");
            model = Some(train_once(m, &mut optim, &batch, cfg.tau, &mut { LossScale::NONE }, &Single)?);
            Ok(())
        })
    };
    let with_vae = time(false)?;
    let with_cache = time(true)?;
    let _ = std::fs::remove_dir_all(&dir);
    let adapter = selected.adapter.as_ref().map(|a| a.to_string()).unwrap_or_else(|| "cpu (flex)".into());
    println!(
        "{{\"bench\":\"cache\",\"adapter\":\"{adapter}\",\"vae\":\"{}\",\"preset\":\"{}\",\"batch\":{},\"res\":{},\
         \"ms_per_step_vae\":{:.1},\"ms_per_step_cache\":{:.1},\"speedup\":{:.2},\"cache_build_ms_per_image\":{:.1}}}",
        vae.source,
        args.common.preset.name(),
        args.batch,
        args.res,
        with_vae * 1e3,
        with_cache * 1e3,
        with_vae / with_cache,
        build_s * 1e3 / n as f64
    );
    Ok(())
}

/// Median seconds of `steps` timed calls of `step(i)` after `warmup` untimed ones.
pub fn median_time(
    warmup: usize,
    steps: usize,
    mut step: impl FnMut(usize) -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    let mut times = Vec::with_capacity(steps);
    for i in 0..warmup + steps {
        let start = Instant::now();
        step(i)?;
        if i >= warmup {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// One training step (the trainer's). It reads its loss terms and gradient norm back once, after the backward
/// pass, which waits for the device; the optimiser's kernels then run while the next step is queued and before its
/// read, so back-to-back steps time the steady state (their median), as PyTorch's loop with `loss.item()` does.
fn train_once(
    model: Ov3,
    optim: &mut burn::optim::ModuleOptimizer,
    batch: &ov3_core::Batch,
    tau: f64,
    scale: &mut LossScale,
    group: &dyn Group,
) -> anyhow::Result<Ov3> {
    let spec = StepSpec { loss_scale: *scale, ..StepSpec::plain(tau, 1e-4, 1.0) };
    match train_step(model, optim, &spec, group, || Ok::<_, std::convert::Infallible>(batch.clone())) {
        Ok(stepped) => {
            *scale = stepped.loss_scale;
            Ok(stepped.model)
        }
        Err(StepError::NonFinite(what)) => anyhow::bail!("{what}"),
        Err(StepError::Batch(never)) => match never {},
    }
}

/// Peak resident set size of this process (Linux `VmHWM`); 0 where unavailable.
fn process_peak_bytes() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        })
        .map(|kb| kb * 1024.0)
        .unwrap_or(0.0)
}
