//! Block-sparse (MegaBlocks) kernels against the plain-Rust references and against dense masked
//! computations, generic over the CubeCL runtime; run here on wgpu (Mesa lavapipe in CI), and on CUDA with `--features cuda`.

use cubecl::prelude::*;
use kernels_cubecl::RoutingPlan;
use kernels_cubecl::blocksparse::{
    BLOCK_SPARSE_CMMA_DEFAULT, BLOCK_SPARSE_CMMA_WEIGHT_GRAD_DEFAULT, BlockSparseError, BlockSparseProblem, BlockSparseStrategy,
    BlockSparseTopology, TopologyBuffers, block_sparse_cmma_supported, launch_dsd, launch_dsd_with, launch_dstd, launch_dstd_with,
    launch_sdd, launch_sdd_with,
};
use kernels_cubecl::reference::blocksparse as reference;
use kernels_cubecl::scatter::KernelError;

mod common;
use common::{max_rel, values};

fn upload<R: Runtime>(client: &ComputeClient<R>, v: &[f32]) -> cubecl::server::Handle {
    client.create_from_slice(f32::as_bytes(if v.is_empty() { &[0.0] } else { v }))
}

fn read<R: Runtime>(client: &ComputeClient<R>, h: cubecl::server::Handle, n: usize) -> Vec<f32> {
    let bytes = client.read_one(h).expect("read back");
    f32::from_bytes(&bytes)[..n].to_vec()
}

/// How the tokens are routed.
#[derive(Debug, Clone, Copy)]
enum Routing {
    /// Pseudo-random top-k, optionally never choosing one expert.
    Random(Option<usize>),
    /// Every token's first slot on expert 0 (`k = 1`: all tokens on one expert).
    AllToFirst,
}

fn plan(tokens: usize, top_k: usize, experts: usize, seed: u64, routing: Routing) -> RoutingPlan {
    let mut idx = Vec::with_capacity(tokens * top_k);
    let r = values(tokens * experts, seed);
    for t in 0..tokens {
        let starve = if let Routing::Random(s) = routing { s } else { None };
        let mut order: Vec<usize> = (0..experts).filter(|e| Some(*e) != starve).collect();
        order.sort_by(|a, b| r[t * experts + b].partial_cmp(&r[t * experts + a]).unwrap());
        if let Routing::AllToFirst = routing {
            order.retain(|&e| e != 0);
            order.insert(0, 0);
        }
        idx.extend(order[..top_k].iter().map(|&e| e as i64));
    }
    RoutingPlan::from_expert_indices(&idx, top_k, experts).unwrap()
}

/// Sorted tokens padded per expert with zero rows, `[Tp, d]`.
fn padded_x(plan: &RoutingPlan, topo: &BlockSparseTopology, x: &[f32], d: usize) -> Vec<f32> {
    let mut out = vec![0f32; topo.rows() * d];
    for e in 0..plan.num_experts {
        for r in 0..plan.counts[e] {
            let t = plan.sorted_token[plan.offsets[e] + r];
            let row = topo.padded_offsets()[e] + r;
            out[row * d..(row + 1) * d].copy_from_slice(&x[t * d..(t + 1) * d]);
        }
    }
    out
}

/// The expert of every padded row, from the padded offsets alone.
fn row_expert(topo: &BlockSparseTopology) -> Vec<usize> {
    let p = topo.padded_offsets();
    (0..topo.rows()).map(|r| (0..topo.num_experts()).find(|&e| r >= p[e] && r < p[e + 1]).unwrap()).collect()
}

/// `Wcat [E·Fp, o]` with zero rows for padded columns: `Wcat[e·Fp + c, l] = w[e, c, l]` (`ffn_major`,
/// `w: [E, F, o]`) or `w[e, l, c]` (`w: [E, o, F]`).
fn weight_cat(topo: &BlockSparseTopology, w: &[f32], o: usize, ffn_major: bool) -> Vec<f32> {
    let (f, fp) = (topo.ffn(), topo.ffn_padded());
    let mut out = vec![0f32; topo.cols() * o];
    for e in 0..topo.num_experts() {
        for c in 0..f {
            for l in 0..o {
                out[(e * fp + c) * o + l] = if ffn_major { w[(e * f + c) * o + l] } else { w[(e * o + l) * f + c] };
            }
        }
    }
    out
}

/// Dense `a [n, k] · b [k, m]` in f64.
fn matmul(a: &[f32], b: &[f32], n: usize, k: usize, m: usize) -> Vec<f32> {
    let mut out = vec![0f32; n * m];
    for i in 0..n {
        for j in 0..m {
            out[i * m + j] = (0..k).map(|l| a[i * k + l] as f64 * b[l * m + j] as f64).sum::<f64>() as f32;
        }
    }
    out
}

fn transposed(a: &[f32], n: usize, m: usize) -> Vec<f32> {
    (0..m * n).map(|p| a[(p % n) * m + p / n]).collect()
}

struct Case {
    tokens: usize,
    d: usize,
    f: usize,
    experts: usize,
    top_k: usize,
    block: usize,
    routing: Routing,
}

fn check_case<R: Runtime>(client: &ComputeClient<R>, c: &Case) {
    let (d, f, experts) = (c.d, c.f, c.experts);
    let label = format!("T={} d={d} F={f} E={experts} k={} bs={} {:?}", c.tokens, c.top_k, c.block, c.routing);
    let plan = plan(c.tokens, c.top_k, experts, (c.tokens * 31 + d * 7 + experts) as u64, c.routing);
    let topo = BlockSparseTopology::for_experts(&plan.counts, f, c.block).unwrap();
    let (rows, cols, nnz_len) = (topo.rows(), topo.cols(), topo.sparse_len());
    let bufs = TopologyBuffers::upload(client, &topo).unwrap();
    let experts_of = row_expert(&topo);
    // Dense masking: keep entry (r, n) iff column n belongs to row r's expert.
    let mask = |dense: &mut Vec<f32>| {
        for r in 0..rows {
            for n in 0..cols {
                if n / topo.ffn_padded() != experts_of[r] {
                    dense[r * cols + n] = 0.0;
                }
            }
        }
    };

    let x = padded_x(&plan, &topo, &values(c.tokens * d, 1), d);
    let w1 = values(experts * f * d, 2); // [E, F, d]
    let w2 = values(experts * d * f, 3); // [E, d, F]
    let s = values(nnz_len, 4); // arbitrary sparse data, padded columns included
    let dout = values(rows * d, 5);

    for transpose in [true, false] {
        // SDD: transpose → w1 [E, F, d] (forward up-projection); else w2 [E, d, F] (dH of the DSD).
        let w = if transpose { &w1 } else { &w2 };
        let problem = BlockSparseProblem::for_topology(&topo, d, transpose);
        let out = client.empty(nnz_len.max(1) * 4);
        launch_sdd::<R, f32>(client, &problem, &topo, &bufs, upload(client, &x), upload(client, w), out.clone()).unwrap();
        let got = read(client, out, nnz_len);
        let want = reference::sdd(&topo, &x, w, d, transpose);
        assert!(max_rel(&got, &want) < 1e-5, "{label}: sdd ᵀ={transpose} vs reference {}", max_rel(&got, &want));
        let mut dense = matmul(&x, &transpose_cat(&topo, w, d, transpose), rows, d, cols);
        mask(&mut dense);
        let got_dense = reference::to_dense(&topo, &got);
        assert!(max_rel(&got_dense, &dense) < 1e-5, "{label}: sdd ᵀ={transpose} vs dense {}", max_rel(&got_dense, &dense));

        // DSD: transpose → w2 [E, d, F] (forward down-projection); else w1 [E, F, d] (dX of the SDD).
        let w = if transpose { &w2 } else { &w1 };
        let out = client.empty((rows * d).max(1) * 4);
        launch_dsd::<R, f32>(client, &problem, &topo, &bufs, upload(client, &s), upload(client, w), out.clone()).unwrap();
        let got = read(client, out, rows * d);
        let want = reference::dsd(&topo, &s, w, d, transpose);
        assert!(max_rel(&got, &want) < 1e-5, "{label}: dsd ᵀ={transpose} vs reference {}", max_rel(&got, &want));
        let dense = matmul(&reference::to_dense(&topo, &s), &weight_cat(&topo, w, d, !transpose), rows, cols, d);
        assert!(max_rel(&got, &dense) < 1e-5, "{label}: dsd ᵀ={transpose} vs dense {}", max_rel(&got, &dense));

        // DSᵀD: the weight gradients, [E, F, d] or (transpose) [E, d, F].
        let out = client.empty((experts * f * d).max(1) * 4);
        launch_dstd::<R, f32>(client, &problem, &topo, &bufs, upload(client, &s), upload(client, &dout), out.clone()).unwrap();
        let got = read(client, out, experts * f * d);
        let want = reference::dstd(&topo, &s, &dout, d, transpose);
        assert!(max_rel(&got, &want) < 1e-5, "{label}: dstd ᵀ={transpose} vs reference {}", max_rel(&got, &want));
        // Dense: (masked S)ᵀ · dout = [E·Fp, d], then drop the padded columns.
        let mut sd = reference::to_dense(&topo, &s);
        mask(&mut sd);
        let g = matmul(&transposed(&sd, rows, cols), &dout, cols, rows, d);
        let mut dense = vec![0f32; experts * f * d];
        for e in 0..experts {
            for cc in 0..f {
                for o in 0..d {
                    let idx = if transpose { (e * d + o) * f + cc } else { (e * f + cc) * d + o };
                    dense[idx] = g[(e * topo.ffn_padded() + cc) * d + o];
                }
            }
        }
        assert!(max_rel(&got, &dense) < 1e-5, "{label}: dstd ᵀ={transpose} vs dense {}", max_rel(&got, &dense));
        for e in (0..experts).filter(|&e| plan.counts[e] == 0) {
            assert!(got[e * f * d..(e + 1) * f * d].iter().all(|v| *v == 0.0), "{label}: expert {e} without rows has a gradient");
        }
    }
}

/// `Wcatᵀ [d, E·Fp]` for the SDD: from `w [E, F, d]` (`transpose`) or `w [E, d, F]`.
fn transpose_cat(topo: &BlockSparseTopology, w: &[f32], d: usize, transpose: bool) -> Vec<f32> {
    transposed(&weight_cat(topo, w, d, transpose), topo.cols(), d)
}

fn all_cases<R: Runtime>(device: &R::Device) {
    let client = R::client(device);
    let cases = [
        Case { tokens: 1, d: 8, f: 12, experts: 4, top_k: 2, block: 16, routing: Routing::Random(None) },
        // T not a multiple of bs, odd d and F (F = 17 padded to 32), an expert with no token.
        Case { tokens: 21, d: 33, f: 17, experts: 4, top_k: 2, block: 16, routing: Routing::Random(Some(2)) },
        Case { tokens: 19, d: 33, f: 17, experts: 8, top_k: 3, block: 16, routing: Routing::Random(None) },
        Case { tokens: 23, d: 16, f: 32, experts: 4, top_k: 1, block: 16, routing: Routing::Random(None) },
        Case { tokens: 20, d: 12, f: 20, experts: 4, top_k: 1, block: 8, routing: Routing::AllToFirst },
        Case { tokens: 11, d: 16, f: 8, experts: 1, top_k: 1, block: 32, routing: Routing::Random(None) },
    ];
    for case in &cases {
        check_case(&client, case);
    }
}

#[test]
fn block_sparse_kernels_match_reference_and_dense_on_wgpu() {
    all_cases::<cubecl::wgpu::WgpuRuntime>(&Default::default());
}

#[test]
fn problems_that_do_not_match_the_topology_are_rejected() {
    let topo = BlockSparseTopology::for_experts(&[3, 0, 5], 17, 16).unwrap();
    let ok = BlockSparseProblem::for_topology(&topo, 33, true);
    assert_eq!(ok.validate(&topo), Ok(()));
    assert_eq!((ok.rows, ok.block, ok.ffn, ok.num_experts), (32, 16, 17, 3));
    assert_eq!(
        BlockSparseProblem { rows: 48, ..ok }.validate(&topo),
        Err(BlockSparseError::Mismatch { what: "padded rows", got: 48, expected: 32 })
    );
    assert_eq!(
        BlockSparseProblem { ffn: 16, ..ok }.validate(&topo),
        Err(BlockSparseError::Mismatch { what: "expert hidden width", got: 16, expected: 17 })
    );
    assert_eq!(BlockSparseProblem { block: 0, ..ok }.validate(&topo), Err(BlockSparseError::ZeroSize { what: "block size" }));
    assert!(matches!(BlockSparseProblem { num_experts: 2, ..ok }.validate(&topo), Err(BlockSparseError::Mismatch { .. })));
    let msg = BlockSparseProblem { rows: 48, ..ok }.validate(&topo).unwrap_err().to_string();
    assert_eq!(msg, "padded rows: got 48, expected 32");
}

/// The kernels follow the storage type: f16 operands, f32 accumulation, compared with the f64
/// reference on the f16-rounded inputs (only the final rounding to f16 differs). `w` serves as
/// `[E, F, d]` for the SDD and as `[E, d, F]` for the DSD (same element count).
fn check_f16<R: Runtime>(client: &ComputeClient<R>) {
    use half::f16;
    let plan = plan(21, 2, 4, 5, Routing::Random(Some(1)));
    let topo = BlockSparseTopology::for_experts(&plan.counts, 17, 16).unwrap();
    let bufs = TopologyBuffers::upload(client, &topo).unwrap();
    let d = 33;
    let round = |v: Vec<f32>| v.into_iter().map(|x| f16::from_f32(x).to_f32()).collect::<Vec<_>>();
    let up = |v: &[f32]| client.create_from_slice(f16::as_bytes(&v.iter().map(|x| f16::from_f32(*x)).collect::<Vec<_>>()));
    let down = |h, n: usize| f16::from_bytes(&client.read_one(h).expect("read back"))[..n].iter().map(|x| x.to_f32()).collect::<Vec<_>>();
    let x = round(padded_x(&plan, &topo, &values(21 * d, 1), d));
    let w = round(values(4 * 17 * d, 2));
    let s = round(values(topo.sparse_len(), 3));
    let problem = BlockSparseProblem::for_topology(&topo, d, true);

    let out = client.empty(topo.sparse_len() * 2);
    launch_sdd::<R, f16>(client, &problem, &topo, &bufs, up(&x), up(&w), out.clone()).unwrap();
    let want = reference::sdd(&topo, &x, &w, d, true);
    let err = max_rel(&down(out, topo.sparse_len()), &want);
    assert!(err < 2e-3, "f16 sdd err {err}");

    let out = client.empty(topo.rows() * d * 2);
    launch_dsd::<R, f16>(client, &problem, &topo, &bufs, up(&s), up(&w), out.clone()).unwrap();
    let want = reference::dsd(&topo, &s, &w, d, true);
    let err = max_rel(&down(out, topo.rows() * d), &want);
    assert!(err < 2e-3, "f16 dsd err {err}");

    let out = client.empty(4 * 17 * d * 2);
    launch_dstd::<R, f16>(client, &problem, &topo, &bufs, up(&s), up(&x), out.clone()).unwrap();
    let want = reference::dstd(&topo, &s, &x, d, true);
    let err = max_rel(&down(out, 4 * 17 * d), &want);
    assert!(err < 2e-3, "f16 dstd err {err}");
}

#[test]
fn block_sparse_kernels_follow_f16_storage_on_wgpu() {
    let client = cubecl::wgpu::WgpuRuntime::client(&Default::default());
    check_f16(&client);
}

/// Half-precision storage types of the tensor-core kernels.
trait HalfElem: Float + CubeElement {
    const NAME: &'static str;
    /// `max_rel` bound against the f64 reference on the rounded inputs (the output rounding).
    const BOUND: f32;
    fn of(v: f32) -> Self;
    fn value(self) -> f32;
}

impl HalfElem for half::f16 {
    const NAME: &'static str = "f16";
    const BOUND: f32 = 2e-3;
    fn of(v: f32) -> Self {
        half::f16::from_f32(v)
    }
    fn value(self) -> f32 {
        self.to_f32()
    }
}

impl HalfElem for half::bf16 {
    const NAME: &'static str = "bf16";
    const BOUND: f32 = 1e-2;
    fn of(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
    fn value(self) -> f32 {
        self.to_f32()
    }
}

/// Every kernel choice the block-sparse launchers take.
const STRATEGIES: [BlockSparseStrategy; 9] = [
    BlockSparseStrategy::Naive,
    BlockSparseStrategy::CmmaPipelined { block_k: 32, stages: 2, wide: false },
    BlockSparseStrategy::CmmaPipelined { block_k: 32, stages: 3, wide: false },
    BlockSparseStrategy::CmmaPipelined { block_k: 32, stages: 4, wide: false },
    BlockSparseStrategy::CmmaPipelined { block_k: 64, stages: 2, wide: false },
    BlockSparseStrategy::CmmaPipelined { block_k: 64, stages: 3, wide: false },
    BlockSparseStrategy::CmmaPipelined { block_k: 32, stages: 4, wide: true },
    BlockSparseStrategy::CmmaPipelined { block_k: 64, stages: 2, wide: true },
    BlockSparseStrategy::Auto,
];

/// Block size 128 in half precision through every strategy: where the tensor-core kernels can run
/// (CUDA), each configuration against the f64 reference (outputs pre-filled with NaN; the SDD's
/// padded columns exactly zero; the DSD ignoring the garbage the sparse data holds there; the
/// starved expert's DSᵀD gradient zero); where they cannot (wgpu), each one refused with
/// `KernelError::Unsupported` and `Auto` running the one-element kernels. F = 200 (padded to 256),
/// dense width 72 (a ragged column tile), three experts with rows (ragged counts), one starved.
fn check_cmma_paths<R: Runtime, S: HalfElem>(client: &ComputeClient<R>) {
    let (tokens, top_k, experts, f, d) = (40, 2, 4, 200, 72);
    let plan = plan(tokens, top_k, experts, 77, Routing::Random(Some(1)));
    let topo = BlockSparseTopology::for_experts(&plan.counts, f, 128).unwrap();
    let bufs = TopologyBuffers::upload(client, &topo).unwrap();
    let (rows, nnz_len) = (topo.rows(), topo.sparse_len());
    let round = |v: Vec<f32>| v.into_iter().map(|x| S::of(x).value()).collect::<Vec<_>>();
    let up = |v: &[f32]| client.create_from_slice(S::as_bytes(&v.iter().map(|x| S::of(*x)).collect::<Vec<_>>()));
    let nan = |n: usize| up(&vec![f32::NAN; n.max(1)]);
    let down = |h, n: usize| S::from_bytes(&client.read_one(h).expect("read back"))[..n].iter().map(|x| x.value()).collect::<Vec<_>>();
    let x = round(padded_x(&plan, &topo, &values(tokens * d, 1), d));
    let w = round(values(experts * f * d, 2)); // [E, F, d] or [E, d, F]
    let s = round(values(nnz_len, 3)); // nonzero in the padded columns too
    let dout = round(values(rows * d, 4));
    let (hx, hw, hs, hd) = (up(&x), up(&w), up(&s), up(&dout));
    let supported = block_sparse_cmma_supported::<R, S>(client, &BlockSparseProblem::for_topology(&topo, d, true));
    println!("block-sparse {} bs=128 counts {:?}: tensor-core path supported here: {supported}", S::NAME, plan.counts);
    for transpose in [true, false] {
        let problem = BlockSparseProblem::for_topology(&topo, d, transpose);
        let want_sdd = reference::sdd(&topo, &x, &w, d, transpose);
        let want_dsd = reference::dsd(&topo, &s, &w, d, transpose);
        let want_dstd = reference::dstd(&topo, &s, &dout, d, transpose);
        for strategy in STRATEGIES {
            let label = format!("{} transpose={transpose} {strategy:?}", S::NAME);
            if matches!(strategy, BlockSparseStrategy::CmmaPipelined { .. }) && !supported {
                let results = [
                    launch_sdd_with::<R, S>(client, &problem, &topo, &bufs, hx.clone(), hw.clone(), nan(nnz_len), strategy),
                    launch_dsd_with::<R, S>(client, &problem, &topo, &bufs, hs.clone(), hw.clone(), nan(rows * d), strategy),
                    launch_dstd_with::<R, S>(client, &problem, &topo, &bufs, hs.clone(), hd.clone(), nan(experts * f * d), strategy),
                ];
                let msg = results[0].as_ref().err().map(|e| e.to_string()).unwrap_or_default();
                for res in results {
                    assert!(
                        matches!(res, Err(BlockSparseError::Kernel(KernelError::Unsupported(_)))),
                        "{label}: tensor cores unsupported here but not refused: {res:?}"
                    );
                }
                println!("{label}: refused ({msg})");
                continue;
            }
            let expected = |default: BlockSparseStrategy| match strategy {
                BlockSparseStrategy::Auto if supported => default,
                BlockSparseStrategy::Auto => BlockSparseStrategy::Naive,
                other => other,
            };

            let out = nan(nnz_len);
            let ran = launch_sdd_with::<R, S>(client, &problem, &topo, &bufs, hx.clone(), hw.clone(), out.clone(), strategy).unwrap();
            assert_eq!(ran, expected(BLOCK_SPARSE_CMMA_DEFAULT), "{label}: SDD ran {ran:?}");
            let got = down(out, nnz_len);
            let err = max_rel(&got, &want_sdd);
            println!("{label}: SDD ran {ran:?}, max rel err {err:.2e}");
            assert!(err < S::BOUND, "{label}: SDD (ran {ran:?}) err {err}");
            for (b, &j) in topo.column_indices().iter().enumerate() {
                for c in (0..128).filter(|c| (j * 128 + c) % topo.ffn_padded() >= f) {
                    assert!((0..128).all(|r| got[(b * 128 + r) * 128 + c] == 0.0), "{label}: SDD padded column {c} of block {b} not zero");
                }
            }

            let out = nan(rows * d);
            let ran = launch_dsd_with::<R, S>(client, &problem, &topo, &bufs, hs.clone(), hw.clone(), out.clone(), strategy).unwrap();
            assert_eq!(ran, expected(BLOCK_SPARSE_CMMA_DEFAULT), "{label}: DSD ran {ran:?}");
            let err = max_rel(&down(out, rows * d), &want_dsd);
            println!("{label}: DSD ran {ran:?}, max rel err {err:.2e}");
            assert!(err < S::BOUND, "{label}: DSD (ran {ran:?}) err {err}");

            let out = nan(experts * f * d);
            let ran = launch_dstd_with::<R, S>(client, &problem, &topo, &bufs, hs.clone(), hd.clone(), out.clone(), strategy).unwrap();
            assert_eq!(ran, expected(BLOCK_SPARSE_CMMA_WEIGHT_GRAD_DEFAULT), "{label}: DSTD ran {ran:?}");
            let got = down(out, experts * f * d);
            let err = max_rel(&got, &want_dstd);
            println!("{label}: DSTD ran {ran:?}, max rel err {err:.2e}");
            assert!(err < S::BOUND, "{label}: DSTD (ran {ran:?}) err {err}");
            assert!(got[f * d..2 * f * d].iter().all(|v| *v == 0.0), "{label}: starved expert 1 has a gradient");
        }
    }
}

#[test]
fn tensor_core_block_sparse_is_refused_and_auto_falls_back_on_wgpu() {
    let client = cubecl::wgpu::WgpuRuntime::client(&Default::default());
    check_cmma_paths::<_, half::f16>(&client);
}

/// Kernel choices the tensor-core path can never run are refused with typed errors whatever the
/// device: a block size other than 128, f32 storage, an unsupported pipeline configuration.
#[test]
fn tensor_core_block_sparse_refuses_what_it_cannot_run() {
    let client = cubecl::wgpu::WgpuRuntime::client(&Default::default());
    type W = cubecl::wgpu::WgpuRuntime;
    let refused = |res: Result<BlockSparseStrategy, BlockSparseError>| match res {
        Err(BlockSparseError::Kernel(KernelError::Unsupported(msg))) => msg,
        other => panic!("expected KernelError::Unsupported, got {other:?}"),
    };
    let pipelined = BLOCK_SPARSE_CMMA_DEFAULT;

    // Block size 16: the tensor-core kernels need 128 (the tile); Auto runs the one-element kernels.
    let topo = BlockSparseTopology::for_experts(&[3, 5], 16, 16).unwrap();
    let bufs = TopologyBuffers::upload(&client, &topo).unwrap();
    let p = BlockSparseProblem::for_topology(&topo, 8, true);
    assert!(!block_sparse_cmma_supported::<W, half::f16>(&client, &p));
    let h = |n: usize| client.empty(n.max(1) * 2);
    let msg = refused(launch_sdd_with::<W, half::f16>(&client, &p, &topo, &bufs, h(p.dense_len()), h(p.weight_len()), h(topo.sparse_len()), pipelined));
    assert!(msg.contains("block size 16 is not supported"), "{msg}");
    let ran = launch_dstd_with::<W, half::f16>(&client, &p, &topo, &bufs, h(topo.sparse_len()), h(p.dense_len()), h(p.weight_len()), BlockSparseStrategy::Auto);
    assert_eq!(ran, Ok(BlockSparseStrategy::Naive));

    // Block 128 but f32 storage: no f32 tensor-core kernel.
    let topo = BlockSparseTopology::for_experts(&[3, 5], 16, 128).unwrap();
    let bufs = TopologyBuffers::upload(&client, &topo).unwrap();
    let p = BlockSparseProblem::for_topology(&topo, 8, false);
    assert!(!block_sparse_cmma_supported::<W, f32>(&client, &p));
    let h4 = |n: usize| client.empty(n.max(1) * 4);
    refused(launch_dsd_with::<W, f32>(&client, &p, &topo, &bufs, h4(topo.sparse_len()), h4(p.weight_len()), h4(p.dense_len()), pipelined));

    // A pipeline configuration outside 32/64 x 2..4 is refused before anything else.
    let odd = BlockSparseStrategy::CmmaPipelined { block_k: 48, stages: 2, wide: false };
    let msg = refused(launch_dsd_with::<W, half::f16>(&client, &p, &topo, &bufs, h(topo.sparse_len()), h(p.weight_len()), h(p.dense_len()), odd));
    assert!(msg.contains("block_k 48"), "{msg}");
    // A problem that does not describe the topology is still a shape error first.
    let bad = BlockSparseProblem { rows: 7, ..p };
    assert!(matches!(
        launch_sdd_with::<W, half::f16>(&client, &bad, &topo, &bufs, h(1), h(1), h(1), pipelined),
        Err(BlockSparseError::Mismatch { what: "padded rows", .. })
    ));
}

/// The same cases on CUDA (`--features cuda`; needs an NVIDIA GPU), and the tensor-core path
/// (block 128, f16 and bf16) against the references through every strategy.
#[cfg(feature = "cuda")]
#[test]
fn block_sparse_kernels_match_reference_and_dense_on_cuda() {
    all_cases::<cubecl::cuda::CudaRuntime>(&Default::default());
    let client = cubecl::cuda::CudaRuntime::client(&Default::default());
    check_f16(&client);
    check_cmma_paths::<_, half::f16>(&client);
    check_cmma_paths::<_, half::bf16>(&client);
}

/// The tensor-core kernels address nonzero block (row block `rb`, local column block `j`) as
/// `rb · blocks_per_row + j` and take every 128-row tile of the padded expert segments to be one row
/// block of that expert (`blocksparse/cmma.rs`): true of every topology `for_experts` builds.
#[test]
fn host_block_index_of_the_tensor_core_kernels_is_closed_form() {
    for (counts, f) in [(vec![3usize, 0, 300, 129, 128], 200usize), (vec![0, 0, 1], 128), (vec![1000, 17], 14336)] {
        let topo = BlockSparseTopology::for_experts(&counts, f, 128).unwrap();
        let nb = topo.blocks_per_row();
        assert_eq!(nb, f.div_ceil(128));
        for e in 0..counts.len() {
            let rows = topo.expert_rows(e);
            assert!(rows.start.is_multiple_of(128) && rows.len().is_multiple_of(128), "{counts:?}: segment {e} {rows:?}");
            for rb in rows.start / 128..rows.end / 128 {
                assert_eq!(topo.row_offsets()[rb], rb * nb, "{counts:?}: row block {rb}");
                for j in 0..nb {
                    assert_eq!(topo.row_indices()[rb * nb + j], rb);
                    assert_eq!(topo.column_indices()[rb * nb + j], e * nb + j, "{counts:?}: block ({rb}, {j})");
                }
            }
        }
        assert_eq!(topo.nnz(), topo.row_blocks() * nb);
    }
}
