use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors, tensor::TensorInfo};

use super::error::CheckpointError;

/// One memory-mapped safetensors file and its parsed header.
struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
}

/// The safetensors files of a checkpoint, memory-mapped: a tensor's bytes are read only when it is
/// converted, so each byte of a large checkpoint is read once.
pub struct SafetensorsFiles {
    dir: PathBuf,
    files: Vec<MappedFile>,
    location: BTreeMap<String, usize>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io { path: path.display().to_string(), source }
}

impl SafetensorsFiles {
    /// Maps `model.safetensors`, or else the shards listed in `model.safetensors.index.json` (the
    /// order transformers uses, so both read the same weights from a directory holding both).
    ///
    /// # Errors
    /// [`CheckpointError`] for a missing or corrupt file, a bad index, or a tensor listed twice.
    pub fn open(dir: &Path) -> Result<Self, CheckpointError> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let shard_names: Vec<String> = if single.exists() {
            vec!["model.safetensors".to_string()]
        } else if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(io(&index))?;
            let bad = |message: String| CheckpointError::Index { path: index.display().to_string(), message };
            let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| bad("no `weight_map` object".into()))?;
            let mut names: Vec<String> = Vec::new();
            for (tensor, file) in map {
                let file = file.as_str().ok_or_else(|| bad(format!("weight_map[{tensor}] is not a file name")))?;
                if file.contains('/') || file.contains('\\') {
                    return Err(bad(format!("weight_map[{tensor}] = {file} points outside the directory")));
                }
                if !names.iter().any(|n| n == file) {
                    names.push(file.to_string());
                }
            }
            names.sort();
            names
        } else {
            return Err(CheckpointError::NoWeights { dir: dir.display().to_string() });
        };

        let mut files = Vec::with_capacity(shard_names.len());
        let mut location = BTreeMap::new();
        for name in shard_names {
            let path = dir.join(&name);
            let file = File::open(&path).map_err(io(&path))?;
            // SAFETY: the map is read-only; a checkpoint modified while we read it is the user's race,
            // and safetensors validates offsets against the mapped length before any access.
            let mmap = unsafe { Mmap::map(&file) }.map_err(io(&path))?;
            let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| CheckpointError::Safetensors {
                path: path.display().to_string(),
                message: format!("{e:?}"),
            })?;
            let tensors: HashMap<String, TensorInfo> =
                metadata.tensors().into_iter().map(|(k, v)| (k, v.clone())).collect();
            let idx = files.len();
            for tensor in tensors.keys() {
                if let Some(prev) = location.insert(tensor.clone(), idx) {
                    let first: &MappedFile = &files[prev];
                    return Err(CheckpointError::Duplicate {
                        name: tensor.clone(),
                        first: first.path.display().to_string(),
                        second: path.display().to_string(),
                    });
                }
            }
            files.push(MappedFile { path, mmap, data_start: 8 + header_len, tensors });
        }
        Ok(Self { dir: dir.to_path_buf(), files, location })
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.location.keys().map(String::as_str)
    }

    /// Whether a tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    /// The file holding a tensor.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.location.get(name).map(|&i| self.files[i].path.as_path())
    }

    /// Shape of a tensor.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        let &i = self.location.get(name)?;
        self.files[i].tensors.get(name).map(|t| t.shape.as_slice())
    }

    /// The mapped file holding `name` and the tensor's header entry.
    fn entry(&self, name: &str) -> Result<(&MappedFile, &TensorInfo), CheckpointError> {
        let &i = self.location.get(name).ok_or_else(|| CheckpointError::MissingTensor {
            dir: self.dir.display().to_string(),
            name: name.to_string(),
        })?;
        let file = &self.files[i];
        Ok((file, &file.tensors[name]))
    }

    /// Checks that a tensor exists with shape `expected` and a dtype the model can hold, without
    /// reading its values: what a lazy load validates up front so that the later read cannot fail.
    ///
    /// # Errors
    /// [`CheckpointError::MissingTensor`], [`CheckpointError::Shape`] or [`CheckpointError::Dtype`].
    pub fn check(&self, name: &str, expected: &[usize]) -> Result<(), CheckpointError> {
        let (file, info) = self.entry(name)?;
        if info.shape != expected {
            return Err(CheckpointError::Shape {
                name: name.to_string(),
                file: file.path.display().to_string(),
                expected: expected.to_vec(),
                found: info.shape.clone(),
            });
        }
        elem_size(name, file, info).map(|_| ())
    }

    /// Reads a tensor as f32 after checking its shape.
    ///
    /// # Errors
    /// [`CheckpointError::MissingTensor`], [`CheckpointError::Shape`] or [`CheckpointError::Dtype`].
    pub fn read_f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>, CheckpointError> {
        self.check(name, expected)?;
        self.read_f32_range(name, 0..expected.iter().product())
    }

    /// Reads the row-major elements `elements` of a tensor as f32: one contiguous run of the file,
    /// so a rank that holds a range of a flattened parameter (an FSDP1 piece, or whole rows of an
    /// FSDP2 shard) touches only those bytes of the memory-mapped file.
    ///
    /// # Errors
    /// [`CheckpointError::MissingTensor`], [`CheckpointError::Dtype`], or
    /// [`CheckpointError::Slice`] when the range is past the tensor's end.
    pub fn read_f32_range(&self, name: &str, elements: std::ops::Range<usize>) -> Result<Vec<f32>, CheckpointError> {
        let (file, info) = self.entry(name)?;
        let numel: usize = info.shape.iter().product();
        if elements.start > elements.end || elements.end > numel {
            return Err(CheckpointError::Slice {
                name: name.to_string(),
                file: file.path.display().to_string(),
                shape: info.shape.clone(),
                ranges: format!("elements {elements:?}"),
            });
        }
        let elem = elem_size(name, file, info)?;
        let base = file.data_start + info.data_offsets.0;
        let bytes = &file.mmap[base + elements.start * elem..base + elements.end * elem];
        Ok(decode(bytes, info.dtype).expect("dtype checked above"))
    }

    /// Reads the block `ranges[0] × ranges[1] × …` of a tensor as f32, row-major, touching only
    /// the bytes of that block: this is how a rank loads its shard of a parameter without
    /// materialising the whole tensor (the file is memory-mapped, so untouched pages are never read).
    ///
    /// # Errors
    /// [`CheckpointError::MissingTensor`], [`CheckpointError::Dtype`], or
    /// [`CheckpointError::Slice`] when the ranges do not fit the tensor's shape.
    pub fn read_f32_block(&self, name: &str, ranges: &[std::ops::Range<usize>]) -> Result<Vec<f32>, CheckpointError> {
        let (file, info) = self.entry(name)?;
        let shape = &info.shape;
        let bad = ranges.len() != shape.len()
            || ranges.iter().zip(shape).any(|(r, &n)| r.start > r.end || r.end > n);
        if bad {
            return Err(CheckpointError::Slice {
                name: name.to_string(),
                file: file.path.display().to_string(),
                shape: shape.clone(),
                ranges: format!("{ranges:?}"),
            });
        }
        let elem = elem_size(name, file, info)?;
        let base = file.data_start + info.data_offsets.0;
        let data = &file.mmap[..];
        let total: usize = ranges.iter().map(|r| r.len()).product();
        let mut out = Vec::with_capacity(total);
        if total == 0 {
            return Ok(out);
        }
        let rank = shape.len();
        // Row-major strides in elements; the innermost range is one contiguous run.
        let mut strides = vec![1usize; rank];
        for d in (0..rank.saturating_sub(1)).rev() {
            strides[d] = strides[d + 1] * shape[d + 1];
        }
        let (run_start, run_len) = match rank {
            0 => (0, 1),
            _ => (ranges[rank - 1].start, ranges[rank - 1].len()),
        };
        let outer = rank.saturating_sub(1);
        let mut index: Vec<usize> = ranges[..outer].iter().map(|r| r.start).collect();
        loop {
            let offset: usize = index.iter().zip(&strides).map(|(i, s)| i * s).sum::<usize>() + run_start;
            let bytes = &data[base + offset * elem..base + (offset + run_len) * elem];
            out.extend(decode(bytes, info.dtype).expect("dtype checked above"));
            // Odometer over the outer dimensions.
            let mut d = outer;
            loop {
                if d == 0 {
                    return Ok(out);
                }
                d -= 1;
                index[d] += 1;
                if index[d] < ranges[d].end {
                    break;
                }
                index[d] = ranges[d].start;
            }
        }
    }
}

/// Bytes per element of `name`'s dtype, or the error naming tensor, file and dtype when the model
/// cannot hold it.
fn elem_size(name: &str, file: &MappedFile, info: &TensorInfo) -> Result<usize, CheckpointError> {
    match info.dtype {
        Dtype::F32 => Ok(4),
        Dtype::BF16 | Dtype::F16 => Ok(2),
        other => Err(CheckpointError::Dtype { name: name.to_string(), file: file.path.display().to_string(), dtype: format!("{other:?}") }),
    }
}

/// Little-endian float bytes to f32; `None` for dtypes the model cannot hold.
fn decode(bytes: &[u8], dtype: Dtype) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::BF16 => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::F16 => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        _ => return None,
    })
}
