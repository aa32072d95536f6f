#!/usr/bin/env python3
"""Reads a trainer run's TensorBoard events with TensorBoard's own reader and checks them against
metrics.jsonl (an independent check of our hand-written event encoder).

Usage: python3 bench/check_tensorboard_events.py OUTPUT_DIR   (needs `pip install tensorboard`)
"""
import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

out = sys.argv[1]
ea = EventAccumulator(f"{out}/runs")
ea.Reload()
lines = [json.loads(l) for l in open(f"{out}/metrics.jsonl")]
print("scalar tags:", sorted(ea.Tags()["scalars"]))
for tag, key in [("train/loss", "loss"), ("train/learning_rate", "learning_rate"), ("train/grad_norm", "grad_norm")]:
    tb = [(e.step, e.value) for e in ea.Scalars(tag)]
    js = [(l["step"], l[key]) for l in lines]
    assert [s for s, _ in tb] == [s for s, _ in js], (tag, tb, js)
    for (step, a), (_, b) in zip(tb, js):
        assert abs(a - b) <= 1e-6 * max(abs(b), 1e-12), (tag, step, a, b)
    print(f"{tag}: {len(tb)} steps agree with metrics.jsonl")
