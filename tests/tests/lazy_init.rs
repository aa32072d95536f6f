//! [`MixtralConfig::init_lazy`]: a randomly initialised model whose matrices are drawn only when
//! first used, and then only the piece a sharding plan asked for. What makes that safe to shard:
//! a piece is exactly the same elements of the matrix drawn whole, whatever the order the matrices
//! are drawn in, with both sources of numbers (the host's, and the backend's own RNG on NdArray and
//! on wgpu through the fusion stream, where the piece is copied out of a view of the whole).
//!
//! Each backend's RNG is process-global, so only one test per backend draws from it.

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Tensor, backend::Backend};
use burn_moe_tests::Cpu;
use mixtral_burn::{InitRng, LazyWeights, MixtralConfig, MixtralForCausalLM};

/// Every parameter's values, flattened, in module order (lazy ones are drawn, whole or as
/// requested).
fn values<B: Backend>(model: &MixtralForCausalLM<B>) -> Vec<Vec<f32>> {
    struct Collect(Vec<Vec<f32>>);
    impl<B: Backend> ModuleVisitor<B> for Collect {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            self.0.push(p.val().into_data().convert::<f32>().to_vec::<f32>().unwrap());
        }
    }
    let mut c = Collect(Vec::new());
    model.visit(&mut c);
    c.0
}

/// Asks each lazy parameter for a piece: whole rows (as FSDP2 cuts), whole experts (as EP cuts) or
/// an arbitrary run of the flattened tensor (as FSDP1 cuts), by turns. Returns, in module order,
/// the flattened range each parameter will hold (all of it for the parameters that are not lazy).
fn request_pieces<B: Backend>(model: &MixtralForCausalLM<B>, lazy: &LazyWeights) -> Vec<std::ops::Range<usize>> {
    struct Ask<'a>(Vec<std::ops::Range<usize>>, &'a LazyWeights);
    impl<B: Backend> ModuleVisitor<B> for Ask<'_> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            let dims = p.lazy_shape().dims::<D>();
            let numel: usize = dims.iter().product();
            if !self.1.contains(p.id) {
                self.0.push(0..numel);
                return;
            }
            let row = numel / dims[0];
            let (range, shape) = match self.0.len() % 3 {
                // Rows 1..dims[0]-1 (an expert range for 3-D weights).
                0 | 1 if dims[0] > 2 => {
                    let mut shape = dims.to_vec();
                    shape[0] -= 2;
                    (row..numel - row, shape)
                }
                // A run that starts and ends inside rows.
                _ => {
                    let (start, end) = (numel / 3 + 1, numel - numel / 5);
                    let mut shape = vec![1; D];
                    shape[D - 1] = end - start;
                    (start..end, shape)
                }
            };
            self.1.request_piece(p.id, range.clone(), shape);
            self.0.push(range);
        }
    }
    let mut a = Ask(Vec::new(), lazy);
    model.visit(&mut a);
    a.0
}

fn check<B: Backend>(rng: InitRng) {
    let config = MixtralConfig::tiny();
    let device = Default::default();
    let (model, lazy) = config.init_lazy::<B>(&device, 7, rng);
    let (left, all) = lazy.unread_in(&model);
    // Embedding, 4 attention projections and 4 MoE weights per layer, LM head.
    assert_eq!(all, 2 + 8 * config.num_hidden_layers, "{rng:?}: lazy parameters");
    assert_eq!(left, all, "{rng:?}: parameters drawn before they were used");
    let whole = values(&model);

    let (again, _) = config.init_lazy::<B>(&device, 7, rng);
    assert!(values(&again) == whole, "{rng:?}: the same seed drew different weights");
    let (other, _) = config.init_lazy::<B>(&device, 8, rng);
    let other = values(&other);
    assert!(whole.iter().zip(&other).filter(|(a, b)| a.len() > 64 && a == b).count() == 0, "{rng:?}: another seed drew equal matrices");
    // Each matrix its own stream: no two matrices of one shape start alike.
    let heads: Vec<&[f32]> = whole.iter().filter(|v| v.len() > 64).map(|v| &v[..8]).collect();
    for (i, a) in heads.iter().enumerate() {
        assert!(heads[i + 1..].iter().all(|b| a != b), "{rng:?}: matrix #{i} repeats another's stream");
    }
    // N(0, initializer_range²).
    let embed = &whole[0];
    let mean = embed.iter().map(|&x| x as f64).sum::<f64>() / embed.len() as f64;
    let std = (embed.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / embed.len() as f64).sqrt();
    assert!(mean.abs() < 0.05 * config.initializer_range, "{rng:?}: mean {mean}");
    assert!((std / config.initializer_range - 1.0).abs() < 0.03, "{rng:?}: std {std}, expected {}", config.initializer_range);

    // Pieces, drawn in another order (the LM head first): each the same elements as the whole.
    let (model, lazy) = config.init_lazy::<B>(&device, 7, rng);
    let ranges = request_pieces(&model, &lazy);
    let _ = model.lm_head.weight.val();
    let pieces = values(&model);
    assert_eq!(lazy.unread_in(&model).0, 0);
    assert_eq!(pieces.len(), whole.len());
    for (i, ((piece, w), range)) in pieces.iter().zip(&whole).zip(&ranges).enumerate() {
        assert!(range.len() < w.len() || !lazy_index(i, config.num_hidden_layers), "{rng:?}: parameter #{i} was not cut");
        assert!(piece[..] == w[range.clone()], "{rng:?}: parameter #{i}: piece {range:?} differs from the whole's elements");
    }
}

/// Whether module-order parameter `i` is a lazy matrix (the norms are not).
fn lazy_index(i: usize, layers: usize) -> bool {
    // Module order: embedding; per layer 4 attention projections, gate, w1, w3, w2, 2 norms; norm; LM head.
    match i {
        0 => true,
        i if i <= 10 * layers => (i - 1) % 10 < 8,
        i => i == 10 * layers + 2,
    }
}

#[test]
fn host_drawn_pieces_are_the_wholes_elements() {
    check::<Cpu>(InitRng::Host);
}

#[test]
fn ndarray_rng_drawn_pieces_are_the_wholes_elements() {
    check::<Cpu>(InitRng::Device);
}

#[test]
fn wgpu_rng_drawn_pieces_are_the_wholes_elements() {
    check::<burn::backend::Wgpu>(InitRng::Device);
}
