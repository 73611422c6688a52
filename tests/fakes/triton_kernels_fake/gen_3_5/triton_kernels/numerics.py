"""Fake triton_kernels.numerics (3.5.x): the flex-point descriptor the MXFP4 path passes empty."""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class InFlexData:
    dtype: torch.dtype | None = None
    scale: torch.Tensor | None = None
