"""What the fake did, for the tests to read, and the switches that make its probes fail."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

_CUDA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cuda")


@dataclass
class State:
    compiles: list = field(default_factory=list)
    """("gemm" | "activation", key, kernels) per compiled table, in order."""
    calls: list = field(default_factory=list)
    """(name, details dict) per API call."""
    # switches for the toolchain probe
    cuda_env: str | None = _CUDA
    """Root of the CUDA environment filter_cuda_paths finds (None: none found)."""
    nvrtc: bool = True
    compiler: str = "NVRTCCompiler"
    nvcc: bool = False
    pdl_rows: int = 0
    """Row counts up to this launch the activation kernel with PDL (0: never, as on SM90)."""

    def calls_of(self, name: str) -> list:
        return [d for n, d in self.calls if n == name]


STATE = State()
