//! Expert LoRA against an independent per-expert loop of plain tensor ops: 2 experts, D = 128 (in),
//! F = 16 (out of w1/w3), r = 16, α = 32, 10 tokens forced onto experts [0,0,0,0,1,1,1,1,1,1]; output
//! and the A/B gradients of all three projections, on every kernel. Also: zero-B adapters leave the
//! output unchanged, and with adapters on, an AdamW step updates only the adapters and keeps optimizer
//! state only for them.

use burn::backend::{Autodiff, NdArray};
use burn::module::{AutodiffModule, Module, ModuleVisitor, Param, ParamId};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::{Int, Tensor, TensorData, activation::silu, backend::Backend};
use burn_moe_backend::{DMoe, LoraConfig, MoeKernel};

mod common;
use common::values;

type B = NdArray<f32>;
type AB = Autodiff<B>;

const E: usize = 2;
const D: usize = 128;
const F: usize = 16;
const T: usize = 10;
const ROUTE: [i64; T] = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1];


fn t<Bk: Backend, const N: usize>(v: Vec<f32>, shape: [usize; N]) -> Tensor<Bk, N> {
    Tensor::from_data(TensorData::new(v, shape), &Default::default())
}

fn config() -> LoraConfig {
    LoraConfig::new().with_r(16).with_alpha(32.0).with_dropout(0.0)
}

/// A layer with random base weights and adapters whose B is random too (a zero B would hide bugs in
/// the delta).
fn layer<Bk: burn_moe_backend::MoeBackend>(kernel: MoeKernel, block: usize, random_b: bool) -> DMoe<Bk> {
    let moe = DMoe::<Bk>::from_weights(
        t(values(E * D, 1, 0.1), [E, D]),
        t(values(E * F * D, 2, 0.1), [E, F, D]),
        t(values(E * F * D, 3, 0.1), [E, F, D]),
        t(values(E * D * F, 4, 0.1), [E, D, F]),
        1,
        kernel,
    )
    .with_block_size(block)
    .with_lora(&config(), 7);
    if !random_b {
        return moe;
    }
    let mut moe = moe;
    let lora = moe.lora.as_mut().unwrap();
    lora.w1.b = Param::from_tensor(t(values(E * F * 16, 11, 0.2), [E, F, 16]));
    lora.w3.b = Param::from_tensor(t(values(E * F * 16, 12, 0.2), [E, F, 16]));
    lora.w2.b = Param::from_tensor(t(values(E * D * 16, 13, 0.2), [E, D, 16]));
    moe
}

fn inputs<Bk: Backend>() -> (Tensor<Bk, 2>, Tensor<Bk, 2>, Tensor<Bk, 2, Int>) {
    let x = t(values(T * D, 21, 1.0), [T, D]);
    let w = t(vec![1.0; T], [T, 1]);
    let experts = Tensor::from_data(TensorData::new(ROUTE.to_vec(), [T, 1]), &Default::default());
    (x, w, experts)
}

/// The same computation written out: for each expert, its tokens through
/// `W2 (silu(W1 x + s B1 A1 x) ⊙ (W3 x + s B3 A3 x)) + s B2 A2 h`.
fn independent<Bk: Backend>(moe: &DMoe<Bk>, x: Tensor<Bk, 2>) -> Tensor<Bk, 2> {
    let l = moe.lora.as_ref().unwrap();
    let s = 32.0 / 16.0;
    let m = |w: &Param<Tensor<Bk, 3>>, e: usize| {
        let [_, a, b] = w.dims();
        w.val().slice([e..e + 1]).reshape([a, b])
    };
    let mut rows = Vec::new();
    for e in 0..E {
        let idx: Vec<i64> = (0..T as i64).filter(|&i| ROUTE[i as usize] == e as i64).collect();
        let n = idx.len();
        let xe = x.clone().select(0, Tensor::from_data(TensorData::new(idx, [n]), &x.device()));
        let proj = |xin: Tensor<Bk, 2>, w, a, b| {
            xin.clone().matmul(m(w, e).transpose()) + xin.matmul(m(a, e).transpose()).matmul(m(b, e).transpose()) * s
        };
        let g = proj(xe.clone(), &moe.w1, &l.w1.a, &l.w1.b);
        let u = proj(xe, &moe.w3, &l.w3.a, &l.w3.b);
        rows.push(proj(silu(g) * u, &moe.w2, &l.w2.a, &l.w2.b));
    }
    // Tokens are sorted by expert already, so concatenation restores their order.
    Tensor::cat(rows, 0)
}

fn assert_close(what: &str, got: Vec<f32>, want: Vec<f32>) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    assert!(scale > 1e-6, "{what}: reference is all zeros, the comparison would be vacuous");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let rel = (g - w).abs() / scale;
        assert!(rel <= 1e-5, "{what}[{i}]: {g} vs {w} (rel {rel:e})");
    }
}

fn data<Bk: Backend, const N: usize>(t: Tensor<Bk, N>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

#[test]
fn expert_lora_output_and_gradients_match_a_per_expert_loop_on_every_kernel() {
    // Block sizes 8 (two blocks per expert row, F = 2·8) and 32 (F padded to 32) exercise the
    // dense ↔ block-layout moves of the block-sparse path; 16 is one exact block.
    let cases = [(MoeKernel::Reference, 16), (MoeKernel::Scatter, 16), (MoeKernel::BlockSparse, 16), (MoeKernel::BlockSparse, 8), (MoeKernel::BlockSparse, 32)];
    for (kernel, block) in cases {
        let kernel_name = format!("{kernel}/{block}");
        let moe = layer::<AB>(kernel, block, true);
        let (x, w, experts) = inputs::<AB>();
        let got = moe.experts(x.clone(), w, experts);
        let want = independent(&moe, x);
        assert_close(&format!("{kernel_name} output"), data(got.clone()), data(want.clone()));

        let probe: Tensor<AB, 2> = t(values(T * D, 31, 1.0), [T, D]);
        let g_got = (got * probe.clone()).sum().backward();
        let g_want = (want * probe).sum().backward();
        let l = moe.lora.as_ref().unwrap();
        for (name, p) in [
            ("w1.a", &l.w1.a),
            ("w1.b", &l.w1.b),
            ("w3.a", &l.w3.a),
            ("w3.b", &l.w3.b),
            ("w2.a", &l.w2.a),
            ("w2.b", &l.w2.b),
        ] {
            let a = p.grad(&g_got).unwrap_or_else(|| panic!("{kernel_name}: no gradient for {name}"));
            let b = p.grad(&g_want).unwrap();
            assert_close(&format!("{kernel_name} d{name}"), data(a), data(b));
        }
        // Frozen base: no gradient reaches the base weights or the router.
        assert!(moe.w1.grad(&g_got).is_none() && moe.w2.grad(&g_got).is_none() && moe.gate.grad(&g_got).is_none());
    }
}

#[test]
fn fresh_adapters_leave_the_output_unchanged() {
    for kernel in MoeKernel::ALL {
        let base = DMoe::<B>::from_weights(
            t(values(E * D, 1, 0.1), [E, D]),
            t(values(E * F * D, 2, 0.1), [E, F, D]),
            t(values(E * F * D, 3, 0.1), [E, F, D]),
            t(values(E * D * F, 4, 0.1), [E, D, F]),
            1,
            kernel,
        )
        .with_block_size(16);
        let adapted = layer::<B>(kernel, 16, false);
        let (x, w, experts) = inputs::<B>();
        let plain = data(base.experts(x.clone(), w.clone(), experts.clone()));
        let with = data(adapted.experts(x, w, experts));
        assert_eq!(plain, with, "{kernel}: zero-B adapters changed the output");
        let a = data(adapted.lora.as_ref().unwrap().w1.a.val());
        let bound = 1.0 / (D as f32).sqrt();
        assert!(a.iter().all(|v| v.abs() <= bound) && a.iter().any(|v| v.abs() > bound / 2.0), "A not ±1/√in uniform");
    }
}

struct Ids(Vec<ParamId>);

impl<Bk: Backend> ModuleVisitor<Bk> for Ids {
    fn visit_float<const N: usize>(&mut self, param: &Param<Tensor<Bk, N>>) {
        self.0.push(param.id);
    }
}

fn ids<M: Module<AB>>(m: &M) -> Vec<ParamId> {
    let mut v = Ids(Vec::new());
    m.visit(&mut v);
    v.0
}

#[test]
fn adamw_updates_only_the_adapters() {
    let moe = layer::<AB>(MoeKernel::Scatter, 16, false);
    let before = moe.clone().valid();
    let adapter_ids = ids(moe.lora.as_ref().unwrap());
    let mut optim = AdamWConfig::new().init::<AB, DMoe<AB>>();
    let (x, _, _) = inputs::<AB>();
    let out = moe.forward(x);
    let grads = GradientsParams::from_grads(out.output.powi_scalar(2).sum().backward(), &moe);
    let moe = optim.step(1e-2, moe, grads);
    let after = moe.valid();

    let record = optim.to_record();
    let mut keys: Vec<_> = record.keys().map(|k| k.to_string()).collect();
    let mut want: Vec<_> = adapter_ids.iter().map(|k| k.to_string()).collect();
    keys.sort();
    want.sort();
    assert_eq!(keys, want, "optimizer state must exist for exactly the 6 adapter tensors");

    for (name, b, a) in [("gate", before.gate.val().into_data(), after.gate.val().into_data())]
        .into_iter()
        .chain([("w1", before.w1.val(), after.w1.val()), ("w3", before.w3.val(), after.w3.val()), ("w2", before.w2.val(), after.w2.val())]
            .map(|(n, b, a)| (n, b.into_data(), a.into_data())))
    {
        assert_eq!(b, a, "base weight {name} changed");
    }
    let (lb, la) = (before.lora.unwrap(), after.lora.unwrap());
    // B starts at zero, so the first step moves every B; A gets no gradient while B is zero.
    for (name, b, a) in [("w1.b", lb.w1.b.val(), la.w1.b.val()), ("w3.b", lb.w3.b.val(), la.w3.b.val()), ("w2.b", lb.w2.b.val(), la.w2.b.val())] {
        assert_ne!(b.into_data(), a.into_data(), "adapter {name} did not change");
    }
}

#[test]
fn merged_adapters_compute_the_adapted_layer() {
    for kernel in [MoeKernel::Reference, MoeKernel::Scatter] {
        let moe = layer::<B>(kernel, 16, true);
        let (x, w, experts) = inputs::<B>();
        let adapted = data(moe.experts(x.clone(), w.clone(), experts.clone()));
        let merged = moe.merge_lora();
        assert!(merged.lora.is_none());
        assert_close(&format!("{kernel} merged"), data(merged.experts(x, w, experts)), adapted);
    }
}

/// Under mixed precision the frozen base is stored in the compute dtype and the trained adapters in
/// f32: the merge is computed in the adapters' dtype (f64 stands in for bf16, which NdArray lacks;
/// the f32 base values are exact in f64, so the merge must equal the all-f32 one).
#[test]
fn adapters_merge_into_a_base_stored_in_another_dtype() {
    use burn::tensor::DType;
    let moe = layer::<B>(MoeKernel::Reference, 16, true);
    let want = moe.clone().merge_lora();
    let mut stored = moe;
    for p in [&mut stored.w1, &mut stored.w3, &mut stored.w2] {
        *p = p.clone().map(|t| t.cast(DType::F64));
    }
    let got = stored.merge_lora();
    for (name, g, w) in [("w1", got.w1.val(), want.w1.val()), ("w3", got.w3.val(), want.w3.val()), ("w2", got.w2.val(), want.w2.val())] {
        assert_eq!(g.dtype(), DType::F32, "{name}: merged in the adapter's dtype");
        assert_close(name, g.into_data().to_vec::<f32>().unwrap(), w.into_data().to_vec::<f32>().unwrap());
    }
}
