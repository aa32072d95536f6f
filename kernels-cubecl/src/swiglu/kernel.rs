//! The SwiGLU kernels: elementwise over vectors of `N` elements, math in f32 whatever the storage.

use cubecl::prelude::*;

/// `out = silu(gate) · up` with `silu(g) = g · σ(g)`.
#[cube(launch_unchecked)]
pub fn swiglu_kernel<F: Float, N: Size>(gate: &Array<Vector<F, N>>, up: &Array<Vector<F, N>>, out: &mut Array<Vector<F, N>>) {
    let pos = ABSOLUTE_POS as usize;
    if pos >= out.len() {
        terminate!();
    }
    let g = Vector::<f32, N>::cast_from(gate[pos]);
    let u = Vector::<f32, N>::cast_from(up[pos]);
    let one = Vector::<f32, N>::new(1.0);
    // `0 − g`, not `-g`: cubecl-cuda 0.10 emits unary minus on vector structs, which nvrtc rejects.
    let sig = one / (one + Vector::exp(Vector::<f32, N>::new(0.0) - g));
    out[pos] = Vector::<F, N>::cast_from(g * sig * u);
}

/// Gradients of [`swiglu_kernel`] for the output gradient `dh`:
/// `d_up = dh · silu(g)`, `d_gate = dh · up · σ(g) · (1 + g · (1 − σ(g)))`.
#[cube(launch_unchecked)]
pub fn swiglu_backward_kernel<F: Float, N: Size>(
    gate: &Array<Vector<F, N>>,
    up: &Array<Vector<F, N>>,
    dh: &Array<Vector<F, N>>,
    d_gate: &mut Array<Vector<F, N>>,
    d_up: &mut Array<Vector<F, N>>,
) {
    let pos = ABSOLUTE_POS as usize;
    if pos >= d_gate.len() {
        terminate!();
    }
    let g = Vector::<f32, N>::cast_from(gate[pos]);
    let u = Vector::<f32, N>::cast_from(up[pos]);
    let d = Vector::<f32, N>::cast_from(dh[pos]);
    let one = Vector::<f32, N>::new(1.0);
    // `0 − g`, not `-g`: cubecl-cuda 0.10 emits unary minus on vector structs, which nvrtc rejects.
    let sig = one / (one + Vector::exp(Vector::<f32, N>::new(0.0) - g));
    d_up[pos] = Vector::<F, N>::cast_from(d * g * sig);
    d_gate[pos] = Vector::<F, N>::cast_from(d * u * sig * (one + g * (one - sig)));
}
