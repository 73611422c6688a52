"""Fake FlashInfer weight layouts: each an invertible transform with its inverse beside it.

The fakes' layout helpers (what qmoe calls in prepare) apply the forward transform; the
fake kernels apply the inverse and then compute the MoE in torch. A layout made by one
generation and read by another decodes to wrong weights, as on the real package.
"""

import torch


# --- SM90 mixed-GEMM interleave (two generations, as in FlashInfer 0.6.10+) -------------------
def sm90_weights(w: torch.Tensor, gen: int) -> torch.Tensor:
    """w: [E, N, K/2] uint8. gen 1: bytes reversed in groups of 8 along K; gen 2: rows r and
    r+8 swapped in each 16-row block and the two nibbles of every byte swapped."""
    E, N, kb = w.shape
    if N % 16 or (2 * kb) % 64:
        raise RuntimeError(f"weight n dimension must be divisible by 16 and K by 64, got n={N}, K={2 * kb}")
    if gen == 1:
        return w.reshape(E, N, kb // 8, 8).flip(-1).reshape(E, N, kb).contiguous()
    rows = w.reshape(E, N // 16, 2, 8, kb).flip(2).reshape(E, N, kb)
    return ((rows >> 4) | (rows << 4)).contiguous()


def sm90_weights_inverse(w: torch.Tensor, gen: int) -> torch.Tensor:
    return sm90_weights(w, gen)  # both generations are involutions


def sm90_scales(s: torch.Tensor, gen: int) -> torch.Tensor:
    """s: [E, rows, K/32] uint8 -> gen 1: [E, K/128, rows*4]; gen 2: [E, rows/64, K/128, 16, 16]
    (the shapes FlashInfer's two scale interleaves produce)."""
    E, rows, kg = s.shape
    if kg % 4:
        raise ValueError(f"K/group_size={kg} must be divisible by interleave factor 4")
    if gen == 1:
        return s.reshape(E, rows, kg // 4, 4).permute(0, 2, 1, 3).contiguous().reshape(E, kg // 4, rows * 4)
    if rows % 64:
        raise ValueError(f"scale rows={rows} must be divisible by 64")
    return (s.reshape(E, rows // 64, 4, 16, kg // 4, 4).permute(0, 1, 4, 3, 2, 5).contiguous()
            .reshape(E, rows // 64, kg // 4, 16, 16))


def sm90_scales_inverse(t: torch.Tensor, gen: int, rows: int, kg: int) -> torch.Tensor:
    E = t.shape[0]
    if gen == 1:
        return t.reshape(E, kg // 4, rows, 4).permute(0, 2, 1, 3).reshape(E, rows, kg)
    return t.reshape(E, rows // 64, kg // 4, 16, 4, 4).permute(0, 1, 4, 3, 2, 5).reshape(E, rows, kg)


# --- trtllm-gen row shuffles ---------------------------------------------------------------------
def _tile_shuffle(n: int, num_elts_per_sf) -> torch.Tensor:
    """A row permutation of n rows within tiles of 16 that differs per num_elts_per_sf."""
    if n % 16:
        raise AssertionError(f"rows must be a multiple of 16, got {n}")
    r = torch.arange(n).reshape(-1, 16)
    if num_elts_per_sf is None:
        r = r.flip(1)
    elif num_elts_per_sf == 16:
        r = r.roll(5, dims=1)
    elif num_elts_per_sf == 32:
        r = r.roll(11, dims=1)
    else:
        raise AssertionError(f"num_elts_per_sf must be 16 or 32, got {num_elts_per_sf}")
    return r.reshape(n)


def w3w1_rows(n: int, num_elts_per_sf=None, gated=True) -> torch.Tensor:
    """Row indices: gated rows [r0, r_n/2, r1, r_n/2+1, ...] then a tile shuffle."""
    if gated:
        base = torch.stack((torch.arange(n // 2), torch.arange(n // 2, n)), dim=1).reshape(n)
    else:
        base = torch.arange(n)
    return base[_tile_shuffle(n, num_elts_per_sf)]


def w2_rows(n: int, num_elts_per_sf=None) -> torch.Tensor:
    return _tile_shuffle(n, num_elts_per_sf)


def unpermute_rows(t: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Inverse of t_orig[perm] along dim 0."""
    out = torch.empty_like(t)
    out[perm] = t
    return out


def block_swizzle(s: torch.Tensor) -> torch.Tensor:
    """[rows, cols] or [E, rows, cols] -> flat, column-major per matrix (rows % 128 == 0)."""
    mats = s if s.dim() == 3 else s.unsqueeze(0)
    if mats.shape[1] % 128:
        raise AssertionError(f"fake block_scale_interleave wants rows % 128 == 0, got {mats.shape[1]}")
    return mats.transpose(1, 2).contiguous().reshape(-1)


def block_unswizzle(flat: torch.Tensor, E: int, rows: int, cols: int) -> torch.Tensor:
    return flat.reshape(E, cols, rows).transpose(1, 2)


def to_blocks(t: torch.Tensor, block: int) -> torch.Tensor:
    """[M, K] -> [K/block, M, block] (FlashInfer's convert_to_block_layout shape)."""
    M, K = t.shape
    return t.reshape(M, K // block, block).permute(1, 0, 2).contiguous()


def from_blocks(t: torch.Tensor) -> torch.Tensor:
    nb, M, b = t.shape
    return t.permute(1, 0, 2).reshape(M, nb * b)


# --- CuTe-DSL layouts ------------------------------------------------------------------------------
def interleave_linear_gate(x: torch.Tensor, group: int, dim: int) -> torch.Tensor:
    """Rows [L; G] along dim -> [L0, G0, L1, G1, ...] in groups of `group` rows."""
    dim = dim % x.dim()
    n = x.shape[dim]
    if n % (2 * group):
        raise AssertionError(f"size {n} not a multiple of {2 * group}")
    pre, post = x.shape[:dim], x.shape[dim + 1:]
    return x.reshape(*pre, 2, n // (2 * group), group, *post).transpose(dim, dim + 1).reshape(x.shape)


def deinterleave_linear_gate(x: torch.Tensor, group: int, dim: int) -> torch.Tensor:
    dim = dim % x.dim()
    n = x.shape[dim]
    pre, post = x.shape[:dim], x.shape[dim + 1:]
    return x.reshape(*pre, n // (2 * group), 2, group, *post).transpose(dim, dim + 1).reshape(x.shape)


def mma_layout(sf: torch.Tensor, m: int, k: int, groups: int, sf_vec: int) -> torch.Tensor:
    """Column-major swizzled flat scales of `groups` [m, k/sf_vec] matrices -> a 6-D
    (32, 4, m/128, 4, kk/4, groups) view, like FlashInfer's MMA scale layout's shape."""
    kk = k // sf_vec
    mats = sf.reshape(groups, kk, m).transpose(1, 2)  # [G, m, kk]
    return mats.reshape(groups, m // 128, 4, 32, kk // 4, 4).permute(3, 2, 1, 5, 4, 0)


def mma_layout_inverse(t: torch.Tensor) -> torch.Tensor:
    """-> [G, m, kk] scales."""
    a, b, mt, c, kt, G = t.shape
    return t.permute(5, 2, 1, 0, 4, 3).reshape(G, mt * 128, kt * 4)
