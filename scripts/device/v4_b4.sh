#!/bin/bash
# Lease A, call 4: the packed module as FlashInfer's AOT copy (no ninja, no nvcc), then
# qmoe bench with the triton and flashinfer_cutlass backends in one run.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 scripts/device/flashinfer_check.py unpack --src /tmp/fi_pack 2>&1 | tail -3
export PYTHONPATH=src:/tmp/qmoe_fi_check/site FLASHINFER_DISABLE_JIT=1
timeout 520 python3 -m qmoe bench --preset gpt-oss-120b --backend triton --backend flashinfer_cutlass \
  --backend reference --reference-max-tokens 1 --json "$OUT/bench.json" --plot "$OUT/bench.png" \
  > "$OUT/bench.log" 2>&1; echo "bench rc=$?"; tail -22 "$OUT/bench.log"
