#!/bin/bash
# Qualify qmoe on a lent GPU machine, one step per call (each call may run 10 minutes):
#
#   bash scripts/device/qualify.sh tests   # FlashInfer from .fi_build (if carried), GPU-marked tests
#   bash scripts/device/qualify.sh tune    # qmoe tune --kernels: triton launch configs + backend table
#   bash scripts/device/qualify.sh bench   # qmoe bench: triton beside flashinfer_cutlass, same inputs
#   bash scripts/device/qualify.sh check   # qmoe check of triton and flashinfer_cutlass
#
# Carry `.whl` (FlashInfer wheels) and `.fi_build` (its packed SM90 module: docs/flashinfer.md) to
# include FlashInfer; without them only qmoe's own backends run. Results go to $OUT. Run the steps
# back to back on the same (warm) machine: `tune` writes ~/.cache/qmoe/triton_configs.json, which
# `bench` and `check` then use.
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
PRESET=${PRESET:-gpt-oss-120b}
BACKENDS="--backend triton"
if [ -d .whl ] && [ -f .fi_build/fi_sm90_build.json ]; then
  if [ ! -d /tmp/qmoe_fi_check/site/flashinfer ]; then
    python3 scripts/device/flashinfer_build.py install --wheels .whl 2>&1 | tail -1
    python3 scripts/device/flashinfer_build.py unpack --src .fi_build 2>&1 | tail -1
  fi
  export PYTHONPATH=src:/tmp/qmoe_fi_check/site FLASHINFER_DISABLE_JIT=1
  BACKENDS="--backend triton --backend flashinfer_cutlass"
fi
case "${1:-}" in
  tests)
    nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
    timeout 540 python3 -m pytest -q tests -m gpu 2>&1 | tee "$OUT/gpu_tests.log" | tail -5 ;;
  tune)
    timeout 540 python3 -m qmoe tune --preset "$PRESET" $BACKENDS --kernels --tuning-file "$OUT/tuning.json" \
      > "$OUT/tune.log" 2>&1; echo "tune rc=$?"; tail -14 "$OUT/tune.log"
    cp ~/.cache/qmoe/triton_configs.json "$OUT/" 2>/dev/null; rm -f "$OUT"/*.lock ;;
  bench)
    timeout 540 python3 -m qmoe bench --preset "$PRESET" $BACKENDS --backend reference --reference-max-tokens 1 \
      --json "$OUT/bench.json" --plot "$OUT/bench.png" > "$OUT/bench.log" 2>&1; echo "bench rc=$?"
    tail -13 "$OUT/bench.log" ;;
  check)
    timeout 540 python3 -m qmoe check --preset "$PRESET" $BACKENDS --time --json "$OUT/check.json" \
      > "$OUT/check.log" 2>&1; echo "check rc=$?"; grep -E "^(FAIL|CRASH|TIMEOUT)" "$OUT/check.log" | head; tail -9 "$OUT/check.log" ;;
  *) echo "usage: qualify.sh tests|tune|bench|check" >&2; exit 2 ;;
esac
