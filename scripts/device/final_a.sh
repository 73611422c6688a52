#!/bin/bash
# Final lease, call A: start FlashInfer's JIT build in the background, tune the triton
# kernels for gpt-oss-120b (writes ~/.cache/qmoe/triton_configs.json), then qmoe bench.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 scripts/device/flashinfer_check.py install --wheels .whl > "$OUT/fi_install.log" 2>&1
python3 scripts/device/flashinfer_check.py build --background > "$OUT/fi_build_start.log" 2>&1
tail -2 "$OUT/fi_build_start.log"
timeout 300 python3 -m qmoe tune --preset gpt-oss-120b --backend triton --kernels --tuning-file "$OUT/tuning.json" \
  > "$OUT/tune.log" 2>&1; echo "tune rc=$?"
cp ~/.cache/qmoe/triton_configs.json "$OUT/" 2>/dev/null
timeout 200 python3 -m qmoe bench --preset gpt-oss-120b --backend triton --backend reference \
  --reference-max-tokens 4 --json "$OUT/bench.json" --plot "$OUT/bench.png" > "$OUT/bench.log" 2>&1; echo "bench rc=$?"
tail -14 "$OUT/bench.log"
