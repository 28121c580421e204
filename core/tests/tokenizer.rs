//! HuggingFace tokenizer.json support, against ids computed by the reference `tokenizers` package
//! (tests/fixtures/make_tokenizer_fixture.py), and the tokenizer's trip through a model file.

use std::path::PathBuf;

use burn::tensor::Device;
use ov3_core::Preset;
use ov3_core::model::Ov3;
use ov3_core::model_file::{load_model, save_model};
use ov3_core::tokenizer::Tokenizer;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizer").join(name)
}

fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("expected.json")).expect("fixture")).expect("json")
}

fn ids(v: &serde_json::Value) -> Vec<usize> {
    v.as_array().expect("ids").iter().map(|i| i.as_u64().expect("id") as usize).collect()
}

#[test]
fn encodes_like_the_reference_and_wraps_in_special_ids() {
    let tok = Tokenizer::from_file(&fixture("tokenizer.json")).expect("loads");
    let e = expected();
    let (bos, eos) = (e["bos"].as_u64().unwrap() as usize, e["eos"].as_u64().unwrap() as usize);
    let own = e["vocab_size"].as_u64().unwrap() as usize;
    // No pad token in this tokenizer: one id is appended after its vocabulary.
    assert_eq!(tok.special(), [bos, eos, own]);
    assert_eq!(tok.vocab_size(), own + 1);
    for probe in e["probes"].as_array().unwrap() {
        let text = probe["text"].as_str().unwrap();
        let body = ids(&probe["ids"]);
        let got = tok.encode(text, 64);
        let mut want = vec![bos];
        want.extend(&body);
        want.push(eos);
        want.resize(64, own);
        assert_eq!(got, want, "{text:?}");
        assert_eq!(tok.decode(&got), probe["decoded"].as_str().unwrap(), "{text:?}");
    }
}

#[test]
fn long_captions_are_cut_keeping_eos() {
    let tok = Tokenizer::from_file(&fixture("tokenizer.json")).expect("loads");
    let e = expected();
    let body = ids(&e["probes"][0]["ids"]);
    let [bos, eos, _] = tok.special();
    assert_eq!(tok.encode(e["probes"][0]["text"].as_str().unwrap(), 5), vec![bos, body[0], body[1], body[2], eos]);
}

#[test]
fn bad_tokenizer_files_are_refused_with_a_reason() {
    let dir = ov3_core::fsio::ScratchDir::new().expect("tmp");
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, "{ not json").expect("write");
    let err = Tokenizer::from_file(&path).expect_err("refused");
    assert!(err.contains("tokenizer.json") && err.contains("not a HuggingFace tokenizer.json"), "{err}");
    assert!(Tokenizer::from_file(&dir.path().join("missing.json")).expect_err("refused").contains("cannot read"));
    assert!(Tokenizer::from_spec("sentencepiece").is_err());
}

#[test]
fn a_model_file_carries_its_tokenizer() {
    let device = Device::flex();
    let tok = Tokenizer::from_file(&fixture("tokenizer.json")).expect("loads");
    let mut cfg = Preset::Tiny.config();
    tok.configure(&mut cfg);
    let mut model = Ov3::new(&cfg, &device);
    model.tokenizer = tok.clone();
    let dir = ov3_core::fsio::ScratchDir::new().expect("tmp");
    let path = dir.path().join("model.safetensors");
    save_model(&path, &model, &cfg).expect("saves");
    let (loaded, loaded_cfg) = load_model(&path, &device).expect("loads");
    assert_eq!(loaded.tokenizer.spec(), tok.spec());
    assert_eq!(loaded_cfg.vocab_size, tok.vocab_size());
    assert_eq!(loaded.tokenizer.encode("a red circle", 16), tok.encode("a red circle", 16));

    // A byte-level model cannot be paired with this tokenizer: the vocabularies differ.
    let bytes_cfg = Preset::Tiny.config();
    let mut wrong = Ov3::new(&bytes_cfg, &device);
    wrong.tokenizer = tok;
    save_model(&path, &wrong, &bytes_cfg).expect("saves");
    let err = load_model(&path, &device).expect_err("refused").to_string();
    assert!(err.contains("does not fit its HuggingFace tokenizer"), "{err}");
}
