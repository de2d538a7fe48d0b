#!/usr/bin/env bash
# One GPU check (benchmarks/gpu_check.py): training s/it, clips/s and peak memory of s3 and cutie_base at the
# paper's per-GPU batch (bf16), inference FPS at 480p with and without flip (ours and rf-cutie's Cutie-base), the
# deformable attention's time and memory share, and the projected 190k-iteration wall time on 8 GPUs.
# Under 8 minutes on one H200. Arguments pass through to the Python script:
#
#   benchmarks/gpu_check.sh                                  # full run on CUDA; JSON in bench_out/gpu_check.json
#   benchmarks/gpu_check.sh --json /tmp/gpu_check.json
#   benchmarks/gpu_check.sh --smoke --json /tmp/smoke.json   # CPU, toy sizes: checks that the script works
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=python3
if [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
fi

if command -v nvidia-smi >/dev/null 2>&1; then
    echo "== nvidia-smi"
    nvidia-smi --query-gpu=index,name,memory.total,memory.used,utilization.gpu,driver_version \
        --format=csv || echo "nvidia-smi failed (no driver?)"
else
    echo "== nvidia-smi: not available"
fi

exec "$PY" benchmarks/gpu_check.py "$@"
