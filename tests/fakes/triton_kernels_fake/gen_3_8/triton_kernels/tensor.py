"""Fake triton_kernels.tensor (3.8+): wrappers, FP4, wrap_torch_tensor / convert_layout with the
later signatures (a layout instance that makes a transformation) and the ragged metadata."""

from dataclasses import dataclass

import torch

from .tensor_details.layout import StridedLayout


@dataclass(frozen=True)
class DataType:
    bitwidth: int


FP4 = DataType(4)


@dataclass
class Storage:
    data: torch.Tensor
    layout: object = None

    def __post_init__(self):
        if self.layout is None:
            self.layout = StridedLayout()


@dataclass
class Tensor:
    storage: Storage
    dtype: object = None
    shape: list | None = None
    shape_max: list | None = None

    def __post_init__(self):
        if self.dtype is None:
            self.dtype = self.storage.data.dtype
        if self.shape is None:
            self.shape = list(self.storage.data.shape)
        if self.shape_max is None:
            self.shape_max = list(self.shape)

    @property
    def device(self):
        return self.storage.data.device

    def stride(self, i=None):
        return self.storage.data.stride() if i is None else self.storage.data.stride(i)


def wrap_torch_tensor(torch_tensor, dtype=None, shape=None, shape_max=None, layout=None):
    if shape is None:
        shape = list(torch_tensor.shape)
        if dtype is FP4:
            shape[torch_tensor.stride().index(1)] *= 2
    if layout is None:
        major = torch_tensor.stride().index(1) if 1 in torch_tensor.stride() else torch_tensor.ndim - 1
        layout = StridedLayout(major_dim=major - torch_tensor.ndim)
    return Tensor(Storage(torch_tensor, layout), dtype=dtype or torch_tensor.dtype, shape=shape, shape_max=shape_max)


def convert_layout(tensor: Tensor, layout, **layout_transformation_kwargs):
    shape = list(tensor.shape)
    is_fp4 = tensor.dtype is FP4
    if is_fp4:
        canonical = tensor.storage.layout.make_transformation(shape, is_fp4).unswizzle_data(tensor.storage.data)
        new = layout.make_transformation(shape, is_fp4, **layout_transformation_kwargs).swizzle_data(canonical)
    else:
        canonical = tensor.storage.layout.make_transformation(shape).unswizzle_data(tensor.storage.data)
        new = layout.make_transformation(shape, **layout_transformation_kwargs).swizzle_data(canonical)
    return Tensor(Storage(new, layout), dtype=tensor.dtype, shape=shape)


@dataclass
class RaggedTensorMetadata:
    """slice_sizes [n_slices] int32 (rows per expert), slice_offs [n_slices + 1] int32."""

    slice_sizes: torch.Tensor
    slice_offs: torch.Tensor

    @property
    def n_slices(self):
        return self.slice_sizes.shape[0]


def make_ragged_tensor_metadata(slice_sizes, n_total_rows):
    assert slice_sizes.ndim == 1 and slice_sizes.dtype == torch.int32
    assert int(slice_sizes.sum()) == n_total_rows, "slice sizes must cover every row"
    offs = torch.cat((slice_sizes.new_zeros(1), torch.cumsum(slice_sizes, 0).to(torch.int32)))
    return RaggedTensorMetadata(slice_sizes, offs)
