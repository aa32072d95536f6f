//! The in-process communicator, device mesh and sharded tensors on `NdArray`, checked against
//! host arithmetic on `Vec<f32>` for world sizes 1 to 4.
//!
//! NdArray has no bf16/f16 storage, so the half-precision reduction is tested on `TensorData`
//! through [`reduce_host`] (the same function `ThreadComm` reduces with); the byte-moving
//! collectives are dtype-agnostic and are exercised with f32 and f64 tensors.

use std::sync::mpsc;
use std::time::Duration;

use burn::backend::NdArray;
use burn::tensor::{DType, Tensor, TensorData, bf16, f16};
use burn_moe_backend::dist::{
    CommConfig, CommError, Communicator, DTensor, DeviceMesh, MeshError, Placement, RankError,
    ReduceOp, ThreadComm, reduce_host, reduce_scatter_shard, shard_range, validate_mesh,
};

type B = NdArray<f32>;
type Comm = ThreadComm<B>;

const SIZES: [usize; 4] = [1, 2, 3, 4];

fn config() -> CommConfig {
    CommConfig::with_timeout(Duration::from_secs(10))
}

/// Runs `f` on `n` ranks and unwraps the per-rank results (a rank's panic message is shown).
fn run<R: Send>(n: usize, f: impl Fn(Comm) -> R + Sync) -> Vec<R> {
    Comm::run_ranks(n, config(), f)
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("{e}")))
        .collect()
}

/// Deterministic, non-integer values so sums actually round.
fn values(rank: usize, len: usize, salt: usize) -> Vec<f32> {
    (0..len)
        .map(|i| (rank as f32 + 1.0) * 0.1 + i as f32 * 0.013 - (salt as f32) * 0.37)
        .collect()
}

fn tensor<const D: usize>(v: Vec<f32>, shape: [usize; D]) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(v, shape), &Default::default())
}

fn host<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

/// Rank-order f32 fold, the reference for Sum (and, divided, Avg).
fn host_sum(inputs: &[Vec<f32>]) -> Vec<f32> {
    let mut acc = inputs[0].clone();
    for x in &inputs[1..] {
        for (a, b) in acc.iter_mut().zip(x) {
            *a += *b;
        }
    }
    acc
}

/// Row-major `[rows, cols]` block `rows` of a matrix.
fn rows(v: &[f32], cols: usize, r: std::ops::Range<usize>) -> Vec<f32> {
    v[r.start * cols..r.end * cols].to_vec()
}

#[test]
fn all_reduce_sum_and_avg_match_host_fold_bitwise() {
    for n in SIZES {
        let inputs: Vec<Vec<f32>> = (0..n).map(|r| values(r, 15, 0)).collect();
        let sum = host_sum(&inputs);
        let avg: Vec<f32> = sum.iter().map(|s| s / n as f32).collect();
        let out = run(n, |comm| {
            let x = || tensor(values(comm.rank(), 15, 0), [3, 5]);
            let s = comm.all_reduce(x(), ReduceOp::Sum).unwrap();
            let a = comm.all_reduce(x(), ReduceOp::Avg).unwrap();
            assert_eq!(s.dims(), [3, 5]);
            (host(s), host(a))
        });
        for (rank, (s, a)) in out.into_iter().enumerate() {
            assert_eq!(s, sum, "Sum, world {n}, rank {rank}");
            assert_eq!(a, avg, "Avg, world {n}, rank {rank}");
        }
        if n > 1 {
            assert_ne!(sum, avg, "Avg must differ from Sum for world {n}");
        }
    }
}

#[test]
fn all_reduce_f64_keeps_dtype_and_accumulates_in_f64() {
    let n = 3;
    let inputs: Vec<Vec<f64>> = (0..n)
        .map(|r| {
            (0..6)
                .map(|i| 0.1 * (r + 1) as f64 + 1e-9 * i as f64)
                .collect()
        })
        .collect();
    let mut expected = inputs[0].clone();
    for x in &inputs[1..] {
        expected.iter_mut().zip(x).for_each(|(a, b)| *a += *b);
    }
    let out = run(n, |comm| {
        let data = TensorData::new(inputs[comm.rank()].clone(), [2, 3]);
        let x = Tensor::<B, 2>::from_data(data, (&Default::default(), DType::F64));
        let y = comm.all_reduce(x, ReduceOp::Sum).unwrap();
        assert_eq!(y.dtype(), DType::F64);
        y.into_data().to_vec::<f64>().unwrap()
    });
    for got in out {
        assert_eq!(got, expected);
    }
}

#[test]
fn half_precision_reduction_accumulates_in_f32_and_rounds_once() {
    // Three bf16 inputs whose pairwise bf16 sums would round differently from the f32 sum.
    let xs: Vec<Vec<f32>> = vec![
        vec![1.0, 0.5, -3.25, 100.0],
        vec![0.00390625, 0.001953125, 1.0, 0.5],
        vec![0.00390625, 0.001953125, 2.0, 0.25],
    ];
    let f32_sum = host_sum(&xs);
    let bf: Vec<TensorData> = xs
        .iter()
        .map(|x| TensorData::new(x.iter().map(|v| bf16::from_f32(*v)).collect(), [4]))
        .collect();
    let refs: Vec<&TensorData> = bf.iter().collect();
    let sum = reduce_host(&refs, ReduceOp::Sum).unwrap();
    assert_eq!(sum.dtype, DType::BF16);
    let expected: Vec<bf16> = f32_sum.iter().map(|v| bf16::from_f32(*v)).collect();
    assert_eq!(sum.to_vec::<bf16>().unwrap(), expected);
    // 1.0 + 2^-8 + 2^-8 = 1.0078125 is representable in bf16; a bf16 running sum would lose both.
    assert_eq!(expected[0].to_f32(), 1.0078125);

    let avg = reduce_host(&refs, ReduceOp::Avg).unwrap();
    let expected_avg: Vec<bf16> = f32_sum.iter().map(|v| bf16::from_f32(v / 3.0)).collect();
    assert_eq!(avg.to_vec::<bf16>().unwrap(), expected_avg);

    let h: Vec<TensorData> = xs
        .iter()
        .map(|x| TensorData::new(x.iter().map(|v| f16::from_f32(*v)).collect(), [4]))
        .collect();
    let refs: Vec<&TensorData> = h.iter().collect();
    let sum = reduce_host(&refs, ReduceOp::Sum).unwrap();
    let expected: Vec<f16> = f32_sum.iter().map(|v| f16::from_f32(*v)).collect();
    assert_eq!(sum.to_vec::<f16>().unwrap(), expected);

    // Disagreeing dtypes are refused with the rank named.
    let mixed = [&bf[0], &h[1]];
    let err = reduce_host(&mixed, ReduceOp::Sum).unwrap_err();
    assert!(err.contains("rank 1"), "{err}");
}

#[test]
fn all_gather_concatenates_in_rank_order_along_any_dim() {
    for n in SIZES {
        let out = run(n, |comm| {
            let r = comm.rank();
            let g0 = comm.all_gather(tensor(values(r, 6, 1), [2, 3]), 0).unwrap();
            let g1 = comm.all_gather(tensor(values(r, 6, 1), [2, 3]), 1).unwrap();
            assert_eq!(g0.dims(), [2 * n, 3]);
            assert_eq!(g1.dims(), [2, 3 * n]);
            (host(g0), host(g1))
        });
        let dim0: Vec<f32> = (0..n).flat_map(|r| values(r, 6, 1)).collect();
        let mut dim1 = Vec::new();
        for row in 0..2 {
            for r in 0..n {
                dim1.extend_from_slice(&values(r, 6, 1)[row * 3..row * 3 + 3]);
            }
        }
        for (g0, g1) in out {
            assert_eq!(g0, dim0);
            assert_eq!(g1, dim1);
        }
    }
}

#[test]
fn reduce_scatter_gives_each_rank_its_part_of_the_sum() {
    for n in SIZES {
        let rows_total = 2 * n;
        let inputs: Vec<Vec<f32>> = (0..n).map(|r| values(r, rows_total * 3, 2)).collect();
        let sum = host_sum(&inputs);
        let out = run(n, |comm| {
            let r = comm.rank();
            let x = || tensor(values(r, rows_total * 3, 2), [rows_total, 3]);
            let s = comm.reduce_scatter(x(), 0, ReduceOp::Sum).unwrap();
            let a = comm.reduce_scatter(x(), 0, ReduceOp::Avg).unwrap();
            // Along dim 1: a [3, n] tensor, rank r gets column r.
            let c = comm
                .reduce_scatter(tensor(values(r, 3 * n, 2), [3, n]), 1, ReduceOp::Sum)
                .unwrap();
            assert_eq!(s.dims(), [2, 3]);
            assert_eq!(c.dims(), [3, 1]);
            (host(s), host(a), host(c))
        });
        let col_inputs: Vec<Vec<f32>> = (0..n).map(|r| values(r, 3 * n, 2)).collect();
        let col_sum = host_sum(&col_inputs);
        for (r, (s, a, c)) in out.into_iter().enumerate() {
            let part = rows(&sum, 3, 2 * r..2 * r + 2);
            assert_eq!(s, part, "world {n} rank {r}");
            let avg: Vec<f32> = part.iter().map(|v| v / n as f32).collect();
            assert_eq!(a, avg);
            let col: Vec<f32> = (0..3).map(|row| col_sum[row * n + r]).collect();
            assert_eq!(c, col);
        }
    }
}

#[test]
fn reduce_scatter_with_indivisible_length_fails_on_every_rank() {
    let out = run(2, |comm| {
        comm.reduce_scatter(tensor(values(0, 6, 0), [3, 2]), 0, ReduceOp::Sum)
            .unwrap_err()
    });
    for e in out {
        let msg = e.to_string();
        assert!(matches!(e, CommError::InvalidArgument { .. }), "{msg}");
        assert!(
            msg.contains("length 3") && msg.contains("group size 2"),
            "{msg}"
        );
    }
}

/// Split sizes with zeros and unequal lengths: rank `i` sends `(i + 2j) % 3` rows to rank `j`.
fn splits(i: usize, j: usize) -> usize {
    (i + 2 * j) % 3
}

#[test]
fn all_to_all_with_uneven_and_zero_splits() {
    const COLS: usize = 2;
    for n in SIZES {
        // Row `k` of rank `i` holds `[100 i + k, 100 i + k + 0.5]`.
        let input = |i: usize| -> Vec<f32> {
            let len: usize = (0..n).map(|j| splits(i, j)).sum();
            (0..len)
                .flat_map(|k| {
                    [
                        100.0 * i as f32 + k as f32,
                        100.0 * i as f32 + k as f32 + 0.5,
                    ]
                })
                .collect()
        };
        let out = run(n, |comm| {
            let i = comm.rank();
            let x = input(i);
            let len = x.len() / COLS;
            let ins: Vec<usize> = (0..n).map(|j| splits(i, j)).collect();
            let outs: Vec<usize> = (0..n).map(|j| splits(j, i)).collect();
            let y = comm
                .all_to_all_single(tensor(x, [len, COLS]), &ins, &outs)
                .unwrap();
            assert_eq!(y.dims(), [outs.iter().sum::<usize>(), COLS]);
            host(y)
        });
        for (me, got) in out.into_iter().enumerate() {
            let mut expected = Vec::new();
            for j in 0..n {
                let start: usize = (0..me).map(|k| splits(j, k)).sum();
                expected.extend(rows(&input(j), COLS, start..start + splits(j, me)));
            }
            assert_eq!(got, expected, "world {n}, rank {me}");
        }
    }
}

#[test]
fn all_to_all_disagreeing_splits_is_a_mismatch_on_every_rank() {
    let out = run(3, |comm| {
        let i = comm.rank();
        let ins = vec![1, 1, 1];
        // Rank 1 expects 2 rows from rank 0, which sends 1.
        let outs = if i == 1 { vec![2, 1, 0] } else { vec![1, 1, 1] };
        comm.all_to_all_single(tensor(values(i, 6, 0), [3, 2]), &ins, &outs)
            .unwrap_err()
    });
    for e in out {
        let msg = e.to_string();
        assert!(matches!(e, CommError::Mismatch { .. }), "{msg}");
        assert!(msg.contains("rank 0 sends 1 rows to rank 1"), "{msg}");
        assert!(msg.contains("expects 2 rows"), "{msg}");
    }
}

#[test]
fn invalid_split_sizes_on_one_rank_fail_everywhere_without_waiting() {
    let out = run(3, |comm| {
        let i = comm.rank();
        // Rank 2's input splits sum to 4 but its input has 3 rows.
        let ins = if i == 2 { vec![2, 1, 1] } else { vec![1, 1, 1] };
        comm.all_to_all_single(tensor(values(i, 6, 0), [3, 2]), &ins, &[1, 1, 1])
            .unwrap_err()
    });
    for (rank, e) in out.into_iter().enumerate() {
        let msg = e.to_string();
        if rank == 2 {
            assert!(matches!(e, CommError::InvalidArgument { .. }), "{msg}");
            assert!(msg.contains("sum to 4") && msg.contains("3 rows"), "{msg}");
        } else {
            assert!(matches!(e, CommError::Mismatch { .. }), "{msg}");
            assert!(msg.contains("rank 2 passed an invalid argument"), "{msg}");
        }
    }
}

#[test]
fn broadcast_from_every_root() {
    for n in SIZES {
        for root in 0..n {
            let out = run(n, |comm| {
                let y = comm
                    .broadcast(tensor(values(comm.rank(), 4, 3), [2, 2]), root)
                    .unwrap();
                comm.barrier().unwrap();
                host(y)
            });
            for got in out {
                assert_eq!(got, values(root, 4, 3), "world {n}, root {root}");
            }
        }
    }
}

#[test]
fn shape_dtype_and_order_mismatches_are_reported_on_all_ranks() {
    let out = run(2, |comm| {
        let r = comm.rank();
        let shape_err = comm
            .all_reduce(
                tensor(values(r, 6, 0), if r == 0 { [2, 3] } else { [3, 2] }),
                ReduceOp::Sum,
            )
            .unwrap_err();
        shape_err.to_string()
    });
    for msg in &out {
        assert!(
            msg.contains("ranks disagree") && msg.contains("[3, 2]"),
            "{msg}"
        );
    }
    let out = run(2, |comm| {
        let r = comm.rank();
        let data = TensorData::new(vec![1.0f64; 4], [4]);
        let x = if r == 0 {
            tensor(vec![1.0; 4], [4])
        } else {
            Tensor::from_data(data, (&Default::default(), DType::F64))
        };
        comm.all_gather(x, 0).unwrap_err().to_string()
    });
    for msg in &out {
        assert!(msg.contains("dtype") && msg.contains("F64"), "{msg}");
    }
    let out = run(2, |comm| {
        let x = tensor(vec![1.0; 2], [2]);
        let e = if comm.rank() == 0 {
            comm.all_reduce(x, ReduceOp::Sum).unwrap_err()
        } else {
            comm.broadcast(x, 0).unwrap_err()
        };
        e.to_string()
    });
    for msg in &out {
        assert!(msg.contains("different order"), "{msg}");
    }
}

#[test]
fn split_forms_groups_by_color_ordered_by_key_and_nests() {
    for n in [2, 3, 4] {
        let out = run(n, |comm| {
            let r = comm.rank();
            let color = r % 2;
            // Reverse order inside each group.
            let sub = comm.split(color, n - r, &format!("parity{color}")).unwrap();
            // Interleave world and sub-group collectives: sequences are independent.
            let sum = comm
                .all_reduce(tensor(vec![r as f32], [1]), ReduceOp::Sum)
                .unwrap();
            let gathered = sub.all_gather(tensor(vec![r as f32], [1]), 0).unwrap();
            let sub_sum = sub
                .all_reduce(tensor(vec![r as f32 + 0.5], [1]), ReduceOp::Sum)
                .unwrap();
            // Nested: split the sub-group into singletons, then a collective in each.
            let single = sub.split(sub.rank(), 0, "single").unwrap();
            let own = single
                .all_reduce(tensor(vec![r as f32], [1]), ReduceOp::Sum)
                .unwrap();
            comm.barrier().unwrap();
            (
                sub.rank(),
                sub.size(),
                sub.global_ranks().to_vec(),
                sub.group_name().to_string(),
                host(sum)[0],
                host(gathered),
                host(sub_sum)[0],
                single.size(),
                host(own)[0],
            )
        });
        let world_sum: f32 = (0..n).map(|r| r as f32).sum();
        for (r, (sub_rank, sub_size, globals, name, sum, gathered, sub_sum, single, own)) in
            out.into_iter().enumerate()
        {
            let color = r % 2;
            let members: Vec<usize> = (0..n).filter(|g| g % 2 == color).rev().collect();
            assert_eq!(globals, members, "world {n} rank {r}");
            assert_eq!(sub_size, members.len());
            assert_eq!(sub_rank, members.iter().position(|&g| g == r).unwrap());
            assert_eq!(name, format!("parity{color}"));
            assert_eq!(sum, world_sum);
            let expected: Vec<f32> = members.iter().map(|&g| g as f32).collect();
            assert_eq!(gathered, expected);
            let expected_sub: f32 = members.iter().map(|&g| g as f32 + 0.5).sum();
            assert_eq!(sub_sum, expected_sub);
            assert_eq!(single, 1);
            assert_eq!(own, r as f32);
        }
    }
}

#[test]
fn mesh_validation_errors_carry_the_numbers() {
    let msg = validate_mesh(8, 2, 2).unwrap_err().to_string();
    assert!(
        msg.contains("dp_size 2 × ep_size 2 != world_size 8"),
        "{msg}"
    );
    let msg = validate_mesh(8, 2, 3).unwrap_err().to_string();
    assert!(
        msg.contains("ep_size 3 does not divide world_size 8"),
        "{msg}"
    );
    let msg = validate_mesh(8, 3, 2).unwrap_err().to_string();
    assert!(
        msg.contains("dp_size 3 does not divide world_size 8"),
        "{msg}"
    );
    let msg = validate_mesh(8, 0, 8).unwrap_err().to_string();
    assert!(
        msg.contains("`dp` has size 0") && msg.contains("world_size 8"),
        "{msg}"
    );
    let msg = validate_mesh(4, 4, 0).unwrap_err().to_string();
    assert!(msg.contains("`ep` has size 0"), "{msg}");
    assert!(validate_mesh(8, 4, 2).is_ok());

    // On a real world: every rank gets the same error and no collective is left waiting.
    let out = run(4, |comm| {
        DeviceMesh::new::<B>(comm, 2, 3).unwrap_err().to_string()
    });
    for msg in out {
        assert!(
            msg.contains("ep_size 3 does not divide world_size 4"),
            "{msg}"
        );
    }
    let out = run(3, |comm| {
        let mesh = DeviceMesh::with_ep::<B>(comm, 3).unwrap();
        let err = mesh.validate_experts(8).unwrap_err();
        assert!(matches!(err, MeshError::Experts { .. }));
        (
            err.to_string(),
            mesh.validate_experts(6).unwrap(),
            mesh.local_experts(6).unwrap(),
        )
    });
    for (r, (msg, per_rank, local)) in out.into_iter().enumerate() {
        assert!(
            msg.contains("num_experts 8 not divisible by ep_size 3"),
            "{msg}"
        );
        assert_eq!(per_rank, 2);
        assert_eq!(local, 2 * r..2 * r + 2);
    }
}

#[test]
fn mesh_groups_membership_for_2x2_1x4_4x1() {
    for (dp, ep) in [(2, 2), (1, 4), (4, 1)] {
        let out = run(4, |comm| {
            let mesh = DeviceMesh::new::<B>(comm, dp, ep).unwrap();
            let r = mesh.world().rank() as f32;
            // A collective in each group proves the groups are wired, not just named.
            let dp_sum = host(
                mesh.dp()
                    .all_reduce(tensor(vec![r], [1]), ReduceOp::Sum)
                    .unwrap(),
            )[0];
            let ep_sum = host(
                mesh.ep()
                    .all_reduce(tensor(vec![r], [1]), ReduceOp::Sum)
                    .unwrap(),
            )[0];
            (
                mesh.coords(),
                mesh.dp().global_ranks().to_vec(),
                mesh.ep().global_ranks().to_vec(),
                mesh.fsdp_group().global_ranks().to_vec(),
                mesh.expert_dp_group().global_ranks().to_vec(),
                mesh.ep().group_name().to_string(),
                dp_sum,
                ep_sum,
            )
        });
        for (g, (coords, dp_members, ep_members, fsdp, expert_dp, ep_name, dp_sum, ep_sum)) in
            out.into_iter().enumerate()
        {
            let (d, e) = (g / ep, g % ep);
            assert_eq!(coords, [d, e], "{dp}x{ep} rank {g}");
            let want_dp: Vec<usize> = (0..dp).map(|i| i * ep + e).collect();
            let want_ep: Vec<usize> = (0..ep).map(|j| d * ep + j).collect();
            assert_eq!(dp_members, want_dp, "{dp}x{ep} rank {g}");
            assert_eq!(ep_members, want_ep, "{dp}x{ep} rank {g}");
            assert_eq!(fsdp, vec![0, 1, 2, 3], "FSDP shards over the whole mesh");
            assert_eq!(expert_dp, want_dp);
            let listed: Vec<String> = want_ep.iter().map(|x| x.to_string()).collect();
            assert_eq!(ep_name, format!("ep[{}]", listed.join(",")));
            assert_eq!(dp_sum, want_dp.iter().map(|&x| x as f32).sum::<f32>());
            assert_eq!(ep_sum, want_ep.iter().map(|&x| x as f32).sum::<f32>());
        }
    }
    // With dp_size == 1 the FSDP group is the EP group: the full world.
    let out = run(2, |comm| {
        let mesh = DeviceMesh::new::<B>(comm, 1, 2).unwrap();
        (
            mesh.fsdp_group().global_ranks().to_vec(),
            mesh.ep().global_ranks().to_vec(),
        )
    });
    for (fsdp, ep) in out {
        assert_eq!(fsdp, ep);
    }
}

#[test]
fn shard_range_follows_torch_chunk() {
    let lens =
        |len, size| -> Vec<usize> { (0..size).map(|r| shard_range(len, size, r).len()).collect() };
    assert_eq!(lens(10, 4), vec![3, 3, 3, 1]);
    assert_eq!(lens(2, 3), vec![1, 1, 0]);
    assert_eq!(lens(5, 4), vec![2, 2, 1, 0]);
    assert_eq!(lens(8, 4), vec![2, 2, 2, 2]);
    assert_eq!(shard_range(10, 4, 3), 9..10);
    assert_eq!(shard_range(2, 3, 2), 2..2);
}

#[test]
fn dtensor_shard_unshard_round_trips_including_uneven_and_empty_shards() {
    // (world, rows): 10 over 4 -> 3,3,3,1; 2 over 3 -> 1,1,0; plus even and single-rank cases.
    for (n, rows_total) in [(4, 10), (3, 2), (2, 6), (1, 3), (4, 5)] {
        let cols = 3;
        let full = values(7, rows_total * cols, 0);
        let out = run(n, |comm| {
            let groups = [&comm];
            let x = tensor(full.clone(), [rows_total, cols]);
            let d = DTensor::distribute(x.clone(), &groups, &[Placement::Shard(0)]).unwrap();
            let loaded = DTensor::from_local_fn(
                [rows_total, cols],
                &groups,
                &[Placement::Shard(0)],
                |ranges: &[std::ops::Range<usize>; 2]| {
                    assert_eq!(ranges[1], 0..cols);
                    let r = ranges[0].clone();
                    tensor(rows(&full, cols, r.clone()), [r.len(), cols])
                },
            )
            .unwrap();
            let local = host(d.to_local().clone());
            assert_eq!(host(loaded.to_local().clone()), local);
            let back = d.full_tensor(&groups).unwrap();
            // Column sharding as well.
            let c = DTensor::distribute(x, &groups, &[Placement::Shard(1)]).unwrap();
            let back_c = c.full_tensor(&groups).unwrap();
            (d.to_local().dims(), local, host(back), host(back_c))
        });
        for (r, (dims, local, back, back_c)) in out.into_iter().enumerate() {
            let range = shard_range(rows_total, n, r);
            assert_eq!(
                dims,
                [range.len(), cols],
                "{rows_total} rows over {n}, rank {r}"
            );
            assert_eq!(local, rows(&full, cols, range));
            assert_eq!(back, full);
            assert_eq!(back_c, full);
        }
    }
    // The uneven shard sizes named in the design.
    let dims = run(4, |comm| {
        DTensor::distribute(
            tensor(values(0, 20, 0), [10, 2]),
            &[&comm],
            &[Placement::Shard(0)],
        )
        .unwrap()
        .to_local()
        .dims()[0]
    });
    assert_eq!(dims, vec![3, 3, 3, 1]);
}

#[test]
fn dtensor_wrong_local_shape_and_wrong_groups_are_errors() {
    let out = run(2, |comm| {
        // The full tensor passed where the shard belongs.
        let e = DTensor::from_local(
            tensor(vec![0.0; 6], [3, 2]),
            [3, 2],
            &[&comm],
            &[Placement::Shard(0)],
        )
        .unwrap_err()
        .to_string();
        let sub = comm.split(comm.rank(), 0, "alone").unwrap();
        let d = DTensor::distribute(
            tensor(vec![0.0; 4], [2, 2]),
            &[&comm],
            &[Placement::Shard(0)],
        )
        .unwrap();
        let g = d.full_tensor(&[&sub]).unwrap_err().to_string();
        (comm.rank(), e, g)
    });
    for (rank, e, g) in out {
        // Rank 0 holds 2 of 3 rows, rank 1 holds 1.
        let expected = if rank == 0 { "[2, 2]" } else { "[1, 2]" };
        assert!(
            e.contains(&format!("shape [3, 2], expected {expected}")),
            "{e}"
        );
        assert!(g.contains("world") && g.contains("alone"), "{g}");
    }
}

#[test]
fn dtensor_on_a_2x2_mesh_nests_shards_in_mesh_order() {
    let (r_total, c_total) = (5, 3);
    let full = values(3, r_total * c_total, 1);
    let out = run(4, |comm| {
        let mesh = DeviceMesh::new::<B>(comm, 2, 2).unwrap();
        let groups = mesh.dim_groups();
        let x = tensor(full.clone(), [r_total, c_total]);
        let nested = DTensor::distribute(
            x.clone(),
            &groups,
            &[Placement::Shard(0), Placement::Shard(0)],
        )
        .unwrap();
        let cross =
            DTensor::distribute(x, &groups, &[Placement::Shard(0), Placement::Shard(1)]).unwrap();
        (
            mesh.coords(),
            nested.ranges(),
            host(nested.full_tensor(&groups).unwrap()),
            cross.ranges(),
            host(cross.to_local().clone()),
            host(cross.full_tensor(&groups).unwrap()),
        )
    });
    for ([d, e], nested_ranges, nested_back, cross_ranges, cross_local, cross_back) in out {
        // dp splits 5 rows into 3 + 2, ep splits each block again.
        let outer = shard_range(5, 2, d);
        let inner = shard_range(outer.len(), 2, e);
        assert_eq!(
            nested_ranges[0],
            outer.start + inner.start..outer.start + inner.end
        );
        assert_eq!(nested_back, full);
        assert_eq!(cross_ranges[0], outer);
        assert_eq!(cross_ranges[1], shard_range(3, 2, e));
        let mut expected = Vec::new();
        for row in cross_ranges[0].clone() {
            for col in cross_ranges[1].clone() {
                expected.push(full[row * c_total + col]);
            }
        }
        assert_eq!(cross_local, expected);
        assert_eq!(cross_back, full);
    }
}

#[test]
fn dtensor_full_tensor_in_two_halves_pads_then_cuts_to_the_same_result() {
    // 10 rows over 4 ranks: shards 3, 3, 3, 1 padded to 3 each, so the gather holds 12 rows.
    let full = values(5, 10 * 2, 2);
    let out = run(4, |comm| {
        let groups = [&comm];
        comm.defer_gathers(true);
        let d = DTensor::distribute(tensor(full.clone(), [10, 2]), &groups, &[Placement::Shard(0)]).unwrap();
        let padded = d.full_tensor_padded(&groups).unwrap();
        comm.defer_gathers(false);
        comm.wait_gathers().unwrap();
        (padded.dims(), host(padded.clone()), host(d.unpad(padded)))
    });
    for (r, (dims, padded, cut)) in out.into_iter().enumerate() {
        assert_eq!(dims, [12, 2], "rank {r}");
        // Rank 3's one row, then its two zero rows.
        assert_eq!(padded[18..20], full[18..20]);
        assert_eq!(padded[20..], [0.0; 4]);
        assert_eq!(cut, full);
    }
    // Two sharded mesh dimensions: the inner gather is cut before the outer one runs.
    let full = values(3, 5 * 3, 1);
    let out = run(4, |comm| {
        let mesh = DeviceMesh::new::<B>(comm, 2, 2).unwrap();
        let groups = mesh.dim_groups();
        let d = DTensor::distribute(tensor(full.clone(), [5, 3]), &groups, &[Placement::Shard(0), Placement::Shard(1)]).unwrap();
        let padded = d.full_tensor_padded(&groups).unwrap();
        (padded.dims(), host(d.unpad(padded)))
    });
    for (dims, cut) in out {
        // Rows 5 over 2 -> padded to 3 each; columns already gathered whole.
        assert_eq!(dims, [6, 3]);
        assert_eq!(cut, full);
    }
}

#[test]
fn dtensor_redistribute_between_placements() {
    let (r_total, c_total) = (7, 5);
    let full = values(1, r_total * c_total, 2);
    for n in SIZES {
        let out = run(n, |comm| {
            let groups = [&comm];
            let x = tensor(full.clone(), [r_total, c_total]);
            let expect = |p| {
                host(
                    DTensor::distribute(x.clone(), &groups, &[p])
                        .unwrap()
                        .into_local(),
                )
            };
            let s0 = DTensor::distribute(x.clone(), &groups, &[Placement::Shard(0)]).unwrap();
            let s1 = s0
                .clone()
                .redistribute(&groups, &[Placement::Shard(1)])
                .unwrap();
            let rep = s1
                .clone()
                .redistribute(&groups, &[Placement::Replicate])
                .unwrap();
            let back = rep
                .clone()
                .redistribute(&groups, &[Placement::Shard(0)])
                .unwrap();
            assert_eq!(s1.placements(), &[Placement::Shard(1)]);
            (
                host(s1.into_local()) == expect(Placement::Shard(1)),
                host(rep.into_local()),
                host(back.into_local()) == expect(Placement::Shard(0)),
            )
        });
        for (s1_ok, rep, back_ok) in out {
            assert!(s1_ok, "Shard(0) -> Shard(1), world {n}");
            assert_eq!(rep, full, "Shard(1) -> Replicate, world {n}");
            assert!(back_ok, "Replicate -> Shard(0), world {n}");
        }
    }
    // 2-D: change only the inner (ep) placement; the dp shard stays.
    let out = run(4, |comm| {
        let mesh = DeviceMesh::new::<B>(comm, 2, 2).unwrap();
        let groups = mesh.dim_groups();
        let x = tensor(full.clone(), [r_total, c_total]);
        let a = DTensor::distribute(
            x.clone(),
            &groups,
            &[Placement::Shard(0), Placement::Replicate],
        )
        .unwrap();
        let b = a
            .redistribute(&groups, &[Placement::Shard(0), Placement::Shard(1)])
            .unwrap();
        let want =
            DTensor::distribute(x, &groups, &[Placement::Shard(0), Placement::Shard(1)]).unwrap();
        let c = b
            .clone()
            .redistribute(&groups, &[Placement::Replicate, Placement::Shard(0)])
            .unwrap();
        (
            host(b.into_local()) == host(want.into_local()),
            host(c.full_tensor(&groups).unwrap()),
        )
    });
    for (ok, back) in out {
        assert!(ok);
        assert_eq!(back, full);
    }
}

#[test]
fn gradient_reduce_scatter_matches_host_sum_with_uneven_shards() {
    let (r_total, cols) = (10, 3);
    for n in SIZES {
        let grads: Vec<Vec<f32>> = (0..n).map(|r| values(r, r_total * cols, 5)).collect();
        let sum = host_sum(&grads);
        let out = run(n, |comm| {
            let g = || tensor(values(comm.rank(), r_total * cols, 5), [r_total, cols]);
            let s = reduce_scatter_shard(&comm, g(), 0, ReduceOp::Sum).unwrap();
            let a = DTensor::reduce_scatter_grad(g(), &comm, 0, ReduceOp::Avg).unwrap();
            assert_eq!(a.placements(), &[Placement::Shard(0)]);
            let full_avg = host(a.full_tensor(&[&comm]).unwrap());
            (host(s), host(a.into_local()), full_avg)
        });
        let avg: Vec<f32> = sum.iter().map(|v| v / n as f32).collect();
        for (r, (s, a, full_avg)) in out.into_iter().enumerate() {
            let range = shard_range(r_total, n, r);
            assert_eq!(s, rows(&sum, cols, range.clone()), "world {n}, rank {r}");
            assert_eq!(a, rows(&avg, cols, range));
            assert_eq!(full_avg, avg);
        }
    }
}

#[test]
fn a_panicking_rank_fails_its_peers_promptly() {
    let config = CommConfig::with_timeout(Duration::from_secs(2));
    let results = Comm::run_ranks(3, config, |comm| {
        if comm.rank() == 1 {
            panic!("rank 1 exploded");
        }
        comm.all_reduce(tensor(vec![1.0], [1]), ReduceOp::Sum)
            .map(host)
    });
    for (rank, result) in results.into_iter().enumerate() {
        match result {
            Err(RankError::Panicked { rank: 1, message }) => {
                assert_eq!(rank, 1);
                assert!(message.contains("rank 1 exploded"));
            }
            Ok(Err(e)) => {
                assert_ne!(rank, 1);
                let msg = e.to_string();
                assert!(
                    matches!(e, CommError::PeerFailed { rank: 1, .. }),
                    "rank {rank}: {msg}"
                );
                assert!(msg.contains("all_reduce") && msg.contains("world"), "{msg}");
            }
            other => panic!("rank {rank}: unexpected {other:?}"),
        }
    }
}

#[test]
fn a_rank_that_drops_its_communicator_fails_its_peers() {
    // Rank 2 returns without joining: its communicator is dropped, the barrier cannot complete.
    let results = run(3, |comm| {
        if comm.rank() == 2 {
            return None;
        }
        Some(comm.barrier().unwrap_err())
    });
    for e in results.into_iter().flatten() {
        let msg = e.to_string();
        assert!(matches!(e, CommError::PeerFailed { rank: 2, .. }), "{msg}");
        assert!(msg.contains("dropped its communicator"), "{msg}");
    }
}

#[test]
fn a_rank_that_skips_a_collective_makes_the_others_time_out_naming_it() {
    let config = CommConfig::with_timeout(Duration::from_millis(300));
    let (tx, rx) = mpsc::channel::<()>();
    let rx = std::sync::Mutex::new(rx);
    let results = Comm::run_ranks(3, config, |comm| {
        if comm.rank() == 2 {
            // Alive but busy: wait until both peers gave up, then arrive late.
            let rx = rx.lock().unwrap();
            rx.recv().unwrap();
            rx.recv().unwrap();
            let late = comm.barrier().unwrap_err();
            return vec![late];
        }
        let first = comm.barrier().unwrap_err();
        tx.clone().send(()).unwrap();
        // The communicator is unusable after an error.
        let after = comm.barrier().unwrap_err();
        vec![first, after]
    });
    for (rank, result) in results.into_iter().enumerate() {
        let errors = result.unwrap();
        if rank == 2 {
            let msg = errors[0].to_string();
            assert!(matches!(errors[0], CommError::PeerFailed { .. }), "{msg}");
            assert!(msg.contains("gave up"), "{msg}");
            continue;
        }
        let msg = errors[0].to_string();
        match &errors[0] {
            CommError::Timeout { missing, .. } => assert_eq!(missing, &vec![2], "{msg}"),
            other => panic!("rank {rank}: expected a timeout, got {other}"),
        }
        assert!(msg.contains("barrier") && msg.contains("[2]"), "{msg}");
        assert!(
            matches!(errors[1], CommError::Transport { .. }),
            "{}",
            errors[1]
        );
    }
}

#[test]
fn world_setup_errors() {
    assert!(matches!(
        Comm::world(0, &[Default::default()], config()),
        Err(CommError::Setup(_))
    ));
    let msg = Comm::world(3, &[Default::default(), Default::default()], config())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("2 devices") && msg.contains("3 ranks"),
        "{msg}"
    );
    let comms = Comm::world(2, &[Default::default()], config()).unwrap();
    assert_eq!(
        comms.iter().map(|c| c.rank()).collect::<Vec<_>>(),
        vec![0, 1]
    );
    assert!(Comm::run_ranks(0, config(), |c| c.rank()).is_empty());
}

#[test]
fn collectives_work_on_the_autodiff_backend_and_per_rank_devices() {
    type AB = burn::backend::Autodiff<NdArray<f32>>;
    let devices = vec![Default::default(); 3];
    let inputs: Vec<Vec<f32>> = (0..3).map(|r| values(r, 4, 4)).collect();
    let sum = host_sum(&inputs);
    let out = ThreadComm::<AB>::run_ranks_on(&devices, config(), |comm| {
        let x = Tensor::<AB, 1>::from_data(
            TensorData::new(values(comm.rank(), 4, 4), [4]),
            comm.device(),
        );
        let y = comm.all_reduce(x, ReduceOp::Sum).unwrap();
        let g = comm.all_gather(y.clone(), 0).unwrap();
        (
            y.into_data().to_vec::<f32>().unwrap(),
            g.into_data().to_vec::<f32>().unwrap(),
        )
    });
    for r in out {
        let (y, g) = r.unwrap();
        assert_eq!(y, sum);
        assert_eq!(g, [sum.clone(), sum.clone(), sum.clone()].concat());
    }
}

#[test]
fn mesh_dim_groups_and_rank_of_agree_with_the_layout() {
    let out = run(4, |comm| {
        let mesh = DeviceMesh::with_ep::<B>(comm, 2).unwrap();
        assert_eq!(mesh.shape(), [2, 2]);
        assert_eq!(DeviceMesh::<Comm>::DIM_NAMES, ["dp", "ep"]);
        let [d, e] = mesh.coords();
        assert_eq!(mesh.rank_of(d, e), mesh.world().rank());
        assert!(mesh.dim_group(2).is_none());
        (
            mesh.dim_group(0).unwrap().global_ranks().to_vec(),
            mesh.dim_group(1).unwrap().global_ranks().to_vec(),
        )
    });
    assert_eq!(
        out,
        vec![
            (vec![0, 2], vec![0, 1]),
            (vec![1, 3], vec![0, 1]),
            (vec![0, 2], vec![2, 3]),
            (vec![1, 3], vec![2, 3]),
        ]
    );
}
