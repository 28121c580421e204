//! Fused (flash) attention on burn's wgpu backend: our WGSL kernels in `shaders/`, registered as a
//! differentiable burn op so training runs through them end to end.
//!
//! `softmax(scale * Q K^T + mask) V` is computed tile by tile with an online softmax; the forward
//! pass also writes the row-wise log-sum-exp, from which the backward pass recomputes the
//! probabilities. Memory is linear in the sequence length (no `[B, H, N, N]` tensor exists).
//!
//! Other backends (flex on the CPU) have no kernel: [`supports`] says so and the model uses the
//! reference path of `model::attention` there.

mod autodiff;
pub(crate) mod kernels;

use std::sync::atomic::{AtomicU32, Ordering};

use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::{Device, Int, Tensor};

use crate::model::attention::AttentionMask;

pub use crate::wgsl::set_poison_outputs;
pub use kernels::Tiles;

/// Which (query, key) pairs are visible, apart from key padding. The kernel's `RULE_*` constants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    All,
    Causal,
    /// Causal, except that the first `n` tokens also see each other (the caption decoder's prefix).
    Prefix(usize),
}

/// The differentiable op the model calls: on burn's autodiff backend it records [`FlashKernels::flash_backward`]
/// for the backward pass (`autodiff.rs`), on the plain backend it is the forward kernel alone.
#[backend_extension(Cube, Autodiff)]
pub trait FlashAttentionBackend: Backend {
    /// `q`, `k`, `v`: `[B, H, N, Dh]` f32; `key_padding`: `[B, N]`, nonzero where the key is padding.
    fn flash_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_padding: IntTensor<Self>,
        rule: Rule,
    ) -> FloatTensor<Self>;
}

/// The kernels themselves, on the backend that runs them: cubecl's, or (with burn's `fusion` feature) the
/// fusion backend wrapping it, which queues them as opaque operations between its fused element-wise blocks.
#[backend_extension(Cube, Fusion: cfg(feature = "fusion"))]
pub trait FlashKernels: Backend {
    /// Output `[B, H, N, Dh]` (the inputs' dtype) and the log-sum-exp `[B, H, N]` (f32); `padding` `[B, N]`
    /// float, 1 where the key is padding.
    #[fusion(meta = |q, _k, _v, _padding, _rule| (q.clone(), lse_spec(q)))]
    fn flash_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        padding: FloatTensor<Self>,
        rule: Rule,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// dQ, dK, dV for the upstream gradient `grad_out`, from the forward's output and log-sum-exp.
    #[allow(clippy::too_many_arguments)]
    #[fusion(meta = |q, k, v, _out, _lse, _grad_out, _padding, _rule| (q.clone(), k.clone(), v.clone()))]
    fn flash_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        grad_out: FloatTensor<Self>,
        padding: FloatTensor<Self>,
        rule: Rule,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// The log-sum-exp's shape and dtype for queries `q` (`[B, H, N]`, f32), for the fusion backend's queue.
#[cfg(feature = "fusion")]
fn lse_spec(q: &burn::backend::fusion::custom::TensorSpec) -> burn::backend::fusion::custom::TensorSpec {
    let dims = q.shape.dims::<4>();
    let shape = burn::tensor::Shape::from(vec![dims[0], dims[1], dims[2]]);
    burn::backend::fusion::custom::TensorSpec::new(shape, burn::backend::DType::F32)
}

impl FlashKernels for burn::backend::wgpu::CubeBackend {
    fn flash_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        padding: FloatTensor<Self>,
        rule: Rule,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        kernels::forward(q, k, v, burn::backend::wgpu::into_contiguous(padding), rule)
    }

    fn flash_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        grad_out: FloatTensor<Self>,
        padding: FloatTensor<Self>,
        rule: Rule,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        kernels::backward(q, k, v, out, lse, grad_out, burn::backend::wgpu::into_contiguous(padding), rule)
    }
}

/// The key padding `[B, N]` (nonzero = padding) as the float mask the kernels read.
pub(crate) fn padding_as_float<B: Backend>(key_padding: IntTensor<B>) -> FloatTensor<B> {
    B::int_into_float(key_padding, burn::backend::FloatDType::F32)
}

impl FlashAttentionBackend for CubeDispatched {
    fn flash_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_padding: IntTensor<Self>,
        rule: Rule,
    ) -> FloatTensor<Self> {
        Self::flash_forward(q, k, v, padding_as_float::<Self>(key_padding), rule).0
    }
}

/// The backend burn's dispatch runs a wgpu device on: cubecl's, wrapped by fusion when that feature is on.
#[cfg(not(feature = "fusion"))]
type CubeDispatched = burn::backend::wgpu::CubeBackend;
#[cfg(feature = "fusion")]
type CubeDispatched = burn::backend::fusion::Fusion<burn::backend::wgpu::CubeBackend>;

/// The most lanes a row group splits over ([`set_split`]).
pub const MAX_SPLIT: u32 = 4;

/// 0: not decided yet (`OV3_FLASH_SPLIT` decides at the first use), else the lanes per row group.
static SPLIT: AtomicU32 = AtomicU32::new(0);

/// How many lanes share each group of rows in the fused kernels: 1 (one row per lane, as measured on the
/// H100 in session 22; the default), 2 or 4 (each lane holds that many rows, a 1/2 or 1/4 of each, and the group
/// adds its partial dot products up through subgroup shuffles: 2 or 4 times the multiply-adds per read from
/// workgroup memory, for the same registers; docs/PERFORMANCE.md). Without a call, `OV3_FLASH_SPLIT` in the
/// environment decides ([`parse_split`]). A split above 1 needs an adapter with wgpu's subgroup feature
/// ([`crate::device::AdapterSummary::subgroups`]) whose subgroups are at least that wide (every GPU's are);
/// kernels for subgroups narrower than it, or heads whose vec4s it does not divide, take a smaller one.
pub fn set_split(lanes: u32) {
    assert!(matches!(lanes, 1 | 2 | 4), "flash attention splits rows over 1, 2 or 4 lanes, not {lanes}");
    SPLIT.store(lanes, Ordering::Relaxed);
}

/// `OV3_FLASH_SPLIT`'s value: 1, 2 or 4, or an error that says what it accepts.
pub fn parse_split(value: &str) -> Result<u32, String> {
    match value.trim() {
        "1" => Ok(1),
        "2" => Ok(2),
        "4" => Ok(4),
        other => Err(format!("OV3_FLASH_SPLIT must be 1, 2 or 4 (lanes per group of rows), not {other:?}")),
    }
}

/// The lanes per row group in use ([`set_split`]); an unset or invalid `OV3_FLASH_SPLIT` is 1 (the `ov3` commands
/// refuse an invalid one before they get here).
pub fn split() -> u32 {
    match SPLIT.load(Ordering::Relaxed) {
        0 => {
            let lanes = std::env::var("OV3_FLASH_SPLIT").ok().and_then(|v| parse_split(&v).ok()).unwrap_or(1);
            set_split(lanes);
            lanes
        }
        lanes => lanes,
    }
}

/// Head dimensions the kernels are compiled for: each invocation keeps a few rows of this length in
/// registers, so very wide heads would spill; the model's heads are 32-128 wide.
pub const MAX_HEAD_DIM: usize = 256;

/// Whether the fused kernels run on `device` ([`crate::wgsl::runs_here`]: wgpu, with or without autodiff, our
/// kernels on and compiled as WGSL) for heads of width `head_dim`: a multiple of 4 (rows are read as vec4s) up to
/// [`MAX_HEAD_DIM`].
pub fn supports(device: &Device, head_dim: usize) -> bool {
    crate::wgsl::runs_here(device) && supports_head_dim(head_dim)
}

fn supports_head_dim(head_dim: usize) -> bool {
    head_dim % 4 == 0 && (4..=MAX_HEAD_DIM).contains(&head_dim)
}

/// `mask` as the kernels read it: the key padding `[B, N]` (nonzero = padding; zeros where there is none) and
/// the rule.
pub(crate) fn padding_and_rule(mask: &AttentionMask, b: usize, n: usize, device: &Device) -> (Tensor<2, Int>, Rule) {
    let (padding, rule) = match mask {
        AttentionMask::None => (None, Rule::All),
        AttentionMask::KeyPadding(pad) => (Some(pad.clone().int()), Rule::All),
        AttentionMask::Causal => (None, Rule::Causal),
        AttentionMask::Prefix(p) => (None, Rule::Prefix(*p)),
    };
    (padding.unwrap_or_else(|| Tensor::<2, Int>::zeros([b, n], device)), rule)
}

/// softmax(Q K^T / sqrt(Dh) + mask) V for `[B, H, N, Dh]` inputs through the fused kernels;
/// differentiable in `q`, `k` and `v`. Call only where [`supports`] holds.
///
/// A query row that may see no key at all gets zeros (the model's masks never produce one).
pub fn flash_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, mask: &AttentionMask) -> Tensor<4> {
    let [b, _, n, _] = q.dims();
    let (padding, rule) = padding_and_rule(mask, b, n, &q.device());
    Tensor::from_dispatch(<Dispatch as FlashAttentionBackend>::flash_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        padding.into_dispatch(),
        rule,
    ))
}
