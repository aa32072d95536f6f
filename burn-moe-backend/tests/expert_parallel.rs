//! Expert parallelism: the all-to-all dispatcher over in-process ranks against the same layer with all
//! experts on one device, for outputs and the gradients of the tokens, the routing weights and every
//! expert weight. Each rank holds `E / P` experts; tokens are forced to cover the awkward cases: a
//! rank whose tokens all go to remote experts, a rank that receives nothing, an expert with no token,
//! uneven token counts per rank, and a rank with one token.

use burn::backend::{Autodiff, NdArray};
use burn::tensor::{Int, Tensor, TensorData};
use burn_moe_backend::dist::{CommConfig, GraphComm, ThreadComm};
use burn_moe_backend::{AllToAllDispatcher, DMoe, LoraConfig, MoeKernel, TokenDispatcher, experts_of_rank};

mod common;
use common::values;

type B = NdArray<f32>;
type AB = Autodiff<B>;


const D: usize = 6;
const F: usize = 10;
const K: usize = 2;

struct Problem {
    e: usize,
    tokens_per_rank: Vec<usize>,
    /// `[T, K]` expert ids, rank blocks in order.
    experts: Vec<i64>,
    x: Vec<f32>,
    weights: Vec<f32>,
    probe: Vec<f32>,
    seed: u64,
}

impl Problem {
    fn total(&self) -> usize {
        self.tokens_per_rank.iter().sum()
    }

    fn layer(&self, kernel: MoeKernel, lora: bool) -> DMoe<AB> {
        let device = Default::default();
        let e = self.e;
        let t3 = |v: Vec<f32>, s: [usize; 3]| Tensor::<AB, 3>::from_data(TensorData::new(v, s), &device);
        let layer = DMoe::from_weights(
            Tensor::from_data(TensorData::new(values(e * D, self.seed, 1.0), [e, D]), &device),
            t3(values(e * F * D, self.seed + 1, 0.5), [e, F, D]),
            t3(values(e * F * D, self.seed + 2, 0.5), [e, F, D]),
            t3(values(e * D * F, self.seed + 3, 0.5), [e, D, F]),
            K,
            kernel,
        )
        .with_block_size(4);
        if !lora {
            return layer;
        }
        // Non-zero B so the adapters' gradients are not trivially zero; no dropout (deterministic).
        let mut layer = layer.with_lora(&LoraConfig::new().with_r(3).with_dropout(0.0), self.seed);
        let l = layer.lora.as_mut().expect("adapters");
        for (i, part) in [&mut l.w1, &mut l.w3, &mut l.w2].into_iter().enumerate() {
            let dims = part.b.dims();
            let n = dims.iter().product();
            part.b = burn::module::Param::from_tensor(Tensor::from_data(
                TensorData::new(values(n, self.seed + 10 + i as u64, 0.3), dims),
                &device,
            ));
        }
        layer
    }

    fn rows(&self, rank: usize) -> core::ops::Range<usize> {
        let start: usize = self.tokens_per_rank[..rank].iter().sum();
        start..start + self.tokens_per_rank[rank]
    }
}

/// Output and gradients of one evaluation: `[out, dx, dweights, dw1, dw3, dw2, (lora grads...)]`.
fn run(layer: &DMoe<AB>, p: &Problem, rows: core::ops::Range<usize>, dispatcher: Option<&dyn TokenDispatcher<AB>>) -> Vec<Vec<f32>> {
    let device = Default::default();
    let t = rows.len();
    let x = Tensor::<AB, 2>::from_data(TensorData::new(p.x[rows.start * D..rows.end * D].to_vec(), [t, D]), &device).require_grad();
    let w = Tensor::<AB, 2>::from_data(TensorData::new(p.weights[rows.start * K..rows.end * K].to_vec(), [t, K]), &device)
        .require_grad();
    let experts =
        Tensor::<AB, 2, Int>::from_data(TensorData::new(p.experts[rows.start * K..rows.end * K].to_vec(), [t, K]), &device);
    let probe = Tensor::<AB, 2>::from_data(TensorData::new(p.probe[rows.start * D..rows.end * D].to_vec(), [t, D]), &device);
    let out = match dispatcher {
        Some(d) => d.dispatch(layer, x.clone(), w.clone(), experts),
        None => layer.experts(x.clone(), w.clone(), experts),
    };
    let grads = (out.clone() * probe).sum().backward();
    let vec = |t: Option<Tensor<B, 2>>| t.map(|t| t.into_data().to_vec::<f32>().unwrap()).unwrap_or_default();
    let vec3 = |t: &burn::module::Param<Tensor<AB, 3>>| {
        t.val().grad(&grads).map(|g| g.into_data().to_vec::<f32>().unwrap()).unwrap_or_else(|| vec![0.0; t.val().shape().num_elements()])
    };
    let mut result = vec![
        out.inner().into_data().to_vec::<f32>().unwrap(),
        vec(x.grad(&grads)),
        vec(w.grad(&grads)),
        vec3(&layer.w1),
        vec3(&layer.w3),
        vec3(&layer.w2),
    ];
    if let Some(l) = &layer.lora {
        for part in [&l.w1, &l.w3, &l.w2] {
            result.push(vec3(&part.a));
            result.push(vec3(&part.b));
        }
    }
    result
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-5 * scale + 1e-6, "{what}[{i}]: {g} vs {w} (scale {scale})");
    }
}

fn check(p: &Problem, kernel: MoeKernel, lora: bool) {
    let ranks = p.tokens_per_rank.len();
    let full = p.layer(kernel, lora);
    let want = run(&full, p, 0..p.total(), None);
    let per_expert = |v: &[f32], range: &core::ops::Range<usize>| {
        let n = v.len() / p.e;
        v[range.start * n..range.end * n].to_vec()
    };
    let results = ThreadComm::<B>::run_ranks(ranks, CommConfig::default(), |comm| {
        let rank = burn_moe_backend::dist::Communicator::rank(&comm);
        let range = experts_of_rank(p.e, ranks, rank);
        let layer = p.layer(kernel, lora).local_experts(range.clone());
        let graph = GraphComm::<B>::new(comm);
        let dispatcher = AllToAllDispatcher::<AB>::new(graph.clone());
        let got = run(&layer, p, p.rows(rank), Some(&dispatcher));
        graph.check().expect("collectives");
        (rank, range, got)
    });
    for r in results {
        let (rank, range, got) = r.expect("rank ran");
        let rows = p.rows(rank);
        let tag = |what: &str| format!("{kernel:?} lora={lora} P={ranks} rank {rank}: {what}");
        assert_close(&tag("output"), &got[0], &want[0][rows.start * D..rows.end * D]);
        assert_close(&tag("dx"), &got[1], &want[1][rows.start * D..rows.end * D]);
        assert_close(&tag("dweights"), &got[2], &want[2][rows.start * K..rows.end * K]);
        for (i, name) in ["dw1", "dw3", "dw2", "lora w1.a", "lora w1.b", "lora w3.a", "lora w3.b", "lora w2.a", "lora w2.b"]
            .iter()
            .enumerate()
            .take(got.len() - 3)
        {
            assert_close(&tag(name), &got[3 + i], &per_expert(&want[3 + i], &range));
        }
    }
}

/// A problem with `tokens_per_rank[r]` tokens on rank `r` routed to `experts` (`[T, K]`, rank blocks
/// in order).
fn problem(tokens_per_rank: Vec<usize>, e: usize, experts: Vec<i64>, seed: u64) -> Problem {
    let t: usize = tokens_per_rank.iter().sum();
    assert_eq!(experts.len(), t * K);
    Problem {
        e,
        tokens_per_rank,
        experts,
        x: values(t * D, seed + 20, 1.0),
        weights: values(t * K, seed + 21, 1.0),
        probe: values(t * D, seed + 22, 1.0),
        seed,
    }
}

#[test]
fn two_ranks_match_one_device_for_every_kernel() {
    // E = 4: rank 0 holds experts 0,1; rank 1 holds 2,3. Expert 1 gets no token; rank 0's tokens all
    // go to rank 1; rank 1's single token stays home.
    let experts = vec![2, 3, 3, 2, 2, 0, /* rank 1 */ 3, 2];
    let p = problem(vec![3, 1], 4, experts, 7);
    for kernel in [MoeKernel::Reference, MoeKernel::Scatter, MoeKernel::BlockSparse] {
        check(&p, kernel, false);
    }
}

#[test]
fn four_ranks_uneven_with_idle_receivers() {
    // E = 8, two experts per rank: nothing is routed to experts 0, 1 (rank 0) or 4, 5 (rank 2).
    let experts = vec![
        2, 3, 7, 6, // rank 0
        6, 2, // rank 1
        3, 7, 2, 6, 7, 3, // rank 2
        2, 7, 6, 3, // rank 3
    ];
    let p = problem(vec![2, 1, 3, 2], 8, experts, 11);
    for kernel in [MoeKernel::Scatter, MoeKernel::Reference] {
        check(&p, kernel, false);
    }
}

#[test]
fn expert_lora_gradients_follow_the_tokens() {
    let experts = vec![1, 3, 0, 2, 3, 1, /* rank 1 */ 2, 0, 1, 2];
    let p = problem(vec![3, 2], 4, experts, 23);
    check(&p, MoeKernel::Scatter, true);
    check(&p, MoeKernel::Reference, true);
}
