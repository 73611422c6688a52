"""Backends behind one protocol (see `base`). External libraries are imported only when
a backend is asked about, never when qmoe is imported."""

from __future__ import annotations

import importlib

from .base import Backend, Prepared, Support, cuda_capability

BACKEND_NAMES = ("reference", "triton", "flashinfer_cutlass", "flashinfer_trtllm", "flashinfer_cutedsl")
"""Every backend qmoe knows, in the order `qmoe env` lists them."""


def get_backend(name: str) -> Backend:
    """The backend object of that name (ValueError naming the known ones otherwise)."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend: expected one of {', '.join(BACKEND_NAMES)} or 'auto', got {name!r}")
    try:
        return importlib.import_module(f".{name}", __name__).BACKEND
    except ImportError as e:  # a missing dependency of that backend: say so, in the usual form
        raise ValueError(f"backend: {name} is not available here ({type(e).__name__}: {e})") from e


__all__ = ["BACKEND_NAMES", "Backend", "Prepared", "Support", "cuda_capability", "get_backend"]
