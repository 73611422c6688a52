"""The fake's LayerConfig: what prepare_and_transform_humming_tensors decided for one matrix."""

from __future__ import annotations

import dataclasses
import json


@dataclasses.dataclass(frozen=True)
class LayerConfig:
    shape_n: int            # padded
    shape_k: int            # padded
    pad_shape_n: int
    pad_shape_k: int
    num_experts: int
    a_dtype: str
    b_dtype: str            # "float4e2m1" | "float4e0m3" | "uint4"
    c_dtype: str
    bs_dtype: str           # "float8e8m0" | "float8e4m3" | "bfloat16"
    weight_scale_group_size: int
    weight_scale_2_type: str  # "none" | "tensor"
    has_bias: bool
    has_zero_point: bool = False

    def to_str(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    def check_device(self, device) -> None:
        pass
