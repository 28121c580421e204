//! `ov3`: the command line of the OpenVision 3 unified tokenizer.

mod ablate;
mod bench;
mod bench_attention;
mod bench_kernels;
mod cache_cmd;
mod data_cmd;
mod datagen;
mod info;
mod model_cmd;
mod overfit;
mod plots;
mod progress;
mod report;
mod train;
mod train_vae;
mod vae_cmd;

use clap::{Args, Parser, Subcommand};
use ov3_core::Preset;
use ov3_core::device::{self, BackendChoice, Selected};
use ov3_core::parallel::{self, Group, Single};

#[derive(Parser)]
#[command(name = "ov3", version, about = "OpenVision 3 unified visual tokenizer on WebGPU and CPU")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train ov3 (the main job): the quick recipe on the embedded data by default, or a TOML config.
    Train(train::TrainArgs),
    /// Evaluate a model: PSNR/SSIM, retrieval recall, zero-shot accuracy, caption loss, sample captions.
    Eval(model_cmd::EvalArgs),
    /// Image -> unified tokens -> (noise) -> ViT decoder -> VAE decoder -> image.
    Reconstruct(model_cmd::ReconstructArgs),
    /// Image -> unified tokens z_u (and latents, contrastive embedding) in a safetensors file.
    Encode(model_cmd::EncodeArgs),
    /// Image -> a caption generated from its unified tokens (greedy or top-k).
    Caption(model_cmd::CaptionArgs),
    /// Rank captions (one per line of a file) by contrastive similarity to an image, as the web demo does.
    Rank(model_cmd::RankArgs),
    /// Write a model file for the web demo or sharing (f16 by default).
    Export(model_cmd::ExportArgs),
    /// Print the wgpu adapters, the backend `auto` picks, and the parameter count of a preset.
    Info(info::InfoArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// The paper's ablations at small scale: sets of training runs, one JSON and one figure each.
    #[command(subcommand)]
    Ablate(ablate::AblateCommand),
    /// Overfit one fixed batch of image-caption pairs: a smoke test of the whole model and optimiser.
    Overfit(overfit::OverfitArgs),
    /// Encode a data source once with the frozen VAE into a latent cache (train from `cache:DIR`).
    Cache(cache_cmd::CacheArgs),
    /// Inspect data sources.
    #[command(subcommand)]
    Data(data_cmd::DataCommand),
    /// Write the embedded captioned world as image + caption files.
    Datagen(datagen::DatagenArgs),
    /// Train the embedded default autoencoder on the embedded data and freeze it.
    TrainVae(train_vae::TrainVaeArgs),
    /// The frozen VAE alone: encode images to latents, decode latents to images.
    #[command(subcommand)]
    Vae(vae_cmd::VaeCommand),
}

/// Options every compute command shares.
#[derive(Args, Clone, Debug)]
pub struct Common {
    /// Model preset: tiny, small, base or large.
    #[arg(long, default_value = "tiny")]
    pub preset: Preset,
    /// auto (wgpu on a hardware GPU, else the CPU), wgpu, or cpu.
    #[arg(long, default_value = "auto")]
    pub backend: BackendChoice,
    /// Seed of the device RNG (initialisation, data, noise).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl Common {
    /// Resolves the backend and says which one in one line.
    pub fn device(&self) -> anyhow::Result<Selected> {
        self.device_in(&Single)
    }

    /// [`Common::device`] for this process's rank of a data-parallel `group`: its own adapter on wgpu.
    pub fn device_in(&self, group: &dyn Group) -> anyhow::Result<Selected> {
        let selected = device::select_for(self.backend, group.local_rank()).map_err(anyhow::Error::msg)?;
        say_rank(group, &selected.reason);
        selected.device.seed(self.seed);
        Ok(selected)
    }
}

/// Prints `line` on stderr, prefixed with this process's rank in a data-parallel group.
pub fn say_rank(group: &dyn Group, line: &str) {
    match group.size() {
        1 => say(line),
        n => say(&format!("[rank {}/{n}] {line}", group.rank())),
    }
}

/// Prints `line` on stderr in one write: `eprintln!` writes each formatted piece on its own (stderr is unbuffered),
/// so the lines of a group's ranks sharing one terminal or pipe could interleave mid-line.
pub fn say(line: &str) {
    use std::io::Write;
    let _ = std::io::stderr().lock().write_all(format!("{line}\n").as_bytes());
}

fn main() {
    let cli = Cli::parse();
    // Under mpirun/srun (built with `--features mpi`): this process's rank of the group; else alone.
    let group = parallel::join().unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(1);
    });
    // burn's CPU threads, this one among them (after the data-parallel group, which may have sized them).
    device::init_cpu_threads(device::default_cpu_threads());
    if group.size() > 1 {
        // A rank that panics must end the job: unwinding would finalise MPI and leave the others waiting.
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            report(info);
            std::process::abort();
        }));
    }
    let parallel = matches!(
        cli.command,
        Command::Train(_) | Command::TrainVae(_) | Command::Ablate(_) | Command::Bench(bench::BenchCommand::Step(_))
    );
    if group.size() > 1 && !parallel {
        if group.rank() == 0 {
            eprintln!(
                "error: only `ov3 train`, `ov3 train-vae`, `ov3 ablate` and `ov3 bench step` run data-parallel; run this command as one process"
            );
        }
        group.abort(2);
    }
    let result = match cli.command {
        Command::Train(args) => train::run(args, &*group),
        Command::Eval(args) => model_cmd::eval(args),
        Command::Reconstruct(args) => model_cmd::reconstruct(args),
        Command::Encode(args) => model_cmd::encode(args),
        Command::Caption(args) => model_cmd::caption(args),
        Command::Rank(args) => model_cmd::rank(args),
        Command::Export(args) => model_cmd::export(args),
        Command::Cache(args) => cache_cmd::run(args),
        Command::Info(args) => info::run(args),
        Command::Bench(cmd) => bench::run(cmd, &*group),
        Command::Ablate(cmd) => ablate::run(cmd, &*group),
        Command::Overfit(args) => overfit::run(args),
        Command::Vae(cmd) => vae_cmd::run(cmd),
        Command::TrainVae(args) => train_vae::run(args, &*group),
        Command::Datagen(args) => datagen::run(args),
        Command::Data(cmd) => data_cmd::run(cmd),
    };
    if let Err(err) = result {
        // One line: the message and each cause it does not already spell out.
        let mut line = err.to_string();
        for cause in err.chain().skip(1).map(|c| c.to_string()) {
            if !line.contains(&cause) {
                line = format!("{line}: {cause}");
            }
        }
        if group.size() > 1 {
            // One rank's error ends the whole job (the others would wait for it forever).
            eprintln!("error (rank {} of {}): {line}", group.rank(), group.size());
            group.abort(1);
        }
        eprintln!("error: {line}");
        std::process::exit(1);
    }
}
