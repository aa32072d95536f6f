//! Router-gate kernels (logits `x · gateᵀ` and the gate's gradient `dlogitsᵀ · x`) against the
//! plain-Rust f64 reference, generic over the CubeCL runtime; run here on wgpu (Mesa lavapipe in CI),
//! and on CUDA with `--features cuda`.

use cubecl::prelude::*;
use half::f16;
use kernels_cubecl::GateProblem;
use kernels_cubecl::gate::{GATE_MAX_EXPERTS, launch_gate_logits, launch_gate_weight_grad};
use kernels_cubecl::reference::gate as reference;

mod common;
use common::{download, max_rel, upload, values};

fn run<R: Runtime>(client: &ComputeClient<R>, tokens: usize, dim: usize, experts: usize, half: bool) {
    let round = |v: Vec<f32>| if half { v.into_iter().map(|x| f16::from_f32(x).to_f32()).collect() } else { v };
    let x: Vec<f32> = round(values(tokens * dim, 21));
    let gate: Vec<f32> = round(values(experts * dim, 22));
    let dlogits: Vec<f32> = round(values(tokens * experts, 23));
    let up = |v: &[f32]| upload(client, v, half);
    let problem = GateProblem { tokens, dim, experts };
    // Outputs pre-filled with NaN so that an element a kernel skipped shows.
    let (logits_h, dgate_h) = (up(&vec![f32::NAN; tokens * experts]), up(&vec![f32::NAN; experts * dim]));
    macro_rules! launch {
        ($f:ty) => {{
            launch_gate_logits::<R, $f>(client, &problem, up(&x), up(&gate), logits_h.clone()).unwrap();
            launch_gate_weight_grad::<R, $f>(client, &problem, up(&dlogits), up(&x), dgate_h.clone()).unwrap();
        }};
    }
    if half { launch!(f16) } else { launch!(f32) }
    // One rounding of the storage type (and f32 sums in another order than the f64 reference).
    let bound = if half { 2e-3 } else { 1e-5 };
    let label = format!("tokens {tokens} dim {dim} experts {experts} f16 {half}");
    if tokens > 0 {
        let got = download(client, logits_h, tokens * experts, half);
        let err = max_rel(&got, &reference::gate_logits(&x, &gate, dim));
        assert!(err <= bound, "{label} logits: max rel error {err:e}");
    }
    let got = download(client, dgate_h, experts * dim, half);
    let want = reference::gate_weight_grad(&dlogits, &x, experts, dim);
    if tokens == 0 {
        assert!(got.iter().all(|v| *v == 0.0), "{label}: no tokens must give a zero gate gradient");
    } else {
        let err = max_rel(&got, &want);
        assert!(err <= bound, "{label} gate gradient: max rel error {err:e}");
    }
}

/// One token and one expert, odd widths (no vectors), Mixtral's 8 experts on a wide row, the most
/// experts the kernels take, many tokens (several gradient chunks), no tokens.
fn all_shapes<R: Runtime>(client: &ComputeClient<R>) {
    for (tokens, dim, experts) in [(1, 8, 1), (37, 100, 8), (64, 33, 3), (5, 4096, 8), (300, 256, GATE_MAX_EXPERTS), (2000, 64, 8), (0, 16, 4)] {
        run(client, tokens, dim, experts, false);
        run(client, tokens, dim, experts, true);
    }
}

#[test]
fn gate_kernels_match_reference_on_wgpu() {
    all_shapes(&cubecl::wgpu::WgpuRuntime::client(&Default::default()));
}

/// The same shapes on CUDA (`--features cuda`; needs an NVIDIA GPU).
#[cfg(feature = "cuda")]
#[test]
fn gate_kernels_match_reference_on_cuda() {
    all_shapes(&cubecl::cuda::CudaRuntime::client(&Default::default()));
}

#[test]
fn gates_the_kernels_do_not_take_are_errors_naming_the_numbers() {
    let e = GateProblem { tokens: 4, dim: 8, experts: 0 }.check().unwrap_err().to_string();
    assert!(e.contains("0 experts"), "{e}");
    let e = GateProblem { tokens: 4, dim: 8, experts: GATE_MAX_EXPERTS + 1 }.check().unwrap_err().to_string();
    assert!(e.contains(&format!("{} experts", GATE_MAX_EXPERTS + 1)), "{e}");
    let e = GateProblem { tokens: 4, dim: 0, experts: 2 }.check().unwrap_err().to_string();
    assert!(e.contains("4 tokens"), "{e}");
}
