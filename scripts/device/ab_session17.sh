#!/bin/bash
# The GPU measurements that session 17 (no GPU lent) prepared, as two calls of under 10 minutes:
#   bash scripts/device/ab_session17.sh a   # carry .peers: GPU tests of stream-K, then A/Bs on the machine's Triton
#   bash scripts/device/ab_session17.sh b   # carry .triton: the table and its variants on the packed Triton 3.9
#   bash scripts/device/ab_session17.sh c   # no carry: the batch-invariant family with bf16 rows, bitwise and timed
# a: stream-K GEMM1 (KernelConfig.stream_k1) and split-K GEMM1 on the 8-row M = 1 tiles against the
#    table (gpt-oss-120b, kimi-k2.5, qwen3-30b-a3b at M = 1 and 4), then 256-column prefill tiles
#    (kimi-k2.5 at 4096 / 8192, qwen3-30b-a3b at 1024 / 4096).
# b: the shipped table's entries under Triton 3.9 (keys rewritten to 3.9 in a user table, since the
#    tables are keyed by Triton's version) with the same variants, to compare with a's 3.6 times
#    (separate processes, one machine); then the GPU tests of the triton kernels on 3.9.
# c: the GPU batch-invariance test (4096-token prefixes, three formats) on the bf16-row family, then
#    qmoe bench of both modes side by side (the mode's cost at decode and prefill).
# Each step's config_ab.json / config_ab.log is kept as ab_<name>.json / .log in $OUT.
set -u
OUT=${OUT:-out}; export OUT
ab() {  # name presets tokens variants timeout
  PRESETS=$2 AB_TOKENS=$3 VARIANTS="$4" T_AB=$5 AB_TAIL=40 bash scripts/device/qualify.sh ab
  mv "$OUT/config_ab.json" "$OUT/ab_$1.json" 2>/dev/null; mv "$OUT/config_ab.log" "$OUT/ab_$1.log" 2>/dev/null
}
M1="stream_k1=1;stream_k1=2;stream_k1=1,k_unroll=2;split_k1=2"
KIMI="block_n2=256;block_m=64,block_n1=256,block_n2=256,tail_m=32;block_m=64,block_n1=256,tail_m=32"
QWEN="block_n2=256,num_warps=8;block_n1=128,block_n2=256,num_warps=8;block_n2=128"
case "${1:-a}" in
  a)
    [ -f .triton/triton.tar.xz ] && mv .triton /tmp/_triton_off   # the machine's Triton here
    PYTHONPATH=src timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_triton_moe.py \
      -k "capture_and_replay" 2>&1 | tail -4
    ab gptoss_m1 gpt-oss-120b 1,4 "$M1" 100
    ab kimi_qwen_m1 kimi-k2.5,qwen3-30b-a3b 1 "$M1;stream_k1=1,split_k1=1;stream_k1=2,split_k1=1" 100
    ab kimi_prefill kimi-k2.5 4096,8192 "$KIMI" 140
    ab qwen_prefill qwen3-30b-a3b 1024,4096 "$QWEN" 110 ;;
  b)
    python3 - <<'PY'
import json
t = json.load(open("src/qmoe/backends/triton/configs.json"))
t["entries"] = {k.replace("triton 3.6.0", "triton 3.9.0"): v for k, v in t["entries"].items()}
json.dump(t, open("/tmp/table_as_39.json", "w"))
PY
    export QMOE_TRITON_CONFIGS=/tmp/table_as_39.json
    ab gptoss_m1_39 gpt-oss-120b 1,4 "$M1" 110
    ab kimi_prefill_39 kimi-k2.5 4096,8192 "$KIMI" 130
    ab qwen_prefill_39 qwen3-30b-a3b 1024,4096 "$QWEN" 100
    TEST_DIRS=tests/kernels T_TEST=200 bash scripts/device/qualify.sh tests ;;
  c)
    [ -f .triton/triton.tar.xz ] && mv .triton /tmp/_triton_off
    PYTHONPATH=src timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_triton_moe.py \
      -k "batch_invariance_on_gpu" 2>&1 | tail -4
    BACKENDS=triton,qmoe.backends.triton:INVARIANT TOKENS=1,4,16,64,1024,4096,8192 T_BENCH=300 \
      bash scripts/device/qualify.sh bench ;;
esac
