# Sourced by the GPU scripts that run the trainer (ddp_gpu.sh, parallel_gpu.sh, resume_gpu.sh): unpacks the
# carried binary (TRAINER_XZ, default .dev/bin/trainer.xz: release, --features cuda, stripped, xz) to
# /tmp/trainer and puts the pip wheels' libnccl.so.2 and libcublas on the library path (bench/cuda_libs.sh).
python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open("/tmp/trainer","wb"))' "${TRAINER_XZ:-.dev/bin/trainer.xz}"
chmod +x /tmp/trainer
source "$(dirname "${BASH_SOURCE[0]}")/cuda_libs.sh"
export RUST_LOG=warn
# A plan name of the GPU scripts (fsdp2, fsdp1, ddp, ep<N>+<sharding>; an FSDP plan may end in -step,
# -layer or -prefetch for that --fsdp-gather, else the trainer's default; any plan may end in -ckpt for
# --gradient-checkpointing, after the gather suffix) -> trainer flags.
flags() { # plan -> trainer flags
  local plan=$1 gather="" ckpt=""
  case $plan in *-ckpt) ckpt="--gradient-checkpointing"; plan=${plan%-ckpt};; esac
  case $plan in
    *-step) gather="--fsdp-gather step"; plan=${plan%-step};;
    *-prefetch) gather="--fsdp-gather prefetch"; plan=${plan%-prefetch};;
    *-layer) gather="--fsdp-gather layer"; plan=${plan%-layer};;
  esac
  case $plan in
    fsdp2|fsdp1|ddp) echo "--sharding $plan $gather $ckpt";;
    ep*+*) local ep=${plan%%+*}; echo "--ep-size ${ep#ep} --sharding ${plan#*+} $gather $ckpt";;
  esac
}
# The Mixtral-shaped row of the GPU tables, for a config written by bench/mixtral_config.py: BATCH packed
# rows (default 1) of SEQ tokens per device (default 4096), STEPS steps (default 4), each logged.
mixtral_row() { # config.json -> trainer flags
  echo "--model-config $1 --per-device-train-batch-size ${BATCH:-1} --packing --max-seq-length ${SEQ:-4096} --max-steps ${STEPS:-4} --logging-steps 1 --learning-rate 1e-5"
}
