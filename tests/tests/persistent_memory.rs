//! [`persistent_sizes`] on a CubeCL backend (wgpu, through the fusion stream as users get it):
//! once a size is registered, buffers of that size are exactly that size, a free one is reused,
//! and the pages of the dynamic pools are not touched.

/// `burn::backend::Wgpu` with its defaults (f32).
type Wgpu = burn::backend::Wgpu<f32>;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use burn_moe_backend::{MemoryBackend, persistent_sizes};

/// Bytes reserved and in use on `device`, after the queued work ran.
fn usage(device: &burn::tensor::Device<Wgpu>) -> (u64, u64) {
    Wgpu::sync(device).unwrap();
    let m = Wgpu::device_memory(device).expect("wgpu reports its memory");
    (m.bytes_reserved, m.bytes_in_use)
}

/// A buffer of `n` f32 ones that exists on the device (read back one element).
fn live(n: usize, device: &burn::tensor::Device<Wgpu>) -> Tensor<Wgpu, 1> {
    let t = Tensor::<Wgpu, 1>::ones([n], device);
    assert_eq!(t.clone().slice([n - 1..n]).into_data().to_vec::<f32>().unwrap(), vec![1.0]);
    t
}

#[test]
fn registered_sizes_are_served_exact_size() {
    let device = Default::default();
    // An odd size, so that no pool's page is this size by accident (12 MB).
    let n = 3_000_011;
    // Exactly one buffer of `n` f32, up to the allocator's alignment padding (and, when registering,
    // the few bytes of the one-element read).
    let exact = |bytes: u64| bytes >= 4 * n as u64 && bytes < 4 * n as u64 + 4096;
    // Whatever the first kernels and reads allocate (small buffers, staging), allocated now.
    drop(live(1000, &device));
    drop(live(1000, &device));

    let (before, _) = usage(&device);
    persistent_sizes::<Wgpu>(&device, &[(n, DType::F32), (0, DType::F32)]);
    let (registered, in_use) = usage(&device);
    let one = registered - before;
    assert!(exact(one), "registering reserved {one} bytes for a {}-byte buffer", 4 * n);

    // The registered buffer is free again and serves the next one; a second live one joins it at
    // exactly its size.
    let a = live(n, &device);
    let (after_a, in_use_a) = usage(&device);
    assert_eq!(after_a, registered, "the free registered buffer was not reused");
    assert!(in_use_a >= in_use + 4 * n as u64);
    let b = live(n, &device);
    let (after_b, _) = usage(&device);
    assert!(exact(after_b - after_a), "a second buffer of the registered size took {} bytes", after_b - after_a);
    drop((a, b));

    // Both are reused from then on.
    let (c, d) = (live(n, &device), live(n, &device));
    assert_eq!(usage(&device).0, after_b, "buffers of the registered size took new memory");
    drop((c, d));
}
