//! The fused AdamW kernel: one thread per element, math in f32 whatever the storage.

use cubecl::prelude::*;

/// One AdamW step of every element, burn-optim's formula in its order of operations:
/// `m' = m·β₁ + g·(1−β₁)`, `v' = v·β₂ + g²·(1−β₂)`,
/// `p' = p·keep − lr · (m'/c₁) / (√(v'/c₂) + ε)` with `keep = 1 − lr·λ`, `cᵢ = 1 − βᵢᵗ`.
/// `hp` holds `[β₁, 1−β₁, β₂, 1−β₂, c₁, c₂, ε, lr, keep]` (see `AdamWHyper`).
#[cube(launch_unchecked)]
pub fn adamw_kernel<F: Float>(
    param: &Array<F>,
    grad: &Array<F>,
    m: &Array<F>,
    v: &Array<F>,
    hp: &Array<f32>,
    param_out: &mut Array<F>,
    m_out: &mut Array<F>,
    v_out: &mut Array<F>,
) {
    let pos = ABSOLUTE_POS as usize;
    if pos >= param_out.len() {
        terminate!();
    }
    let g = f32::cast_from(grad[pos]);
    let m1 = f32::cast_from(m[pos]) * hp[0] + g * hp[1];
    let v1 = f32::cast_from(v[pos]) * hp[2] + g * g * hp[3];
    let delta = (m1 / hp[4]) / (f32::sqrt(v1 / hp[5]) + hp[6]);
    let p = f32::cast_from(param[pos]) * hp[8] - delta * hp[7];
    param_out[pos] = F::cast_from(p);
    m_out[pos] = F::cast_from(m1);
    v_out[pos] = F::cast_from(v1);
}
