"""prepare_and_transform_humming_tensors: the standard schema -> (LayerConfig, kernel tensors),
padding N and K to the given multiples; the fake kernel layout is described in _layout.py."""

from __future__ import annotations

import torch

from ._fake import STATE
from .config import LayerConfig
from .schema import HummingInputSchema, HummingWeightSchema


def _round_up(x, m):
    return (x + m - 1) // m * m


def prepare_and_transform_humming_tensors(tensors, shape_n, shape_k, weight_schema, input_schema=None,
                                          num_experts=None, pad_n_to_multiple=1, pad_k_to_multiple=1,
                                          has_bias=False, torch_dtype=None, device=None):
    assert isinstance(weight_schema, HummingWeightSchema), "fake humming: weight_schema must be converted first"
    assert input_schema is None or (isinstance(input_schema, HummingInputSchema) and input_schema.a_dtype is None)
    assert torch_dtype == torch.bfloat16 and num_experts
    E, N, K = num_experts, shape_n, shape_k
    weight_schema.validate_tensors(tensors, N, K, torch_dtype, E, has_bias)
    assert has_bias == ("bias" in tensors), "fake humming: has_bias disagrees with the tensors"
    Np, Kp = _round_up(N, pad_n_to_multiple), _round_up(K, pad_k_to_multiple)
    G = weight_schema.weight_scale_group_size
    config = LayerConfig(shape_n=Np, shape_k=Kp, pad_shape_n=Np - N, pad_shape_k=Kp - K, num_experts=E,
                         a_dtype="bfloat16", b_dtype=weight_schema.b_dtype, c_dtype="bfloat16",
                         bs_dtype=weight_schema.bs_dtype or "bfloat16", weight_scale_group_size=G,
                         weight_scale_2_type=weight_schema.weight_scale_2_type, has_bias=has_bias)

    def pad(t, n, k, value=0):
        raw = t.view(torch.uint8) if t.dtype in (torch.float8_e8m0fnu, torch.float8_e4m3fn) else t
        out = raw.new_full((E, n, k), value)
        out[:, :raw.shape[1], :raw.shape[2]] = raw
        return out.view(t.dtype)

    out = {"weight": pad(tensors["weight"], Np, Kp // 8).transpose(1, 2).contiguous()}
    e8m0 = tensors["weight_scale"].dtype == torch.float8_e8m0fnu
    scale = pad(tensors["weight_scale"], Np, Kp // G, 127 if e8m0 else 0)
    out["weight_scale"] = scale.transpose(1, 2).contiguous()
    if "weight_scale_2" in tensors:
        out["weight_scale_2"] = tensors["weight_scale_2"].float().clone()
    if has_bias:
        b = torch.zeros(E, Np, dtype=torch_dtype, device=tensors["bias"].device)
        b[:, :N] = tensors["bias"]
        out["bias"] = b
    STATE.calls.append(("transform", {"config": config, "pad": (pad_n_to_multiple, pad_k_to_multiple),
                                      "device": device}))
    return config, out
