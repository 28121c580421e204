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
    /// Lanes per row group of the fused kernels, comma-separated: a row of ours for each (1: one row per lane;
    /// 2, 4: each row shared by that many lanes through subgroup shuffles, `OV3_FLASH_SPLIT`). Default: 1, and 4
    /// where the adapter has subgroups.
    #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(["1", "2", "4"]))]
    split: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Impl {
    /// Our kernels with rows split over this many lanes.
    Fused(u32),
    Unfused,
    BurnBuiltin,
}

impl Impl {
    fn name(self) -> String {
        match self {
            Impl::Fused(1) => "ov3 fused (WGSL)".into(),
            Impl::Fused(lanes) => format!("ov3 fused (WGSL), rows over {lanes} lanes"),
            Impl::Unfused => "unfused matmul-softmax-matmul".into(),
            Impl::BurnBuiltin => "burn module::attention".into(),
        }
    }

    fn apply(self, q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
        match self {
            Impl::Fused(lanes) => {
                flash::set_split(lanes);
                flash_attention(q, k, v, &AttentionMask::None)
            }
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
    /// [`error_vs_unfused`]; none for the unfused path itself.
    error: Option<f64>,
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
    let subgroups = selected.adapter.as_ref().is_some_and(|a| a.subgroups);
    let splits: Vec<u32> = match &args.split {
        Some(list) => list.iter().map(|s| s.parse().expect("1, 2 or 4")).collect(),
        None if subgroups => vec![1, 4],
        None => vec![1],
    };
    anyhow::ensure!(
        subgroups || splits.iter().all(|&l| l == 1),
        "--split above 1 shares rows through subgroup operations, and this adapter has none"
    );
    let mut impls: Vec<Impl> = if ours { splits.iter().map(|&l| Impl::Fused(l)).collect() } else { vec![] };
    impls.extend([Impl::Unfused, Impl::BurnBuiltin]);
    let adapter = selected.adapter.as_ref().map(|a| a.to_string()).unwrap_or_default();
    eprintln!("adapter: {adapter}");
    let compiler = ov3_core::device::compiler(&device).map_or("", |c| c.runtime);
    let mut rows = vec![];
    for &seq in &args.seq {
        anyhow::ensure!(seq >= 1, "sequence lengths must be >= 1");
        for &which in &impls {
            let row = measure(&args, seq, which, &device)?;
            let split = if let Impl::Fused(lanes) = which { lanes } else { 0 };
            println!(
                "{{\"bench\":\"attention\",\"adapter\":\"{adapter}\",\"compiler\":\"{compiler}\",\"fusion\":{},\"impl\":\"{}\",\"split\":{split},\"batch\":{},\"heads\":{},\"head_dim\":{},\
                 \"seq\":{seq},\"forward_ms\":{:.2},\"forward_backward_ms\":{:.2},\"held_for_backward_mib\":{:.1},\"error_vs_unfused\":{}}}",
                cfg!(feature = "fusion"),
                which.name(),
                args.batch,
                args.heads,
                args.head_dim,
                row.forward_ms,
                row.train_ms,
                row.held_mib,
                row.error.map_or("null".into(), |e| format!("{e:.2e}"))
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
    let error = if which == Impl::Unfused { None } else { Some(error_vs_unfused(which, shape, &ad)?) };
    Ok(Row {
        seq,
        which,
        forward_ms: forward_s * 1e3,
        train_ms: train_s * 1e3,
        held_mib: held / (1 << 20) as f64,
        error,
    })
}

/// The largest difference from the unfused path on the same random inputs, over the output and the gradients of
/// q, k and v (for the sum of the output times random weights), each relative to the unfused one's largest
/// magnitude: a check that the variant timed computes attention on this adapter (f32: ~1e-6 expected).
fn error_vs_unfused(which: Impl, shape: [usize; 4], ad: &Device) -> anyhow::Result<f64> {
    let random = || Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), ad);
    let (q, k, v, w) = (random().require_grad(), random().require_grad(), random().require_grad(), random());
    let run = |imp: Impl| {
        let out = imp.apply(q.clone(), k.clone(), v.clone());
        let grads = (out.clone() * w.clone()).sum().backward();
        let grad = |t: &Tensor<4>| t.grad(&grads).expect("a gradient");
        [out, grad(&q), grad(&k), grad(&v)].map(|t| t.into_data().try_to_vec::<f32>().expect("f32"))
    };
    let (ours, reference) = (run(which), run(Impl::Unfused));
    let mut worst = 0f64;
    for (a, r) in ours.iter().zip(&reference) {
        let scale = r.iter().fold(0f64, |m, x| m.max(x.abs() as f64)).max(f64::MIN_POSITIVE);
        let diff = a.iter().zip(r).fold(0f64, |m, (x, y)| m.max((x - y).abs() as f64));
        anyhow::ensure!(diff.is_finite(), "{}: a non-finite output or gradient", which.name());
        worst = worst.max(diff / scale);
    }
    Ok(worst)
}

fn print_table(rows: &[Row]) {
    eprintln!(
        "\n{:>6}  {:<40} {:>12} {:>14} {:>10} {:>12} {:>9}",
        "seq", "implementation", "forward ms", "fwd+bwd ms", "held MiB", "vs first row", "error"
    );
    for row in rows {
        // The fused kernels' row where there is one, else the unfused path's: the first of each length.
        let first = rows.iter().find(|r| r.seq == row.seq).expect("a row of this length");
        eprintln!(
            "{:>6}  {:<40} {:>12.2} {:>14.2} {:>10.1} {:>11.2}x {:>9}",
            row.seq,
            row.which.name(),
            row.forward_ms,
            row.train_ms,
            row.held_mib,
            row.train_ms / first.train_ms,
            row.error.map_or("-".into(), |e| format!("{e:.1e}"))
        );
    }
}
