//! Launching the layer norm kernels of `shaders/` on a cubecl (wgpu) tensor's client.

use burn::backend::ops::FloatTensorOps;
use burn::backend::wgpu::{
    CubeBackend, CubeDim, CubeTensor, KernelSource, SourceKernel, SourceTemplate, into_contiguous,
};
use burn::backend::{DType, TensorMetadata};
use burn::tensor::Shape;
use cubecl::CubeCount;
use cubecl::prelude::KernelId;
use cubecl::server::KernelArguments;

use crate::wgsl::{grid, output, words};

const COMMON: &str = include_str!("../../../shaders/layer_norm_common.wgsl");
const FORWARD: &str = include_str!("../../../shaders/layer_norm_forward.wgsl");
const BACKWARD: &str = include_str!("../../../shaders/layer_norm_backward.wgsl");
const PARAMS: &str = include_str!("../../../shaders/layer_norm_params.wgsl");
/// Invocations per workgroup (`WG` in the shaders).
const WORKGROUP: u32 = 64;
/// Rows per chunk of the parameter gradients' first sum (`CHUNK` in layer_norm_params.wgsl), at least.
const CHUNK_ROWS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Stage {
    Forward,
    Backward,
    Params,
}

/// One kernel, compiled per row width `d`: each invocation keeps `ceil(d / WORKGROUP)` of a row's values
/// in registers.
struct NormKernel {
    stage: Stage,
    d: u32,
}

impl KernelSource for NormKernel {
    fn source(&self) -> SourceTemplate {
        let header = format!("const D: u32 = {}u;\nconst PER: u32 = {}u;\n", self.d, self.d.div_ceil(WORKGROUP));
        match self.stage {
            Stage::Forward => SourceTemplate::new(header).add_template(COMMON).add_template(FORWARD),
            Stage::Backward => SourceTemplate::new(header).add_template(COMMON).add_template(BACKWARD),
            Stage::Params => SourceTemplate::new(header).add_template(PARAMS),
        }
    }

    fn id(&self) -> KernelId {
        KernelId::new::<Self>().info((self.stage, self.d))
    }

    fn lang(&self) -> &'static str {
        "wgsl"
    }
}

fn launch(stage: Stage, d: usize, count: CubeCount, buffers: &[&CubeTensor]) {
    let client = &buffers[0].client;
    let args = buffers.iter().fold(KernelArguments::new(), |args, t| args.with_buffer(t.handle.clone().binding()));
    let kernel = NormKernel { stage, d: u32::try_from(d).expect("layer norm: rows wider than 2^32") };
    client.launch(Box::new(SourceKernel::new(kernel, CubeDim::new_1d(WORKGROUP))), count, args);
}

/// `(rows, d)` of `x` (the last dim is a row), checking that the parameters are `[d]` f32.
fn rows_and_width(x: &CubeTensor, gamma: &CubeTensor) -> (usize, usize) {
    let shape = x.shape();
    let d = shape[shape.num_dims() - 1];
    assert!(d > 0 && shape.num_elements() > 0, "layer norm kernels: an empty input {shape:?}");
    assert!(gamma.shape().dims::<1>() == [d], "layer norm: gamma is {:?} for rows of {d}", gamma.shape());
    assert!(x.dtype == DType::F32 && gamma.dtype == DType::F32, "layer norm kernels: f32 tensors");
    (shape.num_elements() / d, d)
}

/// The output (`x`'s shape) and the rows' `[rows, 2]` (mean, rstd).
pub fn forward(x: CubeTensor, gamma: CubeTensor, beta: CubeTensor, eps: f64) -> (CubeTensor, CubeTensor) {
    let (rows, d) = rows_and_width(&x, &gamma);
    assert!(beta.shape().dims::<1>() == [d] && beta.dtype == DType::F32, "layer norm: beta must be [{d}] f32");
    let [x, gamma, beta] = [x, gamma, beta].map(into_contiguous);
    let params = words(&x, &[rows as u32, (eps as f32).to_bits()]);
    let y = output(&x, x.shape().to_vec(), DType::F32);
    let stats = output(&x, vec![rows, 2], DType::F32);
    launch(Stage::Forward, d, grid(rows), &[&x, &gamma, &beta, &params, &y, &stats]);
    (y, stats)
}

/// `(dx, dgamma, dbeta)` for the upstream gradient `g`.
pub fn backward(
    x: CubeTensor,
    gamma: CubeTensor,
    stats: CubeTensor,
    g: CubeTensor,
) -> (CubeTensor, CubeTensor, CubeTensor) {
    let (rows, d) = rows_and_width(&x, &gamma);
    let [x, gamma, stats, g] = [x, gamma, stats, g].map(into_contiguous);
    let rows32 = u32::try_from(rows).expect("layer norm: more than 2^32 rows");
    let dx = output(&x, x.shape().to_vec(), DType::F32);
    launch(Stage::Backward, d, grid(rows), &[&x, &gamma, &stats, &g, &words(&x, &[rows32]), &dx]);

    // Chunks of at least CHUNK_ROWS rows, at most 65,535 of them (one grid dimension).
    let chunk = CHUNK_ROWS.max(rows.div_ceil(crate::wgsl::MAX_GROUPS as usize));
    let chunks = rows.div_ceil(chunk);
    let partial = output(&x, vec![chunks, 2, d], DType::F32);
    let count = CubeCount::Static(d.div_ceil(WORKGROUP as usize) as u32, chunks as u32, 1);
    launch(Stage::Params, d, count, &[&x, &stats, &g, &words(&x, &[rows32, chunk as u32]), &partial]);
    let sums = if chunks > 1 { CubeBackend::float_sum_dim(partial, 0) } else { partial };
    let sums = CubeBackend::float_reshape(sums, Shape::from(vec![2, d]));
    let part = |i: usize| {
        let row = CubeBackend::float_slice(sums.clone(), &[burn::tensor::Slice::from(i..i + 1)]);
        CubeBackend::float_reshape(row, Shape::from(vec![d]))
    };
    (dx, part(0), part(1))
}
