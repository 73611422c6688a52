#!/bin/bash
# Lease A, call 3: wait for the FlashInfer build, check it, pack the built module (kept in
# /tmp/fi_pack for call 4 and brought back: at most 8 files).
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 scripts/device/flashinfer_check.py auto --wheels .whl --no-prebuilt --budget 480 2>&1 | tail -25
python3 scripts/device/flashinfer_check.py pack --dest /tmp/fi_pack 2>&1 | tail -12
rm -f "$OUT"/*; cp /tmp/fi_pack/* "$OUT"/ 2>/dev/null; ls -la "$OUT"
