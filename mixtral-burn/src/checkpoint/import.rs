use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn_moe_backend::{DMoe, MoeKernel};

use super::error::CheckpointError;
use super::lazy::{LazyWeights, Segment, materialize};
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
    /// The mapped weight files (shared with the lazy parameters that read from them).
    pub files: std::sync::Arc<SafetensorsFiles>,
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
        Ok(Self { dir: dir.to_path_buf(), config, layout, files: std::sync::Arc::new(files) })
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
        let (model, _) = self.load_model_lazy(device, kernel, experts)?;
        Ok(materialize(model))
    }

    /// Like [`load_model_with_experts`](Self::load_model_with_experts), but no value is read yet:
    /// every parameter is lazy and reads the files when first used — whole, or only the piece a
    /// sharding plan requested through the returned [`LazyWeights`] before taking it. This is how
    /// a sharded run loads a checkpoint straight into its shards. Everything that can go wrong
    /// (missing, unexpected or mis-shaped tensors, unreadable dtypes, a bad expert range) is
    /// checked here, from the headers, so the later reads cannot fail.
    ///
    /// # Errors
    /// As [`load_model_with_experts`](Self::load_model_with_experts).
    pub fn load_model_lazy<B: Backend>(
        &self,
        device: &B::Device,
        kernel: MoeKernel,
        experts: Option<std::ops::Range<usize>>,
    ) -> Result<(MixtralForCausalLM<B>, LazyWeights), CheckpointError> {
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
        let lazy = LazyWeights::default();
        let used = std::cell::RefCell::new(BTreeSet::new());
        // Checks one tensor's shape and dtype from the header and marks it used.
        let check = |name: &str, shape: &[usize]| -> Result<(), CheckpointError> {
            self.files.check(name, shape)?;
            used.borrow_mut().insert(name.to_string());
            Ok(())
        };
        let whole = |name: String, shape: &[usize]| -> Result<Vec<Segment>, CheckpointError> {
            check(&name, shape)?;
            Ok(vec![Segment { elements: 0..shape.iter().product(), name }])
        };
        let p1 = |segments: Vec<Segment>, shape: [usize; 1]| lazy.param::<B, 1>(&self.files, segments, shape, device);
        let p2 = |segments: Vec<Segment>, shape: [usize; 2]| lazy.param::<B, 2>(&self.files, segments, shape, device);
        let p3 = |segments: Vec<Segment>, shape: [usize; 3]| lazy.param::<B, 3>(&self.files, segments, shape, device);
        let mut skipped = Vec::new();
        let el = local.len();
        let (v, d, f, e, hd) = (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_local_experts, c.head_dim());
        let (h, kv) = (c.num_attention_heads, c.num_key_value_heads);

        let embed = p2(whole("model.embed_tokens.weight".into(), &[v, d])?, [v, d]);
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let linear = |name: String, rows: usize, cols: usize| -> Result<HfLinear<B>, CheckpointError> {
                Ok(HfLinear::from_param(p2(whole(name, &[rows, cols])?, [rows, cols])))
            };
            let self_attn = MixtralAttention {
                q_proj: linear(format!("{p}.self_attn.q_proj.weight"), h * hd, d)?,
                k_proj: linear(format!("{p}.self_attn.k_proj.weight"), kv * hd, d)?,
                v_proj: linear(format!("{p}.self_attn.v_proj.weight"), kv * hd, d)?,
                o_proj: linear(format!("{p}.self_attn.o_proj.weight"), d, h * hd)?,
                num_heads: h,
                num_kv_heads: kv,
                head_dim: hd,
                rope_theta: c.rope_theta,
                sliding_window: c.sliding_window,
                kernel: c.attention_kernel,
                query_block: None,
            };
            // Each expert weight is `[el, rows, cols]`: one segment per local expert.
            let (gate, w1, w3, w2) = match self.layout {
                HfLayout::Classic => {
                    let gate = whole(format!("{p}.block_sparse_moe.gate.weight"), &[e, d])?;
                    let (mut w1, mut w3, mut w2) = (Vec::new(), Vec::new(), Vec::new());
                    for x in 0..e {
                        let q = format!("{p}.block_sparse_moe.experts.{x}");
                        if !local.contains(&x) {
                            // Another rank's expert: present (checked below), not read.
                            for w in ["w1", "w3", "w2"] {
                                skipped.push(format!("{q}.{w}.weight"));
                            }
                            continue;
                        }
                        w1.extend(whole(format!("{q}.w1.weight"), &[f, d])?);
                        w3.extend(whole(format!("{q}.w3.weight"), &[f, d])?);
                        w2.extend(whole(format!("{q}.w2.weight"), &[d, f])?);
                    }
                    (gate, w1, w3, w2)
                }
                HfLayout::Fused => {
                    let gate = whole(format!("{p}.mlp.gate.weight"), &[e, d])?;
                    // `gate_up_proj[x]` is `cat(w1[x], w3[x])`: the first `F·D` elements of each
                    // expert's block are w1's, the next `F·D` w3's.
                    let gate_up = format!("{p}.mlp.experts.gate_up_proj");
                    check(&gate_up, &[e, 2 * f, d])?;
                    let down = format!("{p}.mlp.experts.down_proj");
                    check(&down, &[e, d, f])?;
                    let half = f * d;
                    let part = |name: &str, x: usize, at: usize, len: usize| Segment { name: name.to_string(), elements: x * 2 * half + at..x * 2 * half + at + len };
                    let w1 = local.clone().map(|x| part(&gate_up, x, 0, half)).collect();
                    let w3 = local.clone().map(|x| part(&gate_up, x, half, half)).collect();
                    let w2 = vec![Segment { name: down, elements: local.start * half..local.end * half }];
                    (gate, w1, w3, w2)
                }
            };
            layers.push(DecoderLayer {
                self_attn,
                mlp: DMoe::from_params(
                    p2(gate, [e, d]),
                    p3(w1, [el, f, d]),
                    p3(w3, [el, f, d]),
                    p3(w2, [el, d, f]),
                    c.num_experts_per_tok,
                    kernel,
                ),
                input_layernorm: RmsNorm::from_param(p1(whole(format!("{p}.input_layernorm.weight"), &[d])?, [d]), c.rms_norm_eps),
                post_attention_layernorm: RmsNorm::from_param(
                    p1(whole(format!("{p}.post_attention_layernorm.weight"), &[d])?, [d]),
                    c.rms_norm_eps,
                ),
            });
        }
        let norm = RmsNorm::from_param(p1(whole("model.norm.weight".into(), &[d])?, [d]), c.rms_norm_eps);
        let lm_head = HfLinear::from_param(p2(whole("lm_head.weight".into(), &[v, d])?, [v, d]));

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
        let model = MixtralForCausalLM {
            model: MixtralModel { embed_tokens: MixtralForCausalLM::<B>::embedding_from(embed), layers, norm },
            lm_head,
            router_aux_loss_coef: c.router_aux_loss_coef,
        };
        Ok((model, lazy))
    }
}
