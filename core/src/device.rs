//! Choosing where tensors live: burn's wgpu backend (Vulkan / Metal / DX12) or its `flex` CPU backend.
//!
//! A software rasterizer (llvmpipe, SwiftShader) runs our kernels 8-15x slower than `flex`, so `auto`
//! takes wgpu only when a hardware adapter exists.

use std::fmt;
use std::sync::Mutex;

use burn::tensor::wgpu::wgpu;
use burn::tensor::{Device, DeviceKind};

/// What the user asked for with `--backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    Auto,
    Wgpu,
    Cpu,
}

impl std::str::FromStr for BackendChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "wgpu" => Ok(Self::Wgpu),
            "cpu" | "flex" => Ok(Self::Cpu),
            other => Err(format!("unknown backend '{other}' (expected auto, wgpu or cpu)")),
        }
    }
}

/// One wgpu adapter as reported by the driver.
#[derive(Debug, Clone)]
pub struct AdapterSummary {
    pub name: String,
    pub api: String,
    pub driver: String,
    pub device_type: String,
    pub software: bool,
    pub max_storage_buffer_binding_size: u64,
    pub max_buffer_size: u64,
    pub max_compute_workgroup_storage_size: u32,
    pub max_compute_invocations_per_workgroup: u32,
    pub shader_f16: bool,
    /// wgpu's subgroup feature (WGSL's subgroup operations), which the fused attention's split rows need
    /// ([`crate::flash::set_split`]).
    pub subgroups: bool,
}

impl fmt::Display for AdapterSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}, {}, driver {})", self.name, self.api, self.device_type, self.driver)
    }
}

/// Every adapter burn's wgpu runtime can use (Vulkan, Metal, DX12, WebGPU; not GL), hardware first.
pub fn adapters() -> Vec<AdapterSummary> {
    let mut out: Vec<AdapterSummary> = wgpu_adapters().iter().map(summary).collect();
    out.sort_by_key(|a| a.software);
    out
}

/// The adapters wgpu finds on this machine (primary APIs), in its order.
fn wgpu_adapters() -> Vec<wgpu::Adapter> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    futures_lite::future::block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY))
}

fn summary(adapter: &wgpu::Adapter) -> AdapterSummary {
    let info = adapter.get_info();
    let limits = adapter.limits();
    let lower = info.name.to_lowercase();
    let software = info.device_type == wgpu::DeviceType::Cpu
        || ["llvmpipe", "swiftshader", "lavapipe", "softpipe", "warp"].iter().any(|s| lower.contains(s));
    AdapterSummary {
        name: info.name.clone(),
        api: format!("{:?}", info.backend),
        driver: format!("{} {}", info.driver, info.driver_info).trim().to_string(),
        device_type: format!("{:?}", info.device_type),
        software,
        max_storage_buffer_binding_size: limits.max_storage_buffer_binding_size as u64,
        max_buffer_size: limits.max_buffer_size,
        max_compute_workgroup_storage_size: limits.max_compute_workgroup_storage_size,
        max_compute_invocations_per_workgroup: limits.max_compute_invocations_per_workgroup,
        shader_f16: adapter.features().contains(wgpu::Features::SHADER_F16),
        subgroups: adapter.features().contains(wgpu::Features::SUBGROUP),
    }
}

/// A wgpu device on wgpu's no-op backend, which validates and records every command (wgpu-core's checks,
/// cubecl's launches, burn's graph: all the host does for a step) and runs none: kernels write nothing, so
/// every value computed on it is meaningless. The time a step takes there is its host cost alone, the floor
/// under a step on any GPU, measurable on a machine without one (`ov3 bench step --noop`). It reports the
/// features, limits and subgroup sizes of the machine's first adapter (hardware first), so that cubecl and
/// ov3 choose the kernels they would choose there; without an adapter, everything wgpu can report.
#[cfg(not(target_arch = "wasm32"))]
pub fn noop() -> Result<Selected, String> {
    check_env()?;
    let mut real = wgpu_adapters();
    real.sort_by_key(|a| summary(a).software);
    let like = real.first();
    let mut options = wgpu::NoopBackendOptions::enabled();
    if let Some(a) = like {
        let info = a.get_info();
        options.limits = Some(a.limits());
        options.features = Some(a.features());
        options.device_type = Some(info.device_type);
        options.subgroup_min_size = Some(info.subgroup_min_size);
        options.subgroup_max_size = Some(info.subgroup_max_size);
    }
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: wgpu::Backends::NOOP,
        backend_options: wgpu::BackendOptions { noop: options, ..Default::default() },
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    let adapter = futures_lite::future::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions::default()))
        .map_err(|e| format!("wgpu's no-op adapter: {e}"))?;
    // The device cubecl would request on it (its WGSL path): every feature but mappable primary buffers (and
    // wgpu's experimental ones, which WGSL kernels do not use), the adapter's limits.
    let features = wgpu::Features::MAPPABLE_PRIMARY_BUFFERS | wgpu::Features::all_experimental_mask();
    let descriptor = wgpu::DeviceDescriptor {
        label: Some("ov3 no-op"),
        required_features: adapter.features().difference(features),
        required_limits: adapter.limits(),
        memory_hints: wgpu::MemoryHints::MemoryUsage,
        trace: wgpu::Trace::Off,
        experimental_features: wgpu::ExperimentalFeatures::disabled(),
    };
    let (device, queue) = futures_lite::future::block_on(adapter.request_device(&descriptor))
        .map_err(|e| format!("wgpu's no-op device: {e}"))?;
    let mut a = summary(&adapter);
    a.name = match like {
        Some(l) => format!("wgpu no-op, as {}", l.get_info().name),
        None => "wgpu no-op".into(),
    };
    check_flash_split(&a)?;
    let setup = burn::tensor::wgpu::WgpuSetup { instance, adapter, device, queue, backend: wgpu::Backend::Noop };
    let mut options = Device::wgpu_options().setup(setup);
    if let Some(memory) = memory_config()? {
        options = options.memory_config(memory);
    }
    let device = options.init().map_err(|e| format!("wgpu's no-op device: {e}"))?;
    let reason = format!("backend: {a}: nothing runs, every value is meaningless; steps take their host cost");
    Ok(Selected { device, kind: BackendChoice::Wgpu, adapter: Some(a), reason })
}

/// What cubecl compiles kernels to on a wgpu device, and the matrix products it can run on cooperative-matrix
/// (tensor-core) units there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compiler {
    /// cubecl's runtime name: `wgpu<wgsl>` (every wgpu build: our WGSL kernels run), `wgpu<spirv>` (the `vulkan`
    /// feature on a Vulkan adapter with the features cubecl needs: burn's ops instead of ours, see
    /// [`crate::wgsl::runs_here`]) or `wgpu<msl>`.
    pub runtime: &'static str,
    /// Each cooperative-matrix shape the driver offers, `a x b -> c mxnxk` (e.g. `f16 x f16 -> f32 16x16x16`);
    /// empty under WGSL, which has no such operations.
    pub cmma: Vec<String>,
}

impl fmt::Display for Compiler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.cmma.is_empty() {
            true => write!(f, "{}, no cooperative-matrix (tensor-core) matmuls", self.runtime),
            false => write!(f, "{}, cooperative-matrix matmuls: {}", self.runtime, self.cmma.join(", ")),
        }
    }
}

/// [`Compiler`] of `device`, `None` off wgpu. Starts the device's runtime if it is not running yet.
pub fn compiler(device: &Device) -> Option<Compiler> {
    let inner = device.clone().inner();
    let burn::backend::DispatchDevice::Cube(cube) = inner.as_dispatch() else {
        return None;
    };
    let client = cube.client();
    let cmma = client.properties().features.matmul.cmma.iter();
    let cmma = cmma.map(|c| format!("{} x {} -> {} {}x{}x{}", c.a_type, c.b_type, c.cd_type, c.m, c.n, c.k));
    Some(Compiler { runtime: client.name(), cmma: cmma.collect() })
}

/// burn's name for `adapters[index]`: its index among the adapters of its type.
fn kind_of(adapters: &[AdapterSummary], index: usize) -> DeviceKind {
    let ty = &adapters[index].device_type;
    let nth = adapters[..index].iter().filter(|a| &a.device_type == ty).count();
    match ty.as_str() {
        "DiscreteGpu" => DeviceKind::DiscreteGpu(nth),
        "IntegratedGpu" => DeviceKind::IntegratedGpu(nth),
        "VirtualGpu" => DeviceKind::VirtualGpu(nth),
        _ => DeviceKind::Cpu,
    }
}

/// The device a command runs on, and one line saying why.
#[derive(Debug, Clone)]
pub struct Selected {
    pub device: Device,
    pub kind: BackendChoice,
    pub adapter: Option<AdapterSummary>,
    pub reason: String,
}

/// Resolve `--backend` to a device. `Wgpu` without any adapter is an error, not a silent fallback.
pub fn select(choice: BackendChoice) -> Result<Selected, String> {
    select_for(choice, 0)
}

/// [`select`] for the process of local rank `local_rank` in a data-parallel group (src/parallel.rs): on
/// wgpu, the machine's `local_rank`-th adapter (hardware first; a rank without an adapter of its own is an
/// error, two ranks never share one by accident); on the CPU, one flex device per process. `auto` on a machine
/// with no hardware adapter puts every rank on the CPU.
pub fn select_for(choice: BackendChoice, local_rank: usize) -> Result<Selected, String> {
    check_env()?;
    // `cpu` never touches the GPU drivers.
    let all = if choice == BackendChoice::Cpu { vec![] } else { adapters() };
    let cpu = |reason: String| Selected { device: Device::flex(), kind: BackendChoice::Cpu, adapter: None, reason };
    // `auto` on a machine without a hardware adapter: every rank on the CPU.
    let hardware = all.iter().filter(|a| !a.software).count();
    match (choice, all.first()) {
        (BackendChoice::Cpu, _) => return Ok(cpu("backend: cpu (flex), as requested".into())),
        (BackendChoice::Wgpu, None) => {
            return Err("backend wgpu requested but no wgpu adapter was found \
                 (install a Vulkan/Metal/DX12 driver, e.g. mesa-vulkan-drivers)"
                .into());
        }
        (BackendChoice::Auto, None) => return Ok(cpu("backend: cpu (flex) — no wgpu adapter found".into())),
        (BackendChoice::Auto, Some(a)) if hardware == 0 => {
            return Ok(cpu(format!(
                "backend: cpu (flex) — the only wgpu adapter is the software rasterizer {}, which is slower than \
                 flex; --backend wgpu forces it",
                a.name
            )));
        }
        _ => {}
    }
    // wgpu: the `local_rank`-th adapter (hardware ones first); `auto` uses hardware adapters only.
    let usable = if choice == BackendChoice::Auto { hardware } else { all.len() };
    if local_rank >= usable {
        return Err(format!(
            "local rank {local_rank} has no {} of its own ({usable} on this machine); start at most {usable} \
             processes per machine, or pass --backend cpu",
            if choice == BackendChoice::Auto { "GPU" } else { "wgpu adapter" },
        ));
    }
    let kind = if local_rank > 0 { kind_of(&all, local_rank) } else { DeviceKind::DefaultDevice };
    let a = all[local_rank].clone();
    check_flash_split(&a)?;
    let reason = match choice {
        BackendChoice::Auto => format!("backend: wgpu on {a}"),
        _ if a.software => {
            format!(
                "backend: wgpu on {a}, as requested — a software rasterizer, expect it to be slower than --backend cpu"
            )
        }
        _ => format!("backend: wgpu on {a}, as requested"),
    };
    let device = wgpu_device(kind)?;
    // A `vulkan` build says which compiler it got: SPIR-V runs burn's ops in place of our WGSL kernels.
    #[cfg(feature = "vulkan")]
    let reason = match compiler(&device) {
        Some(c) => format!("{reason}\n  kernels compiled by cubecl's {c}"),
        None => reason,
    };
    Ok(Selected { device, kind: BackendChoice::Wgpu, adapter: Some(a), reason })
}

/// burn's wgpu device of `kind`, with cubecl's memory pool as [`memory_config`] says (started at once then: the
/// pool is set when the runtime starts; lazily otherwise, as burn does).
fn wgpu_device(kind: DeviceKind) -> Result<Device, String> {
    #[cfg(not(target_arch = "wasm32"))]
    if let Some(memory) = memory_config()? {
        return Device::wgpu_options()
            .device_kind(kind)
            .memory_config(memory)
            .init()
            .map_err(|e| format!("wgpu device with OV3_WGPU_MEMORY: {e}"));
    }
    Ok(Device::wgpu(kind))
}

/// The variables device selection reads, checked before any device is touched.
fn check_env() -> Result<(), String> {
    if let Ok(value) = std::env::var("OV3_FLASH_SPLIT") {
        crate::flash::parse_split(&value)?;
    }
    if let Ok(value) = std::env::var("OV3_ADAMW_GATHER") {
        crate::optim_gpu::parse_gather(&value)?;
    }
    memory_config().map(|_| ())
}

/// How cubecl's memory pool carves a wgpu device's buffers, `OV3_WGPU_MEMORY`: unset or `adaptive` (cubecl's
/// default, `None`: tensors are slices of large pages, found and coalesced on every allocation) or `exclusive` (a
/// buffer of its own per tensor, in exponentially spaced size buckets: less host work per allocation, more memory).
/// On the no-op adapter `exclusive` took 1.38x off a tiny step's host cost before AdamW wrote in place, ~5-10%
/// since, for ~50% more pool memory (docs/PERFORMANCE.md, "The host's share of a step"); a GPU call measures what
/// it does there.
pub fn memory_config() -> Result<Option<burn::tensor::wgpu::MemoryConfiguration>, String> {
    use burn::tensor::wgpu::MemoryConfiguration;
    match std::env::var("OV3_WGPU_MEMORY").as_deref().map(str::trim) {
        Err(_) | Ok("" | "adaptive") => Ok(None),
        Ok("exclusive") => Ok(Some(MemoryConfiguration::ExclusivePages)),
        Ok(other) => Err(format!("OV3_WGPU_MEMORY must be adaptive or exclusive, got '{other}'")),
    }
}

/// The fused attention's lanes per row group ([`crate::flash::split`], `OV3_FLASH_SPLIT`, already checked to be
/// 1, 2 or 4) above 1 only on an adapter with subgroups: a clear error at the start, not a shader that fails to
/// compile.
fn check_flash_split(a: &AdapterSummary) -> Result<(), String> {
    let split = crate::flash::split();
    if split > 1 && !a.subgroups {
        return Err(format!(
            "OV3_FLASH_SPLIT={split} splits attention rows over subgroup lanes, but {} has no subgroups \
             (wgpu's SUBGROUP feature); unset it",
            a.name
        ));
    }
    Ok(())
}

/// The device RNG is one per process (burn's backends keep it in a global), so seeding it and drawing from it
/// must not interleave with another thread doing the same: test threads (or any threads of one process) would
/// re-seed each other's draws.
static DEVICE_RNG: Mutex<()> = Mutex::new(());

/// `draw()` run right after seeding `device`'s RNG with `seed`, with no other thread's seeding or drawing in
/// between: what it draws depends on `seed` alone. The one way ov3 seeds a device.
pub fn seeded<T>(device: &Device, seed: u64, draw: impl FnOnce() -> T) -> T {
    let _turn = DEVICE_RNG.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    device.seed(seed);
    draw()
}

/// Sets up burn's CPU pool (rayon's global pool) with `threads` threads, the calling thread among them when
/// there are two or more. Call it first thing on the main thread (`ov3` does; later calls do nothing).
///
/// flex splits a matmul or one of our kernels (`cpu_ops`) across the pool. From a thread outside the pool
/// every such op hands its pieces to the pool and sleeps until they are done, a futex wake-up per op; from
/// a pool thread it runs the first piece itself while the others take the rest: the tiny training step is
/// 13% faster (docs/PERFORMANCE.md), and the tensors stay allocated by the main thread. A pool of one
/// thread stays apart from the main thread: the data loader's threads also queue work on the pool, and a
/// main thread that waits for the loader's next batch would never run it.
pub fn init_cpu_threads(threads: usize) {
    #[cfg(not(target_arch = "wasm32"))]
    {
        static DONE: std::sync::Once = std::sync::Once::new();
        DONE.call_once(|| {
            let mut pool = rayon::ThreadPoolBuilder::new().num_threads(threads.max(1));
            if threads >= 2 {
                pool = pool.use_current_thread();
            }
            if let Err(e) = pool.build_global() {
                eprintln!("warning: could not set up the {threads} CPU threads ({e})");
            }
        });
    }
    #[cfg(target_arch = "wasm32")]
    let _ = threads;
}

/// `RAYON_NUM_THREADS` when set to a positive number, else every core.
pub fn default_cpu_threads() -> usize {
    let cores = || std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    std::env::var("RAYON_NUM_THREADS").ok().and_then(|v| v.parse().ok()).filter(|&n| n > 0).unwrap_or_else(cores)
}

/// Threads burn's CPU backend runs its kernels on (rayon's global pool: every core, `RAYON_NUM_THREADS`, or a
/// data-parallel rank's share, `parallel::share_cores`); 1 in the browser.
pub fn cpu_threads() -> usize {
    #[cfg(not(target_arch = "wasm32"))]
    return rayon::current_num_threads();
    #[cfg(target_arch = "wasm32")]
    return 1;
}
