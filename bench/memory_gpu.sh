#!/usr/bin/env bash
# One device call on one GPU: what Mixtral-shaped layers cost in GPU memory under the trainer, to size the
# multi-GPU runs (issue 8: how many layers fit per plan), and what FSDP1's whole-unit buffers cost with and
# without exact-size (persistent) buffers. Each row: the trainer on ROW_LAYERS Mixtral-8x7B-shaped layers
# (bench/mixtral_config.py), one packed row of SEQ tokens, STEPS steps, bf16, ScatterMoE; its wall time from
# start to exit (the initialisation is wall minus train_runtime), the trainer's own gpu_mem_used_peak /
# gpu_mem_alloc (CubeCL's reserved / live bytes, sampled during the steps) and nvidia-smi's peak (sampled
# every 100 ms from start to exit, so it includes the initialisation).
# ROWS (one per line): name|layers|env assignments|trainer flags. The default rows are below.
# Expects .dev/bin/trainer.xz (release, --features cuda, stripped, xz). Logs and JSON go to $OUT.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/memory_gpu.log") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1
source bench/trainer_env.sh
STEPS=${STEPS:-4}
ROWS=${ROWS:-"full-4l|4||
full-4l-ckpt|4||--gradient-checkpointing
full-5l|5||
full-5l-ckpt|5||--gradient-checkpointing
lora-attn-8l|8||--use-lora attn-only
lora-attn-8l-ckpt|8||--use-lora attn-only --gradient-checkpointing
lora-attn-32l-ckpt|32||--use-lora attn-only --gradient-checkpointing
lora-attn-32l|32||--use-lora attn-only"}
NAMES=""
while IFS='|' read -r name layers envs flags; do
  [ -z "$name" ] && continue
  python3 bench/mixtral_config.py "$OUT/mixtral_${layers}l.json" "$layers"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$OUT/smi-$name.csv" &
  SMI=$!
  start=$(date +%s.%N)
  env $envs timeout ${RUN_TIMEOUT:-150} /tmp/trainer --device cuda $(mixtral_row "$OUT/mixtral_${layers}l.json") \
    --dtype bf16 --moe-kernel scatter $flags --output-dir "$OUT/$name" > "$OUT/run-$name.log" 2>&1
  rc=$?
  end=$(date +%s.%N)
  kill $SMI 2>/dev/null; wait $SMI 2>/dev/null
  echo "$name: rc=$rc wall=$(python3 -c "print(f'{$end-$start:.1f}')") s ($envs $flags)"
  [ $rc = 0 ] || grep -m4 -iE "panicked|error|out of memory" "$OUT/run-$name.log"
  echo "$end $start $layers" > "$OUT/$name.wall"
  NAMES="$NAMES $name"
done <<< "$ROWS"
python3 - "$OUT" "${SEQ:-4096}" $NAMES <<'PY'
import json, os, sys
out, S, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
print("| row | layers | init s | s/step (lower median, 2+) | gpu_mem_used_peak MiB | gpu_mem_alloc MiB | smi peak MiB | loss step 1 → last |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for n in names:
    try:
        m = [json.loads(l) for l in open(os.path.join(out, n, "metrics.jsonl"))]
        s = json.load(open(os.path.join(out, n, "train_summary.json")))
    except OSError:
        print(f"| {n} | failed (see run-{n}.log) | | | | | | |"); continue
    end, start, layers = open(os.path.join(out, n + ".wall")).read().split()
    end, start = float(end), float(start)
    smi = max((int(x) for x in open(os.path.join(out, f"smi-{n}.csv")) if x.strip().isdigit()), default=0)
    deltas = sorted(b["elapsed_s"] - a["elapsed_s"] for a, b in zip(m, m[1:])) or [m[0]["elapsed_s"]]
    steady = deltas[(len(deltas) - 1) // 2]
    f = lambda k: f"{s[k]:.0f}" if s.get(k) is not None else "-"
    print(f"| {n} | {layers} | {end - start - s['train_runtime']:.1f} | {steady:.3f} | {f('gpu_mem_used_peak')} | {f('gpu_mem_alloc')} | {smi} | {m[0]['loss']:.6f} → {m[-1]['loss']:.4f} |")
PY
# The device returns a limited number of files: keep the log and the run logs, not each run's outputs
# (KEEP_RUNS=1 keeps them).
if [ "${KEEP_RUNS:-0}" != 1 ]; then
  for n in $NAMES; do rm -rf "${OUT:?}/$n" "$OUT/smi-$n.csv" "$OUT/$n.wall"; done
  rm -f "$OUT"/mixtral_*l.json
fi
