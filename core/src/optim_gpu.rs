//! The optimiser's kernels on burn's cubecl backends (CubeCL kernels below, so cubecl compiles them to WGSL or, in a
//! `vulkan` build, SPIR-V): AdamW's update in one kernel per parameter (in place where the optimiser owns the
//! parameter and its moments, as a training step does: no new buffers; several parameters a launch on a card), and
//! the squared norm for global grad-norm clipping, dozens of gradients a launch.
//!
//! burn's `AdamW` updates each parameter with about a dozen element-wise tensor ops, each its own GPU
//! dispatch; with ~250 parameter tensors that was some 3,000 of a tiny training step's ~8,000 kernel
//! launches (`ov3 bench step --kernels count`), and on a GPU a launch costs microseconds whatever it
//! carries (docs/PERFORMANCE.md "Kernel launches per step"). Clipping's `g.square().sum()` plus the running add
//! was four launches per parameter more. [`optim::AdamW`](crate::optim::AdamW) calls [`adamw`] for f32
//! parameters on a wgpu device, as it calls `cpu_ops::adamw` on flex; its state is burn's either way;
//! [`optim::clip_grad_norm`](crate::optim::clip_grad_norm) calls [`sum_squares_add`].
//! `core/tests/optim_gpu.rs` checks both against float64 code, and AdamW against burn's AdamW.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU8, Ordering};

use burn::backend::tensor::FloatTensor;
use burn::backend::wgpu::{CubeBackend, CubeDim, CubeTensor, into_contiguous};
use burn::backend::{Backend, DType, Dispatch, TensorMetadata, backend_extension};
use burn::tensor::Tensor;
use cubecl::CubeCount;
use cubecl::client::Client;
use cubecl::prelude::SequenceArg;

pub use crate::cpu_ops::AdamWStep;

/// Invocations per workgroup (`WG` in the shader).
const WORKGROUP: u32 = 256;

/// The kernels on the backend that runs them: cubecl's, or (with burn's `fusion` feature) the fusion backend
/// around it, which queues them as opaque operations.
#[backend_extension(Cube, Fusion: cfg(feature = "fusion"))]
pub trait OptimKernels: Backend {
    /// `(param, moment_1, moment_2)` after one AdamW step with `grad`; all f32, of one shape.
    #[fusion(meta = |param, _grad, moment_1, moment_2, _step| (param.clone(), moment_1.clone(), moment_2.clone()))]
    fn adamw_step(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
        step: AdamWStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// Adds to `acc[1 + u]` the squares of elements `u, u + U, u + 2U, ..` of each of the first `used` of `x0..x15`
    /// (f32; the others are ignored), `U = acc.len() - 1` units (whole workgroups), in one launch that writes over
    /// `acc` ([`sum_squares_add`]'s partial sums; `acc[0]` untouched). Sixteen slots, not a `Vec`: burn's extension
    /// macro takes tensors one argument each.
    #[allow(clippy::too_many_arguments)]
    #[fusion(meta = |_x0, _x1, _x2, _x3, _x4, _x5, _x6, _x7, _x8, _x9, _x10, _x11, _x12, _x13, _x14, _x15, acc, _used| acc.clone())]
    fn sum_squares_add(
        x0: FloatTensor<Self>,
        x1: FloatTensor<Self>,
        x2: FloatTensor<Self>,
        x3: FloatTensor<Self>,
        x4: FloatTensor<Self>,
        x5: FloatTensor<Self>,
        x6: FloatTensor<Self>,
        x7: FloatTensor<Self>,
        x8: FloatTensor<Self>,
        x9: FloatTensor<Self>,
        x10: FloatTensor<Self>,
        x11: FloatTensor<Self>,
        x12: FloatTensor<Self>,
        x13: FloatTensor<Self>,
        x14: FloatTensor<Self>,
        x15: FloatTensor<Self>,
        acc: FloatTensor<Self>,
        used: usize,
    ) -> FloatTensor<Self>;

    /// `acc[0] = sum(acc[1..])` in one launch that writes over `acc` (the partial sums' total; `acc[1..]` is left
    /// holding scratch).
    #[fusion(meta = |acc| acc.clone())]
    fn sum_squares_total(acc: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// Gradients per launch of the sum-of-squares kernel at most ([`OptimKernels::sum_squares_add`]'s slots): a compiled
/// kernel per count up to it.
pub const SUM_SQUARES_MAX: usize = 16;

/// Whether [`sum_squares_add`] takes `x`: a non-empty f32 tensor on a cubecl device. A CubeCL kernel: it runs under a
/// `vulkan` build's SPIR-V too ([`crate::wgsl::cube_runs_here`]).
pub fn supports_sum_squares<const D: usize>(x: &Tensor<D>) -> bool {
    x.dtype() == DType::F32 && x.shape().num_elements() > 0 && crate::wgsl::cube_runs_here(&x.device())
}

/// How many gradients one launch of [`sum_squares_add`] takes on `device`: the adapter's storage buffers per shader
/// stage less the running total's and cubecl's own (the tensors' lengths), at most [`SUM_SQUARES_MAX`]; WebGPU's
/// minimum of 8 (the browser's) gives 5. 1 off cubecl.
pub fn sum_squares_per_launch(device: &burn::tensor::Device) -> usize {
    match device.clone().inner().as_dispatch() {
        burn::backend::DispatchDevice::Cube(cube) => {
            (cube.client().properties().hardware.max_bindings.saturating_sub(2) as usize).clamp(1, SUM_SQUARES_MAX)
        }
        _ => 1,
    }
}

/// Workgroups of the sum of squares at most: each of its units keeps a partial sum (`1 + 256 x this` f32 in all).
pub const SUM_SQUARES_GROUPS: usize = 128;

/// `acc + sum(x^2)` over every element of every tensor of `xs` (`acc`: `[1]`, f32, left as it is; none is a zero),
/// in a kernel launch per [`sum_squares_per_launch`] of them and one more for the total. Each launch spreads its
/// gradients over the same units, up to [`SUM_SQUARES_GROUPS`] workgroups' worth (about 64K elements a workgroup),
/// each unit adding its elements' squares to a partial sum of its own across the launches; the last launch adds
/// the partial sums up in a fixed order (the same bits every run). Call only where [`supports_sum_squares`] holds
/// for each.
pub fn sum_squares_add(xs: &[Tensor<1>], acc: Option<Tensor<1>>) -> Tensor<1> {
    let first = xs.first().expect("sum_squares_add: no tensors");
    let elements: usize = xs.iter().map(|x| x.shape().num_elements()).sum();
    let groups = elements.div_ceil(WORKGROUP as usize * 256).clamp(1, SUM_SQUARES_GROUPS);
    // The total and the units' partial sums: one fill, then every launch adds to the partials.
    let mut running = Tensor::<1>::zeros([1 + groups * WORKGROUP as usize], &first.device());
    for group in xs.chunks(sum_squares_per_launch(&first.device())) {
        // Unused slots repeat the group's first tensor (the kernel reads only the first `used`).
        let x = |i: usize| group.get(i).unwrap_or(&group[0]).clone().into_dispatch();
        running = Tensor::from_dispatch(<Dispatch as OptimKernels>::sum_squares_add(
            x(0),
            x(1),
            x(2),
            x(3),
            x(4),
            x(5),
            x(6),
            x(7),
            x(8),
            x(9),
            x(10),
            x(11),
            x(12),
            x(13),
            x(14),
            x(15),
            running.into_dispatch(),
            group.len(),
        ));
    }
    let running = Tensor::<1>::from_dispatch(<Dispatch as OptimKernels>::sum_squares_total(running.into_dispatch()));
    let total = running.slice([0..1]);
    match acc {
        Some(acc) => total + acc,
        None => total,
    }
}

/// Whether [`adamw`] can step `param` with `grad`: f32 tensors on a wgpu device (the optimiser's tensors
/// are plain, not autodiff), not empty. A CubeCL kernel: it runs under a `vulkan` build's SPIR-V too
/// ([`crate::wgsl::cube_runs_here`]).
pub fn supports<const D: usize>(param: &Tensor<D>, grad: &Tensor<D>) -> bool {
    param.dtype() == DType::F32
        && grad.dtype() == DType::F32
        && param.shape().num_elements() > 0
        && crate::wgsl::cube_runs_here(&param.device())
}

/// One AdamW step in one kernel: `(param, moment_1, moment_2)` after it. Call only where [`supports`]
/// holds, with f32 moments of `param`'s shape.
pub fn adamw<const D: usize>(
    step: AdamWStep,
    param: Tensor<D>,
    grad: Tensor<D>,
    moment_1: Tensor<D>,
    moment_2: Tensor<D>,
) -> (Tensor<D>, Tensor<D>, Tensor<D>) {
    let (p, m, v) = <Dispatch as OptimKernels>::adamw_step(
        param.into_dispatch(),
        grad.into_dispatch(),
        moment_1.into_dispatch(),
        moment_2.into_dispatch(),
        step,
    );
    (Tensor::from_dispatch(p), Tensor::from_dispatch(m), Tensor::from_dispatch(v))
}

/// The CubeCL kernels (cubecl's Rust dialect; `Tensor` here is cubecl's).
mod cube {
    use cubecl::prelude::*;

    /// One AdamW step on one parameter tensor, an element per unit: the same arithmetic as the CPU kernel
    /// (`kernels/src/lib.rs` `adamw`), in f32, with `g = grad_scale * grad` (clipping's factor over the loss scale, so
    /// clipping needs no pass of its own over the gradient):
    ///   `m' = b1 m + (1 - b1) g,  v' = b2 v + (1 - b2) g^2,  p' = decay p - lr (m' / c1) / (sqrt(v' / c2) + eps)`.
    /// A CubeCL kernel, not WGSL text, so cubecl compiles it for whichever runtime the device has (WGSL, or SPIR-V
    /// in a `vulkan` build); it writes new tensors (burn's pool may share the inputs).
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_kernel(
        param: &Tensor<f32>,
        grad: &Tensor<f32>,
        moment_1: &Tensor<f32>,
        moment_2: &Tensor<f32>,
        param_out: &mut Tensor<f32>,
        moment_1_out: &mut Tensor<f32>,
        moment_2_out: &mut Tensor<f32>,
        h: AdamWScalars,
    ) {
        let i = ABSOLUTE_POS;
        if i >= param_out.len() {
            terminate!();
        }
        let next = adamw_element(param[i], grad[i], moment_1[i], moment_2[i], &h);
        param_out[i] = next.param;
        moment_1_out[i] = next.moment_1;
        moment_2_out[i] = next.moment_2;
    }

    /// [`adamw_kernel`] writing its results over its inputs: for a parameter and moments that nothing else holds
    /// (burn's optimiser moves them in, so this is the training step's case), no new buffers and 4 bindings
    /// instead of 7. The same arithmetic ([`adamw_element`]), each element read before it is written.
    #[cube(launch)]
    pub fn adamw_in_place_kernel(
        param: &mut Tensor<f32>,
        grad: &Tensor<f32>,
        moment_1: &mut Tensor<f32>,
        moment_2: &mut Tensor<f32>,
        h: AdamWScalars,
    ) {
        let i = ABSOLUTE_POS;
        if i >= param.len() {
            terminate!();
        }
        let next = adamw_element(param[i], grad[i], moment_1[i], moment_2[i], &h);
        param[i] = next.param;
        moment_1[i] = next.moment_1;
        moment_2[i] = next.moment_2;
    }

    /// [`adamw_in_place_kernel`] on several parameters at once (one launch where a step of a small model would
    /// make one per tensor, most of them a few hundred elements). Each parameter has whole workgroups, in order:
    /// workgroup `c` steps elements `c * CUBE_DIM ..` of the parameter its place falls in, so which parameter a unit
    /// steps is the same for its whole workgroup (no divergence at parameter boundaries, and the loads' index is the
    /// unit's position plus a workgroup-uniform offset). The parameters share one step's scalars.
    #[cube(launch)]
    pub fn adamw_in_place_gathered_kernel(
        param: &mut Sequence<OwnedTensor<f32>>,
        grad: &Sequence<OwnedTensor<f32>>,
        moment_1: &mut Sequence<OwnedTensor<f32>>,
        moment_2: &mut Sequence<OwnedTensor<f32>>,
        h: AdamWScalars,
    ) {
        let units = CUBE_DIM as usize;
        let mut cube = CUBE_POS;
        let mut todo = true;
        #[unroll]
        for k in 0..param.len() {
            let n = param.index(k).len();
            let cubes = (n + units - 1) / units;
            if todo {
                if cube < cubes {
                    let i = cube * units + UNIT_POS as usize;
                    if i < n {
                        let g = grad.index(k);
                        let p = param.index_mut(k);
                        let m = moment_1.index_mut(k);
                        let v = moment_2.index_mut(k);
                        let next = adamw_element(p[i], g[i], m[i], v[i], &h);
                        p[i] = next.param;
                        m[i] = next.moment_1;
                        v[i] = next.moment_2;
                    }
                    todo = false;
                } else {
                    cube -= cubes;
                }
            }
        }
    }

    /// Global grad-norm clipping's squared norm, first part (`optim::clip_grad_norm` on a cubecl device, through
    /// [`super::sum_squares_add`]): unit `u` of the launch's `U` adds the squares of elements `u, u + U, ..` of every
    /// tensor of `xs` to its partial sum `acc[1 + u]`. Every unit walks every tensor (no divergence); a launch per
    /// [`super::sum_squares_per_launch`] gradients, each adding to the partial sums the last one left. burn's full
    /// `sum` is a fill and an atomic sum after the square, plus an add for the running total: four launches per
    /// gradient instead of one per dozens.
    #[cube(launch)]
    pub fn sum_squares_add_kernel(xs: &Sequence<OwnedTensor<f32>>, acc: &mut Tensor<f32>) {
        let unit = ABSOLUTE_POS;
        let units = acc.len() - 1;
        let mut s = 0.0f32;
        #[unroll]
        for k in 0..xs.len() {
            let x = xs.index(k);
            let n = x.len();
            let mut i = unit;
            while i < n {
                let v = x[i];
                s += v * v;
                i += units;
            }
        }
        acc[1 + unit] = acc[1 + unit] + s;
    }

    /// Second part: `acc[0] = sum(acc[1..])`, in one workgroup of `workgroup` units: unit `l` adds the partial sums
    /// `l, l + workgroup, ..` and leaves the sum in its own first slot, then, after a storage barrier, the first
    /// unit adds those `workgroup` sums in order. In the output buffer, not workgroup memory: cubecl's SPIR-V
    /// compiler (0.11.3) emits invalid SPIR-V for workgroup memory on a driver without `VK_KHR_workgroup_memory_
    /// explicit_layout` (lavapipe; docs/GPU.md "A SPIR-V build").
    #[cube(launch)]
    pub fn sum_squares_total_kernel(acc: &mut Tensor<f32>, #[comptime] workgroup: usize) {
        let lane = UNIT_POS as usize;
        let n = acc.len() - 1;
        let mut s = 0.0f32;
        let mut i = lane;
        while i < n {
            s += acc[1 + i];
            i += workgroup;
        }
        acc[1 + lane] = s;
        sync_storage();
        if lane == 0 {
            let mut total = 0.0f32;
            for j in 0..workgroup {
                total += acc[1 + j];
            }
            acc[0] = total;
        }
    }

    /// One element's step, the arithmetic both kernels share (see [`adamw_kernel`]).
    #[cube]
    fn adamw_element(param: f32, grad: f32, moment_1: f32, moment_2: f32, h: &AdamWScalars) -> Stepped {
        let g = h.grad_scale * grad;
        let m = h.beta_1 * moment_1 + (1.0 - h.beta_1) * g;
        let v = h.beta_2 * moment_2 + (1.0 - h.beta_2) * (g * g);
        let delta = (m / h.correction_1) / (f32::sqrt(v / h.correction_2) + h.epsilon);
        Stepped { param: h.decay * param - h.lr * delta, moment_1: m, moment_2: v }
    }

    /// [`adamw_element`]'s result.
    #[derive(CubeType)]
    struct Stepped {
        param: f32,
        moment_1: f32,
        moment_2: f32,
    }

    /// [`super::AdamWStep`]'s numbers as the kernel's runtime scalars (a cubecl launch type: the CPU kernels'
    /// crate, where `AdamWStep` lives, does not depend on cubecl).
    #[derive(CubeLaunch, CubeType, Clone, Copy)]
    pub struct AdamWScalars {
        pub lr: f32,
        pub beta_1: f32,
        pub beta_2: f32,
        pub epsilon: f32,
        pub decay: f32,
        pub correction_1: f32,
        pub correction_2: f32,
        pub grad_scale: f32,
    }
}

impl OptimKernels for CubeBackend {
    fn adamw_step(
        param: CubeTensor,
        grad: CubeTensor,
        moment_1: CubeTensor,
        moment_2: CubeTensor,
        step: AdamWStep,
    ) -> (CubeTensor, CubeTensor, CubeTensor) {
        let shape = param.shape();
        let n = shape.num_elements();
        for (what, t) in [("gradient", &grad), ("moment 1", &moment_1), ("moment 2", &moment_2)] {
            assert!(t.shape() == shape, "adamw: the {what} is {:?}, the parameter {shape:?}", t.shape());
        }
        assert!(
            [&param, &grad, &moment_1, &moment_2].iter().all(|t| t.dtype == DType::F32),
            "adamw: the kernel steps f32 tensors"
        );
        let [param, grad, moment_1, moment_2] = [param, grad, moment_1, moment_2].map(into_contiguous);
        let client = param.client.clone();
        // In place where nothing else holds the parameter or its moments (contiguous now; each its own buffer and
        // the gradient another: burn's pool never hands one buffer to two live handles, and a view shares its
        // tensor's handle, so a tensor with a live view is not `can_mut`). Inside [`gathered`] the update waits
        // to share a launch with the next parameters'.
        if param.can_mut() && moment_1.can_mut() && moment_2.can_mut() {
            let tensors = [param.clone(), grad, moment_1.clone(), moment_2.clone()];
            if let Some(tensors) = gather(tensors, step) {
                launch_in_place(vec![tensors], step);
            }
            return (param, moment_1, moment_2);
        }
        let cube_dim = CubeDim::new_1d(WORKGROUP);
        let grid = crate::wgsl::grid(n.div_ceil(WORKGROUP as usize));
        let output = || {
            let handle = client.empty(n * 4);
            CubeTensor::new_contiguous(client.clone(), param.device.clone(), shape.clone(), handle, DType::F32)
        };
        let (p_out, m_out, v_out) = (output(), output(), output());
        cube::adamw_kernel::launch(
            &client,
            grid,
            cube_dim,
            param.into_tensor_arg(),
            grad.into_tensor_arg(),
            moment_1.into_tensor_arg(),
            moment_2.into_tensor_arg(),
            p_out.clone().into_tensor_arg(),
            m_out.clone().into_tensor_arg(),
            v_out.clone().into_tensor_arg(),
            scalars(step),
        );
        (p_out, m_out, v_out)
    }

    fn sum_squares_add(
        x0: CubeTensor,
        x1: CubeTensor,
        x2: CubeTensor,
        x3: CubeTensor,
        x4: CubeTensor,
        x5: CubeTensor,
        x6: CubeTensor,
        x7: CubeTensor,
        x8: CubeTensor,
        x9: CubeTensor,
        x10: CubeTensor,
        x11: CubeTensor,
        x12: CubeTensor,
        x13: CubeTensor,
        x14: CubeTensor,
        x15: CubeTensor,
        acc: CubeTensor,
        used: usize,
    ) -> CubeTensor {
        assert!((1..=SUM_SQUARES_MAX).contains(&used), "sum_squares_add: {used} tensors used of {SUM_SQUARES_MAX}");
        let mut xs = vec![x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15];
        xs.truncate(used);
        assert!(xs.iter().all(|x| x.dtype == DType::F32) && acc.dtype == DType::F32, "sum_squares_add: f32 tensors");
        let units = acc.shape().num_elements().saturating_sub(1);
        assert!(
            units > 0 && units.is_multiple_of(WORKGROUP as usize),
            "sum_squares_add: acc must hold 1 + a multiple of {WORKGROUP} values, not {:?}",
            acc.shape()
        );
        let acc = in_place(acc);
        let mut sequence = SequenceArg::new();
        for x in xs {
            sequence.push(into_contiguous(x).into_tensor_arg());
        }
        cube::sum_squares_add_kernel::launch(
            &acc.client,
            crate::wgsl::grid(units / WORKGROUP as usize),
            CubeDim::new_1d(WORKGROUP),
            sequence,
            acc.clone().into_tensor_arg(),
        );
        acc
    }

    fn sum_squares_total(acc: CubeTensor) -> CubeTensor {
        let units = acc.shape().num_elements().saturating_sub(1);
        assert!(units >= WORKGROUP as usize, "sum_squares_total: acc must hold 1 + {WORKGROUP} values or more");
        let acc = in_place(acc);
        cube::sum_squares_total_kernel::launch(
            &acc.client,
            CubeCount::Static(1, 1, 1),
            CubeDim::new_1d(WORKGROUP),
            acc.clone().into_tensor_arg(),
            WORKGROUP as usize,
        );
        acc
    }
}

/// `t` (f32) contiguous and held by nothing else, for a kernel that writes over it: copied where it is shared.
fn in_place(t: CubeTensor) -> CubeTensor {
    let t = into_contiguous(t);
    if t.can_mut() { t } else { t.copy() }
}

/// [`super::AdamWStep`]'s numbers for a launch.
fn scalars(step: AdamWStep) -> cube::AdamWScalarsLaunch {
    cube::AdamWScalarsLaunch::new(
        step.lr,
        step.beta_1,
        step.beta_2,
        step.epsilon,
        step.decay,
        step.correction_1,
        step.correction_2,
        step.grad_scale,
    )
}

/// Parameters per launch of [`cube::adamw_in_place_gathered_kernel`] at most: a compiled kernel per count up to it.
pub const GATHER_MAX: usize = 16;

/// Whether AdamW's in-place updates share launches ([`gathered`]): `OV3_ADAMW_GATHER`, or [`set_gather`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gather {
    /// On a card (a GPU: launches cost microseconds whatever they carry), not on a CPU adapter (lavapipe,
    /// SwiftShader, WARP), the default. On lavapipe a launch is cheap and a shared launch is not: launches of 7
    /// took 3.4x the device time of the 239 launches they replaced (the tiny step's AdamW: 244 against 71 ms,
    /// `ov3 bench step --kernels time`), as if its SIMD lanes ran every parameter's branch of the kernel, masked.
    Auto,
    /// Wherever the adapter's bindings allow two parameters a launch (the tests run the kernel on lavapipe so).
    On,
    /// One launch per parameter.
    Off,
}

/// 0: not decided yet (`OV3_ADAMW_GATHER` decides at the first use), else 1 + the [`Gather`] in use.
static GATHER: AtomicU8 = AtomicU8::new(0);

/// Sets [`Gather`] for the process (over `OV3_ADAMW_GATHER`); returns the one it replaces.
pub fn set_gather(mode: Gather) -> Gather {
    let before = gather_mode();
    GATHER.store(1 + mode as u8, Ordering::Relaxed);
    before
}

/// `OV3_ADAMW_GATHER`'s value: `auto`, `on` or `off`, or an error that says what it accepts.
pub fn parse_gather(value: &str) -> Result<Gather, String> {
    match value.trim() {
        "" | "auto" => Ok(Gather::Auto),
        "on" => Ok(Gather::On),
        "off" => Ok(Gather::Off),
        other => Err(format!("OV3_ADAMW_GATHER must be auto, on or off, not {other:?}")),
    }
}

/// The [`Gather`] in use; an unset or invalid `OV3_ADAMW_GATHER` is [`Gather::Auto`] (the `ov3` commands refuse an
/// invalid one before they get here).
pub fn gather_mode() -> Gather {
    match GATHER.load(Ordering::Relaxed) {
        0 => {
            let env = std::env::var("OV3_ADAMW_GATHER").ok();
            let mode = env.and_then(|v| parse_gather(&v).ok()).unwrap_or(Gather::Auto);
            GATHER.store(1 + mode as u8, Ordering::Relaxed);
            mode
        }
        2 => Gather::On,
        3 => Gather::Off,
        _ => Gather::Auto,
    }
}

/// How many parameters' in-place updates one launch on `device` takes ([`gathered`]): four tensors each within the
/// adapter's storage buffers per shader stage, one of them left for cubecl's own (the scalars and the tensors'
/// lengths); at most [`GATHER_MAX`]. 1 where [`Gather`] says not to gather, on WebGPU's minimum of 8 (the
/// browser's), under burn's fusion ([`per_launch`]) and off wgpu: a launch each there.
pub fn params_per_launch(device: &burn::tensor::Device) -> usize {
    let inner = device.clone().inner();
    match inner.as_dispatch() {
        burn::backend::DispatchDevice::Cube(cube) => per_launch(&cube.client()),
        _ => 1,
    }
}

/// [`params_per_launch`] on `client`'s device. burn's fusion runs our kernels from its own queue, each as it comes.
/// The kernel is CubeCL, so a `vulkan` build's SPIR-V runs it too (`gathered_adamw_matches_f64` passes there on
/// lavapipe, with `on`).
fn per_launch(client: &Client) -> usize {
    let card = client.properties().identity.physical.is_some();
    let gather = match gather_mode() {
        Gather::Auto => card,
        Gather::On => true,
        Gather::Off => false,
    };
    if !gather || cfg!(feature = "fusion") {
        return 1;
    }
    (client.properties().hardware.max_bindings.saturating_sub(1) as usize / 4).clamp(1, GATHER_MAX)
}

/// In-place AdamW updates waiting for a launch ([`gathered`]): `[param, grad, moment_1, moment_2]` of each, by the
/// step's scalars (weight decay differs between two groups of parameters, which a model's order interleaves) and
/// device.
type Gathering = Vec<(AdamWStep, Vec<[CubeTensor; 4]>)>;

thread_local! {
    /// Inside [`gathered`] on this thread, what waits for a launch; `None` outside it.
    static GATHERING: RefCell<Option<Gathering>> = const { RefCell::new(None) };
}

/// Runs `f` (one optimiser step over a model's parameters) with AdamW's in-place updates gathered into launches of
/// up to [`params_per_launch`] parameters that share the step's scalars, instead of one launch each. Every update has
/// been launched when it returns, so whatever reads the parameters afterwards sees them stepped; nothing inside
/// `f` may read a parameter after handing it to AdamW (an optimiser does not). Where [`per_launch`] is 1 (burn's
/// fusion, a CPU adapter by default) each launches at once. Nested calls gather on their own.
pub fn gathered<R>(f: impl FnOnce() -> R) -> R {
    struct Flush(Option<Gathering>);
    impl Drop for Flush {
        fn drop(&mut self) {
            let mine = GATHERING.replace(self.0.take());
            if !std::thread::panicking() {
                for (step, pending) in mine.into_iter().flatten() {
                    launch_in_place(pending, step);
                }
            }
        }
    }
    let _flush = Flush(GATHERING.replace(Some(Vec::new())));
    f()
}

/// Queues an in-place update inside [`gathered`] with those of the same scalars and device, launching them when the
/// launch is full. Gives the tensors back outside [`gathered`], or where a launch takes one parameter only.
fn gather(tensors: [CubeTensor; 4], step: AdamWStep) -> Option<[CubeTensor; 4]> {
    GATHERING.with_borrow_mut(|gathering| {
        let Some(gathering) = gathering else { return Some(tensors) };
        let capacity = per_launch(&tensors[0].client);
        if capacity == 1 {
            return Some(tensors);
        }
        let device = &tensors[0].device;
        let joins =
            |(s, p): &(AdamWStep, Vec<[CubeTensor; 4]>)| *s == step && p.first().is_none_or(|t| t[0].device == *device);
        let at = match gathering.iter().position(joins) {
            Some(at) => at,
            None => {
                gathering.push((step, Vec::new()));
                gathering.len() - 1
            }
        };
        let pending = &mut gathering[at].1;
        pending.push(tensors);
        if pending.len() >= capacity {
            launch_in_place(std::mem::take(pending), step);
        }
        None
    })
}

/// One launch stepping each `[param, grad, moment_1, moment_2]` of `tensors` in place (contiguous f32, one device).
fn launch_in_place(tensors: Vec<[CubeTensor; 4]>, step: AdamWStep) {
    if tensors.is_empty() {
        return;
    }
    let client = tensors[0][0].client.clone();
    let cube_dim = CubeDim::new_1d(WORKGROUP);
    let workgroups: usize = tensors.iter().map(|t| t[0].shape().num_elements().div_ceil(WORKGROUP as usize)).sum();
    let grid = crate::wgsl::grid(workgroups);
    if let [[param, grad, moment_1, moment_2]] = &tensors[..] {
        let arg = |t: &CubeTensor| t.clone().into_tensor_arg();
        cube::adamw_in_place_kernel::launch(
            &client,
            grid,
            cube_dim,
            arg(param),
            arg(grad),
            arg(moment_1),
            arg(moment_2),
            scalars(step),
        );
        return;
    }
    let sequence = |which: usize| {
        let mut seq = SequenceArg::new();
        for t in &tensors {
            seq.push(t[which].clone().into_tensor_arg());
        }
        seq
    };
    cube::adamw_in_place_gathered_kernel::launch(
        &client,
        grid,
        cube_dim,
        sequence(0),
        sequence(1),
        sequence(2),
        sequence(3),
        scalars(step),
    );
}
