#!/bin/bash
# Lease D, call 1: FlashInfer from the packed build; GPU tests; kernel tuning + backend tuning.
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
python3 scripts/device/flashinfer_check.py install --wheels .whl 2>&1 | tail -1
python3 scripts/device/flashinfer_check.py unpack --src .fi_build 2>&1 | tail -1
export PYTHONPATH=src:/tmp/qmoe_fi_check/site FLASHINFER_DISABLE_JIT=1
rm -f ~/.cache/qmoe/triton_configs.json
timeout 170 python3 -m pytest -x -q tests/kernels -m gpu 2>&1 | tee "$OUT/gpu_tests.log" | tail -3
timeout 300 python3 -m qmoe tune --preset gpt-oss-120b --backend triton --backend flashinfer_cutlass --kernels \
  --tuning-file "$OUT/tuning.json" > "$OUT/tune.log" 2>&1; echo "tune rc=$?"; tail -14 "$OUT/tune.log"
cp ~/.cache/qmoe/triton_configs.json "$OUT/" 2>/dev/null; rm -f "$OUT"/*.lock
