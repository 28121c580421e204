//! Launching the layer norm, softmax, GELU and head-join kernels of `shaders/` on a cubecl (wgpu) tensor's client.

use burn::backend::ops::FloatTensorOps;
use burn::backend::wgpu::{CubeBackend, CubeTensor, KernelSource, SourceTemplate, into_contiguous};
use burn::backend::{DType, TensorMetadata};
use burn::tensor::Shape;
use cubecl::CubeCount;
use cubecl::prelude::KernelId;

use crate::wgsl::{cast, elem_header, grid, output, storage_dtype, words};
use cubecl::ir::{ElemType, FloatKind};

const ROWS: &str = include_str!("../../../shaders/rows_common.wgsl");
const LAYER_NORM: &str = include_str!("../../../shaders/layer_norm_forward.wgsl");
const LAYER_NORM_BACKWARD: &str = include_str!("../../../shaders/layer_norm_backward.wgsl");
const LAYER_NORM_PARAMS: &str = include_str!("../../../shaders/layer_norm_params.wgsl");
const SOFTMAX: &str = include_str!("../../../shaders/softmax_forward.wgsl");
const SOFTMAX_BACKWARD: &str = include_str!("../../../shaders/softmax_backward.wgsl");
const GELU: &str = include_str!("../../../shaders/gelu.wgsl");
const HEADS_JOIN: &str = include_str!("../../../shaders/heads_join.wgsl");
/// Invocations per workgroup of the row kernels (`WG` in rows_common.wgsl) and of layer_norm_params.wgsl.
const WORKGROUP: u32 = 64;
/// Invocations per workgroup of the element-wise kernels (gelu.wgsl, heads_join.wgsl), one element each.
const ELEMENT_WORKGROUP: u32 = 256;
/// Rows per chunk of the parameter gradients' first sum (`CHUNK` in layer_norm_params.wgsl), at least.
const CHUNK_ROWS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Stage {
    LayerNorm,
    LayerNormBackward,
    LayerNormParams,
    Softmax,
    SoftmaxBackward,
    Gelu,
    GeluBackward,
    HeadsJoin,
}

/// One kernel; the row kernels are compiled per row width `d` (each invocation keeps `ceil(d / WORKGROUP)` of
/// a row's values in registers), the element-wise kernels' `d` is 0. `elem` is the storage type of the
/// element-wise kernels' data and of the layer norm's output and upstream gradient: f16 or f32 (the rest f32).
struct GpuOpKernel {
    stage: Stage,
    d: u32,
    f16: bool,
}

impl KernelSource for GpuOpKernel {
    fn source(&self) -> SourceTemplate {
        let elem = elem_header(if self.f16 { DType::F16 } else { DType::F32 });
        let rows = |kernel: &str| {
            let per = self.d.div_ceil(WORKGROUP);
            let header = format!("{elem}const D: u32 = {}u;\nconst PER: u32 = {per}u;\n", self.d);
            SourceTemplate::new(header).add_template(ROWS).add_template(kernel)
        };
        match self.stage {
            Stage::LayerNorm => rows(LAYER_NORM),
            Stage::LayerNormBackward => rows(LAYER_NORM_BACKWARD),
            Stage::LayerNormParams => {
                SourceTemplate::new(format!("{elem}const D: u32 = {}u;\n", self.d)).add_template(LAYER_NORM_PARAMS)
            }
            Stage::Softmax => rows(SOFTMAX),
            Stage::SoftmaxBackward => rows(SOFTMAX_BACKWARD),
            Stage::Gelu | Stage::GeluBackward => {
                let backward = u32::from(self.stage == Stage::GeluBackward);
                SourceTemplate::new(format!("{elem}const BACKWARD: u32 = {backward}u;\n")).add_template(GELU)
            }
            Stage::HeadsJoin => SourceTemplate::new(elem).add_template(HEADS_JOIN),
        }
    }

    fn id(&self) -> KernelId {
        KernelId::new::<Self>().info((self.stage, self.d, self.f16))
    }

    fn lang(&self) -> &'static str {
        "wgsl"
    }
}

/// `f16`: the variant whose `elem` is f16.
fn launch(stage: Stage, d: usize, f16: bool, count: CubeCount, buffers: &[&CubeTensor]) {
    let kernel = GpuOpKernel { stage, d: u32::try_from(d).expect("gpu_ops: rows wider than 2^32"), f16 };
    let element_wise = matches!(stage, Stage::Gelu | Stage::GeluBackward | Stage::HeadsJoin);
    let workgroup = if element_wise { ELEMENT_WORKGROUP } else { WORKGROUP };
    crate::wgsl::launch(kernel, workgroup, count, buffers);
}

/// `(rows, d)` of `x` (the last dim is a row), a non-empty f32 tensor.
fn rows_and_width(x: &CubeTensor) -> (usize, usize) {
    let shape = x.shape();
    let d = shape[shape.num_dims() - 1];
    assert!(d > 0 && shape.num_elements() > 0, "gpu_ops: an empty input {shape:?}");
    assert!(x.dtype == DType::F32, "gpu_ops: the kernels take f32 tensors, not {:?}", x.dtype);
    assert!(u32::try_from(shape.num_elements()).is_ok(), "gpu_ops: more than 2^32 elements");
    (shape.num_elements() / d, d)
}

/// `(rows, d)` of `x`, checking that the layer norm's `gamma` is `[d]` f32.
fn layer_norm_rows(x: &CubeTensor, gamma: &CubeTensor) -> (usize, usize) {
    let (rows, d) = rows_and_width(x);
    assert!(gamma.shape().dims::<1>() == [d], "layer norm: gamma is {:?} for rows of {d}", gamma.shape());
    assert!(gamma.dtype == DType::F32, "layer norm kernels: f32 tensors");
    (rows, d)
}

/// The output (`x`'s shape; f16 with `half`, else f32) and the rows' `[rows, 2]` (mean, rstd).
pub fn layer_norm(
    x: CubeTensor,
    gamma: CubeTensor,
    beta: CubeTensor,
    eps: f64,
    half: bool,
) -> (CubeTensor, CubeTensor) {
    let (rows, d) = layer_norm_rows(&x, &gamma);
    assert!(beta.shape().dims::<1>() == [d] && beta.dtype == DType::F32, "layer norm: beta must be [{d}] f32");
    let [x, gamma, beta] = [x, gamma, beta].map(into_contiguous);
    let params = words(&x, &[rows as u32, (eps as f32).to_bits()]);
    // f16 written by the kernel where the adapter has shader-f16, else f32 cast afterwards.
    let f16 = half && x.client.properties().supports_type(ElemType::Float(FloatKind::F16));
    let y = output(&x, x.shape().to_vec(), if f16 { DType::F16 } else { DType::F32 });
    let stats = output(&x, vec![rows, 2], DType::F32);
    launch(Stage::LayerNorm, d, f16, grid(rows), &[&x, &gamma, &beta, &params, &y, &stats]);
    (if half { cast(y, DType::F16) } else { y }, stats)
}

/// `(dx, dgamma, dbeta)` for the upstream gradient `g`.
pub fn layer_norm_backward(
    x: CubeTensor,
    gamma: CubeTensor,
    stats: CubeTensor,
    g: CubeTensor,
) -> (CubeTensor, CubeTensor, CubeTensor) {
    let (rows, d) = layer_norm_rows(&x, &gamma);
    // The upstream gradient in the forward output's dtype: f16 read as f16 where the adapter has shader-f16.
    let st = storage_dtype(&g);
    let g = cast(g, st);
    let f16 = g.dtype == DType::F16;
    let [x, gamma, stats, g] = [x, gamma, stats, g].map(into_contiguous);
    let rows32 = u32::try_from(rows).expect("layer norm: more than 2^32 rows");
    let dx = output(&x, x.shape().to_vec(), DType::F32);
    launch(Stage::LayerNormBackward, d, f16, grid(rows), &[&x, &gamma, &stats, &g, &words(&x, &[rows32]), &dx]);

    // Chunks of at least CHUNK_ROWS rows, at most 65,535 of them (one grid dimension).
    let chunk = CHUNK_ROWS.max(rows.div_ceil(crate::wgsl::MAX_GROUPS as usize));
    let chunks = rows.div_ceil(chunk);
    let partial = output(&x, vec![chunks, 2, d], DType::F32);
    let count = CubeCount::Static(d.div_ceil(WORKGROUP as usize) as u32, chunks as u32, 1);
    let params = words(&x, &[rows32, chunk as u32]);
    launch(Stage::LayerNormParams, d, f16, count, &[&x, &stats, &g, &params, &partial]);
    let sums = if chunks > 1 { CubeBackend::float_sum_dim(partial, 0) } else { partial };
    let sums = CubeBackend::float_reshape(sums, Shape::from(vec![2, d]));
    let part = |i: usize| {
        let row = CubeBackend::float_slice(sums.clone(), &[burn::tensor::Slice::from(i..i + 1)]);
        CubeBackend::float_reshape(row, Shape::from(vec![d]))
    };
    (dx, part(0), part(1))
}

/// `softmax(scale * x)` over the last dim.
pub fn softmax(x: CubeTensor, scale: f64) -> CubeTensor {
    let (rows, d) = rows_and_width(&x);
    let x = into_contiguous(x);
    let params = words(&x, &[rows as u32, (scale as f32).to_bits()]);
    let y = output(&x, x.shape().to_vec(), DType::F32);
    launch(Stage::Softmax, d, false, grid(rows), &[&x, &params, &y]);
    y
}

/// The input gradient of [`softmax`] from its output `y` and the upstream gradient `g`.
pub fn softmax_backward(y: CubeTensor, g: CubeTensor, scale: f64) -> CubeTensor {
    let (rows, d) = rows_and_width(&y);
    let [y, g] = [y, g].map(into_contiguous);
    let params = words(&y, &[rows as u32, (scale as f32).to_bits()]);
    let dx = output(&y, y.shape().to_vec(), DType::F32);
    launch(Stage::SoftmaxBackward, d, false, grid(rows), &[&y, &g, &params, &dx]);
    dx
}

/// Exact GELU of `x`, or with `g` the gradient `g * GELU'(x)`; f32, or f16 (read and written as f16 where the
/// adapter has shader-f16, else through f32), the result in `x`'s dtype.
pub fn gelu(x: CubeTensor, g: Option<CubeTensor>) -> CubeTensor {
    let n = x.shape().num_elements();
    assert!(n > 0 && u32::try_from(n).is_ok(), "gpu_ops: gelu of {n} elements");
    let (dtype, st) = (x.dtype, storage_dtype(&x));
    let x = into_contiguous(cast(x, st));
    let out = output(&x, x.shape().to_vec(), st);
    let params = words(&x, &[n as u32]);
    let groups = grid(n.div_ceil(ELEMENT_WORKGROUP as usize));
    match g {
        Some(g) => {
            let g = into_contiguous(cast(g, st));
            launch(Stage::GeluBackward, 0, st == DType::F16, groups, &[&x, &g, &params, &out]);
        }
        // The forward never reads g: a one-word buffer of its own stands in (binding x twice would alias two
        // writable bindings, which WebGPU refuses).
        None => launch(Stage::Gelu, 0, st == DType::F16, groups, &[&x, &words(&x, &[0]), &params, &out]),
    }
    cast(out, dtype)
}

/// The gradients of q, k, v `[B, H, N, Dh]` (one shape and float dtype) -> that of the projection they were
/// split from, `[B, N, 3 H Dh]`, in their dtype (f16 read and written as f16 where the adapter has shader-f16;
/// other dtypes through f32).
pub fn heads_join(dq: CubeTensor, dk: CubeTensor, dv: CubeTensor) -> CubeTensor {
    let shape = dq.shape();
    assert!(shape.num_dims() == 4 && dk.shape() == shape && dv.shape() == shape, "heads_join: {shape:?}");
    assert!(dk.dtype == dq.dtype && dv.dtype == dq.dtype, "heads_join: q, k and v gradients of one dtype");
    let [b, h, n, dh] = [shape[0], shape[1], shape[2], shape[3]];
    let total = 3 * shape.num_elements();
    assert!(total > 0 && u32::try_from(total).is_ok(), "heads_join: {total} elements");
    let (dtype, st) = (dq.dtype, storage_dtype(&dq));
    let [dq, dk, dv] = [dq, dk, dv].map(|t| into_contiguous(cast(t, st)));
    let out = output(&dq, vec![b, n, 3 * h * dh], st);
    let params = words(&dq, &[n as u32, h as u32, dh as u32, total as u32]);
    let groups = grid(total.div_ceil(ELEMENT_WORKGROUP as usize));
    launch(Stage::HeadsJoin, 0, st == DType::F16, groups, &[&dq, &dk, &dv, &params, &out]);
    cast(out, dtype)
}

/// Every kernel's WGSL as compiled (rows of 1, 64, 192 and 300 values: narrower and wider than a workgroup, and
/// a ragged last share; GELU and the head join in f32 and f16): `(name, source)`, for `wgsl::every_kernel`.
pub(crate) fn sources() -> Vec<(String, String)> {
    let rows =
        [Stage::LayerNorm, Stage::LayerNormBackward, Stage::LayerNormParams, Stage::Softmax, Stage::SoftmaxBackward];
    let row_kernels = rows.into_iter().flat_map(|stage| [1, 64, 192, 300].map(|d| (stage, d, false)));
    // The layer norm with f16 output and upstream gradient (mixed precision's blocks).
    let half_norms =
        [Stage::LayerNorm, Stage::LayerNormBackward, Stage::LayerNormParams].map(|stage| (stage, 64, true));
    let row_kernels = row_kernels.chain(half_norms);
    let element_wise = [Stage::Gelu, Stage::GeluBackward, Stage::HeadsJoin];
    let gelu = element_wise.into_iter().flat_map(|stage| [false, true].map(|f16| (stage, 0, f16)));
    row_kernels
        .chain(gelu)
        .map(|(stage, d, f16)| {
            let name = format!("gpu_ops {stage:?} d={d}{}", if f16 { " f16" } else { "" });
            (name, GpuOpKernel { stage, d, f16 }.source().complete())
        })
        .collect()
}
