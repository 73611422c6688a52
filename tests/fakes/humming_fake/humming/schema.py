"""Checkpoint weight schemas -> humming's standard schema, as humming 0.1.19 converts them.

Each checkpoint schema checks the tensors it is given against the checkpoint's layout:
  gpt_oss_mxfp4 / mxfp4: weight uint8 [E, N, K/2], weight_scale uint8 E8M0 [E, N, K/32]
  compressed-tensors pack-quantized int4: weight_packed int32 [E, N, K/8] (offset binary),
      weight_scale [E, N, K/group_size] float
  modelopt nvfp4: weight uint8 [E, N, K/2], weight_scale float8_e4m3fn [E, N, K/16],
      weight_scale_2 fp32, one per expert (a stacked matrix may carry one per shard)
and bias [E, N] in the parameter dtype. Standard schema: weight int32 [E, N, K/8] packed codes.
"""

from __future__ import annotations

import dataclasses

import torch

from . import _layout
from ._fake import STATE


def _expect(name, t, shape, dtype):
    assert isinstance(t, torch.Tensor), f"fake humming: {name} missing"
    assert tuple(t.shape) == tuple(shape), f"fake humming: {name} shape {list(t.shape)} != {list(shape)}"
    assert t.dtype == dtype, f"fake humming: {name} dtype {t.dtype} != {dtype}"
    assert t.is_contiguous(), f"fake humming: {name} is not contiguous"


@dataclasses.dataclass
class HummingWeightSchema:
    b_dtype: str
    bs_dtype: str | None = None
    weight_scale_group_size: int = 0
    weight_scale_2_type: str = "none"
    has_zero_point: bool = False
    quant_method: str = "humming"

    def validate_tensors(self, tensors, shape_n, shape_k, param_dtype, num_experts, has_bias):
        E, N, K = num_experts, shape_n, shape_k
        G = self.weight_scale_group_size
        _expect("weight", tensors.get("weight"), (E, N, K // 8), torch.int32)
        scale_dtype = {"float8e8m0": torch.float8_e8m0fnu, "float8e4m3": torch.float8_e4m3fn,
                       None: param_dtype}[self.bs_dtype]
        _expect("weight_scale", tensors.get("weight_scale"), (E, N, K // G), scale_dtype)
        if self.weight_scale_2_type == "tensor":
            _expect("weight_scale_2", tensors.get("weight_scale_2"), (E,), torch.float32)
        if has_bias:
            _expect("bias", tensors.get("bias"), (E, N), param_dtype)
        assert not self.has_zero_point


@dataclasses.dataclass
class HummingInputSchema:
    a_dtype: str | None = None  # None: the parameter dtype (W4A16)
    quant_method: str = "humming"


class BaseWeightSchema:
    quant_method = ""

    @classmethod
    def from_config(cls, config: dict):
        method = config["quant_method"]
        if method in ("gpt_oss_mxfp4", "mxfp4"):
            return _Mxfp4Schema(method)
        if method == "compressed-tensors":
            return _PackQuantizedSchema(**{k: v for k, v in config.items() if k != "quant_method"})
        if method == "modelopt" and config.get("quant_algo", "").lower() == "nvfp4":
            return _ModeloptNvfp4Schema()
        raise ValueError(f"unsupported weight quant_method: {method}")

    def convert_humming(self, tensors, shape_n_stacks, shape_k_stacks, param_dtype, num_experts=None,
                        device=None, convert_symmetric_integer=True):
        E, N, K = num_experts, sum(shape_n_stacks), sum(shape_k_stacks)
        schema, out = self._convert(dict(tensors), E, N, K, param_dtype, shape_n_stacks)
        if "bias" in tensors:
            _expect("bias", tensors["bias"], (E, N), param_dtype)
            out["bias"] = tensors["bias"]
        if convert_symmetric_integer:
            schema, out = _symmetric_integer(schema, out)
        STATE.calls.append(("convert_humming", {"method": self.quant_method, "schema": schema, "N": N, "K": K,
                                                "stacks": list(shape_n_stacks)}))
        return schema, out


class _Mxfp4Schema(BaseWeightSchema):
    def __init__(self, method):
        self.quant_method = method

    def _convert(self, t, E, N, K, param_dtype, stacks):
        _expect("weight", t.get("weight"), (E, N, K // 2), torch.uint8)
        _expect("weight_scale", t.get("weight_scale"), (E, N, K // 32), torch.uint8)
        return (HummingWeightSchema("float4e2m1", "float8e8m0", 32),
                {"weight": t["weight"].view(torch.int32), "weight_scale": t["weight_scale"].view(torch.float8_e8m0fnu)})


@dataclasses.dataclass
class _PackQuantizedSchema(BaseWeightSchema):
    format: str = ""
    type: str = ""
    num_bits: int = 0
    strategy: str = ""
    group_size: int | None = None
    symmetric: bool = True
    quant_method = "compressed-tensors"

    def _convert(self, t, E, N, K, param_dtype, stacks):
        assert (self.format, self.type, self.num_bits, self.strategy, self.symmetric) == \
            ("pack-quantized", "int", 4, "group", True), f"fake humming: unsupported {self}"
        G = self.group_size
        _expect("weight_packed", t.get("weight_packed"), (E, N, K // 8), torch.int32)
        s = t.get("weight_scale")
        assert s is not None and s.is_floating_point() and tuple(s.shape) == (E, N, K // G), \
            f"fake humming: weight_scale {None if s is None else (s.dtype, list(s.shape))}"
        return HummingWeightSchema("uint4", None, G), {"weight": t["weight_packed"], "weight_scale": s.to(param_dtype)}


class _ModeloptNvfp4Schema(BaseWeightSchema):
    quant_method = "modelopt"

    def _convert(self, t, E, N, K, param_dtype, stacks):
        _expect("weight", t.get("weight"), (E, N, K // 2), torch.uint8)
        _expect("weight_scale", t.get("weight_scale"), (E, N, K // 16), torch.float8_e4m3fn)
        g = t.get("weight_scale_2")
        assert g is not None and g.dtype == torch.float32 and g.numel() in (E, E * len(stacks)), \
            f"fake humming: weight_scale_2 {None if g is None else (g.dtype, list(g.shape))}"
        g = g.reshape(E, -1)
        assert bool((g == g[:, :1]).all()), "fake humming: per-shard global scales are not emulated"
        return (HummingWeightSchema("float4e2m1", "float8e4m3", 16, "tensor"),
                {"weight": t["weight"].view(torch.int32), "weight_scale": t["weight_scale"],
                 "weight_scale_2": g[:, 0].contiguous()})


def _symmetric_integer(schema, tensors):
    """humming's convert_symmetric_integer_weight: offset-binary uint4 weights without the code 0
    (value -8) become sign-magnitude float4e0m3; with it they stay uint4."""
    if schema.b_dtype != "uint4":
        return schema, tensors
    codes = _layout.unpack4(tensors["weight"])
    if bool((codes == 0).any()):
        return schema, tensors
    v = codes - 8
    sm = v.abs() | ((v < 0).to(torch.int64) << 3)
    return dataclasses.replace(schema, b_dtype="float4e0m3"), {**tensors, "weight": _layout.pack4(sm)}
