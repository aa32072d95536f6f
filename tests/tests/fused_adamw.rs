//! `FusedAdamW` against burn-optim's `AdamW` (the same algorithm, one fused pass per parameter): on
//! burn-ndarray (the tensor-op default) bit for bit, on wgpu (the CubeCL kernel, Mesa lavapipe in CI)
//! to f32 rounding — over several steps, with weight decay, on parameters of rank 1, 2 and 3.

use burn::backend::Autodiff;
use burn::backend::wgpu::WgpuRuntime;
use burn::module::{Module, Param};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use burn_cubecl::CubeBackend;
use burn_moe_backend::{FusedAdamW, MoeBackend};
use burn_moe_tests::{CpuAutodiff, pseudo_random, rel_l2};

#[derive(Module, Debug)]
struct Weights<B: burn::tensor::backend::Backend> {
    a: Param<Tensor<B, 1>>,
    b: Param<Tensor<B, 2>>,
    c: Param<Tensor<B, 3>>,
}

fn weights<B: burn::tensor::backend::Backend>(device: &B::Device) -> Weights<B> {
    let t = |n: usize, seed| TensorData::new(pseudo_random(n, seed, 0.5), [n]);
    Weights {
        a: Param::from_tensor(Tensor::from_data(t(7, 1), device)),
        b: Param::from_tensor(Tensor::<B, 1>::from_data(t(24, 2), device).reshape([4, 6])),
        c: Param::from_tensor(Tensor::<B, 1>::from_data(t(60, 3), device).reshape([3, 4, 5])),
    }
}

/// A loss whose gradients change from step to step (not just in scale).
fn loss<B: AutodiffBackend>(w: &Weights<B>) -> Tensor<B, 1> {
    let a = w.a.val();
    let b = w.b.val();
    let c = w.c.val();
    (a.clone() * a.clone() * a).sum() + (b.clone() * b.sin()).sum() + (c.clone() * c).sum().sqrt()
}

fn flat<B: burn::tensor::backend::Backend>(w: &Weights<B>) -> Vec<f32> {
    let mut out = w.a.val().into_data().to_vec::<f32>().unwrap();
    out.extend(w.b.val().into_data().to_vec::<f32>().unwrap());
    out.extend(w.c.val().into_data().to_vec::<f32>().unwrap());
    out
}

/// Four steps of each optimizer from the same weights; the weights after each step.
fn run<B: AutodiffBackend>(device: &B::Device) -> (Vec<Vec<f32>>, Vec<Vec<f32>>)
where
    B::InnerBackend: MoeBackend,
{
    let (beta_1, beta_2, epsilon, weight_decay) = (0.8, 0.95, 1e-6, 0.1);
    let mut burn_opt = AdamWConfig::new()
        .with_beta_1(beta_1)
        .with_beta_2(beta_2)
        .with_epsilon(epsilon)
        .with_weight_decay(weight_decay)
        .init::<B, Weights<B>>();
    let mut fused = FusedAdamW { beta_1, beta_2, epsilon, weight_decay, fused: true, ..Default::default() }.init::<B, Weights<B>>();
    let (mut x, mut y) = (weights::<B>(device), weights::<B>(device));
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for step in 0..4 {
        let lr = 0.05 / (step + 1) as f64;
        let gx = GradientsParams::from_grads(loss(&x).backward(), &x);
        x = burn_opt.step(lr, x, gx);
        let gy = GradientsParams::from_grads(loss(&y).backward(), &y);
        y = fused.step(lr, y, gy);
        xs.push(flat(&x));
        ys.push(flat(&y));
    }
    (xs, ys)
}

#[test]
fn the_default_path_is_burn_optims_adamw_bit_for_bit() {
    let (burn, fused) = run::<CpuAutodiff>(&Default::default());
    for (step, (a, b)) in burn.iter().zip(&fused).enumerate() {
        assert_eq!(a, b, "step {}", step + 1);
    }
    // The weights did move (the comparison is not of untouched tensors).
    assert!(rel_l2(&burn[3], &flat(&weights::<CpuAutodiff>(&Default::default()))) > 1e-2);
}

#[test]
fn the_cubecl_kernel_matches_burn_optims_adamw() {
    type Wgpu = Autodiff<CubeBackend<WgpuRuntime, f32, i32, u32>>;
    let (burn, fused) = run::<Wgpu>(&Default::default());
    for (step, (a, b)) in burn.iter().zip(&fused).enumerate() {
        let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs() / x.abs().max(1e-3)).fold(0.0f32, f32::max);
        assert!(worst <= 2e-6, "step {}: worst relative difference {worst:e}", step + 1);
    }
    assert!(rel_l2(&burn[3], &flat(&weights::<Wgpu>(&Default::default()))) > 1e-2);
}

/// Four steps of `FusedAdamW` (`fused` as given, ε large enough that the gradients' scale shows in
/// the update) with its gradient scale at `scale`, on `loss · loss_factor`; the weights after each.
fn run_scaled<B: AutodiffBackend>(device: &B::Device, fused: bool, scale: f32, loss_factor: f32) -> Vec<Vec<f32>>
where
    B::InnerBackend: MoeBackend,
{
    let opt = FusedAdamW { epsilon: 0.1, weight_decay: 0.1, fused, ..Default::default() };
    opt.grad_scale.set(scale);
    let mut opt = opt.init::<B, Weights<B>>();
    let mut w = weights::<B>(device);
    let mut out = Vec::new();
    for step in 0..4 {
        let g = GradientsParams::from_grads(loss(&w).mul_scalar(loss_factor).backward(), &w);
        w = opt.step(0.05 / (step + 1) as f64, w, g);
        out.push(flat(&w));
    }
    out
}

/// Gradient clipping folded into the update (`GradScale`) gives exactly what scaled gradients give:
/// a factor of ¼ on the gradients against the loss scaled by ¼ (a power of two, so the gradients
/// are exactly ¼ of the unscaled ones), on the tensor-op path (ndarray) and the kernel (wgpu). The
/// unscaled run differs, so the factor is not ignored.
#[test]
fn a_gradient_scale_equals_scaled_gradients() {
    type Wgpu = Autodiff<CubeBackend<WgpuRuntime, f32, i32, u32>>;
    for fused in [false, true] {
        let folded = run_scaled::<CpuAutodiff>(&Default::default(), fused, 0.25, 1.0);
        assert_eq!(folded, run_scaled::<CpuAutodiff>(&Default::default(), fused, 1.0, 0.25), "ndarray, fused {fused}");
        let unscaled = run_scaled::<CpuAutodiff>(&Default::default(), fused, 1.0, 1.0);
        assert!(rel_l2(&folded[3], &unscaled[3]) > 1e-4, "the scale must change the update");
    }
    let folded = run_scaled::<Wgpu>(&Default::default(), true, 0.25, 1.0);
    assert_eq!(folded, run_scaled::<Wgpu>(&Default::default(), true, 1.0, 0.25), "wgpu kernel");
}

/// Four steps on wgpu of `FusedAdamW` (`fused` as given) fed f16 gradients (`narrow`): with
/// `copies`, the optimizer that leaves f16 copies; without, the gradients widened to f32 first. The
/// weights after each step, and the f16 values of the copies (or of the weights cast).
fn run_narrow(fused: bool, copies: bool, narrow: bool) -> Vec<(Vec<f32>, Vec<f32>)> {
    use burn::tensor::FloatDType;
    use burn_moe_backend::ComputeCopies;
    type Wgpu = Autodiff<CubeBackend<WgpuRuntime, f32, i32, u32>>;
    type Inner = CubeBackend<WgpuRuntime, f32, i32, u32>;
    let device = Default::default();
    let opt = FusedAdamW { epsilon: 1e-6, weight_decay: 0.1, fused, ..Default::default() };
    let store = ComputeCopies::<Inner>::new(FloatDType::F16);
    let mut opt = if copies { opt.init_with_copies::<Wgpu, Weights<Wgpu>>(store.clone()) } else { opt.init::<Wgpu, Weights<Wgpu>>() };
    let mut w = weights::<Wgpu>(&device);
    let mut out = Vec::new();
    for step in 0..4 {
        let mut g = GradientsParams::from_grads(loss(&w).backward(), &w);
        // The narrow gradients a half-precision backward pass gives, widened back when the
        // optimizer is not the one to do it.
        macro_rules! narrow {
            ($p:expr, $d:literal) => {{
                let t = g.remove::<Inner, $d>($p.id).unwrap().cast(FloatDType::F16);
                g.register::<Inner, $d>($p.id, if copies { t } else { t.cast(FloatDType::F32) });
            }};
        }
        if narrow {
            narrow!(w.a, 1);
            narrow!(w.b, 2);
            narrow!(w.c, 3);
        }
        w = opt.step(0.05 / (step + 1) as f64, w, g);
        let half = |t: Tensor<Inner, 1>| t.cast(FloatDType::F16).cast(FloatDType::F32).into_data().to_vec::<f32>().unwrap();
        let copy = if copies {
            assert_eq!(store.len(), 3, "step {}: a copy per parameter", step + 1);
            let mut v = half(store.get::<1>(w.a.id, &w.a.val().shape()).unwrap().cast(FloatDType::F32));
            v.extend(half(store.get::<2>(w.b.id, &w.b.val().shape()).unwrap().cast(FloatDType::F32).flatten(0, 1)));
            v.extend(half(store.get::<3>(w.c.id, &w.c.val().shape()).unwrap().cast(FloatDType::F32).flatten(0, 2)));
            v
        } else {
            let mut v = half(w.a.val().inner());
            v.extend(half(w.b.val().inner().flatten(0, 1)));
            v.extend(half(w.c.val().inner().flatten(0, 2)));
            v
        };
        out.push((flat(&w), copy));
    }
    out
}

/// Mixed precision's widening and compute copy folded into the update are exact: f16 gradients read
/// by the update and the copies it writes give bit for bit the weights of widening the gradients
/// first and the f16 values of casting the new weights — in the CubeCL kernel and in the tensor-op
/// default. And they are not the f32-gradient run's (the narrow gradients do reach the update).
#[test]
fn narrow_gradients_and_compute_copies_are_exact() {
    for fused in [true, false] {
        let (folded, separate) = (run_narrow(fused, true, true), run_narrow(fused, false, true));
        for (step, (a, b)) in folded.iter().zip(&separate).enumerate() {
            assert_eq!(a.0, b.0, "fused {fused}, step {}: weights", step + 1);
            assert_eq!(a.1, b.1, "fused {fused}, step {}: compute copies", step + 1);
        }
    }
    let (narrow, wide) = (run_narrow(true, true, true), run_narrow(true, true, false));
    assert!(rel_l2(&narrow[3].0, &wide[3].0) > 1e-6, "the f16 gradients must reach the update");
}
