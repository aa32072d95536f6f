//! The optimizer kernels, generic over the CubeCL runtime; run here on wgpu (Mesa lavapipe in CI),
//! and on CUDA with `--features cuda`. The gradient norm's sum of squares against an f64 host sum:
//! lengths from one element to more than one sweep of the largest grid (each unit then adds several
//! elements), f32 and f16 storage, and NaN-filled partial buffers so a cube that wrote nothing shows.
//! The fused AdamW update against burn-optim's formula evaluated in f64 on the host: f32 weights with
//! an f32 or a narrow (f16) gradient, with and without the compute copy, at lengths that take every
//! vector width.

use cubecl::prelude::*;
use half::f16;
use kernels_cubecl::optim::{AdamWBuffers, AdamWHyper, adamw_vector_size, launch_adamw, launch_sum_squares, sum_squares_cubes};

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

/// Lengths of the AdamW checks: vectors of 1, 2 (6 = 2·3) and 4 elements, and a ragged large one.
const ADAMW_LENGTHS: [usize; 5] = [1, 6, 4096, 70_001, 262_148];

fn hyper() -> AdamWHyper {
    // A late step (bias corrections away from 1), weight decay, a clipping factor.
    AdamWHyper { beta_1: 0.9, beta_2: 0.95, epsilon: 1e-8, lr: 3e-4, keep: 1.0 - 3e-4 * 0.1, time: 7, grad_scale: 0.5 }
}

/// One update of `len` f32 weights with a gradient stored as `G`, and the copy in f16 when
/// `with_copy`; every output against the f64 evaluation of the formula on the stored inputs.
fn check_adamw<R: Runtime, G: Float + CubeElement>(client: &ComputeClient<R>, len: usize, with_copy: bool, store: impl Fn(f32) -> G, load: impl Fn(G) -> f32) {
    let h = hyper();
    let p: Vec<f32> = values(len, 1 + len as u64);
    let g: Vec<G> = values(len, 2 + len as u64).into_iter().map(|v| store(v * 0.01)).collect();
    let m: Vec<f32> = values(len, 3 + len as u64).into_iter().map(|v| v * 1e-3).collect();
    let v: Vec<f32> = values(len, 4 + len as u64).into_iter().map(|v| v * v * 1e-5).collect();
    let f32s = |x: &[f32]| client.create_from_slice(f32::as_bytes(x));
    let nan = vec![f32::NAN; len];
    let buffers = AdamWBuffers {
        param: f32s(&p),
        grad: client.create_from_slice(G::as_bytes(&g)),
        m: f32s(&m),
        v: f32s(&v),
        param_out: f32s(&nan),
        m_out: f32s(&nan),
        v_out: f32s(&nan),
        copy_out: with_copy.then(|| client.create_from_slice(f16::as_bytes(&vec![f16::NAN; len]))),
    };
    launch_adamw::<R, f32, G, f16>(client, len, &h, buffers.clone()).unwrap();
    let read = |hd| f32::from_bytes(&client.read_one(hd).expect("read back")).to_vec();
    let (p1, m1, v1) = (read(buffers.param_out), read(buffers.m_out), read(buffers.v_out));
    let [b1, f1, b2, f2, c1, c2, eps, lr, keep, scale] = h.packed().map(f64::from);
    // Each output is a sum of two terms; f32 rounding of the terms and the sum bounds the error
    // relative to their magnitudes (not to the result, which can cancel).
    let close = |got: f32, want: f64, scale: f64| (f64::from(got) - want).abs() <= 4e-7 * scale;
    for i in 0..len {
        let gi = f64::from(load(g[i])) * scale;
        let (ma, mb) = (f64::from(m[i]) * b1, gi * f1);
        let (va, vb) = (f64::from(v[i]) * b2, gi * gi * f2);
        let (mi, vi) = (ma + mb, va + vb);
        let (pa, pb) = (f64::from(p[i]) * keep, lr * (mi / c1) / ((vi / c2).sqrt() + eps));
        let pi = pa - pb;
        assert!(close(m1[i], mi, ma.abs() + mb.abs()), "len {len} [{i}]: m {} vs {mi}", m1[i]);
        assert!(close(v1[i], vi, va + vb), "len {len} [{i}]: v {} vs {vi}", v1[i]);
        assert!(close(p1[i], pi, pa.abs() + pb.abs()), "len {len} [{i}]: p {} vs {pi}", p1[i]);
    }
    if let Some(copy) = buffers.copy_out {
        let copy = f16::from_bytes(&client.read_one(copy).expect("read back")).to_vec();
        for i in 0..len {
            // Rounded from the stored weight: exactly the cast of the new parameter.
            assert_eq!(copy[i].to_bits(), f16::from_f32(p1[i]).to_bits(), "len {len} [{i}]: copy {} of {}", copy[i], p1[i]);
        }
    }
}

fn adamw_all<R: Runtime>(client: &ComputeClient<R>) {
    for len in ADAMW_LENGTHS {
        check_adamw::<R, f32>(client, len, false, |v| v, |v| v);
        check_adamw::<R, f16>(client, len, true, f16::from_f32, f16::to_f32);
        check_adamw::<R, f16>(client, len, false, f16::from_f32, f16::to_f32);
    }
    // Vector width: the widest of 4, 2, 1 dividing the length (fresh buffers start aligned).
    let h = client.create_from_slice(f32::as_bytes(&[0.0; 8]));
    let widths: Vec<usize> = [1, 6, 4096, 70_001].into_iter().map(|len| adamw_vector_size(len, &[(&h, 4), (&h, 2)])).collect();
    assert_eq!(widths, [1, 2, 4, 1]);
}

#[test]
fn adamw_matches_the_formula_on_wgpu() {
    adamw_all(&cubecl::wgpu::WgpuRuntime::client(&Default::default()));
}

/// The same updates on CUDA (`--features cuda`; needs an NVIDIA GPU).
#[cfg(feature = "cuda")]
#[test]
fn adamw_matches_the_formula_on_cuda() {
    adamw_all(&cubecl::cuda::CudaRuntime::client(&Default::default()));
}
