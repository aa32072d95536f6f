//! Data, tokenizer, command-line and metrics support for the `trainer` binary: everything the
//! training loop needs that is not the model itself (`mixtral-burn`).

pub mod cli;
pub mod checkpoint;
pub mod data;
pub mod launch;
pub mod layerwise;
pub mod parallel;
pub mod precision;
pub mod rank_shards;
pub mod metrics;
pub mod schedule;
pub mod sharding;
pub mod tensorboard;
pub mod timers;
pub mod tokenizer;
pub mod train;

pub use cli::Args;
pub use data::{
    AlpacaRecord, Batch, DataError, DataLoader, DataOrder, IGNORE_INDEX, PromptStyle, TokenizedExample,
    TrainDataset, build_example, load_records, pack_examples, parse_records, rank_slice,
};
pub use metrics::{MetricsError, MetricsWriter, StepMetrics, TrainSummary};
pub use schedule::{LrSchedulerType, learning_rate, warmup_steps};
pub use tokenizer::{BOS_ID, ByteTokenizer, EOS_ID, HfTokenizer, PAD_ID, Tokenizer, TokenizerError, VOCAB_SIZE};
