//! Input checkpoints: validated safetensors headers (`safetensors`), PyTorch
//! `.bin` checkpoints read without running their pickle (`torch`), model
//! directories with their shards, index and `config.json` (`model`), and PEFT
//! LoRA adapter folders mapped onto a base model's tensors (`adapter`).

mod adapter;
mod model;
mod safetensors;
mod torch;

pub use adapter::{
    adapter_weights, Adapted, Adapter, LoraConfig, ADAPTER_BIN, ADAPTER_CONFIG, ADAPTER_SAFETENSORS,
};
pub use model::{read_index, Checkpoint, Index, TensorLocation, INDEX_FILES};
pub(crate) use safetensors::check_header_len;
pub use safetensors::{parse_header, read_header, SafetensorsHeader, TensorInfo, MAX_HEADER_LEN};
pub use torch::{read_torch, read_torch_at, MAX_PICKLE_LEN};

use crate::dtype::DType;
use crate::storage::{Storage, StorageError};

/// The format of a checkpoint file, from its name as mergekit decides it: a
/// `.bin` file is a torch zip checkpoint, anything else safetensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Format {
    Safetensors,
    TorchZip,
}

impl Format {
    /// The format of the file at `location`.
    pub fn of(location: &str) -> Format {
        if location.to_ascii_lowercase().ends_with(".bin") {
            Format::TorchZip
        } else {
            Format::Safetensors
        }
    }

    /// As `fleetmerge plan` shows it.
    pub fn name(self) -> &'static str {
        match self {
            Format::Safetensors => "safetensors",
            Format::TorchZip => "torch zip",
        }
    }
}

/// The tensors of a checkpoint file, in its format ([`Format::of`]), sorted by
/// offset: a safetensors header's entries, or a torch zip checkpoint's tensors.
pub fn read_tensors(
    storage: &dyn Storage,
    location: &str,
) -> Result<Vec<(String, TensorInfo)>, CheckpointError> {
    match Format::of(location) {
        Format::Safetensors => Ok(read_header(storage, location)?.tensors),
        Format::TorchZip => read_torch(storage, location),
    }
}

/// Why a checkpoint or one of its files could not be used. Every variant names the
/// file (and the tensor, where there is one) so a user can find the culprit.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Storage(#[from] StorageError),

    // --- safetensors header framing ---
    #[error("{location}: file has {size} bytes, too small to hold a safetensors header length")]
    FileTooSmall { location: String, size: u64 },
    #[error("{location}: safetensors header length is 0")]
    HeaderEmpty { location: String },
    #[error("{location}: safetensors header length {len} exceeds the limit of {limit} bytes (not a safetensors file?)")]
    HeaderTooLarge {
        location: String,
        len: u64,
        limit: u64,
    },
    #[error("{location}: safetensors header of {len} bytes does not fit in the file of {file_size} bytes (the file is truncated)")]
    HeaderPastEnd {
        location: String,
        len: u64,
        file_size: u64,
    },
    #[error("{location}: safetensors header is not valid UTF-8")]
    HeaderNotUtf8 { location: String },
    #[error("{location}: safetensors header is not valid JSON: {message}")]
    HeaderJson { location: String, message: String },
    #[error("{location}: safetensors header is not a JSON object")]
    HeaderNotObject { location: String },
    #[error("{location}: safetensors header names tensor {tensor} twice")]
    DuplicateHeaderEntry { location: String, tensor: String },
    #[error("{location}: __metadata__ must map strings to strings: {message}")]
    BadMetadata { location: String, message: String },

    // --- one tensor entry ---
    #[error("{location}: tensor {tensor}: entry is not an object")]
    EntryNotObject { location: String, tensor: String },
    #[error(
        "{location}: tensor {tensor}: unknown key {key:?} (expected dtype, shape, data_offsets)"
    )]
    UnknownKey {
        location: String,
        tensor: String,
        key: String,
    },
    #[error("{location}: tensor {tensor}: missing {field}")]
    MissingField {
        location: String,
        tensor: String,
        field: &'static str,
    },
    #[error("{location}: tensor {tensor}: unknown dtype {dtype}")]
    UnknownDtype {
        location: String,
        tensor: String,
        dtype: String,
    },
    #[error(
        "{location}: tensor {tensor}: shape must be a list of non-negative integers, found {found}"
    )]
    BadShape {
        location: String,
        tensor: String,
        found: String,
    },
    #[error("{location}: tensor {tensor}: data_offsets must be two integers [start, end] with start <= end, found {found}")]
    BadOffsets {
        location: String,
        tensor: String,
        found: String,
    },
    #[error("{location}: tensor {tensor}: shape {shape:?} of {dtype} is too large to address")]
    SizeOverflow {
        location: String,
        tensor: String,
        shape: Vec<u64>,
        dtype: DType,
    },
    #[error("{location}: tensor {tensor}: shape {shape:?} of {dtype} needs {needed} bytes but data_offsets span {span}")]
    SizeMismatch {
        location: String,
        tensor: String,
        shape: Vec<u64>,
        dtype: DType,
        needed: u64,
        span: u64,
    },
    #[error("{location}: tensor {tensor} ends at byte {end} of the data section, which holds only {data_len} bytes (the file is truncated)")]
    Truncated {
        location: String,
        tensor: String,
        end: u64,
        data_len: u64,
    },
    #[error("{location}: tensors {first} and {second} overlap in the data section")]
    Overlap {
        location: String,
        first: String,
        second: String,
    },

    // --- PyTorch checkpoints (.bin) ---
    #[error("{location}: not a readable torch checkpoint: {message}")]
    TorchZip { location: String, message: String },
    #[error(
        "{location}: torch's legacy serialization format (before torch 1.6: a pickle without \
         the zip container), which fleetmerge does not read; re-save it with torch 1.6 or later, \
         or convert it to safetensors"
    )]
    TorchLegacy { location: String },
    /// The pickle imports a global outside the allow-list: refused before
    /// anything could call it.
    #[error(
        "{location}: refusing this checkpoint: its pickle {pickle} imports {global}, which is \
         not one of the tensor, storage and dtype classes fleetmerge allows (nothing in the \
         file is run; a checkpoint that calls other code may be unsafe)"
    )]
    UnsafePickle {
        location: String,
        pickle: String,
        global: String,
    },
    #[error("{location}: cannot read the pickle {pickle}: {message}")]
    TorchPickle {
        location: String,
        pickle: String,
        message: String,
    },
    #[error("{location}: tensor {tensor}: {message}")]
    TorchTensor {
        location: String,
        tensor: String,
        message: String,
    },

    // --- model directory ---
    #[error("{location}: model directory not found")]
    ModelNotFound { location: String },
    #[error("{location}: no model.safetensors or pytorch_model.bin checkpoint: {found}")]
    NoCheckpoint { location: String, found: String },
    #[error("{location}: invalid index: {message}")]
    BadIndex { location: String, message: String },
    #[error("{location}: weight_map names shard {shard:?}, which is not a plain file name")]
    BadShardName { location: String, shard: String },
    #[error("{location}: weight_map puts tensor {tensor} in {shard}, but that shard's header has no such tensor")]
    TensorNotInShard {
        location: String,
        tensor: String,
        shard: String,
    },
    #[error("{location}: tensor {tensor} is in both {first} and {second}")]
    DuplicateTensor {
        location: String,
        tensor: String,
        first: String,
        second: String,
    },
    /// A LoRA adapter folder that cannot be applied (its config, its kind,
    /// a tensor that fits no base tensor).
    #[error("{file}: {message}")]
    Adapter { file: String, message: String },
    #[error("{location}: config.json not found")]
    ConfigMissing { location: String },
    #[error("{location}: config.json is invalid: {message}")]
    ConfigInvalid { location: String, message: String },
    /// config.json's layer count (`key`) is not a whole number.
    #[error("{file}: {key} is {value}, not a whole number of layers")]
    LayerCountNotWhole {
        file: String,
        key: String,
        /// The value as written (cut at 40 characters).
        value: String,
    },
    /// config.json counts fewer layers than the tensors hold.
    #[error(
        "{file}: {key} is {count}, but the checkpoint's tensors hold {layers} layers (0 to {}); \
         fix config.json so that it describes the weights",
        .layers - 1
    )]
    LayerCountTooSmall {
        file: String,
        key: String,
        count: u64,
        layers: u64,
    },
}

#[cfg(test)]
mod tests;
