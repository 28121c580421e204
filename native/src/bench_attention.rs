//! `ov3 bench attention`: our fused WGSL attention (`shaders/`) against burn's unfused
//! matmul-softmax-matmul (the model's reference path) and burn's built-in attention op
//! (`burn::tensor::module::attention`), forward and forward+backward, on the same inputs in one run.

use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Device, Distribution, Tensor};
use clap::Args;
use ov3_core::device::{BackendChoice, select};
use ov3_core::flash::{self, flash_attention};
use ov3_core::model::attention::{AttentionMask, scaled_dot_product_attention};

use crate::bench::median_time;

#[derive(Args)]
pub struct AttentionArgs {
    /// Sequence lengths, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [64, 256, 1024])]
    seq: Vec<usize>,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 12)]
    heads: usize,
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    /// Timed repetitions, after the warm-up.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Untimed repetitions first (shader compilation, allocator warm-up).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Impl {
    Fused,
    Unfused,
    BurnBuiltin,
}

impl Impl {
    fn name(self) -> &'static str {
        match self {
            Impl::Fused => "ov3 fused (WGSL)",
            Impl::Unfused => "unfused matmul-softmax-matmul",
            Impl::BurnBuiltin => "burn module::attention",
        }
    }

    fn apply(self, q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
        match self {
            Impl::Fused => flash_attention(q, k, v, &AttentionMask::None),
            Impl::Unfused => scaled_dot_product_attention(q, k, v, None),
            Impl::BurnBuiltin => attention(q, k, v, None, None, AttentionModuleOptions::default()),
        }
    }
}

struct Row {
    seq: usize,
    which: Impl,
    forward_ms: f64,
    train_ms: f64,
    held_mib: f64,
}

pub fn run(args: AttentionArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.batch >= 1 && args.heads >= 1 && args.steps >= 1, "--batch, --heads and --steps must be >= 1");
    // The fused kernels exist on wgpu only, so this benchmark runs there whatever the adapter.
    let selected = select(BackendChoice::Wgpu).map_err(anyhow::Error::msg)?;
    let device = selected.device.clone();
    // Our WGSL kernels may be off (`OV3_WGPU_OPS=burn`) or unable to run (a `vulkan` build's SPIR-V compiler):
    // the other two rows still compare there.
    let ours = ov3_core::wgsl::runs_here(&device);
    anyhow::ensure!(
        !ours || flash::supports(&device, args.head_dim),
        "--head-dim must be a multiple of 4 up to {} for the fused kernels",
        flash::MAX_HEAD_DIM
    );
    if !ours {
        eprintln!("no fused row: our WGSL kernels do not run here (OV3_WGPU_OPS=burn, or a `vulkan` build's SPIR-V)");
    }
    let impls =
        if ours { &[Impl::Fused, Impl::Unfused, Impl::BurnBuiltin][..] } else { &[Impl::Unfused, Impl::BurnBuiltin] };
    let adapter = selected.adapter.as_ref().map(|a| a.to_string()).unwrap_or_default();
    eprintln!("adapter: {adapter}");
    let compiler = ov3_core::device::compiler(&device).map_or("", |c| c.runtime);
    let mut rows = vec![];
    for &seq in &args.seq {
        anyhow::ensure!(seq >= 1, "sequence lengths must be >= 1");
        for &which in impls {
            let row = measure(&args, seq, which, &device)?;
            println!(
                "{{\"bench\":\"attention\",\"adapter\":\"{adapter}\",\"compiler\":\"{compiler}\",\"fusion\":{},\"impl\":\"{}\",\"batch\":{},\"heads\":{},\"head_dim\":{},\
                 \"seq\":{seq},\"forward_ms\":{:.2},\"forward_backward_ms\":{:.2},\"held_for_backward_mib\":{:.1}}}",
                cfg!(feature = "fusion"),
                which.name(),
                args.batch,
                args.heads,
                args.head_dim,
                row.forward_ms,
                row.train_ms,
                row.held_mib
            );
            rows.push(row);
        }
    }
    print_table(&rows);
    Ok(())
}

fn measure(args: &AttentionArgs, seq: usize, which: Impl, device: &Device) -> anyhow::Result<Row> {
    let shape = [args.batch, args.heads, seq, args.head_dim];
    let random = |d: &Device| Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), d);
    let (q, k, v) = (random(device), random(device), random(device));
    // Reading a scalar back waits for the device, so the timer covers the whole computation.
    let forward_s = median_time(args.warmup, args.steps, |_| {
        let sum = which.apply(q.clone(), k.clone(), v.clone()).sum().into_scalar::<f32>();
        anyhow::ensure!(sum.is_finite(), "{}: output sum is {sum}", which.name());
        Ok(())
    })?;

    let ad = device.clone().autodiff();
    let (q, k, v) = (random(&ad).require_grad(), random(&ad).require_grad(), random(&ad).require_grad());
    let train_s = median_time(args.warmup, args.steps, |_| {
        let grads = which.apply(q.clone(), k.clone(), v.clone()).sum().backward();
        let dq = q.grad(&grads).expect("dQ").sum().into_scalar::<f32>();
        anyhow::ensure!(dq.is_finite(), "{}: dQ sum is {dq}", which.name());
        Ok(())
    })?;

    // What a forward pass keeps alive for its backward pass: the B x H x N x N probabilities for the
    // unfused path, O and the log-sum-exp for the fused one.
    let in_use = || {
        device.sync().ok();
        device.memory_pool_usage().map(|u| u.bytes_in_use as f64).unwrap_or(0.0)
    };
    let before = in_use();
    let out = which.apply(q.clone(), k.clone(), v.clone());
    let held = in_use() - before;
    drop(out);
    Ok(Row { seq, which, forward_ms: forward_s * 1e3, train_ms: train_s * 1e3, held_mib: held / (1 << 20) as f64 })
}

fn print_table(rows: &[Row]) {
    eprintln!(
        "\n{:>6}  {:<32} {:>12} {:>14} {:>10} {:>12}",
        "seq", "implementation", "forward ms", "fwd+bwd ms", "held MiB", "vs first row"
    );
    for row in rows {
        // The fused kernels' row where there is one, else the unfused path's: the first of each length.
        let first = rows.iter().find(|r| r.seq == row.seq).expect("a row of this length");
        eprintln!(
            "{:>6}  {:<32} {:>12.2} {:>14.2} {:>10.1} {:>11.2}x",
            row.seq,
            row.which.name(),
            row.forward_ms,
            row.train_ms,
            row.held_mib,
            row.train_ms / first.train_ms
        );
    }
}
