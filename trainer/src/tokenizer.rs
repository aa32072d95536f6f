//! Tokenizers: the bundled byte-level one and Hugging Face `tokenizer.json` files.
//!
//! The bundled tiny model is trained from scratch, so it does not need a pretrained vocabulary;
//! a byte-level vocabulary needs no download, can encode any UTF-8 text without unknown tokens,
//! and keeps the embedding table small (259 rows). Ids `0..=255` are the raw bytes of the UTF-8
//! encoding; three special ids follow them.
//!
//! A pretrained model (`--model-path`) brings its own `tokenizer.json`, read with the `tokenizers`
//! crate (built without oniguruma or the hub client: pure Rust, no network). [`Tokenizer`] hides which
//! of the two is in use from the data pipeline.

use std::path::{Path, PathBuf};

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

/// Why a `tokenizer.json` cannot be used with a model. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The file could not be read.
    #[error("cannot read tokenizer {}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid `tokenizer.json`.
    #[error("invalid tokenizer {}: {message}", .path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's reason.
        message: String,
    },
    /// The tokenizer can produce ids the model has no embedding row for.
    #[error(
        "tokenizer {} has {tokenizer_vocab} tokens (added tokens included) but the model's vocab_size is {model_vocab}",
        .path.display()
    )]
    VocabTooLarge {
        /// The file.
        path: PathBuf,
        /// Tokens of the tokenizer.
        tokenizer_vocab: usize,
        /// `vocab_size` of the model config.
        model_vocab: usize,
    },
    /// A BOS or EOS id is neither in the model config nor found among the tokenizer's tokens.
    #[error(
        "no {which} token: the model config has no {which}_token_id and tokenizer {} has none of {candidates:?}",
        .path.display()
    )]
    NoSpecialToken {
        /// The file.
        path: PathBuf,
        /// `bos` or `eos`.
        which: &'static str,
        /// Token strings that were looked up.
        candidates: &'static [&'static str],
    },
    /// A BOS or EOS id lies outside the model's vocabulary.
    #[error("{which}_token_id {id} (from {origin}) is outside the model's vocab_size {model_vocab}")]
    SpecialOutOfVocab {
        /// `bos` or `eos`.
        which: &'static str,
        /// The id.
        id: u32,
        /// Where it came from (config.json or the tokenizer file).
        origin: String,
        /// `vocab_size` of the model config.
        model_vocab: usize,
    },
    /// Encoding or decoding failed inside the tokenizer.
    #[error("tokenizer {}: {message}", .path.display())]
    Encode {
        /// The file.
        path: PathBuf,
        /// The tokenizer's reason.
        message: String,
    },
}

/// Token strings tried, in order, when `config.json` has no `bos_token_id`.
pub const BOS_CANDIDATES: &[&str] = &["<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>"];
/// Token strings tried, in order, when `config.json` has no `eos_token_id`.
pub const EOS_CANDIDATES: &[&str] = &["</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<|im_end|>"];

/// A Hugging Face tokenizer with the special ids the trainer needs.
#[derive(Clone)]
pub struct HfTokenizer {
    inner: Box<tokenizers::Tokenizer>,
    path: PathBuf,
    bos: u32,
    eos: u32,
    vocab_size: usize,
}

impl std::fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfTokenizer")
            .field("path", &self.path)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("vocab_size", &self.vocab_size)
            .finish_non_exhaustive()
    }
}

impl HfTokenizer {
    /// Reads `path` (a `tokenizer.json`) for a model with `model_vocab` embedding rows.
    ///
    /// BOS/EOS come from the model config (`bos_token_id`/`eos_token_id`) when given, else from the
    /// first of [`BOS_CANDIDATES`]/[`EOS_CANDIDATES`] the tokenizer knows.
    ///
    /// # Errors
    /// [`TokenizerError`] naming the file: unreadable, not a tokenizer, vocabulary larger than the
    /// model's, or no usable BOS/EOS.
    pub fn from_file(
        path: &Path,
        model_vocab: usize,
        config_bos: Option<u32>,
        config_eos: Option<u32>,
    ) -> Result<Self, TokenizerError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io { path: path.to_path_buf(), source })?;
        let inner: tokenizers::Tokenizer = text
            .parse()
            .map_err(|e: tokenizers::Error| TokenizerError::Parse { path: path.to_path_buf(), message: e.to_string() })?;
        let tokenizer_vocab = inner.get_vocab_size(true);
        if tokenizer_vocab > model_vocab {
            return Err(TokenizerError::VocabTooLarge { path: path.to_path_buf(), tokenizer_vocab, model_vocab });
        }
        let special = |which: &'static str, from_config: Option<u32>, candidates: &'static [&'static str]| {
            let (id, origin) = match from_config {
                Some(id) => (id, "config.json".to_owned()),
                None => {
                    let id = candidates.iter().find_map(|t| inner.token_to_id(t)).ok_or_else(|| {
                        TokenizerError::NoSpecialToken { path: path.to_path_buf(), which, candidates }
                    })?;
                    (id, path.display().to_string())
                }
            };
            if id as usize >= model_vocab {
                return Err(TokenizerError::SpecialOutOfVocab { which, id, origin, model_vocab });
            }
            Ok(id)
        };
        let bos = special("bos", config_bos, BOS_CANDIDATES)?;
        let eos = special("eos", config_eos, EOS_CANDIDATES)?;
        Ok(Self { inner: Box::new(inner), path: path.to_path_buf(), bos, eos, vocab_size: model_vocab })
    }

    /// The file the tokenizer was read from.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The wrapped `tokenizers` tokenizer.
    #[must_use]
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// The tokenizer of a training run.
#[derive(Debug, Clone)]
pub enum Tokenizer {
    /// The bundled byte-level tokenizer (for the tiny model trained from scratch).
    Bytes(ByteTokenizer),
    /// A `tokenizer.json` from a pretrained model directory.
    Hf(HfTokenizer),
}

impl Default for Tokenizer {
    fn default() -> Self {
        Self::Bytes(ByteTokenizer::new())
    }
}

impl From<ByteTokenizer> for Tokenizer {
    fn from(t: ByteTokenizer) -> Self {
        Self::Bytes(t)
    }
}

impl Tokenizer {
    /// Number of ids the model must be able to embed (for HF: the model's `vocab_size`).
    #[must_use]
    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Bytes(t) => t.vocab_size(),
            Self::Hf(t) => t.vocab_size,
        }
    }

    /// Beginning-of-sequence id.
    #[must_use]
    pub fn bos_id(&self) -> u32 {
        match self {
            Self::Bytes(t) => t.bos_id(),
            Self::Hf(t) => t.bos,
        }
    }

    /// End-of-sequence id.
    #[must_use]
    pub fn eos_id(&self) -> u32 {
        match self {
            Self::Bytes(t) => t.eos_id(),
            Self::Hf(t) => t.eos,
        }
    }

    /// Id written into right padding. Mixtral's tokenizer has no pad token, so HF tokenizers pad with
    /// EOS (as HF fine-tuning scripts do); batches carry an explicit padding mask, so the value is
    /// never mistaken for a real token.
    #[must_use]
    pub fn pad_id(&self) -> u32 {
        match self {
            Self::Bytes(t) => t.pad_id(),
            Self::Hf(t) => t.eos,
        }
    }

    /// Encodes `text` without any special token: the data pipeline adds exactly one BOS itself, so a
    /// tokenizer whose post-processor would prepend BOS cannot double it.
    ///
    /// # Errors
    /// [`TokenizerError::Encode`] if the HF tokenizer fails (the byte tokenizer cannot).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        match self {
            Self::Bytes(t) => Ok(t.encode(text)),
            Self::Hf(t) => t
                .inner
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| TokenizerError::Encode { path: t.path.clone(), message: e.to_string() }),
        }
    }

    /// Decodes ids to text, skipping special tokens.
    ///
    /// # Errors
    /// [`TokenizerError::Encode`] if the HF tokenizer fails (the byte tokenizer cannot).
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        match self {
            Self::Bytes(t) => Ok(t.decode(ids)),
            Self::Hf(t) => t
                .inner
                .decode(ids, true)
                .map_err(|e| TokenizerError::Encode { path: t.path.clone(), message: e.to_string() }),
        }
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
