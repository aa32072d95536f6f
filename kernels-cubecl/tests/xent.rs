//! Fused cross-entropy kernels against the plain-Rust f64 reference, generic over the CubeCL runtime;
//! run here on wgpu (Mesa lavapipe in CI), and on CUDA with `--features cuda`.

use cubecl::prelude::*;
use half::f16;
use kernels_cubecl::CrossEntropyProblem;
use kernels_cubecl::reference::xent as reference;
use kernels_cubecl::xent::{launch_cross_entropy, launch_cross_entropy_backward};

mod common;
use common::{download, max_rel, upload, values};

/// `rows × vocab` logits (scaled so the softmax is neither flat nor one-hot), targets cycling through
/// the first and last word, the ignore index −100 and ordinary words; f16 storage rounds the logits
/// on the host first.
fn run<R: Runtime>(client: &ComputeClient<R>, rows: usize, vocab: usize, half: bool) {
    let len = rows * vocab;
    let round = |v: f32| if half { f16::from_f32(v).to_f32() } else { v };
    let logits: Vec<f32> = values(len, 21).into_iter().map(|v| round(v * 8.0)).collect();
    let targets: Vec<i32> = (0..rows).map(|r| match r % 4 { 0 => 0, 1 => vocab as i32 - 1, 2 => -100, _ => (r * 7 % vocab) as i32 }).collect();
    let dnll: Vec<f32> = values(rows, 22).into_iter().map(|v| v + 1.5).collect();
    let up_f = |v: &[f32]| upload(client, v, half);
    let up32 = |v: &[f32]| upload(client, v, false);
    let read = |h, n: usize| download(client, h, n, half);
    let read32 = |h, n: usize| download(client, h, n, false);
    let problem = CrossEntropyProblem { rows, vocab };
    let (lh, th) = (up_f(&logits), client.create_from_slice(i32::as_bytes(if targets.is_empty() { &[0] } else { &targets })));
    // Outputs pre-filled with NaN so that an element a kernel skipped shows.
    let (nll, lse, dl) = (up32(&vec![f32::NAN; rows]), up32(&vec![f32::NAN; rows]), up_f(&vec![f32::NAN; len]));
    let dh = up32(&dnll);
    if half {
        launch_cross_entropy::<R, f16, i32>(client, &problem, lh.clone(), th.clone(), nll.clone(), lse.clone()).unwrap();
        launch_cross_entropy_backward::<R, f16, i32>(client, &problem, lh, th, lse.clone(), dh, dl.clone()).unwrap();
    } else {
        launch_cross_entropy::<R, f32, i32>(client, &problem, lh.clone(), th.clone(), nll.clone(), lse.clone()).unwrap();
        launch_cross_entropy_backward::<R, f32, i32>(client, &problem, lh, th, lse.clone(), dh, dl.clone()).unwrap();
    }
    let t64: Vec<i64> = targets.iter().map(|&t| i64::from(t)).collect();
    let (want_nll, want_lse) = reference::cross_entropy(&logits, &t64, vocab);
    let want_d = reference::cross_entropy_backward(&logits, &t64, &dnll, vocab);
    let bound = if half { 2e-3 } else { 1e-5 };
    for (name, got, want, bound) in [
        ("nll", read32(nll, rows), want_nll, 1e-5),
        ("lse", read32(lse, rows), want_lse, 1e-5),
        ("dlogits", read(dl, len), want_d, bound),
    ] {
        let err = max_rel(&got, &want);
        assert!(err <= bound, "rows {rows} vocab {vocab} half {half} {name}: max rel error {err:e}");
    }
}

/// One word, short and ragged vocabularies, one longer than a cube, Mixtral's 32000.
fn all_shapes<R: Runtime>(client: &ComputeClient<R>) {
    for (rows, vocab) in [(4, 1), (5, 7), (9, 300), (70, 1000), (4, 32000)] {
        run(client, rows, vocab, false);
        run(client, rows, vocab, true);
    }
}

#[test]
fn cross_entropy_kernels_match_reference_on_wgpu() {
    all_shapes(&cubecl::wgpu::WgpuRuntime::client(&Default::default()));
}

/// The same shapes on CUDA (`--features cuda`; needs an NVIDIA GPU).
#[cfg(feature = "cuda")]
#[test]
fn cross_entropy_kernels_match_reference_on_cuda() {
    all_shapes(&cubecl::cuda::CudaRuntime::client(&Default::default()));
}

#[test]
fn an_empty_vocabulary_is_an_error() {
    let e = CrossEntropyProblem { rows: 3, vocab: 0 }.check().unwrap_err().to_string();
    assert!(e.contains("3 rows over an empty vocabulary"), "{e}");
}
