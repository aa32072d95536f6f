use std::borrow::Cow;
use std::path::Path;

use burn::module::Param;
use burn::tensor::{Tensor, TensorData, backend::Backend};
use safetensors::{Dtype, View};

use super::error::CheckpointError;
use super::import::HfLayout;
use crate::config::MixtralConfig;
use crate::model::MixtralForCausalLM;

/// Turns one parameter of the model into host data: its value, or (for the parity tool) its gradient.
pub trait FetchTensor<B: Backend> {
    /// Host copy of whatever this fetcher reads for `param`, as f32 in row-major order.
    fn fetch<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) -> Vec<f32>;
}

/// Reads parameter values.
pub struct FetchValue;

impl<B: Backend> FetchTensor<B> for FetchValue {
    fn fetch<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) -> Vec<f32> {
        param.val().into_data().iter::<f32>().collect()
    }
}

/// Every tensor of the model under its HF name and shape, in the given layout, in a stable order.
///
/// Expert weights are split (classic) or fused (`gate_up_proj = cat(w1, w3)` along the row axis)
/// on the host, so the same mapping serves values and gradients.
pub fn hf_tensors<B: Backend, F: FetchTensor<B>>(
    model: &MixtralForCausalLM<B>,
    layout: HfLayout,
    fetch: &mut F,
) -> Vec<(String, TensorData)> {
    let mut out = Vec::new();
    let mut push = |name: String, data: Vec<f32>, shape: Vec<usize>| out.push((name, TensorData::new(data, shape)));
    let m = &model.model;
    push("model.embed_tokens.weight".into(), fetch.fetch(&m.embed_tokens.weight), m.embed_tokens.weight.dims().to_vec());
    for (l, layer) in m.layers.iter().enumerate() {
        let p = format!("model.layers.{l}");
        let a = &layer.self_attn;
        for (name, lin) in [("q_proj", &a.q_proj), ("k_proj", &a.k_proj), ("v_proj", &a.v_proj), ("o_proj", &a.o_proj)] {
            push(format!("{p}.self_attn.{name}.weight"), fetch.fetch(&lin.weight), lin.weight.dims().to_vec());
        }
        for (name, norm) in [("input_layernorm", &layer.input_layernorm), ("post_attention_layernorm", &layer.post_attention_layernorm)] {
            push(format!("{p}.{name}.weight"), fetch.fetch(&norm.weight), norm.weight.dims().to_vec());
        }
        let moe = &layer.mlp;
        let [e, f, d] = moe.w1.dims();
        let (gate, w1, w3, w2) = (fetch.fetch(&moe.gate), fetch.fetch(&moe.w1), fetch.fetch(&moe.w3), fetch.fetch(&moe.w2));
        match layout {
            HfLayout::Classic => {
                push(format!("{p}.block_sparse_moe.gate.weight"), gate, vec![e, d]);
                for x in 0..e {
                    let q = format!("{p}.block_sparse_moe.experts.{x}");
                    let part = |v: &[f32]| v[x * f * d..(x + 1) * f * d].to_vec();
                    push(format!("{q}.w1.weight"), part(&w1), vec![f, d]);
                    push(format!("{q}.w2.weight"), part(&w2), vec![d, f]);
                    push(format!("{q}.w3.weight"), part(&w3), vec![f, d]);
                }
            }
            HfLayout::Fused => {
                push(format!("{p}.mlp.gate.weight"), gate, vec![e, d]);
                let mut gate_up = Vec::with_capacity(2 * w1.len());
                for (a, b) in w1.chunks_exact(f * d).zip(w3.chunks_exact(f * d)) {
                    gate_up.extend_from_slice(a);
                    gate_up.extend_from_slice(b);
                }
                push(format!("{p}.mlp.experts.gate_up_proj"), gate_up, vec![e, 2 * f, d]);
                push(format!("{p}.mlp.experts.down_proj"), w2, vec![e, d, f]);
            }
        }
    }
    push("model.norm.weight".into(), fetch.fetch(&m.norm.weight), m.norm.weight.dims().to_vec());
    push("lm_head.weight".into(), fetch.fetch(&model.lm_head.weight), model.lm_head.weight.dims().to_vec());
    out
}

/// Element type of a written checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveDtype {
    /// 32-bit float.
    F32,
    /// bfloat16 (round to nearest even).
    Bf16,
    /// IEEE half.
    F16,
}

struct HostTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &HostTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn encode(data: &TensorData, dtype: SaveDtype) -> HostTensor {
    let values = data.iter::<f32>();
    let (dtype, bytes) = match dtype {
        SaveDtype::F32 => (Dtype::F32, values.flat_map(f32::to_le_bytes).collect()),
        SaveDtype::Bf16 => (Dtype::BF16, values.flat_map(|v| half::bf16::from_f32(v).to_le_bytes()).collect()),
        SaveDtype::F16 => (Dtype::F16, values.flat_map(|v| half::f16::from_f32(v).to_le_bytes()).collect()),
    };
    HostTensor { dtype, shape: data.shape.to_vec(), bytes }
}

/// Writes `config.json` and `model.safetensors` in the given layout. Each file is written to a
/// temporary name and renamed, so an interrupted save never leaves a file that looks complete.
///
/// # Errors
/// [`CheckpointError::Io`] naming the file.
pub fn save_hf<B: Backend>(
    model: &MixtralForCausalLM<B>,
    config: &MixtralConfig,
    dir: impl AsRef<Path>,
    layout: HfLayout,
    dtype: SaveDtype,
) -> Result<(), CheckpointError> {
    let dir = dir.as_ref();
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| CheckpointError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tensors: Vec<(String, HostTensor)> =
        hf_tensors(model, layout, &mut FetchValue).into_iter().map(|(n, d)| (n, encode(&d, dtype))).collect();
    write_safetensors_atomic(dir, "model.safetensors", &tensors)?;
    remove_stale_shards(dir)?;

    let mut json = config.to_hf_json();
    json["torch_dtype"] = match dtype {
        SaveDtype::F32 => "float32",
        SaveDtype::Bf16 => "bfloat16",
        SaveDtype::F16 => "float16",
    }
    .into();
    let config_path = dir.join("config.json");
    let tmp = dir.join(".config.json.tmp");
    let text = serde_json::to_string_pretty(&json).expect("a JSON value always serialises");
    std::fs::write(&tmp, text).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &config_path).map_err(io(&config_path))?;
    Ok(())
}

/// A sharded checkpoint saved earlier into the same directory would shadow nothing (the reader and
/// transformers both prefer `model.safetensors`) but would waste space and mislead people: its
/// index and the shards it lists go once the new file is in place.
fn remove_stale_shards(dir: &Path) -> Result<(), CheckpointError> {
    let index = dir.join("model.safetensors.index.json");
    let Ok(text) = std::fs::read_to_string(&index) else {
        return Ok(());
    };
    let shards: Vec<String> = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|json| json.get("weight_map").and_then(|m| m.as_object()).cloned())
        .map(|map| map.values().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    for shard in shards {
        // Only plain file names inside the directory; never the file just written.
        if shard.contains('/') || shard.contains('\\') || shard == "model.safetensors" {
            continue;
        }
        let path = dir.join(&shard);
        if path.exists() {
            std::fs::remove_file(&path).map_err(|source| CheckpointError::Io { path: path.display().to_string(), source })?;
        }
    }
    std::fs::remove_file(&index).map_err(|source| CheckpointError::Io { path: index.display().to_string(), source })
}

/// [`save_hf`] in the classic per-expert layout, the one every transformers version loads.
///
/// # Errors
/// [`CheckpointError::Io`] naming the file.
pub fn save_hf_classic<B: Backend>(
    model: &MixtralForCausalLM<B>,
    config: &MixtralConfig,
    dir: impl AsRef<Path>,
    dtype: SaveDtype,
) -> Result<(), CheckpointError> {
    save_hf(model, config, dir, HfLayout::Classic, dtype)
}

/// Writes the LoRA adapters of `model` in PEFT's format: `adapter_model.safetensors` (f32, keys such
/// as `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` and, for experts,
/// `base_model.model.model.layers.{i}.block_sparse_moe.experts.{e}.w1.lora_B.weight`) and
/// `adapter_config.json` (`r`, `lora_alpha`, `lora_dropout`, `target_modules`). Returns the number
/// of tensors written (0 writes nothing: the model has no adapter).
///
/// # Errors
/// [`CheckpointError::Io`] naming the file.
pub fn save_peft_adapter<B: Backend>(
    model: &MixtralForCausalLM<B>,
    config: &crate::LoraConfig,
    targets: crate::model::LoraTargets,
    dir: impl AsRef<Path>,
) -> Result<usize, CheckpointError> {
    let dir = dir.as_ref();
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| CheckpointError::Io { path, source }
    };
    let mut tensors: Vec<(String, HostTensor)> = Vec::new();
    let mut push = |name: String, t: Tensor<B, 2>| tensors.push((name, encode(&t.into_data().convert::<f32>(), SaveDtype::F32)));
    for (l, layer) in model.model.layers.iter().enumerate() {
        let a = &layer.self_attn;
        for (name, lin) in [("q_proj", &a.q_proj), ("k_proj", &a.k_proj), ("v_proj", &a.v_proj), ("o_proj", &a.o_proj)] {
            if let Some(lora) = &lin.lora {
                push(peft_attn_key(l, name, "lora_A"), lora.a.val());
                push(peft_attn_key(l, name, "lora_B"), lora.b.val());
            }
        }
        if let Some(lora) = &layer.mlp.lora {
            for (name, ad) in [("w1", &lora.w1), ("w2", &lora.w2), ("w3", &lora.w3)] {
                let [e, r, i] = ad.a.dims();
                let [_, o, _] = ad.b.dims();
                for x in 0..e {
                    push(peft_expert_key(l, x, name, "lora_A"), ad.a.val().slice([x..x + 1]).reshape([r, i]));
                    push(peft_expert_key(l, x, name, "lora_B"), ad.b.val().slice([x..x + 1]).reshape([o, r]));
                }
            }
        }
    }
    if tensors.is_empty() {
        return Ok(0);
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    write_safetensors_atomic(dir, "adapter_model.safetensors", &tensors)?;
    let json = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": targets.module_names(),
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
    });
    let path = dir.join("adapter_config.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json).expect("a JSON value always serialises")).map_err(io(&path))?;
    Ok(tensors.len())
}

/// PEFT's key of an attention adapter matrix: `part` is `lora_A` or `lora_B`, `proj` `q_proj`, ….
/// Shared with [`load_peft_adapter`](super::load_peft_adapter), so what is written is what is read.
pub(super) fn peft_attn_key(layer: usize, proj: &str, part: &str) -> String {
    format!("base_model.model.model.layers.{layer}.self_attn.{proj}.{part}.weight")
}

/// PEFT's key of one expert's adapter matrix in the classic per-expert layout (`w` is `w1`, `w2`, `w3`).
pub(super) fn peft_expert_key(layer: usize, expert: usize, w: &str, part: &str) -> String {
    format!("base_model.model.model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.{part}.weight")
}

/// Writes `dir/name` (torch-style `format: pt` metadata) through a hidden temporary file renamed
/// into place, so a crash never leaves a half-written file under the final name.
fn write_safetensors_atomic(dir: &Path, name: &str, tensors: &[(String, HostTensor)]) -> Result<(), CheckpointError> {
    let weights = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut metadata = std::collections::HashMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    safetensors::serialize_to_file(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata), &tmp).map_err(|e| {
        CheckpointError::Io { path: tmp.display().to_string(), source: std::io::Error::other(format!("{e:?}")) }
    })?;
    std::fs::rename(&tmp, &weights)
        .map_err(|source| CheckpointError::Io { path: weights.display().to_string(), source })
}
