"""Synthetic expert weights for demos, benchmarks, tuning and qualification: one convention.

Float weights are drawn N(0, 1/K) (std 1/sqrt(K) along each matrix's K dimension, so a unit-
scale input gives unit-scale outputs through both GEMMs) and quantized to the format; biases
(when the spec has them) are N(0, BIAS_STD^2). Every command and test that wants "random
weights" uses this one function, so their numbers compare.
"""

from __future__ import annotations

import torch

from ..formats import QuantizedTensor, quantize

BIAS_STD = 0.1
"""Std of the fp32 biases of synthetic weights."""


def random_weights(spec, fmt: str, device="cpu", seed: int = 0, *, weight_std: float | None = None,
                   bias_std: float = BIAS_STD, on_expert=None):
    """Canonical ExpertWeights quantized to `fmt` from random normal float weights.

    spec: MoESpec (shapes; biases when spec.bias); weight_std: std of the float weights, None
    for 1/sqrt(K) (activations keep unit scale); bias_std: std of the fp32 biases.
    One expert's float matrix exists at a time (gpt-oss-120b's w13 in fp32 would be 8.5 GB):
    each is quantized into preallocated [E, ...] buffers. Draws w13 of every expert, then w2,
    then b13 and b2, from one generator seeded with `seed` on `device`.
    on_expert: called after each quantized matrix (2 * num_experts calls), for progress.
    """
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    E, H, I = spec.num_experts, spec.hidden_size, spec.intermediate_size

    def stack(N, K):
        buf = {}
        for e in range(E):
            w = torch.randn(N, K, generator=g, device=device)
            q = quantize(w / K ** 0.5 if weight_std is None else w * weight_std, fmt)
            del w
            for name in ("data", "scales", "global_scale"):
                t = getattr(q, name)
                if t is not None:
                    if name not in buf:
                        buf[name] = torch.empty((E, *t.shape), dtype=t.dtype, device=device)
                    buf[name][e] = t
            if on_expert is not None:
                on_expert()
        return QuantizedTensor(fmt, (E, N, K), buf["data"], buf.get("scales"), buf.get("global_scale"))

    w13, w2 = stack(2 * I, H), stack(H, I)
    b13 = b2 = None
    if spec.bias:
        b13 = torch.randn(E, 2 * I, generator=g, device=device) * bias_std
        b2 = torch.randn(E, H, generator=g, device=device) * bias_std
    from . import ExpertWeights

    return ExpertWeights(w13, w2, b13, b2)


__all__ = ["BIAS_STD", "random_weights"]
