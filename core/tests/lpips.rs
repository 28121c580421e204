//! LPIPS against the PyPI `lpips` package (fixtures: tests/fixtures/make_lpips_fixtures.py, float64
//! reference, reduced-width random trunks). Tolerance: relative error < 1e-4 per image.

mod common;

use std::path::PathBuf;

use burn::tensor::{Device, Tensor};
use ov3_core::losses::Perceptual;
use ov3_core::lpips::Lpips;
use ov3_core::weights::Weights;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/lpips").join(name)
}

fn input(name: &str, device: &Device) -> Tensor<4> {
    let w = Weights::open(&fixture("inputs.safetensors")).expect("fixture");
    w.tensor(name, [2, 3, 64, 64], device).expect("input tensor")
}

fn expected(net: &str) -> Vec<f32> {
    let w = Weights::open(&fixture("inputs.safetensors")).expect("fixture");
    w.values(&format!("expected_{net}"), &[2]).expect("expected distances")
}

#[test]
fn lpips_vgg_and_alex_match_the_reference() {
    for (name, device) in common::devices() {
        for net in ["vgg", "alex"] {
            let model = Lpips::load(
                &fixture(&format!("{net}_trunk.safetensors")),
                &fixture(&format!("{net}_heads.safetensors")),
                &device,
            )
            .expect("loads");
            let d = model.forward(input("x", &device), input("y", &device));
            let ours = d.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
            for (o, e) in ours.iter().zip(expected(net)) {
                let rel = ((o - e) / e).abs();
                assert!(rel < 1e-4, "{name} {net}: {o} vs reference {e} (relative error {rel:.2e})");
            }
            // Identical images are at distance 0.
            let same = model.forward(input("x", &device), input("x", &device)).abs().max().into_scalar::<f32>();
            assert!(same < 1e-6, "{name} {net}: d(x, x) = {same}");
        }
    }
}

#[test]
fn lpips_is_a_differentiable_loss_with_frozen_weights() {
    let device = Device::flex().autodiff();
    let model =
        Lpips::load(&fixture("vgg_trunk.safetensors"), &fixture("vgg_heads.safetensors"), &device).expect("loads");
    let y = input("y", &device).require_grad();
    let loss = model.distance(input("x", &device), y.clone());
    let grads = loss.backward();
    let g = y.grad(&grads).expect("gradient reaches the image");
    let norm = g.abs().sum().into_scalar::<f32>();
    assert!(norm.is_finite() && norm > 0.0, "gradient norm {norm}");
    assert!(model.convs[0].weight.val().grad(&grads).is_none(), "the trunk must stay frozen");
}

#[test]
fn wrong_files_are_refused_with_a_reason() {
    let device = Device::flex();
    let err = Lpips::load(&fixture("vgg_heads.safetensors"), &fixture("vgg_heads.safetensors"), &device).unwrap_err();
    assert!(err.to_string().contains("features.0.weight"), "{err}");
    let err = Lpips::load(&fixture("vgg_trunk.safetensors"), &fixture("alex_heads.safetensors"), &device).unwrap_err();
    assert!(err.to_string().contains("lin"), "{err}");
}
