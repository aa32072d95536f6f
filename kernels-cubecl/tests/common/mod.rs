//! Helpers shared by the kernel tests.

/// `n` deterministic values in `[-1, 1)` (xorshift; independent of any RNG crate).
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Largest absolute difference relative to the largest magnitude of the reference `b`; infinite
/// when `a` holds a NaN where `b` does not (`f32::max` would otherwise skip it, and outputs are
/// pre-filled with NaN precisely so that an element a kernel skipped shows).
pub fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    if a.iter().zip(b).any(|(x, y)| x.is_nan() && !y.is_nan()) {
        return f32::INFINITY;
    }
    let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max) / scale
}

/// `v` as a device buffer of f16 when `half`, else of f32 (one zero for an empty `v`: CubeCL buffers
/// are never empty).
#[allow(dead_code)] // not every test binary stores f16
pub fn upload<R: cubecl::Runtime>(client: &cubecl::prelude::ComputeClient<R>, v: &[f32], half: bool) -> cubecl::server::Handle {
    use cubecl::prelude::CubeElement;
    let v = if v.is_empty() { &[0.0][..] } else { v };
    if half {
        client.create_from_slice(half::f16::as_bytes(&v.iter().map(|x| half::f16::from_f32(*x)).collect::<Vec<_>>()))
    } else {
        client.create_from_slice(f32::as_bytes(v))
    }
}

/// The first `n` values of a device buffer of f16 (`half`) or f32, as f32.
#[allow(dead_code)] // not every test binary stores f16
pub fn download<R: cubecl::Runtime>(client: &cubecl::prelude::ComputeClient<R>, h: cubecl::server::Handle, n: usize, half: bool) -> Vec<f32> {
    use cubecl::prelude::CubeElement;
    let bytes = client.read_one(h).expect("read back");
    if half { half::f16::from_bytes(&bytes)[..n].iter().map(|v| v.to_f32()).collect() } else { f32::from_bytes(&bytes)[..n].to_vec() }
}
