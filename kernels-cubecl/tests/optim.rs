//! The gradient norm's sum-of-squares kernel against an f64 host sum, generic over the CubeCL
//! runtime; run here on wgpu (Mesa lavapipe in CI), and on CUDA with `--features cuda`. Lengths from
//! one element to more than one sweep of the largest grid (each unit then adds several elements),
//! f32 and f16 storage, and NaN-filled partial buffers so a cube that wrote nothing shows.

use cubecl::prelude::*;
use half::f16;
use kernels_cubecl::optim::{launch_sum_squares, sum_squares_cubes};

#[allow(dead_code)]
mod common;
use common::values;

/// Lengths: one element, less than a cube, a ragged few cubes, and beyond 1024 cubes × 256 units × 8.
const LENGTHS: [usize; 5] = [1, 200, 70_001, 2_100_000, 3_000_017];

fn check<R: Runtime, F: Float + CubeElement>(client: &ComputeClient<R>, len: usize, store: impl Fn(f32) -> F, load: impl Fn(F) -> f32) {
    let x: Vec<F> = values(len, len as u64).into_iter().map(|v| store(v * 3.0)).collect();
    let want: f64 = x.iter().map(|&v| f64::from(load(v)).powi(2)).sum();
    let cubes = sum_squares_cubes(len);
    let input = client.create_from_slice(F::as_bytes(&x));
    let partials = client.create_from_slice(f32::as_bytes(&vec![f32::NAN; cubes]));
    launch_sum_squares::<R, F>(client, len, input, partials.clone()).unwrap();
    let got: f64 = f32::from_bytes(&client.read_one(partials).expect("read back"))[..cubes].iter().map(|&p| f64::from(p)).sum();
    let rel = (got - want).abs() / want;
    assert!(rel <= 1e-5, "len {len} ({cubes} cubes): sum of squares {got} vs {want} (rel {rel:e})");
}

fn all_lengths<R: Runtime>(client: &ComputeClient<R>) {
    for len in LENGTHS {
        check::<R, f32>(client, len, |v| v, |v| v);
        check::<R, f16>(client, len, f16::from_f32, f16::to_f32);
    }
    assert_eq!(sum_squares_cubes(1), 1);
    assert_eq!(sum_squares_cubes(3_000_017), 1024);
}

#[test]
fn sum_of_squares_matches_the_host_sum_on_wgpu() {
    all_lengths(&cubecl::wgpu::WgpuRuntime::client(&Default::default()));
}

/// The same lengths on CUDA (`--features cuda`; needs an NVIDIA GPU).
#[cfg(feature = "cuda")]
#[test]
fn sum_of_squares_matches_the_host_sum_on_cuda() {
    all_lengths(&cubecl::cuda::CudaRuntime::client(&Default::default()));
}
