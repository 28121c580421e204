//! The fused WGSL attention (shaders/) against a float64 CPU reference: the output and all three
//! gradients, on fresh random inputs, for every mask the model uses, odd lengths and head widths
//! 32/64/128. Tolerance: relative error (max abs diff / max abs reference; absolute where the reference
//! is exactly zero) < 1e-4 in f32. Outputs are
//! NaN-poisoned before each launch, so an element a kernel never writes fails. The same for the model's
//! attention op on wgpu (`gpu_ops::attention`: the fused projection in, heads split, attended by either path,
//! merged), and that op against burn's tensor ops where a query sees no key at all.
//!
//! The kernels run on burn's wgpu backend only: on a machine without an adapter these tests are
//! skipped, unless `OV3_TEST_WGPU=1` (CI, on lavapipe) makes that a failure.

mod common;

use burn::tensor::{Bool, DType, Device, Distribution, Tensor, TensorData};
use common::{after_one_step, rel_err, to_f64, wgpu_device};
use ov3_core::flash::{self, Tiles};
use ov3_core::model::Noise;
use ov3_core::model::attention::AttentionMask;
use ov3_core::parallel::Single;

type Allowed = Box<dyn Fn(usize, usize, usize) -> bool>;

struct Case {
    name: &'static str,
    shape: [usize; 4],
    mask: AttentionMask,
    /// (batch, query, key) -> may the query see the key; the reference reads only this.
    allowed: Allowed,
}

/// Keys `len..` of each sequence are padding.
fn padding(lengths: &[usize], n: usize, device: &Device) -> AttentionMask {
    let pad: Vec<bool> = lengths.iter().flat_map(|&len| (0..n).map(move |j| j >= len)).collect();
    AttentionMask::KeyPadding(Tensor::<2, Bool>::from_data(TensorData::new(pad, [lengths.len(), n]), device))
}

fn cases(device: &Device) -> Vec<Case> {
    let prefix = |p: usize| -> Allowed { Box::new(move |_, i, j| j <= i || (i < p && j < p)) };
    vec![
        Case {
            name: "no mask, Dh 32",
            shape: [2, 3, 37, 32],
            mask: AttentionMask::None,
            allowed: Box::new(|_, _, _| true),
        },
        Case { name: "one token", shape: [1, 1, 1, 32], mask: AttentionMask::None, allowed: Box::new(|_, _, _| true) },
        Case {
            name: "causal, Dh 64",
            shape: [2, 2, 65, 64],
            mask: AttentionMask::Causal,
            allowed: Box::new(|_, i, j| j <= i),
        },
        Case {
            name: "key padding, Dh 128",
            shape: [3, 2, 50, 128],
            mask: padding(&[50, 31, 1], 50, device),
            allowed: Box::new(|b, _, j| j < [50, 31, 1][b]),
        },
        Case { name: "prefix 7, Dh 64", shape: [2, 2, 29, 64], mask: AttentionMask::Prefix(7), allowed: prefix(7) },
        // A prefix longer than one workgroup's rows, a length across several workgroups.
        Case { name: "prefix 70, Dh 64", shape: [1, 2, 131, 64], mask: AttentionMask::Prefix(70), allowed: prefix(70) },
    ]
}

struct Reference {
    out: Vec<f64>,
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
}

/// Float64 attention and its gradients for the upstream gradient `dout`, textbook formulas:
/// P = softmax(S), dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dP * P)), dQ = dS K s, dK = dS^T Q s.
#[allow(clippy::too_many_arguments)]
fn reference(q: &[f64], k: &[f64], v: &[f64], dout: &[f64], [b, h, n, dh]: [usize; 4], allowed: &Allowed) -> Reference {
    let scale = (dh as f64).powf(-0.5);
    let mut r =
        Reference { out: vec![0.0; q.len()], dq: vec![0.0; q.len()], dk: vec![0.0; q.len()], dv: vec![0.0; q.len()] };
    let dot = |a: &[f64], c: &[f64]| a.iter().zip(c).map(|(x, y)| x * y).sum::<f64>();
    for bi in 0..b {
        for hi in 0..h {
            let base = (bi * h + hi) * n * dh;
            let row = |t: &[f64], i: usize| t[base + i * dh..base + (i + 1) * dh].to_vec();
            for i in 0..n {
                let keys: Vec<usize> = (0..n).filter(|&j| allowed(bi, i, j)).collect();
                if keys.is_empty() {
                    continue;
                }
                let s: Vec<f64> = keys.iter().map(|&j| dot(&row(q, i), &row(k, j)) * scale).collect();
                let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                let p: Vec<f64> = e.iter().map(|x| x / sum).collect();
                let do_i = row(dout, i);
                let dp: Vec<f64> = keys.iter().map(|&j| dot(&do_i, &row(v, j))).collect();
                let d_i: f64 = p.iter().zip(&dp).map(|(a, c)| a * c).sum();
                for (idx, &j) in keys.iter().enumerate() {
                    let ds = p[idx] * (dp[idx] - d_i);
                    for d in 0..dh {
                        r.out[base + i * dh + d] += p[idx] * v[base + j * dh + d];
                        r.dv[base + j * dh + d] += p[idx] * do_i[d];
                        r.dq[base + i * dh + d] += ds * k[base + j * dh + d] * scale;
                        r.dk[base + j * dh + d] += ds * q[base + i * dh + d] * scale;
                    }
                }
            }
        }
    }
    r
}

/// Runs `case` with inputs of `dtype` and checks the output and the three gradients (which must keep
/// that dtype) against the float64 reference of the same (rounded) inputs.
fn check(case: &Case, dtype: DType, tolerance: f64, device: &Device) {
    let random = || Tensor::<4>::random(case.shape, Distribution::Normal(0.0, 1.0), device).cast(dtype);
    let (q, k, v, w) = (random().require_grad(), random().require_grad(), random().require_grad(), random());
    let out = flash::flash_attention(q.clone(), k.clone(), v.clone(), &case.mask);
    let grads = (out.clone() * w.clone()).sum().backward();
    let grad = |t: &Tensor<4>| {
        let g = t.grad(&grads).expect("a gradient");
        assert_eq!(g.dtype(), dtype, "{}: gradient dtype", case.name);
        to_f64(&g)
    };
    assert_eq!(out.dtype(), dtype, "{}: output dtype", case.name);
    let expect = reference(&to_f64(&q), &to_f64(&k), &to_f64(&v), &to_f64(&w), case.shape, &case.allowed);
    for (what, actual, reference) in [
        ("output", to_f64(&out), &expect.out),
        ("dQ", grad(&q), &expect.dq),
        ("dK", grad(&k), &expect.dk),
        ("dV", grad(&v), &expect.dv),
    ] {
        assert_matches(&format!("{} ({dtype:?})", case.name), what, &actual, reference, tolerance);
    }
}

/// Every element written (finite), and within `tolerance` of `reference`: relative to its largest magnitude, or
/// absolute where it is exactly zero (dQ of a single key has no scale).
fn assert_matches(name: &str, what: &str, actual: &[f64], reference: &[f64], tolerance: f64) {
    assert!(actual.iter().all(|x| x.is_finite()), "{name}: {what} has unwritten (NaN) elements");
    let err = if reference.iter().all(|x| *x == 0.0) {
        actual.iter().fold(0f64, |m, x| m.max(x.abs()))
    } else {
        rel_err(actual, reference)
    };
    assert!(err < tolerance, "{name}: {what} error {err:.2e} >= {tolerance:.0e}");
}

/// The lanes per row group ([`flash::set_split`]) are one setting for the whole process: the tests of this file
/// take turns, each setting the split it means to check.
static SPLIT: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `body` with rows split over `lanes` lanes, alone among this file's tests.
fn with_split<R>(lanes: u32, body: impl FnOnce() -> R) -> R {
    let _turn = SPLIT.lock().unwrap_or_else(|e| e.into_inner());
    flash::set_split(lanes);
    body()
}

/// The splits this machine's adapter can run: 1, and 2 and 4 where it has wgpu's subgroup feature.
fn splits() -> Vec<u32> {
    let subgroups = ov3_core::device::adapters().first().is_some_and(|a| a.subgroups);
    if !subgroups {
        eprintln!("the adapter has no subgroups: rows split over lanes not checked");
    }
    if subgroups { vec![1, 2, 4] } else { vec![1] }
}

#[test]
fn forward_and_gradients_match_f64_reference() {
    let Some(device) = wgpu_device() else { return };
    flash::set_poison_outputs(true);
    let device = device.autodiff();
    with_split(1, || {
        for case in cases(&device) {
            check(&case, DType::F32, 1e-4, &device);
        }
    });
}

/// The same with each query (and key) row shared by 2 or 4 lanes that add their partial dot products up through
/// subgroup shuffles, and the kernels' tiles as the adapter chose them (checked to be the split asked for).
#[test]
fn rows_split_over_lanes_match_f64_reference() {
    let Some(device) = wgpu_device() else { return };
    flash::set_poison_outputs(true);
    let device = device.autodiff();
    for lanes in splits().into_iter().filter(|&l| l > 1) {
        with_split(lanes, || {
            for case in cases(&device) {
                let [_, _, _, dh] = case.shape;
                let tiles = Tiles::for_device(&device, dh);
                assert_eq!(tiles.map(|t| t.split), Some(lanes), "{}: tiles {tiles:?}", case.name);
                check(&case, DType::F32, 1e-4, &device);
                check(&case, DType::F16, 2e-3, &device);
            }
        });
    }
}

/// f16 tensors in, f16 out: read and written as f16 where the adapter has shader-f16 (arithmetic in
/// f32), through f32 otherwise. Tolerance 2e-3: the f16 rounding of the results (2^-11 relative) plus
/// the f16 rounding of the upstream gradient, against a reference in f64 on the same rounded inputs.
#[test]
fn f16_inputs_match_f64_reference() {
    let Some(device) = wgpu_device() else { return };
    flash::set_poison_outputs(true);
    let native = device.supports_dtype(DType::F16);
    eprintln!("adapter shader-f16: {native} ({})", if native { "f16 kernels" } else { "through f32" });
    let device = device.autodiff();
    with_split(1, || {
        for case in cases(&device) {
            check(&case, DType::F16, 2e-3, &device);
        }
    });
}

/// q, k, v `[B, H, N, Dh]` as the fused projection `[B, N, 3D]` (q, k, v in thirds, heads within each).
fn to_qkv(parts: [&[f64]; 3], [b, h, n, dh]: [usize; 4]) -> Vec<f64> {
    let mut out = Vec::with_capacity(3 * parts[0].len());
    for bi in 0..b {
        for i in 0..n {
            for part in parts {
                for hi in 0..h {
                    let at = ((bi * h + hi) * n + i) * dh;
                    out.extend_from_slice(&part[at..at + dh]);
                }
            }
        }
    }
    out
}

/// `[B, H, N, Dh]` -> `[B, N, H * Dh]`.
fn merge_heads(x: &[f64], [b, h, n, dh]: [usize; 4]) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len());
    for bi in 0..b {
        for i in 0..n {
            for hi in 0..h {
                let at = ((bi * h + hi) * n + i) * dh;
                out.extend_from_slice(&x[at..at + dh]);
            }
        }
    }
    out
}

/// [`check`] for the model's attention op: random q, k, v rearranged into the projection it takes, its
/// output and projection gradient against the float64 reference rearranged the same way.
fn check_op(case: &Case, dtype: DType, fused: bool, tolerance: f64, device: &Device) {
    let [b, h, n, dh] = case.shape;
    let random = || to_f64(&Tensor::<4>::random(case.shape, Distribution::Normal(0.0, 1.0), device).cast(dtype));
    let (q, k, v, w) = (random(), random(), random(), random());
    let qkv = Tensor::<3>::from_data(TensorData::new(to_qkv([&q, &k, &v], case.shape), [b, n, 3 * h * dh]), device)
        .cast(dtype)
        .require_grad();
    let w_merged = Tensor::<3>::from_data(TensorData::new(merge_heads(&w, case.shape), [b, n, h * dh]), device);
    let masks = case.mask.clone().prepare(n, device);
    let out = ov3_core::gpu_ops::attention(qkv.clone(), h, &masks, fused);
    let grads = (out.clone() * w_merged.cast(dtype)).sum().backward();
    let d_qkv = qkv.grad(&grads).expect("a gradient");
    assert_eq!((out.dtype(), d_qkv.dtype()), (dtype, dtype), "{}: output and gradient dtypes", case.name);
    let expect = reference(&q, &k, &v, &w, case.shape, &case.allowed);
    let name = format!("{} ({dtype:?}, {})", case.name, if fused { "fused" } else { "reference" });
    for (what, actual, reference) in [
        ("output", to_f64(&out), merge_heads(&expect.out, case.shape)),
        ("d qkv", to_f64(&d_qkv), to_qkv([&expect.dq, &expect.dk, &expect.dv], case.shape)),
    ] {
        assert_matches(&name, what, &actual, &reference, tolerance);
    }
}

/// Tolerances as for the kernels alone: 1e-4 in f32; 2e-3 in f16, where the reference path also rounds the
/// probabilities and their gradient to f16 between its matmuls (as autocast does).
#[test]
fn attention_op_matches_f64_reference() {
    let Some(device) = wgpu_device() else { return };
    flash::set_poison_outputs(true);
    let device = device.autodiff();
    with_split(1, || {
        for case in cases(&device) {
            for fused in [false, true] {
                check_op(&case, DType::F32, fused, 1e-4, &device);
                check_op(&case, DType::F16, fused, 2e-3, &device);
            }
        }
    });
}

/// The reference path of the op against the same maths in burn's tensor ops (`scaled_dot_product_attention`
/// on heads split with `narrow`), including a sequence that is all padding: there every logit is masked, the
/// probabilities are uniform, and burn's mask_fill passes no gradient back through them. Tolerance 1e-5.
#[test]
fn attention_op_matches_burn_ops_with_a_query_that_sees_nothing() {
    use ov3_core::model::attention::scaled_dot_product_attention;
    let Some(device) = wgpu_device() else { return };
    let device = device.autodiff();
    let [b, h, n, dh] = [2, 2, 9, 32];
    let mask = padding(&[5, 0], n, &device);
    let qkv = Tensor::<3>::random([b, n, 3 * h * dh], Distribution::Normal(0.0, 1.0), &device);
    let w = Tensor::<3>::random([b, n, h * dh], Distribution::Normal(0.0, 1.0), &device);
    let masks = mask.prepare(n, &device);

    let run = |burn_ops: bool| {
        let qkv = qkv.clone().require_grad();
        let out = if burn_ops {
            let x = qkv.clone().reshape([b, n, 3, h, dh]).permute([2, 0, 3, 1, 4]);
            let part = |i: usize| x.clone().narrow(0, i, 1).reshape([b, h, n, dh]);
            let heads = scaled_dot_product_attention(part(0), part(1), part(2), masks.dense.clone());
            heads.swap_dims(1, 2).reshape([b, n, h * dh])
        } else {
            ov3_core::gpu_ops::attention(qkv.clone(), h, &masks, false)
        };
        let grads = (out.clone() * w.clone()).sum().backward();
        (to_f64(&out), to_f64(&qkv.grad(&grads).expect("a gradient")))
    };
    let ((out, grad), (burn_out, burn_grad)) = (run(false), run(true));
    // The second sequence's queries see only padding: uniform weights over all nine values.
    let at = |i: usize, c: usize| burn_out[(n + i) * h * dh + c];
    assert!((at(0, 0) - at(8, 0)).abs() < 1e-6, "all-padding rows: uniform weights, equal outputs");
    assert!(rel_err(&out, &burn_out) < 1e-5, "output: {:.2e}", rel_err(&out, &burn_out));
    assert!(rel_err(&grad, &burn_grad) < 1e-5, "gradient: {:.2e}", rel_err(&grad, &burn_grad));
}

#[test]
fn tiles_fit_the_adapter_limits() {
    // WebGPU's default limits (16 KiB of workgroup memory, 256 invocations) and a roomier adapter.
    for (shared, invocations) in [(16_384, 256), (32_768, 1024), (65_536, 64)] {
        for head_dim in [32, 64, 128, 256] {
            let t = Tiles::choose(head_dim, shared, invocations, 1);
            let bytes = (2 * t.cols as usize * head_dim + 2 * t.cols as usize) * 4;
            assert!(bytes <= shared, "Dh {head_dim}: {bytes} bytes of workgroup memory > {shared}");
            assert!(t.rows <= invocations && t.rows.is_power_of_two() && t.cols.is_power_of_two());
            // Doubling the tile would not fit (or it is already at the cap of 64).
            let doubled = (4 * t.cols as usize * head_dim + 4 * t.cols as usize) * 4;
            assert!(t.cols == 64 || doubled > shared, "Dh {head_dim}: tile of {} rows is not the largest", t.cols);
        }
    }
    assert_eq!(Tiles::choose(128, 16_384, 256, 1).cols, 8);
    // A split takes lanes that divide the head's vec4s and the workgroup's rows, halving until it does.
    assert_eq!(Tiles::choose(64, 16_384, 256, 4).split, 4);
    assert_eq!(Tiles::choose(8, 16_384, 256, 4).split, 2, "Dh 8: two vec4s a row");
    assert_eq!(Tiles::choose(12, 16_384, 256, 4).split, 1, "Dh 12: three vec4s a row");
    assert_eq!(Tiles::choose(64, 16_384, 2, 4).split, 2, "two invocations a workgroup");
}

/// The whole model through the fused kernels: every loss term and the gradients of the attention
/// weights of all four towers equal the reference path's (same weights, same batch). Tolerance 1e-3:
/// the two paths sum in different orders over several layers.
#[test]
fn model_losses_and_gradients_match_the_reference_path() {
    use burn::module::Module;
    use ov3_core::config::{AttentionImpl, Preset};
    use ov3_core::model::{Frozen, LossWeights, Ov3};
    use ov3_core::random_batch::random_batch;

    let Some(device) = wgpu_device() else { return };
    let device = device.autodiff();
    let cfg = Preset::Tiny.config();
    let fused = after_one_step(Ov3::new(&cfg, &device), &cfg, &device).with_attention(AttentionImpl::Fused);
    let reference = Ov3::new(&cfg, &device).load_record(fused.clone().into_record());
    let batch = random_batch(&cfg, 3, 64, &device);

    let run = |model: &Ov3| {
        let out = model.losses(&batch, &LossWeights::default(), Noise::NONE, Frozen::default(), &Single);
        let terms = [out.total.clone(), out.caption.clone(), out.contrastive.clone()];
        let grads = out.total.backward();
        let weights = [
            &model.encoder.blocks[0].attn.qkv.weight,
            &model.decoder.blocks[0].attn.qkv.weight,
            &model.text_encoder.blocks[0].attn.qkv.weight,
            &model.text_decoder.blocks[0].attn.qkv.weight,
        ];
        let grads: Vec<Vec<f64>> = weights.iter().map(|w| to_f64(&w.grad(&grads).expect("a gradient"))).collect();
        (terms.iter().map(|t| to_f64(t)[0]).collect::<Vec<f64>>(), grads)
    };
    let (ref_terms, ref_grads) = run(&reference);
    // One row per lane, and rows split over the most lanes the adapter runs.
    let most = *splits().last().expect("split 1");
    for lanes in if most > 1 { vec![1, most] } else { vec![1] } {
        let (fused_terms, fused_grads) = with_split(lanes, || run(&fused));
        for (name, (a, r)) in ["total", "caption", "contrastive"].iter().zip(fused_terms.iter().zip(&ref_terms)) {
            assert!((a - r).abs() <= 1e-3 * r.abs().max(1.0), "split {lanes}, {name} loss: fused {a} vs reference {r}");
        }
        for (tower, (a, r)) in
            ["encoder", "decoder", "text encoder", "text decoder"].iter().zip(fused_grads.iter().zip(&ref_grads))
        {
            let err = rel_err(a, r);
            assert!(err < 1e-3, "split {lanes}, {tower} attention weight gradient: relative error {err:.2e}");
        }
    }
}
