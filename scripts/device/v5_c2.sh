#!/bin/bash
# Lease C, call 2 (same machine): qmoe bench with both backends, then qmoe check of both.
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=src:/tmp/qmoe_fi_check/site PYTHONUNBUFFERED=1 FLASHINFER_DISABLE_JIT=1
timeout 200 python3 -m qmoe bench --preset gpt-oss-120b --backend triton --backend flashinfer_cutlass \
  --backend reference --reference-max-tokens 1 --json "$OUT/bench.json" --plot "$OUT/bench.png" \
  > "$OUT/bench.log" 2>&1; echo "bench rc=$?"
timeout 300 python3 -m qmoe check --preset gpt-oss-120b --backend triton --backend flashinfer_cutlass --time \
  --json "$OUT/check.json" > "$OUT/check.log" 2>&1; echo "check rc=$?"; tail -12 "$OUT/check.log"
tail -13 "$OUT/bench.log"
