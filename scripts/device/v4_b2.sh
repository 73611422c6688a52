#!/bin/bash
# Lease A, call 2 (FlashInfer still building): qmoe check of the triton backend, kernel tuning.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
timeout 270 python3 -m qmoe check --preset gpt-oss-120b,qwen3-30b-a3b --backend triton --time \
  --json "$OUT/check.json" > "$OUT/check.log" 2>&1; echo "check rc=$?"; tail -25 "$OUT/check.log"
timeout 300 python3 -m qmoe tune --preset gpt-oss-120b --backend triton --kernels --tokens 1,4,16,64,256,1024,4096 --tuning-file "$OUT/tuning.json" \
  > "$OUT/tune.log" 2>&1; echo "tune rc=$?"; tail -12 "$OUT/tune.log"
cp ~/.cache/qmoe/triton_configs.json "$OUT/" 2>/dev/null
tail -3 /tmp/qmoe_fi_check/build.log 2>/dev/null
