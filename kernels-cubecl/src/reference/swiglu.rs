//! Plain-Rust SwiGLU and its gradients (f64 math), the ground truth of [`crate::swiglu`].

fn sigmoid(g: f64) -> f64 {
    1.0 / (1.0 + (-g).exp())
}

/// `silu(gate[i]) · up[i]`.
pub fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter().zip(up).map(|(&g, &u)| (g as f64 * sigmoid(g as f64) * u as f64) as f32).collect()
}

/// `(d_gate, d_up)` for the output gradient `dh`.
pub fn swiglu_backward(gate: &[f32], up: &[f32], dh: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut d_gate = Vec::with_capacity(gate.len());
    let mut d_up = Vec::with_capacity(gate.len());
    for ((&g, &u), &d) in gate.iter().zip(up).zip(dh) {
        let (g, u, d) = (g as f64, u as f64, d as f64);
        let s = sigmoid(g);
        d_up.push((d * g * s) as f32);
        d_gate.push((d * u * s * (1.0 + g * (1.0 - s))) as f32);
    }
    (d_gate, d_up)
}
