#!/usr/bin/env python3
"""Device idle time in the last forward+backward of an nsys `cuda_gpu_trace` CSV (moe_bench --profile runs a
warm-up and one profiled pass): kernels and copies in order with the gap before each, the gaps over 10 us
listed, and the totals. Only the second half of the launches (the profiled pass) is read."""
import csv
import sys

rows = list(csv.DictReader(open(sys.argv[1], errors="replace")))
start_key = next(k for k in rows[0] if k.startswith("Start"))
dur_key = next(k for k in rows[0] if k.startswith("Duration"))
name_key = "Name"
ev = sorted(((int(r[start_key]), int(r[dur_key]), r[name_key]) for r in rows), key=lambda e: e[0])
ev = ev[len(ev) // 2:]
busy = sum(d for _, d, _ in ev)
span = ev[-1][0] + ev[-1][1] - ev[0][0]
prev_end = ev[0][0]
idle = 0
print(f"{len(ev)} device operations, span {span / 1e6:.3f} ms, busy {busy / 1e6:.3f} ms")
for s, d, n in ev:
    gap = s - prev_end
    if gap > 10_000:
        print(f"  gap {gap / 1e3:8.1f} us before {n[:80]} ({d / 1e3:.1f} us)")
    idle += max(gap, 0)
    prev_end = max(prev_end, s + d)
print(f"idle between operations: {idle / 1e6:.3f} ms")
