"""Canonical expert weights (the one layout every backend prepares from) and checkpoint importers.

w13: [E, 2I, H] rows 0..I-1 = gate (w1), rows I..2I-1 = up (w3); w2: [E, H, I];
both quantized along their last (K) dimension. Optional fp32 biases b13 [E, 2I], b2 [E, H].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats import QuantizedTensor, dequantize, quantize


@dataclass(frozen=True, eq=False)
class ExpertWeights:
    """Canonical quantized expert weights.

    w13: QuantizedTensor [E, 2I, H] (rows: gate then up)
    w2:  QuantizedTensor [E, H, I]
    b13: float32 [E, 2I] or None
    b2:  float32 [E, H] or None
    """

    w13: QuantizedTensor
    w2: QuantizedTensor
    b13: torch.Tensor | None = None
    b2: torch.Tensor | None = None

    def __post_init__(self):
        for name in ("w13", "w2"):
            q = getattr(self, name)
            if not isinstance(q, QuantizedTensor) or len(q.shape) != 3:
                got = type(q).__name__
                if hasattr(q, "shape"):
                    got += f" of shape {list(q.shape)}"
                raise ValueError(f"{name}: expected a 3-D QuantizedTensor, got {got}")
        E, two_i, H = self.w13.shape
        if two_i % 2:
            raise ValueError(f"w13: expected [E, 2I, H] with an even row count, got {list(self.w13.shape)}")
        if self.w2.shape != (E, H, two_i // 2):
            raise ValueError(f"w2: expected shape [{E}, {H}, {two_i // 2}] to match w13 {list(self.w13.shape)}, "
                             f"got {list(self.w2.shape)}")
        if self.w13.format != self.w2.format:
            raise ValueError(f"w2: expected format {self.w13.format} like w13, got {self.w2.format}")
        if self.w13.device != self.w2.device:
            raise ValueError(f"w2: expected device {self.w13.device} like w13, got {self.w2.device}")
        for name, shape in (("b13", (E, two_i)), ("b2", (E, H))):
            b = getattr(self, name)
            if b is None:
                continue
            if not isinstance(b, torch.Tensor) or tuple(b.shape) != shape or b.dtype != torch.float32:
                got = f"{b.dtype} {list(b.shape)}" if isinstance(b, torch.Tensor) else type(b).__name__
                raise ValueError(f"{name}: expected float32 of shape {list(shape)}, got {got}")
            if b.device != self.w13.device:
                raise ValueError(f"{name}: expected device {self.w13.device}, got {b.device}")

    @property
    def format(self) -> str:
        return self.w13.format

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.w13.shape[2]

    @property
    def intermediate_size(self) -> int:
        return self.w13.shape[1] // 2

    @property
    def device(self) -> torch.device:
        return self.w13.device

    @property
    def has_bias(self) -> bool:
        return self.b13 is not None or self.b2 is not None

    @property
    def nbytes(self) -> int:
        n = self.w13.nbytes + self.w2.nbytes
        for b in (self.b13, self.b2):
            if b is not None:
                n += b.numel() * b.element_size()
        return n

    def expert_nbytes(self) -> int:
        """Bytes of one expert's quantized weights and scales (biases excluded)."""
        return (self.w13.nbytes + self.w2.nbytes) // self.num_experts

    def to(self, device) -> "ExpertWeights":
        move = (lambda t: None if t is None else t.to(device))
        return ExpertWeights(self.w13.to(device), self.w2.to(device), move(self.b13), move(self.b2))

    def dequantize_expert(self, e: int):
        """One expert's float32 weights: (w13 [2I, H], w2 [H, I])."""
        return dequantize(self.w13[e]), dequantize(self.w2[e])

    @classmethod
    def from_float(cls, w13: torch.Tensor, w2: torch.Tensor, fmt: str,
                   b13: torch.Tensor | None = None, b2: torch.Tensor | None = None) -> "ExpertWeights":
        """Quantize float weights.

        w13: [E, 2I, H] float, rows [gate; up]; w2: [E, H, I] float;
        b13: [E, 2I] / b2: [E, H] any float dtype (stored as fp32), or None.
        """
        for name, t, dims in (("w13", w13, "[E, 2I, H]"), ("w2", w2, "[E, H, I]")):
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or not t.is_floating_point():
                got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name}: expected a float tensor {dims}, got {got}")
        fb = (lambda b: None if b is None else b.float().contiguous())
        return cls(quantize(w13, fmt), quantize(w2, fmt), fb(b13), fb(b2))


from .gpt_oss import load_gpt_oss, save_gpt_oss  # noqa: E402  (importers need ExpertWeights)
from .compressed_tensors import load_compressed_tensors, save_compressed_tensors  # noqa: E402
from .modelopt import load_modelopt_nvfp4, save_modelopt_nvfp4  # noqa: E402
from .layout import deinterleave_gate_up, interleave_gate_up  # noqa: E402
from .synthetic import random_weights  # noqa: E402

__all__ = ["ExpertWeights", "deinterleave_gate_up", "interleave_gate_up", "load_compressed_tensors", "load_gpt_oss",
           "load_modelopt_nvfp4", "random_weights", "save_compressed_tensors", "save_gpt_oss", "save_modelopt_nvfp4"]
