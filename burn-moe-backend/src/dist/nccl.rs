//! NCCL implementation of [`Communicator`] for burn-cuda tensors (one process per GPU).
//!
//! # Synchronisation
//! CubeCL does not expose the CUDA stream its kernels run on, so NCCL runs on a stream of its own
//! and every collective is bracketed:
//! 1. `B::sync(device)`: everything Burn queued (including the kernels that produced the inputs)
//!    has finished, so the input buffers hold their final values;
//! 2. the NCCL call(s) are queued on our stream, reading the inputs' device pointers and writing
//!    into a freshly allocated output buffer that Burn has not handed to anyone else;
//! 3. we wait for our stream (polling it while keeping CubeCL's device thread awake, see
//!    [`WaitMode`]), watched by a watchdog thread, so that a peer that never arrives turns into
//!    [`CommError::Timeout`] (the communicator is then aborted) instead of a hang.
//!
//! When the call returns, the output is complete and the inputs are no longer read, so Burn may
//! reuse their memory. The price is that communication never overlaps Burn's compute inside one
//! collective; overlapping needs a hook into CubeCL's stream that 0.10 does not offer.
//!
//! The exceptions are a deferred all-gather ([`Communicator::defer_gathers`], FSDP's prefetch)
//! and a deferred reduce-scatter ([`Communicator::defer_reductions`], FSDP's gradient reduction
//! overlapping the next unit's backward pass): steps 1 and 2 as above, then a CUDA event recorded
//! on our stream; step 3 postponed to [`Communicator::wait_gathers`] /
//! [`Communicator::wait_reductions`], which wait for the event of the last collective of their kind
//! (so a gather queued before a reduction is not held up by it), or to the next blocking
//! collective, whose wait covers everything queued before it. Meanwhile Burn queues compute on its
//! own stream, which runs beside the transfer; its input and output are held by the communicator
//! until the wait, so neither CubeCL's allocator nor the output pool can hand their memory out
//! while NCCL reads or writes it, and the caller reads the output only after the wait.
//!
//! # Profiling
//! With `BURN_MOE_NCCL_PROFILE=1` in the environment at [`NcclComm::init`] (sub-communicators
//! from `split` inherit it), every collective leaves a [`CallProfile`]: host time of each step
//! above and device time of the NCCL kernels, to tell where a collective slower than torch's
//! spends the difference. [`NcclComm::take_profile`] drains them. Off, nothing is timed.
//!
//! # Which peer is missing
//! NCCL cannot tell which rank failed to join a collective; a timeout error therefore lists no
//! ranks. The launcher, which watches the worker processes, names the rank that died.

use std::marker::PhantomData;
use std::time::{Duration, Instant};

use burn::tensor::{DType, Shape, Tensor, TensorPrimitive, backend::Backend, ops::FloatTensor};
use burn_cubecl::{BoolElement, CubeBackend, FloatElement, IntElement, tensor::CubeTensor};
use cubecl::cuda::{CudaDevice, CudaRuntime};
use cudarc::driver::{result as cu, sys as cusys};
use cudarc::nccl::sys as nc;

use super::env::{DistEnv, rendezvous};
use super::{CommError, Communicator, OutputPool, ReduceOp, check_splits};

/// Backends whose float tensors live in burn-cuda buffers, so NCCL can read and write them.
pub trait CudaTensorAccess: Backend {
    /// The CUDA device ordinal of a Burn device of this backend.
    fn cuda_ordinal(device: &Self::Device) -> usize;
    /// Unwraps a float tensor down to its CubeCL CUDA tensor (autodiff tracking is dropped: the
    /// collectives themselves are not differentiable; differentiable wrappers such as the
    /// token-dispatch all-to-all define their own backward).
    fn into_cuda(tensor: FloatTensor<Self>) -> CubeTensor<CudaRuntime>;
    /// Wraps a CubeCL CUDA tensor back into this backend's float tensor.
    fn from_cuda(tensor: CubeTensor<CudaRuntime>) -> FloatTensor<Self>;
}

impl<F: FloatElement, I: IntElement, BT: BoolElement> CudaTensorAccess for CubeBackend<CudaRuntime, F, I, BT> {
    fn cuda_ordinal(device: &Self::Device) -> usize {
        device.index
    }
    fn into_cuda(tensor: FloatTensor<Self>) -> CubeTensor<CudaRuntime> {
        tensor
    }
    fn from_cuda(tensor: CubeTensor<CudaRuntime>) -> FloatTensor<Self> {
        tensor
    }
}

impl<B: CudaTensorAccess, C: burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy> CudaTensorAccess
    for burn::backend::Autodiff<B, C>
{
    fn cuda_ordinal(device: &Self::Device) -> usize {
        B::cuda_ordinal(device)
    }
    fn into_cuda(tensor: FloatTensor<Self>) -> CubeTensor<CudaRuntime> {
        B::into_cuda(<Self as burn::tensor::backend::AutodiffBackend>::inner(tensor))
    }
    fn from_cuda(tensor: CubeTensor<CudaRuntime>) -> FloatTensor<Self> {
        <Self as burn::tensor::backend::AutodiffBackend>::from_inner(B::from_cuda(tensor))
    }
}

impl<B> CudaTensorAccess for burn_fusion::Fusion<B>
where
    B: burn_fusion::FusionBackend + CudaTensorAccess,
{
    fn cuda_ordinal(device: &Self::Device) -> usize {
        B::cuda_ordinal(device)
    }
    fn into_cuda(tensor: FloatTensor<Self>) -> CubeTensor<CudaRuntime> {
        let client = tensor.client.clone();
        B::into_cuda(client.resolve_tensor_float::<B>(tensor))
    }
    fn from_cuda(tensor: CubeTensor<CudaRuntime>) -> FloatTensor<Self> {
        use burn::tensor::TensorMetadata;
        use burn_ir::{InitOperationIr, OperationIr};
        let inner = B::from_cuda(tensor);
        let device = B::float_device(&inner);
        // The same registration Fusion's own `float_from_data` performs for a tensor made by the
        // inner backend.
        let client = burn_fusion::get_client::<B>(&device);
        let shape = inner.shape();
        let dtype = inner.dtype();
        let handle = <B as burn_ir::BackendIr>::float_tensor_handle(inner);
        let desc = InitOperationIr::create(shape, dtype, || client.register_tensor_handle(handle));
        client
            .register(
                burn_fusion::stream::OperationStreams::default(),
                OperationIr::Init(desc),
                burn_fusion::NoOp::<B>::new(),
            )
            .remove(0)
    }
}

/// Settings of an NCCL process group.
#[derive(Debug, Clone)]
pub struct NcclConfig {
    /// How long a collective (or the start-up rendezvous) may wait for the other ranks.
    pub timeout: Duration,
    /// Bytes of output buffers each communicator keeps for reuse once their tensors are dropped
    /// (see [`OutputPool`]); `0` allocates every output afresh. Default: the environment variable
    /// `BURN_MOE_NCCL_POOL_BYTES` (read like NCCL's own `NCCL_*` settings, so a launcher can set it
    /// for every rank), else [`OutputPool::DEFAULT_BYTES`].
    pub output_pool_bytes: u64,
    /// How step 3 waits for our stream (see [`WaitMode`]). Default: the environment variable
    /// `BURN_MOE_NCCL_WAIT` (`warm` or `block`), else [`WaitMode::Warm`].
    pub wait: WaitMode,
}

/// How a collective waits for its NCCL kernels (step 3 of the module's synchronisation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitMode {
    /// One blocking `cuStreamSynchronize` (the thread sleeps until the stream is done).
    Block,
    /// Poll our stream, and between polls hand CubeCL's device thread a `B::sync` (an empty round
    /// trip), so that thread is awake when the next collective (or Burn op) reaches it. Why: a
    /// per-call profile on 2 × H200 found the input's device-pointer lookup — a round trip to
    /// CubeCL's device thread — taking 30–200 µs after blocking waits of ≥ 150 µs and ~9 µs after
    /// short ones: that thread's wake-up from sleep, the whole gap to torch's bus bandwidth at
    /// 64–256 MiB. Kept awake, every lookup took 7–9 µs and the collectives reached 96–113% of
    /// torch's; the 2-GPU FSDP2 step went from 0.30 to 0.26 s (BENCHMARKS.md, NCCL section). The
    /// default; it keeps one core busy while a collective runs.
    Warm,
}

impl WaitMode {
    /// `BURN_MOE_NCCL_WAIT` (`warm` | `block`), [`WaitMode::Warm`] when unset or unknown.
    fn from_env() -> Self {
        match std::env::var("BURN_MOE_NCCL_WAIT").ok().as_deref().map(str::trim) {
            Some("block") => WaitMode::Block,
            _ => WaitMode::Warm,
        }
    }
}

impl Default for NcclConfig {
    fn default() -> Self {
        let output_pool_bytes = std::env::var("BURN_MOE_NCCL_POOL_BYTES").ok().and_then(|v| v.trim().parse().ok());
        Self {
            timeout: Duration::from_secs(600),
            output_pool_bytes: output_pool_bytes.unwrap_or(OutputPool::DEFAULT_BYTES),
            wait: WaitMode::from_env(),
        }
    }
}

/// One rank of an NCCL communicator, bound to one CUDA device and to Burn backend `B`.
pub struct NcclComm<B: CudaTensorAccess> {
    comm: nc::ncclComm_t,
    stream: cusys::CUstream,
    ctx: cusys::CUcontext,
    device: B::Device,
    rank: usize,
    size: usize,
    name: String,
    global_ranks: Vec<usize>,
    timeout: Duration,
    watchdog: Watchdog,
    aborted: std::cell::Cell<bool>,
    /// Output buffers for reuse.
    pool: std::cell::RefCell<OutputPool>,
    /// [`Communicator::defer_gathers`] is on.
    defer: std::cell::Cell<bool>,
    /// [`Communicator::defer_reductions`] is on.
    defer_reductions: std::cell::Cell<bool>,
    /// The deferred collectives queued but not yet waited for, oldest first.
    in_flight: std::cell::RefCell<Vec<InFlight>>,
    /// `Some` when profiling is on (`BURN_MOE_NCCL_PROFILE=1`).
    profile: Option<Profiler>,
    /// How step 3 waits.
    wait_mode: WaitMode,
    _backend: PhantomData<B>,
}

// SAFETY: the raw NCCL communicator, CUDA stream and context handles are plain handles that CUDA
// and NCCL allow to be used from any thread (one thread at a time, which `&self` methods of a
// `!Sync` type guarantee).
unsafe impl<B: CudaTensorAccess> Send for NcclComm<B> {}

fn nccl_err(collective: &'static str, group: &str, e: impl std::fmt::Debug) -> CommError {
    CommError::Transport { collective, group: group.to_string(), detail: format!("NCCL: {e:?}") }
}

fn cuda_err(collective: &'static str, group: &str, e: impl std::fmt::Debug) -> CommError {
    CommError::Transport { collective, group: group.to_string(), detail: format!("CUDA: {e:?}") }
}

fn nccl_dtype(dtype: DType) -> Option<nc::ncclDataType_t> {
    Some(match dtype {
        DType::F32 => nc::ncclDataType_t::ncclFloat32,
        DType::F64 => nc::ncclDataType_t::ncclFloat64,
        DType::F16 => nc::ncclDataType_t::ncclFloat16,
        DType::BF16 => nc::ncclDataType_t::ncclBfloat16,
        DType::I32 => nc::ncclDataType_t::ncclInt32,
        DType::I64 => nc::ncclDataType_t::ncclInt64,
        _ => return None,
    })
}

fn nccl_op(op: ReduceOp) -> nc::ncclRedOp_t {
    match op {
        ReduceOp::Sum => nc::ncclRedOp_t::ncclSum,
        ReduceOp::Avg => nc::ncclRedOp_t::ncclAvg,
    }
}

/// Which wait a deferred collective belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Deferred {
    Gather,
    Reduction,
}

/// A deferred collective on our stream: its input and output, held so that neither CubeCL nor
/// the pool hands their memory to anyone while NCCL still reads or writes it, and the event
/// recorded after it (`None` if recording failed: its wait then synchronises the whole stream).
struct InFlight {
    kind: Deferred,
    event: Option<cusys::CUevent>,
    _buffers: [CubeTensor<CudaRuntime>; 2],
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(event) = self.event.take() {
            // SAFETY: an event this communicator created; destroying one not yet reached is
            // allowed (CUDA releases it once it completes).
            unsafe { cu::event::destroy(event) }.ok();
        }
    }
}

/// A contiguous device buffer of a tensor, as NCCL sees it.
struct Buf {
    tensor: CubeTensor<CudaRuntime>,
    ptr: u64,
}

impl Buf {
    /// Bytes of the tensor (not of the allocation, which a zero-length output pads).
    fn bytes(&self) -> u64 {
        (self.tensor.meta.shape().num_elements() * self.tensor.dtype.size()) as u64
    }
}

/// Where one collective's time went (see the module's "Profiling"): host microseconds of each
/// step, so a gap to another NCCL user can be pinned on Burn's sync, the output allocation, the
/// enqueue or the wait, and the device time of the NCCL kernels themselves.
#[derive(Debug, Clone, Default)]
pub struct CallProfile {
    /// `all_gather`, `reduce_scatter`, `all_reduce`, `all_to_all_single`, `broadcast`, or
    /// `wait_gathers` / `wait_reductions` (the wait for deferred all-gathers / reduce-scatters,
    /// only `wait_us` and `total_us` set).
    pub collective: &'static str,
    /// Bytes of the input tensor.
    pub in_bytes: u64,
    /// Bytes of the output tensor.
    pub out_bytes: u64,
    /// All of step 1 (unwrapping, the two parts below, making the context current).
    pub prepare_us: f64,
    /// Part of `prepare_us`: making the input contiguous and looking up its device pointer.
    pub contiguous_us: f64,
    /// Part of `prepare_us`: `B::sync`, i.e. waiting for the Burn work that produced the input.
    pub sync_us: f64,
    /// From the end of step 1 to the NCCL call: mostly the output buffer (pool or CubeCL).
    pub alloc_us: f64,
    /// Step 2: queueing the NCCL call(s), group start/end included.
    pub enqueue_us: f64,
    /// Step 3: waiting for our stream (0 for a deferred all-gather, which waits later).
    pub wait_us: f64,
    /// GPU time between CUDA events recorded on our stream around the NCCL call(s); includes
    /// waiting inside NCCL's kernels for a late peer. `None` for deferred all-gathers.
    pub device_us: Option<f64>,
    /// The whole call, from entry to the output in hand.
    pub total_us: f64,
    /// Largest power of two (up to 4096) dividing the input's device pointer: NCCL's kernels
    /// take slower paths for poorly aligned buffers.
    pub in_ptr_align: u64,
    /// The same for the output's device pointer.
    pub out_ptr_align: u64,
}

/// Largest power of two, capped at 4096, dividing `ptr`.
fn ptr_align(ptr: u64) -> u64 {
    1 << ptr.trailing_zeros().min(12)
}

/// A communicator's profiling state: two timing events reused by every call, and the records.
struct Profiler {
    start: cusys::CUevent,
    end: cusys::CUevent,
    calls: std::cell::RefCell<Vec<CallProfile>>,
}

impl Profiler {
    /// On when `BURN_MOE_NCCL_PROFILE=1`; the events belong to the current CUDA context.
    fn from_env() -> Result<Option<Self>, String> {
        if !std::env::var("BURN_MOE_NCCL_PROFILE").is_ok_and(|v| v.trim() == "1") {
            return Ok(None);
        }
        Self::new().map(Some)
    }

    fn new() -> Result<Self, String> {
        let event = || cu::event::create(cusys::CUevent_flags::CU_EVENT_DEFAULT).map_err(|e| format!("creating a timing event: {e:?}"));
        let start = event()?;
        let end = match event() {
            Ok(end) => end,
            Err(e) => {
                unsafe { cu::event::destroy(start) }.ok();
                return Err(e);
            }
        };
        Ok(Self { start, end, calls: std::cell::RefCell::new(Vec::new()) })
    }

    /// Destroys the events (the communicator's context is current).
    fn destroy(&self) {
        unsafe {
            let _ = cu::event::destroy(self.start);
            let _ = cu::event::destroy(self.end);
        }
    }
}

/// One collective being profiled: its record so far and the host clock of its phases.
struct Rec {
    start: Instant,
    last: Instant,
    /// Both events were recorded around the NCCL call(s).
    events: bool,
    p: CallProfile,
}

impl Rec {
    fn new(collective: &'static str) -> Self {
        let now = Instant::now();
        Self { start: now, last: now, events: false, p: CallProfile { collective, ..CallProfile::default() } }
    }

    /// Microseconds since the previous lap (or the start); starts the next one.
    fn lap(&mut self) -> f64 {
        let now = Instant::now();
        let us = (now - self.last).as_secs_f64() * 1e6;
        self.last = now;
        us
    }

    /// Microseconds from the start to the latest lap.
    fn elapsed_us(&self) -> f64 {
        (self.last - self.start).as_secs_f64() * 1e6
    }
}

impl<B: CudaTensorAccess> NcclComm<B> {
    /// Starts the world group described by `env` on `device` (normally `LOCAL_RANK`'s GPU):
    /// rank 0 creates NCCL's unique id and hands it out through the TCP rendezvous, then every
    /// rank joins the communicator.
    pub fn init(env: &DistEnv, device: B::Device, config: NcclConfig) -> Result<Self, CommError> {
        let id = rendezvous(env, 0, config.timeout, || {
            let id = cudarc::nccl::result::get_uniqueid()
                .map_err(|e| CommError::Setup(format!("ncclGetUniqueId failed (is libnccl.so.2 on LD_LIBRARY_PATH?): {e:?}")))?;
            Ok(id.internal.iter().map(|&c| c as u8).collect())
        })?;
        if id.len() != 128 {
            return Err(CommError::Setup(format!("rendezvous delivered {} bytes, expected a 128-byte NCCL id", id.len())));
        }
        let mut unique = nc::ncclUniqueId { internal: [0; 128] };
        for (dst, src) in unique.internal.iter_mut().zip(&id) {
            *dst = *src as std::ffi::c_char;
        }
        let ctx = Self::activate(&device)?;
        let stream = cu::stream::create(cu::stream::StreamKind::NonBlocking)
            .map_err(|e| CommError::Setup(format!("creating the NCCL stream: {e:?}")))?;
        let profile = Profiler::from_env().map_err(CommError::Setup)?;
        let mut comm = std::ptr::null_mut();
        unsafe { nc::ncclCommInitRank(&mut comm, env.world_size as i32, unique, env.rank as i32) }
            .result()
            .map_err(|e| CommError::Setup(format!("ncclCommInitRank (rank {} of {}): {e:?}", env.rank, env.world_size)))?;
        Ok(Self {
            comm,
            stream,
            ctx,
            device,
            rank: env.rank,
            size: env.world_size,
            name: "world".to_string(),
            global_ranks: (0..env.world_size).collect(),
            timeout: config.timeout,
            watchdog: Watchdog::start(comm),
            aborted: std::cell::Cell::new(false),
            pool: std::cell::RefCell::new(OutputPool::new(config.output_pool_bytes)),
            defer: std::cell::Cell::new(false),
            defer_reductions: std::cell::Cell::new(false),
            in_flight: std::cell::RefCell::new(Vec::new()),
            profile,
            wait_mode: config.wait,
            _backend: PhantomData,
        })
    }

    /// Whether collectives are profiled (`BURN_MOE_NCCL_PROFILE=1` at `init`).
    pub fn profiling(&self) -> bool {
        self.profile.is_some()
    }

    /// The [`CallProfile`]s recorded since the last call, oldest first (empty when profiling is
    /// off); draining keeps a long run's records from piling up.
    pub fn take_profile(&self) -> Vec<CallProfile> {
        self.profile.as_ref().map(|p| std::mem::take(&mut *p.calls.borrow_mut())).unwrap_or_default()
    }

    /// How many collective outputs reused a kept buffer so far (see [`OutputPool`]).
    pub fn outputs_reused(&self) -> u64 {
        self.pool.borrow().reused()
    }

    /// The Burn device this communicator's tensors live on.
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// Makes the primary context of `device` (the one CubeCL uses) current on this thread.
    fn activate(device: &B::Device) -> Result<cusys::CUcontext, CommError> {
        // Touch the device through Burn first so CubeCL has initialised the driver and context.
        let _ = Tensor::<B, 1>::zeros([1], device);
        B::sync(device).map_err(|e| CommError::Setup(format!("syncing the Burn device: {e:?}")))?;
        crate::cuda::activate_primary_context(B::cuda_ordinal(device)).map_err(CommError::Setup)
    }

    fn buf(&self, tensor: CubeTensor<CudaRuntime>, collective: &'static str) -> Result<Buf, CommError> {
        let tensor = if tensor.is_contiguous() { tensor } else { burn_cubecl::kernel::into_contiguous(tensor) };
        let resource = tensor
            .client
            .get_resource(tensor.handle.clone())
            .map_err(|e| cuda_err(collective, &self.name, e))?;
        let ptr = resource.resource().ptr;
        Ok(Buf { tensor, ptr })
    }

    /// An output buffer of `shape`: from the [`OutputPool`] when `pooled` (collectives whose sizes
    /// repeat: gathers and reductions of parameters and gradients), else fresh (the token
    /// all-to-all, whose sizes follow the routing and would fill the pool with buffers never asked
    /// for again).
    fn empty(&self, like: &CubeTensor<CudaRuntime>, shape: Shape, pooled: bool, collective: &'static str) -> Result<Buf, CommError> {
        // A zero-byte allocation is not a valid NCCL buffer; one element keeps pointers valid.
        let bytes = (shape.num_elements() * like.dtype.size()).max(like.dtype.size());
        let handle = if pooled { self.pool.borrow_mut().take(bytes as u64, || like.client.empty(bytes)) } else { like.client.empty(bytes) };
        let tensor = CubeTensor::new_contiguous(like.client.clone(), like.device.clone(), shape, handle, like.dtype);
        self.buf(tensor, collective)
    }

    /// Starts the profile of a collective; `None` (and nothing timed) when profiling is off.
    fn rec(&self, collective: &'static str) -> Option<Rec> {
        self.profile.as_ref().map(|_| Rec::new(collective))
    }

    /// Step 1 of every collective: Burn's queued work is done and the input is a raw buffer.
    fn prepare<const D: usize>(
        &self,
        tensor: Tensor<B, D>,
        collective: &'static str,
        rec: &mut Option<Rec>,
    ) -> Result<(Buf, nc::ncclDataType_t), CommError> {
        if self.aborted.get() {
            return Err(CommError::PeerFailed {
                collective,
                group: self.name.clone(),
                rank: self.rank,
                reason: "this communicator was aborted after an earlier failure".into(),
            });
        }
        let cube = B::into_cuda(tensor.into_primitive().tensor());
        let dtype = nccl_dtype(cube.dtype).ok_or_else(|| CommError::InvalidArgument {
            collective,
            group: self.name.clone(),
            detail: format!("dtype {:?} has no NCCL type", cube.dtype),
        })?;
        let mut lap = || rec.as_mut().map_or(0.0, Rec::lap);
        lap();
        let input = self.buf(cube, collective)?;
        let contiguous_us = lap();
        B::sync(&self.device).map_err(|e| cuda_err(collective, &self.name, e))?;
        let sync_us = lap();
        unsafe { cu::ctx::set_current(self.ctx) }.map_err(|e| cuda_err(collective, &self.name, e))?;
        lap();
        if let Some(r) = rec.as_mut() {
            (r.p.contiguous_us, r.p.sync_us, r.p.prepare_us) = (contiguous_us, sync_us, r.elapsed_us());
        }
        Ok((input, dtype))
    }

    /// Step 2: `call` queues the NCCL call(s) on our stream; when profiled, between the two
    /// timing events, and the time since step 1 counts as the output's allocation.
    fn enqueue<T>(
        &self,
        rec: &mut Option<Rec>,
        input: &Buf,
        out: &Buf,
        call: impl FnOnce() -> Result<T, CommError>,
    ) -> Result<T, CommError> {
        let (Some(r), Some(prof)) = (rec.as_mut(), self.profile.as_ref()) else { return call() };
        r.p.alloc_us = r.lap();
        (r.p.in_bytes, r.p.out_bytes) = (input.bytes(), out.bytes());
        (r.p.in_ptr_align, r.p.out_ptr_align) = (ptr_align(input.ptr), ptr_align(out.ptr));
        // A failed event only costs the device time, never the collective.
        r.events = unsafe { cu::event::record(prof.start, self.stream) }.is_ok();
        let queued = call()?;
        r.events &= unsafe { cu::event::record(prof.end, self.stream) }.is_ok();
        r.p.enqueue_us = r.lap();
        Ok(queued)
    }

    /// Ends a profiled collective: the time since step 2 is the wait when `waited` (the caller
    /// has just returned from `wait`), and the events hold the device time.
    fn record(&self, rec: Option<Rec>, waited: bool) {
        let (Some(mut r), Some(prof)) = (rec, self.profile.as_ref()) else { return };
        if waited {
            r.p.wait_us = r.lap();
            if r.events {
                r.p.device_us = unsafe { cu::event::elapsed(prof.start, prof.end) }.ok().map(|ms| ms as f64 * 1e3);
            }
        } else {
            r.lap();
        }
        r.p.total_us = r.elapsed_us();
        prof.calls.borrow_mut().push(r.p);
    }

    /// Step 3: waits for our stream; on timeout the watchdog aborts the communicator, which makes
    /// NCCL's kernels return, so the wait ends with [`CommError::Timeout`] instead of a hang.
    ///
    /// A wait watched by a second thread is what torch's NCCL watchdog does too. How this thread
    /// waits is [`WaitMode`] (polling without keeping CubeCL's device thread awake measured 10-20%
    /// slower at 64-256 MiB than blocking; polling with it, faster than both).
    /// `rec`, the call's profile (if profiling), is completed and kept once the wait succeeded.
    fn wait(&self, collective: &'static str, rec: Option<Rec>) -> Result<(), CommError> {
        self.watched(collective, || {
            // With deferred collectives in flight Burn may have compute queued, which a ping would
            // wait for (and the overlap would be lost): those waits block.
            match self.wait_mode {
                WaitMode::Warm if self.in_flight.borrow().is_empty() => self.poll_warm(),
                _ => unsafe { cu::stream::synchronize(self.stream) },
            }
        })?;
        // Our stream ran everything queued before this wait, deferred collectives included.
        self.in_flight.borrow_mut().clear();
        self.record(rec, true);
        Ok(())
    }

    /// Runs `block` (a wait for our stream or one of its events) under the watchdog, then turns a
    /// timeout (the watchdog aborted the communicator), a CUDA error or an error NCCL reports
    /// asynchronously into [`CommError`].
    fn watched(&self, collective: &'static str, block: impl FnOnce() -> Result<(), cudarc::driver::DriverError>) -> Result<(), CommError> {
        self.watchdog.arm(Instant::now() + self.timeout);
        let synced = block();
        if self.watchdog.disarm() {
            self.aborted.set(true);
            return Err(CommError::Timeout { collective, group: self.name.clone(), missing: Vec::new(), timeout: self.timeout });
        }
        synced.map_err(|e| cuda_err(collective, &self.name, e))?;
        let mut async_err = nc::ncclResult_t::ncclSuccess;
        unsafe { nc::ncclCommGetAsyncError(self.comm, &mut async_err) };
        if async_err != nc::ncclResult_t::ncclSuccess && async_err != nc::ncclResult_t::ncclInProgress {
            self.abort();
            return Err(nccl_err(collective, &self.name, async_err));
        }
        Ok(())
    }

    /// Queues the end of a deferred collective: `prepare` synced Burn, so its input is final;
    /// both buffers stay referenced until its wait, which waits for the event recorded here.
    fn defer(&self, kind: Deferred, input: Buf, out: &Buf) {
        let event = cu::event::create(cusys::CUevent_flags::CU_EVENT_DISABLE_TIMING).ok().and_then(|event| {
            // SAFETY: our stream and a fresh event of the current context (`prepare`).
            match unsafe { cu::event::record(event, self.stream) } {
                Ok(()) => Some(event),
                Err(_) => {
                    unsafe { cu::event::destroy(event) }.ok();
                    None
                }
            }
        });
        self.in_flight.borrow_mut().push(InFlight { kind, event, _buffers: [input.tensor, out.tensor.clone()] });
    }

    /// Waits for the deferred collectives of `kind` (and everything queued on our stream before
    /// the last of them), then releases their buffers. Bounded by the watchdog like [`wait`].
    fn wait_deferred(&self, kind: Deferred, collective: &'static str) -> Result<(), CommError> {
        let Some(last) = self.in_flight.borrow().iter().rposition(|f| f.kind == kind) else { return Ok(()) };
        let event = self.in_flight.borrow()[last].event;
        let rec = self.rec(match kind {
            Deferred::Gather => "wait_gathers",
            Deferred::Reduction => "wait_reductions",
        });
        let Some(event) = event else {
            // No event to wait for: the whole stream it is.
            return self.wait(collective, rec);
        };
        unsafe { cu::ctx::set_current(self.ctx) }.map_err(|e| cuda_err(collective, &self.name, e))?;
        // SAFETY: an event recorded on our stream, alive until its entry is dropped below.
        self.watched(collective, || unsafe { cu::event::synchronize(event) })?;
        // Stream order: everything up to the event has run.
        self.in_flight.borrow_mut().drain(..=last);
        self.record(rec, true);
        Ok(())
    }

    /// [`WaitMode::Warm`]: polls our stream until it is done, pinging CubeCL's device thread in
    /// between (no deferred collective is in flight, so no Burn work is queued and the sync is empty). The
    /// watchdog still bounds the wait: its abort makes NCCL's kernels return and the stream finish.
    fn poll_warm(&self) -> Result<(), cudarc::driver::DriverError> {
        // SAFETY: our stream, created with the communicator; its context is current (`prepare`).
        unsafe {
            crate::cuda::wait_stream_warm(self.stream, || {
                let _ = B::sync(&self.device);
            })
        }
    }

    fn abort(&self) {
        if !self.aborted.replace(true) && !self.watchdog.fired() {
            unsafe {
                nc::ncclCommAbort(self.comm);
            }
        }
    }

    fn finish<const D: usize>(&self, out: Buf) -> Tensor<B, D> {
        Tensor::from_primitive(TensorPrimitive::Float(B::from_cuda(out.tensor)))
    }

    fn check_dim<const D: usize>(&self, dim: usize, collective: &'static str) -> Result<(), CommError> {
        if dim >= D {
            return Err(CommError::InvalidArgument {
                collective,
                group: self.name.clone(),
                detail: format!("dim {dim} out of range for a {D}-d tensor"),
            });
        }
        Ok(())
    }

    /// All-gather along dim 0 of a contiguous tensor (NCCL's native layout).
    fn all_gather0<const D: usize>(&self, tensor: Tensor<B, D>) -> Result<Tensor<B, D>, CommError> {
        const C: &str = "all_gather";
        let mut rec = self.rec(C);
        let (input, dtype) = self.prepare(tensor, C, &mut rec)?;
        let dims = input.tensor.meta.shape().clone();
        let mut out_shape = dims.clone();
        out_shape[0] *= self.size;
        let out = self.empty(&input.tensor, out_shape, true, C)?;
        let count = dims.num_elements();
        self.enqueue(&mut rec, &input, &out, || {
            unsafe { nc::ncclAllGather(input.ptr as *const _, out.ptr as *mut _, count, dtype, self.comm, self.stream as _) }
                .result()
                .map_err(|e| nccl_err(C, &self.name, e))
        })?;
        if self.defer.get() {
            // Step 3 comes later (`wait_gathers`).
            self.defer(Deferred::Gather, input, &out);
            self.record(rec, false);
            return Ok(self.finish(out));
        }
        self.wait(C, rec)?;
        drop(input);
        Ok(self.finish(out))
    }

    fn reduce_scatter0<const D: usize>(&self, tensor: Tensor<B, D>, op: ReduceOp) -> Result<Tensor<B, D>, CommError> {
        const C: &str = "reduce_scatter";
        let mut rec = self.rec(C);
        let (input, dtype) = self.prepare(tensor, C, &mut rec)?;
        let dims = input.tensor.meta.shape().clone();
        if dims[0] % self.size != 0 {
            return Err(CommError::InvalidArgument {
                collective: C,
                group: self.name.clone(),
                detail: format!("length {} of the scattered dim is not divisible by the group size {}", dims[0], self.size),
            });
        }
        let mut out_shape = dims.clone();
        out_shape[0] /= self.size;
        let count = out_shape.num_elements();
        let out = self.empty(&input.tensor, out_shape, true, C)?;
        self.enqueue(&mut rec, &input, &out, || {
            unsafe {
                nc::ncclReduceScatter(input.ptr as *const _, out.ptr as *mut _, count, dtype, nccl_op(op), self.comm, self.stream as _)
            }
            .result()
            .map_err(|e| nccl_err(C, &self.name, e))
        })?;
        if self.defer_reductions.get() {
            // Step 3 comes later (`wait_reductions`).
            self.defer(Deferred::Reduction, input, &out);
            self.record(rec, false);
            return Ok(self.finish(out));
        }
        self.wait(C, rec)?;
        drop(input);
        Ok(self.finish(out))
    }
}

impl<B: CudaTensorAccess> Drop for NcclComm<B> {
    fn drop(&mut self) {
        unsafe {
            let _ = cu::ctx::set_current(self.ctx);
            if !self.in_flight.get_mut().is_empty() && !self.aborted.get() {
                // Deferred transfers may still use buffers that dropping their entries hands back
                // to CubeCL: let them finish (bounded by the watchdog, which aborts a stuck one).
                self.watchdog.arm(Instant::now() + self.timeout);
                let _ = cu::stream::synchronize(self.stream);
                self.watchdog.disarm();
            }
            self.in_flight.get_mut().clear();
            self.watchdog.stop();
            if !self.aborted.get() && !self.watchdog.fired() {
                nc::ncclCommDestroy(self.comm);
            }
            if let Some(p) = &self.profile {
                p.destroy();
            }
            let _ = cu::stream::destroy(self.stream);
        }
    }
}

impl<B: CudaTensorAccess> Communicator<B> for NcclComm<B> {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn group_name(&self) -> &str {
        &self.name
    }

    fn global_ranks(&self) -> &[usize] {
        &self.global_ranks
    }

    fn all_reduce<const D: usize>(&self, tensor: Tensor<B, D>, op: ReduceOp) -> Result<Tensor<B, D>, CommError> {
        const C: &str = "all_reduce";
        let mut rec = self.rec(C);
        let (input, dtype) = self.prepare(tensor, C, &mut rec)?;
        let shape = input.tensor.meta.shape().clone();
        let count = shape.num_elements();
        let out = self.empty(&input.tensor, shape, true, C)?;
        self.enqueue(&mut rec, &input, &out, || {
            unsafe {
                nc::ncclAllReduce(input.ptr as *const _, out.ptr as *mut _, count, dtype, nccl_op(op), self.comm, self.stream as _)
            }
            .result()
            .map_err(|e| nccl_err(C, &self.name, e))
        })?;
        self.wait(C, rec)?;
        drop(input);
        Ok(self.finish(out))
    }

    fn all_gather<const D: usize>(&self, tensor: Tensor<B, D>, dim: usize) -> Result<Tensor<B, D>, CommError> {
        self.check_dim::<D>(dim, "all_gather")?;
        if dim == 0 {
            return self.all_gather0(tensor);
        }
        // Concatenation along `dim` = concatenation along 0 of the tensors with `dim` moved to the
        // front; the swap back restores the layout (and costs one copy each way). Not deferred:
        // the layout a caller gets back is not NCCL's output buffer as written.
        let defer = self.defer.replace(false);
        let gathered = self.all_gather0(tensor.swap_dims(0, dim));
        self.defer.set(defer);
        Ok(gathered?.swap_dims(0, dim))
    }

    fn reduce_scatter<const D: usize>(&self, tensor: Tensor<B, D>, dim: usize, op: ReduceOp) -> Result<Tensor<B, D>, CommError> {
        self.check_dim::<D>(dim, "reduce_scatter")?;
        if dim == 0 {
            return self.reduce_scatter0(tensor, op);
        }
        // Not deferred: the caller's layout is a swap of NCCL's output (see `all_gather`).
        let defer = self.defer_reductions.replace(false);
        let part = self.reduce_scatter0(tensor.swap_dims(0, dim), op);
        self.defer_reductions.set(defer);
        Ok(part?.swap_dims(0, dim))
    }

    fn all_to_all_single<const D: usize>(
        &self,
        tensor: Tensor<B, D>,
        input_splits: &[usize],
        output_splits: &[usize],
    ) -> Result<Tensor<B, D>, CommError> {
        const C: &str = "all_to_all_single";
        let mut rec = self.rec(C);
        let dims = tensor.dims();
        check_splits(&self.name, self.size, dims[0], input_splits, output_splits)?;
        let (input, dtype) = self.prepare(tensor, C, &mut rec)?;
        let row: usize = dims[1..].iter().product();
        let elem = input.tensor.dtype.size();
        let mut out_dims = dims;
        out_dims[0] = output_splits.iter().sum();
        let out = self.empty(&input.tensor, Shape::from(out_dims.to_vec()), false, C)?;
        // Grouped point-to-point calls: NCCL matches each send with the peer's recv and runs them
        // concurrently, which is how all-to-all-v is expressed in NCCL.
        self.enqueue(&mut rec, &input, &out, || {
            let (mut send_off, mut recv_off) = (0usize, 0usize);
            let result = (|| {
                nc_ok(unsafe { nc::ncclGroupStart() })?;
                for peer in 0..self.size {
                    let (ns, nr) = (input_splits[peer] * row, output_splits[peer] * row);
                    if ns > 0 {
                        nc_ok(unsafe {
                            nc::ncclSend((input.ptr + (send_off * elem) as u64) as *const _, ns, dtype, peer as i32, self.comm, self.stream as _)
                        })?;
                    }
                    if nr > 0 {
                        nc_ok(unsafe {
                            nc::ncclRecv((out.ptr + (recv_off * elem) as u64) as *mut _, nr, dtype, peer as i32, self.comm, self.stream as _)
                        })?;
                    }
                    send_off += ns;
                    recv_off += nr;
                }
                nc_ok(unsafe { nc::ncclGroupEnd() })
            })();
            result.map_err(|e| nccl_err(C, &self.name, e))
        })?;
        self.wait(C, rec)?;
        drop(input);
        Ok(self.finish(out))
    }

    fn broadcast<const D: usize>(&self, tensor: Tensor<B, D>, root: usize) -> Result<Tensor<B, D>, CommError> {
        const C: &str = "broadcast";
        if root >= self.size {
            return Err(CommError::InvalidArgument {
                collective: C,
                group: self.name.clone(),
                detail: format!("root {root} is not a rank of a group of {}", self.size),
            });
        }
        let mut rec = self.rec(C);
        let (input, dtype) = self.prepare(tensor, C, &mut rec)?;
        let shape = input.tensor.meta.shape().clone();
        let count = shape.num_elements();
        let out = self.empty(&input.tensor, shape, true, C)?;
        self.enqueue(&mut rec, &input, &out, || {
            unsafe {
                nc::ncclBroadcast(input.ptr as *const _, out.ptr as *mut _, count, dtype, root as i32, self.comm, self.stream as _)
            }
            .result()
            .map_err(|e| nccl_err(C, &self.name, e))
        })?;
        self.wait(C, rec)?;
        drop(input);
        Ok(self.finish(out))
    }

    fn defer_gathers(&self, on: bool) {
        self.defer.set(on);
    }

    fn wait_gathers(&self) -> Result<(), CommError> {
        // No timing events: the gathers' NCCL calls were timed (host only) when queued.
        self.wait_deferred(Deferred::Gather, "all_gather (deferred)")
    }

    fn defer_reductions(&self, on: bool) {
        self.defer_reductions.set(on);
    }

    fn wait_reductions(&self) -> Result<(), CommError> {
        self.wait_deferred(Deferred::Reduction, "reduce_scatter (deferred)")
    }

    fn barrier(&self) -> Result<(), CommError> {
        let one = Tensor::<B, 1>::ones([1], &self.device);
        let sum = self.all_reduce(one, ReduceOp::Sum)?;
        drop(sum);
        Ok(())
    }

    fn split(&self, color: usize, key: usize, name: &str) -> Result<Self, CommError> {
        const C: &str = "split";
        // Everyone learns everyone's (color, key) first, to know the new group's members and
        // their global ranks (NCCL does not report them). f64 holds any realistic color/key.
        let mine = Tensor::<B, 1>::from_data(
            burn::tensor::TensorData::new(vec![color as f64, key as f64], [2]).convert::<f32>(),
            &self.device,
        );
        if color > (1 << 24) || key > (1 << 24) {
            return Err(CommError::InvalidArgument {
                collective: C,
                group: self.name.clone(),
                detail: format!("color {color} / key {key} above 2^24"),
            });
        }
        let all = self.all_gather(mine, 0)?.into_data().convert::<f32>();
        let all = all.as_slice::<f32>().map_err(|e| cuda_err(C, &self.name, format!("{e:?}")))?;
        let mut members: Vec<(usize, usize)> = (0..self.size)
            .filter(|&r| all[2 * r] as usize == color)
            .map(|r| (all[2 * r + 1] as usize, r))
            .collect();
        members.sort();
        let new_rank = members.iter().position(|&(_, r)| r == self.rank).expect("this rank is a member of its color");
        let global_ranks = members.iter().map(|&(_, r)| self.global_ranks[r]).collect();

        unsafe { cu::ctx::set_current(self.ctx) }.map_err(|e| cuda_err(C, &self.name, e))?;
        let stream = cu::stream::create(cu::stream::StreamKind::NonBlocking).map_err(|e| cuda_err(C, &self.name, e))?;
        let profile = match self.profile {
            Some(_) => Some(Profiler::new().map_err(|e| cuda_err(C, &self.name, e))?),
            None => None,
        };
        let mut comm = std::ptr::null_mut();
        unsafe { nc::ncclCommSplit(self.comm, color as i32, key as i32, &mut comm, std::ptr::null_mut()) }
            .result()
            .map_err(|e| nccl_err(C, &self.name, e))?;
        Ok(Self {
            comm,
            stream,
            ctx: self.ctx,
            device: self.device.clone(),
            rank: new_rank,
            size: members.len(),
            name: name.to_string(),
            global_ranks,
            timeout: self.timeout,
            watchdog: Watchdog::start(comm),
            aborted: std::cell::Cell::new(false),
            pool: std::cell::RefCell::new(OutputPool::new(self.pool.borrow().cap())),
            defer: std::cell::Cell::new(false),
            defer_reductions: std::cell::Cell::new(false),
            in_flight: std::cell::RefCell::new(Vec::new()),
            profile,
            wait_mode: self.wait_mode,
            _backend: PhantomData,
        })
    }
}

/// Aborts a communicator whose collective outlives its deadline (from its own thread, so the
/// thread blocked in `cuStreamSynchronize` is released).
struct Watchdog {
    shared: std::sync::Arc<WatchdogState>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct WatchdogState {
    /// `Some(deadline)` while a collective is in flight; the flag asks the thread to exit.
    armed: std::sync::Mutex<(Option<Instant>, bool)>,
    wake: std::sync::Condvar,
    fired: std::sync::atomic::AtomicBool,
}

impl Watchdog {
    fn start(comm: nc::ncclComm_t) -> Self {
        let shared = std::sync::Arc::new(WatchdogState {
            armed: std::sync::Mutex::new((None, false)),
            wake: std::sync::Condvar::new(),
            fired: std::sync::atomic::AtomicBool::new(false),
        });
        let state = shared.clone();
        let comm = comm as usize;
        let thread = std::thread::spawn(move || {
            let mut guard = state.armed.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                match *guard {
                    (_, true) => return,
                    (None, false) => guard = state.wake.wait(guard).unwrap_or_else(|p| p.into_inner()),
                    (Some(deadline), false) => {
                        let now = Instant::now();
                        if now >= deadline {
                            state.fired.store(true, std::sync::atomic::Ordering::SeqCst);
                            // SAFETY: the communicator outlives this thread (Drop stops and joins
                            // it before destroying the communicator).
                            unsafe { nc::ncclCommAbort(comm as nc::ncclComm_t) };
                            guard.0 = None;
                        } else {
                            guard = state.wake.wait_timeout(guard, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
                        }
                    }
                }
            }
        });
        Self { shared, thread: Some(thread) }
    }

    fn arm(&self, deadline: Instant) {
        self.shared.armed.lock().unwrap_or_else(|p| p.into_inner()).0 = Some(deadline);
        self.shared.wake.notify_one();
    }

    /// Disarms; true when the deadline had passed and the communicator was aborted.
    fn disarm(&self) -> bool {
        self.shared.armed.lock().unwrap_or_else(|p| p.into_inner()).0 = None;
        self.fired()
    }

    fn fired(&self) -> bool {
        self.shared.fired.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn stop(&mut self) {
        self.shared.armed.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn nc_ok(r: nc::ncclResult_t) -> Result<(), nc::ncclResult_t> {
    if r == nc::ncclResult_t::ncclSuccess { Ok(()) } else { Err(r) }
}

/// The Burn device of `env`'s local rank for a CUDA backend.
pub fn local_cuda_device(env: &DistEnv) -> CudaDevice {
    CudaDevice { index: env.local_rank }
}
