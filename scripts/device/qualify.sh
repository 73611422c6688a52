#!/bin/bash
# qmoe on a lent GPU machine: the steps of one session, each printing a short summary last.
#
#   bash scripts/device/qualify.sh tests    # GPU-marked tests (triton, the peers, routing)
#   bash scripts/device/qualify.sh probe    # launch-config probe: batch invariance, decode variants
#   bash scripts/device/qualify.sh bench    # qmoe bench: every backend, three presets, same inputs
#   bash scripts/device/qualify.sh tune     # qmoe tune --kernels, then the backend table
#   bash scripts/device/qualify.sh check    # qmoe check of every usable backend
#   bash scripts/device/qualify.sh models   # a patched HF model under a CUDA graph: time per forward
#   bash scripts/device/qualify.sh parallel # EP / TP groups of one (NCCL) against plain qmoe.MoE
#   bash scripts/device/qualify.sh ab       # the shipped configs against variants (VARIANTS, AB_TOKENS, AB_FLAGS)
#   bash scripts/device/qualify.sh split    # per-kernel time of the decode calls (torch profiler), with and without PDL
#   bash scripts/device/qualify.sh ncu      # hardware counters of the decode GEMMs, qmoe's and the peers'
#   bash scripts/device/qualify.sh a b ...  # several steps in one call
#
# The peers come from the git-ignored .peers/ folder (carry it; scripts/dev/fetch_peers.sh builds
# it): triton_kernels (vLLM's vendored copy as a top-level package), vllm/_moe_C*.so (Marlin's op
# library) and wheels/humming*.whl (installed to /tmp/site here). FlashInfer joins when .whl/ and
# .fi_build/ are carried (scripts/device/flashinfer_build.py). Results go to $OUT (at most 8 files
# come back: one log per step, and the JSON results); the tables `tune` writes live in
# $XDG_CACHE_HOME (default /tmp/qmoe_cache) for the later steps of the machine's life and are
# copied to $OUT at the end. With .triton/ carried (scripts/dev/pack_triton.sh), every step runs on
# that Triton instead of the machine's.
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export XDG_CACHE_HOME=${XDG_CACHE_HOME:-/tmp/qmoe_cache}; mkdir -p "$XDG_CACHE_HOME"
PRESETS=${PRESETS:-gpt-oss-120b,kimi-k2.5,qwen3-30b-a3b}
TOKENS=${TOKENS:-1,4,16,64,256,1024,4096,8192}
SITE=/tmp/site
if [ -d .peers/wheels ] && [ ! -d $SITE/humming ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target $SITE .peers/wheels/*.whl 2>&1 | tail -1
  chmod +x $SITE/humming/_native/*/* 2>/dev/null
fi
export PYTHONPATH=src:.peers:$SITE
source scripts/device/triton_pack.sh   # another Triton where .triton/ was carried
BACKENDS=${BACKENDS:-"triton,triton_kernels,marlin,humming"}
if [ -d .whl ] && [ -f .fi_build/fi_sm90_build.json ]; then
  if [ ! -d /tmp/qmoe_fi_check/site/flashinfer ]; then
    python3 scripts/device/flashinfer_build.py install --wheels .whl 2>&1 | tail -1
    python3 scripts/device/flashinfer_build.py unpack --src .fi_build 2>&1 | tail -1
  fi
  export PYTHONPATH=$PYTHONPATH:/tmp/qmoe_fi_check/site FLASHINFER_DISABLE_JIT=1
  BACKENDS="$BACKENDS,flashinfer_cutlass"
fi

step() {
  case "$1" in
    tests)
      nvidia-smi --query-gpu=name,clocks.max.sm,memory.used --format=csv,noheader
      python3 -m qmoe env > "$OUT/gpu_tests.log" 2>&1; grep -E "^(triton|humming|vllm|triton_kernels|torch) " "$OUT/gpu_tests.log"
      for t in ${TEST_DIRS:-tests/kernels tests/routing tests/backends tests/parallel tests/integrations}; do
        echo "--- $t" >> "$OUT/gpu_tests.log"
        timeout ${T_TEST:-300} python3 -m pytest -q -m gpu --timeout 140 -p no:cacheprovider -rfEs --tb=short \
          "$t" >> "$OUT/gpu_tests.log" 2>&1
        echo "$t rc=$?: $(grep -E '(passed|failed|error|skipped|deselected)( |,|$)' "$OUT/gpu_tests.log" | tail -1)"
      done
      grep -E "^(FAILED|ERROR) " "$OUT/gpu_tests.log" | head -12 ;;
    probe)
      timeout ${T_PROBE:-240} python3 scripts/device/probe.py --presets "$PRESETS" > "$OUT/probe.log" 2>&1
      echo "probe rc=$?"; tail -45 "$OUT/probe.log" ;;
    bench)
      timeout ${T_BENCH:-300} python3 -m qmoe bench --preset "$PRESETS" --backend "$BACKENDS${BENCH_EXTRA:-}" \
        --tokens "$TOKENS" --reps ${REPS:-20} ${BENCH_FLAGS:-} --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
      echo "bench rc=$?"; grep -v "^qmoe bench \[" "$OUT/bench.log" | tail -60 ;;
    tune)
      timeout ${T_TUNE:-420} python3 -m qmoe tune --preset "$PRESETS" --backend "$BACKENDS" --tokens "$TOKENS" \
        ${TUNE_KERNELS---kernels --kernel-report $OUT/kernel_report.json} --reps ${REPS:-20} > "$OUT/tune.log" 2>&1
      echo "tune rc=$?"; tail -30 "$OUT/tune.log" ;;
    check)
      timeout ${T_CHECK:-300} python3 -m qmoe check --preset "$PRESETS" --backend "$BACKENDS" \
        --tokens ${CHECK_TOKENS:-0,1,3,64,1024} --json "$OUT/check.json" > "$OUT/check.log" 2>&1
      echo "check rc=$?"; grep -E "^(FAIL|CRASH|TIMEOUT)" "$OUT/check.log" | head -12; tail -22 "$OUT/check.log" ;;
    models)
      timeout ${T_MODELS:-240} python3 -m pytest -q -s -m gpu --timeout 230 -p no:cacheprovider -rfEs --tb=short \
        tests/integrations/test_transformers.py -k "cuda_graph or fullgraph_on_the_gpu" > "$OUT/models.log" 2>&1
      echo "models rc=$?"; grep -E "per forward|passed|failed|^(FAILED|ERROR)" "$OUT/models.log" | tail -8 ;;
    ncu)
      NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
      # why warps wait: cycles stalled per issued instruction, by reason
      STALLS="long_scoreboard short_scoreboard barrier mio_throttle math_pipe_throttle wait not_selected selected
        lg_throttle dispatch_stall no_instruction membar branch_resolving drain imc_miss tex_throttle sleeping misc"
      # ncu prints its report when the program ends: a run stopped by its timeout returns nothing.
      # 109 kernels x 18 replay passes did not end in 330 s (session 4), so only the GEMMs are
      # profiled (30 kernels for the defaults: about 2.5 s each, plus a minute of set-up).
      timeout ${T_NCU:-300} $NCU --profile-from-start off --clock-control none --nvtx \
        --kernel-name regex:"${NCU_KERNELS:-moe_gemm|humming|Marlin|matmul}" --section SpeedOfLight --section ComputeWorkloadAnalysis --section InstructionStats \
        --section Occupancy --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \
        --metrics "$(printf 'smsp__average_warps_issue_stalled_%s_per_issue_active.ratio,' $STALLS | sed 's/,$//')" \
        python3 scripts/device/prof_decode.py --presets ${NCU_PRESETS:-gpt-oss-120b,kimi-k2.5} \
        --backends ${NCU_BACKENDS:-triton,humming,marlin} --tokens ${NCU_TOKENS:-16,64} > "$OUT/ncu_decode.txt" 2>&1
      echo "ncu rc=$?"; python3 scripts/device/ncu_table.py "$OUT/ncu_decode.txt" | cut -c1-170 | head -60 ;;
    ab)
      timeout ${T_AB:-240} python3 scripts/device/config_ab.py --presets "$PRESETS" --tokens ${AB_TOKENS:-1024,4096,8192} \
        --variants "${VARIANTS:-scale_words=flip}" ${AB_FLAGS:-} > "$OUT/config_ab.log" 2>&1
      echo "ab rc=$?"; sed -n '/^preset /,$p' "$OUT/config_ab.log" | tail -${AB_TAIL:-40} ;;
    split)
      for f in "" --no-pdl; do
        timeout ${T_SPLIT:-150} python3 scripts/device/kernel_split.py --presets "$PRESETS" --tokens ${SPLIT_TOKENS:-1,4,16} \
          $f > "$OUT/kernel_split$f.log" 2>&1
        echo "split $f rc=$?"; tail -12 "$OUT/kernel_split$f.log"
      done ;;
    parallel)
      timeout ${T_PARALLEL:-120} python3 scripts/device/parallel_check.py --presets ${PAR_PRESETS:-gpt-oss-120b} \
        > "$OUT/parallel.log" 2>&1
      echo "parallel rc=$?"; tail -16 "$OUT/parallel.log" ;;
    *) echo "usage: qualify.sh tests|probe|bench|tune|check|models|ncu|parallel|ab|split ..." >&2; exit 2 ;;
  esac
}
for s in "$@"; do
  echo "=== $s ($(date +%T))"
  step "$s"
done
for f in "$XDG_CACHE_HOME"/qmoe/*.json; do [ -f "$f" ] && cp "$f" "$OUT/"; done
true
