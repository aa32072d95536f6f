//! Byte-level tokenizer.
//!
//! The bundled tiny model is trained from scratch, so it does not need a pretrained vocabulary;
//! a byte-level vocabulary needs no download, can encode any UTF-8 text without unknown tokens,
//! and keeps the embedding table small (259 rows).
//!
//! Ids `0..=255` are the raw bytes of the UTF-8 encoding; three special ids follow them.

/// Beginning-of-sequence id, prepended to every training example.
pub const BOS_ID: u32 = 256;
/// End-of-sequence id, appended after the response so the model learns to stop.
pub const EOS_ID: u32 = 257;
/// Padding id used to right-pad a batch; its label is always ignored by the loss.
pub const PAD_ID: u32 = 258;
/// Number of ids: 256 bytes plus BOS, EOS and PAD.
pub const VOCAB_SIZE: usize = 259;

/// Byte-level tokenizer: one id per UTF-8 byte, plus [`BOS_ID`], [`EOS_ID`] and [`PAD_ID`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ByteTokenizer;

impl ByteTokenizer {
    /// Creates the tokenizer (it has no state).
    #[must_use]
    pub const fn new() -> Self {
        Self
    }

    /// Number of distinct ids (the model's embedding and output size): 259.
    #[must_use]
    pub const fn vocab_size(&self) -> usize {
        VOCAB_SIZE
    }

    /// Beginning-of-sequence id.
    #[must_use]
    pub const fn bos_id(&self) -> u32 {
        BOS_ID
    }

    /// End-of-sequence id.
    #[must_use]
    pub const fn eos_id(&self) -> u32 {
        EOS_ID
    }

    /// Padding id.
    #[must_use]
    pub const fn pad_id(&self) -> u32 {
        PAD_ID
    }

    /// Whether `id` is one of the special ids (or lies outside the vocabulary).
    #[must_use]
    pub const fn is_special(&self, id: u32) -> bool {
        id > 255
    }

    /// Encodes `text` as its UTF-8 bytes. No special ids are added: callers decide where
    /// BOS/EOS go (see [`crate::data`]).
    #[must_use]
    pub fn encode(&self, text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }

    /// Decodes ids back to text, skipping special and out-of-vocabulary ids.
    ///
    /// Lossy: a model can emit byte sequences that are not valid UTF-8 (for example a truncated
    /// multi-byte character); those become U+FFFD instead of failing generation.
    #[must_use]
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids.iter().filter_map(|&id| u8::try_from(id).ok()).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocab_and_special_ids() {
        let tok = ByteTokenizer::new();
        assert_eq!(tok.vocab_size(), 259);
        assert_eq!((tok.bos_id(), tok.eos_id(), tok.pad_id()), (256, 257, 258));
        // Every id must index into the embedding table.
        for id in [BOS_ID, EOS_ID, PAD_ID] {
            assert!((id as usize) < tok.vocab_size());
            assert!(tok.is_special(id));
        }
        assert!(!tok.is_special(255));
        assert!(!tok.is_special(0));
    }

    #[test]
    fn encode_is_utf8_bytes() {
        let tok = ByteTokenizer::new();
        assert_eq!(tok.encode("Hi!"), vec![72, 105, 33]);
        assert_eq!(tok.encode(""), Vec::<u32>::new());
        // 'é' is two bytes in UTF-8.
        assert_eq!(tok.encode("é"), vec![0xC3, 0xA9]);
    }

    #[test]
    fn roundtrip() {
        let tok = ByteTokenizer::new();
        for text in [
            "",
            "Add the two numbers.\n17 + 25",
            "naïve café ☕",
            "tab\tand\nnewline",
        ] {
            assert_eq!(tok.decode(&tok.encode(text)), text);
        }
    }

    #[test]
    fn decode_skips_specials() {
        let tok = ByteTokenizer::new();
        let mut ids = vec![BOS_ID];
        ids.extend(tok.encode("42"));
        ids.extend([EOS_ID, PAD_ID, PAD_ID, 9999]);
        assert_eq!(tok.decode(&ids), "42");
    }

    #[test]
    fn decode_is_lossy_on_invalid_utf8() {
        let tok = ByteTokenizer::new();
        // A lone continuation byte and a truncated two-byte sequence.
        assert_eq!(tok.decode(&[0x61, 0x80, 0x62]), "a\u{FFFD}b");
        assert_eq!(tok.decode(&[0xC3]), "\u{FFFD}");
    }
}
