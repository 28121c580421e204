//! What launching our WGSL kernels (`shaders/`) on a cubecl (wgpu) tensor's client needs, in one place: new
//! output tensors (NaN-poisoned under test), small `u32` parameter buffers, and 2-D grids for more workgroups
//! than one grid dimension holds, and the launch itself. Used by `flash`, `gpu_ops` and `optim_gpu`.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use burn::backend::ops::FloatTensorOps;
use burn::backend::wgpu::{CubeBackend, CubeDim, CubeTensor, KernelSource, SourceKernel};
use burn::backend::{DType, DispatchDevice, FloatDType};
use burn::tensor::{Device, Shape};
use cubecl::CubeCount;
use cubecl::ir::{ElemType, FloatKind};
use cubecl::server::KernelArguments;

/// 0: not decided yet (`OV3_WGPU_OPS` decides at the first use), 1: our kernels, 2: burn's ops.
static SETTING: AtomicU8 = AtomicU8::new(0);

/// Use our WGSL kernels on wgpu, or not (burn's composite ops instead: layer norm, softmax, GELU, the attention
/// layers' head split, AdamW and clipping's sum of squares, as before them): `ov3 bench step --wgpu-ops` compares
/// the two on one adapter. Without a call, `OV3_WGPU_OPS=burn` in the environment turns them off (a way around a
/// driver that mis-compiles one of them; `attention = "Fused"` then takes the reference path); anything else, or
/// nothing, keeps them on.
pub fn set_enabled(on: bool) {
    SETTING.store(if on { 1 } else { 2 }, Ordering::Relaxed);
}

/// Whether our WGSL kernels are on ([`set_enabled`]); [`runs_here`] asks it.
pub fn enabled() -> bool {
    match SETTING.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let on = std::env::var("OV3_WGPU_OPS").map_or(true, |v| v.trim() != "burn");
            set_enabled(on);
            on
        }
    }
}

/// Whether our WGSL kernels run on `device`: they are on ([`enabled`]) and it is a device of burn's cubecl
/// backend (wgpu, with or without autodiff) whose runtime compiles WGSL. Every wgpu device does in the default
/// build; with the `vulkan` feature cubecl compiles its kernels to SPIR-V on a Vulkan adapter that has the
/// features it needs (runtime `wgpu<spirv>`), a compiler that refuses WGSL source, so there the model, the
/// optimiser and clipping take burn's ops instead of our kernels (docs/GPU.md, "A SPIR-V build"). Every caller
/// of a kernel asks this first.
pub fn runs_here(device: &Device) -> bool {
    if !enabled() {
        return false;
    }
    match device.clone().inner().as_dispatch() {
        DispatchDevice::Cube(_) if cfg!(not(feature = "vulkan")) => true,
        DispatchDevice::Cube(cube) => cube.client().name() == "wgpu<wgsl>",
        _ => false,
    }
}

/// Whether our CubeCL kernels (written in cubecl's Rust dialect, `#[cube]`, so cubecl compiles them for the
/// runtime's own compiler: WGSL, or SPIR-V in a `vulkan` build) run on `device`: they are on ([`enabled`]) and it
/// is a device of burn's cubecl backend (wgpu, with or without autodiff). AdamW's kernel is one
/// (`optim_gpu.rs`); the others are still WGSL text ([`runs_here`]).
pub fn cube_runs_here(device: &Device) -> bool {
    enabled() && matches!(device.clone().inner().as_dispatch(), DispatchDevice::Cube(_))
}

/// Tests fill every output with NaN before a launch, so an element a kernel forgets to write fails
/// the comparison instead of passing on whatever the memory pool held.
static POISON: AtomicBool = AtomicBool::new(false);

/// Fill every kernel output with NaN before its launch (for tests), or stop doing so.
pub fn set_poison_outputs(on: bool) {
    POISON.store(on, Ordering::Relaxed);
}

/// A new contiguous f32 or f16 tensor of `shape` on `like`'s device, NaN-filled when poisoning is on.
pub fn output(like: &CubeTensor, shape: Vec<usize>, dtype: DType) -> CubeTensor {
    let elems: usize = shape.iter().product();
    let nan = if dtype == DType::F16 { half::f16::NAN.to_le_bytes().to_vec() } else { f32::NAN.to_le_bytes().to_vec() };
    let handle = if POISON.load(Ordering::Relaxed) {
        like.client.create_from_slice(&nan.repeat(elems))
    } else {
        like.client.empty(elems * nan.len())
    };
    CubeTensor::new_contiguous(like.client.clone(), like.device.clone(), Shape::from(shape), handle, dtype)
}

/// A `[words.len()]` u32 tensor on `like`'s device holding `words`: a kernel's `params` binding.
pub fn words(like: &CubeTensor, words: &[u32]) -> CubeTensor {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    let handle = like.client.create_from_slice(&bytes);
    CubeTensor::new_contiguous(
        like.client.clone(),
        like.device.clone(),
        Shape::from(vec![words.len()]),
        handle,
        DType::U32,
    )
}

/// Launch `kernel` on `buffers[0]`'s client: `workgroup` invocations per workgroup, `count` workgroups, the
/// buffers bound in order (binding 0, 1, ...).
pub fn launch<K: KernelSource + 'static>(kernel: K, workgroup: u32, count: CubeCount, buffers: &[&CubeTensor]) {
    let args = buffers.iter().fold(KernelArguments::new(), |args, t| args.with_buffer(t.handle.clone().binding()));
    buffers[0].client.launch(Box::new(SourceKernel::new(kernel, CubeDim::new_1d(workgroup))), count, args);
}

/// Workgroups per grid dimension (WebGPU's minimum limit).
pub const MAX_GROUPS: u32 = 65_535;

/// `groups` workgroups as a grid of at most [`MAX_GROUPS`] in x and as many rows of those as needed: the
/// kernel numbers them `wid.y * num_workgroups.x + wid.x` and skips (or recomputes harmlessly) those past
/// `groups` in the last row.
pub fn grid(groups: usize) -> CubeCount {
    let groups = u32::try_from(groups).expect("a launch of more than 2^32 workgroups");
    CubeCount::Static(groups.min(MAX_GROUPS), groups.div_ceil(MAX_GROUPS), 1)
}

/// The element type a kernel with an `elem` alias reads and writes for inputs like `t`: f16 where `t` is f16 and
/// the adapter has shader-f16, f32 otherwise (other float types are cast to f32 and the results back).
pub fn storage_dtype(t: &CubeTensor) -> DType {
    let f16 = t.dtype == DType::F16 && t.client.properties().supports_type(ElemType::Float(FloatKind::F16));
    if f16 { DType::F16 } else { DType::F32 }
}

/// `t` as `dtype` (cast only where it differs).
pub fn cast(t: CubeTensor, dtype: DType) -> CubeTensor {
    if t.dtype == dtype { t } else { CubeBackend::float_cast(t, FloatDType::from(dtype)) }
}

/// The WGSL lines that declare `elem`, the storage type of a kernel's data, for `dtype` (f32 or f16).
pub fn elem_header(dtype: DType) -> &'static str {
    if dtype == DType::F16 { "enable f16;\nalias elem = f16;\n" } else { "alias elem = f32;\n" }
}

/// The WGSL of every kernel ov3 compiles, as compiled (constants prepended, files joined), one or more variants
/// each: `(name, source)`. `ov3 info --wgsl FILE` writes them, and the browser test has Chromium's WGSL compiler
/// (Tint, stricter than the naga of native wgpu) compile each one; `core/tests/gpu_ops.rs` checks that every file
/// of `shaders/` is in one.
pub fn every_kernel() -> Vec<(String, String)> {
    let mut all = crate::flash::kernels::sources();
    all.extend(crate::gpu_ops::kernels::sources());
    all
}
