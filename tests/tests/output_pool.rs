//! The NCCL communicator's output-buffer pool (`dist::OutputPool`) on a real CubeCL client (wgpu):
//! a kept buffer is handed out again only once no tensor holds it, never while one does, and the
//! pool stays within its byte cap.

use burn::backend::wgpu::{WgpuDevice, WgpuRuntime};
use burn_cubecl::cubecl::Runtime;
use burn_moe_backend::dist::OutputPool;

#[test]
fn a_buffer_is_reused_only_after_its_holder_dropped_it() {
    let client = WgpuRuntime::client(&WgpuDevice::default());
    let mut pool = OutputPool::new(1 << 20);
    let first = pool.take(4096, || client.empty(4096));
    // Held by `first`: a second request of the same size gets a new buffer.
    let second = pool.take(4096, || client.empty(4096));
    assert_ne!(format!("{:?}", first.memory), format!("{:?}", second.memory));
    assert_eq!(pool.reused(), 0);
    let first_id = format!("{:?}", first.memory);
    drop(first);
    // Now free: handed out again instead of allocating.
    let third = pool.take(4096, || panic!("the dropped buffer should have been reused"));
    assert_eq!(format!("{:?}", third.memory), first_id);
    assert_eq!(pool.reused(), 1);
    // Another size never matches.
    let other = pool.take(8192, || client.empty(8192));
    assert_ne!(format!("{:?}", other.memory), first_id);
    assert_eq!(pool.held(), 4096 + 4096 + 8192);
    drop((second, third, other));
}

#[test]
fn the_pool_keeps_no_more_than_its_cap() {
    let client = WgpuRuntime::client(&WgpuDevice::default());
    let mut pool = OutputPool::new(10_000);
    for _ in 0..5 {
        drop(pool.take(4096, || client.empty(4096)));
    }
    // All five requests were served by one buffer, reused four times.
    assert_eq!((pool.held(), pool.reused()), (4096, 4));
    let held: Vec<_> = (0..3).map(|_| pool.take(4096, || client.empty(4096))).collect();
    // Three live buffers of 4096 bytes exceed the cap: the oldest is no longer kept.
    assert!(pool.held() <= 10_000, "{}", pool.held());
    // Larger than the cap: handed out, not kept.
    drop(pool.take(20_000, || client.empty(20_000)));
    assert!(pool.held() <= 10_000);
    drop(held);
}
