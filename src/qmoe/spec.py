"""What a MoE layer is: shapes, activation and routing, and the published presets."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType

ROUTING_MODES = ("softmax", "sigmoid_grouped", "sqrt_softplus")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class SwiGLU:
    """The SwiGLU family: g = min(gate, limit); u = clamp(up, -limit, limit);
    out = (u + beta) * g * sigmoid(alpha * g). Plain SiLU-GLU is alpha=1, beta=0, limit=None.
    """

    alpha: float = 1.0
    beta: float = 0.0
    limit: float | None = None

    def __post_init__(self):
        for name in ("alpha", "beta"):
            v = getattr(self, name)
            if not _is_number(v) or not math.isfinite(v):
                raise ValueError(f"SwiGLU.{name}: expected a finite number, got {v!r}")
        if self.limit is not None and not (_is_number(self.limit) and math.isfinite(self.limit) and self.limit > 0):
            raise ValueError(f"SwiGLU.limit: expected None or a finite positive number, got {self.limit!r}")


@dataclass(frozen=True)
class Routing:
    """How router logits [M, E] become top-k expert ids and weights.

    mode:
      "softmax"         softmax -> top-k -> (renormalize) (GPT-OSS, Qwen3-MoE, Mixtral)
      "sigmoid_grouped" sigmoid scores; selection on scores + correction bias, limited to the
                        topk_group best of n_group groups (group score = sum of its top-2);
                        weights = unbiased scores, renormalized, x routed_scaling_factor
                        (DeepSeek-V3, Kimi-K2.5: "noaux_tc")
      "sqrt_softplus"   w = sqrt(softplus(logits)); select top-k by w + bias;
                        weights = w / sum(w) x routed_scaling_factor (DeepSeek-V4)
    """

    mode: str = "softmax"
    renormalize: bool = True
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0

    def __post_init__(self):
        if not isinstance(self.mode, str) or self.mode not in ROUTING_MODES:
            raise ValueError(f"Routing.mode: expected one of {ROUTING_MODES}, got {self.mode!r}")
        if not isinstance(self.renormalize, bool):
            raise ValueError(f"Routing.renormalize: expected True or False, got {self.renormalize!r}")
        f = self.routed_scaling_factor
        if not _is_number(f) or not math.isfinite(f) or f <= 0:
            raise ValueError(f"Routing.routed_scaling_factor: expected a positive number, got {f!r}")
        for name in ("n_group", "topk_group"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"Routing.{name}: expected a positive int, got {v!r}")
        if not self.topk_group <= self.n_group:
            raise ValueError(f"Routing: need 1 <= topk_group <= n_group, got topk_group={self.topk_group}, "
                             f"n_group={self.n_group}")
        if self.mode == "softmax" and (self.n_group, self.topk_group) != (1, 1):
            raise ValueError(f"Routing.n_group: softmax routing has no expert groups (n_group=1, topk_group=1), "
                             f"got n_group={self.n_group}, topk_group={self.topk_group}")


@dataclass(frozen=True)
class MoESpec:
    """One MoE layer's experts (names as in Hugging Face configs).

    The experts compute, per token x [H] and chosen expert e:
      h = x @ w13[e].T (+ b13[e]);  gate, up = h[:I], h[I:]
      a = activation(gate, up);     y = a @ w2[e].T (+ b2[e])
    and the layer output is sum over the k chosen experts of topk_weight * y.
    top_k may exceed num_experts in a spec that is only given ids (an expert-parallel rank's
    local spec: its rows keep all k slots); routing needs top_k <= num_experts.
    """

    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    activation: SwiGLU = field(default_factory=SwiGLU)
    routing: Routing = field(default_factory=Routing)
    bias: bool = False
    name: str = ""

    def __post_init__(self):
        for f in ("num_experts", "top_k", "hidden_size", "intermediate_size"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"MoESpec.{f}: expected a positive int, got {v!r}")
        if not isinstance(self.activation, SwiGLU):
            raise ValueError(f"MoESpec.activation: expected a SwiGLU, got {type(self.activation).__name__}")
        if not isinstance(self.routing, Routing):
            raise ValueError(f"MoESpec.routing: expected a Routing, got {type(self.routing).__name__}")
        if not isinstance(self.bias, bool):
            raise ValueError(f"MoESpec.bias: expected True or False, got {self.bias!r}")
        if not isinstance(self.name, str):
            raise ValueError(f"MoESpec.name: expected a string, got {self.name!r}")
        if self.num_experts % self.routing.n_group:
            raise ValueError(f"MoESpec: num_experts ({self.num_experts}) must be a multiple of "
                             f"routing.n_group ({self.routing.n_group})")
        if self.routing.mode == "sigmoid_grouped":
            per_group = self.num_experts // self.routing.n_group
            if self.routing.topk_group * per_group < self.top_k:
                raise ValueError(f"MoESpec: topk_group x experts per group ({self.routing.topk_group} x "
                                 f"{per_group}) must be >= top_k ({self.top_k})")

    def flops(self, num_slots: int) -> int:
        """FLOPs (multiply-adds x 2) of GEMM1 + GEMM2 for num_slots (token, expert) pairs: the one
        FLOP formula of qmoe (2 * slots * 3 * H * I)."""
        return 2 * int(num_slots) * 3 * self.hidden_size * self.intermediate_size

    def flops_per_token(self) -> int:
        """FLOPs of the experts for one token (all k experts)."""
        return self.flops(self.top_k)


_GPT_OSS_ACT = SwiGLU(alpha=1.702, beta=1.0, limit=7.0)
_SOFTMAX = Routing("softmax", renormalize=True)

_PRESETS = {
    "gpt-oss-20b": MoESpec(32, 4, 2880, 2880, _GPT_OSS_ACT, _SOFTMAX, bias=True, name="gpt-oss-20b"),
    "gpt-oss-120b": MoESpec(128, 4, 2880, 2880, _GPT_OSS_ACT, _SOFTMAX, bias=True, name="gpt-oss-120b"),
    "deepseek-v3": MoESpec(256, 8, 7168, 2048, SwiGLU(),
                           Routing("sigmoid_grouped", True, n_group=8, topk_group=4, routed_scaling_factor=2.5),
                           name="deepseek-v3"),
    "deepseek-v4-flash": MoESpec(256, 6, 4096, 2048, SwiGLU(limit=10.0),
                                 Routing("sqrt_softplus", True, routed_scaling_factor=1.5),
                                 name="deepseek-v4-flash"),
    "kimi-k2.5": MoESpec(384, 8, 7168, 2048, SwiGLU(),
                         Routing("sigmoid_grouped", True, n_group=1, topk_group=1, routed_scaling_factor=2.827),
                         name="kimi-k2.5"),
    "qwen3-30b-a3b": MoESpec(128, 8, 2048, 768, SwiGLU(), _SOFTMAX, name="qwen3-30b-a3b"),
}

presets = MappingProxyType(_PRESETS)
"""Preset name -> MoESpec with the model's published expert shapes, routing and activation."""

PRESET_FORMATS = MappingProxyType({
    "gpt-oss-20b": "mxfp4", "gpt-oss-120b": "mxfp4", "deepseek-v3": "nvfp4",
    "deepseek-v4-flash": "mxfp4", "kimi-k2.5": "int4", "qwen3-30b-a3b": "nvfp4",
})
"""Preset name -> the 4-bit format its released checkpoint (or common quantization) uses."""


def preset(name: str) -> MoESpec:
    """The MoESpec of a preset; ValueError listing the known names otherwise."""
    try:
        return _PRESETS[name]
    except KeyError:
        raise ValueError(f"preset: expected one of {', '.join(_PRESETS)}, got {name!r}") from None
