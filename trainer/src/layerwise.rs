//! FSDP's per-unit schedule (`--sharding fsdp1|fsdp2`, `--fsdp-gather layer|prefetch`), which is also
//! per-layer activation recomputation (`--gradient-checkpointing`, under every plan: without FSDP
//! the "gathers" just hand out the weights, in the compute dtype). With
//! `layer` no rank ever holds more than one gathered unit (the embedding, one decoder layer, or the
//! head) at a time — except the last layer and the head together, whose backward passes run back
//! to back; `prefetch` (the default) holds one more, the unit being fetched.
//!
//! One micro-batch:
//! 1. Forward without a graph: gather the embedding, embed, free it; for each decoder layer but the
//!    last gather it, run it, free it, keeping only its input (the hidden states between layers) and
//!    its routing statistics. The last layer runs gathered as autodiff leaves, with its graph.
//! 2. The head (final norm + LM head) gathered as leaves, the loss, one backward pass through the
//!    head and the last layer: their gradients (reduce-scattered at once, [`PartReducer`]) and the
//!    gradient of the last layer's input.
//! 3. For each other decoder layer, last first: gather it again (leaves), re-run its forward from
//!    the kept input, back-propagate the gradient of its output (and its part of the
//!    load-balancing loss), reduce-scatter its gradients at once and free everything but the
//!    gradient of its input.
//! 4. The embedding, the same way.
//!
//! Under `--fsdp-gather prefetch` each unit's all-gathers are queued before the unit before it
//! runs (the next layer's during this one's forward; in the backward pass the layer below during
//! this one's), waited for only when it is its turn, so the transfers overlap compute on NCCL:
//! then two units are whole at a time (three while the head's and the last layer's backward passes
//! run, the layer below being fetched). The gathers come in the same order either way; in the
//! backward pass each one now precedes the reduce-scatters of the unit above it. The
//! reduce-scatters are deferred too: each unit's run on NCCL during the backward pass of the unit
//! below it and are waited for just before that unit's own are queued ([`PartReducer`]).
//!
//! The model code is untouched: the units are the model's own modules, run one by one. The
//! load-balancing loss couples the layers only through the token counts, which carry no gradient:
//! with the counts of the whole micro-batch known after step 1, each layer's share is linear in its
//! router probabilities, so steps 2 and 3 add `Σ_e w_e · prob_sum_e` with the weights `w` the whole-model
//! loss would give them. The gradients equal those of one forward and backward pass over the whole
//! model (the CI tests compare both schedules with one device).

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{FloatDType, Int, Tensor, TensorData};
use burn_moe_backend::dist::{CollectiveBackend, Communicator};
use burn_moe_backend::{MoeBackend, TokenMask};
use mixtral_burn::MixtralForCausalLM;
use mixtral_burn::model::{DecoderLayer, HfLinear, RmsNorm};

use crate::data::Batch;
use crate::parallel::global_expert_counts;
use crate::sharding::{Gathering, Parallel, PartReducer};
use crate::train::TrainError;

/// The last unit: final norm and LM head.
#[derive(Module, Debug)]
pub struct Head<B: Backend> {
    /// The model's final norm.
    pub norm: RmsNorm<B>,
    /// The LM head.
    pub lm_head: HfLinear<B>,
}

impl<B: Backend> Head<B> {
    fn of(model: &MixtralForCausalLM<B>) -> Self {
        Self { norm: model.model.norm.clone(), lm_head: model.lm_head.clone() }
    }
}

impl<B: MoeBackend> Head<B> {
    fn forward(&self, h: Tensor<B, 3>) -> Tensor<B, 3> {
        self.lm_head.forward(self.norm.forward(h))
    }
}

/// How one micro-batch's losses are scaled (as in the whole-model step).
#[derive(Debug, Clone, Copy)]
pub struct MicroScale {
    /// Target tokens of the whole optimizer step over all ranks (the LM loss divisor).
    pub step_targets: f64,
    /// Micro-batches per step (the load-balancing loss is averaged over them).
    pub micro_batches: usize,
    /// `router_aux_loss_coef`.
    pub aux_coef: f64,
    /// Under mixed precision, gradients that no rank sums may stay in the compute dtype: the
    /// optimizer widens them in its update pass (the fused AdamW, one micro-batch per step).
    pub narrow_grads: bool,
}

/// What one micro-batch reports (this rank's shares; the caller sums them over ranks).
#[derive(Debug, Clone, Default)]
pub struct MicroOutcome {
    /// LM loss share: this rank's token-loss sum over the step's target tokens.
    pub lm: f64,
    /// Load-balancing loss share, over the micro-batches.
    pub aux: f64,
    /// `lm + aux_coef · aux`.
    pub loss: f64,
    /// Tokens routed to each expert, per layer (`[layer · E + e]`, this rank).
    pub expert_counts: Vec<f64>,
}

/// The last decoder layer run with its graph: its backward pass follows at once (after the head's),
/// so its weights would be gathered again right after being freed — torchtitan does not reshard
/// the last block after its forward either.
struct LastLayer<B: Backend> {
    live: DecoderLayer<B>,
    /// Its input, a leaf: the gradient of the hidden states below it.
    input: Tensor<B, 3>,
    /// Its router probability sums (with the graph) for its load-balancing share.
    prob_sum: Tensor<B, 1>,
}

/// The unit whose gathers are queued next ([`Parallel::prefetch_part`]). The schedule always
/// queues the unit it runs next, so the fallbacks that gather a unit on the spot never run; they
/// keep a mismatch from being a panic.
enum Next<B: AutodiffBackend> {
    Layer(Gathering<B, DecoderLayer<B>>),
    Head(Gathering<B, Head<B>>),
    Embedding(Gathering<B, burn::nn::Embedding<B>>),
}

/// The kept results of the forward pass.
struct Forward<B: AutodiffBackend> {
    /// Each decoder layer's input (empty when not kept; without the last layer's when that one is
    /// [`LastLayer`]).
    inputs: Vec<Tensor<B, 3>>,
    /// The last layer with its graph, when asked for.
    last: Option<LastLayer<B>>,
    /// The last layer's output.
    hidden: Tensor<B, 3>,
    /// Each layer's router probabilities summed over tokens, `[E]`.
    prob_sums: Vec<Tensor<B, 1>>,
    /// Each layer's routed pairs per expert.
    counts: Vec<Vec<f64>>,
    /// Tokens the statistics run over, all layers together.
    rows: usize,
    /// The head, its gathers queued during the last layer's forward pass.
    head: Gathering<B, Head<B>>,
}

/// Seeds the backend RNG for layer `layer` (adapter dropout), the same in the forward pass and its
/// re-run.
fn seed_layer<B: Backend>(seed: Option<u64>, layer: usize, device: &B::Device) {
    if let Some(s) = seed {
        B::seed(device, s.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(layer as u64));
    }
}

/// The forward pass: every layer graph-free, keeping their inputs when `train` — and then the last
/// layer with its graph ([`LastLayer`]). Each unit's gathers are queued before the unit before it
/// runs ([`Parallel::prefetch_part`]: overlapped under `--fsdp-gather prefetch`), the head's
/// (tracked when `train`) during the last layer.
fn forward<B, C>(
    parallel: &Parallel<B, C>,
    model: &MixtralForCausalLM<B>,
    ids: Tensor<B, 2, Int>,
    mask: &TokenMask<B>,
    train: bool,
    seed: Option<u64>,
) -> Result<Forward<B>, TrainError>
where
    B: AutodiffBackend + MoeBackend + CollectiveBackend<Wire = B::InnerBackend>,
    C: Communicator<B::InnerBackend> + 'static,
{
    let device = ids.device();
    let layers = &model.model.layers;
    let tracked = |l: usize| train && l + 1 == layers.len();
    let embed = parallel.prefetch_part(model, model.model.embed_tokens.clone(), false)?;
    let embed = parallel.wait_part(model, embed)?;
    crate::timers::sync_check::<B>(&device, || "gathering the embedding".to_string())?;
    // The unit after the one about to run: a layer, or the head after the last layer.
    let queue = |l: usize| -> Result<Next<B>, TrainError> {
        Ok(match layers.get(l) {
            Some(layer) => Next::Layer(parallel.prefetch_part(model, layer.clone(), tracked(l))?),
            None => Next::Head(parallel.prefetch_part(model, Head::of(model), train)?),
        })
    };
    let mut next = queue(0)?;
    let mut h = embed.forward(ids);
    crate::timers::sync_check::<B>(&device, || "the embedding's forward pass".to_string())?;
    drop(embed);
    let mut inputs = Vec::with_capacity(layers.len());
    let (mut last, mut prob_sums, mut counts, mut rows) = (None, Vec::new(), Vec::new(), 0);
    for (l, layer) in layers.iter().enumerate() {
        // Waited for before the next unit is queued: the wait covers everything queued so far.
        let live = match next {
            Next::Layer(pending) => parallel.wait_part(model, pending)?,
            _ => parallel.live_part(model, layer.clone(), tracked(l))?,
        };
        next = queue(l + 1)?;
        crate::timers::sync_check::<B>(&device, || format!("gathering layer {l}"))?;
        let x = if tracked(l) { h.require_grad() } else { h };
        if train && !tracked(l) {
            inputs.push(x.clone());
        }
        seed_layer::<B>(seed, l, &device);
        let (out, stats) = live.forward_dispatched(x.clone(), Some(mask), parallel.dispatcher());
        crate::timers::sync_check::<B>(&device, || format!("layer {l}'s forward pass"))?;
        parallel.check()?;
        h = out;
        counts.push(stats.token_counts.into_data().convert::<f64>().to_vec::<f64>().unwrap_or_default());
        prob_sums.push(stats.prob_sum.clone().detach());
        rows += stats.rows;
        if tracked(l) {
            last = Some(LastLayer { live, input: x, prob_sum: stats.prob_sum });
        }
    }
    let head = match next {
        Next::Head(pending) => pending,
        _ => parallel.prefetch_part(model, Head::of(model), train)?,
    };
    Ok(Forward { inputs, last, hidden: h, prob_sums, counts, rows, head })
}

/// One micro-batch of the per-unit schedule (see the module documentation): adds this rank's
/// reduced shard gradients (and unreduced replicated and expert gradients, f32) to `grads`.
/// Collective: every rank runs every micro-batch (an idle batch for an empty slice).
///
/// # Errors
/// A failed gather, reduce-scatter or collective inside the model.
#[allow(clippy::too_many_arguments)]
pub fn micro_step<B, C>(
    parallel: &Parallel<B, C>,
    model: &MixtralForCausalLM<B>,
    batch: &Batch,
    scale: MicroScale,
    comm: &C,
    device: &B::Device,
    dropout_seed: Option<u64>,
    grads: &mut GradientsParams,
    sample_memory: &mut dyn FnMut(),
) -> Result<MicroOutcome, TrainError>
where
    B: AutodiffBackend + MoeBackend + CollectiveBackend<Wire = B::InnerBackend>,
    C: Communicator<B::InnerBackend> + 'static,
{
    let ids = batch.input_ids_tensor::<B>(device);
    let labels = batch.labels_tensor::<B>(device);
    let mask = TokenMask::from_flags(&batch.real_tokens(), device);
    let fwd = forward(parallel, model, ids.clone(), &mask, true, dropout_seed)?;
    // Device memory is sampled where a whole-model step samples it (after a forward pass, before its
    // backward pass: the most that is alive): here after the forward pass (kept inputs, the last
    // layer's graph) and after each re-run forward (below).
    sample_memory();
    let num_experts = fwd.prob_sums.first().map_or(0, |p| p.dims()[0]);

    // The load-balancing loss over the whole micro-batch (all ranks): linear in each layer's
    // probability sums once the counts are known.
    let global = global_expert_counts::<B::InnerBackend, C>(&fwd.counts, fwd.rows, num_experts, comm, device)?;
    let n = global[num_experts];
    // d aux / d prob_sum_e (aux = E · Σ_e (count_e / n) (prob_e / n)), averaged over micro-batches.
    let weights: Vec<f64> = if n > 0.0 {
        global[..num_experts].iter().map(|&c| num_experts as f64 * c / (n * n) / scale.micro_batches as f64).collect()
    } else {
        vec![0.0; num_experts]
    };
    let aux = match fwd.prob_sums.iter().cloned().reduce(|a, b| a + b) {
        Some(total) if n > 0.0 => {
            let total = total.into_data().convert::<f64>().to_vec::<f64>().unwrap_or_default();
            total.iter().zip(&weights).map(|(p, w)| p * w).sum()
        }
        _ => 0.0,
    };
    let aux_weights = Tensor::<B, 1>::from_data(
        TensorData::new(weights.iter().map(|&w| (w * scale.aux_coef) as f32).collect::<Vec<_>>(), [num_experts]),
        device,
    );

    let mut reducer = PartReducer::new(parallel);

    // The head, the loss and the last layer (whose graph the forward pass kept) in one backward
    // pass, during which the layer below is gathered again (or the embedding, with one layer).
    let head = parallel.wait_part(model, fwd.head)?;
    crate::timers::sync_check::<B>(device, || "gathering the head".to_string())?;
    let last = fwd.last.expect("the forward pass keeps the last layer's graph when training");
    let below_last = model.model.layers.len().saturating_sub(1);
    // The unit below layer `l` (the embedding below layer 0), queued before layer `l` runs.
    let queue_below = |l: usize| -> Result<Next<B>, TrainError> {
        Ok(match l.checked_sub(1) {
            Some(below) => Next::Layer(parallel.prefetch_part(model, model.model.layers[below].clone(), true)?),
            None => Next::Embedding(parallel.prefetch_part(model, model.model.embed_tokens.clone(), true)?),
        })
    };
    let mut next = queue_below(below_last)?;
    let (lm_sum, _) = mixtral_burn::causal_lm_loss(head.forward(fwd.hidden), labels);
    let lm_loss = lm_sum.div_scalar(scale.step_targets);
    let lm = lm_loss.clone().into_data().iter::<f64>().next().unwrap_or(f64::NAN);
    sample_memory();
    let root = lm_loss + (last.prob_sum * aux_weights.clone()).sum();
    let mut backward = root.backward();
    crate::timers::sync_check::<B>(device, || "the head's and the last layer's backward pass".to_string())?;
    parallel.check()?;
    let mut upstream = last.input.grad(&backward).map(Tensor::<B, 3>::from_inner);
    reduce_part(&head, parallel, model, &mut backward, &mut reducer, grads, scale.narrow_grads)?;
    reduce_part(&last.live, parallel, model, &mut backward, &mut reducer, grads, scale.narrow_grads)?;
    crate::timers::sync_check::<B>(device, || "reducing the head's and the last layer's gradients".to_string())?;
    drop((head, last.live));

    // The other decoder layers, last first; each one's backward pass overlaps the next unit's
    // gathers.
    let mut inputs = fwd.inputs;
    for (l, layer) in model.model.layers.iter().enumerate().take(below_last).rev() {
        let live = match next {
            Next::Layer(pending) => parallel.wait_part(model, pending)?,
            _ => parallel.live_part(model, layer.clone(), true)?,
        };
        next = queue_below(l)?;
        crate::timers::sync_check::<B>(device, || format!("gathering layer {l} again"))?;
        let x = inputs.pop().expect("one kept input per layer").require_grad();
        seed_layer::<B>(dropout_seed, l, device);
        let (y, stats) = live.forward_dispatched(x.clone(), Some(&mask), parallel.dispatcher());
        crate::timers::sync_check::<B>(device, || format!("re-running layer {l}'s forward pass"))?;
        parallel.check()?;
        sample_memory();
        let dy = upstream.take().unwrap_or_else(|| y.zeros_like());
        // `Σ y·dy` back-propagates `dy` into the layer.
        let surrogate = crate::precision::cast((y * dy).sum(), FloatDType::F32) + (stats.prob_sum * aux_weights.clone()).sum();
        let mut backward = surrogate.backward();
        crate::timers::sync_check::<B>(device, || format!("layer {l}'s backward pass"))?;
        parallel.check()?;
        upstream = x.grad(&backward).map(Tensor::<B, 3>::from_inner);
        reduce_part(&live, parallel, model, &mut backward, &mut reducer, grads, scale.narrow_grads)?;
        crate::timers::sync_check::<B>(device, || format!("reducing layer {l}'s gradients"))?;
    }

    // The embedding (its gradient only when it is trained; the reducer still sees the unit).
    let embed = match next {
        Next::Embedding(pending) => parallel.wait_part(model, pending)?,
        _ => parallel.live_part(model, model.model.embed_tokens.clone(), true)?,
    };
    match upstream.filter(|_| embed.weight.is_require_grad()) {
        Some(dh) => {
            let mut backward = (embed.forward(ids) * dh).sum().backward();
            reduce_part(&embed, parallel, model, &mut backward, &mut reducer, grads, scale.narrow_grads)?;
            crate::timers::sync_check::<B>(device, || "the embedding's backward pass and reduction".to_string())?;
        }
        None => reducer.add(model, &embed, GradientsParams::new(), grads)?,
    }
    // The last deferred reductions (the embedding's, or the root unit's under FSDP1).
    reducer.finish(model, grads)?;

    Ok(MicroOutcome { lm, aux, loss: lm + scale.aux_coef * aux, expert_counts: fwd.counts.concat() })
}

/// Takes the gradients of gathered unit `part` out of a backward pass, widens them to f32 under
/// mixed precision (all of them, or with `narrow` only those summed over ranks) and hands them to
/// the [`PartReducer`].
fn reduce_part<B, C, M>(
    part: &M,
    parallel: &Parallel<B, C>,
    model: &MixtralForCausalLM<B>,
    backward: &mut B::Gradients,
    reducer: &mut PartReducer<'_, B, C>,
    into: &mut GradientsParams,
    narrow: bool,
) -> Result<(), TrainError>
where
    B: AutodiffBackend + MoeBackend + CollectiveBackend<Wire = B::InnerBackend>,
    C: Communicator<B::InnerBackend> + 'static,
    M: burn::module::AutodiffModule<B>,
{
    let mut g = GradientsParams::from_module(backward, part);
    if parallel.compute_dtype().is_some() {
        crate::precision::widen_grads_where(part, &mut g, |id| parallel.widens_grad(id, narrow));
    }
    reducer.add(model, part, g, into)?;
    Ok(())
}

/// The token-loss sum of one batch under the per-unit schedule, without a graph (evaluation).
/// Collective like [`micro_step`].
///
/// # Errors
/// A failed gather or collective inside the model.
pub fn loss_sum<B, C>(parallel: &Parallel<B, C>, model: &MixtralForCausalLM<B>, batch: &Batch, device: &B::Device) -> Result<f64, TrainError>
where
    B: AutodiffBackend + MoeBackend + CollectiveBackend<Wire = B::InnerBackend>,
    C: Communicator<B::InnerBackend> + 'static,
{
    let mask = TokenMask::from_flags(&batch.real_tokens(), device);
    let fwd = forward(parallel, model, batch.input_ids_tensor::<B>(device), &mask, false, None)?;
    let head = parallel.wait_part(model, fwd.head)?;
    let (sum, _) = mixtral_burn::causal_lm_loss(head.forward(fwd.hidden), batch.labels_tensor::<B>(device));
    Ok(sum.into_data().iter::<f64>().next().unwrap_or(f64::NAN))
}
