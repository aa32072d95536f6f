use std::borrow::Cow;
use std::path::Path;

use burn::module::Param;
use burn::tensor::{Tensor, TensorData, backend::Backend};
use safetensors::{Dtype, View};

use super::error::CheckpointError;
use super::import::HfLayout;
use crate::config::MixtralConfig;
use crate::model::MixtralForCausalLM;

/// Turns one parameter of the model into host data: its value, or (for the parity tool) its gradient,
/// or (for a sharded trainer) the whole tensor gathered from the ranks' shards.
pub trait FetchTensor<B: Backend> {
    /// Host copy of whatever this fetcher reads for `param`, as f32 in row-major order, of shape
    /// [`dims`](Self::dims).
    fn fetch<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) -> Vec<f32>;

    /// The shape of what [`fetch`](Self::fetch) returns for `param`: its own shape, unless the
    /// model holds only a shard of it.
    fn dims<const D: usize>(&self, param: &Param<Tensor<B, D>>) -> Vec<usize> {
        param.dims().to_vec()
    }

    /// A fetch that failed since the last call (e.g. a collective), as a message; what it returned
    /// is then not to be written. Fetchers that cannot fail keep the default.
    fn take_error(&mut self) -> Option<String> {
        None
    }
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
    (0..hf_parts(model))
        .flat_map(|part| hf_part(model, layout, part, &mut *fetch, true))
        .map(|(name, shape, data)| (name, TensorData::new(data.expect("fetched"), shape)))
        .collect()
}

/// Number of parts [`hf_part`] splits the model into: the embedding, each decoder layer, the head.
fn hf_parts<B: Backend>(model: &MixtralForCausalLM<B>) -> usize {
    model.model.layers.len() + 2
}

/// The HF tensors of part `part` of the model (0: the embedding; `1..=L`: decoder layer `part − 1`;
/// `L + 1`: the final norm and the LM head) as `(name, shape, values)`, in file order, shapes as
/// `fetch` returns them. Without `with_data` only names and shapes: nothing is fetched.
///
/// Why by part: a streaming save holds one part on the host at a time (a Mixtral-8x7B decoder layer
/// is 1.4 G parameters; the whole model 47 G).
fn hf_part<B: Backend, F: FetchTensor<B>>(
    model: &MixtralForCausalLM<B>,
    layout: HfLayout,
    part: usize,
    fetch: &mut F,
    with_data: bool,
) -> Vec<(String, Vec<usize>, Option<Vec<f32>>)> {
    let mut get = |p: &dyn Fetchable<B, F>| (p.fetched_dims(fetch), with_data.then(|| p.fetched(fetch)));
    let mut out = Vec::new();
    let m = &model.model;
    let layers = m.layers.len();
    let mut push = |name: String, (dims, data): (Vec<usize>, Option<Vec<f32>>)| out.push((name, dims, data));
    if part == 0 {
        push("model.embed_tokens.weight".into(), get(&m.embed_tokens.weight));
    } else if part == layers + 1 {
        push("model.norm.weight".into(), get(&m.norm.weight));
        push("lm_head.weight".into(), get(&model.lm_head.weight));
    } else if let Some(layer) = m.layers.get(part - 1) {
        let p = format!("model.layers.{}", part - 1);
        let a = &layer.self_attn;
        for (name, lin) in [("q_proj", &a.q_proj), ("k_proj", &a.k_proj), ("v_proj", &a.v_proj), ("o_proj", &a.o_proj)] {
            push(format!("{p}.self_attn.{name}.weight"), get(&lin.weight));
        }
        for (name, norm) in [("input_layernorm", &layer.input_layernorm), ("post_attention_layernorm", &layer.post_attention_layernorm)] {
            push(format!("{p}.{name}.weight"), get(&norm.weight));
        }
        let moe = &layer.mlp;
        let (gate_dims, gate) = get(&moe.gate);
        let (w1_dims, w1) = get(&moe.w1);
        let (_, w3) = get(&moe.w3);
        let (_, w2) = get(&moe.w2);
        let [e, f, d]: [usize; 3] = w1_dims.try_into().expect("stacked experts are [E, F, D]");
        debug_assert_eq!(gate_dims, vec![e, d]);
        match layout {
            HfLayout::Classic => {
                push(format!("{p}.block_sparse_moe.gate.weight"), (vec![e, d], gate));
                for x in 0..e {
                    let q = format!("{p}.block_sparse_moe.experts.{x}");
                    let part = |v: &Option<Vec<f32>>| v.as_ref().map(|v| v[x * f * d..(x + 1) * f * d].to_vec());
                    push(format!("{q}.w1.weight"), (vec![f, d], part(&w1)));
                    push(format!("{q}.w2.weight"), (vec![d, f], part(&w2)));
                    push(format!("{q}.w3.weight"), (vec![f, d], part(&w3)));
                }
            }
            HfLayout::Fused => {
                push(format!("{p}.mlp.gate.weight"), (vec![e, d], gate));
                let gate_up = w1.zip(w3).map(|(w1, w3)| {
                    let mut fused = Vec::with_capacity(2 * w1.len());
                    for (a, b) in w1.chunks_exact(f * d).zip(w3.chunks_exact(f * d)) {
                        fused.extend_from_slice(a);
                        fused.extend_from_slice(b);
                    }
                    fused
                });
                push(format!("{p}.mlp.experts.gate_up_proj"), (vec![e, 2 * f, d], gate_up));
                push(format!("{p}.mlp.experts.down_proj"), (vec![e, d, f], w2));
            }
        }
    }
    out
}

/// A parameter of any rank, for [`hf_part`]'s one closure over parameters of ranks 1 to 3.
trait Fetchable<B: Backend, F: FetchTensor<B>> {
    fn fetched_dims(&self, fetch: &F) -> Vec<usize>;
    fn fetched(&self, fetch: &mut F) -> Vec<f32>;
}

impl<B: Backend, F: FetchTensor<B>, const D: usize> Fetchable<B, F> for Param<Tensor<B, D>> {
    fn fetched_dims(&self, fetch: &F) -> Vec<usize> {
        fetch.dims(self)
    }
    fn fetched(&self, fetch: &mut F) -> Vec<f32> {
        fetch.fetch(self)
    }
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

/// `data` (f32) as a tensor of `dtype`.
fn encode(data: &TensorData, dtype: SaveDtype) -> HostTensor {
    let values = data.as_slice::<f32>().expect("encode is given f32 data");
    HostTensor { dtype: dtype.safetensors(), shape: data.shape.to_vec(), bytes: encode_values(values, dtype) }
}

/// Little-endian bytes of `values` in `dtype` (bf16/f16 rounded to nearest even).
fn encode_values(values: &[f32], dtype: SaveDtype) -> Vec<u8> {
    match dtype {
        SaveDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        SaveDtype::Bf16 => values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
        SaveDtype::F16 => values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
    }
}

impl SaveDtype {
    fn safetensors(self) -> Dtype {
        match self {
            Self::F32 => Dtype::F32,
            Self::Bf16 => Dtype::BF16,
            Self::F16 => Dtype::F16,
        }
    }
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
    save_hf_with(model, config, Some(dir.as_ref()), layout, dtype, &mut FetchValue)
}

/// [`save_hf`] with the tensors read by `fetch` (e.g. gathered from the shards of a sharded
/// model, one tensor at a time, see [`FetchTensor::dims`]). With `dir = None` every tensor is
/// fetched in the same order and nothing is written: what the other ranks of a collective fetch do
/// while one rank writes.
///
/// # Errors
/// [`CheckpointError::Io`] naming the file; [`CheckpointError::Fetch`] when `fetch` reports a failure
/// (nothing is then left under the final name).
pub fn save_hf_with<B: Backend, F: FetchTensor<B>>(
    model: &MixtralForCausalLM<B>,
    config: &MixtralConfig,
    dir: Option<&Path>,
    layout: HfLayout,
    dtype: SaveDtype,
    fetch: &mut F,
) -> Result<(), CheckpointError> {
    let failed = |fetch: &mut F| fetch.take_error().map_or(Ok(()), |message| Err(CheckpointError::Fetch { message }));
    let parts = hf_parts(model);
    let Some(dir) = dir else {
        for part in 0..parts {
            drop(hf_part(model, layout, part, fetch, true));
            failed(fetch)?;
        }
        return Ok(());
    };
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| CheckpointError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    // Streamed part by part (embedding, each layer, head): the header is known from the shapes alone,
    // so at most one decoder layer is on the host at a time, whatever the model's size.
    let specs: Vec<(String, Dtype, Vec<usize>)> = (0..parts)
        .flat_map(|part| hf_part(model, layout, part, fetch, false))
        .map(|(name, shape, _)| (name, dtype.safetensors(), shape))
        .collect();
    let mut file = StreamingSafetensors::create(dir, "model.safetensors", &specs)?;
    for part in 0..parts {
        let tensors = hf_part(model, layout, part, fetch, true);
        if let Err(e) = failed(fetch) {
            file.abandon();
            return Err(e);
        }
        for (name, _, values) in tensors {
            file.write(&name, &encode_values(&values.expect("fetched"), dtype))?;
        }
    }
    file.finish()?;
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

/// A safetensors file written tensor by tensor: the header (names, dtypes, shapes, offsets) goes
/// first, computed from the specs, then each tensor's bytes in spec order, into a hidden temporary
/// file that [`finish`](Self::finish) renames into place (a crash never leaves a half-written file
/// under the final name). Torch-style `format: pt` metadata, header padded to 8 bytes as the
/// reference writer does.
struct StreamingSafetensors {
    file: std::io::BufWriter<std::fs::File>,
    tmp: std::path::PathBuf,
    path: std::path::PathBuf,
    /// `(name, bytes)` of every tensor, in file order.
    expected: Vec<(String, usize)>,
    /// How many tensors have been written.
    next: usize,
}

impl StreamingSafetensors {
    fn create(dir: &Path, name: &str, specs: &[(String, Dtype, Vec<usize>)]) -> Result<Self, CheckpointError> {
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        let io = |source| CheckpointError::Io { path: tmp.display().to_string(), source };
        let mut header = String::from(r#"{"__metadata__":{"format":"pt"}"#);
        let mut offset = 0usize;
        let mut expected = Vec::with_capacity(specs.len());
        for (tensor, dtype, shape) in specs {
            let bytes = shape.iter().product::<usize>() * dtype.bitsize() / 8;
            let entry = serde_json::json!({ "dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes] });
            let key = serde_json::to_string(tensor).expect("a string always serialises");
            header.push_str(&format!(",{key}:{entry}"));
            offset += bytes;
            expected.push((tensor.clone(), bytes));
        }
        header.push('}');
        while header.len() % 8 != 0 {
            header.push(' ');
        }
        let file = std::fs::File::create(&tmp).map_err(io)?;
        let mut file = std::io::BufWriter::with_capacity(1 << 22, file);
        use std::io::Write;
        file.write_all(&(header.len() as u64).to_le_bytes()).map_err(io)?;
        file.write_all(header.as_bytes()).map_err(io)?;
        Ok(Self { file, tmp, path, expected, next: 0 })
    }

    /// Writes the next tensor's bytes.
    ///
    /// # Errors
    /// [`CheckpointError::Io`]; also when `name` or the byte count is not the next spec's (a bug of
    /// the caller, reported rather than written as a corrupt file).
    fn write(&mut self, name: &str, bytes: &[u8]) -> Result<(), CheckpointError> {
        let tmp = self.tmp.display().to_string();
        let mismatch = |message: String| CheckpointError::Io { path: tmp.clone(), source: std::io::Error::other(message) };
        let Some((want, len)) = self.expected.get(self.next) else {
            return Err(mismatch(format!("tensor {name} written after the {} the header lists", self.expected.len())));
        };
        if want != name || *len != bytes.len() {
            return Err(mismatch(format!("tensor {name} ({} bytes) written where the header has {want} ({len} bytes)", bytes.len())));
        }
        use std::io::Write;
        self.file.write_all(bytes).map_err(|source| CheckpointError::Io { path: tmp, source })?;
        self.next += 1;
        Ok(())
    }

    /// Removes the temporary file (a failed save).
    fn abandon(self) {
        let Self { file, tmp, .. } = self;
        drop(file);
        let _ = std::fs::remove_file(tmp);
    }

    /// Flushes, syncs and renames the file into place once every tensor has been written.
    ///
    /// # Errors
    /// [`CheckpointError::Io`], also when tensors are missing.
    fn finish(self) -> Result<(), CheckpointError> {
        let tmp = self.tmp.display().to_string();
        if self.next != self.expected.len() {
            let message = format!("{} of {} tensors written", self.next, self.expected.len());
            return Err(CheckpointError::Io { path: tmp, source: std::io::Error::other(message) });
        }
        let file = self.file.into_inner().map_err(|e| CheckpointError::Io { path: tmp.clone(), source: e.into_error() })?;
        file.sync_all().map_err(|source| CheckpointError::Io { path: tmp, source })?;
        std::fs::rename(&self.tmp, &self.path).map_err(|source| CheckpointError::Io { path: self.path.display().to_string(), source })
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The streamed file reads back, through the safetensors crate, as the tensors written, with
    /// the metadata torch expects; a write out of order or a missing tensor is an error, and leaves
    /// no file under the final name.
    #[test]
    fn streamed_safetensors_read_back() {
        let dir = std::env::temp_dir().join(format!("burn-moe-stream-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let specs = vec![
            ("b.weight".to_string(), Dtype::F32, vec![2, 3]),
            ("a\"odd\".name".to_string(), Dtype::BF16, vec![5]),
            ("empty".to_string(), Dtype::F16, vec![0, 4]),
        ];
        let f32s: Vec<f32> = (0..6).map(|i| i as f32 * 1.5 - 2.0).collect();
        let bf16s: Vec<f32> = vec![1.0, -0.5, 3.25, 0.0, 1e-3];
        let mut file = StreamingSafetensors::create(&dir, "x.safetensors", &specs).unwrap();
        file.write("b.weight", &encode_values(&f32s, SaveDtype::F32)).unwrap();
        file.write("a\"odd\".name", &encode_values(&bf16s, SaveDtype::Bf16)).unwrap();
        file.write("empty", &[]).unwrap();
        file.finish().unwrap();

        let bytes = std::fs::read(dir.join("x.safetensors")).unwrap();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(header_len % 8, 0);
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta.metadata().as_ref().and_then(|m| m.get("format")).map(String::as_str), Some("pt"));
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let b = st.tensor("b.weight").unwrap();
        assert_eq!((b.dtype(), b.shape()), (Dtype::F32, &[2usize, 3][..]));
        assert_eq!(b.data(), &encode_values(&f32s, SaveDtype::F32)[..]);
        let a = st.tensor("a\"odd\".name").unwrap();
        assert_eq!((a.dtype(), a.shape()), (Dtype::BF16, &[5usize][..]));
        assert_eq!(a.data(), &encode_values(&bf16s, SaveDtype::Bf16)[..]);
        assert_eq!(st.tensor("empty").unwrap().shape(), &[0usize, 4][..]);

        let mut file = StreamingSafetensors::create(&dir, "y.safetensors", &specs).unwrap();
        let err = file.write("empty", &[]).unwrap_err().to_string();
        assert!(err.contains("where the header has b.weight"), "{err}");
        file.write("b.weight", &encode_values(&f32s, SaveDtype::F32)).unwrap();
        let err = file.finish().unwrap_err().to_string();
        assert!(err.contains("1 of 3 tensors written"), "{err}");
        assert!(!dir.join("y.safetensors").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Reads values, but reports a failure at its `fail_at`-th fetch (as a failed gather would).
    struct Failing {
        calls: usize,
        fail_at: usize,
        error: Option<String>,
    }

    impl<B: Backend> FetchTensor<B> for Failing {
        fn fetch<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) -> Vec<f32> {
            self.calls += 1;
            if self.calls == self.fail_at {
                self.error = Some(format!("gather {} failed", self.calls));
            }
            FetchValue.fetch(param)
        }
        fn take_error(&mut self) -> Option<String> {
            self.error.take()
        }
    }

    /// `save_hf_with` writes what `save_hf` writes; a fetch failure stops it with the fetcher's
    /// message and leaves neither the weights nor a temporary file; without a directory it only
    /// fetches (every tensor once, in order) and writes nothing.
    #[test]
    fn save_with_a_fetcher_writes_the_same_file_and_stops_on_a_failed_fetch() {
        type B = burn::backend::NdArray<f32>;
        let config = crate::MixtralConfig::tiny();
        let model = config.init_seeded::<B>(&Default::default(), 5);
        let dir = std::env::temp_dir().join(format!("burn-moe-save-with-{}", std::process::id()));
        let (a, b, c) = (dir.join("a"), dir.join("b"), dir.join("c"));
        save_hf(&model, &config, &a, HfLayout::Classic, SaveDtype::Bf16).unwrap();
        let mut ok = Failing { calls: 0, fail_at: usize::MAX, error: None };
        save_hf_with(&model, &config, Some(&b), HfLayout::Classic, SaveDtype::Bf16, &mut ok).unwrap();
        assert_eq!(std::fs::read(a.join("model.safetensors")).unwrap(), std::fs::read(b.join("model.safetensors")).unwrap());
        let per_layer = 4 + 2 + 4; // attention, norms, router + w1 + w3 + w2
        assert_eq!(ok.calls, 1 + config.num_hidden_layers * per_layer + 2);

        let mut failing = Failing { calls: 0, fail_at: 3, error: None };
        let err = save_hf_with(&model, &config, Some(&c), HfLayout::Classic, SaveDtype::F32, &mut failing).unwrap_err();
        assert!(err.to_string().contains("gather 3 failed"), "{err}");
        assert!(!c.join("model.safetensors").exists() && !c.join(".model.safetensors.tmp").exists());

        let mut only = Failing { calls: 0, fail_at: usize::MAX, error: None };
        save_hf_with(&model, &config, None, HfLayout::Classic, SaveDtype::F32, &mut only).unwrap();
        assert_eq!(only.calls, ok.calls);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
