#!/bin/bash
# GPU machine: versions, qmoe bench of gpt-oss-120b (triton + reference), then the GPU tests.
# Usage (from the repo root there): bash scripts/device/triton_first.sh ; results under $OUT.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
timeout 330 python3 -m qmoe bench --preset gpt-oss-120b --backend triton --backend reference \
  --reference-max-tokens 16 --json "$OUT/bench1.json" --plot "$OUT/bench1.png" 2>&1 | tee "$OUT/bench1.log"
timeout 220 python3 -m pytest -x -q tests/kernels -m gpu 2>&1 | tee "$OUT/gpu_tests.log" | tail -30
