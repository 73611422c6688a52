"""Fake triton_kernels.tensor_details.layout (3.5.x): layouts are classes that convert_layout builds
with the shape of the data, Layout(shape, **kwargs). The two MX layouts are the fake's OWN
reversible tilings (not the real Hopper swizzles); the fake matmul reads them back with their
unswizzle_data."""

import torch


def _ceil(x, m):
    return -(-x // m) * m


class Layout:
    name = None

    def __init__(self, shape):
        self.initial_shape = list(shape)


class StridedLayout(Layout):
    def swizzle_data(self, data):
        return data

    def unswizzle_data(self, data):
        return data


class HopperMXValueLayout(Layout):
    """uint8 [E, K/2, N] packed along `mx_axis`: the packed axis goes last, rows are cut in tiles
    of 16 and bytes in tiles of 32, each (32 x 16) tile stored transposed with its nibbles swapped."""

    name = "HOPPER_VALUE"

    def __init__(self, shape, mx_axis, mma_version=3):
        super().__init__(shape)
        assert mx_axis in range(len(shape)) and len(shape) == 3
        self.mx_axis, self.mma_version = mx_axis, mma_version

    def _sizes(self):
        s = list(self.initial_shape)
        kb = s.pop(self.mx_axis)
        e, n = s
        return e, n, kb, _ceil(n, 16), _ceil(kb, 32)

    def swizzle_data(self, data):
        e, n, kb, n_p, kb_p = self._sizes()
        x = data.movedim(self.mx_axis, -1)  # [E, N, K/2]
        x = torch.nn.functional.pad(x, (0, kb_p - kb, 0, n_p - n))
        x = x.reshape(e, n_p // 16, 16, kb_p // 32, 32).permute(0, 3, 1, 4, 2).contiguous()
        x = (x << 4) | (x >> 4)
        return x.reshape(e, (kb_p // 32) * (n_p // 16), 512)

    def unswizzle_data(self, data):
        e, n, kb, n_p, kb_p = self._sizes()
        x = data.reshape(e, kb_p // 32, n_p // 16, 32, 16)
        x = (x << 4) | (x >> 4)
        x = x.permute(0, 2, 4, 1, 3).reshape(e, n_p, kb_p)[:, :n, :kb]
        return x.movedim(-1, self.mx_axis)


class HopperMXScaleLayout(Layout):
    """uint8 E8M0 [E, G, N] with groups along `mx_axis`: groups go last, N padded to
    2 * num_warps * 16 and G to 2, then stored [E, G, N/32, 32] with each run of 32 reversed."""

    name = "HOPPER_SCALE"

    def __init__(self, shape, mx_axis, num_warps=8):
        assert num_warps & (num_warps - 1) == 0, "warps_n must be a power of 2"
        super().__init__(shape)
        assert mx_axis in range(len(shape)) and len(shape) == 3
        self.mx_axis, self.num_warps = mx_axis, num_warps

    def _sizes(self):
        s = list(self.initial_shape)
        g = s.pop(self.mx_axis)
        e, n = s
        return e, n, g, _ceil(n, 32 * self.num_warps), _ceil(g, 2)

    def swizzle_data(self, data):
        e, n, g, n_p, g_p = self._sizes()
        x = data.movedim(self.mx_axis, -1)  # [E, N, G]
        x = torch.nn.functional.pad(x, (0, g_p - g, 0, n_p - n))
        return x.reshape(e, n_p // 32, 32, g_p).permute(0, 3, 1, 2).flip(-1).contiguous()

    def unswizzle_data(self, data):
        e, n, g, n_p, g_p = self._sizes()
        x = data.flip(-1).permute(0, 2, 3, 1).reshape(e, n_p, g_p)[:, :n, :g]
        return x.movedim(-1, self.mx_axis)
