//! Caption tokenizers. The built-in byte-level one (UTF-8 bytes are tokens 0..=255, then BOS, EOS and PAD)
//! needs no vocabulary file, so it works everywhere, the browser included; it is the default. A word-level
//! one over a closed vocabulary (the embedded world's: `synthetic-words`) gives the same captions in a
//! quarter of the tokens, so the text towers cost a quarter as much. For real data, a HuggingFace
//! `tokenizer.json` (CLIP's, BERT's, a BPE of your own) through the `tokenizers` crate (native builds only).
//! Either way a caption becomes `BOS ids.. EOS PAD..` of the context length, and a model file carries its
//! tokenizer so that it always reads text the way it was trained.

use std::collections::HashMap;
use std::sync::Arc;

use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::config::ModelConfig;

pub const BOS: usize = 256;
pub const EOS: usize = 257;
pub const PAD: usize = 258;
pub const VOCAB_SIZE: usize = 259;

/// How the byte-level tokenizer is named in model files.
pub const BYTES_SPEC: &str = "bytes";
/// Prefix of a HuggingFace tokenizer in model files: `huggingface:` + the `tokenizer.json` text.
pub const HF_PREFIX: &str = "huggingface:";
/// Prefix of a word-level tokenizer in model files: `words:` + its vocabulary, space-separated.
pub const WORDS_PREFIX: &str = "words:";
/// The word that stands for every word outside a word-level vocabulary (always id 0).
pub const UNKNOWN_WORD: &str = "<unk>";

/// `BOS bytes.. EOS PAD..` of exactly `context_length` ids. Captions too long are cut so EOS is kept.
pub fn encode(text: &str, context_length: usize) -> Vec<usize> {
    wrap(text.as_bytes().iter().map(|&b| b as usize), [BOS, EOS, PAD], context_length)
}

/// The text of the ids up to the first EOS or PAD; invalid UTF-8 is replaced, never a panic.
pub fn decode(ids: &[usize]) -> String {
    let bytes: Vec<u8> = body(ids, [BOS, EOS, PAD]).filter(|&id| id < 256).map(|id| id as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `BOS body.. EOS PAD..`, the body cut to fit.
fn wrap(body: impl Iterator<Item = usize>, [bos, eos, pad]: [usize; 3], context_length: usize) -> Vec<usize> {
    assert!(context_length >= 2, "context length must hold BOS and EOS");
    let mut ids: Vec<usize> =
        std::iter::once(bos).chain(body.take(context_length - 2)).chain(std::iter::once(eos)).collect();
    ids.resize(context_length, pad);
    ids
}

/// The ids between a leading BOS and the first EOS or PAD.
fn body(ids: &[usize], [bos, eos, pad]: [usize; 3]) -> impl Iterator<Item = usize> + '_ {
    ids.iter().copied().skip_while(move |&id| id == bos).take_while(move |&id| id != eos && id != pad)
}

/// The tokenizer of a model.
#[derive(Clone, Debug, Default)]
pub enum Tokenizer {
    #[default]
    Bytes,
    Words(Arc<Words>),
    #[cfg(not(target_arch = "wasm32"))]
    HuggingFace(Arc<HuggingFace>),
}

/// One id per whitespace-separated word of a closed vocabulary: `<unk>` is 0, then the vocabulary in order,
/// then BOS, EOS and PAD.
#[derive(Debug)]
pub struct Words {
    vocab: Vec<String>,
    ids: HashMap<String, usize>,
}

/// A HuggingFace tokenizer with the special ids ov3 uses. Ids it lacks (BOS, EOS or PAD) are appended after
/// its vocabulary, so that the three are always distinct: the text encoder pools at the first EOS and the
/// caption loss ignores PAD.
#[cfg(not(target_arch = "wasm32"))]
#[derive(Debug)]
pub struct HuggingFace {
    inner: tokenizers::Tokenizer,
    json: String,
    /// BOS, EOS, PAD.
    special: [usize; 3],
    vocab_size: usize,
}

/// Special tokens looked up by name, most common spellings first.
#[cfg(not(target_arch = "wasm32"))]
const BOS_NAMES: &[&str] = &["<|startoftext|>", "<s>", "<bos>", "[CLS]", "<|begin_of_text|>"];
#[cfg(not(target_arch = "wasm32"))]
const EOS_NAMES: &[&str] = &["<|endoftext|>", "</s>", "<eos>", "[SEP]", "<|end_of_text|>"];
#[cfg(not(target_arch = "wasm32"))]
const PAD_NAMES: &[&str] = &["<pad>", "[PAD]", "<|pad|>"];

impl Tokenizer {
    /// A HuggingFace `tokenizer.json` file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, String> {
        let json = std::fs::read_to_string(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        Self::from_json(json).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// A word-level tokenizer over `vocab` (words without whitespace, no repeats; `<unk>` is added first).
    pub fn words<S: AsRef<str>>(vocab: &[S]) -> Result<Self, String> {
        let mut words = vec![UNKNOWN_WORD.to_string()];
        let mut ids = HashMap::from([(UNKNOWN_WORD.to_string(), 0)]);
        for w in vocab.iter().map(AsRef::as_ref).filter(|&w| w != UNKNOWN_WORD) {
            if w.is_empty() || w.contains(char::is_whitespace) {
                return Err(format!("vocabulary word `{w}` is empty or holds whitespace"));
            }
            if ids.insert(w.to_string(), words.len()).is_some() {
                return Err(format!("vocabulary word `{w}` appears twice"));
            }
            words.push(w.to_string());
        }
        Ok(Self::Words(Arc::new(Words { vocab: words, ids })))
    }

    /// What a model file stores (`bytes`, `words:` + vocabulary, or `huggingface:` + JSON) back to a tokenizer.
    pub fn from_spec(spec: &str) -> Result<Self, String> {
        if let Some(vocab) = spec.strip_prefix(WORDS_PREFIX) {
            return Self::words(&vocab.split(' ').collect::<Vec<_>>());
        }
        match spec.strip_prefix(HF_PREFIX) {
            None if spec == BYTES_SPEC => Ok(Self::Bytes),
            None => Err(format!("unknown tokenizer `{}`", spec.chars().take(40).collect::<String>())),
            Some(json) => Self::from_json(json.to_string()),
        }
    }

    #[cfg(not(target_arch = "wasm32"))]
    fn from_json(json: String) -> Result<Self, String> {
        let inner: tokenizers::Tokenizer =
            json.parse().map_err(|e| format!("not a HuggingFace tokenizer.json: {e}"))?;
        let size = inner.get_vocab_size(true);
        let find = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n)).map(|id| id as usize);
        let mut next = size;
        let mut or_new = |found: Option<usize>| {
            found.unwrap_or_else(|| {
                next += 1;
                next - 1
            })
        };
        let bos = or_new(find(BOS_NAMES));
        let eos = or_new(find(EOS_NAMES).filter(|&e| e != bos));
        let pad = or_new(find(PAD_NAMES).filter(|&p| p != bos && p != eos));
        Ok(Self::HuggingFace(Arc::new(HuggingFace { inner, json, special: [bos, eos, pad], vocab_size: next })))
    }

    #[cfg(target_arch = "wasm32")]
    fn from_json(_json: String) -> Result<Self, String> {
        Err("this model uses a HuggingFace tokenizer; the browser build reads byte-level models only".into())
    }

    /// What a model file stores.
    pub fn spec(&self) -> String {
        match self {
            Self::Bytes => BYTES_SPEC.to_string(),
            Self::Words(w) => format!("{WORDS_PREFIX}{}", w.vocab.join(" ")),
            #[cfg(not(target_arch = "wasm32"))]
            Self::HuggingFace(hf) => format!("{HF_PREFIX}{}", hf.json),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Self::Bytes => "byte-level".to_string(),
            Self::Words(w) => format!("word-level ({} words)", w.vocab.len()),
            #[cfg(not(target_arch = "wasm32"))]
            Self::HuggingFace(hf) => format!("HuggingFace tokenizer.json ({} ids)", hf.vocab_size),
        }
    }

    /// BOS, EOS, PAD.
    pub fn special(&self) -> [usize; 3] {
        match self {
            Self::Bytes => [BOS, EOS, PAD],
            Self::Words(w) => [0, 1, 2].map(|k| w.vocab.len() + k),
            #[cfg(not(target_arch = "wasm32"))]
            Self::HuggingFace(hf) => hf.special,
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Bytes => VOCAB_SIZE,
            Self::Words(w) => w.vocab.len() + 3,
            #[cfg(not(target_arch = "wasm32"))]
            Self::HuggingFace(hf) => hf.vocab_size,
        }
    }

    /// The model config's vocabulary and special ids set to this tokenizer's.
    pub fn configure(&self, cfg: &mut ModelConfig) {
        cfg.vocab_size = self.vocab_size();
        [cfg.bos_id, cfg.eos_id, cfg.pad_id] = self.special();
    }

    /// Whether `cfg` was made for this tokenizer.
    pub fn matches(&self, cfg: &ModelConfig) -> bool {
        cfg.vocab_size == self.vocab_size() && [cfg.bos_id, cfg.eos_id, cfg.pad_id] == self.special()
    }

    /// `BOS ids.. EOS PAD..` of exactly `context_length` ids, the text cut so that EOS is kept.
    pub fn encode(&self, text: &str, context_length: usize) -> Vec<usize> {
        match self {
            Self::Bytes => encode(text, context_length),
            Self::Words(w) => {
                let ids = text.split_whitespace().map(|word| w.ids.get(word).copied().unwrap_or(0));
                wrap(ids, self.special(), context_length)
            }
            #[cfg(not(target_arch = "wasm32"))]
            Self::HuggingFace(hf) => {
                // A caption the tokenizer cannot encode trains as an empty one rather than stopping the run.
                let ids = hf.inner.encode(text, false).map(|e| e.get_ids().to_vec()).unwrap_or_default();
                wrap(ids.into_iter().map(|id| id as usize), hf.special, context_length)
            }
        }
    }

    /// The text up to the first EOS or PAD.
    pub fn decode(&self, ids: &[usize]) -> String {
        match self {
            Self::Bytes => decode(ids),
            Self::Words(w) => {
                let words: Vec<&str> =
                    body(ids, self.special()).filter_map(|id| w.vocab.get(id)).map(|s| s.as_str()).collect();
                words.join(" ")
            }
            #[cfg(not(target_arch = "wasm32"))]
            Self::HuggingFace(hf) => {
                let own = hf.inner.get_vocab_size(true);
                let ids: Vec<u32> = body(ids, hf.special).filter(|&id| id < own).map(|id| id as u32).collect();
                hf.inner.decode(&ids, true).unwrap_or_default()
            }
        }
    }

    /// Token ids `[B, context_length]` for `texts`.
    pub fn batch(&self, texts: &[String], context_length: usize, device: &Device) -> Tensor<2, Int> {
        let ids: Vec<i64> = texts.iter().flat_map(|t| self.encode(t, context_length)).map(|id| id as i64).collect();
        Tensor::from_data(TensorData::new(ids, [texts.len(), context_length]), device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_truncation_keep_eos() {
        let ids = encode("a red circle", 20);
        assert_eq!(ids.len(), 20);
        assert_eq!((ids[0], ids[13], ids[14]), (BOS, EOS, PAD));
        assert_eq!(decode(&ids), "a red circle");
        let cut = encode("abcdefgh", 5);
        assert_eq!(cut, vec![BOS, 97, 98, 99, EOS]);
        assert_eq!(decode(&cut), "abc");
    }

    #[test]
    fn words_round_trip_with_unknown_words_and_truncation() {
        let tok = Tokenizer::words(&["a", "red", "circle"]).expect("valid vocabulary");
        assert_eq!(tok.special(), [4, 5, 6]);
        assert_eq!(tok.encode("a  red circle", 7), vec![4, 1, 2, 3, 5, 6, 6]);
        assert_eq!(tok.decode(&tok.encode("a red circle", 7)), "a red circle");
        assert_eq!(tok.decode(&tok.encode("a blue circle", 7)), "a <unk> circle");
        assert_eq!(tok.encode("a red circle", 4), vec![4, 1, 2, 5]);
        let back = Tokenizer::from_spec(&tok.spec()).expect("spec round trip");
        assert_eq!(back.encode("red circle a", 6), tok.encode("red circle a", 6));
        assert!(Tokenizer::words(&["a", "a"]).is_err());
        assert!(Tokenizer::words(&["two words"]).is_err());
        assert!(Tokenizer::from_spec("words:").is_err());
    }

    #[test]
    fn multibyte_text_cut_mid_character_decodes_without_panic() {
        let ids = encode("héllo", 4); // BOS, 'h', first byte of 'é', EOS
        assert_eq!(decode(&ids), "h\u{FFFD}");
    }
}
