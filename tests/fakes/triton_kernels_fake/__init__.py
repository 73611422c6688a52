"""Fake `triton_kernels` packages of two API generations, for CPU tests of qmoe's
`triton_kernels` backend.

  gen_3_5/triton_kernels   release/3.5.x, the copy vLLM 0.33 vendors: matmul_ogs, RoutingData from
                           routing.routing_from_bitmatrix, layouts as classes built with the shape
                           (convert_layout(tensor, cls, **kwargs)), PrecisionConfig.weight_scale,
                           reduction_n on FusedActivation, in-kernel top-k sum in the w2 GEMM.
  gen_3_8/triton_kernels   3.8 and later: matmul(a, b, ...), RaggedTensorMetadata from
                           tensor.make_ragged_tensor_metadata, shape-free layout instances
                           (mx_axis counted from the end), PrecisionConfig.b_mx_scale (block size
                           inferred from the shapes), reduction_n on FnSpecs, no top-k sum.
  vendored/vllm            vllm.third_party.triton_kernels: the gen_3_5 files under vLLM's name
                           (they import triton_kernels.* absolutely, as the vendored files do).

Each fake has the real signatures of the entry points qmoe calls and refuses positional calls
of them; its layouts are its OWN (simple reversible tilings and bit twiddles, different per
generation, not the real Hopper swizzles), and its kernels decode that layout with the fake's
own inverse and its own E2M1 / E8M0 tables (`_common`), never with qmoe's adapter, then compute
the MoE in fp32 torch. They check what the real ones need (bf16 activations, split_k=1 set,
scale K groups a multiple of 4 on 3.5, block size 32 inferred on 3.8, K-major weights) and
leave unwritten what the real kernels leave unwritten.

`sandbox()` hides every real triton_kernels / vllm for one test (imported modules dropped, new
imports answered only from installed fakes) and restores them afterwards; inside it,
`install(generation)` makes one fake importable.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
GENERATIONS = {"3.5": os.path.join(HERE, "gen_3_5"), "3.8": os.path.join(HERE, "gen_3_8"),
               "vendored": os.path.join(HERE, "vendored")}
_NAMES = ("triton_kernels", "vllm")


def _ours(name: str) -> bool:
    return any(name == n or name.startswith(n + ".") for n in _NAMES)


class _OnlyFakes:
    """Meta path finder: top-level triton_kernels / vllm come from the installed fakes or not at all."""

    def __init__(self):
        self.paths = []

    def find_spec(self, name, path=None, target=None):
        if name not in _NAMES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, self.paths)
        if spec is None:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by triton_kernels_fake.sandbox)", name=name)
        return spec


_finder: _OnlyFakes | None = None


@contextlib.contextmanager
def sandbox():
    """No real triton_kernels or vllm importable inside (their modules dropped, imports of them
    answered only from installed fakes); everything restored on exit. Yields `install`."""
    global _finder
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if _ours(k)}
    _finder = _OnlyFakes()
    sys.meta_path.insert(0, _finder)
    importlib.invalidate_caches()
    try:
        yield install
    finally:
        sys.meta_path.remove(_finder)
        _finder = None
        for k in [k for k in sys.modules if _ours(k)]:
            del sys.modules[k]
        sys.modules.update(saved)
        importlib.invalidate_caches()


def install(generation: str) -> str:
    """Make the fake of `generation` ("3.5", "3.8" or "vendored"; or any folder holding a
    package of those names) importable (inside `sandbox`) and clear the recorded calls.
    Returns its folder."""
    from . import _common

    path = GENERATIONS.get(generation, generation)
    _finder.paths.insert(0, path)
    _common.CALLS.clear()
    return path


def calls() -> list:
    """(entry point, details) of every fake kernel call since the last `install`."""
    from . import _common

    return _common.CALLS
