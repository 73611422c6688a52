#!/bin/bash
# Final lease, call B (and C if needed): wait for the FlashInfer build, check and time it.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 scripts/device/flashinfer_check.py auto --wheels .whl --budget 560 2>&1 | tee "$OUT/fi_auto.log" | tail -30
