//! The VAE loaders against float64 references exported from diffusers (tests/fixtures/make_vae_fixtures.py),
//! one clear error per kind of bad weight file, and the earlier embedded autoencoders kept for their models.
//!
//! Tolerances: relative error (max abs diff / max abs reference) < 1e-4 for every file against the
//! reference computed from its own stored weights; a bf16 file against the f32 model's outputs < 5e-2.

mod common;

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor};
use common::{devices, rel_err, to_f64};
use ov3_core::autoencoder::LatentDecoder;
use ov3_core::vae::Vae;
use ov3_core::weights::Weights;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/vae")
}

fn reference(name: &str, shape: [usize; 4], device: &Device) -> Tensor<4> {
    let w = Weights::open(&fixtures().join("reference.safetensors")).expect("reference file");
    w.tensor(name, shape, device).expect("reference tensor")
}

fn check_set(set: &str, path: &Path, device_name: &str, device: &Device) {
    let vae = Vae::load(path, device).unwrap_or_else(|e| panic!("{set}: {e}"));
    let image = reference("image", [1, 3, 64, 64], device);
    let mean = vae.posterior_mean(image);
    let expect_mean = reference(&format!("{set}.mean"), [1, 16, 8, 8], device);
    let mean_err = rel_err(&to_f64(&mean), &to_f64(&expect_mean));
    let decoded = vae.decode_unscaled(expect_mean);
    let expect = reference(&format!("{set}.decoded"), [1, 3, 64, 64], device);
    let decoded_err = rel_err(&to_f64(&decoded), &to_f64(&expect));
    // Printed for the record (`-- --nocapture`): the closing notes quote them.
    eprintln!(
        "{set} ({}) on {device_name}: relative error mean {mean_err:.2e}, decoded {decoded_err:.2e}",
        path.display()
    );
    assert!(mean_err < 1e-4, "{set} on {device_name}: posterior mean relative error {mean_err:.2e}");
    assert!(decoded_err < 1e-4, "{set} on {device_name}: decoded image relative error {decoded_err:.2e}");
}

#[test]
fn every_layout_matches_its_float64_reference_on_cpu() {
    let device = Device::flex();
    let d = fixtures();
    check_set("flux_diffusers", &d.join("flux_diffusers"), "flex", &device);
    check_set("flux_diffusers", &d.join("flux_diffusers/diffusion_pytorch_model.safetensors"), "flex", &device);
    check_set("flux_bfl_bf16", &d.join("flux_bfl_bf16.safetensors"), "flex", &device);
    check_set("taef1_diffusers", &d.join("taef1_diffusers"), "flex", &device);
    check_set("taef1_original", &d.join("taef1_original"), "flex", &device);
}

#[test]
fn flux_and_taef1_match_on_wgpu() {
    for (name, device) in devices().into_iter().filter(|(n, _)| *n == "wgpu") {
        check_set("flux_bfl_bf16", &fixtures().join("flux_bfl_bf16.safetensors"), name, &device);
        check_set("taef1_original", &fixtures().join("taef1_original"), name, &device);
    }
}

#[test]
fn bf16_weights_stay_close_to_the_f32_model() {
    let device = Device::flex();
    let vae = Vae::load(&fixtures().join("flux_bfl_bf16.safetensors"), &device).expect("bf16 file loads");
    let mean = vae.posterior_mean(reference("image", [1, 3, 64, 64], &device));
    let err = rel_err(&to_f64(&mean), &to_f64(&reference("flux_diffusers.mean", [1, 16, 8, 8], &device)));
    eprintln!("bf16 file vs the f32 model's posterior mean: relative error {err:.2e}");
    assert!(err < 5e-2, "bf16 vs f32 posterior mean: relative error {err:.2e}");
}

#[test]
fn latent_decoder_speaks_the_scaled_convention() {
    let device = Device::flex();
    let vae = Vae::load(&fixtures().join("flux_diffusers"), &device).expect("loads");
    let image = reference("image", [1, 3, 64, 64], &device);
    let scaled = vae.encode(image.clone());
    let unscaled = vae.posterior_mean(image);
    assert!(rel_err(&to_f64(&scaled), &to_f64(&unscaled.clone().mul_scalar(0.3611))) < 1e-6);
    let a = LatentDecoder::decode(&vae, scaled);
    let b = vae.decode_unscaled(unscaled);
    assert!(rel_err(&to_f64(&a), &to_f64(&b)) < 1e-5);
}

/// Rewrites the BFL fixture with `edit` applied to its (name, shape, values) list.
fn edited(dir: &Path, name: &str, edit: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<f32>)>)) -> PathBuf {
    let w = Weights::open(&fixtures().join("flux_bfl_bf16.safetensors")).expect("fixture");
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = w
        .keys()
        .map(|k| {
            let shape = w.shape(k).expect("shape");
            (k.to_string(), shape.clone(), w.values(k, &shape).expect("values"))
        })
        .collect();
    edit(&mut tensors);
    let path = dir.join(name);
    let refs: Vec<(&str, Vec<usize>, Vec<f32>)> =
        tensors.iter().map(|(k, s, v)| (k.as_str(), s.clone(), v.clone())).collect();
    ov3_core::weights::save_f32(&path, &refs).expect("write edited file");
    path
}

/// The error of loading `path`, which must be a single line naming the file.
fn load_err(path: &Path) -> String {
    let msg = match Vae::load(path, &Device::flex()) {
        Ok(_) => panic!("{} loaded but should not", path.display()),
        Err(e) => e.to_string(),
    };
    assert_eq!(msg.lines().count(), 1, "not one line: {msg}");
    assert!(msg.contains(&*path.file_name().expect("file name").to_string_lossy()), "does not name the file: {msg}");
    msg
}

#[test]
fn bad_files_give_one_clear_line() {
    let dir = ov3_core::fsio::ScratchDir::new().expect("temp dir");
    let d = dir.path();

    std::fs::write(d.join("text.safetensors"), b"hello, I am not a tensor file").expect("write");
    let msg = load_err(&d.join("text.safetensors"));
    assert!(msg.contains("not a safetensors file"), "{msg}");

    let full = std::fs::read(fixtures().join("flux_bfl_bf16.safetensors")).expect("fixture");
    std::fs::write(d.join("cut.safetensors"), &full[..full.len() / 2]).expect("write");
    let msg = load_err(&d.join("cut.safetensors"));
    assert!(msg.contains("truncated"), "{msg}");

    let msg = load_err(&edited(d, "missing.safetensors", |t| t.retain(|(k, _, _)| k != "decoder.mid.attn_1.q.weight")));
    assert!(msg.contains("missing key `decoder.mid.attn_1.q.weight`"), "{msg}");

    let msg = load_err(&edited(d, "extra.safetensors", |t| {
        t.push(("decoder.extra_head.weight".into(), vec![2], vec![0.0; 2]))
    }));
    assert!(msg.contains("unexpected key `decoder.extra_head.weight`"), "{msg}");

    let msg = load_err(&edited(d, "shape.safetensors", |t| {
        let e = t.iter_mut().find(|(k, _, _)| k == "encoder.conv_out.bias").expect("key");
        e.1 = vec![31];
        e.2.truncate(31);
    }));
    assert!(msg.contains("shape mismatch for `encoder.conv_out.bias`: expected [32], found [31]"), "{msg}");

    let msg = load_err(&edited(d, "layout.safetensors", |t| t.iter_mut().for_each(|e| e.0 = format!("model.{}", e.0))));
    assert!(msg.contains("unknown layout"), "{msg}");

    let msg = load_err(&d.join("does-not-exist.safetensors"));
    assert!(msg.contains("cannot read"), "{msg}");
}

/// Each earlier embedded autoencoder kept in assets/ae/ has the identity its entry in `PREDECESSORS` gives (what
/// model files trained with it record), and a model naming it is refused with that file as the fix.
#[test]
fn the_kept_earlier_autoencoders_are_named_by_the_refusal_of_their_models() {
    use ov3_core::vae::VaeRecord;
    use ov3_core::vae::embedded::{PREDECESSORS, predecessor};
    let device = Device::flex();
    let embedded = Vae::embedded(&device).expect("the embedded autoencoder");
    assert!(predecessor(&embedded.identity()).is_none(), "today's embedded autoencoder is not a predecessor");
    let load = |file: &str| {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(file);
        Vae::load(&path, &device).unwrap_or_else(|e| panic!("{file}: {e}"))
    };
    let wrong: Vec<String> = PREDECESSORS
        .iter()
        .filter_map(|p| {
            (load(p.file).identity() != p.identity).then(|| format!("{}: {}", p.file, load(p.file).identity()))
        })
        .collect();
    assert!(wrong.is_empty(), "PREDECESSORS gives other identities than these files have: {wrong:?}");
    for p in PREDECESSORS {
        let vae = load(p.file);
        let record = VaeRecord { kind: vae.kind(), identity: p.identity.to_string(), source: "embedded".to_string() };
        let err = record.check(&embedded).expect_err("another autoencoder is refused");
        assert!(err.contains(&format!("--vae {}", p.file)) && err.contains(p.note), "{err}");
        assert!(record.check(&vae).is_ok(), "{}: accepted with its own file", p.file);
    }
    let unknown = VaeRecord { identity: "fnv64:0123456789abcdef".to_string(), ..embedded.record() };
    let err = unknown.check(&embedded).expect_err("an unknown embedded autoencoder is refused");
    assert!(PREDECESSORS.iter().all(|p| err.contains(p.file)), "an unknown one lists those kept: {err}");
}
