//! Scatter kernels against the plain-Rust references, generic over the CubeCL runtime; run here on
//! wgpu (Mesa lavapipe in CI, any Vulkan/Metal/DX12 GPU elsewhere), and on CUDA with `--features cuda`.

use cubecl::prelude::*;
use kernels_cubecl::RoutingPlan;
use kernels_cubecl::reference::scatter as reference;
use kernels_cubecl::scatter::{
    GroupedMatmulProblem, KernelError, launch_combine, launch_combine_backward, launch_grouped_matmul, launch_grouped_matmul_weight_grad,
    launch_permute,
};

mod common;
use common::{max_rel, values};

fn upload_f32<R: Runtime>(client: &ComputeClient<R>, v: &[f32]) -> cubecl::server::Handle {
    client.create_from_slice(f32::as_bytes(if v.is_empty() { &[0.0] } else { v }))
}

fn upload_u32<R: Runtime>(client: &ComputeClient<R>, v: &[u32]) -> cubecl::server::Handle {
    client.create_from_slice(u32::as_bytes(if v.is_empty() { &[0] } else { v }))
}

fn read_f32<R: Runtime>(client: &ComputeClient<R>, h: cubecl::server::Handle, n: usize) -> Vec<f32> {
    let bytes = client.read_one(h).expect("read back");
    f32::from_bytes(&bytes)[..n].to_vec()
}

/// Routing of `tokens` tokens to `top_k` of `experts` experts, deterministic, with expert
/// `starve` (if any) receiving nothing.
fn routing(tokens: usize, top_k: usize, experts: usize, seed: u64, starve: Option<usize>) -> RoutingPlan {
    let mut idx = Vec::with_capacity(tokens * top_k);
    let r = values(tokens * experts, seed);
    for t in 0..tokens {
        let mut order: Vec<usize> = (0..experts).filter(|e| Some(*e) != starve).collect();
        order.sort_by(|a, b| r[t * experts + b].partial_cmp(&r[t * experts + a]).unwrap());
        idx.extend(order[..top_k].iter().map(|&e| e as i64));
    }
    RoutingPlan::from_expert_indices(&idx, top_k, experts).unwrap()
}

fn check_case<R: Runtime>(client: &ComputeClient<R>, tokens: usize, d: usize, f: usize, experts: usize, top_k: usize, starve: Option<usize>) {
    let label = format!("T={tokens} d={d} f={f} E={experts} k={top_k} starve={starve:?}");
    let plan = routing(tokens, top_k, experts, (tokens * 31 + d * 7 + experts) as u64, starve);
    let n = tokens * top_k;
    let rows: Vec<u32> = plan.sorted_token.iter().map(|&r| r as u32).collect();
    let offsets_u32: Vec<u32> = plan.offsets.iter().map(|&o| o as u32).collect();
    let slots: Vec<u32> = plan.slots().into_iter().map(|s| s as u32).collect();
    let x = values(tokens * d, 1);
    let w1 = values(experts * f * d, 2); // [E, f, d], used transposed
    let w2 = values(experts * f * d, 3); // [E, f, d], used as [E, k=f, m=d] -> y = h · w2[e]
    let weights = values(tokens * top_k, 4);

    let xh = upload_f32(client, &x);
    let rows_h = upload_u32(client, &rows);
    let off_h = upload_u32(client, &offsets_u32);

    // permute
    let xs_h = client.empty((n * d).max(1) * 4);
    launch_permute::<R, f32, u32>(client, xh, tokens, rows_h, n, d, xs_h.clone());
    let xs_want = reference::permute(&x, &rows, d);
    let xs = read_f32(client, xs_h.clone(), n * d);
    assert_eq!(xs, xs_want, "{label}: permute");

    // grouped matmul, transposed weights: [n, d] x [E, f, d]^T -> [n, f]
    let up = GroupedMatmulProblem { rows: n, m: f, k: d, num_experts: experts, transpose: true };
    let h_h = client.empty((n * f).max(1) * 4);
    launch_grouped_matmul::<R, f32>(client, &up, &plan.offsets, xs_h.clone(), upload_f32(client, &w1), off_h.clone(), h_h.clone()).unwrap();
    let h_want = reference::grouped_matmul(&xs_want, &w1, &plan.offsets, f, d, true);
    let h = read_f32(client, h_h.clone(), n * f);
    assert!(max_rel(&h, &h_want) < 1e-5, "{label}: grouped matmul (transposed) err {}", max_rel(&h, &h_want));

    // grouped matmul, plain weights: [n, f] x [E, f, d] -> [n, d]
    let down = GroupedMatmulProblem { rows: n, m: d, k: f, num_experts: experts, transpose: false };
    let y_h = client.empty((n * d).max(1) * 4);
    launch_grouped_matmul::<R, f32>(client, &down, &plan.offsets, h_h.clone(), upload_f32(client, &w2), off_h.clone(), y_h.clone()).unwrap();
    let y_want = reference::grouped_matmul(&h_want, &w2, &plan.offsets, d, f, false);
    let y = read_f32(client, y_h.clone(), n * d);
    assert!(max_rel(&y, &y_want) < 1e-5, "{label}: grouped matmul err {}", max_rel(&y, &y_want));

    // weight gradient of the up projection: dw[e] = h[seg]ᵀ · xs[seg] -> [E, f, d]
    let wg = GroupedMatmulProblem { rows: n, m: f, k: d, num_experts: experts, transpose: true };
    let dw_h = client.empty((experts * f * d).max(1) * 4);
    launch_grouped_matmul_weight_grad::<R, f32>(client, &wg, &plan.offsets, h_h, xs_h, off_h, dw_h.clone()).unwrap();
    let dw_want = reference::grouped_matmul_weight_grad(&h_want, &xs_want, &plan.offsets, f, d);
    let dw = read_f32(client, dw_h, experts * f * d);
    assert!(max_rel(&dw, &dw_want) < 1e-5, "{label}: weight grad err {}", max_rel(&dw, &dw_want));
    if let Some(e) = starve {
        assert!(dw[e * f * d..(e + 1) * f * d].iter().all(|v| *v == 0.0), "{label}: starved expert grad not zero");
    }

    // combine
    let out_h = client.empty((tokens * d).max(1) * 4);
    launch_combine::<R, f32, u32>(client, y_h, n, upload_u32(client, &slots), upload_f32(client, &weights), tokens, top_k, d, out_h.clone());
    let out_want = reference::combine(&y_want, &slots, &weights, top_k, d);
    let out = read_f32(client, out_h, tokens * d);
    assert!(max_rel(&out, &out_want) < 1e-5, "{label}: combine err {}", max_rel(&out, &out_want));

    // combine backward (the slots name each row of y once): dy and the routing weights' gradient
    let dout = values(tokens * d, 5);
    let (dy_want, dw_want) = reference::combine_backward(&dout, &y_want, &slots, &weights, top_k, d);
    let (dy_h, dwt_h) = (client.empty((n * d).max(1) * 4), client.empty((tokens * top_k).max(1) * 4));
    launch_combine_backward::<R, f32, u32>(
        client,
        upload_f32(client, &dout),
        upload_f32(client, &y_want),
        n,
        upload_u32(client, &slots),
        upload_f32(client, &weights),
        tokens,
        top_k,
        d,
        dy_h.clone(),
        dwt_h.clone(),
    )
    .unwrap();
    let dy = read_f32(client, dy_h, n * d);
    let dwt = read_f32(client, dwt_h, tokens * top_k);
    assert!(max_rel(&dy, &dy_want) < 1e-6, "{label}: combine backward dy err {}", max_rel(&dy, &dy_want));
    assert!(max_rel(&dwt, &dw_want) < 1e-5, "{label}: combine backward dweights err {}", max_rel(&dwt, &dw_want));
    // Rows and slots that disagree are refused, not half-written.
    let res = launch_combine_backward::<R, f32, u32>(client, scratch(client), scratch(client), n + 1, upload_u32(client, &slots), upload_f32(client, &weights), tokens, top_k, d, scratch(client), scratch(client));
    assert!(matches!(res, Err(KernelError::Shape(_))), "{label}: {res:?}");
}

fn scratch<R: Runtime>(client: &ComputeClient<R>) -> cubecl::server::Handle {
    client.empty(4)
}

fn all_cases<R: Runtime>(device: &R::Device) {
    let client = R::client(device);
    check_case(&client, 1, 8, 12, 4, 2, None); // one token
    check_case(&client, 37, 100, 60, 4, 2, Some(2)); // odd sizes, an expert with no token
    check_case(&client, 19, 33, 17, 8, 3, None); // k = 3
    check_case(&client, 23, 16, 24, 4, 1, None); // k = 1
    check_case(&client, 11, 16, 8, 1, 1, None); // E = 1: every token on one expert
    check_case(&client, 9, 20, 10, 3, 3, None); // k = E
}

#[test]
fn scatter_kernels_match_reference_on_wgpu() {
    all_cases::<cubecl::wgpu::WgpuRuntime>(&Default::default());
}

/// The same cases on CUDA (`--features cuda`; needs an NVIDIA GPU).
#[cfg(feature = "cuda")]
#[test]
fn scatter_kernels_match_reference_on_cuda() {
    all_cases::<cubecl::cuda::CudaRuntime>(&Default::default());
}

#[test]
fn problems_with_bad_offsets_are_rejected() {
    let p = GroupedMatmulProblem { rows: 5, m: 2, k: 3, num_experts: 2, transpose: true };
    assert!(p.validate(&[0, 2, 5]).is_ok());
    assert!(matches!(p.validate(&[0, 5]), Err(KernelError::Shape(_))));
    assert!(matches!(p.validate(&[0, 3, 2]), Err(KernelError::Shape(_))));
    assert!(matches!(p.validate(&[0, 2, 4]), Err(KernelError::Shape(_))));
}
