//! Data, tokenizer, command-line and metrics support for the `trainer` binary: everything the
//! training loop needs that is not the model itself (`mixtral-burn`).

pub mod cli;
pub mod data;
pub mod launch;
pub mod parallel;
pub mod metrics;
pub mod tokenizer;
pub mod train;

pub use cli::Args;
pub use data::{
    AlpacaRecord, Batch, DataError, DataLoader, IGNORE_INDEX, PromptStyle, TokenizedExample,
    TrainDataset, build_example, load_records, parse_records,
};
pub use metrics::{MetricsError, MetricsWriter, StepMetrics, TrainSummary};
pub use tokenizer::{BOS_ID, ByteTokenizer, EOS_ID, PAD_ID, VOCAB_SIZE};
