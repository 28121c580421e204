//! SSIM against scikit-image (fixtures from tests/fixtures/make_metric_fixtures.py).

use std::path::PathBuf;

use ov3_core::image_io::load_rgb;
use ov3_core::metrics::ssim;

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
