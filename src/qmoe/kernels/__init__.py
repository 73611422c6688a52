"""qmoe's Triton kernels: bodies and host entries only (no policy, no I/O, no other qmoe
imports). Importing this package does not import Triton; its modules do.

    interpreted()               whether Triton runs kernels on the CPU through its interpreter
    register_wgmma_hazard(v)    why Triton version v may race on wgmma register operands, or None
    sm_count(device)            multiprocessors of a CUDA device (1 elsewhere)
"""

from __future__ import annotations

import os

_TRUE = ("1", "true", "on", "yes", "y")


def interpreted() -> bool:
    """True when TRITON_INTERPRET asks Triton for its interpreter, read by Triton's own rule
    (the installed Triton's knob when it has one; else 1 / true / on / yes / y, any case)."""
    try:
        import triton

        return bool(triton.knobs.runtime.interpret)
    except Exception:  # no triton, or one without knobs: the same rule by hand
        return os.environ.get("TRITON_INTERPRET", "").lower() in _TRUE


REGISTER_WGMMA_FIXED = (3, 9)
"""The first Triton release known to carry the fix of triton-lang/triton#9433 (a wgmma whose first
operand is in registers may still be reading them when the next loop iteration overwrites them:
Triton waited for all but the last n - 1 of n pipelined wgmmas). Checked on the PTX of qmoe's
weight-first GEMM2 (nvfp4, 128 x 64, 3 stages) compiled for sm_90: Triton 3.6 waits for all but 3
of its 4 wgmmas and copies no register operand; 3.9 copies each before `wgmma.fence` and waits for
all but 1. 3.7 and 3.8 were not checked (docs/performance.md, session 16)."""


def register_wgmma_hazard(version: str) -> str | None:
    """Why Triton `version` (e.g. "3.6.0") may race on wgmma register operands on Hopper, or None
    where it is known to carry the fix (REGISTER_WGMMA_FIXED) or the version does not parse."""
    try:
        major, minor = (int(p) for p in version.split(".")[:2])
    except ValueError:
        return None
    if (major, minor) >= REGISTER_WGMMA_FIXED:
        return None
    fixed = ".".join(map(str, REGISTER_WGMMA_FIXED))
    return (f"Triton {version} may predate the fix of a race on wgmma register operands "
            f"(triton-lang/triton#9433; {fixed} has it): of qmoe's kernels, the nvfp4 weight-first ones at "
            f"k_unroll 2 (the shipped entries of qwen3-30b-a3b at M = 1 and from 256, deepseek-v3 from 1024) "
            f"leave wgmmas in flight over them (mxfp4 and int4 wait for every wgmma); every bitwise check of "
            f"the shipped ones has passed on an H200, but one kernel variant showed the race "
            f"(docs/performance.md, sessions 16-17)")


def sm_count(device) -> int:
    """Multiprocessors of a CUDA device, 1 for any other device (the interpreter, fake op libraries
    in tests): what grids and workspaces sized per SM multiply."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


__all__ = ["REGISTER_WGMMA_FIXED", "interpreted", "register_wgmma_hazard", "sm_count"]
