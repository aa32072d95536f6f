//! Alpaca-style instruction data: loading, prompt templating, tokenisation with loss masking,
//! padding and seeded shuffling into batches.
//!
//! Conventions (the same as Hugging Face `transformers` causal-LM training):
//! - `labels` are aligned with `input_ids` (not shifted); the loss shifts them by one position,
//!   predicting `labels[t + 1]` from the logits at position `t`.
//! - Positions whose label is [`IGNORE_INDEX`] (-100) do not contribute to the loss: BOS, the
//!   prompt and padding. Only the response bytes and the final EOS are learned.
//! - Batches are right-padded with the tokenizer's pad id; under a causal mask, trailing padding
//!   cannot influence the real tokens before it, so no attention mask is needed for training. The
//!   batch still carries a padding mask ([`Batch::real_tokens`]) so that MoE statistics skip padding.
//! - With packing ([`TrainDataset::new_packed`]) whole examples are concatenated and cut into rows of
//!   exactly `max_seq_length` tokens. Attention stays plain causal over the packed row, so an
//!   example can attend to the examples before it in the same row (as HF's simple packing does);
//!   the labels still mask every prompt.
//! - The order of examples depends only on the seed, the step and the *global* batch size
//!   ([`DataOrder`]), never on how many data-parallel ranks share a global batch.

use std::cell::Cell;
use std::fmt;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use serde::de::{Deserializer as _, SeqAccess, Visitor};
use serde_json::Value;

use crate::tokenizer::{Tokenizer, TokenizerError};

/// The dataset bundled into the binary, used when no `--data-path` is given.
/// Regenerate with `python3 trainer/data/make_alpaca_tiny.py`.
pub const BUNDLED_DATASET: &str = include_str!("../data/alpaca_tiny.json");

/// Name used in error messages and logs for [`BUNDLED_DATASET`].
pub const BUNDLED_DATASET_NAME: &str = "<bundled alpaca_tiny.json>";

/// Label value for positions excluded from the loss (PyTorch's `CrossEntropyLoss` default).
pub const IGNORE_INDEX: i64 = -100;

/// One instruction-following record, as in Stanford Alpaca's `alpaca_data.json`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AlpacaRecord {
    /// The task description.
    pub instruction: String,
    /// Optional context for the task; empty when absent.
    #[serde(default)]
    pub input: String,
    /// The expected response.
    pub output: String,
}

/// Errors while loading or preparing the training data.
///
/// Record numbers are 1-based. In a JSON array they count array elements; in a JSON Lines file
/// they are line numbers (blank lines are skipped but still counted).
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The dataset file could not be read (missing, unreadable, or not UTF-8).
    #[error("cannot read dataset file {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The text is not valid JSON / JSON Lines.
    #[error("{file}: malformed JSON{}: {source}", at_record(.record))]
    MalformedJson {
        file: String,
        /// The record being parsed when the error occurred, when it can be attributed to one.
        record: Option<usize>,
        #[source]
        source: serde_json::Error,
    },
    /// A record is valid JSON but not an object.
    #[error("{file}: record {record} is not a JSON object (found {found})")]
    NotAnObject {
        file: String,
        record: usize,
        found: &'static str,
    },
    /// A record lacks a required field (`instruction` or `output`), or has it set to null.
    #[error("{file}: record {record} is missing the required field `{field}`")]
    MissingField {
        file: String,
        record: usize,
        field: &'static str,
    },
    /// A field is present but is not a string.
    #[error("{file}: record {record}: field `{field}` must be a string (found {found})")]
    InvalidField {
        file: String,
        record: usize,
        field: &'static str,
        found: &'static str,
    },
    /// The file holds no records.
    #[error("{file}: the dataset is empty")]
    Empty { file: String },
    /// `--max-seq-length` cannot hold BOS plus at least one target token.
    #[error("--max-seq-length must be at least 2 (BOS plus one target token), got {0}")]
    MaxSeqLengthTooSmall(usize),
    /// No example keeps a target token after truncation, so there is nothing to learn.
    #[error(
        "none of the {total} examples keeps a response token within --max-seq-length {max_seq_length}; \
         raise --max-seq-length or use --prompt-template compact"
    )]
    NoTrainableExamples { total: usize, max_seq_length: usize },
    /// `--per-device-train-batch-size` is zero.
    #[error("--per-device-train-batch-size must be at least 1")]
    ZeroBatchSize,
    /// The data-parallel layout is impossible (`rank >= world_size` or `world_size == 0`).
    #[error("invalid data-parallel layout: rank {rank} of world size {world_size}")]
    InvalidRank { rank: usize, world_size: usize },
    /// The tokenizer failed on a record.
    #[error("record {record}: {source}")]
    Tokenize {
        /// 1-based record number.
        record: usize,
        #[source]
        source: TokenizerError,
    },
}

fn at_record(record: &Option<usize>) -> String {
    record.map_or_else(String::new, |r| format!(" in record {r}"))
}

fn json_type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Loads the records of `path`, or of the bundled dataset when `path` is `None`.
///
/// The format is detected from the content: a file whose first non-blank character is `[` is
/// a JSON array of records; anything else is read as JSON Lines (one record per line).
///
/// # Errors
/// [`DataError::Io`] if the file cannot be read, otherwise any error of [`parse_records`].
pub fn load_records(path: Option<&Path>) -> Result<Vec<AlpacaRecord>, DataError> {
    match path {
        None => parse_records(BUNDLED_DATASET, BUNDLED_DATASET_NAME),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            parse_records(&text, &path.display().to_string())
        }
    }
}

/// Parses a JSON array or JSON Lines text of records; `file` names the source in errors.
///
/// `input` may be absent or null (treated as empty); `instruction` and `output` are required.
/// Extra fields are ignored.
///
/// # Errors
/// [`DataError::MalformedJson`], [`DataError::NotAnObject`], [`DataError::MissingField`],
/// [`DataError::InvalidField`] naming the record, or [`DataError::Empty`].
pub fn parse_records(text: &str, file: &str) -> Result<Vec<AlpacaRecord>, DataError> {
    // Editors on Windows like to prepend a BOM, which serde_json rejects.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let values: Vec<(usize, Value)> = if text.trim_start().starts_with('[') {
        parse_json_array(text, file)?
    } else {
        parse_json_lines(text, file)?
    };
    if values.is_empty() {
        return Err(DataError::Empty {
            file: file.to_owned(),
        });
    }
    values
        .into_iter()
        .map(|(record, value)| record_from_value(value, file, record))
        .collect()
}

/// Parses a top-level JSON array element by element, so that a syntax error can be attributed
/// to the record it occurs in (serde_json alone only reports line and column).
fn parse_json_array(text: &str, file: &str) -> Result<Vec<(usize, Value)>, DataError> {
    struct CountingVisitor<'c> {
        parsed: &'c Cell<usize>,
    }
    impl<'de> Visitor<'de> for CountingVisitor<'_> {
        type Value = Vec<Value>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON array of records")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Value>, A::Error> {
            let mut out = Vec::new();
            while let Some(v) = seq.next_element::<Value>()? {
                out.push(v);
                self.parsed.set(out.len());
            }
            Ok(out)
        }
    }

    let parsed = Cell::new(0);
    let mut de = serde_json::Deserializer::from_str(text);
    let values = de
        .deserialize_seq(CountingVisitor { parsed: &parsed })
        .map_err(|source| DataError::MalformedJson {
            file: file.to_owned(),
            // The element after the last complete one is the one that failed.
            record: Some(parsed.get() + 1),
            source,
        })?;
    // Trailing garbage after the closing bracket belongs to no record.
    de.end().map_err(|source| DataError::MalformedJson {
        file: file.to_owned(),
        record: None,
        source,
    })?;
    Ok(values
        .into_iter()
        .enumerate()
        .map(|(i, v)| (i + 1, v))
        .collect())
}

fn parse_json_lines(text: &str, file: &str) -> Result<Vec<(usize, Value)>, DataError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value = serde_json::from_str(line).map_err(|source| DataError::MalformedJson {
            file: file.to_owned(),
            record: Some(i + 1),
            source,
        })?;
        out.push((i + 1, value));
    }
    Ok(out)
}

fn record_from_value(value: Value, file: &str, record: usize) -> Result<AlpacaRecord, DataError> {
    let Value::Object(mut map) = value else {
        return Err(DataError::NotAnObject {
            file: file.to_owned(),
            record,
            found: json_type_name(&value),
        });
    };
    let mut take = |field: &'static str, required: bool| -> Result<String, DataError> {
        match map.remove(field) {
            Some(Value::String(s)) => Ok(s),
            None | Some(Value::Null) if required => Err(DataError::MissingField {
                file: file.to_owned(),
                record,
                field,
            }),
            None | Some(Value::Null) => Ok(String::new()),
            Some(other) => Err(DataError::InvalidField {
                file: file.to_owned(),
                record,
                field,
                found: json_type_name(&other),
            }),
        }
    };
    Ok(AlpacaRecord {
        instruction: take("instruction", true)?,
        input: take("input", false)?,
        output: take("output", true)?,
    })
}

/// How a record's instruction and input are turned into the prompt text.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Hash,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum PromptStyle {
    /// The Stanford Alpaca template, with its no-input variant when `input` is empty.
    /// About 190 bytes of boilerplate: needs `--max-seq-length` well above 128.
    Alpaca,
    /// `"### Instruction:\n{instruction}\n{input}\n### Response:\n"`. The default: the bundled
    /// tiny model must learn within a few dozen CPU steps, and boilerplate bytes cost compute
    /// without teaching anything.
    #[default]
    Compact,
}

impl PromptStyle {
    /// Renders the prompt (everything before the response) for one record.
    #[must_use]
    pub fn render_prompt(self, instruction: &str, input: &str) -> String {
        match self {
            // Same test as Stanford Alpaca's train.py: only an exactly empty input selects
            // the no-input variant.
            Self::Alpaca if input.is_empty() => format!(
                "Below is an instruction that describes a task. Write a response that \
                 appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n\
                 ### Response:\n"
            ),
            Self::Alpaca => format!(
                "Below is an instruction that describes a task, paired with an input that \
                 provides further context. Write a response that appropriately completes the \
                 request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n\
                 ### Response:\n"
            ),
            Self::Compact => format!("### Instruction:\n{instruction}\n{input}\n### Response:\n"),
        }
    }
}

/// One tokenised training example.
///
/// # Shapes
/// `input_ids` and `labels` both have length `len() <= max_seq_length`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedExample {
    /// `BOS + prompt + response + EOS`, possibly truncated on the right.
    pub input_ids: Vec<u32>,
    /// `input_ids` as `i64`, with the BOS and prompt positions set to [`IGNORE_INDEX`].
    pub labels: Vec<i64>,
    /// Whether the example was cut to `max_seq_length`.
    pub truncated: bool,
}

impl TokenizedExample {
    /// Number of tokens.
    #[must_use]
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// Whether the example has no tokens (never true for examples built by [`build_example`]).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Number of positions that contribute to the loss.
    #[must_use]
    pub fn n_target_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// Tokenises one record as `BOS + prompt + output + EOS`, masks BOS and the prompt out of the
/// labels, and truncates on the right to `max_seq_length` tokens.
///
/// Prompt and response are encoded separately (as Stanford Alpaca's `train.py` does), so the
/// prompt/response boundary is a token boundary whatever the tokenizer merges; neither encoding
/// adds special tokens, so there is exactly one BOS.
///
/// # Errors
/// [`TokenizerError`] if an HF tokenizer fails on the text.
pub fn build_example(
    tokenizer: &Tokenizer,
    record: &AlpacaRecord,
    style: PromptStyle,
    max_seq_length: usize,
) -> Result<TokenizedExample, TokenizerError> {
    let prompt = tokenizer.encode(&style.render_prompt(&record.instruction, &record.input))?;
    let response = tokenizer.encode(&record.output)?;

    let mut input_ids = Vec::with_capacity(prompt.len() + response.len() + 2);
    input_ids.push(tokenizer.bos_id());
    input_ids.extend_from_slice(&prompt);
    let n_masked = input_ids.len();
    input_ids.extend_from_slice(&response);
    input_ids.push(tokenizer.eos_id());

    let mut labels: Vec<i64> = input_ids
        .iter()
        .enumerate()
        .map(|(i, &id)| {
            if i < n_masked {
                IGNORE_INDEX
            } else {
                i64::from(id)
            }
        })
        .collect();

    let truncated = input_ids.len() > max_seq_length;
    input_ids.truncate(max_seq_length);
    labels.truncate(max_seq_length);
    Ok(TokenizedExample {
        input_ids,
        labels,
        truncated,
    })
}

/// Concatenates whole examples (each already `BOS + prompt + response + EOS`) in the given order
/// and cuts the stream into rows of `max_seq_length` tokens; the last row may be shorter.
///
/// The label of each row's first position is set to [`IGNORE_INDEX`]: the shifted loss never
/// predicts position 0 of a row, and masking it keeps [`Batch::n_target_tokens`] equal to the
/// number of predictions. Prompt labels stay masked wherever the row boundary falls.
#[must_use]
pub fn pack_examples(examples: &[TokenizedExample], max_seq_length: usize) -> Vec<TokenizedExample> {
    let ids: Vec<u32> = examples.iter().flat_map(|e| e.input_ids.iter().copied()).collect();
    let labels: Vec<i64> = examples.iter().flat_map(|e| e.labels.iter().copied()).collect();
    ids.chunks(max_seq_length.max(1))
        .zip(labels.chunks(max_seq_length.max(1)))
        .map(|(ids, labels)| {
            let mut labels = labels.to_vec();
            labels[0] = IGNORE_INDEX;
            TokenizedExample {
                input_ids: ids.to_vec(),
                labels,
                truncated: false,
            }
        })
        .collect()
}

/// The tokenised training set.
#[derive(Debug, Clone)]
pub struct TrainDataset {
    examples: Vec<TokenizedExample>,
    pad_id: u32,
    n_records: usize,
    n_truncated: usize,
    n_dropped: usize,
    max_seq_length: usize,
}

impl TrainDataset {
    /// Tokenises `records`. Examples with no target token left after truncation are dropped:
    /// they would only add padding compute and, alone in a batch, a 0/0 loss. Both the
    /// truncated and the dropped counts are logged (warn level when non-zero).
    ///
    /// # Errors
    /// [`DataError::MaxSeqLengthTooSmall`] if `max_seq_length < 2`;
    /// [`DataError::NoTrainableExamples`] if no example is left (including empty `records`).
    pub fn new(
        records: &[AlpacaRecord],
        style: PromptStyle,
        max_seq_length: usize,
        tokenizer: &Tokenizer,
    ) -> Result<Self, DataError> {
        if max_seq_length < 2 {
            return Err(DataError::MaxSeqLengthTooSmall(max_seq_length));
        }
        let mut n_truncated = 0;
        let mut examples = Vec::with_capacity(records.len());
        for (i, record) in records.iter().enumerate() {
            let example = build_example(tokenizer, record, style, max_seq_length)
                .map_err(|source| DataError::Tokenize { record: i + 1, source })?;
            n_truncated += usize::from(example.truncated);
            examples.push(example);
        }
        let n_records = examples.len();
        examples.retain(|e| e.n_target_tokens() > 0);
        let n_dropped = n_records - examples.len();

        if n_truncated > 0 {
            tracing::warn!(
                n_truncated,
                n_records,
                max_seq_length,
                "truncated {n_truncated} of {n_records} examples to --max-seq-length {max_seq_length}"
            );
        } else {
            tracing::info!(
                n_records,
                max_seq_length,
                "no example exceeds --max-seq-length {max_seq_length}"
            );
        }
        if n_dropped > 0 {
            tracing::warn!(
                n_dropped,
                n_records,
                "dropped {n_dropped} of {n_records} examples whose response lies entirely beyond \
                 --max-seq-length {max_seq_length}"
            );
        }
        if examples.is_empty() {
            return Err(DataError::NoTrainableExamples {
                total: n_records,
                max_seq_length,
            });
        }
        Ok(Self {
            examples,
            pad_id: tokenizer.pad_id(),
            n_records,
            n_truncated,
            n_dropped,
            max_seq_length,
        })
    }

    /// Tokenises `records` without truncation and packs them, in file order, into rows of
    /// `max_seq_length` tokens ([`pack_examples`]); the rows are what the loader shuffles. No
    /// example is truncated or dropped; a final short row is padded in its batch.
    ///
    /// # Errors
    /// As [`TrainDataset::new`].
    pub fn new_packed(
        records: &[AlpacaRecord],
        style: PromptStyle,
        max_seq_length: usize,
        tokenizer: &Tokenizer,
    ) -> Result<Self, DataError> {
        if max_seq_length < 2 {
            return Err(DataError::MaxSeqLengthTooSmall(max_seq_length));
        }
        let mut examples = Vec::with_capacity(records.len());
        for (i, record) in records.iter().enumerate() {
            examples.push(
                build_example(tokenizer, record, style, usize::MAX)
                    .map_err(|source| DataError::Tokenize { record: i + 1, source })?,
            );
        }
        // Rows without a target (inside one long prompt) are kept: they cost compute but add
        // nothing to the loss, and dropping them would make row contents depend on the labels.
        let rows = pack_examples(&examples, max_seq_length);
        if rows.iter().all(|r| r.n_target_tokens() == 0) {
            return Err(DataError::NoTrainableExamples {
                total: records.len(),
                max_seq_length,
            });
        }
        tracing::info!(
            n_records = records.len(),
            n_rows = rows.len(),
            max_seq_length,
            "packed {} examples into {} rows of {max_seq_length} tokens",
            records.len(),
            rows.len()
        );
        Ok(Self {
            examples: rows,
            pad_id: tokenizer.pad_id(),
            n_records: records.len(),
            n_truncated: 0,
            n_dropped: 0,
            max_seq_length,
        })
    }

    /// The id padding is written with.
    #[must_use]
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Pads the examples at `indices` into one batch.
    #[must_use]
    pub fn collate(&self, indices: &[usize]) -> Batch {
        let rows: Vec<&TokenizedExample> = indices.iter().map(|&i| &self.examples[i]).collect();
        Batch::collate(&rows, self.pad_id)
    }

    /// Number of (kept) examples.
    #[must_use]
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Always false: construction fails rather than produce an empty dataset.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// The kept examples, in file order.
    #[must_use]
    pub fn examples(&self) -> &[TokenizedExample] {
        &self.examples
    }

    /// Number of records given to [`TrainDataset::new`].
    #[must_use]
    pub fn n_records(&self) -> usize {
        self.n_records
    }

    /// Number of records that were cut to `max_seq_length` (dropped ones included).
    #[must_use]
    pub fn n_truncated(&self) -> usize {
        self.n_truncated
    }

    /// Number of records dropped because no target token survived truncation.
    #[must_use]
    pub fn n_dropped(&self) -> usize {
        self.n_dropped
    }

    /// The `max_seq_length` the examples were truncated to.
    #[must_use]
    pub fn max_seq_length(&self) -> usize {
        self.max_seq_length
    }

    /// Total number of loss-contributing tokens over the dataset (one epoch).
    #[must_use]
    pub fn n_target_tokens(&self) -> usize {
        self.examples
            .iter()
            .map(TokenizedExample::n_target_tokens)
            .sum()
    }
}

/// A padded batch, flattened row-major.
///
/// # Shapes
/// `input_ids` and `labels`: `[batch * seq]`, row `b` at `b * seq .. (b + 1) * seq`.
/// `seq` is the longest example in the batch; shorter rows are right-padded with [`PAD_ID`]
/// and [`IGNORE_INDEX`] labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Token ids, `[batch * seq]`.
    pub input_ids: Vec<i64>,
    /// Unshifted labels, `[batch * seq]`; [`IGNORE_INDEX`] where the loss is not taken.
    pub labels: Vec<i64>,
    /// Number of rows.
    pub batch: usize,
    /// Padded sequence length.
    pub seq: usize,
    /// Number of labels that are not [`IGNORE_INDEX`]. Every row starts with a masked label
    /// (BOS, or the first position of a packed row), so this is also the number of predictions
    /// made by the shifted loss, i.e. the divisor of a token-mean loss.
    pub n_target_tokens: usize,
    /// `[batch * seq]`: `true` for real tokens, `false` for right padding.
    pub real: Vec<bool>,
}

impl Batch {
    /// One padding token with no target: a batch whose loss, gradients and MoE statistics are
    /// exactly zero, run by a rank whose slice of the global batch is empty when the model has
    /// collectives inside (expert parallelism) and every rank must take part.
    #[must_use]
    pub fn idle() -> Self {
        Self {
            input_ids: vec![0],
            labels: vec![IGNORE_INDEX],
            batch: 1,
            seq: 1,
            n_target_tokens: 0,
            real: vec![false],
        }
    }

    /// Pads `examples` with `pad_id` to the longest of them and flattens them into one batch.
    #[must_use]
    pub fn collate(examples: &[&TokenizedExample], pad_id: u32) -> Self {
        let batch = examples.len();
        let seq = examples.iter().map(|e| e.len()).max().unwrap_or(0);
        let mut input_ids = Vec::with_capacity(batch * seq);
        let mut labels = Vec::with_capacity(batch * seq);
        let mut real = Vec::with_capacity(batch * seq);
        for e in examples {
            input_ids.extend(e.input_ids.iter().map(|&id| i64::from(id)));
            input_ids.extend(std::iter::repeat_n(i64::from(pad_id), seq - e.len()));
            labels.extend_from_slice(&e.labels);
            labels.extend(std::iter::repeat_n(IGNORE_INDEX, seq - e.len()));
            real.extend(std::iter::repeat_n(true, e.len()));
            real.extend(std::iter::repeat_n(false, seq - e.len()));
        }
        let n_target_tokens = labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
        Self {
            input_ids,
            labels,
            batch,
            seq,
            n_target_tokens,
            real,
        }
    }

    /// Total number of positions, padding included (`batch * seq`).
    #[must_use]
    pub fn n_tokens(&self) -> usize {
        self.batch * self.seq
    }

    /// `[batch * seq]` flags, `true` for real tokens and `false` for right padding (the model's
    /// MoE statistics skip padding, as HF does with an attention mask).
    #[must_use]
    pub fn real_tokens(&self) -> Vec<bool> {
        self.real.clone()
    }

    /// Number of real (non-padding) tokens.
    #[must_use]
    pub fn n_real_tokens(&self) -> usize {
        self.real.iter().filter(|&&r| r).count()
    }

    /// The input ids as an integer tensor on `device`.
    ///
    /// # Shapes
    /// `[batch, seq]`
    #[must_use]
    pub fn input_ids_tensor<B: Backend>(&self, device: &B::Device) -> Tensor<B, 2, Int> {
        Tensor::from_data(
            TensorData::new(self.input_ids.clone(), [self.batch, self.seq]),
            device,
        )
    }

    /// The labels as an integer tensor on `device` (with -100 at ignored positions).
    ///
    /// # Shapes
    /// `[batch, seq]`
    #[must_use]
    pub fn labels_tensor<B: Backend>(&self, device: &B::Device) -> Tensor<B, 2, Int> {
        Tensor::from_data(
            TensorData::new(self.labels.clone(), [self.batch, self.seq]),
            device,
        )
    }
}

/// SplitMix64 (Steele, Lea & Flood 2014). Hand-rolled rather than `rand::StdRng` because
/// `StdRng`'s algorithm may change between `rand` versions, and the shuffle order must depend
/// on the seed alone.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform-enough integer in `0..n` (Lemire's multiply-shift; the bias is below
    /// `n / 2^64`, irrelevant for dataset sizes).
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }
}

/// The order in which epoch `epoch` visits `n` examples: a Fisher-Yates permutation of `0..n`
/// that depends only on `(n, seed, epoch)`.
#[must_use]
pub fn shuffled_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    // Run the epoch number through one SplitMix64 step so that consecutive seeds and
    // consecutive epochs give unrelated streams.
    let epoch_key = SplitMix64(epoch as u64).next_u64();
    let mut rng = SplitMix64(seed ^ epoch_key);
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.below(i + 1);
        order.swap(i, j);
    }
    order
}

/// Which examples make up each global batch: a pure function of the dataset size, the seed and
/// the global batch size, so that the data order does not depend on the number of data-parallel
/// ranks and a resumed run can find its place from the step number alone.
///
/// Global micro-batch `g` (`g = step * gradient_accumulation_steps + micro`) is batch
/// `g % batches_per_epoch` of epoch `g / batches_per_epoch`; every epoch is a fresh permutation
/// ([`shuffled_order`]); an epoch's last batch holds the remainder (PyTorch's `drop_last=False`)
/// and batches never straddle epochs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataOrder {
    /// Number of examples (rows) in the dataset.
    pub n_examples: usize,
    /// Shuffle seed.
    pub seed: u64,
    /// Examples per global micro-batch: per-device batch × world size.
    pub global_batch_size: usize,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation_steps: usize,
}

impl DataOrder {
    /// Global micro-batches per epoch, `ceil(n_examples / global_batch_size)` (at least 1).
    #[must_use]
    pub fn batches_per_epoch(&self) -> usize {
        self.n_examples.div_ceil(self.global_batch_size.max(1)).max(1)
    }

    /// The example indices of global micro-batch `g`.
    #[must_use]
    pub fn batch(&self, g: usize) -> Vec<usize> {
        let bpe = self.batches_per_epoch();
        let (epoch, b) = (g / bpe, g % bpe);
        let order = shuffled_order(self.n_examples, self.seed, epoch);
        let start = (b * self.global_batch_size).min(order.len());
        let end = ((b + 1) * self.global_batch_size).min(order.len());
        order[start..end].to_vec()
    }

    /// The example indices of micro-step `micro` of optimizer step `step` (both 0-based), over
    /// all ranks.
    #[must_use]
    pub fn global_batch(&self, step: usize, micro: usize) -> Vec<usize> {
        self.batch(step * self.gradient_accumulation_steps + micro)
    }

    /// Epochs completed after `n_micro` global micro-batches, as a fraction (HF's `epoch` field).
    #[must_use]
    pub fn epoch_after(&self, n_micro: usize) -> f64 {
        n_micro as f64 / self.batches_per_epoch() as f64
    }
}

/// The part of a global batch that `rank` of `world_size` processes: a contiguous slice, as
/// even as possible (sizes differ by at most one when the batch is an epoch's short remainder).
///
/// # Errors
/// [`DataError::InvalidRank`] if `rank >= world_size`.
pub fn rank_slice(global: &[usize], world_size: usize, rank: usize) -> Result<&[usize], DataError> {
    if rank >= world_size {
        return Err(DataError::InvalidRank { rank, world_size });
    }
    let n = global.len();
    Ok(&global[rank * n / world_size..(rank + 1) * n / world_size])
}

/// Yields padded batches of `batch_size` examples, reshuffling at every epoch, endlessly.
///
/// A thin stateful view of [`DataOrder`] for one rank; the single-process trainer uses a world
/// size of one. The iterator never returns `None`: take as many batches as the schedule needs,
/// never `collect()` it.
#[derive(Debug, Clone)]
pub struct DataLoader<'a> {
    dataset: &'a TrainDataset,
    batch_size: usize,
    world_size: usize,
    rank: usize,
    seed: u64,
    gradient_accumulation_steps: usize,
    next: usize,
}

impl<'a> DataLoader<'a> {
    /// Creates a single-process loader positioned at the start of epoch 0.
    ///
    /// # Errors
    /// [`DataError::ZeroBatchSize`] if `batch_size == 0`.
    pub fn new(dataset: &'a TrainDataset, batch_size: usize, seed: u64) -> Result<Self, DataError> {
        if batch_size == 0 {
            return Err(DataError::ZeroBatchSize);
        }
        Ok(Self {
            dataset,
            batch_size,
            world_size: 1,
            rank: 0,
            seed,
            gradient_accumulation_steps: 1,
            next: 0,
        })
    }

    /// Sets the data-parallel layout: global batches hold `batch_size * world_size` examples and
    /// this loader yields the slice of `rank`.
    ///
    /// # Errors
    /// [`DataError::InvalidRank`] if `rank >= world_size`.
    pub fn with_ranks(mut self, world_size: usize, rank: usize) -> Result<Self, DataError> {
        if rank >= world_size {
            return Err(DataError::InvalidRank { rank, world_size });
        }
        self.world_size = world_size;
        self.rank = rank;
        Ok(self)
    }

    /// Sets the micro-batches per optimizer step used by [`DataLoader::micro_batch`].
    #[must_use]
    pub fn with_gradient_accumulation_steps(mut self, steps: usize) -> Self {
        self.gradient_accumulation_steps = steps.max(1);
        self
    }

    /// The order this loader follows.
    #[must_use]
    pub fn order(&self) -> DataOrder {
        DataOrder {
            n_examples: self.dataset.len(),
            seed: self.seed,
            global_batch_size: self.batch_size * self.world_size,
            gradient_accumulation_steps: self.gradient_accumulation_steps,
        }
    }

    /// Global batches per epoch, the last one possibly partial.
    #[must_use]
    pub fn batches_per_epoch(&self) -> usize {
        self.order().batches_per_epoch()
    }

    /// The configured per-device batch size (the size of every batch but possibly an epoch's last).
    #[must_use]
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// The epoch (0-based) that the next batch will come from.
    #[must_use]
    pub fn epoch(&self) -> usize {
        self.next / self.batches_per_epoch()
    }

    /// Moves the iterator to global micro-batch `g` (used when resuming).
    pub fn seek(&mut self, g: usize) {
        self.next = g;
    }

    /// This rank's batch of global micro-batch `g`.
    #[must_use]
    pub fn batch_at(&self, g: usize) -> Batch {
        let global = self.order().batch(g);
        let mine = rank_slice(&global, self.world_size, self.rank).expect("rank checked in with_ranks");
        self.dataset.collate(mine)
    }

    /// This rank's batch of micro-step `micro` of optimizer step `step`.
    #[must_use]
    pub fn micro_batch(&self, step: usize, micro: usize) -> Batch {
        self.batch_at(step * self.gradient_accumulation_steps + micro)
    }

    /// The example order of `epoch`.
    #[must_use]
    pub fn epoch_order(&self, epoch: usize) -> Vec<usize> {
        shuffled_order(self.dataset.len(), self.seed, epoch)
    }

    /// The batches of one epoch, independently of the loader's position.
    pub fn epoch_batches(&self, epoch: usize) -> impl Iterator<Item = Batch> + '_ {
        let bpe = self.batches_per_epoch();
        (0..bpe).map(move |b| self.batch_at(epoch * bpe + b))
    }
}

impl Iterator for DataLoader<'_> {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        let batch = self.batch_at(self.next);
        self.next += 1;
        Some(batch)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (usize::MAX, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::{BOS_ID, EOS_ID, PAD_ID};

    fn rec(instruction: &str, input: &str, output: &str) -> AlpacaRecord {
        AlpacaRecord {
            instruction: instruction.into(),
            input: input.into(),
            output: output.into(),
        }
    }

    fn dataset(n: usize) -> TrainDataset {
        let records: Vec<_> = (0..n)
            .map(|i| rec("Echo.", &i.to_string(), &"x".repeat(i % 5 + 1)))
            .collect();
        TrainDataset::new(&records, PromptStyle::Compact, 128, &Tokenizer::default()).unwrap()
    }

    #[test]
    fn bundled_dataset_loads_and_fits() {
        let records = load_records(None).unwrap();
        assert!((150..=300).contains(&records.len()), "{}", records.len());
        assert!(records.iter().any(|r| r.input.is_empty()));
        let ds =
            TrainDataset::new(&records, PromptStyle::Compact, 128, &Tokenizer::default()).unwrap();
        assert_eq!(ds.len(), records.len());
        assert_eq!(
            ds.n_truncated(),
            0,
            "bundled data must fit 128 tokens with Compact"
        );
    }

    #[test]
    fn alpaca_templates_match_stanford() {
        assert_eq!(
            PromptStyle::Alpaca.render_prompt("Add the two numbers.", "17 + 25"),
            "Below is an instruction that describes a task, paired with an input that provides \
             further context. Write a response that appropriately completes the request.\n\n\
             ### Instruction:\nAdd the two numbers.\n\n### Input:\n17 + 25\n\n### Response:\n"
        );
        assert_eq!(
            PromptStyle::Alpaca.render_prompt("Say hello.", ""),
            "Below is an instruction that describes a task. Write a response that appropriately \
             completes the request.\n\n### Instruction:\nSay hello.\n\n### Response:\n"
        );
        assert_eq!(
            PromptStyle::Compact.render_prompt("Add the two numbers.", "17 + 25"),
            "### Instruction:\nAdd the two numbers.\n17 + 25\n### Response:\n"
        );
        assert_eq!(PromptStyle::default(), PromptStyle::Compact);
    }

    #[test]
    fn masking_covers_bos_and_prompt_only() {
        let tok = Tokenizer::default();
        let r = rec("Add.", "1 + 2", "3");
        let e = build_example(&tok, &r, PromptStyle::Compact, 128).unwrap();
        let prompt = PromptStyle::Compact.render_prompt("Add.", "1 + 2");
        let n_prompt = 1 + prompt.len();
        assert_eq!(e.len(), n_prompt + 1 + 1);
        assert_eq!(e.input_ids[0], BOS_ID);
        assert_eq!(*e.input_ids.last().unwrap(), EOS_ID);
        assert_eq!(tok.decode(&e.input_ids).unwrap(), format!("{prompt}3"));
        assert!(e.labels[..n_prompt].iter().all(|&l| l == IGNORE_INDEX));
        assert_eq!(&e.labels[n_prompt..], &[i64::from(b'3'), i64::from(EOS_ID)]);
        assert_eq!(e.n_target_tokens(), 2);
        assert!(!e.truncated);
        // Unmasked labels equal the ids (unshifted).
        for (id, l) in e.input_ids.iter().zip(&e.labels) {
            assert!(*l == IGNORE_INDEX || *l == i64::from(*id));
        }
    }

    #[test]
    fn truncation_is_counted_and_untrainable_examples_dropped() {
        let tok = Tokenizer::default();
        let prompt_len = 1 + PromptStyle::Compact.render_prompt("I", "").len();
        let max = prompt_len + 3;
        let records = vec![
            rec("I", "", "ab"),                 // prompt + 2 + EOS = max: fits
            rec("I", "", "abcdef"),             // truncated, keeps 3 targets
            rec("I", "", &"y".repeat(100)),     // truncated, keeps 3 targets
            rec(&"long ".repeat(40), "", "ok"), // truncated inside the prompt: dropped
        ];
        let e = build_example(&tok, &records[1], PromptStyle::Compact, max).unwrap();
        assert!(e.truncated);
        assert_eq!(e.len(), max);
        assert_eq!(e.n_target_tokens(), 3);
        assert_ne!(*e.input_ids.last().unwrap(), EOS_ID);

        let ds = TrainDataset::new(&records, PromptStyle::Compact, max, &tok).unwrap();
        assert_eq!(ds.n_records(), 4);
        assert_eq!(ds.n_truncated(), 3);
        assert_eq!(ds.n_dropped(), 1);
        assert_eq!(ds.len(), 3);
        assert!(ds.examples().iter().all(|e| e.len() <= max));
        assert_eq!(ds.n_target_tokens(), 3 + 3 + 3);
    }

    #[test]
    fn alpaca_template_at_128_is_untrainable_error() {
        let records = vec![rec(&"word ".repeat(30), "input", "out")];
        let err = TrainDataset::new(&records, PromptStyle::Alpaca, 128, &Tokenizer::default())
            .unwrap_err();
        assert!(matches!(
            err,
            DataError::NoTrainableExamples {
                total: 1,
                max_seq_length: 128
            }
        ));
        let err = TrainDataset::new(&records, PromptStyle::Compact, 1, &Tokenizer::default())
            .unwrap_err();
        assert!(matches!(err, DataError::MaxSeqLengthTooSmall(1)));
    }

    #[test]
    fn padding_to_longest_in_batch() {
        let tok = Tokenizer::default();
        let a = build_example(&tok, &rec("A", "", "1"), PromptStyle::Compact, 128).unwrap();
        let b = build_example(&tok, &rec("A", "", "12345"), PromptStyle::Compact, 128).unwrap();
        let batch = Batch::collate(&[&a, &b], PAD_ID);
        assert_eq!((batch.batch, batch.seq), (2, b.len()));
        assert_eq!(batch.input_ids.len(), 2 * b.len());
        assert_eq!(batch.labels.len(), 2 * b.len());
        assert_eq!(batch.n_tokens(), 2 * b.len());
        let pad = b.len() - a.len();
        assert_eq!(pad, 4);
        let row0 = &batch.input_ids[..batch.seq];
        assert!(row0[a.len()..].iter().all(|&x| x == i64::from(PAD_ID)));
        assert!(
            batch.labels[a.len()..batch.seq]
                .iter()
                .all(|&x| x == IGNORE_INDEX)
        );
        let row1: Vec<i64> = b.input_ids.iter().map(|&x| i64::from(x)).collect();
        assert_eq!(&batch.input_ids[batch.seq..], row1.as_slice());
        assert_eq!(&batch.labels[batch.seq..], b.labels.as_slice());
        assert_eq!(batch.n_target_tokens, 2 + 6);

        let empty = Batch::collate(&[], PAD_ID);
        assert_eq!((empty.batch, empty.seq, empty.n_target_tokens), (0, 0, 0));
    }

    #[test]
    fn batch_tensors_have_batch_seq_shape() {
        type B = burn::backend::NdArray;
        let tok = Tokenizer::default();
        let a = build_example(&tok, &rec("A", "", "1"), PromptStyle::Compact, 128).unwrap();
        let b = build_example(&tok, &rec("A", "", "123"), PromptStyle::Compact, 128).unwrap();
        let batch = Batch::collate(&[&a, &b], PAD_ID);
        let device = Default::default();
        let ids = batch.input_ids_tensor::<B>(&device);
        let labels = batch.labels_tensor::<B>(&device);
        assert_eq!(ids.dims(), [2, batch.seq]);
        assert_eq!(labels.dims(), [2, batch.seq]);
        let ids: Vec<i64> = ids.into_data().iter::<i64>().collect();
        let labels: Vec<i64> = labels.into_data().iter::<i64>().collect();
        assert_eq!(ids, batch.input_ids);
        assert_eq!(labels, batch.labels);
    }

    #[test]
    fn shuffle_is_a_seeded_permutation() {
        let a = shuffled_order(50, 42, 0);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_eq!(a, shuffled_order(50, 42, 0));
        assert_ne!(a, shuffled_order(50, 43, 0));
        assert_ne!(a, shuffled_order(50, 42, 1));
        assert_ne!(a, (0..50).collect::<Vec<_>>());
        assert!(shuffled_order(0, 1, 0).is_empty());
        assert_eq!(shuffled_order(1, 1, 0), vec![0]);
    }

    #[test]
    fn loader_is_deterministic_and_cycles_epochs() {
        let ds = dataset(10);
        let mut l1 = DataLoader::new(&ds, 4, 7).unwrap();
        let l2 = DataLoader::new(&ds, 4, 7).unwrap();
        assert_eq!(l1.batches_per_epoch(), 3);
        assert_eq!(l1.epoch(), 0);

        let first: Vec<Batch> = l1.by_ref().take(3).collect();
        assert_eq!(
            first.iter().map(|b| b.batch).collect::<Vec<_>>(),
            vec![4, 4, 2]
        );
        assert_eq!(first, l2.epoch_batches(0).collect::<Vec<_>>());
        assert_eq!(l1.epoch(), 1);

        let second: Vec<Batch> = l1.by_ref().take(3).collect();
        assert_eq!(second, l2.epoch_batches(1).collect::<Vec<_>>());
        assert_ne!(first, second, "epochs must be reshuffled");

        // Each epoch visits every example exactly once.
        let seen: usize = first.iter().map(|b| b.batch).sum();
        assert_eq!(seen, ds.len());

        let other_seed: Vec<Batch> = DataLoader::new(&ds, 4, 8).unwrap().take(3).collect();
        assert_ne!(first, other_seed);

        assert!(matches!(
            DataLoader::new(&ds, 0, 7),
            Err(DataError::ZeroBatchSize)
        ));
    }

    #[test]
    fn parses_json_array_and_jsonl() {
        let arr = r#"[{"instruction":"a","input":"b","output":"c"},
                      {"instruction":"d","output":"e","extra":1},
                      {"instruction":"f","input":null,"output":"g"}]"#;
        let recs = parse_records(arr, "x.json").unwrap();
        assert_eq!(
            recs,
            vec![rec("a", "b", "c"), rec("d", "", "e"), rec("f", "", "g")]
        );

        let jsonl = "\u{feff}{\"instruction\":\"a\",\"input\":\"b\",\"output\":\"c\"}\n\n\
                     {\"instruction\":\"d\",\"output\":\"e\"}\n";
        let recs = parse_records(jsonl, "x.jsonl").unwrap();
        assert_eq!(recs, vec![rec("a", "b", "c"), rec("d", "", "e")]);
    }

    #[test]
    fn errors_name_file_and_record() {
        // Syntax error in the third array element.
        let err = parse_records(
            r#"[{"instruction":"a","output":"b"},{"instruction":"a","output":"b"},{"instruction": }]"#,
            "bad.json",
        )
        .unwrap_err();
        assert!(
            matches!(&err, DataError::MalformedJson { file, record: Some(3), .. } if file == "bad.json"),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .starts_with("bad.json: malformed JSON in record 3: "),
            "{err}"
        );

        // Trailing garbage after the array belongs to no record.
        let err = parse_records(r#"[{"instruction":"a","output":"b"}] x"#, "t.json").unwrap_err();
        assert!(
            matches!(err, DataError::MalformedJson { record: None, .. }),
            "{err:?}"
        );

        // JSONL: record number is the line number.
        let err = parse_records(
            "{\"instruction\":\"a\",\"output\":\"b\"}\n\n{oops\n",
            "d.jsonl",
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                DataError::MalformedJson {
                    record: Some(3),
                    ..
                }
            ),
            "{err:?}"
        );

        let err = parse_records(
            r#"[{"instruction":"a","output":"b"},{"input":"x","output":"y"}]"#,
            "m.json",
        )
        .unwrap_err();
        assert!(
            matches!(&err, DataError::MissingField { file, record: 2, field: "instruction" } if file == "m.json"),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "m.json: record 2 is missing the required field `instruction`"
        );

        let err = parse_records(r#"{"instruction":"a","output":null}"#, "n.jsonl").unwrap_err();
        assert!(
            matches!(
                err,
                DataError::MissingField {
                    record: 1,
                    field: "output",
                    ..
                }
            ),
            "{err:?}"
        );

        let err = parse_records(r#"[{"instruction":"a","output":5}]"#, "i.json").unwrap_err();
        assert!(
            matches!(
                err,
                DataError::InvalidField {
                    record: 1,
                    field: "output",
                    found: "a number",
                    ..
                }
            ),
            "{err:?}"
        );

        let err = parse_records(r#"[{"instruction":"a","output":"b"}, 3]"#, "o.json").unwrap_err();
        assert!(
            matches!(err, DataError::NotAnObject { record: 2, .. }),
            "{err:?}"
        );

        for empty in ["[]", "", "  \n\n"] {
            let err = parse_records(empty, "e.json").unwrap_err();
            assert!(
                matches!(&err, DataError::Empty { file } if file == "e.json"),
                "{err:?}"
            );
        }
    }

    #[test]
    fn load_records_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        std::fs::write(&path, "{\"instruction\":\"a\",\"output\":\"b\"}\n").unwrap();
        assert_eq!(load_records(Some(&path)).unwrap(), vec![rec("a", "", "b")]);

        let missing = dir.path().join("missing.json");
        let err = load_records(Some(&missing)).unwrap_err();
        assert!(
            matches!(&err, DataError::Io { path, .. } if path == &missing),
            "{err:?}"
        );
        assert!(err.to_string().contains("missing.json"));
    }

    #[test]
    fn world_size_does_not_change_the_data_order() {
        // world_size 1 with batch 4 and world_size 4 with batch 1 see the same global batches.
        let order = |global: usize, accum: usize| DataOrder {
            n_examples: 10,
            seed: 3,
            global_batch_size: global,
            gradient_accumulation_steps: accum,
        };
        let o = order(4, 2);
        assert_eq!(o.batches_per_epoch(), 3);
        let mut seen_epoch0 = Vec::new();
        for step in 0..4 {
            for micro in 0..2 {
                let global = o.global_batch(step, micro);
                let g = step * 2 + micro;
                // Epoch boundaries: batches 0..3 are epoch 0, the third is the remainder of 2.
                assert_eq!(global.len(), if g % 3 == 2 { 2 } else { 4 }, "step {step} micro {micro}");
                if g < 3 {
                    seen_epoch0.extend_from_slice(&global);
                }
                let one = rank_slice(&global, 1, 0).unwrap().to_vec();
                let mut union = Vec::new();
                for r in 0..4 {
                    let part = rank_slice(&global, 4, r).unwrap();
                    assert!(part.len() <= 1, "rank {r} got {part:?}");
                    union.extend_from_slice(part);
                }
                assert_eq!(union, one, "step {step} micro {micro}");
                assert_eq!(one, shuffled_order(10, 3, g / 3)[(g % 3) * 4..((g % 3) * 4 + 4).min(10)]);
            }
        }
        seen_epoch0.sort_unstable();
        assert_eq!(seen_epoch0, (0..10).collect::<Vec<_>>());

        // The loaders of 4 ranks with batch 1 together yield the batches of one loader with batch 4.
        let ds = dataset(10);
        let single = DataLoader::new(&ds, 4, 3).unwrap().with_gradient_accumulation_steps(2);
        let ranks: Vec<DataLoader> = (0..4)
            .map(|r| DataLoader::new(&ds, 1, 3).unwrap().with_ranks(4, r).unwrap().with_gradient_accumulation_steps(2))
            .collect();
        for step in 0..3 {
            for micro in 0..2 {
                let whole = single.micro_batch(step, micro);
                let mut ids = Vec::new();
                for l in &ranks {
                    let b = l.micro_batch(step, micro);
                    if b.batch > 0 {
                        // Rows are padded per rank, so compare unpadded rows.
                        ids.push(b.input_ids[..b.real.iter().filter(|&&r| r).count()].to_vec());
                    }
                }
                let rows: Vec<Vec<i64>> = (0..whole.batch)
                    .map(|r| {
                        let row = &whole.input_ids[r * whole.seq..(r + 1) * whole.seq];
                        let n = whole.real[r * whole.seq..(r + 1) * whole.seq].iter().filter(|&&x| x).count();
                        row[..n].to_vec()
                    })
                    .collect();
                assert_eq!(ids, rows);
            }
        }
        assert!(matches!(rank_slice(&[1, 2], 2, 2), Err(DataError::InvalidRank { rank: 2, world_size: 2 })));
    }

    #[test]
    fn packing_concatenates_examples_into_fixed_rows() {
        let tok = Tokenizer::default();
        let records = vec![rec("A", "", "12"), rec("B", "", "345"), rec("C", "x", "6")];
        let examples: Vec<TokenizedExample> = records
            .iter()
            .map(|r| build_example(&tok, r, PromptStyle::Compact, usize::MAX).unwrap())
            .collect();
        let stream: Vec<u32> = examples.iter().flat_map(|e| e.input_ids.clone()).collect();
        let stream_labels: Vec<i64> = examples.iter().flat_map(|e| e.labels.clone()).collect();
        let max = 16;
        let ds = TrainDataset::new_packed(&records, PromptStyle::Compact, max, &tok).unwrap();
        let rows = ds.examples();
        assert_eq!(rows.len(), stream.len().div_ceil(max));
        for (r, row) in rows.iter().enumerate() {
            let lo = r * max;
            let hi = (lo + max).min(stream.len());
            assert_eq!(row.input_ids, stream[lo..hi], "row {r}");
            assert_eq!(row.labels[0], IGNORE_INDEX, "row {r}: position 0 is never predicted");
            assert_eq!(row.labels[1..], stream_labels[lo + 1..hi], "row {r}");
        }
        assert!(rows[..rows.len() - 1].iter().all(|r| r.len() == max));
        // Every example keeps BOS ... EOS in the stream, and the responses are the only targets.
        assert_eq!(stream.iter().filter(|&&t| t == BOS_ID).count(), 3);
        assert_eq!(stream.iter().filter(|&&t| t == EOS_ID).count(), 3);
        let targets: Vec<u32> = stream
            .iter()
            .zip(&stream_labels)
            .filter(|(_, l)| **l != IGNORE_INDEX)
            .map(|(t, _)| *t)
            .collect();
        assert_eq!(tok.decode(&targets).unwrap(), "123456");
        // A packed batch of full rows has no padding.
        let batch = ds.collate(&[0, 1]);
        assert_eq!((batch.batch, batch.seq), (2, max));
        assert!(batch.real.iter().all(|&r| r));
    }
}
