//! Attention and one transformer block against an independent float64 CPU implementation (naive loops),
//! on random inputs, for every mask the model uses. Tolerance: relative error < 1e-4 (max abs diff over
//! max abs reference).

mod common;

use burn::tensor::{Bool, Device, Distribution, Tensor, TensorData};
use common::{devices, param_f64, rel_err, to_f64};
use ov3_core::config::{AttentionImpl, TowerConfig};
use ov3_core::model::attention::{Attention, AttentionMask};
use ov3_core::model::block::Block;

/// y = x W + b with burn's [d_in, d_out] weight layout; x is [n, d_in] row-major.
fn linear(x: &[f64], n: usize, w: &[f64], b: Option<&[f64]>, d_in: usize, d_out: usize) -> Vec<f64> {
    let mut y = vec![0.0; n * d_out];
    for i in 0..n {
        for o in 0..d_out {
            let mut acc = b.map_or(0.0, |b| b[o]);
            for k in 0..d_in {
                acc += x[i * d_in + k] * w[k * d_out + o];
            }
            y[i * d_out + o] = acc;
        }
    }
    y
}

fn layer_norm(x: &[f64], d: usize, gamma: &[f64], beta: &[f64], eps: f64) -> Vec<f64> {
    x.chunks(d)
        .flat_map(|row| {
            let mean = row.iter().sum::<f64>() / d as f64;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d as f64;
            row.iter()
                .enumerate()
                .map(move |(i, v)| (v - mean) / (var + eps).sqrt() * gamma[i] + beta[i])
                .collect::<Vec<_>>()
        })
        .collect()
}

/// `allowed(i, j)`: may query i see key j. One sequence of n tokens, width d.
fn attention_ref(
    x: &[f64],
    n: usize,
    d: usize,
    heads: usize,
    attn: &Attention,
    allowed: &dyn Fn(usize, usize) -> bool,
) -> Vec<f64> {
    let qkv_b = attn.qkv.bias.as_ref().map(param_f64);
    let qkv = linear(x, n, &param_f64(&attn.qkv.weight), qkv_b.as_deref(), d, 3 * d);
    let dh = d / heads;
    let mut out = vec![0.0; n * d];
    for h in 0..heads {
        let at = |i: usize, part: usize, c: usize| qkv[i * 3 * d + part * d + h * dh + c];
        for i in 0..n {
            let logits: Vec<f64> = (0..n)
                .map(|j| {
                    if allowed(i, j) {
                        (0..dh).map(|c| at(i, 0, c) * at(j, 1, c)).sum::<f64>() / (dh as f64).sqrt()
                    } else {
                        f64::NEG_INFINITY
                    }
                })
                .collect();
            let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let exps: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
            let sum: f64 = exps.iter().sum();
            for c in 0..dh {
                out[i * d + h * dh + c] = (0..n).map(|j| exps[j] / sum * at(j, 2, c)).sum();
            }
        }
    }
    let proj_b = attn.proj.bias.as_ref().map(param_f64);
    linear(&out, n, &param_f64(&attn.proj.weight), proj_b.as_deref(), d, d)
}

fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))
}

fn block_ref(
    x: &[f64],
    n: usize,
    d: usize,
    heads: usize,
    block: &Block,
    allowed: &dyn Fn(usize, usize) -> bool,
) -> Vec<f64> {
    let ln = |x: &[f64], norm: &ov3_core::model::norm::LayerNorm| {
        layer_norm(x, d, &param_f64(&norm.gamma), &param_f64(&norm.beta), norm.epsilon)
    };
    let a = attention_ref(&ln(x, &block.norm1), n, d, heads, &block.attn, allowed);
    let x1: Vec<f64> = x.iter().zip(&a).map(|(u, v)| u + v).collect();
    let m = &block.mlp;
    let h: Vec<f64> = linear(
        &ln(&x1, &block.norm2),
        n,
        &param_f64(&m.fc1.weight),
        m.fc1.bias.as_ref().map(param_f64).as_deref(),
        d,
        4 * d,
    )
    .into_iter()
    .map(gelu)
    .collect();
    let y = linear(&h, n, &param_f64(&m.fc2.weight), m.fc2.bias.as_ref().map(param_f64).as_deref(), 4 * d, d);
    x1.iter().zip(&y).map(|(u, v)| u + v).collect()
}

const B: usize = 2;
const N: usize = 7; // odd on purpose
const D: usize = 32;
const H: usize = 4;

/// The masks under test, each with its f64 rule for sequence `b`. Key padding pads the last 3 keys of
/// the second sequence.
fn masks(device: &Device) -> Vec<(&'static str, AttentionMask, Box<dyn Fn(usize, usize, usize) -> bool>)> {
    let pad: Vec<bool> = (0..B * N).map(|i| i / N == 1 && i % N >= N - 3).collect();
    let pad = Tensor::<2, Bool>::from_data(TensorData::new(pad, [B, N]), device);
    vec![
        ("none", AttentionMask::None, Box::new(|_, _, _| true)),
        ("key padding", AttentionMask::KeyPadding(pad), Box::new(|b, _, j| !(b == 1 && j >= N - 3))),
        ("causal", AttentionMask::Causal, Box::new(|_, i, j| j <= i)),
        ("prefix 3", AttentionMask::Prefix(3), Box::new(|_, i, j| if i < 3 { j < 3 } else { j <= i })),
    ]
}

fn check(name: &str, device_name: &str, actual: &Tensor<3>, reference: impl Fn(usize, &[f64]) -> Vec<f64>, x: &[f64]) {
    let actual = to_f64(actual);
    for b in 0..B {
        let expect = reference(b, &x[b * N * D..(b + 1) * N * D]);
        let err = rel_err(&actual[b * N * D..(b + 1) * N * D], &expect);
        assert!(err < 1e-4, "{name} on {device_name}, sequence {b}: relative error {err:.2e} >= 1e-4");
    }
}

/// Both implementations (on flex the fused one falls back to the reference path).
const IMPLS: [AttentionImpl; 2] = [AttentionImpl::Reference, AttentionImpl::Fused];

#[test]
fn attention_matches_f64_reference_for_every_mask() {
    for (device_name, device) in devices() {
        for implementation in IMPLS {
            let mut attn = Attention::new(D, H, &device);
            attn.implementation = implementation;
            let x = Tensor::<3>::random([B, N, D], Distribution::Normal(0.0, 1.0), &device);
            let xs = to_f64(&x);
            for (mask_name, mask, allowed) in masks(&device) {
                let y = attn.forward(x.clone(), &mask.prepare(N, &device));
                let name = format!("{mask_name} ({implementation:?})");
                check(&name, device_name, &y, |b, xb| attention_ref(xb, N, D, H, &attn, &|i, j| allowed(b, i, j)), &xs);
            }
        }
    }
}

#[test]
fn transformer_block_matches_f64_reference() {
    for (device_name, device) in devices() {
        let cfg = ov3_core::config::Preset::Tiny.config().with_norm_eps(1e-6);
        let block = Block::new(&TowerConfig::new(D, 1, H), &cfg, &device);
        let x = Tensor::<3>::random([B, N, D], Distribution::Normal(0.0, 1.0), &device);
        let xs = to_f64(&x);
        for (mask_name, mask, allowed) in masks(&device) {
            let y = block.forward(x.clone(), &mask.prepare(N, &device));
            check(mask_name, device_name, &y, |b, xb| block_ref(xb, N, D, H, &block, &|i, j| allowed(b, i, j)), &xs);
        }
    }
}
