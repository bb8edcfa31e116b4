#!/usr/bin/env bash
# The one GPU check (about 5 minutes on an H100): protmask and ProteinMPNN's reference model in fp32 and
# bf16, eager and compiled, peak GPU memory, model FLOPs utilisation, and a 300-step bf16 training run
# with its validation metrics, as one JSON document on stdout (and in $OUT/gpu_check.json when OUT is set).
#
#     bash bench/gpu_check.sh                  # needs the set-up of `make install` (.venv) and a CUDA GPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
exec timeout 350 "$PY" bench/gpu_check.py ${OUT:+--output "$OUT/gpu_check.json"} "$@"
