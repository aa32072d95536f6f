//! What the HF parity tool computes: logits, losses and every gradient of a checkpoint on given
//! token ids, under the checkpoint's own tensor names, and the safetensors files it reads and writes.

use std::path::Path;

use burn::module::Param;
use burn::tensor::{Int, Tensor, TensorData, backend::AutodiffBackend};
use burn_moe_backend::{MoeBackend, MoeKernel};
use safetensors::{Dtype, SafeTensors};

use crate::checkpoint::{CheckpointError, FetchTensor, HfCheckpoint, hf_tensors};
use crate::model::AttentionKernel;

/// Reads the gradient of each parameter (zeros for a parameter that did not take part).
pub struct FetchGrad<'a, B: AutodiffBackend> {
    /// Gradients from `loss.backward()`.
    pub grads: &'a B::Gradients,
}

impl<B: AutodiffBackend> FetchTensor<B> for FetchGrad<'_, B> {
    fn fetch<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) -> Vec<f32> {
        match param.val().grad(self.grads) {
            Some(g) => g.into_data().iter::<f32>().collect(),
            None => vec![0.0; param.shape().num_elements()],
        }
    }
}

/// Reads `input_ids [B, S]` (any integer dtype) from a safetensors file and checks the ids against
/// the vocabulary.
///
/// # Errors
/// [`CheckpointError::Input`] naming the file for a missing tensor, a wrong rank or dtype, an empty
/// batch or an id outside `0..vocab_size`.
pub fn read_input_ids(path: &Path, vocab_size: usize) -> Result<TensorData, CheckpointError> {
    let display = path.display().to_string();
    let bad = |message: String| CheckpointError::Input { path: display.clone(), message };
    let bytes = std::fs::read(path).map_err(|source| CheckpointError::Io { path: display.clone(), source })?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| CheckpointError::Safetensors { path: display.clone(), message: format!("{e:?}") })?;
    let view = st.tensor("input_ids").map_err(|_| bad("no tensor `input_ids`".into()))?;
    let shape = view.shape().to_vec();
    if shape.len() != 2 || shape[0] == 0 || shape[1] == 0 {
        return Err(bad(format!("input_ids must be a non-empty [B, S] tensor, got shape {shape:?}")));
    }
    let data = view.data();
    let ids: Vec<i64> = match view.dtype() {
        Dtype::I64 => data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect(),
        Dtype::I32 => data.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64).collect(),
        other => return Err(bad(format!("input_ids has dtype {other:?}, expected I64 or I32"))),
    };
    if let Some((pos, id)) = ids.iter().enumerate().find(|(_, id)| **id < 0 || **id as usize >= vocab_size) {
        return Err(bad(format!("token id {id} at flat position {pos} is outside the vocabulary 0..{vocab_size}")));
    }
    Ok(TensorData::new(ids, shape))
}

/// Runs the checkpoint on `input_ids` with `labels = input_ids` (HF's convention) and returns
/// `logits [B,S,V]`, `loss`, `lm_loss`, `aux_loss` (shape `[]`), and with `grads` one
/// `grad.<name>` per checkpoint tensor: d(loss)/d(tensor) under the on-disk name and shape.
///
/// # Errors
/// [`CheckpointError`] from loading the checkpoint.
pub fn parity_outputs<B: AutodiffBackend + MoeBackend>(
    checkpoint: &HfCheckpoint,
    input_ids: TensorData,
    grads: bool,
    kernel: MoeKernel,
    device: &B::Device,
) -> Result<Vec<(String, TensorData)>, CheckpointError> {
    parity_outputs_with_attention::<B>(checkpoint, input_ids, grads, kernel, (AttentionKernel::Eager, None), device)
}

/// [`parity_outputs`] with the attention layers computed by `attention` (kernel, queries per block
/// of the chunked kernel).
///
/// # Errors
/// [`CheckpointError`] from loading the checkpoint.
pub fn parity_outputs_with_attention<B: AutodiffBackend + MoeBackend>(
    checkpoint: &HfCheckpoint,
    input_ids: TensorData,
    grads: bool,
    kernel: MoeKernel,
    attention: (AttentionKernel, Option<usize>),
    device: &B::Device,
) -> Result<Vec<(String, TensorData)>, CheckpointError> {
    let model = checkpoint.load_model::<B>(device, kernel)?.with_attention_kernel(attention.0, attention.1);
    let ids = Tensor::<B, 2, Int>::from_data(input_ids, device);
    let out = model.forward_with_labels(ids.clone(), ids);
    let scalar = |t: Tensor<B, 1>| TensorData::new(t.into_data().iter::<f32>().collect::<Vec<_>>(), Vec::<usize>::new());
    let mut result = vec![
        ("logits".to_string(), out.logits.clone().into_data().convert::<f32>()),
        ("loss".to_string(), scalar(out.loss.clone())),
        ("lm_loss".to_string(), scalar(out.lm_loss)),
        ("aux_loss".to_string(), scalar(out.aux_loss)),
    ];
    if grads {
        let gradients = out.loss.backward();
        let mut fetch = FetchGrad::<B> { grads: &gradients };
        for (name, data) in hf_tensors(&model, checkpoint.layout, &mut fetch) {
            result.push((format!("grad.{name}"), data));
        }
    }
    Ok(result)
}

/// Writes named f32 tensors to a safetensors file.
///
/// # Errors
/// [`CheckpointError::Io`] naming the file.
pub fn write_f32_safetensors(path: &Path, tensors: &[(String, TensorData)]) -> Result<(), CheckpointError> {
    let encoded: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, d)| (n.clone(), d.shape.to_vec(), d.iter::<f32>().flat_map(f32::to_le_bytes).collect()))
        .collect();
    let views = encoded
        .iter()
        .map(|(n, shape, bytes)| {
            safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytes).map(|v| (n.as_str(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CheckpointError::Io { path: path.display().to_string(), source: std::io::Error::other(format!("{e:?}")) })?;
    safetensors::serialize_to_file(views, None, path)
        .map_err(|e| CheckpointError::Io { path: path.display().to_string(), source: std::io::Error::other(format!("{e:?}")) })
}
