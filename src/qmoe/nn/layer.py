"""qmoe.nn.MoELayer: a quantized MoE layer (router + experts) as a torch.nn.Module.

The canonical weights and the router are buffers (so `.to(device)`, `state_dict` and
`load_state_dict` work as for any module); the backend plan (qmoe.MoE) is made from them at
construction and again whenever they move or are loaded. The forward computes the router logits in
PyTorch and runs routing + experts as one custom op (qmoe.nn.ops), so torch.compile traces it
without a graph break and one graph serves every token count.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..formats import QuantizedTensor, format_info
from ..moe import MoE
from ..spec import MoESpec
from ..weights import ExpertWeights
from . import hf, ops

_QUANT_PARTS = ("data", "scales", "global_scale")
_CANONICAL = tuple(f"{m}_{p}" for m in ("w13", "w2") for p in _QUANT_PARTS) + ("b13", "b2")
"""Buffer names of the canonical weights: their dtypes are the format's, never the model's."""


class MoELayer(nn.Module):
    """Router + quantized experts of one MoE layer.

    layer = MoELayer(spec, weights, router_weight, router_bias=None, correction_bias=None,
                     backend="auto")
    y = layer(x)                                        # x: [..., H] -> y: [..., H], x's dtype
    y = layer.experts(x, topk_ids, topk_weights)        # from routing of your own

    spec: MoESpec; weights: ExpertWeights (canonical, on the device the layer runs on);
    router_weight: [E, H] float; router_bias: [E] float or None (GPT-OSS);
    correction_bias: [E] float or None (selection-only bias: DeepSeek-V3 e_score_correction_bias);
    backend: "auto" or a backend name (qmoe.backends.BACKEND_NAMES);
    router_dtype: the dtype the router logits are computed in (None: x's dtype; DeepSeek-V3 uses
      float32); shared_experts: a module run on the same input whose output is added to the
      experts' (the model's shared experts; qmoe does not compute them), or None;
    max_layout_bytes: as qmoe.MoE.

    `.to(device)` moves the buffers and re-plans the backend for the new device; `.to(dtype)`
    changes the router's dtype only (the quantized weights keep their format's dtypes).
    Inference only: the experts have no gradient.
    """

    def __init__(self, spec: MoESpec, weights: ExpertWeights, router_weight: torch.Tensor,
                 router_bias: torch.Tensor | None = None, correction_bias: torch.Tensor | None = None, *,
                 backend: str = "auto", router_dtype: torch.dtype | None = None,
                 shared_experts: nn.Module | None = None, max_layout_bytes: int | None = None):
        super().__init__()
        if not isinstance(spec, MoESpec):
            raise ValueError(f"spec: expected a MoESpec, got {type(spec).__name__}")
        if not isinstance(weights, ExpertWeights):
            raise ValueError(f"weights: expected an ExpertWeights, got {type(weights).__name__}")
        E, H = spec.num_experts, spec.hidden_size
        for name, t, shape in (("router_weight", router_weight, (E, H)), ("router_bias", router_bias, (E,)),
                               ("correction_bias", correction_bias, (E,))):
            if t is None and name != "router_weight":
                continue
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or not t.is_floating_point():
                got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name}: expected a float tensor of shape {list(shape)}, got {got}")
            if t.device != weights.device:
                raise ValueError(f"{name}: expected device {weights.device} (where the weights are), got {t.device}")
        if router_dtype is not None and not (isinstance(router_dtype, torch.dtype) and router_dtype.is_floating_point):
            raise ValueError(f"router_dtype: expected None or a float dtype, got {router_dtype!r}")
        if shared_experts is not None and not isinstance(shared_experts, nn.Module):
            raise ValueError(f"shared_experts: expected an nn.Module or None, got {type(shared_experts).__name__}")
        self.spec = spec
        self.format = weights.format
        self.backend = backend
        self.router_dtype = router_dtype
        self.max_layout_bytes = max_layout_bytes
        for m in ("w13", "w2"):
            q = getattr(weights, m)
            for p in _QUANT_PARTS:
                self.register_buffer(f"{m}_{p}", getattr(q, p))
        self.register_buffer("b13", weights.b13)
        self.register_buffer("b2", weights.b2)
        self.register_buffer("router_weight", router_weight.detach())
        self.register_buffer("router_bias", None if router_bias is None else router_bias.detach())
        self.register_buffer("correction_bias", None if correction_bias is None else correction_bias.detach())
        self.shared_experts = shared_experts
        self._handle = ops.new_handle()
        self._moe = None
        self._replan()
        self.register_load_state_dict_post_hook(_replan_after_load)

    # --- construction from elsewhere ------------------------------------------------------------
    @classmethod
    def from_hf(cls, block: nn.Module, format: str = "mxfp4", backend: str = "auto", *,
                checkpoint=None, prefix: str | None = None, **kwargs) -> "MoELayer":
        """A MoELayer doing what a Hugging Face MoE block does (qmoe.nn.hf lists the families).

        block: the model's MoE module (GptOssMLP, Qwen3MoeSparseMoeBlock, DeepseekV3MoE, ...);
        format: "mxfp4" | "nvfp4" | "int4" | "bf16": the block's float expert weights are quantized
          to it, on their device;
        checkpoint: None, or a safetensors file / folder to read the quantized experts from instead,
          by `format`: "mxfp4" a GPT-OSS checkpoint (qmoe.load_gpt_oss), "int4" compressed-tensors
          pack-quantized (qmoe.weights.load_compressed_tensors), "nvfp4" ModelOpt
          (qmoe.weights.load_modelopt_nvfp4); then `prefix` names the block in it
          ("model.layers.3.mlp").
        The router tensors are the block's own (not copied); its shared experts stay its module.
        DeepSeek-V4 hash layers are refused (qmoe.integrations.transformers runs them with the
        model's own router and the experts op). kwargs go to MoELayer (max_layout_bytes).
        """
        info = hf.describe(block)
        if info.hash_gate is not None:
            raise ValueError(f"block: this {type(block).__name__} routes by token id (hash layer), which "
                             f"qmoe.route cannot express; qmoe.integrations.transformers.patch runs it with the "
                             f"model's router and the experts op")
        format_info(format)
        if checkpoint is None:
            w13, w2, b13, b2 = hf.read_experts(block)
            weights = ExpertWeights.from_float(w13, w2, format, b13, b2)
        else:
            weights = load_experts(checkpoint, info, format, prefix).to(info.router_weight.device)
        return cls(info.spec, weights, info.router_weight, info.router_bias, info.correction_bias,
                   backend=backend, router_dtype=info.router_dtype, shared_experts=info.shared_experts, **kwargs)

    @classmethod
    def empty(cls, spec: MoESpec, format: str, *, router_bias: bool = False, correction_bias: bool = False,
              device=None, **kwargs) -> "MoELayer":
        """A layer of this spec and format with zero weights, to `load_state_dict` into."""
        E, H, I = spec.num_experts, spec.hidden_size, spec.intermediate_size
        info = format_info(format)

        def q(*shape):
            if format == "bf16":
                return QuantizedTensor(format, shape, torch.zeros(shape, dtype=torch.bfloat16, device=device))
            lead, K = shape[:-1], shape[-1]
            gs = torch.ones(shape[:-2], device=device) if info.global_scale else None
            return QuantizedTensor(format, shape, torch.zeros(*lead, K // 2, dtype=torch.uint8, device=device),
                                   torch.zeros(*lead, K // info.block, dtype=info.scale_dtype, device=device), gs)

        zeros = (lambda *s: torch.zeros(*s, device=device))
        weights = ExpertWeights(q(E, 2 * I, H), q(E, H, I), zeros(E, 2 * I) if spec.bias else None,
                                zeros(E, H) if spec.bias else None)
        return cls(spec, weights, zeros(E, H), zeros(E) if router_bias else None,
                   zeros(E) if correction_bias else None, **kwargs)

    # --- the canonical weights and the plan --------------------------------------------------------
    @property
    def weights(self) -> ExpertWeights:
        """The canonical weights (a view of the buffers, nothing copied)."""
        E, H, I = self.spec.num_experts, self.spec.hidden_size, self.spec.intermediate_size
        q = {m: QuantizedTensor(self.format, shape, *(getattr(self, f"{m}_{p}") for p in _QUANT_PARTS))
             for m, shape in (("w13", (E, 2 * I, H)), ("w2", (E, H, I)))}
        return ExpertWeights(q["w13"], q["w2"], self.b13, self.b2)

    @property
    def moe(self) -> MoE:
        """The qmoe.MoE the ops run (its plan says which backend runs which token count)."""
        if self._moe is None:
            raise ValueError(f"layer: no backend plan on device {self.router_weight.device}; move the layer to "
                             f"a device it can run on (.to('cuda') or .to('cpu'))")
        return self._moe

    @property
    def handle(self) -> int:
        """The int the custom ops name this layer's MoE by (qmoe.nn.ops)."""
        return self._handle

    def explain(self, num_tokens: int) -> str:
        """Which backend runs at this token count, and why."""
        return self.moe.explain(num_tokens)

    def _replan(self):
        self._moe = None  # the old plan's layouts go before the new ones are made (one copy at a time)
        if self.w13_data.device.type == "meta":
            ops.unregister(self._handle)
            return
        self._moe = MoE(self.spec, self.weights, self.backend, max_layout_bytes=self.max_layout_bytes)
        ops.register(self._moe, self._handle)

    def _apply(self, fn, recurse=True):
        before = {n: self._buffers.get(n) for n in _CANONICAL}
        super()._apply(fn, recurse)
        for n, old in before.items():
            new = self._buffers.get(n)
            if old is not None and new is not None and new.dtype != old.dtype:
                # .to(dtype) / .half(): the quantized bytes, scales and fp32 biases keep their
                # dtypes (converted from the originals, so nothing is rounded); the device moves
                self._buffers[n] = old.to(new.device)
        if any(self._buffers.get(n) is not old for n, old in before.items()):
            self._replan()
        return self

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_moe"] = None  # prepared layouts and kernels are not copied: the copy plans its own
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._handle = ops.new_handle()  # a copy must not run its original's MoE
        self._replan()

    # --- forward -----------------------------------------------------------------------------------
    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: [M, H] -> router logits [M, E] in router_dtype (x's dtype when None)."""
        dt = self.router_dtype or x.dtype
        bias = None if self.router_bias is None else self.router_bias.to(dt)
        return nn.functional.linear(x.to(dt), self.router_weight.to(dt), bias)

    def _shared(self, x, shared_output):
        if shared_output is None and self.shared_experts is not None:
            shared_output = self.shared_experts(x)
        return None if shared_output is None else shared_output.reshape(-1, self.spec.hidden_size).contiguous()

    def _check_x(self, x):
        H = self.spec.hidden_size
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != H:
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected shape [..., {H}], got {got}")
        if self.training and x.requires_grad and torch.is_grad_enabled():
            # the ops compute no gradient: training through them would silently skip the experts
            raise ValueError("x: qmoe's MoE layer is inference-only (no gradient through the experts), got an "
                             "input that requires grad in training mode; call model.eval() or use torch.no_grad()")

    def forward(self, x: torch.Tensor, shared_output: torch.Tensor | None = None) -> torch.Tensor:
        """x: [..., H] bf16 (fp16, fp32 accepted) -> [..., H] in x's dtype: the experts of the
        routed tokens (+ the shared experts' output, + shared_output [..., H] when given)."""
        self._check_x(x)
        flat = x.reshape(-1, self.spec.hidden_size)
        shared = self._shared(x, shared_output)
        out = torch.empty(flat.shape, dtype=x.dtype, device=x.device)
        ops.route_experts(self._handle, flat, self.router_logits(flat), self.correction_bias, out, shared)
        return out.view(x.shape)

    def experts(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                shared_output: torch.Tensor | None = None) -> torch.Tensor:
        """The experts from given routing: x [..., H]; topk_ids [M, k] int (M = x.numel() / H;
        -1 = no expert); topk_weights [M, k] float; shared_output [..., H] or None.
        Returns [..., H] in x's dtype (+ the shared experts' output)."""
        self._check_x(x)
        flat = x.reshape(-1, self.spec.hidden_size)
        shared = self._shared(x, shared_output)
        out = torch.empty(flat.shape, dtype=x.dtype, device=x.device)
        ids = topk_ids if topk_ids.dtype == torch.int32 else topk_ids.to(torch.int32)
        ops.experts(self._handle, flat, ids.contiguous(), topk_weights.float().contiguous(), out, shared)
        return out.view(x.shape)

    def extra_repr(self) -> str:
        s = self.spec
        act, r = s.activation, s.routing
        parts = [s.name or "moe", f"num_experts={s.num_experts}", f"top_k={s.top_k}",
                 f"hidden_size={s.hidden_size}", f"intermediate_size={s.intermediate_size}",
                 f"format={self.format}", f"SwiGLU(alpha={act.alpha:g}, beta={act.beta:g}, limit={act.limit})",
                 f"routing={r.mode}" + ("" if r.renormalize else " (not renormalized)")
                 + (f" groups {r.topk_group}/{r.n_group}" if r.n_group > 1 else "")
                 + (f" x{r.routed_scaling_factor:g}" if r.routed_scaling_factor != 1 else "")]
        if s.bias:
            parts.append("expert biases")
        if self.router_bias is not None:
            parts.append("router bias")
        if self.correction_bias is not None:
            parts.append("correction bias")
        plan = f"backend={self.backend}"
        if self._moe is not None:
            used = sorted(self._moe.plan.prepared)
            plan += f" ({', '.join(used)} on {self.w13_data.device})"
        parts.append(plan)
        return ", ".join(parts)


def _replan_after_load(module, incompatible_keys):
    module._replan()


_GPT_OSS_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp$")


def load_experts(checkpoint, info: "hf.HFMoE", format: str, prefix: str | None) -> ExpertWeights:
    """The experts of the block `prefix` read from a checkpoint by format (see MoELayer.from_hf)."""
    from ..weights import load_compressed_tensors, load_gpt_oss, load_modelopt_nvfp4

    if not isinstance(prefix, str) or not prefix:
        raise ValueError(f"prefix: expected the block's name in the checkpoint (e.g. 'model.layers.3.mlp'), "
                         f"got {prefix!r}")
    if format == "mxfp4":
        m = _GPT_OSS_LAYER.search(prefix)
        if info.family != "gpt_oss" or m is None:
            raise ValueError(f"checkpoint: MXFP4 checkpoints are read in the GPT-OSS layout (model.layers.<i>.mlp "
                             f"of a GPT-OSS model); got family {info.family}, prefix {prefix!r}")
        weights = load_gpt_oss(checkpoint, int(m.group(1))).weights
    elif format == "int4":
        weights = load_compressed_tensors(checkpoint, prefix + ".experts")
    elif format == "nvfp4":
        weights = load_modelopt_nvfp4(checkpoint, prefix + ".experts")
    else:
        raise ValueError(f"format: checkpoints are read for mxfp4 (GPT-OSS), int4 (compressed-tensors) and "
                         f"nvfp4 (ModelOpt), got {format!r}")
    want = (info.spec.num_experts, info.spec.hidden_size, info.spec.intermediate_size)
    got = (weights.num_experts, weights.hidden_size, weights.intermediate_size)
    if want != got:
        raise ValueError(f"checkpoint: experts of {prefix} have (E, H, I) = {got}, the model's block {want}")
    if info.spec.bias != weights.has_bias:
        raise ValueError(f"checkpoint: experts of {prefix} {'have' if weights.has_bias else 'have no'} biases, "
                         f"the model's block {'has' if info.spec.bias else 'has none'}")
    return weights


__all__ = ["MoELayer", "load_experts"]
