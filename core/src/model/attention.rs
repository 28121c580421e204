//! Multi-head self-attention shared by all four transformers: the reference (unfused) path here, the
//! fused WGSL kernels in `crate::flash`; `Ov3::with_attention` chooses. On wgpu both run inside one op from the
//! `qkv` projection to the merged heads (`crate::gpu_ops::attention`), which splits the heads in fewer launches
//! than the tensor ops below.
//!
//! Parameter names follow timm/OpenCLIP: `qkv` (one fused projection) and `proj`.

use burn::module::Module;
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::tensor::{Bool, Device, Int, Tensor};

use super::precision::{linear, linear_to_f32, to_f32};
use crate::config::AttentionImpl;
use crate::flash;

/// Which keys a query may attend to. The masks are built once per forward and shared by every block.
#[derive(Debug, Clone)]
pub enum AttentionMask {
    /// Every token sees every token (ViT encoder and decoder).
    None,
    /// `[B, N]`, true where the key is padding (text encoder).
    KeyPadding(Tensor<2, Bool>),
    /// Token i sees tokens 0..=i.
    Causal,
    /// The first `n` tokens (the image prefix) see each other only; later tokens see the whole prefix and
    /// earlier non-prefix tokens causally (OpenVision's caption decoder, "concat" fusion).
    Prefix(usize),
}

impl AttentionMask {
    /// The boolean mask broadcastable to `[B, H, N, N]`, true where attention is forbidden.
    pub fn to_bool(&self, n: usize, device: &Device) -> Option<Tensor<4, Bool>> {
        match self {
            AttentionMask::None => None,
            AttentionMask::KeyPadding(pad) => {
                let [b, n_keys] = pad.dims();
                Some(pad.clone().reshape([b, 1, 1, n_keys]).expand([b, 1, n, n_keys]))
            }
            AttentionMask::Causal => Some(causal(n, device).reshape([1, 1, n, n])),
            AttentionMask::Prefix(p) => {
                // Causal, except that prefix queries also see later prefix keys.
                let (rows, cols) = index_grid(n, device);
                let both_in_prefix = rows.lower_elem(*p as i64).bool_and(cols.lower_elem(*p as i64));
                Some(causal(n, device).bool_and(both_in_prefix.bool_not()).reshape([1, 1, n, n]))
            }
        }
    }
}

/// A mask in the forms the two attention paths read: the rule for the fused kernels, the dense
/// boolean tensor for the reference path. Built once per forward and shared by every block.
#[derive(Debug, Clone)]
pub struct Masks {
    pub rule: AttentionMask,
    pub dense: Option<Tensor<4, Bool>>,
}

impl AttentionMask {
    pub fn prepare(self, n: usize, device: &Device) -> Masks {
        let dense = self.to_bool(n, device);
        Masks { rule: self, dense }
    }
}

/// `[n, n]` row and column indices.
fn index_grid(n: usize, device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>) {
    let idx = Tensor::<1, Int>::arange(0..n as i64, device);
    (idx.clone().reshape([n, 1]).expand([n, n]), idx.reshape([1, n]).expand([n, n]))
}

/// `[n, n]`, true where key j comes after query i.
fn causal(n: usize, device: &Device) -> Tensor<2, Bool> {
    let (rows, cols) = index_grid(n, device);
    cols.greater(rows)
}

/// softmax(Q K^T * scale + mask) V for `q`, `k`, `v` of shape `[B, H, N, Dh]`.
///
/// Masked logits are set to a large negative finite value (-1e9, before the scale) rather than -inf, so a row
/// is never NaN. The two
/// products run in the inputs' dtype; the scaled logits, the mask and the softmax in f32 (as autocast does:
/// -1e9 and exp() overflow half precision).
pub fn scaled_dot_product_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: Option<Tensor<4, Bool>>,
) -> Tensor<4> {
    let head_dim = q.dims()[3];
    let scale = (head_dim as f64).powf(-0.5);
    let dtype = q.dtype();
    let mut logits = to_f32(q.matmul(k.swap_dims(2, 3)));
    if let Some(mask) = mask {
        let [b, h, n, m] = logits.dims();
        logits = logits.mask_fill(mask.expand([b, h, n, m]), -1.0e9);
    }
    crate::cpu_ops::softmax_last(logits, scale).cast(dtype).matmul(v)
}

/// One attention layer's keys and values `[B, H, T, Dh]` for the tokens it has seen so far (incremental
/// decoding); `None` before the first step.
pub type KeyValues = Option<(Tensor<4>, Tensor<4>)>;

#[derive(Module, Debug)]
pub struct Attention {
    pub qkv: Linear,
    pub proj: Linear,
    #[module(skip)]
    pub heads: usize,
    #[module(skip)]
    pub implementation: AttentionImpl,
}

impl Attention {
    /// On the reference path; `Ov3::with_attention` (or setting `implementation`) switches.
    pub fn new(width: usize, heads: usize, device: &Device) -> Self {
        let init = Initializer::XavierUniform { gain: 1.0 };
        Self {
            qkv: LinearConfig::new(width, 3 * width).with_initializer(init.clone()).init(device),
            proj: LinearConfig::new(width, width).with_initializer(init).init(device),
            heads,
            implementation: AttentionImpl::Reference,
        }
    }

    /// `x`: `[B, N, D]` -> `[B, N, D]`, computed in `x`'s dtype, returned in f32 (the residual stream's).
    ///
    /// On wgpu everything between the two projections is one op (`gpu_ops::attention`: burn's autodiff makes
    /// the head split below a dozen kernel launches per layer); elsewhere, and for cached decoding, the heads are
    /// split and merged with burn's tensor ops.
    pub fn forward(&self, x: Tensor<3>, mask: &Masks) -> Tensor<3> {
        let qkv = linear(&self.qkv, x);
        let heads = if crate::gpu_ops::supports_attention(&qkv) {
            let dh = qkv.dims()[2] / (3 * self.heads);
            let fused = self.implementation == AttentionImpl::Fused && flash::supports(&qkv.device(), dh);
            crate::gpu_ops::attention(qkv, self.heads, mask, fused)
        } else {
            let [b, n, d3] = qkv.dims();
            let (q, k, v) = self.split_heads(qkv);
            merge_heads(self.attend(q, k, v, mask), [b, n, d3 / 3])
        };
        linear_to_f32(&self.proj, heads)
    }

    /// [`Self::forward`] for `x`, the tokens that follow those whose keys and values are in `cache`:
    /// they attend to the cached keys and to themselves under `mask` (queries `[N]`, keys
    /// `[cached + N]`), and their own keys and values are appended to the cache.
    pub fn forward_cached(&self, x: Tensor<3>, mask: &Masks, cache: &mut KeyValues) -> Tensor<3> {
        let [b, n, d] = x.dims();
        let (q, k, v) = self.split_heads(linear(&self.qkv, x));
        let (k, v) = match cache.take() {
            Some((k0, v0)) => (Tensor::cat(vec![k0, k], 2), Tensor::cat(vec![v0, v], 2)),
            None => (k, v),
        };
        *cache = Some((k.clone(), v.clone()));
        linear_to_f32(&self.proj, merge_heads(self.attend(q, k, v, mask), [b, n, d]))
    }

    /// The projection `[B, N, 3D]` -> q, k, v, each `[B, H, N, Dh]`.
    fn split_heads(&self, qkv: Tensor<3>) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        let [b, n, d3] = qkv.dims();
        let dh = d3 / (3 * self.heads);
        // [B, N, 3, H, Dh] -> [3, B, H, N, Dh]
        let qkv = qkv.reshape([b, n, 3, self.heads, dh]).permute([2, 0, 3, 1, 4]);
        let part = |i: usize| qkv.clone().narrow(0, i, 1).reshape([b, self.heads, n, dh]);
        (part(0), part(1), part(2))
    }

    /// The fused kernels take as many queries as keys; a cached step (fewer queries) takes the reference path.
    /// Both keep the inputs' dtype (the kernels read and write f16 where the adapter has it, f32 inside).
    fn attend(&self, q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, mask: &Masks) -> Tensor<4> {
        let [_, _, n_q, dh] = q.dims();
        let square = n_q == k.dims()[2];
        if self.implementation == AttentionImpl::Fused && square && flash::supports(&q.device(), dh) {
            flash::flash_attention(q, k, v, &mask.rule)
        } else {
            scaled_dot_product_attention(q, k, v, mask.dense.clone())
        }
    }
}

/// `[B, H, N, Dh]` -> `[B, N, D]`.
fn merge_heads(out: Tensor<4>, [b, n, d]: [usize; 3]) -> Tensor<3> {
    out.swap_dims(1, 2).reshape([b, n, d])
}
