//! Multi-head self-attention between the two projections as one differentiable op on wgpu: the fused `qkv`
//! projection `[B, N, 3D]` in, the heads' merged output `[B, N, D]` out (what `proj` takes).
//!
//! Written with burn's tensor ops (`model::attention`), splitting `qkv` into heads cost a training step 12
//! launches per attention layer: three copies forward (a `narrow` of the permuted projection, reshaped, for
//! each of q, k and v), and backward a zero fill, a slice-assign and an add for each of the three (burn's
//! autodiff gives every `narrow` a gradient as large as its input) and one more copy. Here the split is one
//! copy forward (q, k, v are views of it) and one kernel backward (`shaders/heads_join.wgsl`). Between split
//! and merge the heads attend by the reference maths (two matmuls around our softmax kernel, in the inputs'
//! dtype as `scaled_dot_product_attention` does) or by the fused flash kernels (`crate::flash`).

use burn::backend::tensor::{BoolTensor, FloatTensor};
use burn::backend::{Backend, DType, FloatDType, TensorMetadata};
use burn::tensor::{Shape, Slice};

use super::GpuKernels;
use crate::flash::{FlashKernels, Rule};

/// How the heads attend.
#[derive(Debug, Clone)]
pub enum Attend<B: Backend> {
    /// `softmax(scale * Q K^T, masked) V`; `mask` broadcasts to `[B, H, N, N]`, true where a pair is masked
    /// (its logit becomes -1e9 before the scale, as in `scaled_dot_product_attention`).
    Reference { mask: Option<BoolTensor<B>> },
    /// The flash kernels; `padding` `[B, N]` f32, 1 where the key is padding.
    Fused { padding: FloatTensor<B>, rule: Rule },
}

/// What the backward pass reads.
#[derive(Debug, Clone)]
pub enum Saved<B: Backend> {
    Reference {
        qkv: [FloatTensor<B>; 3],
        /// The probabilities in f32 and in the inputs' dtype (the same tensor under f32).
        p: FloatTensor<B>,
        p_cast: FloatTensor<B>,
        mask: Option<BoolTensor<B>>,
        heads: usize,
    },
    Fused {
        qkv: [FloatTensor<B>; 3],
        out: FloatTensor<B>,
        lse: FloatTensor<B>,
        padding: FloatTensor<B>,
        rule: Rule,
        heads: usize,
    },
}

/// The merged output `[B, N, D]` (`qkv`'s dtype) and what the backward pass reads.
pub fn forward<B: GpuKernels + FlashKernels>(
    qkv: FloatTensor<B>,
    heads: usize,
    attend: Attend<B>,
) -> (FloatTensor<B>, Saved<B>) {
    let [q, k, v] = split::<B>(qkv, heads);
    match attend {
        Attend::Reference { mask } => {
            let dtype = q.dtype();
            let scale = softmax_scale(q.shape()[3]);
            let mut logits = cast::<B>(B::float_matmul(q.clone(), B::float_swap_dims(k.clone(), 2, 3)), DType::F32);
            let mask = mask.map(|m| B::bool_expand(m, logits.shape()));
            if let Some(m) = &mask {
                logits = B::float_mask_fill(logits, m.clone(), (-1.0e9f32).into());
            }
            let p = B::softmax_forward(logits, scale);
            let p_cast = cast::<B>(p.clone(), dtype);
            let out = merge::<B>(B::float_matmul(p_cast.clone(), v.clone()));
            (out, Saved::Reference { qkv: [q, k, v], p, p_cast, mask, heads })
        }
        Attend::Fused { padding, rule } => {
            let (out, lse) = B::flash_forward(q.clone(), k.clone(), v.clone(), padding.clone(), rule);
            (merge::<B>(out.clone()), Saved::Fused { qkv: [q, k, v], out, lse, padding, rule, heads })
        }
    }
}

/// The gradient of `qkv` for the upstream gradient `g` `[B, N, D]`.
pub fn backward<B: GpuKernels + FlashKernels>(saved: Saved<B>, g: FloatTensor<B>) -> FloatTensor<B> {
    match saved {
        Saved::Reference { qkv: [q, k, v], p, p_cast, mask, heads } => {
            let g = unmerge::<B>(g, heads);
            let dtype = q.dtype();
            let dv = B::float_matmul(B::float_swap_dims(p_cast, 2, 3), g.clone());
            let dp = cast::<B>(B::float_matmul(g, B::float_swap_dims(v, 2, 3)), DType::F32);
            let mut ds = B::softmax_backward(p, dp, softmax_scale(q.shape()[3]));
            // What burn's mask_fill passes back: nothing through a masked logit (a row with every key masked
            // has uniform probabilities, whose softmax gradient is not zero).
            if let Some(m) = mask {
                ds = B::float_mask_fill(ds, m, 0f32.into());
            }
            let ds = cast::<B>(ds, dtype);
            let dq = B::float_matmul(ds.clone(), k);
            let dk = B::float_matmul(B::float_swap_dims(ds, 2, 3), q);
            B::heads_join(dq, dk, dv)
        }
        Saved::Fused { qkv: [q, k, v], out, lse, padding, rule, heads } => {
            let g = unmerge::<B>(g, heads);
            let (dq, dk, dv) = B::flash_backward(q, k, v, out, lse, g, padding, rule);
            B::heads_join(dq, dk, dv)
        }
    }
}

/// `Dh^-0.5`, for heads `Dh` wide.
fn softmax_scale(head_dim: usize) -> f64 {
    (head_dim as f64).powf(-0.5)
}

fn cast<B: Backend>(t: FloatTensor<B>, dtype: DType) -> FloatTensor<B> {
    if t.dtype() == dtype { t } else { B::float_cast(t, FloatDType::from(dtype)) }
}

/// `[B, N, 3D]` -> q, k, v `[B, H, N, Dh]`: one copy into `[3, B, H, N, Dh]`, of which each is a view.
fn split<B: Backend>(qkv: FloatTensor<B>, heads: usize) -> [FloatTensor<B>; 3] {
    let [b, n, d3] = qkv.shape().dims::<3>();
    assert!(d3 % (3 * heads) == 0, "attention: a projection of {d3} does not split into 3 x {heads} heads");
    let dh = d3 / (3 * heads);
    let x = B::float_permute(B::float_reshape(qkv, Shape::from(vec![b, n, 3, heads, dh])), &[2, 0, 3, 1, 4]);
    let x = B::float_reshape(x, Shape::from(vec![3 * b * heads, n, dh]));
    [0, 1, 2].map(|i| {
        let part = B::float_slice(x.clone(), &[Slice::from(i * b * heads..(i + 1) * b * heads)]);
        B::float_reshape(part, Shape::from(vec![b, heads, n, dh]))
    })
}

/// `[B, H, N, Dh]` -> `[B, N, H * Dh]` (a copy).
fn merge<B: Backend>(out: FloatTensor<B>) -> FloatTensor<B> {
    let [b, h, n, dh] = out.shape().dims::<4>();
    B::float_reshape(B::float_swap_dims(out, 1, 2), Shape::from(vec![b, n, h * dh]))
}

/// The gradient of [`merge`]'s output -> that of its input, contiguous (one copy, where the matmuls that read
/// it would each make their own).
fn unmerge<B: Backend>(g: FloatTensor<B>, heads: usize) -> FloatTensor<B> {
    let [b, n, d] = g.shape().dims::<3>();
    let g = B::float_swap_dims(B::float_reshape(g, Shape::from(vec![b, n, heads, d / heads])), 1, 2);
    let g = B::float_reshape(g, Shape::from(vec![b * heads, n, d / heads]));
    B::float_reshape(g, Shape::from(vec![b, heads, n, d / heads]))
}
