//! FSDP's per-unit schedule (`--fsdp-gather layer`) really is per unit: on 2 in-process ranks, one
//! micro-batch all-gathers the embedding, each decoder layer, the head, then each layer but the
//! last again (last first; the last layer's backward pass follows the head's at once, so it is
//! kept, as torchtitan does) and the embedding again — one unit at a time, each just before it
//! runs — and reduce-scatters each unit's gradients right after its backward pass, in that order.
//! With `--fsdp-gather prefetch` the same gathers are queued deferred, each unit's before the unit
//! before it runs, and each unit's reduce-scatters deferred until the next unit's are queued.
//! (That the resulting training equals one device is `ddp.rs`.)

use std::sync::{Arc, Mutex};

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use burn_moe_backend::dist::{CommConfig, CommError, Communicator, ReduceOp, ThreadComm};
use mixtral_burn::{MixtralConfig, MixtralForCausalLM};
use trainer::Batch;
use trainer::layerwise::{Head, MicroScale, micro_step};
use trainer::sharding::{FsdpGather, Parallel, Sharding};

type Inner = burn::backend::NdArray<f32>;
type B = burn::backend::Autodiff<Inner>;

type Log = Arc<Mutex<Vec<(&'static str, usize)>>>;

/// A communicator that records the element count of every all-gather's output and every
/// reduce-scatter's input (the full tensors), every switch of deferral (`defer` for gathers,
/// `defer_rs` for reductions; 1 = on) and every wait for deferred gathers (`wait`) and reductions
/// (`wait_rs`), in call order.
struct Logged<C> {
    inner: C,
    log: Log,
}

impl<Bk: Backend, C: Communicator<Bk>> Communicator<Bk> for Logged<C> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn group_name(&self) -> &str {
        self.inner.group_name()
    }
    fn global_ranks(&self) -> &[usize] {
        self.inner.global_ranks()
    }
    fn all_reduce<const D: usize>(&self, t: Tensor<Bk, D>, op: ReduceOp) -> Result<Tensor<Bk, D>, CommError> {
        self.inner.all_reduce(t, op)
    }
    fn all_gather<const D: usize>(&self, t: Tensor<Bk, D>, dim: usize) -> Result<Tensor<Bk, D>, CommError> {
        let out = self.inner.all_gather(t, dim)?;
        self.log.lock().unwrap().push(("all_gather", out.shape().num_elements()));
        Ok(out)
    }
    fn reduce_scatter<const D: usize>(&self, t: Tensor<Bk, D>, dim: usize, op: ReduceOp) -> Result<Tensor<Bk, D>, CommError> {
        self.log.lock().unwrap().push(("reduce_scatter", t.shape().num_elements()));
        self.inner.reduce_scatter(t, dim, op)
    }
    fn all_to_all_single<const D: usize>(&self, t: Tensor<Bk, D>, send: &[usize], recv: &[usize]) -> Result<Tensor<Bk, D>, CommError> {
        self.inner.all_to_all_single(t, send, recv)
    }
    fn broadcast<const D: usize>(&self, t: Tensor<Bk, D>, root: usize) -> Result<Tensor<Bk, D>, CommError> {
        self.inner.broadcast(t, root)
    }
    fn barrier(&self) -> Result<(), CommError> {
        self.inner.barrier()
    }
    fn defer_gathers(&self, on: bool) {
        self.log.lock().unwrap().push(("defer", usize::from(on)));
        self.inner.defer_gathers(on);
    }
    fn wait_gathers(&self) -> Result<(), CommError> {
        self.log.lock().unwrap().push(("wait", 0));
        self.inner.wait_gathers()
    }
    fn defer_reductions(&self, on: bool) {
        self.log.lock().unwrap().push(("defer_rs", usize::from(on)));
        self.inner.defer_reductions(on);
    }
    fn wait_reductions(&self) -> Result<(), CommError> {
        self.log.lock().unwrap().push(("wait_rs", 0));
        self.inner.wait_reductions()
    }
    fn split(&self, color: usize, key: usize, name: &str) -> Result<Self, CommError> {
        Ok(Self { inner: self.inner.split(color, key, name)?, log: self.log.clone() })
    }
}

/// Element counts of a module's parameters, in visiting order.
fn numels<M: Module<B>>(m: &M) -> Vec<usize> {
    struct Count(Vec<usize>);
    impl ModuleVisitor<B> for Count {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            self.0.push(p.val().shape().num_elements());
        }
    }
    let mut c = Count(Vec::new());
    m.visit(&mut c);
    c.0
}

fn batch() -> Batch {
    // Two rows of 6 tokens, the second padded after 4; targets after the first position.
    let input_ids = vec![1, 40, 41, 42, 43, 44, 1, 50, 51, 52, 0, 0];
    let labels = vec![-100, 40, 41, 42, 43, 44, -100, 50, 51, 52, -100, -100];
    let real = vec![true, true, true, true, true, true, true, true, true, true, false, false];
    Batch { input_ids, labels, batch: 2, seq: 6, n_target_tokens: 8, real }
}

/// Runs one micro-batch on 2 ranks; returns rank 0's log, its plan's FSDP1 unit sizes (gathered,
/// padded) and the full model.
fn schedule(sharding: Sharding, gather: FsdpGather) -> (Vec<(&'static str, usize)>, Vec<usize>, MixtralForCausalLM<B>) {
    // Even sizes everywhere, so that no shard is padded (the vocabulary of `tiny` is odd).
    let config = MixtralConfig::new(260, 64, 128, 2, 4, 2, 4, 2).with_max_position_embeddings(512);
    let results = ThreadComm::<Inner>::run_ranks(2, CommConfig::default(), |comm| {
        let log: Log = Arc::default();
        let comm = Logged { inner: comm, log: log.clone() };
        let device = Default::default();
        let plan = Parallel::<B, _>::new(&comm, sharding, 1, config.num_local_experts).unwrap();
        assert!(plan.per_layer(), "a per-unit schedule is the default");
        let mut plan = plan.with_fsdp_gather(gather);
        let model = plan.shard(config.init_seeded::<B>(&device, 7));
        log.lock().unwrap().clear();
        let scale = MicroScale { step_targets: 8.0, micro_batches: 1, aux_coef: 0.02, narrow_grads: false };
        let mut grads = GradientsParams::new();
        let out = micro_step(&plan, &model, &batch(), scale, &comm, &device, None, &mut grads, &mut || ()).unwrap();
        assert!(out.loss.is_finite() && out.lm > 0.0 && out.aux > 0.0, "{out:?}");
        let units = plan.units().iter().map(|u| u.chunk * 2).collect::<Vec<_>>();
        let entries = log.lock().unwrap().clone();
        (entries, units)
    });
    let (log, units) = results.into_iter().next().unwrap().unwrap();
    (log, units, config.init_seeded::<B>(&Default::default(), 7))
}

fn of(log: &[(&'static str, usize)], op: &str) -> Vec<usize> {
    log.iter().filter(|(o, _)| *o == op).map(|&(_, n)| n).collect()
}

/// For each all-gather, whether deferral was on when it was called.
fn deferred(log: &[(&'static str, usize)]) -> Vec<bool> {
    let mut on = false;
    let mut out = Vec::new();
    for &(op, n) in log {
        match op {
            "defer" => on = n == 1,
            "all_gather" => out.push(on),
            _ => {}
        }
    }
    out
}

/// How many all-gathers were called before the `i`-th reduce-scatter.
fn gathers_before_reduce(log: &[(&'static str, usize)], i: usize) -> usize {
    let at = log.iter().enumerate().filter(|(_, (o, _))| *o == "reduce_scatter").nth(i).unwrap().0;
    log[..at].iter().filter(|(o, _)| *o == "all_gather").count()
}

#[test]
fn fsdp2_gathers_and_reduces_one_unit_at_a_time() {
    let (log, _, full) = schedule(Sharding::Fsdp2, FsdpGather::Layer);
    let embed = numels(&full.model.embed_tokens);
    let layers: Vec<Vec<usize>> = full.model.layers.iter().map(numels).collect();
    let head = numels(&Head { norm: full.model.norm.clone(), lm_head: full.lm_head.clone() });
    // Forward: embedding, layer 0, layer 1, head; backward re-gathers layer 0 and the embedding.
    let gathers = [embed.clone(), layers[0].clone(), layers[1].clone(), head.clone(), layers[0].clone(), embed.clone()].concat();
    assert_eq!(of(&log, "all_gather"), gathers);
    // Each unit's gradients right after its backward pass: head, layer 1, layer 0, embedding.
    let reduces = [head, layers[1].clone(), layers[0].clone(), embed].concat();
    assert_eq!(of(&log, "reduce_scatter"), reduces);
    // And never all of the gathers before any reduction (the whole-model schedule).
    let first_reduce = log.iter().position(|(o, _)| *o == "reduce_scatter").unwrap();
    assert!(log[first_reduce..].iter().any(|(o, _)| *o == "all_gather"));
    assert!(deferred(&log).iter().all(|d| !d), "`layer` defers nothing");
}

#[test]
fn fsdp2_prefetch_queues_each_unit_before_the_unit_before_it_runs() {
    let (log, _, full) = schedule(Sharding::Fsdp2, FsdpGather::Prefetch);
    let (layer_log, _, _) = schedule(Sharding::Fsdp2, FsdpGather::Layer);
    let embed = numels(&full.model.embed_tokens).len();
    let layer = numels(&full.model.layers[0]).len();
    let head = numels(&Head { norm: full.model.norm.clone(), lm_head: full.lm_head.clone() }).len();
    // The same gathers and reduce-scatters, every gather deferred.
    assert_eq!(of(&log, "all_gather"), of(&layer_log, "all_gather"));
    assert_eq!(of(&log, "reduce_scatter"), of(&layer_log, "reduce_scatter"));
    assert!(deferred(&log).iter().all(|&d| d), "{log:?}");
    // Layer 0 is queued again before the head's and layer 1's gradients are reduced (during their
    // backward pass), the embedding before layer 0's are; without prefetch each unit's gathers
    // wait for the reductions above it.
    assert_eq!(gathers_before_reduce(&log, 0), embed + 3 * layer + head);
    assert_eq!(gathers_before_reduce(&log, head + layer), 2 * embed + 3 * layer + head);
    assert_eq!(gathers_before_reduce(&layer_log, 0), embed + 2 * layer + head);
    assert_eq!(gathers_before_reduce(&layer_log, head + layer), embed + 3 * layer + head);
    // Every queued unit is waited for before it runs: one wait per gathered unit (embedding,
    // layers 0 and 1, head; layer 0 and the embedding again).
    assert_eq!(of(&log, "wait").len(), 6);
}

#[test]
fn fsdp1_gathers_each_flat_unit_just_before_it_runs() {
    let (log, units, _) = schedule(Sharding::Fsdp1, FsdpGather::Layer);
    // Units: root (embedding, final norm, LM head), layer0, layer1.
    let [root, l0, l1] = units[..] else { panic!("units {units:?}") };
    assert_eq!(of(&log, "all_gather"), vec![root, l0, l1, root, l0, root]);
    // The root unit is reduced once its last member (the embedding) has had its backward pass.
    assert_eq!(of(&log, "reduce_scatter"), vec![l1, l0, root]);
}

/// Checks the deferred reductions of a log: returns how many reduce-scatters were called while
/// deferral was on, and how many all-gathers were called while some reduction was still in flight
/// (queued, not waited for). Panics when a part's reductions are queued before the previous
/// part's were waited for, or when the micro-batch ends with reductions in flight.
fn reductions_in_flight(log: &[(&'static str, usize)]) -> (usize, usize) {
    let (mut on, mut outstanding, mut deferred, mut overlapped) = (false, 0, 0, 0);
    for &(op, n) in log {
        match op {
            "defer_rs" => {
                on = n == 1;
                assert!(!on || outstanding == 0, "a part's reductions queued before the previous part's were waited for: {log:?}");
            }
            "reduce_scatter" if on => {
                deferred += 1;
                outstanding += 1;
            }
            "wait_rs" => outstanding = 0,
            "all_gather" if outstanding > 0 => overlapped += 1,
            _ => {}
        }
    }
    assert_eq!(outstanding, 0, "the micro-batch ended with reductions in flight: {log:?}");
    (deferred, overlapped)
}

#[test]
fn prefetch_defers_each_units_reductions_past_the_next_units_gathers() {
    for sharding in [Sharding::Fsdp2, Sharding::Fsdp1] {
        let (log, _, _) = schedule(sharding, FsdpGather::Prefetch);
        let (deferred, overlapped) = reductions_in_flight(&log);
        assert_eq!(deferred, of(&log, "reduce_scatter").len(), "{sharding:?}: every reduce-scatter deferred");
        // Layer 1's (FSDP2: and the head's) reductions are in flight while the embedding is
        // queued for the backward pass and layer 0 re-runs.
        assert!(overlapped > 0, "{sharding:?}: no gather overlapped a reduction: {log:?}");
        let (layer_log, _, _) = schedule(sharding, FsdpGather::Layer);
        assert_eq!(reductions_in_flight(&layer_log), (0, 0), "{sharding:?}: `layer` defers no reduction");
        assert!(of(&layer_log, "wait_rs").is_empty());
    }
}
