//! Parameters that read their values from the checkpoint only when Burn first needs them, and then
//! only the piece a sharding plan asked for.
//!
//! Why: a sharded run (FSDP, expert parallelism) keeps a slice of most parameters on each rank. Read
//! eagerly, every rank would first hold the whole model (Mixtral-8x7B: 47 G parameters, 188 GB in
//! f32) and then cut it. A lazy parameter ([`Param::uninitialized`]) knows its shape, device and
//! trainability without data; a plan that wants rows `r` of it posts a request
//! ([`LazyWeights::request_piece`]) and then takes its value: the initialisation reads exactly those
//! elements from the memory-mapped files. Without a request it reads the whole tensor, so a lazily
//! loaded model behaves like an eagerly loaded one wherever it is used.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::{Shape, Tensor, TensorData, backend::Backend};

use super::reader::SafetensorsFiles;

/// A run of row-major elements of one checkpoint tensor. A parameter's values are the concatenation
/// of its segments (one whole tensor, or one per expert, or every expert's half of a fused
/// `gate_up_proj`).
#[derive(Debug, Clone)]
pub(crate) struct Segment {
    /// Tensor name in the checkpoint.
    pub name: String,
    /// Elements of that tensor, row-major.
    pub elements: Range<usize>,
}

/// What the next initialisation of a parameter reads.
enum Request {
    /// Elements of the flattened parameter, shaped `shape`.
    Piece { elements: Range<usize>, shape: Vec<usize> },
    /// Nothing: an empty tensor, only to learn the trainability Burn hands to the initialiser.
    Probe,
}

#[derive(Default)]
struct State {
    pending: HashMap<ParamId, Request>,
    /// Elements of each lazy parameter made by this load.
    numel: HashMap<ParamId, usize>,
    /// Elements read from the files so far, over all parameters.
    elements_read: usize,
}

/// The handle of one lazy load ([`HfCheckpoint::load_model_lazy`](super::HfCheckpoint::load_model_lazy)):
/// where a sharding plan posts which piece of a parameter to read, and how many elements were read.
#[derive(Clone, Default)]
pub struct LazyWeights {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for LazyWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("LazyWeights").field("params", &state.numel.len()).field("elements_read", &state.elements_read).finish()
    }
}

impl LazyWeights {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain counters behind: still consistent.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether `id` is a lazy parameter of this load (initialised or not).
    pub fn contains(&self, id: ParamId) -> bool {
        self.lock().numel.contains_key(&id)
    }

    /// Makes the next initialisation of parameter `id` read only its row-major elements
    /// `elements`, as a tensor of shape `shape`. Without a request the whole parameter is read.
    ///
    /// # Panics
    /// When `id` is not a parameter of this load, the range is past its end, or `shape` does not
    /// hold `elements.len()` values: the caller computed the piece wrongly.
    pub fn request_piece(&self, id: ParamId, elements: Range<usize>, shape: Vec<usize>) {
        let mut state = self.lock();
        let numel = *state.numel.get(&id).expect("request_piece: not a lazy parameter of this load");
        assert!(elements.start <= elements.end && elements.end <= numel, "piece {elements:?} of a {numel}-element parameter");
        assert_eq!(shape.iter().product::<usize>(), elements.len(), "piece {elements:?} shaped {shape:?}");
        state.pending.insert(id, Request::Piece { elements, shape });
    }

    /// Whether `param` is trainable, without reading it: an initialised parameter says so itself;
    /// a lazy one of this load is probed through a clone (which reads nothing) and stays lazy.
    pub fn is_trainable<B: Backend, const D: usize>(&self, param: &Param<Tensor<B, D>>) -> bool {
        if param.is_initialized() || !self.contains(param.id) {
            return param.is_require_grad();
        }
        self.lock().pending.insert(param.id, Request::Probe);
        // Burn clones a lazy parameter as a lazy copy with its own initialisation: running it
        // leaves `param` untouched.
        let trainable = param.clone().val().is_require_grad();
        self.lock().pending.remove(&param.id);
        trainable
    }

    /// `(unread, all)`: how many of `module`'s parameters belong to this load, and how many of those
    /// are still unread (lazy) — for checking that a sharding plan read each parameter, and only
    /// once it had cut it.
    pub fn unread_in<B: Backend, M: Module<B>>(&self, module: &M) -> (usize, usize) {
        struct Count<'a>(usize, usize, &'a LazyWeights);
        impl<B: Backend> ModuleVisitor<B> for Count<'_> {
            fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
                if self.2.contains(p.id) {
                    self.0 += usize::from(!p.is_initialized());
                    self.1 += 1;
                }
            }
        }
        let mut c = Count(0, 0, self);
        module.visit(&mut c);
        (c.0, c.1)
    }

    /// Elements read from the checkpoint files by this load's parameters so far.
    pub fn elements_read(&self) -> usize {
        self.lock().elements_read
    }

    /// A lazy parameter of shape `shape` whose values are `segments` (checked by the caller: every
    /// segment exists in `files` with a readable dtype, and their lengths add up to the shape).
    pub(crate) fn param<B: Backend, const D: usize>(
        &self,
        files: &Arc<SafetensorsFiles>,
        segments: Vec<Segment>,
        shape: [usize; D],
        device: &B::Device,
    ) -> Param<Tensor<B, D>> {
        debug_assert_eq!(segments.iter().map(|s| s.elements.len()).sum::<usize>(), shape.iter().product::<usize>());
        let (state, files) = (self.clone(), Arc::clone(files));
        self.param_from(shape, device, move |device: &B::Device, elements: Range<usize>| {
            let values = read_segments(&files, &segments, elements);
            state.lock().elements_read += values.len();
            let n = values.len();
            Tensor::<B, 1>::from_data(TensorData::new(values, [n]), device)
        })
    }

    /// A lazy parameter of shape `shape` whose values come from `source`: given the row-major
    /// elements to make (a request's piece, or all of them; never none), it returns exactly those,
    /// as a 1-D tensor on the device. It is called once, when the parameter is first needed.
    pub(crate) fn param_from<B: Backend, const D: usize, S>(&self, shape: [usize; D], device: &B::Device, source: S) -> Param<Tensor<B, D>>
    where
        S: Fn(&B::Device, Range<usize>) -> Tensor<B, 1> + Send + Sync + 'static,
    {
        let numel: usize = shape.iter().product();
        let id = ParamId::new();
        self.lock().numel.insert(id, numel);
        let state = self.clone();
        let init = move |device: &B::Device, require_grad: bool| {
            let request = state.lock().pending.remove(&id);
            let (elements, dims) = match request {
                None => (0..numel, shape.to_vec()),
                Some(Request::Piece { elements, shape }) => (elements, shape),
                Some(Request::Probe) => (0..0, vec![0; D]),
            };
            let tensor = if elements.is_empty() {
                // No upload of zero bytes: burn-cuda refuses the strides of an empty tensor's data.
                Tensor::<B, D>::empty(dims, device)
            } else {
                source(device, elements).reshape(Shape::from(dims))
            };
            tensor.set_require_grad(require_grad)
        };
        Param::uninitialized(id, init, device.clone(), true, Shape::from(shape.to_vec()))
    }
}

/// Elements `elements` of the concatenation of `segments`.
fn read_segments(files: &SafetensorsFiles, segments: &[Segment], elements: Range<usize>) -> Vec<f32> {
    let mut out = Vec::with_capacity(elements.len());
    let mut start = 0;
    for seg in segments {
        let end = start + seg.elements.len();
        let (lo, hi) = (elements.start.max(start), elements.end.min(end));
        if lo < hi {
            let from = seg.elements.start + (lo - start);
            // The loader checked name, shape and dtype of every segment, and the range lies inside
            // the tensor: the read cannot fail.
            out.extend(files.read_f32_range(&seg.name, from..from + (hi - lo)).expect("segment checked when the parameter was made"));
        }
        start = end;
    }
    out
}

/// Reads every lazy parameter of `module` now (whole), so that clones of it share the values
/// instead of each reading the files again.
pub fn materialize<B: Backend, M: Module<B>>(module: M) -> M {
    struct Read;
    impl<B: Backend> ModuleMapper<B> for Read {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            if param.is_initialized() {
                return param;
            }
            let (id, value, mapper) = param.consume();
            Param::from_mapped_value(id, value, mapper)
        }
    }
    module.map(&mut Read)
}
