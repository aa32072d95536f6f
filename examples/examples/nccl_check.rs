//! NCCL collectives on burn-cuda tensors: correctness check and bandwidth benchmark.
//!
//! One process per GPU, started by `torchrun`, SLURM or any launcher that sets `RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`:
//!
//! ```text
//! cargo build --release -p examples --example nccl_check --features nccl
//! torchrun --no-python --nproc-per-node 2 target/release/examples/nccl_check check
//! torchrun --no-python --nproc-per-node 2 target/release/examples/nccl_check bench
//! ```
//!
//! `check` runs every collective (f32 and bf16, uneven and zero-length all-to-all splits, every dim,
//! sub-groups, the Autodiff and Fusion wrappers) and compares each rank's result with the value
//! computed on the host from every rank's (seeded, reproducible) input. `bench` reports algorithm
//! and bus bandwidth (nccl-tests definitions) of all-gather, reduce-scatter, all-reduce and
//! all-to-all for 1 MiB … 1 GiB, one JSON line per size and collective, from rank 0. With
//! `BURN_MOE_NCCL_PROFILE=1` it adds, per size and collective, the median time of each phase of a
//! call (`burn-moe-profile` lines, from ranks 0 and 1: a rank arriving late shows up as the other
//! rank's long wait).

use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::backend::Autodiff;
use burn::tensor::{DType, Tensor, TensorData};
use burn_cubecl::CubeBackend;
use burn_moe_backend::dist::{Communicator, DistEnv, NcclComm, NcclConfig, ReduceOp, local_cuda_device};
use cubecl::cuda::CudaRuntime;

type B = CubeBackend<CudaRuntime, f32, i32, u8>;

/// Deterministic input of `rank` for test `case`: every rank can compute every other rank's input.
fn input(rank: usize, case: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let h = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((rank as u64 + 1) << 32) ^ (case as u64 * 7919);
            // Values with few mantissa bits so bf16 sums over a few ranks are exact.
            ((h >> 40) % 64) as f32 / 8.0 - 4.0
        })
        .collect()
}

fn tensor<const D: usize>(v: &[f32], shape: [usize; D], dtype: DType, dev: &cubecl::cuda::CudaDevice) -> Tensor<B, D> {
    Tensor::<B, D>::from_data(TensorData::new(v.to_vec(), shape), dev).cast(dtype)
}

fn host<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.cast(DType::F32).into_data().convert::<f32>().to_vec().unwrap()
}

struct Checker {
    failures: usize,
    checks: usize,
    rank: usize,
}

impl Checker {
    fn eq(&mut self, what: &str, got: &[f32], want: &[f32]) {
        self.checks += 1;
        let bad = got.len() != want.len() || got.iter().zip(want).any(|(a, b)| (a - b).abs() > 1e-6 * b.abs().max(1.0));
        if bad {
            self.failures += 1;
            eprintln!("rank {}: FAIL {what}: got {:?}… want {:?}… (len {} vs {})", self.rank, &got[..got.len().min(6)], &want[..want.len().min(6)], got.len(), want.len());
        }
    }
}

/// Concatenation along `dim` of row-major blocks of shape `shape` (host version of all_gather).
fn concat(blocks: &[Vec<f32>], shape: &[usize], dim: usize) -> Vec<f32> {
    let outer: usize = shape[..dim].iter().product();
    let inner: usize = shape[dim..].iter().product();
    let mut out = Vec::new();
    for o in 0..outer {
        for b in blocks {
            out.extend_from_slice(&b[o * inner..(o + 1) * inner]);
        }
    }
    out
}

fn check(comm: &NcclComm<B>) -> Result<()> {
    let dev = comm.device().clone();
    let (rank, n) = (comm.rank(), comm.size());
    let mut c = Checker { failures: 0, checks: 0, rank };
    let shape = [4usize, 6, 2];
    let len: usize = shape.iter().product();
    for (case, dtype) in [(0usize, DType::F32), (1, DType::BF16)] {
        let tag = format!("{dtype:?}");
        let all: Vec<Vec<f32>> = (0..n).map(|r| input(r, case, len)).collect();
        let sum: Vec<f32> = (0..len).map(|i| all.iter().map(|v| v[i]).sum()).collect();
        let avg: Vec<f32> = sum.iter().map(|s| s / n as f32).collect();

        let got = host(comm.all_reduce(tensor(&all[rank], shape, dtype, &dev), ReduceOp::Sum)?);
        c.eq(&format!("all_reduce sum {tag}"), &got, &sum);
        let got = host(comm.all_reduce(tensor(&all[rank], shape, dtype, &dev), ReduceOp::Avg)?);
        if dtype == DType::F32 {
            c.eq(&format!("all_reduce avg {tag}"), &got, &avg);
        } else {
            let want: Vec<f32> = avg.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
            c.eq(&format!("all_reduce avg {tag}"), &got, &want);
        }
        for dim in 0..3 {
            let got = host(comm.all_gather(tensor(&all[rank], shape, dtype, &dev), dim)?);
            c.eq(&format!("all_gather dim {dim} {tag}"), &got, &concat(&all, &shape, dim));
        }
        // reduce_scatter along dim 0 and 2 of a tensor whose dim has n*2 entries.
        for dim in [0usize, 2] {
            let mut rs_shape = [3usize, 2, 2];
            rs_shape[dim] = 2 * n;
            let m: usize = rs_shape.iter().product();
            let ins: Vec<Vec<f32>> = (0..n).map(|r| input(r, case + 10, m)).collect();
            let total: Vec<f32> = (0..m).map(|i| ins.iter().map(|v| v[i]).sum()).collect();
            // Rank r's part: indices whose coordinate along `dim` is in [2r, 2r+2).
            let strides = [rs_shape[1] * rs_shape[2], rs_shape[2], 1];
            let want: Vec<f32> = (0..m)
                .filter(|&i| (i / strides[dim]) % rs_shape[dim] / 2 == rank)
                .map(|i| total[i])
                .collect();
            let got = host(comm.reduce_scatter(tensor(&ins[rank], rs_shape, dtype, &dev), dim, ReduceOp::Sum)?);
            c.eq(&format!("reduce_scatter dim {dim} {tag}"), &got, &want);
        }
        // all_to_all with uneven and zero-length splits: rank r sends (r + j + 1) % 3 rows to rank j
        // (never nothing at all, which a world of one would otherwise send).
        let row = 5usize;
        let splits = |r: usize| -> Vec<usize> { (0..n).map(|j| (r + j + 1) % 3).collect() };
        let ins: Vec<Vec<f32>> = (0..n).map(|r| input(r, case + 20, splits(r).iter().sum::<usize>() * row)).collect();
        let out_splits: Vec<usize> = (0..n).map(|j| splits(j)[rank]).collect();
        let mut want = Vec::new();
        for j in 0..n {
            let start: usize = splits(j)[..rank].iter().sum::<usize>() * row;
            want.extend_from_slice(&ins[j][start..start + splits(j)[rank] * row]);
        }
        let rows_in = splits(rank).iter().sum::<usize>();
        let got = host(comm.all_to_all_single(tensor(&ins[rank], [rows_in, row], dtype, &dev), &splits(rank), &out_splits)?);
        c.eq(&format!("all_to_all_single uneven {tag}"), &got, &want);
        for root in [0, n - 1] {
            let got = host(comm.broadcast(tensor(&all[rank], shape, dtype, &dev), root)?);
            c.eq(&format!("broadcast root {root} {tag}"), &got, &all[root]);
        }
    }
    comm.barrier()?;

    // Deferred all-gathers (FSDP's prefetch): queued, then Burn computes (allocating and freeing
    // buffers) while they run, then the wait; the outputs must be every rank's input, and a
    // blocking collective in between must complete them too.
    let big = 1usize << 22;
    let parts: Vec<Vec<f32>> = (0..n).map(|r| input(r, 40, big)).collect();
    let want: Vec<f32> = parts.concat();
    comm.defer_gathers(true);
    let first = comm.all_gather(tensor(&parts[rank], [big], DType::F32, &dev), 0)?;
    let second = comm.all_gather(tensor(&parts[rank], [big / 2, 2], DType::BF16, &dev), 0)?;
    comm.defer_gathers(false);
    // 0.5 everywhere is a fixed point of m ↦ sqrt(m·m / 2048), exactly in f32.
    let mut m = Tensor::<B, 2>::full([2048, 2048], 0.5, &dev);
    for _ in 0..8 {
        m = (m.clone().matmul(m) / 2048.0).sqrt();
    }
    comm.wait_gathers()?;
    c.eq("deferred all_gather f32", &host(first), &want);
    let want_bf16: Vec<f32> = want.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
    c.eq("deferred all_gather bf16", &host(second), &want_bf16);
    c.eq("compute beside deferred gathers", &host(m.slice([0..1, 0..4])), &[0.5; 4]);
    comm.defer_gathers(true);
    let third = comm.all_gather(tensor(&parts[rank], [big], DType::F32, &dev), 0)?;
    comm.defer_gathers(false);
    let sum = host(comm.all_reduce(tensor(&[1.0], [1], DType::F32, &dev), ReduceOp::Sum)?);
    c.eq("all_reduce after a deferred gather", &sum, &[n as f32]);
    c.eq("deferred all_gather completed by a blocking collective", &host(third), &want);
    comm.wait_gathers()?;

    // Deferred reduce-scatters (FSDP's gradient reduction beside the next unit's backward pass):
    // queued after a deferred gather, whose wait must not wait for them; Burn computes; then
    // their wait. A blocking collective completes them too.
    let chunk = big / n;
    let grads: Vec<Vec<f32>> = (0..n).map(|r| input(r, 41, chunk * n)).collect();
    let want_rs: Vec<f32> = (rank * chunk..(rank + 1) * chunk).map(|i| grads.iter().map(|g| g[i]).sum()).collect();
    comm.defer_gathers(true);
    let gathered = comm.all_gather(tensor(&parts[rank], [big], DType::F32, &dev), 0)?;
    comm.defer_gathers(false);
    comm.defer_reductions(true);
    let reduced = comm.reduce_scatter(tensor(&grads[rank], [chunk * n], DType::F32, &dev), 0, ReduceOp::Sum)?;
    comm.defer_reductions(false);
    comm.wait_gathers()?;
    c.eq("deferred all_gather queued before a deferred reduce_scatter", &host(gathered), &want);
    let mut m = Tensor::<B, 2>::full([2048, 2048], 0.5, &dev);
    for _ in 0..8 {
        m = (m.clone().matmul(m) / 2048.0).sqrt();
    }
    comm.wait_reductions()?;
    c.eq("deferred reduce_scatter", &host(reduced), &want_rs);
    c.eq("compute beside a deferred reduce_scatter", &host(m.slice([0..1, 0..4])), &[0.5; 4]);
    comm.defer_reductions(true);
    let again = comm.reduce_scatter(tensor(&grads[rank], [chunk * n], DType::F32, &dev), 0, ReduceOp::Sum)?;
    comm.defer_reductions(false);
    let sum = host(comm.all_reduce(tensor(&[1.0], [1], DType::F32, &dev), ReduceOp::Sum)?);
    c.eq("all_reduce after a deferred reduce_scatter", &sum, &[n as f32]);
    c.eq("deferred reduce_scatter completed by a blocking collective", &host(again), &want_rs);
    comm.wait_reductions()?;

    // Sub-groups: even and odd ranks, ordered by descending parent rank (key = n - rank).
    let sub = comm.split(rank % 2, n - rank, if rank % 2 == 0 { "even" } else { "odd" })?;
    let members: Vec<usize> = (0..n).filter(|r| r % 2 == rank % 2).rev().collect();
    c.eq("split membership", &sub.global_ranks().iter().map(|&r| r as f32).collect::<Vec<_>>(), &members.iter().map(|&r| r as f32).collect::<Vec<_>>());
    let all: Vec<Vec<f32>> = (0..n).map(|r| input(r, 30, 8)).collect();
    let want: Vec<f32> = (0..8).map(|i| members.iter().map(|&r| all[r][i]).sum()).collect();
    let got = host(sub.all_reduce(tensor(&all[rank], [8], DType::F32, &dev), ReduceOp::Sum)?);
    c.eq("sub-group all_reduce", &got, &want);
    let got = host(sub.all_gather(tensor(&all[rank], [8], DType::F32, &dev), 0)?);
    c.eq("sub-group all_gather", &got, &members.iter().flat_map(|&r| all[r].clone()).collect::<Vec<_>>());
    drop(sub);

    // The Autodiff and Fusion wrappers reach the same buffers.
    {
        type A = Autodiff<B>;
        let ad: NcclComm<A> = comm_for::<A>(comm)?;
        let x = Tensor::<A, 1>::from_data(TensorData::new(all[rank].clone(), [8]), &dev);
        let got = ad.all_reduce(x, ReduceOp::Sum)?.into_data().convert::<f32>().to_vec::<f32>().unwrap();
        let want: Vec<f32> = (0..8).map(|i| all.iter().map(|v| v[i]).sum()).collect();
        c.eq("autodiff all_reduce", &got, &want);
        type F = burn::backend::Cuda;
        let fu: NcclComm<F> = comm_for::<F>(comm)?;
        let x = Tensor::<F, 1>::from_data(TensorData::new(all[rank].clone(), [8]), &dev);
        let got = fu.all_reduce(x * 2.0, ReduceOp::Sum)?.into_data().convert::<f32>().to_vec::<f32>().unwrap();
        let want2: Vec<f32> = want.iter().map(|x| 2.0 * x).collect();
        c.eq("fusion all_reduce", &got, &want2);
    }
    println!("rank {rank}: {} checks, {} failures", c.checks, c.failures);
    if c.failures > 0 {
        bail!("rank {rank}: {} of {} NCCL checks failed", c.failures, c.checks);
    }
    Ok(())
}

/// A communicator for another backend over the same devices: a color-0 split of `comm`.
fn comm_for<X: burn_moe_backend::dist::CudaTensorAccess<Device = cubecl::cuda::CudaDevice>>(comm: &NcclComm<B>) -> Result<NcclComm<X>> {
    let env = DistEnv::from_env()?.context("not started by a launcher")?;
    // A second world communicator through a second rendezvous on the next port.
    let env2 = DistEnv { rendezvous_port: env.rendezvous_port + 1 + comm.size() as u16, ..env };
    Ok(NcclComm::<X>::init(&env2, comm.device().clone(), NcclConfig::default())?)
}

fn bench(comm: &NcclComm<B>, max_mib: usize) -> Result<()> {
    let dev = comm.device().clone();
    let n = comm.size();
    let mut mib = 1usize;
    while mib <= max_mib {
        let bytes = mib << 20;
        let elems = bytes / 2; // bf16
        let rows = (elems / 1024 / n) * n;
        let x = Tensor::<B, 2>::zeros([rows, 1024], &dev).cast(DType::BF16);
        let part = Tensor::<B, 2>::zeros([rows / n, 1024], &dev).cast(DType::BF16);
        let splits = vec![rows / n; n];
        let size_bytes = (rows * 1024 * 2) as f64;
        // What a collective costs us besides NCCL: Burn sync + a fresh output buffer of the
        // collective's size from CubeCL's pool (no communication).
        {
            let t0 = Instant::now();
            let iters = 20;
            for _ in 0..iters {
                let y = Tensor::<B, 2>::empty([rows / 2, 1024], &dev); // f32: same bytes as the bf16 buffer
                <B as burn::tensor::backend::Backend>::sync(&dev).ok();
                drop(y);
            }
            if comm.rank() == 0 {
                println!(
                    "{{\"impl\":\"burn-moe-overhead\",\"collective\":\"alloc+sync\",\"bytes\":{},\"time_us\":{:.1}}}",
                    size_bytes as u64,
                    t0.elapsed().as_secs_f64() * 1e6 / iters as f64
                );
            }
        }
        for name in ["all_gather", "reduce_scatter", "all_reduce", "all_to_all"] {
            let run = || -> Result<()> {
                match name {
                    // All-gather's size is the gathered (output) size, as in nccl-tests.
                    "all_gather" => drop(comm.all_gather(part.clone(), 0)?),
                    "reduce_scatter" => drop(comm.reduce_scatter(x.clone(), 0, ReduceOp::Sum)?),
                    "all_reduce" => drop(comm.all_reduce(x.clone(), ReduceOp::Sum)?),
                    _ => drop(comm.all_to_all_single(x.clone(), &splits, &splits)?),
                }
                Ok(())
            };
            run()?;
            let iters = if mib >= 256 { 5 } else { 20 };
            comm.barrier()?;
            // Only the timed calls' profiles (not the warm-up's or the barrier's).
            drop(comm.take_profile());
            // Each call timed on its own (each is blocking): the mean, and the median, which one
            // slow call (a proxy-thread wake-up, a rank arriving late) cannot move.
            let mut calls = Vec::with_capacity(iters);
            for _ in 0..iters {
                let t0 = Instant::now();
                run()?;
                calls.push(t0.elapsed().as_secs_f64());
            }
            let secs = calls.iter().sum::<f64>() / iters as f64;
            calls.sort_by(f64::total_cmp);
            let median = calls[(iters - 1) / 2];
            let algbw = size_bytes / secs / 1e9;
            let factor = if name == "all_reduce" { 2.0 * (n as f64 - 1.0) / n as f64 } else { (n as f64 - 1.0) / n as f64 };
            if comm.rank() == 0 {
                println!(
                    "{{\"impl\":\"burn-moe-nccl\",\"collective\":\"{name}\",\"bytes\":{},\"world\":{n},\"time_us\":{:.1},\"algbw_gbs\":{algbw:.2},\"busbw_gbs\":{:.2},\"median_us\":{:.1},\"median_busbw_gbs\":{:.2}}}",
                    size_bytes as u64,
                    secs * 1e6,
                    algbw * factor,
                    median * 1e6,
                    size_bytes / median / 1e9 * factor
                );
            }
            if comm.profiling() && comm.rank() < 2 {
                let calls = comm.take_profile();
                if let Some(last) = calls.last() {
                    let phases: [(&str, Vec<Option<f64>>); 8] = [
                        ("prepare_us", calls.iter().map(|c| Some(c.prepare_us)).collect()),
                        ("contiguous_us", calls.iter().map(|c| Some(c.contiguous_us)).collect()),
                        ("sync_us", calls.iter().map(|c| Some(c.sync_us)).collect()),
                        ("alloc_us", calls.iter().map(|c| Some(c.alloc_us)).collect()),
                        ("enqueue_us", calls.iter().map(|c| Some(c.enqueue_us)).collect()),
                        ("wait_us", calls.iter().map(|c| Some(c.wait_us)).collect()),
                        ("device_us", calls.iter().map(|c| c.device_us).collect()),
                        ("total_us", calls.iter().map(|c| Some(c.total_us)).collect()),
                    ];
                    let last = [
                        ("in_bytes", last.in_bytes),
                        ("out_bytes", last.out_bytes),
                        ("in_ptr_align", last.in_ptr_align),
                        ("out_ptr_align", last.out_ptr_align),
                    ];
                    print_profile(name, size_bytes as u64, n, comm.rank(), calls.len(), &phases, &last);
                }
            }
        }
        mib *= 4;
    }
    Ok(())
}

/// One `burn-moe-profile` JSON line: the median of each phase's microseconds over a loop's calls
/// (`null` where no call has the value), and `last` (`"in_bytes"` …) as given.
fn print_profile(name: &str, bytes: u64, world: usize, rank: usize, calls: usize, phases: &[(&str, Vec<Option<f64>>)], last: &[(&str, u64)]) {
    let mut line = format!("{{\"impl\":\"burn-moe-profile\",\"rank\":{rank},\"collective\":\"{name}\",\"bytes\":{bytes},\"world\":{world},\"calls\":{calls}");
    for (key, values) in phases {
        let mut v: Vec<f64> = values.iter().flatten().copied().collect();
        v.sort_by(f64::total_cmp);
        match v.get(v.len().saturating_sub(1) / 2) {
            Some(m) => line += &format!(",\"{key}\":{m:.1}"),
            None => line += &format!(",\"{key}\":null"),
        }
    }
    for (key, value) in last {
        line += &format!(",\"{key}\":{value}");
    }
    println!("{line}}}");
}

fn main() -> Result<()> {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "check".into());
    let max_mib: usize = std::env::args().nth(2).map(|s| s.parse()).transpose()?.unwrap_or(1024);
    let env = DistEnv::from_env()?.context("RANK/WORLD_SIZE not set: start this under torchrun or `trainer --nproc-per-node`")?;
    let device = local_cuda_device(&env);
    let timeout = if mode == "timeout" { std::time::Duration::from_secs(5) } else { NcclConfig::default().timeout };
    // `BURN_MOE_NCCL_POOL_BYTES=0` turns the output-buffer pool off (for before/after timings).
    let output_pool_bytes = NcclConfig::default().output_pool_bytes;
    let comm = NcclComm::<B>::init(&env, device, NcclConfig { timeout, output_pool_bytes, ..NcclConfig::default() })?;
    match mode.as_str() {
        "check" => check(&comm),
        "bench" => {
            bench(&comm, max_mib)?;
            if comm.rank() == 0 {
                println!("{{\"impl\":\"burn-moe-nccl\",\"pool_bytes\":{output_pool_bytes},\"outputs_reused\":{}}}", comm.outputs_reused());
            }
            Ok(())
        }
        "timeout" => timeout_check(&comm),
        other => bail!("unknown mode {other:?} (check | bench | timeout)"),
    }
}

/// The last rank leaves without joining a collective; no other rank may hang: each gets a timeout
/// error (5 s here) or, where NCCL did not need the departed peer any more, a result.
fn timeout_check(comm: &NcclComm<B>) -> Result<()> {
    comm.barrier()?;
    if comm.rank() == comm.size() - 1 {
        println!("rank {}: leaving without the all_reduce", comm.rank());
        std::process::exit(0);
    }
    let start = Instant::now();
    let x = Tensor::<B, 1>::ones([1 << 20], comm.device());
    match comm.all_reduce(x, ReduceOp::Sum) {
        Err(e @ burn_moe_backend::dist::CommError::Timeout { .. }) => {
            println!("rank {}: timeout detected after {:.1} s: {e}", comm.rank(), start.elapsed().as_secs_f64());
            Ok(())
        }
        Err(e) => {
            println!("rank {}: failed after {:.1} s with a non-timeout error: {e}", comm.rank(), start.elapsed().as_secs_f64());
            Ok(())
        }
        // NCCL may let a rank finish when the departed peer's part of the ring had already been
        // served (seen at world 4: one of three survivors); what matters is that none hangs.
        Ok(_) => {
            println!("rank {}: all_reduce returned after {:.1} s (NCCL did not notice the departed peer on this rank)", comm.rank(), start.elapsed().as_secs_f64());
            Ok(())
        }
    }
}
