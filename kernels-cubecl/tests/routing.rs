//! Device-side routing kernels against the plain-Rust `RoutingPlan`, generic over the CubeCL runtime;
//! run here on wgpu (Mesa lavapipe in CI). Every output is compared exactly: the device sort must be
//! the same stable sort as the reference, not merely a valid grouping.

use cubecl::prelude::*;
use cubecl::server::Handle;
use kernels_cubecl::RoutingPlan;
use kernels_cubecl::routing::{RoutingBuffers, RoutingProblem, launch_padded_blocks, launch_routing};
use kernels_cubecl::scatter::KernelError;

// Only `values` is needed here; the other shared helpers serve the float kernels' tests.
#[allow(dead_code)]
mod common;
use common::values;

type Client = ComputeClient<cubecl::wgpu::WgpuRuntime>;

fn client() -> Client {
    cubecl::wgpu::WgpuRuntime::client(&Default::default())
}

fn upload_u32<R: Runtime>(client: &ComputeClient<R>, v: &[u32]) -> Handle {
    client.create_from_slice(u32::as_bytes(if v.is_empty() { &[0] } else { v }))
}

fn read_u32<R: Runtime>(client: &ComputeClient<R>, h: Handle, n: usize) -> Vec<usize> {
    let bytes = client.read_one(h).expect("read back");
    u32::from_bytes(&bytes)[..n].iter().map(|&v| v as usize).collect()
}

/// Fills a buffer with a value no output can take, so an element a kernel skipped shows.
fn poisoned<R: Runtime>(client: &ComputeClient<R>, n: usize) -> Handle {
    upload_u32(client, &vec![u32::MAX; n.max(1)])
}

/// `pairs` deterministic expert indices in `[0, experts)`, duplicates within a token allowed (the
/// reference accepts them, and they are the hardest case for stability).
fn random_indices(pairs: usize, experts: usize, seed: u64) -> Vec<u32> {
    values(pairs, seed).into_iter().map(|v| (((v + 1.0) * 0.5 * experts as f32) as usize).min(experts - 1) as u32).collect()
}

/// Runs the routing and the padded layouts for blocks 1, 16 and 128 on the device and compares every
/// output with `RoutingPlan::from_expert_indices` / `slots` / `padded_blocks`.
fn check<R: Runtime>(client: &ComputeClient<R>, indices: &[u32], top_k: usize, num_experts: usize, label: &str) {
    let plan = RoutingPlan::from_expert_indices(&indices.iter().map(|&i| i as i64).collect::<Vec<_>>(), top_k, num_experts)
        .expect("test indices are valid");
    let problem = RoutingProblem { tokens: indices.len() / top_k, top_k, num_experts };
    let pairs = problem.pairs();
    let out = RoutingBuffers {
        counts: poisoned(client, num_experts),
        offsets: poisoned(client, num_experts + 1),
        sorted_flat: poisoned(client, pairs),
        sorted_token: poisoned(client, pairs),
        slots: poisoned(client, pairs),
        invalid: poisoned(client, 1),
    };
    launch_routing::<R, u32>(client, &problem, upload_u32(client, indices), &out).unwrap();
    assert_eq!(read_u32(client, out.invalid.clone(), 1), vec![0], "{label}: invalid");
    assert_eq!(read_u32(client, out.counts.clone(), num_experts), plan.counts, "{label}: counts");
    assert_eq!(read_u32(client, out.offsets.clone(), num_experts + 1), plan.offsets, "{label}: offsets");
    assert_eq!(read_u32(client, out.sorted_flat.clone(), pairs), plan.sorted_flat, "{label}: sorted_flat");
    assert_eq!(read_u32(client, out.sorted_token.clone(), pairs), plan.sorted_token, "{label}: sorted_token");
    assert_eq!(read_u32(client, out.slots.clone(), pairs), plan.slots(), "{label}: slots");

    for block in [1usize, 16, 128] {
        let (want_offsets, want_blocks) = plan.padded_blocks(block);
        let padded = launch_padded_blocks(client, &problem, block, out.counts.clone()).unwrap();
        assert_eq!(padded.capacity, problem.max_blocks(block), "{label} block {block}: capacity");
        assert!(padded.capacity >= want_blocks.len(), "{label} block {block}: capacity below the block count");
        let got_offsets = read_u32(client, padded.padded_offsets.clone(), num_experts + 1);
        assert_eq!(got_offsets, want_offsets, "{label} block {block}: padded_offsets");
        let got_blocks = read_u32(client, padded.block_expert.clone(), padded.capacity);
        let (head, tail) = got_blocks.split_at(want_blocks.len());
        assert_eq!(head, want_blocks, "{label} block {block}: block_expert");
        assert!(tail.iter().all(|&e| e == num_experts), "{label} block {block}: entries past the last block must be E, got {tail:?}");
    }
}

#[test]
fn one_token() {
    let c = client();
    check(&c, &[3, 1], 2, 4, "T=1 k=2 E=4");
    check(&c, &[0], 1, 1, "T=1 k=1 E=1");
}

#[test]
fn tokens_not_a_multiple_of_the_cube() {
    let c = client();
    check(&c, &random_indices(1000 * 2, 8, 11), 2, 8, "T=1000 k=2 E=8");
    check(&c, &random_indices(257, 5, 12), 1, 5, "T=257 k=1 E=5");
}

#[test]
fn top_k_one_two_three() {
    let c = client();
    for top_k in 1..=3 {
        check(&c, &random_indices(301 * top_k, 6, 20 + top_k as u64), top_k, 6, &format!("T=301 k={top_k} E=6"));
    }
}

#[test]
fn expert_without_tokens() {
    let c = client();
    // Expert 5 of 8 gets nothing (indices 5..7 shifted up by one), and so do experts 0 and 7 below.
    let idx: Vec<u32> = random_indices(2 * 600, 7, 31).into_iter().map(|e| if e >= 5 { e + 1 } else { e }).collect();
    check(&c, &idx, 2, 8, "T=600 k=2 E=8, expert 5 starved");
    let idx: Vec<u32> = random_indices(3 * 200, 6, 32).into_iter().map(|e| e + 1).collect();
    check(&c, &idx, 3, 8, "T=200 k=3 E=8, first and last experts starved");
}

#[test]
fn all_tokens_to_one_expert() {
    let c = client();
    check(&c, &vec![2; 2 * 700], 2, 4, "T=700 k=2 E=4, all to expert 2");
    check(&c, &vec![0; 1500], 1, 3, "T=1500 k=1 E=3, all to expert 0");
}

#[test]
fn single_expert() {
    let c = client();
    check(&c, &vec![0; 500], 1, 1, "T=500 k=1 E=1");
    check(&c, &vec![0; 2 * 333], 2, 1, "T=333 k=2 E=1");
}

#[test]
fn sixty_four_experts_over_several_chunks() {
    let c = client();
    // 2500 · 2 = 5000 pairs: five chunks of ROUTING_CHUNK per expert cube, more than 4096.
    check(&c, &random_indices(2500 * 2, 64, 41), 2, 64, "T=2500 k=2 E=64");
}

#[test]
fn many_experts_beyond_one_scan_chunk() {
    let c = client();
    // E = 300 > ROUTING_UNITS: the offsets scan carries its total across expert chunks.
    check(&c, &random_indices(900 * 2, 300, 51), 2, 300, "T=900 k=2 E=300");
}

#[test]
fn no_tokens() {
    let c = client();
    check(&c, &[], 2, 3, "T=0 k=2 E=3");
}

/// i32 indices (the Burn integer type), with negative and too-large ones: they are skipped, counted in
/// `invalid`, and every valid pair is placed as the reference places the valid pairs alone would be
/// ranked (their flat indices are kept).
#[test]
fn i32_indices_and_out_of_range_ones() {
    let c = client();
    let (top_k, e) = (2usize, 5usize);
    let mut idx: Vec<i32> = random_indices(2 * 400, e, 61).into_iter().map(|v| v as i32).collect();
    for (pos, bad) in [(0usize, -1i32), (17, 5), (18, 1000), (799, i32::MIN)] {
        idx[pos] = bad;
    }
    let problem = RoutingProblem { tokens: 400, top_k, num_experts: e };
    let out = RoutingBuffers::empty(&c, &problem);
    launch_routing::<_, i32>(&c, &problem, c.create_from_slice(i32::as_bytes(&idx)), &out).unwrap();
    assert_eq!(read_u32(&c, out.invalid.clone(), 1), vec![4], "invalid count");

    let valid: Vec<(usize, usize)> = idx.iter().enumerate().filter(|(_, v)| (0..e as i32).contains(v)).map(|(f, &v)| (f, v as usize)).collect();
    let mut counts = vec![0usize; e];
    valid.iter().for_each(|&(_, v)| counts[v] += 1);
    let offsets = kernels_cubecl::reference::routing::exclusive_prefix_sum(&counts);
    let mut sorted_flat: Vec<usize> = valid.iter().map(|&(f, _)| f).collect();
    sorted_flat.sort_by_key(|&f| idx[f]); // stable: flat order within an expert
    assert_eq!(read_u32(&c, out.counts.clone(), e), counts, "counts");
    assert_eq!(read_u32(&c, out.offsets.clone(), e + 1), offsets, "offsets");
    let n = valid.len();
    assert_eq!(read_u32(&c, out.sorted_flat.clone(), n), sorted_flat, "sorted_flat");
    assert_eq!(read_u32(&c, out.sorted_token.clone(), n), sorted_flat.iter().map(|f| f / top_k).collect::<Vec<_>>(), "sorted_token");
    let slots = read_u32(&c, out.slots.clone(), 2 * 400);
    for (pos, &f) in sorted_flat.iter().enumerate() {
        assert_eq!(slots[f], pos, "slot of pair {f}");
    }
}

#[test]
fn validate_rejects_empty_top_k_and_experts() {
    let c = client();
    let idx = upload_u32(&c, &[0, 1]);
    let zero_k = RoutingProblem { tokens: 2, top_k: 0, num_experts: 4 };
    let err = zero_k.validate().unwrap_err();
    assert!(matches!(&err, KernelError::Shape(m) if m.contains("top_k = 0")), "{err:?}");
    let res = launch_routing::<_, u32>(&c, &zero_k, idx.clone(), &RoutingBuffers::empty(&c, &zero_k));
    assert_eq!(res, Err(err));

    let zero_e = RoutingProblem { tokens: 2, top_k: 1, num_experts: 0 };
    let err = zero_e.validate().unwrap_err();
    assert!(matches!(&err, KernelError::Shape(m) if m.contains("num_experts = 0")), "{err:?}");
    let res = launch_routing::<_, u32>(&c, &zero_e, idx, &RoutingBuffers::empty(&c, &zero_e));
    assert_eq!(res, Err(err));

    let ok = RoutingProblem { tokens: 2, top_k: 1, num_experts: 4 };
    assert!(ok.validate().is_ok());
    let too_many = RoutingProblem { tokens: 1 << 31, top_k: 2, num_experts: 4 };
    assert!(matches!(too_many.validate(), Err(KernelError::Shape(_))));
    let err = launch_padded_blocks(&c, &ok, 0, upload_u32(&c, &[1, 1, 0, 0])).unwrap_err();
    assert!(matches!(&err, KernelError::Shape(m) if m.contains("block size is 0")), "{err:?}");
}
