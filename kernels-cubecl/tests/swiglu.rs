//! Fused SwiGLU kernels against the plain-Rust reference, generic over the CubeCL runtime; run here on
//! wgpu (Mesa lavapipe in CI), and on CUDA with `--features cuda`.

use cubecl::prelude::*;
use half::f16;
use kernels_cubecl::reference::swiglu as reference;
use kernels_cubecl::swiglu::{launch_swiglu, launch_swiglu_backward, swiglu_vector_size};

mod common;
use common::{max_rel, values};

fn scaled(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    values(n, seed).into_iter().map(|v| v * scale).collect()
}

/// f32 storage: forward and both gradients within 1e-5 of the f64 reference; outputs pre-filled
/// with NaN so a skipped element shows.
fn check_f32<R: Runtime>(client: &ComputeClient<R>, len: usize) {
    let (g, u, d) = (scaled(len, 1, 6.0), scaled(len, 2, 2.0), scaled(len, 3, 1.0));
    let up = |v: &[f32]| client.create_from_slice(f32::as_bytes(if v.is_empty() { &[0.0] } else { v }));
    let nan = vec![f32::NAN; len.max(1)];
    let read = |h| f32::from_bytes(&client.read_one(h).expect("read back"))[..len].to_vec();
    let (gh, uh, dh) = (up(&g), up(&u), up(&d));
    let out = up(&nan);
    launch_swiglu::<R, f32>(client, len, gh.clone(), uh.clone(), out.clone()).unwrap();
    let (dg, du) = (up(&nan), up(&nan));
    launch_swiglu_backward::<R, f32>(client, len, gh, uh, dh, dg.clone(), du.clone()).unwrap();
    let (want_dg, want_du) = reference::swiglu_backward(&g, &u, &d);
    for (name, got, want) in [("h", read(out), reference::swiglu(&g, &u)), ("d_gate", read(dg), want_dg), ("d_up", read(du), want_du)] {
        let err = max_rel(&got, &want);
        assert!(err <= 1e-5, "len {len} f32 {name}: max rel error {err:e}");
    }
}

/// f16 storage (math in f32): within 2e-3 of the reference on the f16-rounded inputs.
fn check_f16<R: Runtime>(client: &ComputeClient<R>, len: usize) {
    let round = |v: Vec<f32>| v.into_iter().map(|x| f16::from_f32(x).to_f32()).collect::<Vec<_>>();
    let (g, u, d) = (round(scaled(len, 4, 6.0)), round(scaled(len, 5, 2.0)), round(scaled(len, 6, 1.0)));
    let up = |v: &[f32]| {
        let h: Vec<f16> = if v.is_empty() { vec![f16::ZERO] } else { v.iter().map(|x| f16::from_f32(*x)).collect() };
        client.create_from_slice(f16::as_bytes(&h))
    };
    let read = |h| f16::from_bytes(&client.read_one(h).expect("read back"))[..len].iter().map(|v| v.to_f32()).collect::<Vec<_>>();
    let nan = vec![f32::NAN; len.max(1)];
    let (gh, uh, dh) = (up(&g), up(&u), up(&d));
    let out = up(&nan);
    launch_swiglu::<R, f16>(client, len, gh.clone(), uh.clone(), out.clone()).unwrap();
    let (dg, du) = (up(&nan), up(&nan));
    launch_swiglu_backward::<R, f16>(client, len, gh, uh, dh, dg.clone(), du.clone()).unwrap();
    let (want_dg, want_du) = reference::swiglu_backward(&g, &u, &d);
    for (name, got, want) in [("h", read(out), reference::swiglu(&g, &u)), ("d_gate", read(dg), want_dg), ("d_up", read(du), want_du)] {
        let err = max_rel(&got, &want);
        assert!(err <= 2e-3, "len {len} f16 {name}: max rel error {err:e}");
    }
}

/// 1 element, odd lengths (scalar path), multiples of 2/4/8 (vector paths), one larger block.
fn all_lengths<R: Runtime>(client: &ComputeClient<R>) {
    for len in [1, 7, 30, 64, 1000, 4104, 70_000] {
        check_f32(client, len);
        check_f16(client, len);
    }
    // Nothing to do is not an error.
    check_f32(client, 0);
    assert!(swiglu_vector_size::<R, f16>(client, 4104) > 1);
}

#[test]
fn swiglu_kernels_match_reference_on_wgpu() {
    all_lengths(&cubecl::wgpu::WgpuRuntime::client(&Default::default()));
}

/// The same lengths on CUDA (`--features cuda`; needs an NVIDIA GPU).
#[cfg(feature = "cuda")]
#[test]
fn swiglu_kernels_match_reference_on_cuda() {
    all_lengths(&cubecl::cuda::CudaRuntime::client(&Default::default()));
}
