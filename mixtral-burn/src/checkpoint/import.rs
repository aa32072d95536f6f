use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use burn::tensor::{Tensor, TensorData, backend::Backend};
use burn_moe_backend::{DMoe, MoeKernel};

use super::error::CheckpointError;
use super::reader::SafetensorsFiles;
use crate::config::MixtralConfig;
use crate::model::{DecoderLayer, HfLinear, MixtralAttention, MixtralForCausalLM, MixtralModel, RmsNorm};

/// How a checkpoint names and shapes the expert weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfLayout {
    /// Mixtral's original names: `model.layers.{l}.block_sparse_moe.experts.{e}.w1.weight` `[F, D]`,
    /// `…w2.weight` `[D, F]`, `…w3.weight` `[F, D]`, router `…block_sparse_moe.gate.weight` `[E, D]`.
    Classic,
    /// transformers 5: `model.layers.{l}.mlp.experts.gate_up_proj` `[E, 2F, D]` (= cat(w1, w3)),
    /// `…mlp.experts.down_proj` `[E, D, F]`, router `…mlp.gate.weight` `[E, D]`.
    Fused,
}

/// An HF Mixtral directory: `config.json` plus safetensors weights, memory-mapped.
pub struct HfCheckpoint {
    /// The directory.
    pub dir: PathBuf,
    /// Parsed `config.json`.
    pub config: MixtralConfig,
    /// Expert layout found on disk.
    pub layout: HfLayout,
    /// The mapped weight files.
    pub files: SafetensorsFiles,
}

impl HfCheckpoint {
    /// Opens a checkpoint directory (reads `config.json` and the safetensors headers only).
    ///
    /// # Errors
    /// [`CheckpointError`] naming the file for a missing/invalid config or weight file.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, CheckpointError> {
        let dir = dir.as_ref();
        let config = MixtralConfig::from_hf_json_file(&dir.join("config.json"))?;
        let files = SafetensorsFiles::open(dir)?;
        let layout = if files.names().any(|n| n.contains(".mlp.experts.gate_up_proj")) {
            HfLayout::Fused
        } else if files.names().any(|n| n.contains(".block_sparse_moe.")) {
            HfLayout::Classic
        } else {
            return Err(CheckpointError::UnknownLayout { dir: dir.display().to_string() });
        };
        Ok(Self { dir: dir.to_path_buf(), config, layout, files })
    }

    /// Builds the model from the checkpoint; every tensor must be used exactly once.
    ///
    /// # Errors
    /// [`CheckpointError`] for a missing, unexpected, mis-shaped or unreadable tensor.
    pub fn load_model<B: Backend>(
        &self,
        device: &B::Device,
        kernel: MoeKernel,
    ) -> Result<MixtralForCausalLM<B>, CheckpointError> {
        self.load_model_with_experts(device, kernel, None)
    }

    /// Like [`load_model`](Self::load_model), but with `experts = Some(range)` each layer holds only
    /// the experts `range` (what [`DMoe::local_experts`] would cut from the full model: the router
    /// stays whole): an expert-parallel rank reads only its own experts' bytes from the files, and
    /// never holds the others. The other experts' tensors must still exist (they are checked by
    /// name, not read).
    ///
    /// # Errors
    /// [`CheckpointError::ExpertRange`] for an empty range or one past the last expert; otherwise as
    /// [`load_model`](Self::load_model).
    pub fn load_model_with_experts<B: Backend>(
        &self,
        device: &B::Device,
        kernel: MoeKernel,
        experts: Option<std::ops::Range<usize>>,
    ) -> Result<MixtralForCausalLM<B>, CheckpointError> {
        let c = &self.config;
        let all = 0..c.num_local_experts;
        let local = experts.unwrap_or_else(|| all.clone());
        if local.is_empty() || local.end > all.end {
            return Err(CheckpointError::ExpertRange {
                dir: self.dir.display().to_string(),
                start: local.start,
                end: local.end,
                experts: all.end,
            });
        }
        let used = std::cell::RefCell::new(BTreeSet::new());
        let read = |name: String, shape: &[usize]| -> Result<TensorData, CheckpointError> {
            let data = self.files.read_f32(&name, shape)?;
            used.borrow_mut().insert(name);
            Ok(TensorData::new(data, shape.to_vec()))
        };
        // A stacked expert tensor `[E, ..]` (transformers 5 layout): only the rows of `local`.
        let read_experts = |name: String, shape: &[usize]| -> Result<Vec<f32>, CheckpointError> {
            if self.files.shape(&name) != Some(shape) {
                self.files.read_f32(&name, shape)?; // the shape error, naming the file
            }
            let mut ranges = vec![local.clone()];
            ranges.extend(shape[1..].iter().map(|&n| 0..n));
            let data = self.files.read_f32_block(&name, &ranges)?;
            used.borrow_mut().insert(name);
            Ok(data)
        };
        let mut skipped = Vec::new();
        let el = local.len();
        let (v, d, f, e, hd) = (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_local_experts, c.head_dim());
        let (h, kv) = (c.num_attention_heads, c.num_key_value_heads);

        let t2 = |data: TensorData| Tensor::<B, 2>::from_data(data, device);
        let t1 = |data: TensorData| Tensor::<B, 1>::from_data(data, device);
        let t3 = |data: TensorData| Tensor::<B, 3>::from_data(data, device);

        let embed = t2(read("model.embed_tokens.weight".into(), &[v, d])?);
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let linear = |data: TensorData| HfLinear::from_weight(t2(data));
            let self_attn = MixtralAttention {
                q_proj: linear(read(format!("{p}.self_attn.q_proj.weight"), &[h * hd, d])?),
                k_proj: linear(read(format!("{p}.self_attn.k_proj.weight"), &[kv * hd, d])?),
                v_proj: linear(read(format!("{p}.self_attn.v_proj.weight"), &[kv * hd, d])?),
                o_proj: linear(read(format!("{p}.self_attn.o_proj.weight"), &[d, h * hd])?),
                num_heads: h,
                num_kv_heads: kv,
                head_dim: hd,
                rope_theta: c.rope_theta,
                sliding_window: c.sliding_window,
            };
            let (gate, w1, w3, w2) = match self.layout {
                HfLayout::Classic => {
                    let gate = read(format!("{p}.block_sparse_moe.gate.weight"), &[e, d])?;
                    let mut w1 = Vec::with_capacity(el * f * d);
                    let mut w3 = Vec::with_capacity(el * f * d);
                    let mut w2 = Vec::with_capacity(el * d * f);
                    for x in 0..e {
                        let q = format!("{p}.block_sparse_moe.experts.{x}");
                        if !local.contains(&x) {
                            // Another rank's expert: present (checked below), not read.
                            for w in ["w1", "w3", "w2"] {
                                skipped.push(format!("{q}.{w}.weight"));
                            }
                            continue;
                        }
                        w1.extend(read(format!("{q}.w1.weight"), &[f, d])?.into_vec::<f32>().expect("f32 data"));
                        w3.extend(read(format!("{q}.w3.weight"), &[f, d])?.into_vec::<f32>().expect("f32 data"));
                        w2.extend(read(format!("{q}.w2.weight"), &[d, f])?.into_vec::<f32>().expect("f32 data"));
                    }
                    (gate, TensorData::new(w1, [el, f, d]), TensorData::new(w3, [el, f, d]), TensorData::new(w2, [el, d, f]))
                }
                HfLayout::Fused => {
                    let gate = read(format!("{p}.mlp.gate.weight"), &[e, d])?;
                    let gate_up = read_experts(format!("{p}.mlp.experts.gate_up_proj"), &[e, 2 * f, d])?;
                    let (mut w1, mut w3) = (Vec::with_capacity(el * f * d), Vec::with_capacity(el * f * d));
                    for chunk in gate_up.chunks_exact(2 * f * d) {
                        w1.extend_from_slice(&chunk[..f * d]);
                        w3.extend_from_slice(&chunk[f * d..]);
                    }
                    let w2 = read_experts(format!("{p}.mlp.experts.down_proj"), &[e, d, f])?;
                    (gate, TensorData::new(w1, [el, f, d]), TensorData::new(w3, [el, f, d]), TensorData::new(w2, [el, d, f]))
                }
            };
            layers.push(DecoderLayer {
                self_attn,
                mlp: DMoe::from_weights(t2(gate), t3(w1), t3(w3), t3(w2), c.num_experts_per_tok, kernel),
                input_layernorm: RmsNorm::from_weight(t1(read(format!("{p}.input_layernorm.weight"), &[d])?), c.rms_norm_eps),
                post_attention_layernorm: RmsNorm::from_weight(
                    t1(read(format!("{p}.post_attention_layernorm.weight"), &[d])?),
                    c.rms_norm_eps,
                ),
            });
        }
        let norm = RmsNorm::from_weight(t1(read("model.norm.weight".into(), &[d])?), c.rms_norm_eps);
        let lm_head = HfLinear::from_weight(t2(read("lm_head.weight".into(), &[v, d])?));

        let mut used = used.into_inner();
        for name in skipped {
            if self.files.shape(&name).is_none() {
                return Err(CheckpointError::MissingTensor { dir: self.dir.display().to_string(), name });
            }
            used.insert(name);
        }
        let unexpected: Vec<String> = self.files.names().filter(|n| !used.contains(*n)).map(str::to_string).collect();
        if !unexpected.is_empty() {
            return Err(CheckpointError::UnexpectedTensors { dir: self.dir.display().to_string(), names: unexpected });
        }
        Ok(MixtralForCausalLM {
            model: MixtralModel { embed_tokens: MixtralForCausalLM::<B>::embedding_from(embed), layers, norm },
            lm_head,
            router_aux_loss_coef: c.router_aux_loss_coef,
        })
    }
}
