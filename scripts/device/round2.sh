#!/bin/bash
# GPU: correctness of the inline-PTX decode at real shapes (GPU tests), then the config sweep.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
timeout 200 python3 -m pytest -x -q tests/kernels -m gpu 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
timeout 330 python3 scripts/device/diag.py 2>&1 | grep -v Warn | tee "$OUT/diag.log"
