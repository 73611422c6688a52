#!/bin/bash
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
DUMP_SASS=1 PROF_M=1 timeout 120 python3 scripts/device/prof.py 2>&1 | grep -v Warn | tail -4
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
for M in 1 4096; do
  PROF_M=$M timeout 200 $NCU --clock-control none --kernel-name regex:moe_gemm --launch-skip 6 --launch-count 2 \
    --section SpeedOfLight --section WarpStateStats --section LaunchStats --section Occupancy --section MemoryWorkloadAnalysis \
    python3 scripts/device/prof.py > "$OUT/ncu_M$M.txt" 2>&1
  grep -E "moe_gemm|Duration|Memory Throughput|DRAM Throughput|Compute \(SM\)|Achieved Occupancy|Registers Per|Stall|Warp Cycles Per Issued|Issue Slot|Theoretical Occ|Block Limit|L1/TEX Hit|L2 Hit|Mem Busy|Max Bandwidth" "$OUT/ncu_M$M.txt" | head -60
done
