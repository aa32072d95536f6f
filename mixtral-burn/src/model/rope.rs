use std::sync::Mutex;

use burn::tensor::{DType, Tensor, TensorData, backend::Backend};

/// Rotary position embedding with HF's "rotate half" convention: the first and second halves of
/// each head are the two coordinates of every rotated pair.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    /// Width of a head (even).
    pub head_dim: usize,
    /// RoPE base.
    pub theta: f64,
}

impl RotaryEmbedding {
    /// `cos` and `sin` tables for positions `0..seq`, each `[seq, head_dim]` (the frequency table is
    /// repeated for both halves, as HF does).
    ///
    /// Computed in f64 on the host and rounded once to `dtype` (the activations' dtype, as HF's
    /// `cos.to(x.dtype)`): HF computes them in f32, and the difference is within one rounding of
    /// each entry.
    ///
    /// The host values are computed once per (head width, base, length, dtype) and kept (a few
    /// entries): every attention layer asks for the same tables on every forward pass, and computing
    /// them — a power, a cosine and a sine per entry, half a million entries at 4096 positions — took
    /// ~30 ms of host time per layer, longer than the layer's whole forward pass on an H200.
    pub fn tables<B: Backend>(&self, seq: usize, device: &B::Device, dtype: DType) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let (cos, sin) = self.host_tables(seq, dtype);
        (Tensor::from_data(cos, (device, dtype)), Tensor::from_data(sin, (device, dtype)))
    }

    /// The tables of [`tables`](Self::tables) on the host, in `dtype`, from the cache.
    fn host_tables(&self, seq: usize, dtype: DType) -> (TensorData, TensorData) {
        type Key = (usize, u64, usize, DType);
        static CACHE: Mutex<Vec<(Key, TensorData, TensorData)>> = Mutex::new(Vec::new());
        // Few distinct keys occur in a run (one model, a training and an evaluation length).
        const ENTRIES: usize = 8;
        let key = (self.head_dim, self.theta.to_bits(), seq, dtype);
        let mut cache = CACHE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, cos, sin)) = cache.iter().find(|e| e.0 == key) {
            return (cos.clone(), sin.clone());
        }
        let (cos, sin) = self.compute(seq);
        let shape = [seq, self.head_dim];
        let (cos, sin) = (TensorData::new(cos, shape).convert_dtype(dtype), TensorData::new(sin, shape).convert_dtype(dtype));
        if cache.len() == ENTRIES {
            cache.remove(0);
        }
        cache.push((key, cos.clone(), sin.clone()));
        (cos, sin)
    }

    /// `cos` and `sin` for positions `0..seq` (row-major `[seq, head_dim]`), in f64 rounded to f32.
    fn compute(&self, seq: usize) -> (Vec<f32>, Vec<f32>) {
        let half = self.head_dim / 2;
        let inv_freq: Vec<f64> = (0..half).map(|i| 1.0 / self.theta.powf((2 * i) as f64 / self.head_dim as f64)).collect();
        let mut cos = Vec::with_capacity(seq * self.head_dim);
        let mut sin = Vec::with_capacity(seq * self.head_dim);
        for pos in 0..seq {
            for j in 0..self.head_dim {
                let angle = pos as f64 * inv_freq[j % half];
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        (cos, sin)
    }

    /// Rotates `x` by the given tables.
    ///
    /// # Shapes
    /// - `x`: `[B, H, S, hd]`; `cos`, `sin`: `[S, hd]`
    pub fn apply<B: Backend>(&self, x: Tensor<B, 4>, cos: Tensor<B, 2>, sin: Tensor<B, 2>) -> Tensor<B, 4> {
        let [b, h, s, hd] = x.dims();
        let half = hd / 2;
        let x1 = x.clone().slice([0..b, 0..h, 0..s, 0..half]);
        let x2 = x.clone().slice([0..b, 0..h, 0..s, half..hd]);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * cos.unsqueeze::<4>() + rotated * sin.unsqueeze::<4>()
    }
}
