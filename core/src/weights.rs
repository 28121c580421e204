//! Reading safetensors weight files into burn tensors, with one clear error per problem.
//!
//! A [`Weights`] maps the model's own parameter names to tensors in the file (a layout may rename keys,
//! e.g. diffusers -> BFL); every key handed out is remembered, so keys the model never asked for are
//! reported as unexpected instead of silently ignored.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, SafeTensorError, TensorInfo};

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{path}: cannot read: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: not a safetensors file ({reason})")]
    NotSafetensors { path: String, reason: String },
    #[error("{path}: truncated (the header describes more tensor data than the file holds)")]
    Truncated { path: String },
    #[error("{path}: missing key `{key}`")]
    MissingKey { path: String, key: String },
    #[error("{path}: unexpected key `{key}` (not part of this model; {more} more)")]
    UnexpectedKey { path: String, key: String, more: usize },
    #[error("{path}: shape mismatch for `{key}`: expected {expected:?}, found {found:?}")]
    ShapeMismatch { path: String, key: String, expected: Vec<usize>, found: Vec<usize> },
    #[error("{path}: `{key}` has dtype {dtype:?}; f32, f16 and bf16 are supported")]
    UnsupportedDtype { path: String, key: String, dtype: Dtype },
    #[error("{path}: `{key}` holds a non-finite value ({value} at flat index {index}); refusing the file")]
    NonFinite { path: String, key: String, index: usize, value: f32 },
    #[error("{path}: unknown layout: {reason}")]
    UnknownLayout { path: String, reason: String },
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
}

pub struct Weights {
    path: String,
    /// Each file's bytes and where its tensor data starts.
    sources: Vec<(Vec<u8>, usize)>,
    /// model name -> (name in the file, tensor info, source index)
    tensors: BTreeMap<String, (String, TensorInfo, usize)>,
    metadata: HashMap<String, String>,
    used: RefCell<HashSet<String>>,
}

impl Weights {
    /// Reads and validates a whole safetensors file.
    pub fn open(path: &Path) -> Result<Self, WeightsError> {
        let shown = path.display().to_string();
        let buffer = std::fs::read(path).map_err(|source| WeightsError::Io { path: shown.clone(), source })?;
        Self::from_bytes(buffer, shown)
    }

    pub fn from_bytes(buffer: Vec<u8>, path: String) -> Result<Self, WeightsError> {
        let (header_len, metadata) = SafeTensors::read_metadata(&buffer).map_err(|e| match e {
            SafeTensorError::MetadataIncompleteBuffer => WeightsError::Truncated { path: path.clone() },
            other => WeightsError::NotSafetensors { path: path.clone(), reason: other.to_string() },
        })?;
        let tensors = metadata.tensors().into_iter().map(|(k, info)| (k.clone(), (k, info.clone(), 0))).collect();
        let file_metadata = metadata.metadata().clone().unwrap_or_default();
        Ok(Self {
            path,
            sources: vec![(buffer, 8 + header_len)],
            tensors,
            metadata: file_metadata,
            used: RefCell::new(HashSet::new()),
        })
    }

    /// Several files as one set, each file's keys under its own prefix (`encoder.`, `decoder.`).
    pub fn merge(parts: Vec<(Weights, &str)>) -> Self {
        let path = parts.iter().map(|(w, _)| w.path.clone()).collect::<Vec<_>>().join(" + ");
        let mut merged = Self {
            path,
            sources: Vec::new(),
            tensors: BTreeMap::new(),
            metadata: HashMap::new(),
            used: RefCell::new(HashSet::new()),
        };
        for (part, prefix) in parts {
            let offset = merged.sources.len();
            merged.sources.extend(part.sources);
            merged.metadata.extend(part.metadata);
            for (name, (file_name, info, source)) in part.tensors {
                merged.tensors.insert(format!("{prefix}.{name}"), (file_name, info, source + offset));
            }
        }
        merged
    }

    /// The free-form `__metadata__` of the file(s).
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).map(String::as_str)
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// The model's names of every tensor in the file.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    /// Renames every key with `f` (file name -> model name); keys mapped to `None` are dropped from view
    /// and never reported as unexpected (e.g. a layout's buffers the model recomputes).
    pub fn rename(mut self, f: impl Fn(&str) -> Option<String>) -> Self {
        self.tensors = std::mem::take(&mut self.tensors)
            .into_values()
            .filter_map(|(file_name, info, source)| {
                f(&file_name).map(|model_name| (model_name, (file_name, info, source)))
            })
            .collect();
        self
    }

    pub fn shape(&self, key: &str) -> Result<Vec<usize>, WeightsError> {
        self.info(key).map(|(_, info, _)| info.shape.clone())
    }

    fn info(&self, key: &str) -> Result<&(String, TensorInfo, usize), WeightsError> {
        self.tensors.get(key).ok_or_else(|| WeightsError::MissingKey { path: self.path.clone(), key: key.to_string() })
    }

    /// The tensor `key` as f32 values, checked against `shape` (the file may hold it as f16 or bf16).
    pub fn values(&self, key: &str, shape: &[usize]) -> Result<Vec<f32>, WeightsError> {
        let (file_name, info, source) = self.info(key)?;
        if info.shape != shape {
            return Err(WeightsError::ShapeMismatch {
                path: self.path.clone(),
                key: file_name.clone(),
                expected: shape.to_vec(),
                found: info.shape.clone(),
            });
        }
        let (start, end) = info.data_offsets;
        let (buffer, data_start) = &self.sources[*source];
        let bytes = &buffer[data_start + start..data_start + end];
        let values: Vec<f32> = match info.dtype {
            Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            dtype => {
                return Err(WeightsError::UnsupportedDtype { path: self.path.clone(), key: file_name.clone(), dtype });
            }
        };
        // A NaN or infinity in a weight file (a diverged run's checkpoint, a corrupt download) would only
        // show up later as NaN losses or images: refuse it here, naming the tensor.
        if let Some(index) = values.iter().position(|v| !v.is_finite()) {
            let value = values[index];
            return Err(WeightsError::NonFinite { path: self.path.clone(), key: file_name.clone(), index, value });
        }
        self.used.borrow_mut().insert(key.to_string());
        Ok(values)
    }

    /// The tensor `key` on `device`, checked against `shape`.
    pub fn tensor<const D: usize>(
        &self,
        key: &str,
        shape: [usize; D],
        device: &Device,
    ) -> Result<Tensor<D>, WeightsError> {
        let values = self.values(key, &shape)?;
        Ok(Tensor::from_data(TensorData::new(values, shape), device))
    }

    /// Errors on the first key (in sorted order) that no [`Self::values`] call asked for.
    pub fn finish(&self) -> Result<(), WeightsError> {
        let used = self.used.borrow();
        let unused: Vec<&String> = self.tensors.keys().filter(|k| !used.contains(*k)).collect();
        match unused.first() {
            None => Ok(()),
            Some(first) => Err(WeightsError::UnexpectedKey {
                path: self.path.clone(),
                key: self.tensors[*first].0.clone(),
                more: unused.len() - 1,
            }),
        }
    }

    pub fn invalid(&self, reason: impl Into<String>) -> WeightsError {
        WeightsError::Invalid { path: self.path.clone(), reason: reason.into() }
    }

    pub fn unknown_layout(&self, reason: impl Into<String>) -> WeightsError {
        WeightsError::UnknownLayout { path: self.path.clone(), reason: reason.into() }
    }
}

/// Writes f32 tensors to a safetensors file (`ov3 vae encode`, fixtures, exports, checkpoints) atomically.
pub fn save_f32(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> Result<(), WeightsError> {
    save_f32_with_metadata(path, tensors, None)
}

pub fn save_f32_with_metadata(
    path: &Path,
    tensors: &[(&str, Vec<usize>, Vec<f32>)],
    metadata: Option<HashMap<String, String>>,
) -> Result<(), WeightsError> {
    save_tensors(path, tensors, metadata, Dtype::F32)
}

/// Writes tensors stored as `dtype` (F32, or F16 for shipped files half the size) atomically.
pub fn save_tensors(
    path: &Path,
    tensors: &[(&str, Vec<usize>, Vec<f32>)],
    metadata: Option<HashMap<String, String>>,
    dtype: Dtype,
) -> Result<(), WeightsError> {
    let encode = |values: &[f32]| -> Vec<u8> {
        match dtype {
            Dtype::F16 => values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
            _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    };
    let dtype = if dtype == Dtype::F16 { Dtype::F16 } else { Dtype::F32 };
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> =
        tensors.iter().map(|(name, shape, values)| (name.to_string(), encode(values), shape.clone())).collect();
    let views: HashMap<String, safetensors::tensor::TensorView> = bytes
        .iter()
        .map(|(name, data, shape)| {
            let view = safetensors::tensor::TensorView::new(dtype, shape.clone(), data).expect("consistent view");
            (name.clone(), view)
        })
        .collect();
    let io = |e: std::io::Error| WeightsError::Io { path: path.display().to_string(), source: e };
    let bytes = safetensors::serialize(views, metadata).map_err(|e| io(std::io::Error::other(e.to_string())))?;
    crate::fsio::atomic_write(path, &bytes).map_err(io)
}
