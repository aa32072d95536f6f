#!/usr/bin/env bash
# One device call (one GPU): the trainer's checkpoints and exports at Mixtral-8x7B layer shapes (d=4096,
# ffn=14336, E=8, k=2, 32 heads / 8 kv, vocab 32000; LAYERS layers, random init, bf16 compute, packed
# rows of SEQ tokens), as a user runs them:
#  1. LoRA on attention and experts (`--use-lora all`), 2 steps, a checkpoint at step 2, `--merge-lora`:
#     the merged export must equal base + s·B·A computed here in torch from the checkpoint's base weights
#     and the PEFT adapter files (an independent merge).
#  2. Full fine-tune: 3 steps uninterrupted vs 2 steps + checkpoint + `--resume-from-checkpoint latest` to
#     step 3 (the resumed run loads the checkpoint lazily, see `HfCheckpoint::load_model_lazy`): the
#     logged losses must agree; sizes and wall times of save and resume are printed.
#  3. Full fine-tune, 1 step, checkpoint at 1: transformers loads its model.safetensors + config.json with
#     no missing or unexpected keys and runs a forward. (A LoRA checkpoint directory also holds the PEFT
#     adapter files, which transformers then tries to apply: the PEFT there cannot wrap transformers 5's fused
#     expert parameters with lora_dropout != 0, so that load is not the check.)
# SECTIONS picks among "lora resume load" (default: all). NPROC (default 1) and PLAN_FLAGS (e.g. "--sharding
# fsdp2", "--ep-size 2 --sharding fsdp2") run every job on several GPUs: checkpoints then hold per-rank shards
# plus the consolidated model.safetensors streamed by rank 0, and the resume re-shards it lazily (each rank
# reads only its pieces: the "elements read" lines).
# Expects .dev/bin/trainer.xz (release, --features cuda, stripped, xz). Logs go to $OUT.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/realshape_checkpoint.log") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1
source bench/trainer_env.sh
LAYERS=${LAYERS:-1}; SEQ=${SEQ:-4096}
WORK=${WORK:-/tmp/realshape}; rm -rf "$WORK"; mkdir -p "$WORK"
python3 bench/mixtral_config.py "$WORK/cfg.json" "$LAYERS"
NPROC=${NPROC:-1}
COMMON="--device cuda --model-config $WORK/cfg.json --dtype bf16 --per-device-train-batch-size 1 --packing
  --max-seq-length $SEQ --logging-steps 1 --learning-rate 1e-4 --seed 1 --lr-scheduler-type constant
  --nproc-per-node $NPROC ${PLAN_FLAGS:-}"
echo "ranks: $NPROC, plan: ${PLAN_FLAGS:-(none)}"
run() { # name timeout flags...: one trainer run, its wall time and the log lines that matter
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s.%N)
  RUST_LOG=warn,trainer=info timeout "$limit" /tmp/trainer $COMMON "$@" --output-dir "$WORK/$name" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "--- $name: rc=$rc, $(python3 -c "import time; print(f'{time.time() - $t0:.1f}')") s wall"
  grep -aE "saved|elements read|resum|merged|error|Error|panick" "$OUT/$name.log" | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-220 | tail -8
}
sizes() { du -sh "$@" 2>/dev/null | sed 's/^/    /'; }

SECTIONS=${SECTIONS:-lora resume load}
if [[ " $SECTIONS " == *" lora "* ]]; then
echo "=== 1. LoRA all, 2 steps, checkpoint at 2, --merge-lora"
run lora 300 --moe-kernel scatter --use-lora all --max-steps 2 --save-strategy steps --save-steps 2 --merge-lora
sizes "$WORK"/lora/checkpoint-2/* "$WORK"/lora/merged/* "$WORK"/lora/adapter_model.safetensors
python3 - "$WORK/lora" <<'PY'
import json, os, sys, torch
from safetensors import safe_open
root = sys.argv[1]
ck, merged = os.path.join(root, "checkpoint-2"), os.path.join(root, "merged")
cfg = json.load(open(os.path.join(root, "adapter_config.json")))
s = cfg["lora_alpha"] / cfg["r"]
ad = safe_open(os.path.join(root, "adapter_model.safetensors"), "pt", device="cuda")
base = safe_open(os.path.join(ck, "model.safetensors"), "pt", device="cuda")
mer = safe_open(os.path.join(merged, "model.safetensors"), "pt", device="cuda")
keys = set(ad.keys())
worst, n, changed = 0.0, 0, 0
for name in base.keys():
    w = base.get_tensor(name).float()
    stem = "base_model.model." + name[: -len(".weight")]
    a, b = stem + ".lora_A.weight", stem + ".lora_B.weight"
    if a in keys:
        want = w + s * (ad.get_tensor(b).float() @ ad.get_tensor(a).float())
        changed += 1
    else:
        want = w
    got = mer.get_tensor(name).float()
    rel = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
    if rel > 1e-6:
        print(f"  {name}: rel L2 {rel:.2e}")
    worst, n = max(worst, rel), n + 1
print(f"merged export vs torch merge of checkpoint base + PEFT adapters: {n} tensors ({changed} with adapters), "
      f"worst rel L2 {worst:.2e} (bound 1e-6), adapter pairs in file: {len(keys) // 2}, scaling {s}")
PY

fi
if [[ " $SECTIONS " == *" resume "* ]]; then
echo "=== 2. full fine-tune: 3 steps vs 2 + checkpoint + resume"
run full 300 --moe-kernel scatter --max-steps 3
run part 300 --moe-kernel scatter --max-steps 2 --save-strategy steps --save-steps 2
sizes "$WORK"/part/checkpoint-2/*
run part 300 --moe-kernel scatter --max-steps 3 --resume-from-checkpoint latest
python3 - "$WORK/full" "$WORK/part" <<'PY'
import json, os, sys
a, b = ([json.loads(l) for l in open(os.path.join(d, "metrics.jsonl"))] for d in sys.argv[1:3])
for x, y in zip(a, b):
    print(f"  step {x['step']}: loss {x['loss']:.6f} vs {y['loss']:.6f}, grad_norm {x['grad_norm']:.6f} vs {y['grad_norm']:.6f}")
worst = max((abs(x[k] - y[k]) / max(abs(x[k]), 1e-12) for x, y in zip(a, b) for k in ["loss", "grad_norm"]), default=float("nan"))
print(f"uninterrupted ({len(a)} steps) vs resumed ({len(b)} steps): max rel diff {worst:.2e}")
PY
fi
if [[ " $SECTIONS " == *" load "* ]]; then
echo "=== 3. full fine-tune, 1 step, checkpoint at 1: transformers loads it"
run save1 300 --moe-kernel scatter --max-steps 1 --save-strategy steps --save-steps 1
sizes "$WORK"/save1/checkpoint-1/*
python3 - "$WORK/save1/checkpoint-1" <<'PY'
import sys, torch
from transformers import MixtralForCausalLM
ck = sys.argv[1]
model, info = MixtralForCausalLM.from_pretrained(ck, dtype=torch.bfloat16, output_loading_info=True)
bad = {k: v for k, v in info.items() if v}
print(f"transformers loads {ck}:", "no missing/unexpected/mismatched keys" if not bad else bad)
model = model.cuda()
ids = torch.randint(3, 32000, (1, 1024), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
with torch.no_grad():
    out = model(ids, labels=ids)
print(f"transformers forward on 1024 random tokens: loss {out.loss.item():.4f} (ln 32000 = 10.37), finite {bool(torch.isfinite(out.logits).all())}")
PY
fi
rm -rf "$WORK"
