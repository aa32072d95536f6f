//! Reading back the LoRA adapters [`save_peft_adapter`](super::save_peft_adapter) wrote (PEFT's
//! `adapter_model.safetensors`), into a model that already carries adapters of the same shapes.

use std::path::Path;

use burn::module::Param;
use burn::tensor::{Tensor, TensorData, backend::Backend};
use safetensors::{Dtype, SafeTensors};

use super::error::CheckpointError;
use super::export::{peft_attn_key, peft_expert_key};
use crate::model::MixtralForCausalLM;

/// Replaces the adapter weights of `model` (made with
/// [`with_lora`](MixtralForCausalLM::with_lora) for the same targets and rank) by those of
/// `dir/adapter_model.safetensors`. Parameter ids, trainability and dtype of every adapter stay;
/// the base weights are untouched.
///
/// # Errors
/// [`CheckpointError`] naming the file and tensor: a missing or corrupt file, a missing tensor, a
/// shape that differs from the model's adapter, a dtype other than f32.
pub fn load_peft_adapter<B: Backend>(
    mut model: MixtralForCausalLM<B>,
    dir: impl AsRef<Path>,
) -> Result<MixtralForCausalLM<B>, CheckpointError> {
    let path = dir.as_ref().join("adapter_model.safetensors");
    let file = path.display().to_string();
    let bytes = std::fs::read(&path).map_err(|source| CheckpointError::Io { path: file.clone(), source })?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| CheckpointError::Safetensors { path: file.clone(), message: format!("{e:?}") })?;
    // One `[rows, cols]` adapter matrix, checked against the model's.
    let read = |name: &str, rows: usize, cols: usize| -> Result<Vec<f32>, CheckpointError> {
        let view = st.tensor(name).map_err(|_| CheckpointError::MissingTensor { dir: file.clone(), name: name.to_string() })?;
        if view.shape() != [rows, cols] {
            return Err(CheckpointError::Shape { name: name.to_string(), file: file.clone(), expected: vec![rows, cols], found: view.shape().to_vec() });
        }
        if view.dtype() != Dtype::F32 {
            return Err(CheckpointError::Dtype { name: name.to_string(), file: file.clone(), dtype: format!("{:?}", view.dtype()) });
        }
        Ok(view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    };
    for (l, layer) in model.model.layers.iter_mut().enumerate() {
        let a = &mut layer.self_attn;
        for (name, lin) in [("q_proj", &mut a.q_proj), ("k_proj", &mut a.k_proj), ("v_proj", &mut a.v_proj), ("o_proj", &mut a.o_proj)] {
            if let Some(lora) = lin.lora.as_mut() {
                for (part, param) in [("lora_A", &mut lora.a), ("lora_B", &mut lora.b)] {
                    let [rows, cols] = param.dims();
                    let values = read(&peft_attn_key(l, name, part), rows, cols)?;
                    replace(param, TensorData::new(values, [rows, cols]));
                }
            }
        }
        if let Some(lora) = layer.mlp.lora.as_mut() {
            for (name, ad) in [("w1", &mut lora.w1), ("w2", &mut lora.w2), ("w3", &mut lora.w3)] {
                for (part, param) in [("lora_A", &mut ad.a), ("lora_B", &mut ad.b)] {
                    let [experts, rows, cols] = param.dims();
                    let mut values = Vec::with_capacity(experts * rows * cols);
                    for e in 0..experts {
                        values.extend(read(&peft_expert_key(l, e, name, part), rows, cols)?);
                    }
                    replace(param, TensorData::new(values, [experts, rows, cols]));
                }
            }
        }
    }
    Ok(model)
}

/// Swaps a parameter's value, keeping its id, trainability, device and dtype.
fn replace<B: Backend, const D: usize>(param: &mut Param<Tensor<B, D>>, data: TensorData) {
    let old = param.val();
    let value = Tensor::<B, D>::from_data(data, (&old.device(), old.dtype()));
    let value = if param.is_require_grad() { value.require_grad() } else { value };
    *param = Param::initialized(param.id, value);
}
