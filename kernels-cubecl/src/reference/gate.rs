//! Plain-Rust reference of the router gate's products (f64 sums).

/// `out[t, e] = Σ_c x[t, c] · gate[e, c]` (`x`: `tokens × dim`, `gate`: `experts × dim`).
pub fn gate_logits(x: &[f32], gate: &[f32], dim: usize) -> Vec<f32> {
    let (tokens, experts) = (x.len() / dim.max(1), gate.len() / dim.max(1));
    let mut out = vec![0f32; tokens * experts];
    for t in 0..tokens {
        for e in 0..experts {
            out[t * experts + e] = (0..dim).map(|c| x[t * dim + c] as f64 * gate[e * dim + c] as f64).sum::<f64>() as f32;
        }
    }
    out
}

/// `dgate[e, c] = Σ_t dlogits[t, e] · x[t, c]` (`dlogits`: `tokens × experts`, `x`: `tokens × dim`).
pub fn gate_weight_grad(dlogits: &[f32], x: &[f32], experts: usize, dim: usize) -> Vec<f32> {
    let tokens = dlogits.len() / experts.max(1);
    let mut dgate = vec![0f32; experts * dim];
    for e in 0..experts {
        for c in 0..dim {
            dgate[e * dim + c] = (0..tokens).map(|t| dlogits[t * experts + e] as f64 * x[t * dim + c] as f64).sum::<f64>() as f32;
        }
    }
    dgate
}
