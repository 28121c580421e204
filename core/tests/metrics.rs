//! SSIM against scikit-image (fixtures from tests/fixtures/make_metric_fixtures.py); PSNR against float64
//! host code, and never a number for a NaN or infinite image.

mod common;

use std::path::PathBuf;

use burn::tensor::{Tensor, TensorData};
use ov3_core::image_io::load_rgb;
use ov3_core::metrics::{NonFiniteImage, psnr, psnr_db, ssim};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/metrics").join(name)
}

#[test]
fn ssim_matches_scikit_image_within_1e_3() {
    let expected: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(fixture("ssim.json")).expect("fixture")).expect("json");
    assert_eq!(expected.len(), 2);
    for (name, value) in expected {
        let a = load_rgb(&fixture(&format!("{name}_a.png"))).expect("png");
        let b = load_rgb(&fixture(&format!("{name}_b.png"))).expect("png");
        let (ours, theirs) = (ssim(&a, &b), value.as_f64().expect("number"));
        assert!((ours - theirs).abs() < 1e-3, "{name}: ours {ours}, scikit-image {theirs}");
        assert!((ssim(&a, &a) - 1.0).abs() < 1e-12, "{name}: an image against itself");
    }
}

/// PSNR per image against a float64 reference (clamp to [-1, 1], MSE on the [0, 1] scale), within 1e-3 dB;
/// then an image with one NaN pixel, and one with an infinite pixel, must give an error — a NaN error
/// used to become 120 dB (`f64::max` drops NaN), and a clamp may turn NaN into a bound on some backends.
#[test]
fn psnr_matches_float64_and_refuses_non_finite_images() {
    let (b, c, h, w) = (3usize, 3usize, 8usize, 8usize);
    let n = b * c * h * w;
    let x: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * 1.1).collect();
    let y: Vec<f32> = (0..n).map(|i| ((i * 53 % 97) as f32 / 48.0 - 1.0) * 1.1).collect();
    let reference: Vec<f64> = (0..b)
        .map(|k| {
            let per = c * h * w;
            let mse = (k * per..(k + 1) * per)
                .map(|i| {
                    let d = ((x[i] as f64).clamp(-1.0, 1.0) - (y[i] as f64).clamp(-1.0, 1.0)) / 2.0;
                    d * d
                })
                .sum::<f64>()
                / per as f64;
            -10.0 * mse.log10()
        })
        .collect();
    for (name, device) in common::devices() {
        let t = |v: &[f32]| Tensor::<4>::from_data(TensorData::new(v.to_vec(), [b, c, h, w]), &device);
        let ours = psnr(t(&x), t(&y)).expect("finite images have a PSNR");
        for (o, r) in ours.iter().zip(&reference) {
            assert!((o - r).abs() < 1e-3, "{name}: {o} dB vs float64 {r} dB");
        }
        for bad in [f32::NAN, f32::INFINITY] {
            let mut poisoned = y.clone();
            poisoned[c * h * w + 5] = bad; // image 1
            let err = psnr(t(&x), t(&poisoned)).expect_err("a non-finite pixel has no PSNR");
            assert!(err.0.is_nan(), "{name}: {bad}: {err}");
        }
    }
    assert!(matches!(psnr_db(f64::NAN), Err(NonFiniteImage(_))));
    assert!(psnr_db(-1.0).is_err());
    assert_eq!(psnr_db(0.0).unwrap(), 120.0);
}
