"""Largest relative difference of logged metrics between a reference run and other runs of the trainer,
step by step over the steps both logged (each run's `metrics.jsonl`). One line per run; a run whose
metrics are missing or empty (it failed) says so instead of stopping the comparison.

    python3 bench/compare_metrics.py REF_DIR KEYS LABEL RUN_DIR...

KEYS: comma-separated metric names (e.g. loss,lm_loss,aux_loss,grad_norm); LABEL: what the runs are
compared with, for the printout (e.g. "vs 1 GPU"). Each RUN_DIR is printed by its last path component.
"""
import json
import os
import sys


def load(d):
    with open(os.path.join(d, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def main():
    ref_dir, keys, label, runs = sys.argv[1], sys.argv[2].split(","), sys.argv[3], sys.argv[4:]
    ref = load(ref_dir)
    for run in runs:
        name = os.path.basename(os.path.normpath(run))
        try:
            got = load(run)
        except OSError as e:
            print(f"{name:>12}: missing ({e})")
            continue
        if not got:
            print(f"{name:>12}: no step logged (the run failed; see above)")
            continue
        worst = max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-12) for a, b in zip(ref, got) for k in keys)
        print(f"{name:>12}: {len(got)} steps, max rel diff {label} ({', '.join(keys)}) = {worst:.2e}")


if __name__ == "__main__":
    main()
