//! Device-memory statistics of a backend's allocator, for training metrics (`gpu_mem_alloc`,
//! `gpu_mem_used_peak`). CubeCL backends report their memory manager's counters; the CPU backends
//! report nothing. And [`persistent_params`] and [`persistent_sizes`], which keep a model's weights
//! and a training step's large transient buffers out of the allocator's paged pools.

use burn::backend::NdArray;
use burn::backend::autodiff::{Autodiff, checkpoint::strategy::CheckpointStrategy};
use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{DType, Tensor};
use burn::tensor::backend::{AutodiffBackend, Backend};

/// Moves every float parameter of `module` into exact-size buffers of the backend's persistent
/// memory, then releases the pool pages this frees. Values, ids, dtypes and `require_grad` are
/// unchanged; backends without such memory (the CPU ones) just copy.
///
/// Why: CubeCL 0.10's default allocator serves every buffer from pages it never returns, and on a
/// GPU of `M` bytes the pages for buffers above ~`M/32` are `M/4` long (35 GB on a 141 GB H200):
/// a few multi-gigabyte weights, gradients and optimizer moments leave most of such a page unused
/// and the next big buffer needs a new page, so a model that fits in half of the memory ran out of
/// it (8 Mixtral-shaped layers on 2 × H200: 68 GB of tensors, 136 GB reserved). Persistent memory
/// holds buffers of exactly their size, and any later buffer of a size it knows — the gradient,
/// the two AdamW moments and the compute copy of a weight — reuses or joins it, so the large,
/// long-lived buffers of a training step leave the pages to activations.
pub fn persistent_params<B: AutodiffBackend, M: Module<B>>(module: M, device: &B::Device) -> M {
    struct Move<'a, B: Backend>(&'a B::Device);
    impl<B: AutodiffBackend> ModuleMapper<B> for Move<'_, B::InnerBackend> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (id, tensor, mapper) = param.consume();
            if tensor.shape().num_elements() == 0 {
                // Nothing to move (an FSDP1 piece in another rank's chunk), and CUDA rejects a
                // kernel launched over nothing.
                return Param::from_mapped_value(id, tensor, mapper);
            }
            let require_grad = tensor.is_require_grad();
            let moved = B::InnerBackend::memory_persistent_allocations(self.0, tensor.inner(), |t| {
                // The source stays alive through the product, so it cannot be written in place:
                // the result is a new buffer, allocated while the mode is persistent.
                let copy = t.clone().mul_scalar(1.0);
                drop(t);
                copy
            });
            // Pages whose last weight has moved go back to the driver now, not at the end: the
            // weights are never held twice (a 32-layer Mixtral's frozen base is 93 GB in bf16).
            B::memory_cleanup(self.0);
            Param::from_mapped_value(id, Tensor::from_inner(moved).set_require_grad(require_grad), mapper)
        }
    }
    let module = module.map(&mut Move::<B::InnerBackend>(device));
    B::memory_cleanup(device);
    module
}

/// Makes the backend's persistent memory serve every later buffer of `numel` elements of `dtype`,
/// for each `(numel, dtype)` of `sizes`, in exact-size buffers: one of each is allocated there and
/// released at once, and a buffer of a size that memory knows reuses a free one or joins it (see
/// [`persistent_params`]). Empty sizes are skipped; backends without such memory do nothing. An
/// explicit `memory_cleanup` releases the free buffers and so forgets the sizes: call this after
/// [`persistent_params`], not before.
///
/// Why: for the large transient buffers a training step allocates again and again at the same
/// sizes — FSDP1's whole-unit gradient before its reduce-scatter (a Mixtral layer in f32: 5.8 GB)
/// and gathered unit — CubeCL 0.10 would otherwise take pages of a quarter of the GPU's memory.
pub fn persistent_sizes<B: Backend>(device: &B::Device, sizes: &[(usize, DType)]) {
    let sizes: Vec<(usize, DType)> = sizes.iter().copied().filter(|(n, _)| *n > 0).collect();
    if sizes.is_empty() {
        return;
    }
    B::memory_persistent_allocations(device, sizes, |sizes| {
        for (numel, dtype) in sizes {
            let t = Tensor::<B, 1>::zeros([numel], (device, dtype));
            // Read one element: the buffer then exists, also under a lazily executing (fusing)
            // backend, and is allocated while the mode is persistent.
            let _ = t.slice([0..1]).into_data();
        }
    });
}

/// Bytes held by the allocator of one device at the time of the query.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceMemory {
    /// Bytes of live tensors (what `torch.cuda.memory_allocated` counts).
    pub bytes_in_use: u64,
    /// Bytes the allocator holds from the driver, pools included (`memory_reserved`).
    pub bytes_reserved: u64,
}

/// Backends that can report [`DeviceMemory`].
pub trait MemoryBackend: Backend {
    /// Current allocator statistics of `device`, `None` where the backend has no such notion.
    fn device_memory(_device: &Self::Device) -> Option<DeviceMemory> {
        None
    }
}

impl MemoryBackend for NdArray<f32> {}
impl MemoryBackend for NdArray<f64> {}

impl<B: MemoryBackend, C: CheckpointStrategy> MemoryBackend for Autodiff<B, C> {
    fn device_memory(device: &Self::Device) -> Option<DeviceMemory> {
        B::device_memory(device)
    }
}

#[cfg(feature = "cube")]
mod cube_impls {
    use super::*;
    use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};

    impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> MemoryBackend for CubeBackend<R, F, I, BT> {
        fn device_memory(device: &Self::Device) -> Option<DeviceMemory> {
            let usage = R::client(device).memory_usage().ok()?;
            Some(DeviceMemory { bytes_in_use: usage.bytes_in_use, bytes_reserved: usage.bytes_reserved })
        }
    }

    impl<B: burn_fusion::FusionBackend + MemoryBackend> MemoryBackend for burn_fusion::Fusion<B> {
        fn device_memory(device: &Self::Device) -> Option<DeviceMemory> {
            B::device_memory(device)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::ParamId;
    use burn::nn::{Linear, LinearConfig};

    type B = Autodiff<NdArray<f32>>;

    #[test]
    fn persistent_params_keep_values_ids_and_trainability() {
        let device = Default::default();
        let mut linear: Linear<B> = LinearConfig::new(3, 2).init(&device);
        linear.bias = linear.bias.map(|b| b.map(|t| t.set_require_grad(false)));
        let (w, b) = (linear.weight.val().into_data(), linear.bias.as_ref().unwrap().val().into_data());
        let ids: (ParamId, ParamId) = (linear.weight.id, linear.bias.as_ref().unwrap().id);
        let moved = persistent_params(linear, &device);
        assert_eq!(moved.weight.val().into_data(), w);
        assert_eq!(moved.bias.as_ref().unwrap().val().into_data(), b);
        assert_eq!((moved.weight.id, moved.bias.as_ref().unwrap().id), ids);
        assert!(moved.weight.val().is_require_grad());
        assert!(!moved.bias.as_ref().unwrap().val().is_require_grad());
        // An empty parameter passes through as it is.
        let empty = Param::from_tensor(Tensor::<B, 2>::zeros([0, 4], &device));
        let id = empty.id;
        let moved = persistent_params(empty, &device);
        assert_eq!((moved.id, moved.val().dims()), (id, [0, 4]));
    }
}
