"""qmoe inside PyTorch models: an nn.Module and torch.library custom ops.

    layer = qmoe.nn.MoELayer(spec, weights, router_weight, router_bias, backend="auto")
    layer = qmoe.nn.MoELayer.from_hf(hf_block, format="mxfp4")   # from a Hugging Face MoE block
    y = layer(x)                                                 # x [..., H] -> [..., H]

    torch.ops.qmoe.experts / torch.ops.qmoe.route_experts        # the custom ops (qmoe.nn.ops)

`ops` holds the custom ops and the registry of live qmoe.MoE objects they name by an int handle;
`hf` maps Hugging Face MoE blocks (GPT-OSS, Qwen3-MoE, DeepSeek-V3 / Kimi-K2, DeepSeek-V4) onto
qmoe's spec and canonical weights; `layer` is MoELayer.
"""

from . import hf, ops
from .layer import MoELayer

__all__ = ["MoELayer", "hf", "ops"]
