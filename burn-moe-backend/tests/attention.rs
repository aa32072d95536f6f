//! The blocked causal attention op ([`causal_attention`], [`MoeBackend::moe_attention`]) against
//! independent computations: a plain-Rust loop over queries and keys (output and log-sum-exp), and
//! Burn's autodiff through the materialised attention — keys repeated per query head, a host-built
//! mask, softmax — for the gradients of q, k and v. Covers grouped-query and multi-query heads,
//! sliding windows shorter and longer than the sequence, and query blocks of 1, uneven and whole.
//!
//! Everything here runs in f64 (bounds of 1e-12), and only in f64: Burn 0.21 keeps a default float
//! dtype per device, so an `NdArray<f32>` test in this binary would make the `NdArray<f64>` tensors
//! f32. f32 is covered by the transformers parity tests (`tests/tests/hf_parity.rs`, also on wgpu).

use burn::backend::{Autodiff, NdArray};
use burn::tensor::{Tensor, TensorData, TensorPrimitive, activation::softmax, backend::Backend};
use burn_moe_backend::{CausalAttention, MoeBackend, causal_attention};

mod common;
use common::values;

type B64 = NdArray<f64>;

#[derive(Debug, Clone, Copy)]
struct Case {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    seq: usize,
    head_dim: usize,
    window: Option<usize>,
    block: Option<usize>,
}

impl Case {
    fn spec(&self) -> CausalAttention {
        CausalAttention::new(self.head_dim).with_window(self.window).with_query_block(self.block)
    }

    fn q_len(&self) -> usize {
        self.batch * self.heads * self.seq * self.head_dim
    }

    fn kv_len(&self) -> usize {
        self.batch * self.kv_heads * self.seq * self.head_dim
    }

    /// Inputs q, k, v and the output weights r of the test loss `Σ out ⊙ r`.
    fn inputs(&self, seed: u64) -> [Vec<f64>; 4] {
        let f = |n, s| values(n, s, 1.0).into_iter().map(f64::from).collect::<Vec<f64>>();
        [f(self.q_len(), seed), f(self.kv_len(), seed + 1), f(self.kv_len(), seed + 2), f(self.q_len(), seed + 3)]
    }

    fn visible(&self, i: usize, j: usize) -> bool {
        j <= i && self.window.is_none_or(|w| i < j + w)
    }
}

/// Plain-Rust attention: output `[B, H, S, hd]` and log-sum-exp `[B, H, S]`.
fn host_attention(c: &Case, q: &[f64], k: &[f64], v: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let (s, hd, group) = (c.seq, c.head_dim, c.heads / c.kv_heads);
    let scale = (hd as f64).powf(-0.5);
    let mut out = vec![0.0; c.q_len()];
    let mut lse = vec![0.0; c.batch * c.heads * s];
    for b in 0..c.batch {
        for h in 0..c.heads {
            let kvh = h / group;
            let qo = |i: usize| ((b * c.heads + h) * s + i) * hd;
            let ko = |j: usize| ((b * c.kv_heads + kvh) * s + j) * hd;
            for i in 0..s {
                let scores: Vec<(usize, f64)> = (0..s)
                    .filter(|&j| c.visible(i, j))
                    .map(|j| (j, scale * (0..hd).map(|x| q[qo(i) + x] * k[ko(j) + x]).sum::<f64>()))
                    .collect();
                let max = scores.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = scores.iter().map(|p| (p.1 - max).exp()).sum();
                lse[(b * c.heads + h) * s + i] = max + sum.ln();
                for &(j, sc) in &scores {
                    let p = (sc - max).exp() / sum;
                    for x in 0..hd {
                        out[qo(i) + x] += p * v[ko(j) + x];
                    }
                }
            }
        }
    }
    (out, lse)
}

fn tensor<B: Backend>(data: &[f64], shape: [usize; 4], device: &B::Device) -> Tensor<B, 4> {
    Tensor::from_data(TensorData::new(data.to_vec(), shape).convert::<B::FloatElem>(), device)
}

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
    t.into_data().convert::<f64>().to_vec().unwrap()
}

/// Output and gradients of `Σ out ⊙ r` with respect to q, k, v.
type Grads = [Vec<f64>; 4];

/// Burn autodiff through the materialised attention (HF's eager formulation).
fn eager<B: Backend>(c: &Case, inputs: &[Vec<f64>; 4], device: &B::Device) -> Grads {
    let (qs, kvs) = ([c.batch, c.heads, c.seq, c.head_dim], [c.batch, c.kv_heads, c.seq, c.head_dim]);
    let q = tensor::<Autodiff<B>>(&inputs[0], qs, device).require_grad();
    let k = tensor::<Autodiff<B>>(&inputs[1], kvs, device).require_grad();
    let v = tensor::<Autodiff<B>>(&inputs[2], kvs, device).require_grad();
    let group = c.heads / c.kv_heads;
    let repeat = |t: Tensor<Autodiff<B>, 4>| t.unsqueeze_dim::<5>(2).repeat_dim(2, group).reshape(qs);
    let mut mask = Vec::new();
    for i in 0..c.seq {
        for j in 0..c.seq {
            mask.push(!c.visible(i, j));
        }
    }
    let mask = Tensor::<Autodiff<B>, 2, burn::tensor::Bool>::from_data(TensorData::new(mask, [c.seq, c.seq]), device)
        .unsqueeze::<4>()
        .expand([c.batch, c.heads, c.seq, c.seq]);
    let scores = q.clone().matmul(repeat(k.clone()).swap_dims(2, 3)).mul_scalar((c.head_dim as f64).powf(-0.5));
    let out = softmax(scores.mask_fill(mask, f64::NEG_INFINITY), 3).matmul(repeat(v.clone()));
    let loss = (out.clone() * tensor::<Autodiff<B>>(&inputs[3], qs, device)).sum();
    let grads = loss.backward();
    let g = |t: &Tensor<Autodiff<B>, 4>| host(t.grad(&grads).unwrap());
    [host(out), g(&q), g(&k), g(&v)]
}

/// The same through [`causal_attention`] (its own backward pass).
fn blocked<B: MoeBackend>(c: &Case, inputs: &[Vec<f64>; 4], device: &B::Device) -> Grads {
    let (qs, kvs) = ([c.batch, c.heads, c.seq, c.head_dim], [c.batch, c.kv_heads, c.seq, c.head_dim]);
    let q = tensor::<Autodiff<B>>(&inputs[0], qs, device).require_grad();
    let k = tensor::<Autodiff<B>>(&inputs[1], kvs, device).require_grad();
    let v = tensor::<Autodiff<B>>(&inputs[2], kvs, device).require_grad();
    let out = causal_attention(q.clone(), k.clone(), v.clone(), &c.spec());
    let loss = (out.clone() * tensor::<Autodiff<B>>(&inputs[3], qs, device)).sum();
    let grads = loss.backward();
    let g = |t: &Tensor<Autodiff<B>, 4>| host(t.grad(&grads).unwrap());
    [host(out), g(&q), g(&k), g(&v)]
}

fn rel_l2(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

fn cases() -> Vec<Case> {
    let c = |batch, heads, kv_heads, seq, head_dim, window, block| Case { batch, heads, kv_heads, seq, head_dim, window, block };
    vec![
        c(1, 2, 2, 7, 4, None, None),          // multi-head, one block
        c(2, 4, 2, 13, 8, None, Some(4)),      // grouped-query, uneven blocks
        c(2, 4, 1, 13, 8, Some(3), Some(5)),   // multi-query, window shorter than a block
        c(1, 6, 3, 9, 4, Some(20), Some(1)),   // window longer than the sequence, one query per block
        c(1, 4, 2, 16, 8, Some(4), Some(4)),   // window equal to the block
        c(1, 2, 1, 1, 4, None, None),          // one token
    ]
}

#[test]
fn output_and_log_sum_exp_match_a_plain_loop() {
    let device = Default::default();
    for (n, case) in cases().into_iter().enumerate() {
        let inputs = case.inputs(10 * n as u64);
        let (want_out, want_lse) = host_attention(&case, &inputs[0], &inputs[1], &inputs[2]);
        let (qs, kvs) = ([case.batch, case.heads, case.seq, case.head_dim], [case.batch, case.kv_heads, case.seq, case.head_dim]);
        let prim = |t: Tensor<B64, 4>| t.into_primitive().tensor();
        let (out, lse) = B64::moe_attention(
            prim(tensor::<B64>(&inputs[0], qs, &device)),
            prim(tensor::<B64>(&inputs[1], kvs, &device)),
            prim(tensor::<B64>(&inputs[2], kvs, &device)),
            &case.spec(),
        );
        let out = host(Tensor::<B64, 4>::from_primitive(TensorPrimitive::Float(out)));
        let lse = host(Tensor::<B64, 3>::from_primitive(TensorPrimitive::Float(lse)));
        let (e_out, e_lse) = (rel_l2(&out, &want_out), rel_l2(&lse, &want_lse));
        assert!(e_out < 1e-12 && e_lse < 1e-12, "{case:?}: output rel err {e_out:.2e}, log-sum-exp {e_lse:.2e}");
    }
}

#[test]
fn gradients_match_autodiff_through_materialised_attention_f64() {
    let device = Default::default();
    for (n, case) in cases().into_iter().enumerate() {
        let inputs = case.inputs(10 * n as u64 + 1);
        let (want, got) = (eager::<B64>(&case, &inputs, &device), blocked::<B64>(&case, &inputs, &device));
        for (name, (g, w)) in ["out", "dq", "dk", "dv"].iter().zip(got.iter().zip(&want)) {
            let err = rel_l2(g, w);
            assert!(err < 1e-12, "{case:?}: {name} rel err {err:.2e}");
        }
    }
}

#[test]
fn only_the_requested_inputs_get_gradients() {
    // A frozen input (no `require_grad`) is a parent the backward pass must skip.
    let device = Default::default();
    let case = cases()[1];
    let inputs = case.inputs(5);
    let (qs, kvs) = ([case.batch, case.heads, case.seq, case.head_dim], [case.batch, case.kv_heads, case.seq, case.head_dim]);
    type A = Autodiff<B64>;
    let q = tensor::<A>(&inputs[0], qs, &device);
    let k = tensor::<A>(&inputs[1], kvs, &device).require_grad();
    let v = tensor::<A>(&inputs[2], kvs, &device);
    let grads = causal_attention(q.clone(), k.clone(), v.clone(), &case.spec()).sum().backward();
    assert!(q.grad(&grads).is_none() && v.grad(&grads).is_none());
    let want = eager::<B64>(&case, &[inputs[0].clone(), inputs[1].clone(), inputs[2].clone(), vec![1.0; case.q_len()]], &device);
    let err = rel_l2(&host(k.grad(&grads).unwrap()), &want[2]);
    assert!(err < 1e-12, "dk rel err {err:.2e}");
}

#[test]
#[should_panic(expected = "KV dividing the 3 query heads")]
fn heads_that_do_not_group_are_refused() {
    let device = Default::default();
    let q = Tensor::<B64, 4>::zeros([1, 3, 4, 2], &device);
    let kv = Tensor::<B64, 4>::zeros([1, 2, 4, 2], &device);
    let _ = causal_attention(q, kv.clone(), kv, &CausalAttention::new(2));
}
