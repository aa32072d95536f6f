//! Device-memory statistics of a backend's allocator, for training metrics (`gpu_mem_alloc`,
//! `gpu_mem_used_peak`). CubeCL backends report their memory manager's counters; the CPU backends
//! report nothing.

use burn::backend::NdArray;
use burn::backend::autodiff::{Autodiff, checkpoint::strategy::CheckpointStrategy};
use burn::tensor::backend::Backend;

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
