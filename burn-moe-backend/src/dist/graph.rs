//! Collectives inside the autodiff graph: the all-to-all that moves tokens between expert-parallel
//! ranks must carry gradients back the same way (its adjoint is the all-to-all with the split sizes
//! swapped).
//!
//! Two pieces:
//! - [`GraphComm`]: a shareable handle on a [`Communicator`] that a backward pass can keep. Model
//!   code cannot return errors from `forward` (and a backward pass never can), so a failing
//!   collective *records* its error here and yields zeros of the expected shape; every later
//!   collective on the handle then fails fast without waiting for peers. The training loop calls
//!   [`GraphComm::check`] after each forward and backward pass and stops with the recorded
//!   [`CommError`], so a dead peer is reported, never hidden behind numbers.
//! - [`CollectiveBackend`]: the backend extension that runs the all-to-all on a backend's tensors:
//!   plain backends call the communicator directly; `Autodiff<B>` records the adjoint.
//!
//! Order: every rank must issue the same collectives in the same order, in the backward pass too.
//! Burn runs backward steps by decreasing graph depth. The token all-to-alls of a model form one
//! chain through the hidden states (each depends on the previous), so their depths strictly increase
//! along the chain and every rank runs their adjoints in the same (reverse) order, whatever the
//! rest of its graph looks like.

use std::fmt;
use std::sync::{Arc, Mutex};

use burn::backend::NdArray;
use burn::backend::autodiff::{
    Autodiff,
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorData, TensorPrimitive, backend::Backend};

use super::comm::{CommError, Communicator};

/// The part of a [`Communicator`] that the graph collectives use, in object-safe form.
trait Exchange<B: Backend>: Send {
    fn all_to_all_rows(&self, x: Tensor<B, 2>, send: &[usize], recv: &[usize]) -> Result<Tensor<B, 2>, CommError>;
}

impl<B: Backend, C: Communicator<B>> Exchange<B> for C {
    fn all_to_all_rows(&self, x: Tensor<B, 2>, send: &[usize], recv: &[usize]) -> Result<Tensor<B, 2>, CommError> {
        self.all_to_all_single(x, send, recv)
    }
}

struct Inner<B: Backend> {
    comm: Mutex<Box<dyn Exchange<B>>>,
    failure: Mutex<Option<CommError>>,
    rank: usize,
    size: usize,
    name: String,
}

/// A cloneable handle on one rank's communicator for collectives issued from inside model code and
/// backward passes (see the module documentation for the error model).
pub struct GraphComm<B: Backend> {
    inner: Arc<Inner<B>>,
}

impl<B: Backend> Clone for GraphComm<B> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

impl<B: Backend> fmt::Debug for GraphComm<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GraphComm")
            .field("group", &self.inner.name)
            .field("rank", &self.inner.rank)
            .field("size", &self.inner.size)
            .finish()
    }
}

impl<B: Backend> GraphComm<B> {
    /// Takes ownership of a communicator (typically a sub-group made with
    /// [`Communicator::split`]).
    pub fn new<C: Communicator<B> + 'static>(comm: C) -> Self {
        let (rank, size, name) = (comm.rank(), comm.size(), comm.group_name().to_owned());
        Self {
            inner: Arc::new(Inner {
                comm: Mutex::new(Box::new(comm)),
                failure: Mutex::new(None),
                rank,
                size,
                name,
            }),
        }
    }

    /// This member's rank in the group.
    pub fn rank(&self) -> usize {
        self.inner.rank
    }

    /// Number of members.
    pub fn size(&self) -> usize {
        self.inner.size
    }

    /// Group name used in errors.
    pub fn group_name(&self) -> &str {
        &self.inner.name
    }

    /// The first collective error recorded on this handle, if any (it stays recorded).
    ///
    /// # Errors
    /// The recorded [`CommError`] (the original is kept; this returns a copy).
    pub fn check(&self) -> Result<(), CommError> {
        match &*self.inner.failure.lock().unwrap_or_else(|p| p.into_inner()) {
            None => Ok(()),
            Some(e) => Err(e.clone()),
        }
    }

    fn failed(&self) -> bool {
        self.inner.failure.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    fn record(&self, e: CommError) {
        let mut slot = self.inner.failure.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            tracing::error!(group = %self.inner.name, rank = self.inner.rank, "collective failed: {e}");
            *slot = Some(e);
        }
    }

    /// All-to-all of rows with per-rank split sizes (see [`Communicator::all_to_all_single`]),
    /// without autodiff: use [`all_to_all_rows`] on tracked tensors. After a failure (now or
    /// earlier) returns zeros of the expected `[Σ recv, D]` shape.
    ///
    /// # Shapes
    /// - `x`: `[Σ send, D]` → `[Σ recv, D]`
    pub fn all_to_all(&self, x: Tensor<B, 2>, send: &[usize], recv: &[usize]) -> Tensor<B, 2> {
        let [_, d] = x.dims();
        let (device, dtype) = (x.device(), x.dtype());
        let zeros = || Tensor::zeros([recv.iter().sum::<usize>(), d], (&device, dtype));
        if self.failed() {
            return zeros();
        }
        let result = self.inner.comm.lock().unwrap_or_else(|p| p.into_inner()).all_to_all_rows(x, send, recv);
        match result {
            Ok(y) => y,
            Err(e) => {
                self.record(e);
                zeros()
            }
        }
    }

    /// Exchanges host integers: member `j` receives `values[j·n .. (j+1)·n]` of every member, in rank
    /// order (`n = values.len() / size`). Exact below 2²⁴ (sent as f32 tensors on `device`). After
    /// a failure returns zeros.
    pub fn exchange_counts(&self, values: &[usize], device: &B::Device) -> Vec<usize> {
        let n = values.len() / self.size().max(1);
        let data: Vec<f32> = values.iter().map(|&v| v as f32).collect();
        let t = Tensor::<B, 2>::from_data(TensorData::new(data, [values.len(), 1]), device);
        let splits = vec![n; self.size()];
        let out = self.all_to_all(t, &splits, &splits);
        out.into_data().convert::<f32>().iter::<f32>().map(|v| v.max(0.0).round() as usize).collect()
    }
}

/// Backends whose tensors can take part in graph collectives.
///
/// `Wire` is the backend whose tensors the communicator moves: the backend itself for plain
/// backends, the inner backend for `Autodiff<B>` (gradients are inner tensors too).
pub trait CollectiveBackend: Backend {
    /// Backend of the communicator's tensors.
    type Wire: Backend;

    /// The wire backend's device for one of ours (the same device).
    fn wire_device(device: &Self::Device) -> burn::tensor::Device<Self::Wire>;

    /// Differentiable all-to-all of rows: the adjoint sends the gradient rows back with the split
    /// sizes swapped.
    ///
    /// # Shapes
    /// - `x`: `[Σ send, D]` → `[Σ recv, D]`
    fn collective_all_to_all(
        x: FloatTensor<Self>,
        send: &[usize],
        recv: &[usize],
        comm: &GraphComm<Self::Wire>,
    ) -> FloatTensor<Self>;
}

/// [`CollectiveBackend::collective_all_to_all`] on tensors.
///
/// # Shapes
/// - `x`: `[Σ send, D]` → `[Σ recv, D]`
pub fn all_to_all_rows<B: CollectiveBackend>(
    x: Tensor<B, 2>,
    send: &[usize],
    recv: &[usize],
    comm: &GraphComm<B::Wire>,
) -> Tensor<B, 2> {
    let out = B::collective_all_to_all(x.into_primitive().tensor(), send, recv, comm);
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// The all-to-all of a plain backend, whose tensors the communicator moves directly.
fn plain_all_to_all<B: Backend>(x: FloatTensor<B>, send: &[usize], recv: &[usize], comm: &GraphComm<B>) -> FloatTensor<B> {
    let x = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(x));
    comm.all_to_all(x, send, recv).into_primitive().tensor()
}

/// Plain backends: `Wire = Self`.
macro_rules! plain_collective_backend {
    ($(impl[$($generics:tt)*] for $ty:ty;)*) => {$(
        impl<$($generics)*> CollectiveBackend for $ty {
            type Wire = Self;

            fn wire_device(device: &Self::Device) -> Self::Device {
                device.clone()
            }

            fn collective_all_to_all(x: FloatTensor<Self>, send: &[usize], recv: &[usize], comm: &GraphComm<Self>) -> FloatTensor<Self> {
                plain_all_to_all::<Self>(x, send, recv, comm)
            }
        }
    )*};
}

plain_collective_backend! {
    impl[] for NdArray<f32>;
    impl[] for NdArray<f64>;
}

#[cfg(feature = "cube")]
mod cube_impls {
    use super::*;
    use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};

    plain_collective_backend! {
        impl[R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement] for CubeBackend<R, F, I, BT>;
        impl[B: burn_fusion::FusionBackend] for burn_fusion::Fusion<B>;
    }
}

impl<B: CollectiveBackend<Wire = B>, C: CheckpointStrategy> CollectiveBackend for Autodiff<B, C> {
    type Wire = B;

    fn wire_device(device: &Self::Device) -> B::Device {
        device.clone()
    }

    fn collective_all_to_all(x: FloatTensor<Self>, send: &[usize], recv: &[usize], comm: &GraphComm<B>) -> FloatTensor<Self> {
        /// Holds the communicator: the adjoint is another collective on the same group.
        #[derive(Debug)]
        struct AllToAllBackward<B: Backend> {
            comm: GraphComm<B>,
        }

        impl<B: CollectiveBackend<Wire = B>> Backward<B, 1> for AllToAllBackward<B> {
            type State = (Vec<usize>, Vec<usize>);

            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
                let [node_x] = ops.parents;
                let dy = grads.consume::<B>(&ops.node);
                let (send, recv) = ops.state;
                // Rows went out by `send` and came in by `recv`; their gradients travel back.
                let dx = B::collective_all_to_all(dy, &recv, &send, &self.comm);
                if let Some(node) = node_x {
                    grads.register::<B>(node.id, dx);
                }
            }
        }

        let out = B::collective_all_to_all(x.primitive, send, recv, comm);
        let backward = AllToAllBackward { comm: comm.clone() };
        match backward.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((send.to_vec(), recv.to_vec()), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }
}
