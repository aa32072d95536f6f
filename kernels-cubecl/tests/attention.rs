//! The causal-attention softmax kernels against the plain-Rust reference, generic over the CubeCL
//! runtime; run here on wgpu (Mesa lavapipe in CI), and on CUDA with `--features cuda`. Blocks with
//! several heads, rows longer than a cube (several sweeps per unit), a sliding window, one key, and
//! more rows than one grid dimension holds.

use cubecl::prelude::*;
use half::f16;
use kernels_cubecl::SoftmaxBlock;
use kernels_cubecl::attention::{launch_attention_softmax, launch_attention_softmax_backward};
use kernels_cubecl::reference::attention as reference;

mod common;
use common::{max_rel, values};

fn blocks() -> Vec<SoftmaxBlock> {
    let b = |rows, keys, queries, first_query, first_key, window| SoftmaxBlock {
        rows,
        keys,
        queries,
        first_query,
        first_key,
        scale: 0.7,
        window,
    };
    vec![
        b(6, 5, 3, 2, 0, None),         // two heads of three queries, the causal prefix
        b(8, 604, 4, 600, 0, None),     // rows longer than a cube: several sweeps per unit
        b(12, 103, 4, 600, 501, Some(100)), // a sliding window cut at the block's first query
        b(1, 1, 1, 0, 0, None),         // one query, one key
        b(66_000, 1, 1, 0, 0, Some(1)), // more rows than one grid dimension holds
    ]
}

/// Storage type `F` (f32 or f16) for the kernels; the reference sees the same rounded inputs.
trait Storage: Float + CubeElement {
    fn store(v: f32) -> Self;
    fn load(self) -> f32;
    /// Error bound of the outputs relative to their largest magnitude.
    const TOL: f32;
}

impl Storage for f32 {
    fn store(v: f32) -> Self {
        v
    }
    fn load(self) -> f32 {
        self
    }
    const TOL: f32 = 1e-5;
}

impl Storage for f16 {
    fn store(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn load(self) -> f32 {
        self.to_f32()
    }
    const TOL: f32 = 2e-3;
}

fn check<R: Runtime, F: Storage>(client: &ComputeClient<R>, block: &SoftmaxBlock, seed: u64) {
    let n = block.rows * block.keys;
    let round = |v: Vec<f32>| v.into_iter().map(|x| F::store(x * 4.0).load()).collect::<Vec<f32>>();
    let (scores, dprobs) = (round(values(n, seed)), round(values(n, seed + 1)));
    let up_f = |v: &[f32]| client.create_from_slice(F::as_bytes(&v.iter().map(|x| F::store(*x)).collect::<Vec<F>>()));
    let up_32 = |v: &[f32]| client.create_from_slice(f32::as_bytes(v));
    let read_f = |h| F::from_bytes(&client.read_one(h).expect("read back"))[..n].iter().map(|x| x.load()).collect::<Vec<f32>>();
    let read_32 = |h, len: usize| f32::from_bytes(&client.read_one(h).expect("read back"))[..len].to_vec();
    let nan = vec![f32::NAN; n];

    let (sh, ph, lh) = (up_f(&scores), up_f(&nan), up_32(&vec![f32::NAN; block.rows]));
    launch_attention_softmax::<R, F>(client, block, sh.clone(), ph.clone(), lh.clone()).unwrap();
    let (want_p, want_lse) = reference::attention_softmax(block, &scores);
    let (got_p, got_lse) = (read_f(ph), read_32(lh, block.rows));
    let (ep, el) = (max_rel(&got_p, &want_p), max_rel(&got_lse, &want_lse));
    assert!(ep <= F::TOL && el <= 1e-5, "{block:?}: probabilities max rel {ep:e}, log-sum-exp {el:e}");

    // The backward pass from the reference's log-sum-exps and a correction per row.
    let correction = values(block.rows, seed + 2);
    let (p2, ds) = (up_f(&nan), up_f(&nan));
    let dh = up_f(&dprobs);
    launch_attention_softmax_backward::<R, F>(client, block, sh, dh, up_32(&want_lse), up_32(&correction), p2.clone(), ds.clone())
        .unwrap();
    let (want_p2, want_ds) = reference::attention_softmax_backward(block, &scores, &dprobs, &want_lse, &correction);
    let (ep2, eds) = (max_rel(&read_f(p2), &want_p2), max_rel(&read_f(ds), &want_ds));
    assert!(ep2 <= F::TOL && eds <= F::TOL, "{block:?}: backward probabilities max rel {ep2:e}, score gradients {eds:e}");
}

fn all_blocks<R: Runtime>(client: &ComputeClient<R>) {
    for (i, block) in blocks().iter().enumerate() {
        check::<R, f32>(client, block, 10 * i as u64);
        check::<R, f16>(client, block, 10 * i as u64 + 5);
    }
    // A block whose keys start after its first query would leave rows without keys.
    let bad = SoftmaxBlock { first_key: 3, ..blocks()[0] };
    let h = || client.create_from_slice(f32::as_bytes(&[0.0; 30]));
    let err = launch_attention_softmax::<R, f32>(client, &bad, h(), h(), h()).unwrap_err().to_string();
    assert!(err.contains("keys must start at or before the first query"), "{err}");
}

#[test]
fn attention_softmax_kernels_match_reference_on_wgpu() {
    all_blocks(&cubecl::wgpu::WgpuRuntime::client(&Default::default()));
}

/// The same blocks on CUDA (`--features cuda`; needs an NVIDIA GPU).
#[cfg(feature = "cuda")]
#[test]
fn attention_softmax_kernels_match_reference_on_cuda() {
    all_blocks(&cubecl::cuda::CudaRuntime::client(&Default::default()));
}
