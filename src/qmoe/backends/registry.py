"""Every backend qmoe knows: name -> the module that defines it (imported on first use).

External libraries are imported only when a backend is asked about, never when qmoe is
imported, so a broken optional package cannot take qmoe down.
"""

from __future__ import annotations

import importlib

from .base import Backend

MODULES = {
    "reference": "qmoe.backends.reference",
    "triton": "qmoe.backends.triton",
    "triton_kernels": "qmoe.backends.triton_kernels",
    "marlin": "qmoe.backends.marlin",
    "humming": "qmoe.backends.humming",
    "flashinfer_cutlass": "qmoe.backends.flashinfer.cutlass",
    "flashinfer_trtllm": "qmoe.backends.flashinfer.trtllm",
    "flashinfer_cutedsl": "qmoe.backends.flashinfer.cutedsl",
}
"""Backend name -> module whose BACKEND attribute is the backend object."""

BACKEND_NAMES = tuple(MODULES)
"""Every backend name, in the order `qmoe env` and the commands list them."""


def get_backend(name: str) -> Backend:
    """The backend object of that name: a qmoe backend name, or "module:attr" naming any object
    that follows the backend protocol (out-of-tree backends, a backend in another mode such as
    "qmoe.backends.triton:INVARIANT", tests).

    ValueError naming the known backends for an unknown name, or saying what failed to
    import (a missing optional dependency of that backend's module, say).
    """
    if ":" in name:
        mod, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"backend: cannot load {name!r} ({type(e).__name__}: {e})") from e
    if name not in MODULES:
        raise ValueError(f"backend: expected one of {', '.join(BACKEND_NAMES)} or 'auto', got {name!r}")
    try:
        return importlib.import_module(MODULES[name]).BACKEND
    except ImportError as e:
        raise ValueError(f"backend: {name} is not available here ({type(e).__name__}: {e})") from e


__all__ = ["BACKEND_NAMES", "MODULES", "get_backend"]
