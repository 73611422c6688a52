#!/bin/bash
# Lease A, call 1: FlashInfer build in the background; GPU tests; decode/prefill sweep.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
python3 scripts/device/flashinfer_check.py install --wheels .whl > "$OUT/fi_install.log" 2>&1; tail -1 "$OUT/fi_install.log"
python3 scripts/device/flashinfer_check.py build --background > "$OUT/fi_build_start.log" 2>&1; tail -1 "$OUT/fi_build_start.log"
timeout 200 python3 -m pytest -x -q tests/kernels -m gpu 2>&1 | tee "$OUT/gpu_tests.log" | tail -4
timeout 340 python3 scripts/device/diag.py 2>&1 | grep -v -i warn | tee "$OUT/diag.log" | cut -c1-150
