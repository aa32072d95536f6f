//! Expert LoRA against PEFT itself: the fixture (`tests/fixtures/make_peft_fixture.py`, run with
//! torch + peft) wraps two SwiGLU experts' `w1/w3/w2` `nn.Linear`s in PEFT LoRA (r = 16, α = 32),
//! routes 10 tokens onto experts [0,0,0,0,1,1,1,1,1,1] and records the output and the gradients of
//! every `lora_A` / `lora_B`. Our grouped computation (stacked `[E, r, in]` / `[E, out, r]`
//! adapters) must give the same numbers on every kernel.

use burn::module::Param;
use burn::tensor::{Int, Tensor, TensorData, backend::Backend};
use burn_moe_backend::{DMoe, LoraConfig, MoeKernel};
use burn_moe_tests::{CpuAutodiff, HostTensor, fixtures_dir, read_f32_tensors};

const ROUTE: [i64; 10] = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1];

fn tensor<B: Backend, const N: usize>(t: &HostTensor) -> Tensor<B, N> {
    let shape: [usize; N] = t.shape.as_slice().try_into().expect("fixture tensor rank");
    Tensor::from_data(TensorData::new(t.data.clone(), shape), &Default::default())
}

/// `max |got − want| / max |want|`.
fn max_rel(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
    assert!(scale > 1e-6, "vacuous comparison: the reference is zero");
    got.iter().zip(want).map(|(g, w)| (g - w).abs() as f64).fold(0.0, f64::max) / scale
}

#[test]
fn expert_lora_matches_peft_on_every_kernel() {
    type B = CpuAutodiff;
    let fx = read_f32_tensors(&fixtures_dir().join("peft_expert_lora/peft.safetensors"));
    let get = |k: &str| fx.get(k).unwrap_or_else(|| panic!("fixture tensor {k} missing"));
    let (t, d) = (get("x").shape[0], get("x").shape[1]);
    let e = get("base.w1").shape[0];
    for (kernel, block) in [(MoeKernel::Reference, 16), (MoeKernel::Scatter, 16), (MoeKernel::BlockSparse, 16), (MoeKernel::BlockSparse, 32)] {
        let gate = Tensor::<B, 2>::zeros([e, d], &Default::default());
        let mut moe = DMoe::<B>::from_weights(gate, tensor(get("base.w1")), tensor(get("base.w3")), tensor(get("base.w2")), 1, kernel)
            .with_block_size(block)
            .with_lora(&LoraConfig::new().with_r(16).with_alpha(32.0).with_dropout(0.0), 0);
        let lora = moe.lora.as_mut().unwrap();
        for (name, adapter) in [("w1", &mut lora.w1), ("w3", &mut lora.w3), ("w2", &mut lora.w2)] {
            adapter.a = Param::from_tensor(tensor::<B, 3>(get(&format!("lora.{name}.A"))).require_grad());
            adapter.b = Param::from_tensor(tensor::<B, 3>(get(&format!("lora.{name}.B"))).require_grad());
        }
        let x = tensor::<B, 2>(get("x"));
        let weights = Tensor::<B, 2>::ones([t, 1], &Default::default());
        let experts = Tensor::<B, 2, Int>::from_data(TensorData::new(ROUTE.to_vec(), [t, 1]), &Default::default());
        let out = moe.experts(x, weights, experts);
        let host = |v: Tensor<_, 2>| v.into_data().iter::<f32>().collect::<Vec<_>>();
        let err = max_rel(&host(out.clone().inner()), &get("out").data);
        assert!(err < 1e-5, "{kernel}/{block}: output vs PEFT: rel {err:.2e}");
        let grads = (out * tensor::<B, 2>(get("probe"))).sum().backward();
        let lora = moe.lora.as_ref().unwrap();
        for (name, adapter) in [("w1", &lora.w1), ("w3", &lora.w3), ("w2", &lora.w2)] {
            for (part, p) in [("A", &adapter.a), ("B", &adapter.b)] {
                let g: Vec<f32> = p.grad(&grads).expect("adapter gradient").into_data().iter::<f32>().collect();
                let err = max_rel(&g, &get(&format!("grad.{name}.{part}")).data);
                assert!(err < 1e-5, "{kernel}/{block}: d lora.{name}.{part} vs PEFT: rel {err:.2e}");
            }
        }
    }
}
