use crate::config::ConfigError;

/// Why a checkpoint could not be read or written. Every variant names the file and, where it
/// applies, the tensor and the numbers involved.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// `config.json` is missing or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The directory has neither `model.safetensors` nor `model.safetensors.index.json`.
    #[error("no weights in {dir}: expected model.safetensors or model.safetensors.index.json")]
    NoWeights {
        /// The checkpoint directory.
        dir: String,
    },
    /// A tensor could not be fetched for writing (e.g. a failed gather of a sharded parameter).
    #[error("could not fetch a tensor to write: {message}")]
    Fetch {
        /// The fetcher's reason.
        message: String,
    },
    /// A file could not be opened, mapped or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The shard index is not valid.
    #[error("invalid shard index {path}: {message}")]
    Index {
        /// The index file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A safetensors file is truncated or its header is corrupt.
    #[error("invalid safetensors file {path}: {message}")]
    Safetensors {
        /// The file.
        path: String,
        /// The parser's reason (e.g. an incomplete buffer for a truncated file).
        message: String,
    },
    /// The same tensor appears in two files.
    #[error("tensor {name} appears in both {first} and {second}")]
    Duplicate {
        /// Tensor name.
        name: String,
        /// One file.
        first: String,
        /// The other.
        second: String,
    },
    /// A requested block does not fit the tensor (sharded loading).
    #[error("tensor {name} in {file} has shape {shape:?}; cannot read block {ranges}")]
    Slice {
        /// Tensor name.
        name: String,
        /// The file holding it.
        file: String,
        /// Its shape on disk.
        shape: Vec<usize>,
        /// The requested ranges, one per dimension.
        ranges: String,
    },
    /// A tensor the model needs is absent.
    #[error("checkpoint {dir} has no tensor {name}")]
    MissingTensor {
        /// The checkpoint directory.
        dir: String,
        /// Tensor name.
        name: String,
    },
    /// Tensors the model does not use.
    #[error("checkpoint {dir} has {} tensor(s) this Mixtral config does not use: {}", names.len(), names.join(", "))]
    UnexpectedTensors {
        /// The checkpoint directory.
        dir: String,
        /// Their names.
        names: Vec<String>,
    },
    /// A tensor has the wrong shape for the config.
    #[error("tensor {name} in {file} has shape {found:?}, expected {expected:?} from the config")]
    Shape {
        /// Tensor name.
        name: String,
        /// Its file.
        file: String,
        /// Shape the config implies.
        expected: Vec<usize>,
        /// Shape on disk.
        found: Vec<usize>,
    },
    /// A tensor has a dtype this loader does not read.
    #[error("tensor {name} in {file} has dtype {dtype}; supported: F32, BF16, F16")]
    Dtype {
        /// Tensor name.
        name: String,
        /// Its file.
        file: String,
        /// Its dtype.
        dtype: String,
    },
    /// Neither expert layout was found.
    #[error("checkpoint {dir} has no MoE expert tensors (neither block_sparse_moe.experts.* nor mlp.experts.*)")]
    UnknownLayout {
        /// The checkpoint directory.
        dir: String,
    },
    /// A requested range of experts is empty or outside the checkpoint's experts.
    #[error("expert range {start}..{end} is not a non-empty part of the {experts} experts of checkpoint {dir}")]
    ExpertRange {
        /// The checkpoint directory.
        dir: String,
        /// First expert asked for.
        start: usize,
        /// One past the last expert asked for.
        end: usize,
        /// Experts in the checkpoint (`num_local_experts`).
        experts: usize,
    },
    /// An input file (token ids) is unusable.
    #[error("invalid input {path}: {message}")]
    Input {
        /// The file.
        path: String,
        /// What is wrong, with the numbers.
        message: String,
    },
}
