//! Fused RMSNorm kernels (forward, input gradient, weight gradient) against the plain-Rust f64
//! reference, generic over the CubeCL runtime; run here on wgpu (Mesa lavapipe in CI), and on CUDA
//! with `--features cuda`.

use cubecl::prelude::*;
use half::f16;
use kernels_cubecl::RmsNormProblem;
use kernels_cubecl::reference::rmsnorm as reference;
use kernels_cubecl::rmsnorm::{launch_rms_norm, launch_rms_norm_backward, launch_rms_norm_weight_grad, weight_grad_chunks};

mod common;
use common::{download, max_rel, upload, values};

const EPS: f32 = 1e-5;

/// Storage of the test: f32, or f16 (inputs rounded to f16 on the host; the reference rounds where
/// the kernels store).
#[derive(Clone, Copy, Debug)]
enum Storage {
    F32,
    F16,
}

impl Storage {
    fn round(self, v: f32) -> f32 {
        match self {
            Storage::F32 => v,
            Storage::F16 => f16::from_f32(v).to_f32(),
        }
    }

    /// One rounding of the storage type (and a little for f32 sums in another order).
    fn bound(self) -> f32 {
        match self {
            Storage::F32 => 1e-5,
            Storage::F16 => 2e-3,
        }
    }
}

fn run<R: Runtime>(client: &ComputeClient<R>, rows: usize, dim: usize, storage: Storage) {
    let len = rows * dim;
    let round = |v: Vec<f32>| v.into_iter().map(|x| storage.round(x)).collect::<Vec<_>>();
    // Rows of different scales (the statistic must follow each row), a scale around 1.
    let x: Vec<f32> = round(values(len, 11).into_iter().enumerate().map(|(i, v)| v * (1.0 + (i / dim.max(1)) as f32 % 5.0)).collect());
    let w = round(values(dim, 12).into_iter().map(|v| 1.0 + 0.5 * v).collect());
    let dy = round(values(len, 13));
    let half = matches!(storage, Storage::F16);
    let up = |v: &[f32]| upload(client, v, half);
    let read = |h, n: usize| download(client, h, n, half);
    let read_f32 = |h, n: usize| download(client, h, n, false);
    let problem = RmsNormProblem { rows, dim, eps: EPS };
    let (xh, wh, dyh) = (up(&x), up(&w), up(&dy));
    // Outputs pre-filled with NaN so that an element a kernel skipped shows.
    let (yh, dxh, dwh) = (up(&vec![f32::NAN; len]), up(&vec![f32::NAN; len]), up(&vec![f32::NAN; dim]));
    let rstd = client.create_from_slice(f32::as_bytes(&vec![f32::NAN; rows.max(1)]));
    macro_rules! launch {
        ($f:ty) => {{
            launch_rms_norm::<R, $f>(client, &problem, xh.clone(), wh.clone(), yh.clone(), rstd.clone()).unwrap();
            launch_rms_norm_backward::<R, $f>(client, &problem, xh.clone(), wh.clone(), rstd.clone(), dyh.clone(), dxh.clone()).unwrap();
            launch_rms_norm_weight_grad::<R, $f>(client, &problem, xh.clone(), rstd.clone(), dyh.clone(), dwh.clone()).unwrap();
        }};
    }
    match storage {
        Storage::F32 => launch!(f32),
        Storage::F16 => launch!(f16),
    }
    let (want_y, want_rstd) = reference::rms_norm(&x, &w, dim, f64::from(EPS), |v| storage.round(v));
    let (want_dx, want_dw) = reference::rms_norm_backward(&x, &w, &dy, dim, f64::from(EPS), |v| storage.round(v));
    let mut checks = vec![("dw", read(dwh, dim), want_dw)];
    if rows > 0 {
        checks.push(("y", read(yh, len), want_y));
        checks.push(("rstd", read_f32(rstd, rows), want_rstd));
        checks.push(("dx", read(dxh, len), want_dx));
    }
    for (name, got, want) in checks {
        let err = max_rel(&got, &want);
        assert!(err <= storage.bound(), "rows {rows} dim {dim} {storage:?} {name}: max rel error {err:e}");
    }
}

/// One short row (not one value: its input gradient is zero up to eps, all cancellation), ragged rows, a row longer than a cube, Mixtral's 4096, many rows (several
/// weight-gradient chunks), no rows (a zero weight gradient).
fn all_shapes<R: Runtime>(client: &ComputeClient<R>) {
    for (rows, dim) in [(1, 3), (3, 7), (5, 256), (70, 300), (9, 4096), (1000, 48), (0, 8)] {
        run(client, rows, dim, Storage::F32);
        run(client, rows, dim, Storage::F16);
    }
    assert!(weight_grad_chunks(&RmsNormProblem { rows: 1000, dim: 48, eps: EPS }).1 > 1);
}

#[test]
fn rms_norm_kernels_match_reference_on_wgpu() {
    all_shapes(&cubecl::wgpu::WgpuRuntime::client(&Default::default()));
}

/// The same shapes on CUDA (`--features cuda`; needs an NVIDIA GPU).
#[cfg(feature = "cuda")]
#[test]
fn rms_norm_kernels_match_reference_on_cuda() {
    all_shapes(&cubecl::cuda::CudaRuntime::client(&Default::default()));
}

#[test]
fn bad_problems_are_errors_naming_the_numbers() {
    let e = RmsNormProblem { rows: 3, dim: 0, eps: EPS }.check().unwrap_err().to_string();
    assert!(e.contains("3 rows of 0 values"), "{e}");
    let e = RmsNormProblem { rows: 3, dim: 4, eps: -1.0 }.check().unwrap_err().to_string();
    assert!(e.contains("eps -1"), "{e}");
}
