//! Mixed precision (`--dtype bf16|f16`: f32 master weights, half-precision compute) on wgpu, the
//! CPU backend with half types (f16 on Mesa lavapipe in CI; bf16 needs CUDA): the model follows
//! the weights' dtype everywhere (a tensor of another dtype reaching a kernel would read garbage),
//! so a forward and backward pass in f16 must land within f16 rounding of the f32 one, for every
//! MoE kernel; and the trainer's f16 run must follow the f32 run's loss curve.

use std::collections::BTreeMap;
use std::path::Path;

use burn::backend::Autodiff;
use burn::backend::wgpu::WgpuRuntime;
use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, FloatDType, Int, Tensor, TensorData};
use burn_cubecl::CubeBackend;
use burn_moe_backend::{MoeBackend, MoeKernel};
use burn_moe_tests::{pseudo_random, rel_l2};
use clap::Parser;
use mixtral_burn::{MixtralConfig, MixtralForCausalLM};
use trainer::precision::{compute_copy, widen_grads};

type Wgpu = CubeBackend<WgpuRuntime, f32, i32, u32>;

/// Every parameter's dtype and widened gradient, by id.
struct Collect<'a> {
    grads: &'a GradientsParams,
    dtypes: Vec<DType>,
    values: BTreeMap<ParamId, Vec<f32>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Collect<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.dtypes.push(param.val().dtype());
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            assert_eq!(g.dtype(), DType::F32, "widened gradients are f32");
            self.values.insert(param.id, g.into_data().iter::<f32>().collect());
        }
    }
}

struct Pass {
    loss: f64,
    dtypes: Vec<DType>,
    grads: BTreeMap<ParamId, Vec<f32>>,
}

fn pass<B: AutodiffBackend + MoeBackend>(model: &MixtralForCausalLM<B>, device: &B::Device) -> Pass {
    let (b, s) = (2, 24);
    let ids: Vec<i64> = pseudo_random(b * s, 11, 1.0).iter().map(|v| ((v.abs() * 1000.0) as i64) % 259).collect();
    // The first 5 positions of each row are "prompt": masked out of the loss, as the trainer does.
    let labels: Vec<i64> = ids.iter().enumerate().map(|(i, &t)| if i % s < 5 { -100 } else { t }).collect();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, s]), device);
    let labels = Tensor::<B, 2, Int>::from_data(TensorData::new(labels, [b, s]), device);
    let out = model.forward_with_labels(ids, labels);
    assert_eq!(out.loss.dtype(), DType::F32, "the loss is computed in f32 whatever the weights' dtype");
    let loss: f64 = out.loss.clone().into_data().iter::<f64>().next().unwrap();
    let mut grads = GradientsParams::from_grads(out.loss.backward(), model);
    widen_grads(model, &mut grads);
    let mut c = Collect { grads: &grads, dtypes: Vec::new(), values: BTreeMap::new() };
    model.visit(&mut c);
    Pass { loss, dtypes: c.dtypes, grads: c.values }
}

fn check_kernel(kernel: MoeKernel) {
    let device = Default::default();
    let model: MixtralForCausalLM<Autodiff<Wgpu>> = MixtralConfig::tiny().with_moe_kernel(kernel).init_seeded(&device, 3);
    let full = pass(&model, &device);
    let half = pass(&compute_copy(model, FloatDType::F16, None), &device);
    assert!(full.dtypes.iter().all(|&d| d == DType::F32));
    assert!(half.dtypes.iter().all(|&d| d == DType::F16), "{kernel}: the compute copy is f16");
    let loss_err = (half.loss - full.loss).abs() / full.loss;
    assert!(loss_err < 2e-3, "{kernel}: f16 loss {} vs f32 {} (rel {loss_err:.2e})", half.loss, full.loss);
    assert_eq!(full.grads.len(), half.grads.len(), "{kernel}: same parameters have gradients");
    let mut worst = 0.0f64;
    for (id, g32) in &full.grads {
        let err = rel_l2(&half.grads[id], g32);
        worst = worst.max(err);
        assert!(err < 1e-2, "{kernel}: parameter {id}: f16 gradient relative L2 error {err:.2e}");
    }
    eprintln!("{kernel}: loss rel err {loss_err:.2e}, worst gradient rel L2 err {worst:.2e}");
}

#[test]
fn f16_forward_and_backward_match_f32_for_every_kernel() {
    for kernel in [MoeKernel::Reference, MoeKernel::Scatter, MoeKernel::BlockSparse] {
        check_kernel(kernel);
    }
}

fn losses(dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
        .collect()
}

/// The trainer's mixed-precision path runs on the plain CubeCL backend, as the CUDA binary's does
/// (burn-cubecl-fusion 0.21 panics fusing a reduce over half-precision tensors, tracel-ai/burn#5292;
/// the f32 path runs fusion-wrapped — [`trainer_f32_run_on_the_fusion_backend_matches_the_plain_run`]):
/// `--dtype f16` follows `--dtype f32` step by step, full fine-tuning and LoRA on every projection
/// (frozen base stored in f16).
#[test]
fn trainer_f16_run_follows_the_f32_run() {
    type B = Autodiff<Wgpu>;
    for lora in ["none", "all"] {
        let (full, half) = (trainer_losses::<B>(lora, "f32", &[]), trainer_losses::<B>(lora, "float16", &[]));
        assert_eq!(full.len(), 4);
        for (step, (a, b)) in full.iter().zip(&half).enumerate() {
            let err = (a - b).abs() / a;
            assert!(err < 5e-3, "--use-lora {lora} step {}: f16 loss {b} vs f32 {a} (rel {err:.2e})", step + 1);
        }
    }
}

/// The CUDA binary's f32 path: the fusion-wrapped backend (`burn::backend::Wgpu` here, with Burn's
/// `fusion` feature on in this crate), whose MoE ops run the CubeCL kernels as fusion custom ops,
/// trains step for step like the plain backend. With LoRA the bound is looser: AdamW's first step
/// moves every weight by about ±lr whatever its gradient's size, so B entries whose gradients are
/// at rounding level (and round differently in fused kernels) still move by a full step.
#[test]
fn trainer_f32_run_on_the_fusion_backend_matches_the_plain_run() {
    for (lora, bound) in [("none", 1e-5), ("all", 1e-3)] {
        let plain = trainer_losses::<Autodiff<Wgpu>>(lora, "f32", &[]);
        let fused = trainer_losses::<Autodiff<burn::backend::Wgpu>>(lora, "f32", &[]);
        assert_eq!(fused.len(), 4);
        for (step, (a, b)) in plain.iter().zip(&fused).enumerate() {
            let err = (a - b).abs() / a;
            assert!(err < bound, "--use-lora {lora} step {}: fused loss {b} vs plain {a} (rel {err:.2e})", step + 1);
        }
    }
}

/// `--fused-adamw` (the default) on a CubeCL backend — the optimizer's fused kernel instead of
/// burn-optim's tensor ops (`--fused-adamw false`) — trains step for step like burn-optim's AdamW.
#[test]
fn trainer_fused_adamw_trains_like_burn_optims_adamw() {
    type B = Autodiff<Wgpu>;
    let ops = trainer_losses::<B>("none", "f32", &["--fused-adamw", "false"]);
    let fused = trainer_losses::<B>("none", "f32", &[]);
    assert_eq!(fused.len(), 4);
    for (step, (a, b)) in ops.iter().zip(&fused).enumerate() {
        let err = (a - b).abs() / a;
        assert!(err < 1e-5, "step {}: --fused-adamw loss {b} vs {a} (rel {err:.2e})", step + 1);
    }
    // Step 1 is before any update; the later steps are where the optimizers act.
    assert!(ops[3] < ops[0], "the run trains: {ops:?}");
}

/// Under `--dtype f16` the fused AdamW reads the f16 gradients itself and writes the next step's f16
/// weights (no widening pass, no cast of the weights before the forward pass); burn-optim's tensor
/// ops (`--fused-adamw false`) widen and cast as separate passes. The runs follow each other step for
/// step — a stale or missing copy would put the forward pass a step behind — and so does a run with
/// gradient accumulation, where the gradients are widened to be summed, and one with per-layer
/// recomputation, whose schedule takes the copies and keeps the gradients narrow too.
#[test]
fn trainer_f16_fused_adamw_folds_widening_and_copy() {
    type B = Autodiff<Wgpu>;
    for extra in [&[][..], &["--gradient-accumulation-steps", "2"][..], &["--gradient-checkpointing"][..]] {
        let ops = trainer_losses::<B>("none", "float16", &[&["--fused-adamw", "false"][..], extra].concat());
        let fused = trainer_losses::<B>("none", "float16", extra);
        assert_eq!(fused.len(), 4);
        for (step, (a, b)) in ops.iter().zip(&fused).enumerate() {
            let err = (a - b).abs() / a;
            assert!(err < 1e-5, "{extra:?} step {}: fused loss {b} vs tensor-op AdamW {a} (rel {err:.2e})", step + 1);
        }
        assert!(ops[3] < ops[0], "the run trains: {ops:?}");
    }
}

/// Per-step losses of a 4-step tiny-model trainer run on `B` (scatter kernels), with `extra` flags.
fn trainer_losses<B>(lora: &str, dtype: &str, extra: &[&str]) -> Vec<f64>
where
    B: AutodiffBackend
        + MoeBackend
        + burn_moe_backend::MemoryBackend
        + burn_moe_backend::dist::CollectiveBackend<Wire = <B as AutodiffBackend>::InnerBackend>,
    B::InnerBackend: MoeBackend,
{
    let dir = tempfile::tempdir().unwrap();
    let args = trainer::Args::try_parse_from([
        "trainer",
        "--output-dir",
        dir.path().to_str().unwrap(),
        "--max-steps",
        "4",
        "--per-device-train-batch-size",
        "2",
        "--learning-rate",
        "1e-3",
        "--moe-kernel",
        "scatter",
        "--use-lora",
        lora,
        "--dtype",
        dtype,
    ]
    .into_iter()
    .chain(extra.iter().copied()))
    .unwrap();
    trainer::train::train::<B>(&args, &Default::default()).unwrap();
    losses(dir.path())
}
