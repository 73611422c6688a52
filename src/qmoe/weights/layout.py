"""Row orders of the gated w13 that checkpoints and kernels use, each with its inverse.

Canonical w13 rows are [gate; up] (qmoe.weights.ExpertWeights). GPT-OSS checkpoints, OpenAI's
triton_kernels and humming's "binary_interleaved" activation want them interleaved: gate 0,
up 0, gate 1, up 1, ...
"""

from __future__ import annotations

import torch


def interleave_gate_up(rows: torch.Tensor) -> torch.Tensor:
    """[E, 2I, ...] rows [gate; up] -> [E, 2I, ...] rows gate0, up0, gate1, up1, ... (any dtype).
    Inverse: `deinterleave_gate_up`."""
    E, two_i = rows.shape[:2]
    i = two_i // 2
    return torch.stack((rows[:, :i], rows[:, i:]), dim=2).reshape(E, two_i, *rows.shape[2:])


def deinterleave_gate_up(rows: torch.Tensor) -> torch.Tensor:
    """Inverse of `interleave_gate_up`: rows gate0, up0, gate1, up1, ... -> [gate; up]."""
    return torch.cat((rows[:, 0::2], rows[:, 1::2]), dim=1)


__all__ = ["deinterleave_gate_up", "interleave_gate_up"]
