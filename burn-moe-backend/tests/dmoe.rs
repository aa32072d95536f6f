//! The reference dropless MoE against independent computations: a plain-Rust per-token loop (forward),
//! a dense "every expert on every token, masked" Burn computation (gradients), and a dense SwiGLU MLP
//! (E = 1, k = 1). Covers k = 1, 2, 3, k = E, one token, an expert with no token, all tokens on one expert.

use burn::backend::{Autodiff, NdArray};
use burn::tensor::{IndexingUpdateOp, Tensor, TensorData, activation::silu, activation::softmax, backend::Backend};
use burn_moe_backend::{DMoe, MoeKernel, load_balancing_loss};

mod common;
use common::values;

type B = NdArray<f32>;
type AB = Autodiff<B>;


struct Case {
    t: usize,
    d: usize,
    f: usize,
    e: usize,
    k: usize,
    x: Vec<f32>,
    gate: Vec<f32>,
    w1: Vec<f32>,
    w3: Vec<f32>,
    w2: Vec<f32>,
}

impl Case {
    fn random(t: usize, d: usize, f: usize, e: usize, k: usize, seed: u64) -> Self {
        Self {
            t,
            d,
            f,
            e,
            k,
            x: values(t * d, seed, 1.0),
            gate: values(e * d, seed + 1, 1.0),
            w1: values(e * f * d, seed + 2, 0.5),
            w3: values(e * f * d, seed + 3, 0.5),
            w2: values(e * d * f, seed + 4, 0.5),
        }
    }

    fn layer<Bk: Backend>(&self, device: &Bk::Device) -> DMoe<Bk> {
        self.layer_with::<Bk>(device, MoeKernel::Reference)
    }

    fn layer_with<Bk: Backend>(&self, device: &Bk::Device, kernel: MoeKernel) -> DMoe<Bk> {
        let t3 = |v: &Vec<f32>, s: [usize; 3]| Tensor::<Bk, 3>::from_data(TensorData::new(v.clone(), s), device);
        DMoe::from_weights(
            Tensor::from_data(TensorData::new(self.gate.clone(), [self.e, self.d]), device),
            t3(&self.w1, [self.e, self.f, self.d]),
            t3(&self.w3, [self.e, self.f, self.d]),
            t3(&self.w2, [self.e, self.d, self.f]),
            self.k,
            kernel,
        )
    }

    fn x<Bk: Backend>(&self, device: &Bk::Device) -> Tensor<Bk, 2> {
        Tensor::from_data(TensorData::new(self.x.clone(), [self.t, self.d]), device)
    }

    /// Plain-Rust, f64, token by token: the definition of a top-k SwiGLU MoE.
    fn host_reference(&self) -> (Vec<f64>, Vec<usize>) {
        let (d, f, e, k) = (self.d, self.f, self.e, self.k);
        let mut out = vec![0f64; self.t * d];
        let mut counts = vec![0usize; e];
        for t in 0..self.t {
            let x = &self.x[t * d..(t + 1) * d];
            let logits: Vec<f64> =
                (0..e).map(|j| (0..d).map(|i| self.gate[j * d + i] as f64 * x[i] as f64).sum()).collect();
            let max = logits.iter().cloned().fold(f64::MIN, f64::max);
            let z: f64 = logits.iter().map(|l| (l - max).exp()).sum();
            let probs: Vec<f64> = logits.iter().map(|l| (l - max).exp() / z).collect();
            let mut order: Vec<usize> = (0..e).collect();
            order.sort_by(|a, b| probs[*b].partial_cmp(&probs[*a]).unwrap());
            let top = &order[..k];
            let norm: f64 = top.iter().map(|&j| probs[j]).sum();
            for &j in top {
                counts[j] += 1;
                let w = probs[j] / norm;
                let h: Vec<f64> = (0..f)
                    .map(|r| {
                        let a: f64 = (0..d).map(|i| self.w1[(j * f + r) * d + i] as f64 * x[i] as f64).sum();
                        let b: f64 = (0..d).map(|i| self.w3[(j * f + r) * d + i] as f64 * x[i] as f64).sum();
                        a / (1.0 + (-a).exp()) * b
                    })
                    .collect();
                for o in 0..d {
                    let y: f64 = (0..f).map(|r| self.w2[(j * d + o) * f + r] as f64 * h[r]).sum();
                    out[t * d + o] += w * y;
                }
            }
        }
        (out, counts)
    }
}

fn rel_err(a: &[f32], b: &[f64]) -> f64 {
    let diff: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - y).powi(2)).sum::<f64>().sqrt();
    let norm: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    diff / norm.max(1e-30)
}

fn check_forward(case: &Case) {
    for kernel in MoeKernel::ALL {
        check_forward_with(case, kernel);
    }
}

fn check_forward_with(case: &Case, kernel: MoeKernel) {
    let device = Default::default();
    let out = case.layer_with::<B>(&device, kernel).forward(case.x::<B>(&device));
    let got: Vec<f32> = out.output.into_data().iter::<f32>().collect();
    let (want, counts) = case.host_reference();
    let err = rel_err(&got, &want);
    assert!(err < 1e-5, "{kernel} T={} E={} k={}: forward rel err {err:e}", case.t, case.e, case.k);
    let got_counts: Vec<usize> = out.aux.token_counts.into_data().iter::<f32>().map(|c| c as usize).collect();
    assert_eq!(got_counts, counts);
}

#[test]
fn forward_matches_per_token_loop() {
    for (t, e, k) in [(7, 4, 2), (1, 4, 2), (9, 4, 1), (6, 8, 3), (5, 3, 3), (13, 1, 1)] {
        check_forward(&Case::random(t, 12, 20, e, k, (t * 100 + e * 10 + k) as u64));
    }
}

#[test]
fn expert_with_no_tokens_and_all_tokens_on_one_expert() {
    // Positive inputs and a strongly negative router row: expert 3 is never chosen.
    let mut case = Case::random(10, 8, 16, 4, 2, 7);
    case.x.iter_mut().for_each(|v| *v = v.abs() + 0.1);
    case.gate[3 * 8..4 * 8].iter_mut().for_each(|g| *g = -4.0);
    let (_, counts) = case.host_reference();
    assert_eq!(counts[3], 0, "the case must starve expert 3");
    check_forward(&case);

    // A strongly positive row with k = 1: every token goes to expert 0.
    let mut case = Case::random(10, 8, 16, 4, 1, 8);
    case.x.iter_mut().for_each(|v| *v = v.abs() + 0.1);
    case.gate[..8].iter_mut().for_each(|g| *g = 4.0);
    let (_, counts) = case.host_reference();
    assert_eq!(counts, vec![10, 0, 0, 0]);
    check_forward(&case);
}

/// Dense reference in Burn: every expert on every token, combined with a `[T, E]` weight matrix that
/// is zero off the top-k. Independent of the sort/gather/scatter path, so its gradients check ours.
fn dense_moe(layer: &DMoe<AB>, x: Tensor<AB, 2>) -> Tensor<AB, 2> {
    let [t, d] = x.dims();
    let [e, f, _] = layer.w1.dims();
    let probs = softmax(x.clone().matmul(layer.gate.val().transpose()), 1);
    let (_, idx) = probs.clone().detach().topk_with_indices(layer.top_k, 1);
    let k = layer.top_k;
    let mask = Tensor::<AB, 2>::zeros([t, e], &x.device()).scatter(1, idx, Tensor::ones([t, k], &x.device()), IndexingUpdateOp::Add);
    let top = probs * mask;
    let weights = top.clone() / top.sum_dim(1);
    let mut out = Tensor::<AB, 2>::zeros([t, d], &x.device());
    for j in 0..e {
        let w1 = layer.w1.val().slice([j..j + 1]).reshape([f, d]);
        let w3 = layer.w3.val().slice([j..j + 1]).reshape([f, d]);
        let w2 = layer.w2.val().slice([j..j + 1]).reshape([d, f]);
        let y = (silu(x.clone().matmul(w1.transpose())) * x.clone().matmul(w3.transpose())).matmul(w2.transpose());
        out = out + y * weights.clone().slice([0..t, j..j + 1]);
    }
    out
}

#[test]
fn gradients_match_dense_computation() {
    for (t, e, k) in [(8, 4, 2), (5, 4, 1), (6, 3, 3)] {
        let case = Case::random(t, 10, 14, e, k, 40 + t as u64);
        let device = Default::default();
        let probe = Tensor::<AB, 2>::from_data(TensorData::new(values(t * 10, 99, 1.0), [t, 10]), &device);
        let grads_of = |dense: bool, kernel: MoeKernel| {
            let layer = case.layer_with::<AB>(&device, kernel);
            let x = case.x::<AB>(&device).require_grad();
            let out = if dense { dense_moe(&layer, x.clone()) } else { layer.forward(x.clone()).output };
            let g = (out * probe.clone()).sum().backward();
            let host = |t: Option<Tensor<B, 3>>| t.unwrap().into_data().iter::<f32>().collect::<Vec<_>>();
            vec![
                ("x", x.grad(&g).unwrap().into_data().iter::<f32>().collect::<Vec<_>>()),
                ("gate", layer.gate.val().grad(&g).unwrap().into_data().iter::<f32>().collect()),
                ("w1", host(layer.w1.val().grad(&g))),
                ("w3", host(layer.w3.val().grad(&g))),
                ("w2", host(layer.w2.val().grad(&g))),
            ]
        };
        let dense = grads_of(true, MoeKernel::Reference);
        for kernel in MoeKernel::ALL {
            for ((name, ours), (_, want)) in grads_of(false, kernel).into_iter().zip(&dense) {
                let want64: Vec<f64> = want.iter().map(|v| *v as f64).collect();
                let err = rel_err(&ours, &want64);
                assert!(err < 1e-5, "{kernel} T={t} E={e} k={k}: grad {name} rel err {err:e}");
            }
        }
    }
}

#[test]
fn one_expert_top1_is_a_dense_swiglu_mlp() {
    let case = Case::random(6, 10, 24, 1, 1, 5);
    let device = Default::default();
    let layer = case.layer::<AB>(&device);
    let x = case.x::<AB>(&device).require_grad();
    let out = layer.forward(x.clone()).output;
    let w1 = layer.w1.val().reshape([24, 10]);
    let w3 = layer.w3.val().reshape([24, 10]);
    let w2 = layer.w2.val().reshape([10, 24]);
    let dense = (silu(x.clone().matmul(w1.transpose())) * x.clone().matmul(w3.transpose())).matmul(w2.transpose());
    let a: Vec<f32> = out.clone().into_data().iter::<f32>().collect();
    let b: Vec<f64> = dense.clone().into_data().iter::<f32>().map(|v| v as f64).collect();
    assert!(rel_err(&a, &b) < 1e-6);
    let ga = out.sum().backward();
    let gx_moe: Vec<f32> = x.grad(&ga).unwrap().into_data().iter::<f32>().collect();
    let gw_moe: Vec<f32> = layer.w2.val().grad(&ga).unwrap().into_data().iter::<f32>().collect();
    let gb = dense.sum().backward();
    let gx: Vec<f64> = x.grad(&gb).unwrap().into_data().iter::<f32>().map(|v| v as f64).collect();
    let gw: Vec<f64> = layer.w2.val().grad(&gb).unwrap().into_data().iter::<f32>().map(|v| v as f64).collect();
    assert!(rel_err(&gx_moe, &gx) < 1e-6);
    assert!(rel_err(&gw_moe, &gw) < 1e-6);
}

#[test]
fn aux_loss_pools_layers_like_transformers() {
    let device = Default::default();
    let a = Case::random(9, 8, 8, 4, 2, 11);
    let b = Case::random(9, 8, 8, 4, 2, 12);
    let sa = a.layer::<B>(&device).forward(a.x::<B>(&device)).aux;
    let sb = b.layer::<B>(&device).forward(b.x::<B>(&device)).aux;
    let pooled: f32 = load_balancing_loss(&[sa.clone(), sb.clone()]).into_scalar();
    // Host recomputation: E · Σ_e (counts_e / N) · (probs_e / N) over both layers' rows.
    let host = |s: &burn_moe_backend::MoeAuxStats<B>| {
        (
            s.token_counts.clone().into_data().iter::<f32>().collect::<Vec<_>>(),
            s.prob_sum.clone().into_data().iter::<f32>().collect::<Vec<_>>(),
        )
    };
    let ((ca, pa), (cb, pb)) = (host(&sa), host(&sb));
    let n = 18.0f64;
    let want: f64 = (0..4).map(|j| (ca[j] + cb[j]) as f64 / n * (pa[j] + pb[j]) as f64 / n).sum::<f64>() * 4.0;
    assert!((pooled as f64 - want).abs() < 1e-6 * want, "{pooled} vs {want}");
    // Uniform routing would give exactly k; any real routing gives at least ~1 (balanced) per slot.
    assert!(pooled > 0.5);
    let single: f32 = sa.loss().into_scalar();
    assert!((single - pooled).abs() > 1e-6, "pooled loss must differ from one layer's loss");
}

/// Output and the gradients of `sum(output · probe)` for x, gate, w1, w3, w2 with `kernel`.
fn layer_grads(case: &Case, kernel: MoeKernel, block: usize) -> Vec<(&'static str, Vec<f32>)> {
    let device = Default::default();
    let layer = case.layer_with::<AB>(&device, kernel).with_block_size(block);
    let x = case.x::<AB>(&device).require_grad();
    let probe = Tensor::<AB, 2>::from_data(TensorData::new(values(case.t * case.d, 77, 1.0), [case.t, case.d]), &device);
    let out = layer.forward(x.clone()).output;
    let y: Vec<f32> = out.clone().into_data().iter::<f32>().collect();
    let g = (out * probe).sum().backward();
    let host3 = |t: Option<Tensor<B, 3>>| t.unwrap().into_data().iter::<f32>().collect::<Vec<_>>();
    vec![
        ("output", y),
        ("x", x.grad(&g).unwrap().into_data().iter::<f32>().collect()),
        ("gate", layer.gate.val().grad(&g).unwrap().into_data().iter::<f32>().collect()),
        ("w1", host3(layer.w1.val().grad(&g))),
        ("w3", host3(layer.w3.val().grad(&g))),
        ("w2", host3(layer.w2.val().grad(&g))),
    ]
}

fn check_block_sparse(case: &Case, block: usize) {
    let want = layer_grads(case, MoeKernel::Reference, block);
    let got = layer_grads(case, MoeKernel::BlockSparse, block);
    let label = format!("T={} d={} F={} E={} k={} bs={block}", case.t, case.d, case.f, case.e, case.k);
    for ((name, a), (_, b)) in got.iter().zip(&want) {
        if case.k == 1 && *name == "gate" {
            // One expert per token: the combine weight is p/p = 1 and the router gradient vanishes up
            // to rounding on both sides, so only its size is compared.
            let max = a.iter().chain(b).fold(0f32, |m, v| m.max(v.abs()));
            assert!(max < 1e-5, "{label}: k=1 router gradient should vanish, max |g| = {max:e}");
            continue;
        }
        let b64: Vec<f64> = b.iter().map(|v| *v as f64).collect();
        let err = rel_err(a, &b64);
        assert!(err <= 1e-5, "{label}: block-sparse {name} rel err {err:e}");
    }
}

#[test]
fn block_sparse_layer_and_gradients_match_reference_with_small_blocks() {
    // (T, d, F, E, k, bs): one token; T not a multiple of bs with d = 33, F = 17 (F padded to 32 in
    // the sparse layout); k = 3; k = 1; E = 1 with F a multiple of bs; bs larger than every segment.
    for (t, d, f, e, k, bs) in [(1, 8, 12, 4, 2, 16), (21, 33, 17, 4, 2, 16), (19, 33, 17, 8, 3, 16), (23, 16, 32, 4, 1, 16), (13, 10, 8, 1, 1, 4), (9, 12, 20, 4, 2, 32)] {
        check_block_sparse(&Case::random(t, d, f, e, k, (t * 1000 + d * 10 + k) as u64), bs);
    }
}

#[test]
fn block_sparse_handles_a_starved_expert_and_all_tokens_on_one_expert() {
    let mut case = Case::random(10, 8, 17, 4, 2, 7);
    case.x.iter_mut().for_each(|v| *v = v.abs() + 0.1);
    case.gate[3 * 8..4 * 8].iter_mut().for_each(|g| *g = -4.0);
    assert_eq!(case.host_reference().1[3], 0, "the case must starve expert 3");
    check_block_sparse(&case, 16);
    // The starved expert's weights get exactly zero gradient.
    let grads = layer_grads(&case, MoeKernel::BlockSparse, 16);
    for (name, g) in grads.iter().filter(|(n, _)| ["w1", "w3", "w2"].contains(n)) {
        assert!(g[3 * 17 * 8..].iter().all(|v| *v == 0.0), "{name}: starved expert has a gradient");
    }

    let mut case = Case::random(10, 8, 16, 4, 1, 8);
    case.x.iter_mut().for_each(|v| *v = v.abs() + 0.1);
    case.gate[..8].iter_mut().for_each(|g| *g = 4.0);
    assert_eq!(case.host_reference().1, vec![10, 0, 0, 0]);
    check_block_sparse(&case, 8);
}
