use burn::module::Module;
use burn::tensor::{Bool, DType, Tensor, TensorData, activation::softmax, backend::Backend};
use burn_moe_backend::{CausalAttention, MoeBackend, causal_attention};
use serde::{Deserialize, Serialize};

use super::linear::HfLinear;
use super::rope::RotaryEmbedding;

/// How [`MixtralAttention`] computes `softmax(q·kᵀ/√hd + mask)·v` (both give the same numbers up to
/// rounding; they differ in what a training step keeps for its backward pass).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttentionKernel {
    /// HF's eager attention from tensor ops: the `[B, H, S, S]` scores, mask and probabilities are
    /// materialised, and kept by autodiff until the backward pass.
    #[default]
    Eager,
    /// [`burn_moe_backend::causal_attention`]: blocks of queries at a time, keys never repeated for
    /// grouped-query heads, a backward pass that recomputes the scores from a per-query log-sum-exp
    /// — `O(S)` memory per head kept for backward instead of `O(S²)`.
    Chunked,
}

impl AttentionKernel {
    /// Every kernel, for tests and command-line help.
    pub const ALL: [AttentionKernel; 2] = [AttentionKernel::Eager, AttentionKernel::Chunked];

    /// The name used on command lines and in configs.
    pub fn name(self) -> &'static str {
        match self {
            AttentionKernel::Eager => "eager",
            AttentionKernel::Chunked => "chunked",
        }
    }
}

impl std::fmt::Display for AttentionKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for AttentionKernel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|k| k.name() == s).ok_or_else(|| {
            let names: Vec<_> = Self::ALL.iter().map(|k| k.name()).collect();
            format!("unknown attention kernel '{s}' (expected one of: {})", names.join(", "))
        })
    }
}

/// Causal self-attention with RoPE and grouped-query heads (HF `MixtralAttention`), computed by
/// [`AttentionKernel`].
///
/// # Shapes
/// - `q_proj`: `[H·hd, D]`, `k_proj`/`v_proj`: `[KV·hd, D]`, `o_proj`: `[D, H·hd]`
/// - input and output `[B, S, D]`
#[derive(Module, Debug)]
pub struct MixtralAttention<B: Backend> {
    /// Query projection.
    pub q_proj: HfLinear<B>,
    /// Key projection.
    pub k_proj: HfLinear<B>,
    /// Value projection.
    pub v_proj: HfLinear<B>,
    /// Output projection.
    pub o_proj: HfLinear<B>,
    /// Query heads `H`.
    pub num_heads: usize,
    /// Key/value heads `KV` (divides `H`).
    pub num_kv_heads: usize,
    /// Head width `hd`.
    pub head_dim: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// Sliding window, if any.
    #[module(skip)]
    pub sliding_window: Option<usize>,
    /// How the attention itself is computed.
    #[module(skip)]
    pub kernel: AttentionKernel,
    /// Queries per block of [`AttentionKernel::Chunked`]; `None` sizes blocks automatically.
    #[module(skip)]
    pub query_block: Option<usize>,
}

impl<B: MoeBackend> MixtralAttention<B> {
    /// Attention over the whole sequence (training / prefill; no KV cache).
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, s, _] = x.dims();
        let (h, kv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let device = x.device();
        let heads = |t: Tensor<B, 3>, n: usize| t.reshape([b, s, n, hd]).swap_dims(1, 2);
        let q = heads(self.q_proj.forward(x.clone()), h);
        let k = heads(self.k_proj.forward(x.clone()), kv);
        let v = heads(self.v_proj.forward(x), kv);

        let rope = RotaryEmbedding { head_dim: hd, theta: self.rope_theta };
        let (cos, sin) = rope.tables::<B>(s, &device, q.dtype());
        let q = rope.apply(q, cos.clone(), sin.clone());
        let k = rope.apply(k, cos, sin);

        if self.kernel == AttentionKernel::Chunked {
            let spec = CausalAttention::new(hd).with_window(self.sliding_window).with_query_block(self.query_block);
            let out = causal_attention(q, k, v, &spec).swap_dims(1, 2).reshape([b, s, h * hd]);
            return self.o_proj.forward(out);
        }

        // Grouped-query attention: query head i reads key/value head i / (H / KV).
        let repeat = |t: Tensor<B, 4>| {
            if h == kv {
                t
            } else {
                t.unsqueeze_dim::<5>(2).repeat_dim(2, h / kv).reshape([b, h, s, hd])
            }
        };
        let k = repeat(k);
        let v = repeat(v);

        let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar((hd as f64).powf(-0.5));
        let mask = attention_mask::<B>(s, self.sliding_window, &device).unsqueeze::<4>().expand([b, h, s, s]);
        // Softmax in f32 whatever the activations' dtype (HF: `softmax(..., dtype=torch.float32)`),
        // then back to it for the product with the values.
        let dtype = scores.dtype();
        let probs = softmax(scores.mask_fill(mask, f32::NEG_INFINITY).cast(DType::F32), 3).cast(dtype);
        let out = probs.matmul(v).swap_dims(1, 2).reshape([b, s, h * hd]);
        self.o_proj.forward(out)
    }
}

/// `true` where query `q` must not see key `k`: the future (`k > q`) and, with a window `w`, keys at
/// or before `q - w` (HF: a key is visible iff `q - w < k ≤ q`).
///
/// # Shapes
/// - returns `[S, S]` (query, key)
pub fn attention_mask<B: Backend>(seq: usize, window: Option<usize>, device: &B::Device) -> Tensor<B, 2, Bool> {
    let mut mask = Vec::with_capacity(seq * seq);
    for q in 0..seq {
        for k in 0..seq {
            let future = k > q;
            let too_old = window.is_some_and(|w| k + w <= q);
            mask.push(future || too_old);
        }
    }
    Tensor::from_data(TensorData::new(mask, [seq, seq]), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_kernel_names_round_trip() {
        for k in AttentionKernel::ALL {
            assert_eq!(k.name().parse::<AttentionKernel>(), Ok(k));
            assert_eq!(serde_json::to_string(&k).unwrap(), format!("\"{}\"", k.name()));
        }
        let err = "flash".parse::<AttentionKernel>().unwrap_err();
        assert!(err.contains("'flash'") && err.contains("eager, chunked"), "{err}");
    }
}
