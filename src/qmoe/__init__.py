"""qmoe: the expert layers of quantized Mixture-of-Experts LLMs, on the fastest kernel for
this GPU, this library version and this batch size.

    import qmoe
    spec = qmoe.presets["gpt-oss-20b"]
    weights = qmoe.ExpertWeights.from_float(w13, w2, "mxfp4", b13, b2)
    moe = qmoe.MoE(spec, weights)
    out = moe(x, router_logits)
"""

from .formats import FORMATS, QuantizedTensor, dequantize, format_info, quantize
from .moe import MoE
from .routing import route
from .spec import MoESpec, Routing, SwiGLU, preset, presets
from .weights import ExpertWeights, load_gpt_oss, random_weights, save_gpt_oss

from . import nn  # noqa: E402  (qmoe.nn.MoELayer and the torch ops; imports the facade above)

__version__ = "0.3.0"

__all__ = ["FORMATS", "ExpertWeights", "MoE", "MoESpec", "QuantizedTensor", "Routing", "SwiGLU",
           "dequantize", "format_info", "load_gpt_oss", "preset", "presets", "quantize", "random_weights",
           "route", "save_gpt_oss"]
