# Sourced on the GPU machine (qualify.sh does; so can a call's own script): where a Triton packed by
# scripts/dev/pack_triton.sh was carried (.triton/triton.tar.xz), unpack it once to /tmp/triton_pack
# and put it first on PYTHONPATH, with the environment it needs there (the machine's CUDA ptxas, and
# Triton's in-tree backend discovery: the machine's own Triton registers an AMD backend the pack lacks).
# FP fusion stays on, as 3.6 has it (3.9 warns that its default changes in 3.10). Without the pack
# it does nothing.
if [ -f .triton/triton.tar.xz ]; then
  [ -d /tmp/triton_pack/triton ] || { mkdir -p /tmp/triton_pack && tar xJf .triton/triton.tar.xz -C /tmp/triton_pack; }
  PTXAS=$(command -v ptxas || echo /usr/local/cuda/bin/ptxas)
  export PYTHONPATH=/tmp/triton_pack${PYTHONPATH:+:$PYTHONPATH} TRITON_BACKENDS_IN_TREE=1 TRITON_PTXAS_PATH=$PTXAS \
    TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1} \
    TRITON_PTXAS_BLACKWELL_PATH=$PTXAS
  echo "triton_pack: triton $(cat /tmp/triton_pack/triton/PACKED_VERSION) from .triton/ (ptxas $PTXAS)"
fi
