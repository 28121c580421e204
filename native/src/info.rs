//! `ov3 info`: adapters, the chosen backend, and parameter counts.

use burn::tensor::Device;
use clap::Args;
use ov3_core::device::{self, BackendChoice};
use ov3_core::{Ov3, Preset, params};

#[derive(Args)]
pub struct InfoArgs {
    /// Preset whose parameters to count.
    #[arg(long, default_value = "tiny")]
    preset: Preset,
    #[arg(long, default_value = "auto")]
    backend: BackendChoice,
    /// Also write every WGSL kernel ov3 compiles, as compiled, to FILE (JSON: name -> source; the browser test
    /// has Chromium compile them).
    #[arg(long, value_name = "FILE")]
    wgsl: Option<std::path::PathBuf>,
}

pub fn run(args: InfoArgs) -> anyhow::Result<()> {
    if let Some(path) = &args.wgsl {
        let kernels: serde_json::Map<String, serde_json::Value> =
            ov3_core::wgsl::every_kernel().into_iter().map(|(name, src)| (name, src.into())).collect();
        let json = serde_json::to_vec_pretty(&kernels)?;
        ov3_core::fsio::atomic_write(path, &json)
            .map_err(|e| anyhow::anyhow!("--wgsl: cannot write {}: {e}", path.display()))?;
        println!("{} WGSL kernels written to {}", kernels.len(), path.display());
    }
    let adapters = device::adapters();
    if adapters.is_empty() {
        println!("wgpu adapters: none found");
    }
    for a in &adapters {
        println!("wgpu adapter: {a}{}", if a.software { " [software]" } else { "" });
        println!(
            "  max storage buffer binding {} MiB, max buffer {} MiB, workgroup storage {} KiB, \
             invocations/workgroup {}, shader-f16 {}, subgroups {}",
            a.max_storage_buffer_binding_size >> 20,
            a.max_buffer_size >> 20,
            a.max_compute_workgroup_storage_size >> 10,
            a.max_compute_invocations_per_workgroup,
            a.shader_f16,
            a.subgroups
        );
    }
    let selected = device::select(args.backend).map_err(anyhow::Error::msg)?;
    println!("{}", selected.reason);
    // (A `vulkan` build's reason already names it.)
    if let Some(compiler) = device::compiler(&selected.device).filter(|_| !cfg!(feature = "vulkan")) {
        println!("  kernels compiled by cubecl's {compiler}");
    }

    let cfg = args.preset.config();
    // Parameters are counted on the CPU whatever the backend: no kernels run.
    let model = Ov3::new(&cfg, &Device::flex());
    println!("preset {} parameters:", args.preset.name());
    let mut total = 0;
    for (part, n) in params::count_by_part(&model) {
        println!("  {part:<14} {:>8.2} M", n as f64 / 1e6);
        total += n;
    }
    println!("  {:<14} {:>8.2} M", "total", total as f64 / 1e6);
    Ok(())
}
