//! In-process [`Communicator`]: one thread per rank, any Burn backend, data through host
//! `TensorData`.
//!
//! # Synchronisation design
//!
//! All communicators created from one [`ThreadComm::world`] call (the world and every group split
//! off it) share one `World`: a single `Mutex` over the rendezvous state and one `Condvar`. One lock
//! for everything keeps the failure detection simple (a rank dying wakes every waiter of every
//! group), and the contention is irrelevant next to the tensor copies.
//!
//! * **Rounds.** Each communicator counts the collectives it has entered (`seq`). The `seq`-th
//!   collective of group `path` is the round `(path, seq)`. A rank reads its tensor to the host
//!   (`into_data`, outside the lock), deposits an `Arc` of it with the call's metadata in slot
//!   `rank` of the round, and waits until all `size` slots are filled. Every rank then takes the
//!   `Arc`s of all contributions and computes *its own* output outside the lock (the last one to
//!   leave removes the round). Because every rank runs the same deterministic host code over the
//!   same inputs in rank order, results are bit-identical on every rank, and consistency checks
//!   (shapes, dtypes, split sizes, collective names) give the same `Mismatch` on every rank.
//! * **Invalid arguments.** A rank whose own arguments are invalid still deposits a marker, so its
//!   peers get a `Mismatch` naming it instead of waiting for a timeout; it returns
//!   `InvalidArgument` itself.
//! * **Failures.** Dropping a communicator records that its rank left the group; dropping it while
//!   the thread panics (or [`run_ranks`](ThreadComm::run_ranks) catching a panic) marks the global
//!   rank dead in every group. Both notify the condvar. A waiter whose round misses a departed rank
//!   fails at once with `PeerFailed`; otherwise it waits at most the configured timeout and fails
//!   with `Timeout` naming the missing group ranks. The first rank to fail stores the failure in the
//!   round, so every rank already waiting in it returns the same error; a rank arriving later gets
//!   the same `PeerFailed`, or, after a timeout, a `PeerFailed` naming the rank that gave up:
//!   either everybody gets the result or nobody does.
//! * **Rank numbers in errors** (`Timeout::missing`, `PeerFailed::rank`, mismatch details) are
//!   ranks of the group the collective ran on; `PeerFailed` reasons add the global rank.
//! * **After an error** the communicator is unusable (as an aborted NCCL communicator): its
//!   sequence no longer lines up with its peers', so every later call returns `Transport`.
//!
//! Collectives are not differentiable here: outputs are new leaf tensors created with
//! `Tensor::from_data` on the communicator's device, in the input's dtype.

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use burn::tensor::{DType, Tensor, TensorData, backend::Backend};

use super::comm::{CommError, Communicator, ReduceOp, check_splits};
use super::host::{concat_bytes, element_size, reduce_host, slice_bytes};

/// Settings of an in-process world.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommConfig {
    /// How long a rank waits in a collective for its peers before returning
    /// [`CommError::Timeout`]. Departed (dropped / panicked) peers are detected immediately.
    pub timeout: Duration,
}

impl CommConfig {
    /// A configuration with the given collective timeout.
    pub fn with_timeout(timeout: Duration) -> Self {
        Self { timeout }
    }
}

impl Default for CommConfig {
    /// Five minutes: long enough for a slow CPU step, short enough that a stuck CI job ends.
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(300),
        }
    }
}

/// A rank's closure in [`ThreadComm::run_ranks`] did not return normally.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RankError {
    /// The rank's closure panicked; `message` is the panic payload when it was a string.
    #[error("rank {rank} panicked: {message}")]
    Panicked { rank: usize, message: String },
}

/// What a rank says about its call; compared across ranks after the rendezvous.
#[derive(Debug, Clone, PartialEq)]
struct Meta {
    collective: &'static str,
    shape: Vec<usize>,
    dtype: Option<DType>,
    op: Option<ReduceOp>,
    dim: Option<usize>,
    root: Option<usize>,
    input_splits: Vec<usize>,
    output_splits: Vec<usize>,
    color_key: Option<(usize, usize)>,
    name: String,
    /// Set when this rank's own arguments are invalid; the rank still takes part in the round.
    invalid: Option<String>,
}

impl Meta {
    fn new(collective: &'static str) -> Self {
        Self {
            collective,
            shape: Vec::new(),
            dtype: None,
            op: None,
            dim: None,
            root: None,
            input_splits: Vec::new(),
            output_splits: Vec::new(),
            color_key: None,
            name: String::new(),
            invalid: None,
        }
    }
}

struct Contribution {
    meta: Meta,
    data: Option<TensorData>,
}

/// Why a round failed; every rank waiting in it rebuilds the same [`CommError`] from it.
#[derive(Clone)]
enum Failure {
    Timeout { missing: Vec<usize> },
    PeerFailed { rank: usize, reason: String },
}

struct Round {
    slots: Vec<Option<Arc<Contribution>>>,
    arrived: usize,
    departed: usize,
    /// The failure and the rank that recorded it.
    failure: Option<(Failure, usize)>,
}

#[derive(Default)]
struct State {
    rounds: HashMap<(Arc<str>, u64), Round>,
    /// `(group path, group rank)` of communicators that were dropped.
    left: HashSet<(Arc<str>, usize)>,
    /// Global ranks whose thread panicked, with the reason.
    dead: HashMap<usize, String>,
}

struct World {
    state: Mutex<State>,
    changed: Condvar,
    config: CommConfig,
}

impl World {
    fn lock(&self) -> MutexGuard<'_, State> {
        // No code panics while holding the lock, but a poisoned lock must not turn one failure
        // into a cascade of panics on the other ranks.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn mark_dead(&self, global_rank: usize, reason: String) {
        let mut state = self.lock();
        state.dead.entry(global_rank).or_insert(reason);
        drop(state);
        self.changed.notify_all();
    }
}

/// The in-process communicator of one rank of one group. See the module documentation for the
/// synchronisation design.
pub struct ThreadComm<B: Backend> {
    world: Arc<World>,
    /// Unique identity of the group inside the world (`world`, `world/3:1`, …); equal on all
    /// members because it is derived from the parent's path, the split's sequence number and color.
    path: Arc<str>,
    name: String,
    rank: usize,
    global_ranks: Vec<usize>,
    device: B::Device,
    seq: AtomicU64,
    broken: Mutex<Option<String>>,
}

impl<B: Backend> std::fmt::Debug for ThreadComm<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadComm")
            .field("group", &self.name)
            .field("rank", &self.rank)
            .field("global_ranks", &self.global_ranks)
            .finish()
    }
}

impl<B: Backend> ThreadComm<B> {
    /// Creates the world group of `n` ranks, one communicator per rank (index = rank), to be moved
    /// into one thread each. `devices` holds either one device shared by all ranks or one per rank.
    ///
    /// # Errors
    /// [`CommError::Setup`] when `n == 0` or `devices` has neither 1 nor `n` entries.
    pub fn world(
        n: usize,
        devices: &[B::Device],
        config: CommConfig,
    ) -> Result<Vec<Self>, CommError> {
        if n == 0 {
            return Err(CommError::Setup("world size must be at least 1".into()));
        }
        if devices.len() != 1 && devices.len() != n {
            return Err(CommError::Setup(format!(
                "{} devices given for a world of {n} ranks (need 1 or {n})",
                devices.len()
            )));
        }
        let world = Arc::new(World {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            config,
        });
        let path: Arc<str> = Arc::from("world");
        Ok((0..n)
            .map(|rank| Self {
                world: world.clone(),
                path: path.clone(),
                name: "world".to_string(),
                rank,
                global_ranks: (0..n).collect(),
                device: devices[if devices.len() == 1 { 0 } else { rank }].clone(),
                seq: AtomicU64::new(0),
                broken: Mutex::new(None),
            })
            .collect())
    }

    /// Runs `f` on `n` scoped threads, each with its world communicator on the backend's default
    /// device, and returns the per-rank results in rank order. A panicking rank yields
    /// [`RankError::Panicked`] (and its peers' collectives fail with `PeerFailed`).
    pub fn run_ranks<R, F>(n: usize, config: CommConfig, f: F) -> Vec<Result<R, RankError>>
    where
        R: Send,
        F: Fn(ThreadComm<B>) -> R + Sync,
    {
        Self::run_ranks_on(&vec![B::Device::default(); n], config, f)
    }

    /// [`run_ranks`](Self::run_ranks) with one device per rank (`devices.len()` ranks).
    pub fn run_ranks_on<R, F>(
        devices: &[B::Device],
        config: CommConfig,
        f: F,
    ) -> Vec<Result<R, RankError>>
    where
        R: Send,
        F: Fn(ThreadComm<B>) -> R + Sync,
    {
        if devices.is_empty() {
            return Vec::new();
        }
        let comms = Self::world(devices.len(), devices, config)
            .expect("device count equals the world size and is non-zero");
        let world = comms[0].world.clone();
        let f = &f;
        std::thread::scope(|scope| {
            let handles: Vec<_> = comms
                .into_iter()
                .enumerate()
                .map(|(rank, comm)| {
                    let world = world.clone();
                    std::thread::Builder::new()
                        .name(format!("rank-{rank}"))
                        .spawn_scoped(scope, move || {
                            let out = std::panic::catch_unwind(AssertUnwindSafe(|| f(comm)));
                            out.map_err(|payload| {
                                let message = panic_message(payload.as_ref());
                                // The communicator may have been moved elsewhere and survived
                                // the unwinding; the rank is dead either way.
                                world.mark_dead(rank, format!("thread panicked: {message}"));
                                RankError::Panicked { rank, message }
                            })
                        })
                        .expect("spawning a rank thread")
                })
                .collect();
            handles
                .into_iter()
                .enumerate()
                .map(|(rank, h)| {
                    h.join().unwrap_or_else(|payload| {
                        Err(RankError::Panicked {
                            rank,
                            message: panic_message(payload.as_ref()),
                        })
                    })
                })
                .collect()
        })
    }

    /// The device outputs of this rank's collectives are created on.
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// The configuration shared by every group of this world.
    pub fn config(&self) -> CommConfig {
        self.world.config
    }

    fn size_(&self) -> usize {
        self.global_ranks.len()
    }

    fn invalid(&self, collective: &'static str, detail: String) -> CommError {
        CommError::InvalidArgument {
            collective,
            group: self.name.clone(),
            detail,
        }
    }

    fn mismatch(&self, collective: &'static str, detail: String) -> CommError {
        CommError::Mismatch {
            collective,
            group: self.name.clone(),
            detail,
        }
    }

    /// Deposits this rank's contribution to its next round and waits for all others.
    fn rendezvous(
        &self,
        meta: Meta,
        data: Option<TensorData>,
    ) -> Result<Vec<Arc<Contribution>>, CommError> {
        let collective = meta.collective;
        if let Some(reason) = self
            .broken
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Err(CommError::Transport {
                collective,
                group: self.name.clone(),
                detail: format!("communicator unusable after an earlier error: {reason}"),
            });
        }
        let result = self.rendezvous_inner(meta, data);
        if let Err(e) = &result {
            *self.broken.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
        }
        result
    }

    fn rendezvous_inner(
        &self,
        meta: Meta,
        data: Option<TensorData>,
    ) -> Result<Vec<Arc<Contribution>>, CommError> {
        let collective = meta.collective;
        let size = self.size_();
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        let key = (self.path.clone(), seq);
        let timeout = self.world.config.timeout;
        let deadline = Instant::now() + timeout;
        let to_error = |failure: &Failure| match failure {
            Failure::Timeout { missing } => CommError::Timeout {
                collective,
                group: self.name.clone(),
                missing: missing.clone(),
                timeout,
            },
            Failure::PeerFailed { rank, reason } => CommError::PeerFailed {
                collective,
                group: self.name.clone(),
                rank: *rank,
                reason: reason.clone(),
            },
        };

        let mut state = self.world.lock();
        let round = state.rounds.entry(key.clone()).or_insert_with(|| Round {
            slots: vec![None; size],
            arrived: 0,
            departed: 0,
            failure: None,
        });
        if let Some((failure, gave_up)) = &round.failure {
            // Peers already gave up on this round; joining it now would complete it for nobody.
            return Err(match failure {
                // The cause (a departed peer) applies to this rank just the same.
                Failure::PeerFailed { .. } => to_error(failure),
                Failure::Timeout { missing } => CommError::PeerFailed {
                    collective,
                    group: self.name.clone(),
                    rank: *gave_up,
                    reason: format!(
                        "gave up on this collective after timing out waiting for rank(s) {missing:?}"
                    ),
                },
            });
        }
        round.slots[self.rank] = Some(Arc::new(Contribution { meta, data }));
        round.arrived += 1;
        self.world.changed.notify_all();

        loop {
            let round = state
                .rounds
                .get_mut(&key)
                .expect("a round stays until all its members left");
            if round.arrived == size {
                let all: Vec<_> = round.slots.iter().map(|s| s.clone().unwrap()).collect();
                round.departed += 1;
                if round.departed == size {
                    state.rounds.remove(&key);
                }
                return Ok(all);
            }
            if let Some((failure, _)) = &round.failure {
                return Err(to_error(failure));
            }
            let missing: Vec<usize> = (0..size).filter(|&r| round.slots[r].is_none()).collect();
            let gone = missing.iter().find_map(|&r| {
                let global = self.global_ranks[r];
                if let Some(reason) = state.dead.get(&global) {
                    Some((r, format!("{reason} (global rank {global})")))
                } else if state.left.contains(&(self.path.clone(), r)) {
                    Some((
                        r,
                        format!(
                            "dropped its communicator without joining collective #{seq} \
                             (global rank {global})"
                        ),
                    ))
                } else {
                    None
                }
            });
            let now = Instant::now();
            let failure = match gone {
                Some((rank, reason)) => Some(Failure::PeerFailed { rank, reason }),
                None if now >= deadline => Some(Failure::Timeout { missing }),
                None => None,
            };
            if let Some(failure) = failure {
                let round = state.rounds.get_mut(&key).unwrap();
                round.failure = Some((failure.clone(), self.rank));
                self.world.changed.notify_all();
                return Err(to_error(&failure));
            }
            state = self
                .world
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Rendezvous, then the checks every collective shares: an invalid argument on any rank,
    /// a different collective, shape or dtype on any rank. `same_shape` is false for
    /// all-to-all (only trailing dims must match) and broadcast (non-roots send no data but
    /// still declare shape and dtype).
    fn exchange(
        &self,
        meta: Meta,
        data: Option<TensorData>,
    ) -> Result<Vec<Arc<Contribution>>, CommError> {
        let collective = meta.collective;
        let own_invalid = meta.invalid.clone();
        let all = self.rendezvous(meta, data)?;
        if let Some(detail) = own_invalid {
            return Err(self.invalid(collective, detail));
        }
        if let Some((r, c)) = all
            .iter()
            .enumerate()
            .find(|(_, c)| c.meta.collective != collective)
        {
            return Err(self.mismatch(
                collective,
                format!(
                    "rank {r} called {} while rank {} called {collective} (collectives called in a different order)",
                    c.meta.collective, self.rank
                ),
            ));
        }
        if let Some((r, c)) = all
            .iter()
            .enumerate()
            .find(|(_, c)| c.meta.invalid.is_some())
        {
            return Err(self.mismatch(
                collective,
                format!(
                    "rank {r} passed an invalid argument: {}",
                    c.meta.invalid.as_deref().unwrap()
                ),
            ));
        }
        let m0 = &all[0].meta;
        for (r, c) in all.iter().enumerate().skip(1) {
            let m = &c.meta;
            let shape_differs = if collective == "all_to_all_single" {
                m.shape.len() != m0.shape.len() || m.shape.get(1..) != m0.shape.get(1..)
            } else {
                m.shape != m0.shape
            };
            let mut diffs = Vec::new();
            if shape_differs {
                diffs.push(format!("shape {:?} vs {:?}", m.shape, m0.shape));
            }
            if m.dtype != m0.dtype {
                diffs.push(format!("dtype {:?} vs {:?}", m.dtype, m0.dtype));
            }
            if m.op != m0.op {
                diffs.push(format!("op {:?} vs {:?}", m.op, m0.op));
            }
            if m.dim != m0.dim {
                diffs.push(format!("dim {:?} vs {:?}", m.dim, m0.dim));
            }
            if m.root != m0.root {
                diffs.push(format!("root {:?} vs {:?}", m.root, m0.root));
            }
            if !diffs.is_empty() {
                return Err(self.mismatch(
                    collective,
                    format!("rank {r} differs from rank 0: {}", diffs.join(", ")),
                ));
            }
        }
        Ok(all)
    }

    fn make<const D: usize>(
        &self,
        bytes: Vec<u8>,
        shape: Vec<usize>,
        dtype: DType,
    ) -> Tensor<B, D> {
        Tensor::from_data(
            TensorData::from_bytes_vec(bytes, shape, dtype),
            (&self.device, dtype),
        )
    }

    fn tensor_meta<const D: usize>(
        &self,
        collective: &'static str,
        tensor: &Tensor<B, D>,
    ) -> (Meta, Result<usize, String>) {
        let mut meta = Meta::new(collective);
        meta.shape = tensor.dims().to_vec();
        let dtype = tensor.dtype();
        meta.dtype = Some(dtype);
        let esize = element_size(dtype);
        if let Err(e) = &esize {
            meta.invalid = Some(e.clone());
        }
        (meta, esize)
    }

    /// Whether a valid call has no peer to exchange with: alone in its group, a collective's result
    /// is its input. Skipping the host round trip matters on GPUs (a one-process FSDP run gathers
    /// and reduces every weight each step).
    fn alone(&self, meta: &Meta) -> bool {
        self.size_() == 1 && meta.invalid.is_none()
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

impl<B: Backend> Drop for ThreadComm<B> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.world.mark_dead(
                self.global_ranks[self.rank],
                "thread panicked while holding its communicator".to_string(),
            );
        }
        let mut state = self.world.lock();
        state.left.insert((self.path.clone(), self.rank));
        drop(state);
        self.world.changed.notify_all();
    }
}

impl<B: Backend> Communicator<B> for ThreadComm<B> {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size_()
    }

    fn group_name(&self) -> &str {
        &self.name
    }

    fn global_ranks(&self) -> &[usize] {
        &self.global_ranks
    }

    fn all_reduce<const D: usize>(
        &self,
        tensor: Tensor<B, D>,
        op: ReduceOp,
    ) -> Result<Tensor<B, D>, CommError> {
        const C: &str = "all_reduce";
        let (mut meta, esize) = self.tensor_meta(C, &tensor);
        meta.op = Some(op);
        if self.alone(&meta) {
            return Ok(tensor);
        }
        let dtype = tensor.dtype();
        let data = esize.is_ok().then(|| tensor.into_data());
        let all = self.exchange(meta, data)?;
        let inputs: Vec<&TensorData> = all.iter().map(|c| c.data.as_ref().unwrap()).collect();
        let out = reduce_host(&inputs, op).map_err(|e| self.invalid(C, e))?;
        Ok(Tensor::from_data(out, (&self.device, dtype)))
    }

    fn all_gather<const D: usize>(
        &self,
        tensor: Tensor<B, D>,
        dim: usize,
    ) -> Result<Tensor<B, D>, CommError> {
        const C: &str = "all_gather";
        let (mut meta, esize) = self.tensor_meta(C, &tensor);
        meta.dim = Some(dim);
        if dim >= D {
            meta.invalid = Some(format!("dim {dim} out of range for a {D}-d tensor"));
        }
        if self.alone(&meta) {
            return Ok(tensor);
        }
        let dtype = tensor.dtype();
        let data = meta.invalid.is_none().then(|| tensor.into_data());
        let all = self.exchange(meta, data)?;
        let esize = esize.expect("checked before the rendezvous");
        let parts: Vec<&[u8]> = all
            .iter()
            .map(|c| c.data.as_ref().unwrap().as_bytes())
            .collect();
        let shapes: Vec<&[usize]> = all.iter().map(|c| c.meta.shape.as_slice()).collect();
        let (bytes, shape) = concat_bytes(&parts, &shapes, dim, esize);
        Ok(self.make(bytes, shape, dtype))
    }

    fn reduce_scatter<const D: usize>(
        &self,
        tensor: Tensor<B, D>,
        dim: usize,
        op: ReduceOp,
    ) -> Result<Tensor<B, D>, CommError> {
        const C: &str = "reduce_scatter";
        let (mut meta, esize) = self.tensor_meta(C, &tensor);
        meta.dim = Some(dim);
        meta.op = Some(op);
        let size = self.size_();
        if dim >= D {
            meta.invalid = Some(format!("dim {dim} out of range for a {D}-d tensor"));
        } else if meta.shape[dim] % size != 0 {
            meta.invalid = Some(format!(
                "length {} of dim {dim} is not divisible by the group size {size}",
                meta.shape[dim]
            ));
        }
        if self.alone(&meta) {
            return Ok(tensor);
        }
        let dtype = tensor.dtype();
        let data = meta.invalid.is_none().then(|| tensor.into_data());
        let all = self.exchange(meta, data)?;
        let esize = esize.expect("checked before the rendezvous");
        let shape = &all[0].meta.shape;
        let part = shape[dim] / size;
        let range = self.rank * part..(self.rank + 1) * part;
        // Slice before reducing: each rank only sums its own part.
        let slices: Vec<TensorData> = all
            .iter()
            .map(|c| {
                let (bytes, shape) = slice_bytes(
                    c.data.as_ref().unwrap().as_bytes(),
                    shape,
                    dim,
                    range.clone(),
                    esize,
                );
                TensorData::from_bytes_vec(bytes, shape, dtype)
            })
            .collect();
        let inputs: Vec<&TensorData> = slices.iter().collect();
        let out = reduce_host(&inputs, op).map_err(|e| self.invalid(C, e))?;
        Ok(Tensor::from_data(out, (&self.device, dtype)))
    }

    fn all_to_all_single<const D: usize>(
        &self,
        tensor: Tensor<B, D>,
        input_splits: &[usize],
        output_splits: &[usize],
    ) -> Result<Tensor<B, D>, CommError> {
        const C: &str = "all_to_all_single";
        let (mut meta, esize) = self.tensor_meta(C, &tensor);
        meta.input_splits = input_splits.to_vec();
        meta.output_splits = output_splits.to_vec();
        let size = self.size_();
        if D == 0 {
            meta.invalid = Some("all_to_all_single needs at least one dimension".into());
        } else if let Err(e) =
            check_splits(&self.name, size, meta.shape[0], input_splits, output_splits)
        {
            meta.invalid = Some(match e {
                CommError::InvalidArgument { detail, .. } => detail,
                other => other.to_string(),
            });
        }
        if self.alone(&meta) {
            return Ok(tensor);
        }
        let dtype = tensor.dtype();
        let data = meta.invalid.is_none().then(|| tensor.into_data());
        let all = self.exchange(meta, data)?;
        let esize = esize.expect("checked before the rendezvous");
        // Every rank checks every pair, so a disagreement is reported identically everywhere.
        for (j, cj) in all.iter().enumerate() {
            for (i, ci) in all.iter().enumerate() {
                let sent = ci.meta.input_splits[j];
                let expected = cj.meta.output_splits[i];
                if sent != expected {
                    return Err(self.mismatch(
                        C,
                        format!(
                            "rank {i} sends {sent} rows to rank {j}, but rank {j} expects \
                             {expected} rows from rank {i} (input splits {:?}, output splits {:?})",
                            ci.meta.input_splits, cj.meta.output_splits
                        ),
                    ));
                }
            }
        }
        let trailing = &all[0].meta.shape[1..];
        let row_bytes = trailing.iter().product::<usize>() * esize;
        let rows: usize = output_splits.iter().sum();
        let mut bytes = Vec::with_capacity(rows * row_bytes);
        for c in &all {
            let start: usize = c.meta.input_splits[..self.rank].iter().sum();
            let len = c.meta.input_splits[self.rank];
            let src = c.data.as_ref().unwrap().as_bytes();
            bytes.extend_from_slice(&src[start * row_bytes..(start + len) * row_bytes]);
        }
        let mut shape = vec![rows];
        shape.extend_from_slice(trailing);
        Ok(self.make(bytes, shape, dtype))
    }

    fn broadcast<const D: usize>(
        &self,
        tensor: Tensor<B, D>,
        root: usize,
    ) -> Result<Tensor<B, D>, CommError> {
        const C: &str = "broadcast";
        let (mut meta, _) = self.tensor_meta(C, &tensor);
        meta.root = Some(root);
        let size = self.size_();
        if root >= size {
            meta.invalid = Some(format!("root {root} is not a rank of a group of {size}"));
        }
        if self.alone(&meta) {
            return Ok(tensor);
        }

        let dtype = tensor.dtype();
        // Only the root's values travel; the others' shape and dtype are still checked.
        let data = (meta.invalid.is_none() && self.rank == root).then(|| tensor.into_data());
        let all = self.exchange(meta, data)?;
        // The root's own tensor went to the host too, so it is rebuilt like everybody else's.
        let data = all[root].data.as_ref().unwrap().clone();
        Ok(Tensor::from_data(data, (&self.device, dtype)))
    }

    fn barrier(&self) -> Result<(), CommError> {
        self.exchange(Meta::new("barrier"), None).map(|_| ())
    }

    fn split(&self, color: usize, key: usize, name: &str) -> Result<Self, CommError> {
        const C: &str = "split";
        let seq = self.seq.load(Ordering::SeqCst);
        let mut meta = Meta::new(C);
        meta.color_key = Some((color, key));
        meta.name = name.to_string();
        let all = self.exchange(meta, None)?;
        let mut members: Vec<(usize, usize)> = all
            .iter()
            .enumerate()
            .filter_map(|(r, c)| {
                let (col, k) = c.meta.color_key.unwrap();
                (col == color).then_some((k, r))
            })
            .collect();
        members.sort_unstable();
        for (_, r) in &members {
            if all[*r].meta.name != name {
                return Err(self.mismatch(
                    C,
                    format!(
                        "members of color {color} name the new group differently: rank {r} says \
                         `{}`, rank {} says `{name}`",
                        all[*r].meta.name, self.rank
                    ),
                ));
            }
        }
        let rank = members
            .iter()
            .position(|&(_, r)| r == self.rank)
            .expect("a rank is a member of its own color");
        Ok(Self {
            world: self.world.clone(),
            path: Arc::from(format!("{}/{seq}:{color}", self.path)),
            name: name.to_string(),
            rank,
            global_ranks: members.iter().map(|&(_, r)| self.global_ranks[r]).collect(),
            device: self.device.clone(),
            seq: AtomicU64::new(0),
            broken: Mutex::new(None),
        })
    }
}
