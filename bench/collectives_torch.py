"""torch.distributed (NCCL) bandwidth of the collectives burn-moe implements, printed in the same
JSON-lines format as `nccl_check bench`, for a side-by-side comparison in one device call.

    torchrun --nproc-per-node 2 bench/collectives_torch.py [max_mib]

Same sizes (bf16, 1 MiB x4 ... max), same iteration counts, same nccl-tests bus-bandwidth factors.
Timing includes a device synchronize per call, as our blocking collectives do.
"""
import json
import os
import sys
import time

import torch
import torch.distributed as dist


def main():
    max_mib = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    n, rank = dist.get_world_size(), dist.get_rank()
    mib = 1
    while mib <= max_mib:
        elems = (mib << 20) // 2
        rows = (elems // 1024 // n) * n
        x = torch.zeros(rows, 1024, dtype=torch.bfloat16, device="cuda")
        part = torch.zeros(rows // n, 1024, dtype=torch.bfloat16, device="cuda")
        size_bytes = rows * 1024 * 2
        for name in ["all_gather", "reduce_scatter", "all_reduce", "all_to_all"]:
            def run():
                if name == "all_gather":
                    out = torch.empty(rows, 1024, dtype=torch.bfloat16, device="cuda")
                    dist.all_gather_into_tensor(out, part)
                elif name == "reduce_scatter":
                    out = torch.empty(rows // n, 1024, dtype=torch.bfloat16, device="cuda")
                    dist.reduce_scatter_tensor(out, x)
                elif name == "all_reduce":
                    out = x.clone()
                    dist.all_reduce(out)
                else:
                    out = torch.empty_like(x)
                    dist.all_to_all_single(out, x, [rows // n] * n, [rows // n] * n)
                torch.cuda.synchronize()

            run()
            iters = 5 if mib >= 256 else 20
            dist.barrier()
            torch.cuda.synchronize()
            # Each call timed on its own (each ends in a synchronize): the mean as before, and the
            # median, which one slow call (a proxy-thread wake-up, a rank arriving late) cannot move.
            calls = []
            for _ in range(iters):
                t0 = time.perf_counter()
                run()
                calls.append(time.perf_counter() - t0)
            secs = sum(calls) / iters
            median = sorted(calls)[(iters - 1) // 2]
            algbw = size_bytes / secs / 1e9
            factor = 2 * (n - 1) / n if name == "all_reduce" else (n - 1) / n
            if rank == 0:
                print(json.dumps({"impl": "torch-nccl", "collective": name, "bytes": size_bytes, "world": n,
                                  "time_us": round(secs * 1e6, 1), "algbw_gbs": round(algbw, 2),
                                  "busbw_gbs": round(algbw * factor, 2), "median_us": round(median * 1e6, 1),
                                  "median_busbw_gbs": round(size_bytes / median / 1e9 * factor, 2)}), flush=True)
        mib *= 4
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
