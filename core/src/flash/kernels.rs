//! Launching the WGSL kernels of `shaders/` on a cubecl (wgpu) tensor's client.

use burn::backend::ops::FloatTensorOps;
use burn::backend::wgpu::{CubeBackend, CubeTensor, KernelSource, SourceTemplate, into_contiguous};
use burn::backend::{DType, TensorMetadata};
use burn::tensor::Shape;
use cubecl::CubeCount;
use cubecl::prelude::KernelId;

use super::Rule;
use crate::wgsl::{cast, output, storage_dtype, words};

const COMMON: &str = include_str!("../../../shaders/flash_common.wgsl");
const KV_TILES: &str = include_str!("../../../shaders/flash_kv_tiles.wgsl");
const FORWARD: &str = include_str!("../../../shaders/flash_forward.wgsl");
const BACKWARD_DQ: &str = include_str!("../../../shaders/flash_backward_dq.wgsl");
const BACKWARD_DKV: &str = include_str!("../../../shaders/flash_backward_dkv.wgsl");
const STATS: &str = include_str!("../../../shaders/flash_stats.wgsl");
/// Invocations per workgroup of flash_stats.wgsl, one row each.
const STATS_WORKGROUP: u32 = 256;

/// Tile sizes for one head dimension on one adapter (the `BR`, `BC`, `DH` and `SPLIT` of the shaders).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tiles {
    pub head_dim: u32,
    /// Rows per workgroup, as many invocations.
    pub rows: u32,
    /// Rows of K/V (Q/dO in dK/dV) per tile of workgroup memory.
    pub cols: u32,
    /// Lanes that share a group of `split` rows, each holding `head_dim / split` of every row and adding the
    /// partial dot products up through subgroup shuffles (1: one row per lane, no subgroup operations).
    pub split: u32,
}

impl Tiles {
    /// The largest tiles the adapter's limits allow, capped at 64: every kernel holds two `cols x
    /// head_dim` tiles plus two `cols` vectors in workgroup memory, and walks a tile 4 rows at a time
    /// (`KB` in the shaders), so `cols` stays a multiple of 4 (WebGPU's minimum 16 KiB allows 4 rows
    /// of the widest head, 256). `split` as asked where it divides the head's vec4s and the rows, halved until
    /// it does.
    pub fn choose(head_dim: usize, max_shared_bytes: usize, max_invocations: u32, split: u32) -> Self {
        let fits = |cols: usize| (2 * cols * head_dim + 2 * cols) * 4 <= max_shared_bytes;
        let mut cols = 64;
        while cols > 4 && !fits(cols) {
            cols /= 2;
        }
        let rows = prev_power_of_two(max_invocations.clamp(1, 64));
        let mut split = prev_power_of_two(split.clamp(1, super::MAX_SPLIT));
        while split > 1 && ((head_dim / 4) % split as usize != 0 || rows % split != 0) {
            split /= 2;
        }
        Self { head_dim: head_dim as u32, rows, cols: cols as u32, split }
    }

    /// The tiles the kernels use on an adapter of these properties, with [`super::split`]'s lanes where its
    /// subgroups are at least that wide.
    fn for_adapter(hw: &cubecl::ir::HardwareProperties, head_dim: usize) -> Self {
        let split = super::split();
        let split = if hw.plane_size_min >= split { split } else { 1 };
        Self::choose(head_dim, hw.max_shared_memory_size, hw.max_units_per_cube, split)
    }

    fn for_tensor(t: &CubeTensor, head_dim: usize) -> Self {
        Self::for_adapter(&t.client.properties().hardware, head_dim)
    }

    /// The tiles the kernels would use on `device` for heads of `head_dim` now; `None` off wgpu.
    pub fn for_device(device: &burn::tensor::Device, head_dim: usize) -> Option<Self> {
        let inner = device.clone().inner();
        let burn::backend::DispatchDevice::Cube(cube) = inner.as_dispatch() else {
            return None;
        };
        Some(Self::for_adapter(&cube.client().properties().hardware, head_dim))
    }
}

fn prev_power_of_two(x: u32) -> u32 {
    1 << (31 - x.leading_zeros())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Stage {
    Forward,
    /// The backward pass's row statistics (flash_stats.wgsl, standalone).
    Stats,
    BackwardDq,
    BackwardDk,
    BackwardDv,
}

/// One kernel: the tile constants, the shared bindings and helpers, then the stage's own files.
struct FlashKernel {
    stage: Stage,
    tiles: Tiles,
    /// Q, K, V, O and their gradients in f16 (`elem` in the shaders); arithmetic stays f32.
    f16: bool,
    /// WebGPU's WGSL (Chromium's Tint) rather than native wgpu's (naga): `enable subgroups;` where a split uses
    /// them, which Tint requires and naga refuses.
    webgpu: bool,
}

/// `lanes_sum` of the shaders, the sum of a vec4 over the `split` lanes of a row group, the same bits on each
/// (every lane adds the same pairs, and IEEE addition commutes), and the directive it needs first.
fn lanes_sum(split: u32, webgpu: bool) -> (&'static str, String) {
    let body = match split {
        1 => "return x;",
        2 => "return x + subgroupShuffleXor(x, 1u);",
        _ => "let y = x + subgroupShuffleXor(x, 1u);\n    return y + subgroupShuffleXor(y, 2u);",
    };
    let enable = if split > 1 && webgpu { "enable subgroups;\n" } else { "" };
    (enable, format!("fn lanes_sum(x: vec4<f32>) -> vec4<f32> {{\n    {body}\n}}\n"))
}

impl KernelSource for FlashKernel {
    fn source(&self) -> SourceTemplate {
        let t = self.tiles;
        // PART: which half of [dK | dV] flash_backward_dkv.wgsl computes (unused by the others).
        let part = u32::from(self.stage == Stage::BackwardDv);
        let elem = crate::wgsl::elem_header(if self.f16 { DType::F16 } else { DType::F32 });
        // Directives (`enable ...;`) first, then the constants.
        let (enable, sum) = lanes_sum(t.split, self.webgpu);
        let header = format!(
            "{enable}{elem}const DH: u32 = {}u;\nconst DV: u32 = {}u;\nconst BC: u32 = {}u;\nconst BR: u32 = {}u;\n\
             const SPLIT: u32 = {}u;\nconst DQ: u32 = {}u;\nconst PART: u32 = {part}u;\n{sum}",
            t.head_dim,
            t.head_dim / 4,
            t.cols,
            t.rows,
            t.split,
            t.head_dim / 4 / t.split
        );
        let parts: &[&str] = match self.stage {
            Stage::Stats => {
                let header = format!("{elem}const DV: u32 = {}u;\n", t.head_dim / 4);
                return SourceTemplate::new(header).add_template(STATS);
            }
            Stage::Forward => &[KV_TILES, FORWARD],
            Stage::BackwardDq => &[KV_TILES, BACKWARD_DQ],
            Stage::BackwardDk | Stage::BackwardDv => &[BACKWARD_DKV],
        };
        parts.iter().fold(SourceTemplate::new(header).add_template(COMMON), |t, part| t.add_template(*part))
    }

    fn id(&self) -> KernelId {
        KernelId::new::<Self>().info((self.stage, self.tiles, self.f16, self.webgpu))
    }

    fn lang(&self) -> &'static str {
        "wgsl"
    }
}

fn dims(t: &CubeTensor) -> [usize; 4] {
    let shape = t.shape();
    assert_eq!(shape.num_dims(), 4, "flash attention expects [B, H, N, Dh] tensors, got {shape:?}");
    [shape[0], shape[1], shape[2], shape[3]]
}

/// `[N, heads, rule, prefix, scale bits, B*H*N]`, the `params` buffer of `flash_common.wgsl`.
fn params(like: &CubeTensor, [b, h, n, dh]: [usize; 4], rule: Rule) -> CubeTensor {
    let (kind, prefix) = match rule {
        Rule::All => (0, 0),
        Rule::Causal => (1, 0),
        Rule::Prefix(p) => (2, p),
    };
    let scale = (dh as f32).powf(-0.5);
    words(like, &[n as u32, h as u32, kind, prefix.min(n) as u32, scale.to_bits(), (b * h * n) as u32])
}

fn launch(stage: Stage, tiles: Tiles, [b, h, n, _]: [usize; 4], buffers: &[&CubeTensor]) {
    let f16 = buffers[0].dtype == DType::F16;
    let groups = n.div_ceil(tiles.rows as usize) as u32;
    let count = CubeCount::Static(groups, (b * h) as u32, 1);
    let webgpu = cfg!(target_arch = "wasm32");
    crate::wgsl::launch(FlashKernel { stage, tiles, f16, webgpu }, tiles.rows, count, buffers);
}

/// Output `[B, H, N, Dh]` (the inputs' dtype) and log-sum-exp `[B, H, N]` (f32). `padding`: `[B, N]`
/// f32, contiguous, 1.0 where the key is padding.
pub fn forward(
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    padding: CubeTensor,
    rule: Rule,
) -> (CubeTensor, CubeTensor) {
    let shape = dims(&q);
    assert!(dims(&k) == shape && dims(&v) == shape, "flash attention: q, k and v must have one shape");
    let [b, h, n, dh] = shape;
    let (dtype, st) = (q.dtype, storage_dtype(&q));
    let [q, k, v] = [q, k, v].map(|t| into_contiguous(cast(t, st)));
    let tiles = Tiles::for_tensor(&q, dh);
    let params = params(&q, shape, rule);
    let out = output(&q, vec![b, h, n, dh], st);
    let lse = output(&q, vec![b, h, n], DType::F32);
    launch(Stage::Forward, tiles, shape, &[&q, &k, &v, &padding, &params, &out, &lse]);
    (cast(out, dtype), lse)
}

/// dQ, dK, dV for the upstream gradient `grad_out`, recomputing the probabilities from `lse`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    out: CubeTensor,
    lse: CubeTensor,
    grad_out: CubeTensor,
    padding: CubeTensor,
    rule: Rule,
) -> (CubeTensor, CubeTensor, CubeTensor) {
    let shape = dims(&q);
    let [b, h, n, dh] = shape;
    let (dtype, st) = (q.dtype, storage_dtype(&q));
    let [q, k, v, out, grad_out] = [q, k, v, out, grad_out].map(|t| into_contiguous(cast(t, st)));
    let tiles = Tiles::for_tensor(&q, dh);
    // [L | D] in one buffer, D_i = dO_i . O_i (the kernels stay within 8 storage bindings).
    let rows = b * h * n;
    let stats = output(&q, vec![2 * rows], DType::F32);
    let kernel = FlashKernel { stage: Stage::Stats, tiles, f16: st == DType::F16, webgpu: false };
    let groups = crate::wgsl::grid(rows.div_ceil(STATS_WORKGROUP as usize));
    let buffers = [&out, &grad_out, &into_contiguous(lse), &words(&q, &[rows as u32]), &stats];
    crate::wgsl::launch(kernel, STATS_WORKGROUP, groups, &buffers);
    let params = params(&q, shape, rule);
    let dq = output(&q, vec![b, h, n, dh], st);
    let dkv = output(&q, vec![2, b, h, n, dh], st);
    launch(Stage::BackwardDq, tiles, shape, &[&q, &k, &v, &padding, &params, &grad_out, &stats, &dq]);
    for stage in [Stage::BackwardDk, Stage::BackwardDv] {
        launch(stage, tiles, shape, &[&q, &k, &v, &padding, &params, &grad_out, &stats, &dkv]);
    }
    let half = |i: usize| {
        let part = CubeBackend::float_slice(dkv.clone(), &[burn::tensor::Slice::from(i..i + 1)]);
        cast(CubeBackend::float_reshape(part, Shape::from(vec![b, h, n, dh])), dtype)
    };
    (cast(dq, dtype), half(0), half(1))
}

/// Every kernel's WGSL as WebGPU compiles it, for WebGPU's default limits (16 KiB of workgroup memory, 256
/// invocations) and 64-wide heads, in f32 and f16, one row per lane and (the forward and backward kernels) rows
/// split over 4 lanes: `(name, source)`, for `wgsl::every_kernel`.
pub(crate) fn sources() -> Vec<(String, String)> {
    let stages = [Stage::Forward, Stage::Stats, Stage::BackwardDq, Stage::BackwardDk, Stage::BackwardDv];
    let each = stages.into_iter().flat_map(|stage| {
        let splits: &[u32] = if stage == Stage::Stats { &[1] } else { &[1, 4] };
        splits.iter().flat_map(move |&split| [false, true].map(|f16| (stage, split, f16)))
    });
    each.map(|(stage, split, f16)| {
        let tiles = Tiles::choose(64, 16 * 1024, 256, split);
        let lanes = if split > 1 { format!(" split {split}") } else { String::new() };
        let name = format!("flash {stage:?}{lanes}{}", if f16 { " f16" } else { "" });
        (name, FlashKernel { stage, tiles, f16, webgpu: true }.source().complete())
    })
    .collect()
}
