#!/bin/bash
# v4 decode, lease call A: start FlashInfer's SM90 build in the background (for the check
# and pack later in the same lease), then GPU correctness of the new decode and the sweep.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.sm --format=csv,noheader
python3 scripts/device/flashinfer_check.py install --wheels .whl > "$OUT/fi_install.log" 2>&1; tail -1 "$OUT/fi_install.log"
python3 scripts/device/flashinfer_check.py build --background > "$OUT/fi_build_start.log" 2>&1; tail -2 "$OUT/fi_build_start.log"
timeout 220 python3 -m pytest -x -q tests/kernels -m gpu 2>&1 | tee "$OUT/gpu_tests.log" | tail -8
DIAG_MS=1,4,16,64,256,1024,4096,8192 timeout 340 python3 scripts/device/diag.py 2>&1 | grep -v Warn | tee "$OUT/diag.log"
