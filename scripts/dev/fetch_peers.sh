#!/usr/bin/env bash
# Builds the git-ignored .peers/ folder that GPU calls carry (scripts/device/qualify.sh): the peer
# backends' code for the GPU machine, which has no internet. Run once per checkout, here, where pip
# can download (about 340 MB fetched, 45 MB kept):
#   .peers/wheels/humming_kernels-*.whl           Humming (installed there into /tmp/site)
#   .peers/vllm/_moe_C_stable_libtorch.abi3.so    vLLM's Marlin op library (docs/peers/marlin.md)
#   .peers/triton_kernels/                        vLLM's vendored triton_kernels, as a top-level package
# Versions: HUMMING (default 0.1.19) and VLLM (default 0.33.0), the ones docs/performance.md measured;
# PYVER (default 3.12), the GPU machine's Python. A failed run leaves an existing .peers/ as it was.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HUMMING=${HUMMING:-0.1.19}
VLLM=${VLLM:-0.33.0}
PYVER=${PYVER:-3.12}
DL=$(mktemp -d)
NEW="$ROOT/.peers.new"
trap 'rm -rf "$DL" "$NEW"' EXIT
get() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$DL" "$1"
}
echo "fetch_peers: downloading humming-kernels==$HUMMING and vllm==$VLLM (about 340 MB)"
get "humming-kernels==$HUMMING"
get "vllm==$VLLM"
rm -rf "$NEW"
mkdir -p "$NEW/wheels" "$NEW/vllm"
cp "$DL"/humming_kernels-*.whl "$NEW/wheels/"
python3 - "$DL"/vllm-*.whl "$NEW" <<'PY'
import os, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
libs = kernels = 0
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith("vllm/_moe_C") and name.endswith(".so"):
            out, libs = os.path.join(dest, "vllm", os.path.basename(name)), libs + 1
        elif name.startswith("vllm/third_party/triton_kernels/"):
            out, kernels = os.path.join(dest, name[len("vllm/third_party/"):]), kernels + 1
        else:
            continue
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "wb") as f:
            f.write(z.read(name))
if not libs or not kernels:
    sys.exit(f"fetch_peers: {wheel} holds {libs} _moe_C libraries and {kernels} vendored triton_kernels files; "
             f"both are needed")
print(f"fetch_peers: {libs} op library and {kernels} triton_kernels files from {os.path.basename(wheel)}")
PY
rm -rf "$ROOT/.peers"
mv "$NEW" "$ROOT/.peers"
EXCLUDE="$(git -C "$ROOT" rev-parse --git-path info/exclude 2>/dev/null || true)"
case "$EXCLUDE" in /*) ;; ?*) EXCLUDE="$ROOT/$EXCLUDE" ;; esac
if [ -n "$EXCLUDE" ]; then
  mkdir -p "$(dirname "$EXCLUDE")"
  grep -qsx '/.peers/' "$EXCLUDE" || echo '/.peers/' >> "$EXCLUDE"
fi
du -sh "$ROOT/.peers"
