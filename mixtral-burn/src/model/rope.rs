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
    pub fn tables<B: Backend>(&self, seq: usize, device: &B::Device, dtype: DType) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let half = self.head_dim / 2;
        let mut cos = Vec::with_capacity(seq * self.head_dim);
        let mut sin = Vec::with_capacity(seq * self.head_dim);
        for pos in 0..seq {
            for j in 0..self.head_dim {
                let i = j % half;
                let inv_freq = 1.0 / self.theta.powf((2 * i) as f64 / self.head_dim as f64);
                let angle = pos as f64 * inv_freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let shape = [seq, self.head_dim];
        (
            Tensor::from_data(TensorData::new(cos, shape), (device, dtype)),
            Tensor::from_data(TensorData::new(sin, shape), (device, dtype)),
        )
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
