"""Fake triton_kernels.tensor (3.5.x): Storage / Tensor wrappers, FP4, the Bitmatrix of routing,
wrap_torch_tensor and convert_layout with 3.5.x's signatures."""

from dataclasses import dataclass, fields

import torch

from .tensor_details.layout import StridedLayout


@dataclass
class IntegerType:
    bitwidth: int


@dataclass
class FloatType:
    bitwidth_exponent: int
    bitwidth_mantissa: int
    is_signed: bool

    @property
    def bitwidth(self):
        return int(self.is_signed) + self.bitwidth_exponent + self.bitwidth_mantissa


BIT = IntegerType(1)
FP4 = FloatType(bitwidth_exponent=2, bitwidth_mantissa=1, is_signed=True)


def bitwidth(dtype):
    return dtype.itemsize * 8 if isinstance(dtype, torch.dtype) else dtype.bitwidth


@dataclass
class Storage:
    data: torch.Tensor
    layout: object = None

    def __post_init__(self):
        assert isinstance(self.data, torch.Tensor)
        if self.layout is None:
            self.layout = StridedLayout(self.data.shape)


@dataclass
class Tensor:
    storage: Storage
    dtype: object = None
    shape: list | None = None
    shape_max: list | None = None

    def __post_init__(self):
        if isinstance(self.storage, torch.Tensor):
            self.storage = Storage(self.storage)
        if self.dtype is None:
            self.dtype = self.storage.data.dtype
        if self.shape is None:
            self.shape = list(self.storage.data.shape)
        if self.shape_max is None:
            self.shape_max = list(self.shape)
        self.shape_max = [s if m is None else m for s, m in zip(self.shape, self.shape_max)]

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def device(self):
        return self.storage.data.device

    @property
    def data(self):
        return self.storage.data


class Bitmatrix(Tensor):
    """Packed booleans: bit j % 32 of word j // 32 in row i (uint32 storage)."""

    def __init__(self, storage, shape, shape_max=None, scratchpad=None):
        super().__init__(storage, dtype=BIT, shape=shape, shape_max=shape_max)
        self.scratchpad = scratchpad


def wrap_torch_tensor(torch_tensor, dtype=None):
    if dtype is None:
        dtype = torch_tensor.dtype
    shape = list(torch_tensor.shape)
    shape[torch_tensor.stride().index(1)] *= bitwidth(torch_tensor.dtype) // bitwidth(dtype)
    return Tensor(Storage(torch_tensor), dtype=dtype, shape=shape)


def convert_layout(tensor: Tensor, layout_cls, **layout_kwargs):
    assert isinstance(tensor, Tensor)
    old = tensor.storage.layout.unswizzle_data(tensor.storage.data)
    layout = layout_cls(old.shape, **layout_kwargs)
    attrs = {f.name: getattr(tensor, f.name) for f in fields(tensor) if f.name != "storage"}
    return Tensor(Storage(layout.swizzle_data(old), layout), **attrs)
