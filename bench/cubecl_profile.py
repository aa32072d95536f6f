"""Condenses a CubeCL profiling log (CUBECL_DEBUG_LOG=<file>, CUBECL_DEBUG_OPTION=profile*) into a few
tables: CubeCL prints one summary table (kernel, total device time, launches) at each device sync; the
trainer's BURN_MOE_STEP_TIMERS=1 syncs at each phase boundary, so the tables are the phases of the steps.

Usage: python3 bench/cubecl_profile.py LOG [LAST_TABLES] [ROWS]
Prints the total of every table, then the largest ROWS rows of each of the last LAST_TABLES tables,
then those tables merged by kernel name (the name before the first ':' or '<').
"""
import re
import sys

UNITS = {"ns": 1e-6, "µs": 1e-3, "us": 1e-3, "ms": 1.0, "s": 1e3}


def ms(text):
    m = re.fullmatch(r"([0-9.]+)(ns|µs|us|ms|s)", text.strip())
    return float(m.group(1)) * UNITS[m.group(2)] if m else None


def tables(path):
    out, rows, inside = [], None, False
    for line in open(path, encoding="utf-8", errors="replace"):
        line = line.rstrip("\n")
        if line.startswith("| Name") and "Duration" in line:
            rows, inside = [], True
            continue
        if not inside or not line.startswith("|"):
            continue
        fields = [f.strip() for f in line.strip().strip("|").rsplit("|", 3)]
        if len(fields) != 4:
            continue
        name, dur, count = fields[0], ms(fields[1]), fields[2]
        if name == "Total":
            out.append(rows)
            inside = False
        elif dur is not None and count.isdigit():
            rows.append((name, dur, int(count)))
    return out


def short(name):
    return re.split(r"[:<]", name, 1)[0].strip()


def main():
    path = sys.argv[1]
    last = int(sys.argv[2]) if len(sys.argv) > 2 else 12
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 20
    ts = tables(path)
    print(f"{len(ts)} summary tables; totals (ms, launches):")
    print("  " + ", ".join(f"{i}:{sum(r[1] for r in t):.1f}/{sum(r[2] for r in t)}" for i, t in enumerate(ts)))
    merged = {}
    for i, t in list(enumerate(ts))[-last:]:
        total = sum(r[1] for r in t)
        print(f"--- table {i}: {total:.2f} ms device time, {sum(r[2] for r in t)} launches")
        for name, dur, count in sorted(t, key=lambda r: -r[1])[:top]:
            print(f"  {dur:9.3f} ms {count:6d}x  {name[:170]}")
        for name, dur, count in t:
            d, c = merged.get(short(name), (0.0, 0))
            merged[short(name)] = (d + dur, c + count)
    total = sum(d for d, _ in merged.values())
    print(f"=== last {last} tables merged by kernel: {total:.2f} ms")
    for name, (d, c) in sorted(merged.items(), key=lambda kv: -kv[1][0])[:40]:
        print(f"  {d:9.3f} ms {c:6d}x {100 * d / max(total, 1e-9):5.1f}%  {name[:120]}")


if __name__ == "__main__":
    main()
