"""Fake triton_kernels.tensor_details.layout (3.8+): shape-free layout instances (mx_axis counted
from the end of the logical shape) that make a transformation for a given shape. The two MX
layouts are the fake's OWN reversible transforms, different from the 3.5 fake's."""

from dataclasses import dataclass

import torch


def _ceil(x, m):
    return -(-x // m) * m


class Layout:
    name = None


@dataclass(frozen=True)
class StridedLayout(Layout):
    major_dim: int = -1

    def make_transformation(self, shape, is_fp4=False):
        return _Identity()


class _Identity:
    def swizzle_data(self, data):
        return data

    def unswizzle_data(self, data):
        return data


@dataclass(frozen=True)
class HopperMXValueLayout(Layout):
    mx_axis: int
    mma_version: int

    def __post_init__(self):
        assert self.mx_axis in (-1, -2) and self.mma_version in (2, 3)

    @property
    def name(self):
        return "HOPPER_VALUE"

    def make_transformation(self, shape, is_fp4):
        return _ValueTransformation(list(shape), self.mx_axis)


@dataclass(frozen=True)
class HopperMXScaleLayout(Layout):
    mx_axis: int
    num_warps: int

    @property
    def name(self):
        return "HOPPER_MX_SCALE"

    def make_transformation(self, shape):
        return _ScaleTransformation(list(shape), self.mx_axis)


class _ValueTransformation:
    """Logical [E, K, N] FP4 stored as uint8 [E, K/2, N] packed along mx_axis: the packed axis goes
    last, N padded to 8 and bytes to 16, rows reversed inside each run of 8, every bit inverted."""

    def __init__(self, shape, mx_axis):
        self.axis = mx_axis % len(shape)
        e, k, n = shape
        rows, kb = (n, k // 2) if self.axis == 1 else (k, n // 2)
        self.e, self.n, self.kb = e, rows, kb
        self.n_p, self.kb_p = _ceil(n, 8), _ceil(kb, 16)

    def swizzle_data(self, data):
        x = data.movedim(self.axis, -1)  # [E, N, K/2]
        x = torch.nn.functional.pad(x, (0, self.kb_p - self.kb, 0, self.n_p - self.n))
        x = x.reshape(self.e, self.n_p // 8, 8, self.kb_p).flip(2) ^ 0xFF
        return x.reshape(self.e, self.n_p, self.kb_p).contiguous()

    def unswizzle_data(self, data):
        x = (data.reshape(self.e, self.n_p // 8, 8, self.kb_p) ^ 0xFF).flip(2)
        return x.reshape(self.e, self.n_p, self.kb_p)[:, :self.n, :self.kb].movedim(-1, self.axis)


class _ScaleTransformation:
    """[E, G, N] with groups along mx_axis: groups go last, G padded to 2, N rolled by 3."""

    def __init__(self, shape, mx_axis):
        self.axis = mx_axis % len(shape)
        self.shape = shape

    def swizzle_data(self, data):
        x = data.movedim(self.axis, -1)
        g = x.shape[-1]
        x = torch.nn.functional.pad(x, (0, _ceil(g, 2) - g))
        return torch.roll(x, shifts=3, dims=1).contiguous()

    def unswizzle_data(self, data):
        x = torch.roll(data, shifts=-3, dims=1)
        g = self.shape[self.axis]
        return x[..., :g].movedim(-1, self.axis)
