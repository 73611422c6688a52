#!/usr/bin/env bash
# Packs a Triton release for the GPU machine inside the device tool's 64 MiB carry, so that GPU
# calls can run qmoe's kernels on a Triton other than the machine's 3.6 (docs/performance.md,
# session 16: Triton 3.9 carries the fix of triton-lang/triton#9433, a race on wgmma register
# operands, which 3.6 lacks). The wheel is 286 MB; the pack keeps what compiling and launching for
# NVIDIA GPUs needs: libtriton.so stripped to its dynamic symbols, cuobjdump, libdevice and the
# Python package (38 MiB for 3.9.0). It drops the AMD backend, CUPTI, proton, the test and plugin
# libraries and the bundled ptxas: the GPU machine's CUDA toolkit has one (qualify.sh points
# TRITON_PTXAS_BLACKWELL_PATH, the ptxas Triton 3.9 uses for every architecture, and TRITON_PTXAS_PATH
# at it, and sets TRITON_BACKENDS_IN_TREE=1: the machine's own Triton registers an AMD backend that
# the pack does not have). Checked here: the pack imports and compiles for sm_90 under Python 3.12
# with another ptxas (CUDA 12.8's).
#   bash scripts/dev/pack_triton.sh            # -> .triton/triton.tar.xz (git-ignored)
#   then carry ".triton" (without ".peers": both do not fit in 64 MiB); scripts/device/triton_pack.sh
#   (sourced by qualify.sh) unpacks it to /tmp/triton_pack and puts it first on PYTHONPATH.
# TRITON (default 3.9.0): the version; PYVER (default 3.12): the GPU machine's Python.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VER=${TRITON:-3.9.0}
PYVER=${PYVER:-3.12}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
echo "pack_triton: downloading triton==$VER for Python $PYVER (about 290 MB)"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 -d "$WORK/dl" "triton==$VER"
mkdir -p "$WORK/x"
python3 -m zipfile -e "$WORK"/dl/triton-*.whl "$WORK/x"
cd "$WORK/x"
rm -rf triton/backends/amd triton/backends/nvidia/lib/cupti* triton/backends/nvidia/bin/ptxas* \
  triton/backends/nvidia/bin/nvdisasm triton/_C/libproton.so triton/profiler triton/instrumentation \
  triton/plugins triton/FileCheck
strip --strip-unneeded triton/_C/libtriton.so
sed -i '/^amd = /d' triton-*.dist-info/entry_points.txt
chmod +x triton/backends/nvidia/bin/*
echo "$VER" > triton/PACKED_VERSION
mkdir -p "$ROOT/.triton"
XZ_OPT="-9 -T2" tar cJf "$ROOT/.triton/triton.tar.xz.new" triton triton-*.dist-info
mv "$ROOT/.triton/triton.tar.xz.new" "$ROOT/.triton/triton.tar.xz"
echo "pack_triton: $(du -h "$ROOT/.triton/triton.tar.xz" | cut -f1) in .triton/triton.tar.xz (triton $VER)"
