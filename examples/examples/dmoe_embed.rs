//! Embedding the dropless MoE layer in your own Burn model (not Mixtral) and training it on the CPU.
//!
//! ```text
//! cargo run -p examples --example dmoe_embed -- [--kernel reference|scatter|block-sparse] [--steps 300]
//! ```
//!
//! The model is `input → Linear → DMoe (8 experts, top-2) → Linear`, fitted to a function that behaves
//! differently in different regions of its input (a job where experts can specialise). The loss is
//! mean squared error plus the layer's load-balancing loss; the run prints both and the expert load.

use anyhow::Result;
use burn::backend::{Autodiff, NdArray};
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::{Tensor, TensorData, backend::Backend};
use burn_moe_backend::{DMoe, DMoeConfig, MoeBackend, MoeKernel};
use clap::Parser;

#[derive(Parser, Debug)]
struct Args {
    /// Expert-computation path.
    #[arg(long, default_value = "scatter")]
    kernel: MoeKernel,
    /// Optimizer steps.
    #[arg(long, default_value_t = 300)]
    steps: usize,
}

/// A regression model with a mixture-of-experts hidden layer.
#[derive(Module, Debug)]
struct MoeRegressor<B: Backend> {
    input: Linear<B>,
    moe: DMoe<B>,
    output: Linear<B>,
}

impl<B: MoeBackend> MoeRegressor<B> {
    fn new(kernel: MoeKernel, device: &B::Device) -> Self {
        Self {
            input: LinearConfig::new(2, 32).init(device),
            moe: DMoeConfig::new(32, 64, 8, 2).with_kernel(kernel).init(device),
            output: LinearConfig::new(32, 1).init(device),
        }
    }

    /// # Shapes
    /// - `x`: `[N, 2]` → prediction `[N, 1]`, aux loss `[1]`, tokens per expert `[E]`
    fn forward(&self, x: Tensor<B, 2>) -> (Tensor<B, 2>, Tensor<B, 1>, Tensor<B, 1>) {
        let h = self.input.forward(x);
        let moe = self.moe.forward(h.clone());
        let y = self.output.forward(h + moe.output);
        (y, moe.aux.loss(), moe.aux.token_counts)
    }
}

/// Points on a grid of [-1, 1]² and a target that changes form by quadrant.
fn data<B: Backend>(n: usize, device: &B::Device) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let mut xs = Vec::with_capacity(2 * n);
    let mut ys = Vec::with_capacity(n);
    for i in 0..n {
        let a = (i as f32 * 0.618_034).fract() * 2.0 - 1.0;
        let b = (i as f32 * 0.414_213_5).fract() * 2.0 - 1.0;
        let y = match (a > 0.0, b > 0.0) {
            (true, true) => (3.0 * a).sin(),
            (true, false) => a * b,
            (false, true) => (b * b) - 0.5,
            (false, false) => (2.0 * (a + b)).cos() * 0.5,
        };
        xs.extend([a, b]);
        ys.push(y);
    }
    (
        Tensor::from_data(TensorData::new(xs, [n, 2]), device),
        Tensor::from_data(TensorData::new(ys, [n, 1]), device),
    )
}

fn main() -> Result<()> {
    type B = Autodiff<NdArray<f32>>;
    let args = Args::parse();
    let device = Default::default();
    B::seed(&device, 7);
    let mut model = MoeRegressor::<B>::new(args.kernel, &device);
    let mut optim = AdamConfig::new().init();
    let (x, y) = data::<B>(512, &device);
    let mut first = None;
    for step in 1..=args.steps {
        let (pred, aux, load) = model.forward(x.clone());
        let mse = (pred - y.clone()).powi_scalar(2).mean();
        let loss = mse.clone() + aux.clone().mul_scalar(0.01);
        let mse_value: f32 = mse.into_scalar();
        first.get_or_insert(mse_value);
        if step == 1 || step % 50 == 0 || step == args.steps {
            let load: Vec<f32> = load.into_data().iter::<f32>().collect();
            println!("step {step:4}  mse {mse_value:.5}  aux {:.4}  tokens per expert {load:?}", aux.into_scalar());
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(3e-3, model, grads);
    }
    let (pred, _, _) = model.forward(x);
    let last: f32 = (pred - y).powi_scalar(2).mean().into_scalar();
    println!("kernel {}: mse {:.5} -> {:.5}", args.kernel, first.unwrap_or(f32::NAN), last);
    anyhow::ensure!(last < first.unwrap_or(f32::INFINITY) * 0.5, "the model did not learn");
    Ok(())
}
