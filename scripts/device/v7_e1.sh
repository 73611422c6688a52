#!/bin/bash
# Lease E: padding rows not read; GPU tests, triton kernel tuning, bench beside FlashInfer.
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
python3 scripts/device/flashinfer_check.py install --wheels .whl 2>&1 | tail -1
python3 scripts/device/flashinfer_check.py unpack --src .fi_build 2>&1 | tail -1
export PYTHONPATH=src:/tmp/qmoe_fi_check/site FLASHINFER_DISABLE_JIT=1
timeout 170 python3 -m pytest -x -q tests/kernels -m gpu 2>&1 | tee "$OUT/gpu_tests.log" | tail -2
timeout 200 python3 -m qmoe tune --preset gpt-oss-120b --backend triton --kernels \
  --tuning-file "$OUT/tuning.json" > "$OUT/tune.log" 2>&1; echo "tune rc=$?"
cp ~/.cache/qmoe/triton_configs.json "$OUT/" 2>/dev/null; rm -f "$OUT"/*.lock
timeout 150 python3 -m qmoe bench --preset gpt-oss-120b --backend triton --backend flashinfer_cutlass \
  --backend reference --reference-max-tokens 1 --json "$OUT/bench.json" --plot "$OUT/bench.png" \
  > "$OUT/bench.log" 2>&1; echo "bench rc=$?"; tail -12 "$OUT/bench.log"
