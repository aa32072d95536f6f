//! The dMoE layer's CubeCL kernels inside Burn, on wgpu (Mesa lavapipe in CI): forward and every
//! gradient of `MoeKernel::Scatter` and `MoeKernel::BlockSparse` on `Autodiff<CubeBackend<Wgpu>>` against the reference path on
//! `Autodiff<NdArray>`, the fusion-wrapped `Wgpu` backend, and HF parity of the whole model on wgpu;
//! the same for the chunked causal attention op.

use burn::backend::Autodiff;
use burn::backend::wgpu::WgpuRuntime;
use burn::tensor::{Tensor, TensorData, backend::AutodiffBackend};
use burn_cubecl::CubeBackend;
use burn_moe_backend::{DEFAULT_BLOCK_SIZE, DMoe, MoeBackend, MoeKernel};
use burn_moe_tests::{CpuAutodiff, fixtures_dir, pseudo_random, read_f32_tensors, rel_l2};
use burn_moe_backend::{CausalAttention, causal_attention};
use mixtral_burn::{AttentionKernel, HfCheckpoint};
use mixtral_burn::parity::{parity_outputs_with_attention, read_input_ids};

type Wgpu = CubeBackend<WgpuRuntime, f32, i32, u32>;

struct Layer {
    t: usize,
    d: usize,
    f: usize,
    e: usize,
    k: usize,
    seed: u64,
}

impl Layer {
    fn build<B: MoeBackend>(&self, device: &B::Device, kernel: MoeKernel, block: usize) -> (DMoe<B>, Tensor<B, 2>, Tensor<B, 2>) {
        let (t, d, f, e) = (self.t, self.d, self.f, self.e);
        let s = self.seed;
        let t2 = |n: [usize; 2], seed, scale| Tensor::<B, 2>::from_data(TensorData::new(pseudo_random(n[0] * n[1], seed, scale), n), device);
        let t3 = |n: [usize; 3], seed| Tensor::<B, 3>::from_data(TensorData::new(pseudo_random(n.iter().product(), seed, 0.4), n), device);
        let layer = DMoe::from_weights(t2([e, d], s + 1, 1.0), t3([e, f, d], s + 2), t3([e, f, d], s + 3), t3([e, d, f], s + 4), self.k, kernel)
            .with_block_size(block);
        (layer, t2([t, d], s + 5, 1.0), t2([t, d], s + 6, 1.0))
    }

    /// Output and the gradients of `sum(output · probe)` for x, gate, w1, w3, w2.
    fn run<B: AutodiffBackend + MoeBackend>(&self, device: &B::Device, kernel: MoeKernel) -> Vec<(&'static str, Vec<f32>)> {
        self.run_with_block::<B>(device, kernel, DEFAULT_BLOCK_SIZE)
    }

    /// [`run`](Self::run) with the block size of `MoeKernel::BlockSparse`.
    fn run_with_block<B: AutodiffBackend + MoeBackend>(&self, device: &B::Device, kernel: MoeKernel, block: usize) -> Vec<(&'static str, Vec<f32>)> {
        let (layer, x, probe) = self.build::<B>(device, kernel, block);
        let x = x.require_grad();
        let out = layer.forward(x.clone()).output;
        let host = |t: Tensor<B::InnerBackend, 2>| t.into_data().iter::<f32>().collect::<Vec<_>>();
        let host3 = |t: Tensor<B::InnerBackend, 3>| t.into_data().iter::<f32>().collect::<Vec<_>>();
        let y: Vec<f32> = out.clone().into_data().iter::<f32>().collect();
        let g = (out * probe).sum().backward();
        vec![
            ("output", y),
            ("x", host(x.grad(&g).unwrap())),
            ("gate", host(layer.gate.val().grad(&g).unwrap())),
            ("w1", host3(layer.w1.val().grad(&g).unwrap())),
            ("w3", host3(layer.w3.val().grad(&g).unwrap())),
            ("w2", host3(layer.w2.val().grad(&g).unwrap())),
        ]
    }
}

#[test]
fn scatter_kernels_on_wgpu_match_the_reference_on_cpu() {
    let cases = [
        Layer { t: 1, d: 8, f: 12, e: 4, k: 2, seed: 1 },
        Layer { t: 37, d: 100, f: 60, e: 4, k: 2, seed: 2 },
        Layer { t: 19, d: 33, f: 17, e: 8, k: 3, seed: 3 },
        Layer { t: 23, d: 16, f: 24, e: 4, k: 1, seed: 4 },
        Layer { t: 11, d: 16, f: 8, e: 1, k: 1, seed: 5 },
        // Large enough for the per-segment matmul path of the grouped matmuls.
        Layer { t: 200, d: 128, f: 160, e: 4, k: 2, seed: 6 },
    ];
    for case in &cases {
        let want = case.run::<CpuAutodiff>(&Default::default(), MoeKernel::Reference);
        let got = case.run::<Autodiff<Wgpu>>(&Default::default(), MoeKernel::Scatter);
        for ((name, a), (_, b)) in got.iter().zip(&want) {
            if case.k == 1 && *name == "gate" {
                // With one expert per token the combine weight is p/p = 1: the router gradient is
                // zero up to rounding on both sides, so only its size can be compared.
                let max = a.iter().chain(b).fold(0f32, |m, v| m.max(v.abs()));
                assert!(max < 1e-5, "k=1 router gradient should vanish, max |g| = {max:e}");
                continue;
            }
            let err = rel_l2(a, b);
            assert!(err < 1e-5, "T={} d={} f={} E={} k={}: {name} rel err {err:e}", case.t, case.d, case.f, case.e, case.k);
        }
    }
}

#[test]
fn block_sparse_kernels_on_wgpu_match_the_reference_on_cpu() {
    // (case, block size): one token; T not a multiple of bs with d = 33, F = 17 (F padded to 32 in
    // the sparse layout); k = 3 over 8 experts; k = 1; E = 1; the default block size of 128.
    let cases = [
        (Layer { t: 1, d: 8, f: 12, e: 4, k: 2, seed: 11 }, 16),
        (Layer { t: 21, d: 33, f: 17, e: 4, k: 2, seed: 12 }, 16),
        (Layer { t: 19, d: 33, f: 17, e: 8, k: 3, seed: 13 }, 16),
        (Layer { t: 23, d: 16, f: 24, e: 4, k: 1, seed: 14 }, 32),
        (Layer { t: 11, d: 16, f: 8, e: 1, k: 1, seed: 15 }, 16),
        (Layer { t: 9, d: 12, f: 20, e: 4, k: 2, seed: 16 }, DEFAULT_BLOCK_SIZE),
    ];
    for (case, block) in &cases {
        let want = case.run::<CpuAutodiff>(&Default::default(), MoeKernel::Reference);
        let got = case.run_with_block::<Autodiff<Wgpu>>(&Default::default(), MoeKernel::BlockSparse, *block);
        for ((name, a), (_, b)) in got.iter().zip(&want) {
            if case.k == 1 && *name == "gate" {
                let max = a.iter().chain(b).fold(0f32, |m, v| m.max(v.abs()));
                assert!(max < 1e-5, "k=1 router gradient should vanish, max |g| = {max:e}");
                continue;
            }
            let err = rel_l2(a, b);
            let label = format!("T={} d={} f={} E={} k={} bs={block}", case.t, case.d, case.f, case.e, case.k);
            assert!(err <= 1e-5, "{label}: block-sparse {name} rel err {err:e}");
        }
    }
}

#[test]
fn fusion_wrapped_wgpu_runs_every_kernel() {
    type Fused = Autodiff<burn::backend::Wgpu<f32, i32>>;
    let case = Layer { t: 9, d: 12, f: 20, e: 4, k: 2, seed: 9 };
    let want = case.run::<CpuAutodiff>(&Default::default(), MoeKernel::Reference);
    for kernel in MoeKernel::ALL {
        let got = case.run::<Fused>(&Default::default(), kernel);
        for ((name, a), (_, b)) in got.iter().zip(&want) {
            let err = rel_l2(a, b);
            assert!(err < 1e-5, "{kernel} on fused wgpu: {name} rel err {err:e}");
        }
    }
}

/// The fusion wrapper must reach the CubeCL kernels, not the trait's standard-op defaults: each op
/// on `Wgpu` (fusion-wrapped) runs as a fusion custom op on the inner backend (its execution count
/// rises) and gives the plain `CubeBackend`'s kernel result bit for bit (operands, offsets and
/// topologies carried through the stream intact).
#[test]
fn fusion_wrapper_runs_the_cubecl_kernels_not_the_standard_op_fallback() {
    use burn::tensor::{Int, TensorPrimitive};
    use burn_moe_backend::ops::{
        BlockSparseTopology, fused_moe_op_count, moe_combine, moe_dsd, moe_dstd, moe_gate_logits, moe_grouped_matmul, moe_permute, moe_sdd, moe_swiglu,
    };
    type Fused = burn::backend::Wgpu<f32, i32>;
    let device = Default::default();
    let bits = |t: TensorData| t.iter::<f32>().map(f32::to_bits).collect::<Vec<_>>();
    let data = |shape: Vec<usize>, seed: u64, scale: f32| TensorData::new(pseudo_random(shape.iter().product(), seed, scale), shape);
    let count = |op: &str| fused_moe_op_count(op).unwrap_or_else(|| panic!("no fused op named {op}"));
    // `fused` must be computed inside `run` so the count can rise (other tests in this binary may
    // run fused ops concurrently, which only adds to it).
    let same = |op: &str, run: &dyn Fn() -> TensorData, plain: TensorData| {
        let before = count(op);
        let (f, p) = (bits(run()), bits(plain));
        assert!(count(op) > before, "{op} did not run as a fusion custom op");
        assert_eq!(f.len(), p.len(), "{op}: fused and plain outputs have different sizes");
        let n = f.iter().zip(&p).filter(|(a, b)| a != b).count();
        assert_eq!(n, 0, "{op}: {n} of {} fused elements differ from the CubeCL kernel's", f.len());
    };
    let p2 = |d: &TensorData| Tensor::<Wgpu, 2>::from_data(d.clone(), &device);
    let f2 = |d: &TensorData| Tensor::<Fused, 2>::from_data(d.clone(), &device);

    let (g, u, dh) = (data(vec![33, 70], 41, 3.0), data(vec![33, 70], 42, 1.0), data(vec![33, 70], 43, 1.0));
    same("moe_swiglu", &|| moe_swiglu(f2(&g), f2(&u)).into_data(), moe_swiglu(p2(&g), p2(&u)).into_data());
    let (pg, pu) = Wgpu::moe_swiglu_backward(p2(&g).into_primitive().tensor(), p2(&u).into_primitive().tensor(), p2(&dh).into_primitive().tensor());
    let host = |t| Tensor::<Wgpu, 2>::from_primitive(TensorPrimitive::Float(t)).into_data();
    let fused_backward = |pick_up: bool| {
        let (d_gate, d_up) = Fused::moe_swiglu_backward(f2(&g).into_primitive().tensor(), f2(&u).into_primitive().tensor(), f2(&dh).into_primitive().tensor());
        Tensor::<Fused, 2>::from_primitive(TensorPrimitive::Float(if pick_up { d_up } else { d_gate })).into_data()
    };
    same("moe_swiglu_backward", &|| fused_backward(false), host(pg));
    same("moe_swiglu_backward", &|| fused_backward(true), host(pu));

    // The attention softmax and its backward on a block of 2 heads × 3 queries with a window.
    let block = burn_moe_backend::attention::SoftmaxBlock {
        rows: 6,
        keys: 9,
        queries: 3,
        first_query: 7,
        first_key: 1,
        scale: 0.4,
        window: Some(5),
    };
    let (sc, dp) = (data(vec![6, 9], 60, 2.0), data(vec![6, 9], 61, 1.0));
    let (lse, corr) = (TensorData::new(pseudo_random(6, 62, 1.0), [6]), TensorData::new(pseudo_random(6, 63, 1.0), [6]));
    let p1 = |d: &TensorData| Tensor::<Wgpu, 1>::from_data(d.clone(), &device).into_primitive().tensor();
    let f1 = |d: &TensorData| Tensor::<Fused, 1>::from_data(d.clone(), &device).into_primitive().tensor();
    let host1 = |t| Tensor::<Wgpu, 1>::from_primitive(TensorPrimitive::Float(t)).into_data();
    let (pp, pl) = Wgpu::moe_attention_softmax(p2(&sc).into_primitive().tensor(), &block);
    let fused_softmax = |pick_lse: bool| {
        let (probs, lse) = Fused::moe_attention_softmax(f2(&sc).into_primitive().tensor(), &block);
        if pick_lse {
            Tensor::<Fused, 1>::from_primitive(TensorPrimitive::Float(lse)).into_data()
        } else {
            Tensor::<Fused, 2>::from_primitive(TensorPrimitive::Float(probs)).into_data()
        }
    };
    same("moe_attention_softmax", &|| fused_softmax(false), host(pp));
    same("moe_attention_softmax", &|| fused_softmax(true), host1(pl));
    let (bp, bd) = Wgpu::moe_attention_softmax_backward(p2(&sc).into_primitive().tensor(), p2(&dp).into_primitive().tensor(), p1(&lse), p1(&corr), &block);
    let fused_softmax_backward = |pick_grad: bool| {
        let (probs, d_scores) =
            Fused::moe_attention_softmax_backward(f2(&sc).into_primitive().tensor(), f2(&dp).into_primitive().tensor(), f1(&lse), f1(&corr), &block);
        Tensor::<Fused, 2>::from_primitive(TensorPrimitive::Float(if pick_grad { d_scores } else { probs })).into_data()
    };
    same("moe_attention_softmax_backward", &|| fused_softmax_backward(false), host(bp));
    same("moe_attention_softmax_backward", &|| fused_softmax_backward(true), host(bd));

    // Scatter ops: permute, grouped matmul (both layouts), weight gradient, combine; an empty segment.
    let (n, k, m, e) = (45, 72, 40, 3);
    let offsets = [0usize, 17, 17, 45];
    let (x, w, wt) = (data(vec![n, k], 44, 1.0), data(vec![e, m, k], 45, 0.3), data(vec![e, k, m], 46, 0.3));
    let p3 = |d: &TensorData| Tensor::<Wgpu, 3>::from_data(d.clone(), &device);
    let f3 = |d: &TensorData| Tensor::<Fused, 3>::from_data(d.clone(), &device);
    let rows = TensorData::new((0..n as i32).rev().collect::<Vec<_>>(), [n]);
    let pi = |d: &TensorData| Tensor::<Wgpu, 1, Int>::from_data(d.clone(), &device);
    let fi = |d: &TensorData| Tensor::<Fused, 1, Int>::from_data(d.clone(), &device);
    same("moe_permute", &|| moe_permute(f2(&x), fi(&rows)).into_data(), moe_permute(p2(&x), pi(&rows)).into_data());
    same("moe_grouped_matmul", &|| moe_grouped_matmul(f2(&x), f3(&w), &offsets, true).into_data(), moe_grouped_matmul(p2(&x), p3(&w), &offsets, true).into_data());
    same("moe_grouped_matmul", &|| moe_grouped_matmul(f2(&x), f3(&wt), &offsets, false).into_data(), moe_grouped_matmul(p2(&x), p3(&wt), &offsets, false).into_data());
    let dy = data(vec![n, m], 47, 1.0);
    let wgrad_p = Wgpu::moe_grouped_matmul_weight_grad(p2(&dy).into_primitive().tensor(), p2(&x).into_primitive().tensor(), &offsets);
    let wgrad_f = || {
        let dw = Fused::moe_grouped_matmul_weight_grad(f2(&dy).into_primitive().tensor(), f2(&x).into_primitive().tensor(), &offsets);
        Tensor::<Fused, 3>::from_primitive(TensorPrimitive::Float(dw)).into_data()
    };
    same(
        "moe_grouped_matmul_weight_grad",
        &wgrad_f,
        Tensor::<Wgpu, 3>::from_primitive(TensorPrimitive::Float(wgrad_p)).into_data(),
    );
    let (y, gw) = (data(vec![6, 5], 48, 1.0), data(vec![3, 2], 49, 1.0));
    let slots = TensorData::new(vec![5i32, 0, 2, 3, 1, 4], [6]);
    same("moe_combine", &|| moe_combine(f2(&y), fi(&slots), f2(&gw)).into_data(), moe_combine(p2(&y), pi(&slots), p2(&gw)).into_data());
    // Its backward (the slots are a permutation of y's rows): both gradients, and the plain backend's
    // kernel against the standard-op reference.
    let dout = data(vec![3, 5], 52, 1.0);
    let prim = |t: Tensor<Wgpu, 2>| t.into_primitive().tensor();
    let (cdy, cdw) = Wgpu::moe_combine_backward(prim(p2(&dout)), prim(p2(&y)), pi(&slots).into_primitive(), prim(p2(&gw)));
    let fused_combine_backward = |pick_weights: bool| {
        let f = |t: Tensor<Fused, 2>| t.into_primitive().tensor();
        let (dy, dw) = Fused::moe_combine_backward(f(f2(&dout)), f(f2(&y)), fi(&slots).into_primitive(), f(f2(&gw)));
        Tensor::<Fused, 2>::from_primitive(TensorPrimitive::Float(if pick_weights { dw } else { dy })).into_data()
    };
    let (cdy, cdw) = (host(cdy), host(cdw));
    same("moe_combine_backward", &|| fused_combine_backward(false), cdy.clone());
    same("moe_combine_backward", &|| fused_combine_backward(true), cdw.clone());
    let (rdy, rdw) = burn_moe_backend::ops::reference_combine_backward(p2(&dout), p2(&y), pi(&slots), p2(&gw));
    cdy.assert_approx_eq::<f32>(&rdy.into_data(), burn::tensor::Tolerance::absolute(1e-6));
    cdw.assert_approx_eq::<f32>(&rdw.into_data(), burn::tensor::Tolerance::absolute(1e-5));

    // The router gate's logits and gradient (the cube-per-token and column-chunk kernels), and
    // against Burn's matmul on the plain backend.
    let (gx, gg, gd) = (data(vec![40, 24], 53, 1.0), data(vec![5, 24], 54, 1.0), data(vec![40, 5], 55, 1.0));
    same("moe_gate_logits", &|| moe_gate_logits(f2(&gx), f2(&gg)).into_data(), moe_gate_logits(p2(&gx), p2(&gg)).into_data());
    let gw_p = host(Wgpu::moe_gate_weight_grad(prim(p2(&gd)), prim(p2(&gx))));
    let gw_f = || {
        let f = |t: Tensor<Fused, 2>| t.into_primitive().tensor();
        Tensor::<Fused, 2>::from_primitive(TensorPrimitive::Float(Fused::moe_gate_weight_grad(f(f2(&gd)), f(f2(&gx))))).into_data()
    };
    same("moe_gate_weight_grad", &gw_f, gw_p.clone());
    moe_gate_logits(p2(&gx), p2(&gg)).into_data().assert_approx_eq::<f32>(&p2(&gx).matmul(p2(&gg).transpose()).into_data(), burn::tensor::Tolerance::absolute(1e-5));
    gw_p.assert_approx_eq::<f32>(&p2(&gd).transpose().matmul(p2(&gx)).into_data(), burn::tensor::Tolerance::absolute(1e-5));

    // Block-sparse SDD, DSD, DSᵀD (both output layouts) on a topology with an empty expert.
    let topology = BlockSparseTopology::for_experts(&[17, 0, 28], m, 16).unwrap();
    let xp = data(vec![topology.rows(), k], 50, 1.0);
    let sdd_p = moe_sdd(p2(&xp), p3(&w), &topology, true);
    same("moe_sdd", &|| moe_sdd(f2(&xp), f3(&w), &topology, true).into_data(), sdd_p.clone().into_data());
    let s = sdd_p.into_data();
    same("moe_dsd", &|| moe_dsd(f3(&s), f3(&wt), &topology, true).into_data(), moe_dsd(p3(&s), p3(&wt), &topology, true).into_data());
    let d = data(vec![topology.rows(), k], 51, 1.0);
    for transpose_out in [false, true] {
        same("moe_dstd", &|| moe_dstd(f3(&s), f2(&d), &topology, transpose_out).into_data(), moe_dstd(p3(&s), p2(&d), &topology, transpose_out).into_data());
    }
}

/// The whole model on wgpu with `kernel` (default block size) and `attention` (the chunked kernel in
/// blocks of 3 queries) against the transformers fixture.
fn whole_model_on_wgpu(kernel: MoeKernel, attention: AttentionKernel) {
    let case = fixtures_dir().join("gqa_swa");
    let checkpoint = HfCheckpoint::open(case.join("model")).unwrap();
    let ids = read_input_ids(&case.join("input_ids.safetensors"), checkpoint.config.vocab_size).unwrap();
    let block = (attention == AttentionKernel::Chunked).then_some(3);
    let ours = parity_outputs_with_attention::<Autodiff<Wgpu>>(&checkpoint, ids, true, kernel, (attention, block), &Default::default()).unwrap();
    let expected = read_f32_tensors(&case.join("expected.safetensors"));
    for (key, data) in &ours {
        let got: Vec<f32> = data.iter::<f32>().collect();
        let err = rel_l2(&got, &expected[key].data);
        let tol = if key.starts_with("grad.") { 1e-4 } else { 1e-5 };
        assert!(err <= tol, "{kernel} {attention} {key}: rel err {err:e} > {tol:e}");
    }
}

#[test]
fn whole_model_matches_transformers_on_wgpu_with_scatter_kernels_and_chunked_attention() {
    whole_model_on_wgpu(MoeKernel::Scatter, AttentionKernel::Chunked);
}

#[test]
fn whole_model_matches_transformers_on_wgpu_with_block_sparse_kernels() {
    whole_model_on_wgpu(MoeKernel::BlockSparse, AttentionKernel::Eager);
}

/// Output and q, k, v gradients of `sum(attention · probe)` (grouped-query heads, a window, blocks
/// of 4 queries over 11).
fn chunked_attention<B: AutodiffBackend + MoeBackend>(device: &B::Device, half: bool) -> Vec<Vec<f32>> {
    let ([b, h, kv, s, hd], window) = ([2, 4, 2, 11, 8], Some(6));
    // Values that f16 holds exactly, so the f16 run and the f32 reference start from the same inputs.
    let t = |heads: usize, seed| {
        let v = pseudo_random(b * heads * s * hd, seed, 1.0).into_iter().map(|x| half::f16::from_f32(x).to_f32()).collect::<Vec<_>>();
        Tensor::<B, 4>::from_data(TensorData::new(v, [b, heads, s, hd]), device)
    };
    let (q, k, v) = (t(h, 1).require_grad(), t(kv, 2).require_grad(), t(kv, 3).require_grad());
    let cast = |t: Tensor<B, 4>| if half { t.cast(burn::tensor::DType::F16) } else { t };
    let spec = CausalAttention::new(hd).with_window(window).with_query_block(Some(4));
    let out = causal_attention(cast(q.clone()), cast(k.clone()), cast(v.clone()), &spec).cast(burn::tensor::DType::F32);
    let host = |t: Tensor<B::InnerBackend, 4>| t.into_data().convert::<f32>().iter::<f32>().collect::<Vec<_>>();
    let y = out.clone().into_data().convert::<f32>().iter::<f32>().collect();
    let g = (out * t(h, 4)).sum().backward();
    vec![y, host(q.grad(&g).unwrap()), host(k.grad(&g).unwrap()), host(v.grad(&g).unwrap())]
}

#[test]
fn chunked_attention_on_wgpu_and_fused_wgpu_matches_cpu() {
    let want = chunked_attention::<CpuAutodiff>(&Default::default(), false);
    let plain = chunked_attention::<Autodiff<Wgpu>>(&Default::default(), false);
    let fused = chunked_attention::<Autodiff<burn::backend::Wgpu<f32, i32>>>(&Default::default(), false);
    // In f16 the block products are grouped GEMMs (one segment per key/value group): f16 rounding of
    // the probabilities, outputs and gradients against the f32 reference.
    let half = chunked_attention::<Autodiff<Wgpu>>(&Default::default(), true);
    for (backend, got, bound) in [("wgpu", plain, 1e-5), ("fused wgpu", fused, 1e-5), ("wgpu f16", half, 3e-3)] {
        for (name, (a, b)) in ["output", "dq", "dk", "dv"].iter().zip(got.iter().zip(&want)) {
            let err = rel_l2(a, b);
            assert!(err < bound, "{backend}: {name} rel err {err:e}");
        }
    }
}

/// `moe_linear` and its gradients, and `moe_sum_squares`, on backend `B`: output, `dx`, `dw` of
/// `sum(x·wᵀ ⊙ probe)` (inputs rounded to f16 on the host; in f16 on the device when `half`, where
/// `moe_linear` is a one-segment grouped GEMM), then `Σ x²`. `use_matmul` takes Burn's matmul instead.
fn dense_linear<B: AutodiffBackend + MoeBackend>(device: &B::Device, use_matmul: bool, half: bool) -> Vec<Vec<f32>>
where
    B::InnerBackend: MoeBackend,
{
    let (n, k, m) = (37, 29, 45); // ragged against every tile size
    let f16_values = |len, seed| pseudo_random(len, seed, 1.0).into_iter().map(|v| half::f16::from_f32(v).to_f32()).collect::<Vec<_>>();
    let t2 = |r: usize, c: usize, seed| Tensor::<B, 2>::from_data(TensorData::new(f16_values(r * c, seed), [r, c]), device);
    let (x, w, probe) = (t2(n, k, 31).require_grad(), t2(m, k, 32).require_grad(), t2(n, m, 33));
    let cast = |t: Tensor<B, 2>| if half { t.cast(burn::tensor::DType::F16) } else { t };
    let out = if use_matmul {
        cast(x.clone()).matmul(cast(w.clone()).transpose())
    } else {
        burn_moe_backend::ops::moe_linear(cast(x.clone()), cast(w.clone()))
    }
    .cast(burn::tensor::DType::F32);
    let host = |t: Tensor<B::InnerBackend, 2>| t.into_data().convert::<f32>().iter::<f32>().collect::<Vec<_>>();
    let y = out.clone().into_data().convert::<f32>().iter::<f32>().collect();
    let g = (out * probe).sum().backward();
    let sq = burn_moe_backend::ops::moe_sum_squares(x.clone().inner()).into_data().iter::<f32>().collect();
    vec![y, host(x.grad(&g).unwrap()), host(w.grad(&g).unwrap()), sq]
}

#[test]
fn dense_linear_and_sum_of_squares_on_wgpu_match_matmul_on_cpu() {
    let want = dense_linear::<CpuAutodiff>(&Default::default(), true, false);
    // The ops' CPU default, f32 on wgpu (Burn's matmul), and f16 on wgpu (the grouped GEMM kernels,
    // against f32 products of the same f16 inputs: f16 rounding of outputs and gradients).
    for (backend, got, bound) in [
        ("ndarray", dense_linear::<CpuAutodiff>(&Default::default(), false, false), 1e-5),
        ("wgpu f32", dense_linear::<Autodiff<Wgpu>>(&Default::default(), false, false), 1e-5),
        ("wgpu f16", dense_linear::<Autodiff<Wgpu>>(&Default::default(), false, true), 2e-3),
    ] {
        for (what, (a, b)) in ["output", "dx", "dw", "sum of squares"].iter().zip(got.iter().zip(&want)) {
            let err = rel_l2(a, b);
            assert!(err < bound, "{backend} {what}: rel L2 {err:e}");
        }
    }
    let x: Vec<f64> = pseudo_random(37 * 29, 31, 1.0).into_iter().map(|v| f64::from(half::f16::from_f32(v).to_f32())).collect();
    let host: f64 = x.iter().map(|v| v * v).sum();
    assert!((f64::from(want[3][0]) - host).abs() / host < 1e-5, "sum of squares {} vs host {host}", want[3][0]);
}

/// RMSNorm on backend `B`: output, `dx` and `dw` of `sum(y ⊙ probe)` for a `[2, 5, 300]` input (rows
/// of different scales, 300 values: more than a cube's units). `composed`: the norm written out in
/// Burn tensor ops and differentiated by Burn's autodiff (the model's norm before it became one op;
/// the independent reference); else the op (`moe_rms_norm`) with its own backward pass. Inputs are
/// rounded to f16 on the host; in f16 on the device when `half`.
fn rms_norm_case<B: AutodiffBackend + MoeBackend>(device: &B::Device, composed: bool, half: bool) -> Vec<Vec<f32>> {
    use burn::tensor::DType;
    let (shape, eps) = ([2, 5, 300], 1e-5);
    let len = shape.iter().product::<usize>();
    let f16_values = |v: Vec<f32>| v.into_iter().map(|v| half::f16::from_f32(v).to_f32()).collect::<Vec<_>>();
    let x: Vec<f32> = pseudo_random(len, 41, 1.0).into_iter().enumerate().map(|(i, v)| v * (1 + i / 300 % 4) as f32).collect();
    let x = Tensor::<B, 3>::from_data(TensorData::new(f16_values(x), shape), device).require_grad();
    let w = pseudo_random(300, 42, 0.5).into_iter().map(|v| v + 1.0).collect();
    let w = Tensor::<B, 1>::from_data(TensorData::new(f16_values(w), [300]), device).require_grad();
    let probe = Tensor::<B, 3>::from_data(TensorData::new(pseudo_random(len, 43, 1.0), shape), device);
    let cast = |t: Tensor<B, 3>| if half { t.cast(DType::F16) } else { t };
    let w_in = if half { w.clone().cast(DType::F16) } else { w.clone() };
    let y = if composed {
        let (xin, dtype) = (cast(x.clone()), if half { DType::F16 } else { DType::F32 });
        let xf = xin.cast(DType::F32);
        let rstd = xf.clone().powi_scalar(2).mean_dim(2).add_scalar(eps).sqrt().recip();
        (xf * rstd).cast(dtype) * w_in.reshape([1, 1, 300])
    } else {
        burn_moe_backend::ops::moe_rms_norm(cast(x.clone()), w_in, eps)
    }
    .cast(DType::F32);
    let host = |t: Tensor<B::InnerBackend, 3>| t.into_data().convert::<f32>().iter::<f32>().collect::<Vec<_>>();
    let out = y.clone().into_data().convert::<f32>().iter::<f32>().collect();
    let g = (y * probe).sum().backward();
    let dw = w.grad(&g).unwrap().into_data().convert::<f32>().iter::<f32>().collect();
    vec![out, host(x.grad(&g).unwrap()), dw]
}

#[test]
fn rms_norm_op_matches_the_composed_norm_on_cpu_wgpu_and_fused_wgpu() {
    let want = rms_norm_case::<CpuAutodiff>(&Default::default(), true, false);
    let before = burn_moe_backend::ops::fused_moe_op_count("moe_rms_norm_backward").unwrap();
    // The op's tensor-op default (CPU), the CubeCL kernels in f32 (plain and fusion-wrapped wgpu),
    // and in f16 against the f32 reference (f16 rounding of outputs and gradients).
    for (backend, got, bound) in [
        ("ndarray", rms_norm_case::<CpuAutodiff>(&Default::default(), false, false), 1e-5),
        ("wgpu f32", rms_norm_case::<Autodiff<Wgpu>>(&Default::default(), false, false), 1e-5),
        ("fused wgpu f32", rms_norm_case::<Autodiff<burn::backend::Wgpu<f32, i32>>>(&Default::default(), false, false), 1e-5),
        ("wgpu f16", rms_norm_case::<Autodiff<Wgpu>>(&Default::default(), false, true), 2e-3),
    ] {
        for (what, (a, b)) in ["output", "dx", "dw"].iter().zip(got.iter().zip(&want)) {
            let err = rel_l2(a, b);
            assert!(err < bound, "{backend} RMSNorm {what}: rel L2 {err:e}");
        }
    }
    // The f16 kernel against the f16 composed norm (same roundings, up to the order of the sums).
    let (a, b) = (rms_norm_case::<Autodiff<Wgpu>>(&Default::default(), false, true), rms_norm_case::<Autodiff<Wgpu>>(&Default::default(), true, true));
    assert!(rel_l2(&a[0], &b[0]) < 1e-3, "f16 output vs composed f16: {:e}", rel_l2(&a[0], &b[0]));
    assert!(burn_moe_backend::ops::fused_moe_op_count("moe_rms_norm_backward").unwrap() > before, "fused wgpu did not reach the kernel");
}

/// A frozen scale (LoRA) gets no gradient and the input gradient is unchanged.
#[test]
fn rms_norm_with_a_frozen_scale_skips_its_gradient() {
    type B = Autodiff<Wgpu>;
    let device = Default::default();
    let x = Tensor::<B, 2>::from_data(TensorData::new(pseudo_random(3 * 40, 51, 1.0), [3, 40]), &device).require_grad();
    let w = Tensor::<B, 1>::from_data(TensorData::new(pseudo_random(40, 52, 1.0), [40]), &device);
    let wt = w.clone().require_grad();
    let g_frozen = burn_moe_backend::ops::moe_rms_norm(x.clone(), w, 1e-6).sum().backward();
    let g_free = burn_moe_backend::ops::moe_rms_norm(x.clone(), wt.clone(), 1e-6).sum().backward();
    let dx = |g| x.grad(g).unwrap().into_data().iter::<f32>().collect::<Vec<_>>();
    assert_eq!(dx(&g_frozen), dx(&g_free));
    assert!(wt.grad(&g_free).is_some());
}

/// The LM loss on backend `B`: per-row negative log-likelihoods and the logits' gradient of
/// `Σ nll ⊙ probe` for `[37, 300]` logits (more words than a cube's units) with ordinary targets, the
/// first and last word and the ignore index. `composed`: the loss written out in Burn tensor ops
/// (`log_softmax`, gather, mask; the model's loss before it became one op) under Burn's autodiff;
/// else the op (`moe_cross_entropy`). Logits rounded to f16 on the host; in f16 on the device when
/// `half`.
fn cross_entropy_case<B: AutodiffBackend + MoeBackend>(device: &B::Device, composed: bool, half: bool) -> Vec<Vec<f32>> {
    use burn::tensor::{DType, Int, activation::log_softmax};
    let (n, v) = (37, 300);
    let logits: Vec<f32> = pseudo_random(n * v, 61, 6.0).into_iter().map(|x| half::f16::from_f32(x).to_f32()).collect();
    let logits = Tensor::<B, 2>::from_data(TensorData::new(logits, [n, v]), device).require_grad();
    let t: Vec<i64> = (0..n as i64).map(|r| match r % 5 { 0 => 0, 1 => v as i64 - 1, 2 => -100, _ => r * 13 % v as i64 }).collect();
    let targets = Tensor::<B, 1, Int>::from_data(TensorData::new(t, [n]), device);
    let probe = Tensor::<B, 1>::from_data(TensorData::new(pseudo_random(n, 62, 1.0), [n]), device);
    let input = if half { logits.clone().cast(DType::F16) } else { logits.clone() };
    let nll = if composed {
        let ignored = targets.clone().equal_elem(-100);
        let safe = targets.clone().mask_fill(ignored.clone(), 0);
        log_softmax(input.cast(DType::F32), 1).gather(1, safe.reshape([n, 1])).reshape([n]).neg().mask_fill(ignored, 0.0)
    } else {
        burn_moe_backend::ops::moe_cross_entropy(input, targets)
    };
    let out = nll.clone().into_data().convert::<f32>().iter::<f32>().collect();
    let g = (nll * probe).sum().backward();
    vec![out, logits.grad(&g).unwrap().into_data().convert::<f32>().iter::<f32>().collect()]
}

#[test]
fn cross_entropy_op_matches_the_composed_loss_on_cpu_wgpu_and_fused_wgpu() {
    let want = cross_entropy_case::<CpuAutodiff>(&Default::default(), true, false);
    let before = burn_moe_backend::ops::fused_moe_op_count("moe_cross_entropy_backward").unwrap();
    for (backend, got, bound) in [
        ("ndarray", cross_entropy_case::<CpuAutodiff>(&Default::default(), false, false), 1e-5),
        ("wgpu f32", cross_entropy_case::<Autodiff<Wgpu>>(&Default::default(), false, false), 1e-5),
        ("fused wgpu f32", cross_entropy_case::<Autodiff<burn::backend::Wgpu<f32, i32>>>(&Default::default(), false, false), 1e-5),
        // f16 logits (exact on the host) read as f16: the same losses; the gradient rounded to f16.
        ("wgpu f16", cross_entropy_case::<Autodiff<Wgpu>>(&Default::default(), false, true), 2e-3),
    ] {
        for (what, (a, b)) in ["nll", "dlogits"].iter().zip(got.iter().zip(&want)) {
            let err = rel_l2(a, b);
            assert!(err < bound, "{backend} cross-entropy {what}: rel L2 {err:e}");
        }
    }
    // Ignored rows: zero loss, zero gradient.
    let got = cross_entropy_case::<Autodiff<Wgpu>>(&Default::default(), false, false);
    assert_eq!(got[0][2], 0.0);
    assert!(got[1][2 * 300..3 * 300].iter().all(|&d| d == 0.0));
    assert!(burn_moe_backend::ops::fused_moe_op_count("moe_cross_entropy_backward").unwrap() > before, "fused wgpu did not reach the kernel");
}
