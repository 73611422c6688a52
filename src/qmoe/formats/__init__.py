"""Weight formats: the one home of format facts, and one public pair, `quantize(x, fmt)` and
`dequantize(q)`.

| format | element | block along K | scale                      | extra                 |
| ------ | ------- | ------------- | -------------------------- | --------------------- |
| mxfp4  | E2M1    | 32            | E8M0 (uint8), 0xFF = NaN   | -                     |
| nvfp4  | E2M1    | 16            | float8_e4m3fn              | fp32 global per matrix|
| int4   | int4    | 32            | bf16, symmetric            | -                     |
| bf16   | bf16    | -             | -                          | unquantized           |

Every format quantizes along the LAST dimension; packed data holds two 4-bit
codes per byte, low nibble = even element. `format_info(fmt)` gives these facts as data.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from . import bf16 as _bf16
from . import int4 as _int4
from . import mxfp4 as _mxfp4
from . import nvfp4 as _nvfp4

_MODULES = {"mxfp4": _mxfp4, "nvfp4": _nvfp4, "int4": _int4, "bf16": _bf16}
FORMATS = tuple(_MODULES)
"""Names of the supported formats."""

QUANTIZED_FORMATS = ("mxfp4", "nvfp4", "int4")
"""The 4-bit formats (two codes per byte)."""


@dataclass(frozen=True)
class FormatInfo:
    """The facts of one weight format.

    element: "e2m1" | "int4" | "bf16"; block: elements per scale along K (1 for bf16);
    scale: "e8m0" | "e4m3" | "bf16" | None; scale_dtype: the torch dtype scales are stored in;
    global_scale: one fp32 scale per matrix on top of the block scales (nvfp4);
    bits_per_weight: storage cost including scales.
    """

    name: str
    element: str
    block: int
    scale: str | None
    scale_dtype: torch.dtype | None
    global_scale: bool
    bits_per_weight: float


_INFO = {
    "mxfp4": FormatInfo("mxfp4", "e2m1", 32, "e8m0", torch.uint8, False, 4.25),
    "nvfp4": FormatInfo("nvfp4", "e2m1", 16, "e4m3", torch.float8_e4m3fn, True, 4.5),
    "int4": FormatInfo("int4", "int4", 32, "bf16", torch.bfloat16, False, 4.5),
    "bf16": FormatInfo("bf16", "bf16", 1, None, None, False, 16.0),
}


def format_info(fmt: str) -> FormatInfo:
    """The facts of format `fmt` (ValueError naming the known formats otherwise)."""
    _module(fmt)
    return _INFO[fmt]


def block_size(fmt: str) -> int:
    """Elements per scale along K (1 for bf16)."""
    return format_info(fmt).block


def _module(fmt: str):
    if not isinstance(fmt, str) or fmt not in _MODULES:
        raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    return _MODULES[fmt]


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A tensor quantized along its last dimension.

    format: "mxfp4" | "nvfp4" | "int4" | "bf16"
    shape: the logical shape [..., K]
    data: [..., K/2] uint8, two codes per byte, low nibble = even element
          (for "bf16": the [..., K] bf16 tensor itself)
    scales: [..., K/block] uint8 E8M0 (mxfp4) | float8_e4m3fn (nvfp4) | bf16 (int4); None for bf16
    global_scale: fp32 [shape[:-2]] for nvfp4 (one per matrix), else None
    """

    format: str
    shape: tuple
    data: torch.Tensor
    scales: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None

    def __post_init__(self):
        mod = _module(self.format)
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if not self.shape or self.shape[-1] % mod.BLOCK:
            raise ValueError(f"shape: expected [..., K] with K a multiple of {mod.BLOCK} for {self.format}, "
                             f"got {list(self.shape)}")
        lead, K = self.shape[:-1], self.shape[-1]
        if self.format == "bf16":
            _expect_tensor("data", self.data, self.shape, torch.bfloat16)
            if self.scales is not None or self.global_scale is not None:
                raise ValueError("scales: expected None for bf16 (unquantized), got a tensor")
            return
        _expect_tensor("data", self.data, (*lead, K // 2), torch.uint8)
        _expect_tensor("scales", self.scales, (*lead, K // mod.BLOCK), mod.SCALE_DTYPE)
        if self.format == "nvfp4":
            _expect_tensor("global_scale", self.global_scale, tuple(self.shape[:-2]), torch.float32)
        elif self.global_scale is not None:
            raise ValueError(f"global_scale: expected None for {self.format}, got a tensor")
        for name in ("scales", "global_scale"):
            t = getattr(self, name)
            if t is not None and t.device != self.data.device:
                raise ValueError(f"{name}: expected device {self.data.device} (where data is), got {t.device}")

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        """Bytes of data + scales + global scale."""
        n = self.data.numel() * self.data.element_size()
        for t in (self.scales, self.global_scale):
            if t is not None:
                n += t.numel() * t.element_size()
        return n

    def to(self, device) -> "QuantizedTensor":
        move = (lambda t: None if t is None else t.to(device))
        return QuantizedTensor(self.format, self.shape, move(self.data), move(self.scales),
                               move(self.global_scale))

    def __getitem__(self, index) -> "QuantizedTensor":
        """Index the leading (matrix-batch) dimensions only, e.g. `w13[e]` for one expert."""
        if len(self.shape) < 3:
            raise IndexError("QuantizedTensor: only tensors of 3 or more dimensions can be indexed "
                             "(the last two are the quantized matrix)")
        if not isinstance(index, slice):
            try:
                index = operator.index(index)  # int, numpy int, 0-d integer tensor
            except TypeError:
                raise IndexError(f"QuantizedTensor: index with an int or a slice, "
                                 f"got {type(index).__name__}") from None
        data = self.data[index]
        scales = None if self.scales is None else self.scales[index]
        gs = None if self.global_scale is None else self.global_scale[index]
        lead = torch.empty(self.shape[0], device="meta")[index].shape
        return QuantizedTensor(self.format, (*lead, *self.shape[1:]), data, scales, gs)


def _expect_tensor(name, t, shape, dtype):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a {dtype} tensor of shape {list(shape)}, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        raise ValueError(f"{name}: expected {dtype} of shape {list(shape)}, "
                         f"got {t.dtype} of shape {list(t.shape)}")


def quantize(x: torch.Tensor, fmt: str) -> QuantizedTensor:
    """Quantize x along its last dimension.

    x: [..., K] float (fp32, fp16 or bf16); K must be a multiple of the format's block
    (32 for mxfp4 and int4, 16 for nvfp4). Rounds to nearest, never clips.
    Works one leading slice at a time for 3-D and larger inputs, so temporaries stay
    small (one expert at a time for [E, N, K] weights).
    """
    mod = _module(fmt)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x: expected a floating-point tensor, got "
                         f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] % mod.BLOCK:
        raise ValueError(f"x: {fmt} quantizes the last dimension in blocks of {mod.BLOCK}; "
                         f"got shape {list(x.shape)} (pad the last dimension to a multiple of {mod.BLOCK})")
    if fmt == "bf16":
        return QuantizedTensor("bf16", tuple(x.shape), x.to(torch.bfloat16).contiguous())
    if fmt == "nvfp4" and x.dim() < 2:
        raise ValueError(f"x: nvfp4 needs a matrix (one global scale per matrix), got shape {list(x.shape)}")
    if x.numel() == 0:
        return _empty(x.shape, fmt, x.device)
    if x.dim() >= 3:
        parts = [quantize(x[i], fmt) for i in range(x.shape[0])]
        data = torch.stack([p.data for p in parts])
        scales = torch.stack([p.scales for p in parts])
        gs = torch.stack([p.global_scale for p in parts]) if fmt == "nvfp4" else None
        return QuantizedTensor(fmt, tuple(x.shape), data, scales, gs)
    out = mod.quantize(x)
    gs = out[2] if fmt == "nvfp4" else None
    return QuantizedTensor(fmt, tuple(x.shape), out[0].contiguous(), out[1].contiguous(), gs)


def _empty(shape, fmt: str, device) -> QuantizedTensor:
    """The quantized form of an empty tensor (some dimension is 0)."""
    info = format_info(fmt)
    lead, K = tuple(shape[:-1]), shape[-1]
    data = torch.empty(*lead, K // 2, dtype=torch.uint8, device=device)
    scales = torch.empty(*lead, K // info.block, dtype=info.scale_dtype, device=device)
    gs = torch.ones(tuple(shape[:-2]), dtype=torch.float32, device=device) if info.global_scale else None
    return QuantizedTensor(fmt, tuple(shape), data, scales, gs)


def dequantize(q: QuantizedTensor) -> torch.Tensor:
    """QuantizedTensor -> float32 tensor of its logical shape (NaN scales give NaN blocks)."""
    if not isinstance(q, QuantizedTensor):
        raise ValueError(f"q: expected a QuantizedTensor, got {type(q).__name__}")
    if q.format == "bf16":
        return q.data.float()
    return _module(q.format).dequantize(q.data, q.scales, q.global_scale)


__all__ = ["FORMATS", "FormatInfo", "QUANTIZED_FORMATS", "QuantizedTensor", "block_size", "dequantize",
           "format_info", "quantize"]
