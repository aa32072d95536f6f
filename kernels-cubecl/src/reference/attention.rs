//! Plain-Rust reference of the causal-attention softmax kernels ([`crate::attention`]), in f64.

use crate::attention::SoftmaxBlock;

/// Probabilities (`rows × keys`, zero where the query does not see the key) and per-row
/// log-sum-exps of `softmax(scale · scores)` over the visible keys.
pub fn attention_softmax(block: &SoftmaxBlock, scores: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut probs = vec![0.0f32; block.rows * block.keys];
    let mut lse = vec![0.0f32; block.rows];
    for r in 0..block.rows {
        let row = &scores[r * block.keys..(r + 1) * block.keys];
        let seen: Vec<usize> = (0..block.keys).filter(|&c| block.visible(r, c)).collect();
        let s = |c: usize| f64::from(row[c]) * block.scale;
        let max = seen.iter().map(|&c| s(c)).fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = seen.iter().map(|&c| (s(c) - max).exp()).sum();
        for &c in &seen {
            probs[r * block.keys + c] = ((s(c) - max).exp() / sum) as f32;
        }
        lse[r] = (max + sum.ln()) as f32;
    }
    (probs, lse)
}

/// Probabilities rebuilt from the log-sum-exps and the score gradients `scale · p · (dp − corr)`.
pub fn attention_softmax_backward(
    block: &SoftmaxBlock,
    scores: &[f32],
    dprobs: &[f32],
    lse: &[f32],
    correction: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let n = block.rows * block.keys;
    let (mut probs, mut dscores) = (vec![0.0f32; n], vec![0.0f32; n]);
    for i in 0..n {
        let (r, c) = (i / block.keys, i % block.keys);
        if block.visible(r, c) {
            let scale = block.scale;
            let p = (f64::from(scores[i]) * scale - f64::from(lse[r])).exp();
            probs[i] = p as f32;
            dscores[i] = (scale * p * (f64::from(dprobs[i]) - f64::from(correction[r]))) as f32;
        }
    }
    (probs, dscores)
}
