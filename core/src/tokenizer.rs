//! The built-in byte-level tokenizer: UTF-8 bytes are tokens 0..=255, then BOS, EOS and PAD.
//! Needs no vocabulary file, so it works everywhere, the browser included.

pub const BOS: usize = 256;
pub const EOS: usize = 257;
pub const PAD: usize = 258;
pub const VOCAB_SIZE: usize = 259;

/// `BOS bytes.. EOS PAD..` of exactly `context_length` ids. Captions too long are cut so EOS is kept.
pub fn encode(text: &str, context_length: usize) -> Vec<usize> {
    assert!(context_length >= 2, "context length must hold BOS and EOS");
    let body = text.as_bytes().iter().take(context_length - 2).map(|&b| b as usize);
    let mut ids: Vec<usize> = std::iter::once(BOS).chain(body).chain(std::iter::once(EOS)).collect();
    ids.resize(context_length, PAD);
    ids
}

/// The text of the ids up to the first EOS or PAD; invalid UTF-8 is replaced, never a panic.
pub fn decode(ids: &[usize]) -> String {
    let bytes: Vec<u8> = ids
        .iter()
        .skip_while(|&&id| id == BOS)
        .take_while(|&&id| id != EOS && id != PAD)
        .filter(|&&id| id < 256)
        .map(|&id| id as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
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
    fn multibyte_text_cut_mid_character_decodes_without_panic() {
        let ids = encode("héllo", 4); // BOS, 'h', first byte of 'é', EOS
        assert_eq!(decode(&ids), "h\u{FFFD}");
    }
}
