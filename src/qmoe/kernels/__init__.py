"""qmoe's Triton kernels: bodies and host entries only (no policy, no I/O, no other qmoe
imports). Importing this package does not import Triton; its modules do.

    interpreted()   whether Triton runs kernels on the CPU through its interpreter
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


__all__ = ["interpreted"]
