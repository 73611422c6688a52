"""The backend protocol every backend implements.

    name: str
    supports(spec, fmt, device) -> Support(ok, reason)   # never raises; says why not
    prepare(spec, weights) -> Prepared                    # once, at load
    forward(prepared, x, topk_ids, topk_weights, out, shared_output=None) -> out
                                                          # writes out; no host sync
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..spec import MoESpec
from ..weights import ExpertWeights


class Support(NamedTuple):
    """Whether a backend can run a (spec, format, device), and if not, why in words a user can act on."""

    ok: bool
    reason: str

    def __bool__(self):
        return self.ok


@dataclass(eq=False)
class Prepared:
    """A backend's own copy of the weights, made once by `prepare`.

    tensors: the backend's tensors by name (layout documented by that backend)
    meta: what made the layout (padding, block shapes, library versions); a layout is
          only valid for the meta it was made with
    """

    backend: str
    spec: MoESpec
    format: str
    device: torch.device
    tensors: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values() if isinstance(t, torch.Tensor))


class Backend:
    """Base class: subclasses set `name` and implement the three methods."""

    name: str = ""

    def supports(self, spec: MoESpec, fmt: str, device: torch.device | str) -> Support:
        raise NotImplementedError

    def prepare(self, spec: MoESpec, weights: ExpertWeights) -> Prepared:
        raise NotImplementedError

    def forward(self, prepared: Prepared, x: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor, out: torch.Tensor,
                shared_output: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self):
        return f"<qmoe backend {self.name}>"


def cuda_capability(device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device, or None for a non-CUDA device or no GPU."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)
