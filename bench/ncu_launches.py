#!/usr/bin/env python3
"""Per-launch kernel times from `ncu --csv --metrics gpu__time_duration.sum` over moe_bench --profile (one
warm-up and one profiled forward+backward): prints the profiled half's launches over 20 us and every wgmma
GEMM, in order, and the kernel-time sum."""
import csv
import sys

rows = list(csv.reader(open(sys.argv[1], errors="replace")))
h = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
hdr = rows[h]
ks = [dict(zip(hdr, r)) for r in rows[h + 1:] if len(r) == len(hdr)]
ks = ks[len(ks) // 2:]  # the warm-up ran the same launches first
tot = 0.0
for k in ks:
    us = float(k["Metric Value"].replace(",", "")) / 1e3
    tot += us
    if us > 20 or "wgmma" in k["Kernel Name"]:
        print(f"{us:9.1f} us  grid {k['Grid Size']:>14s}  {k['Kernel Name'][:90]}")
print(f"kernel sum of the profiled fwd+bwd: {tot / 1e3:.3f} ms over {len(ks)} launches")
