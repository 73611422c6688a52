"""The public MoE object: one spec, one set of canonical weights, any backend.

The facade validates its arguments once, routes (qmoe.route), and runs the plan
(qmoe.dispatch): the backend and its launch configuration for M tokens are resolved on the
first call with that M and cached, so a call costs the checks and the kernels, nothing else.
"""

from __future__ import annotations

import torch

from .dispatch import make_plan, run_poisoning
from .parallel import ParallelPlan, experts_batched
from .routing import check_inputs, route
from .spec import MoESpec
from .weights import ExpertWeights

_X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class MoE:
    """A quantized MoE layer's experts.

    moe = qmoe.MoE(spec, weights, backend="auto")
    out = moe(x, router_logits)                          # routes, then computes
    out = moe.experts(x, topk_ids, topk_weights, out=buf) # from given routing, into buf

    backend: "auto" (choose per token count from the tuning table, else static rules)
             or a backend name (qmoe.backends.BACKEND_NAMES).
    check_ids: what happens to expert ids outside [-1, E):
             True (default): the token's output row becomes NaN, on the device, with no host
               sync (free on backends that do it inside their kernels, like triton; about three
               tiny extra kernels per call on the others), and nothing is read or written out of
               bounds;
             "raise": a ValueError naming the bad values (one host sync per call: it stalls the
               CPU until the GPU catches up, which costs far more than a decode step; skipped
               while a CUDA graph is being captured, where the True behaviour applies);
             False: no guard (the caller promises valid ids; triton still never goes out of
               bounds, other backends may).
    max_layout_bytes: for "auto", the total bytes all prepared layouts may take together (a
             decode winner and a prefill winner); None for the default, 2.5 x weights.nbytes.
             One layout is always kept, even over the budget.
    ep_group, tp_group: torch.distributed process groups to split the experts over (expert
             parallelism) and / or the intermediate dimension (tensor parallelism); weights are
             then the whole layer's or this rank's shard (qmoe.parallel.shard_weights), and every
             rank of the groups calls the MoE with its own tokens (EP) or the same tokens (TP),
             M = 0 included. docs/parallel.md.
    max_tokens: with ep_group, the most tokens any rank passes in one call: fixed-size exchange
             buffers, no host sync, CUDA-graph capturable (None: exact counts, one host sync).
    """

    def __init__(self, spec: MoESpec, weights: ExpertWeights, backend: str = "auto", *,
                 check_ids=True, max_layout_bytes: int | None = None, ep_group=None, tp_group=None,
                 max_tokens: int | None = None):
        if not isinstance(spec, MoESpec):
            raise ValueError(f"spec: expected a MoESpec, got {type(spec).__name__}")
        if not isinstance(weights, ExpertWeights):
            raise ValueError(f"weights: expected an ExpertWeights, got {type(weights).__name__}")
        parallel = ep_group is not None or tp_group is not None
        want = (spec.num_experts, spec.hidden_size, spec.intermediate_size)
        got = (weights.num_experts, weights.hidden_size, weights.intermediate_size)
        if want != got and not parallel:  # a ParallelPlan takes the whole layer or this rank's shard
            raise ValueError(f"weights: expected (num_experts, hidden_size, intermediate_size) = {want} "
                             f"from the spec, got {got}")
        if spec.bias != weights.has_bias:
            raise ValueError(f"weights: spec {spec.name or ''} says bias={spec.bias}, but the weights "
                             f"{'have' if weights.has_bias else 'have no'} biases")
        if not (check_ids is True or check_ids is False or check_ids == "raise"):
            raise ValueError(f"check_ids: expected True, False or 'raise', got {check_ids!r}")
        self.spec = spec
        self.weights = weights
        self.check_ids = check_ids
        if parallel:
            self.plan = ParallelPlan(spec, weights, backend, ep_group=ep_group, tp_group=tp_group,
                                     max_tokens=max_tokens, max_layout_bytes=max_layout_bytes)
        elif max_tokens is not None:
            raise ValueError(f"max_tokens: sizes the expert-parallel exchange buffers; expected None "
                             f"without ep_group, got {max_tokens!r}")
        else:
            self.plan = make_plan(spec, weights, backend, max_layout_bytes=max_layout_bytes)

    @property
    def device(self) -> torch.device:
        return self.weights.device

    def backend_for(self, num_tokens: int) -> str:
        """The backend name that runs a call with this many tokens."""
        return self.plan.backend_for(num_tokens)

    def explain(self, num_tokens: int) -> str:
        """Which backend runs at this token count, and why."""
        return self.plan.explain(num_tokens)

    def __call__(self, x: torch.Tensor, router_logits: torch.Tensor,
                 correction_bias: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
                 shared_output: torch.Tensor | None = None) -> torch.Tensor:
        """Route (qmoe.route: one fused Triton kernel on a GPU) and compute.

        x: [M, H] bf16 (fp16, fp32 accepted); router_logits: [M, E] float;
        correction_bias: [E] float or None (sigmoid_grouped / sqrt_softplus routing);
        out: [M, H] of x's dtype or None; shared_output: [M, H] or None, added to the result.
        Returns out: [M, H] in x's dtype.
        """
        self._check_x(x)
        check_inputs(self.spec, router_logits, correction_bias, num_tokens=x.shape[0])
        self._check_device("router_logits", router_logits)
        topk_ids, topk_weights = route(self.spec, router_logits, correction_bias)
        return self._run(x, topk_ids, topk_weights, out, shared_output)

    def experts(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                out: torch.Tensor | None = None, *, shared_output: torch.Tensor | None = None) -> torch.Tensor:
        """Compute the experts from given routing.

        x: [M, H] bf16 (fp16, fp32 accepted)
        topk_ids: [M, k] int32 or int64, values in [-1, E); -1 contributes nothing (see
                  check_ids for other values)
        topk_weights: [M, k] float32 (fp16/bf16 accepted)
        out: [M, H] of x's dtype, or None; when given, the result is written into this very
             tensor and it is returned
        shared_output: [M, H] float or None; added to the result (shared experts)
        """
        self._check_x(x)
        M, k = x.shape[0], self.spec.top_k
        for name, t in (("topk_ids", topk_ids), ("topk_weights", topk_weights)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (M, k):
                got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name}: expected shape [{M}, {k}], got {got}")
            self._check_device(name, t)
        if topk_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"topk_ids: expected int32 or int64, got {topk_ids.dtype}")
        if not topk_weights.is_floating_point():
            raise ValueError(f"topk_weights: expected a float tensor, got {topk_weights.dtype}")
        if self.check_ids == "raise" and M and not _capturing(x.device):
            lo, hi = int(topk_ids.min()), int(topk_ids.max())
            if lo < -1 or hi >= self.spec.num_experts:
                raise ValueError(f"topk_ids: expected values in [-1, {self.spec.num_experts}), "
                                 f"got values in [{lo}, {hi}]")
        topk_ids = topk_ids if topk_ids.dtype == torch.int32 else topk_ids.to(torch.int32)
        topk_weights = topk_weights if topk_weights.dtype == torch.float32 else topk_weights.float()
        return self._run(x, topk_ids.contiguous(), topk_weights.contiguous(), out, shared_output)

    def _run(self, x, topk_ids, topk_weights, out, shared_output):
        M = x.shape[0]
        if out is None:
            out = torch.empty(M, self.spec.hidden_size, dtype=x.dtype, device=x.device)
        else:
            self._check_out("out", out, x.dtype, M)
        if shared_output is not None:
            self._check_out("shared_output", shared_output, None, M)
        if M == 0 and not isinstance(self.plan, ParallelPlan):  # an EP rank with no tokens still serves
            return out
        backend, run = self.plan.runner(M)
        guard = not backend.poisons_bad_ids and (
            self.check_ids is True or (self.check_ids == "raise" and _capturing(x.device)))
        if guard:  # device-side: bad ids become -1 for the backend, and their rows NaN after
            return run_poisoning(run, self.spec.num_experts, x.contiguous(), topk_ids, topk_weights, out,
                                 shared_output)
        run(x.contiguous(), topk_ids, topk_weights, out, shared_output)
        return out

    def experts_batched(self, x: torch.Tensor, counts: torch.Tensor, out: torch.Tensor | None = None):
        """The experts on per-expert buffers (the batched format low-latency all-to-all libraries
        produce).

        x: [E_local, T, H] bf16 (fp16, fp32 accepted), contiguous (E_local: num_experts, or this
        rank's experts with ep_group); counts: [E_local] int32 or int64 (rows in use per expert);
        out: [E_local, T, H] of x's dtype or None. Returns out: row t of out[e] is expert e's
        output for x[e, t] with weight 1; rows past each count are 0.
        """
        return experts_batched(self.plan, x, counts, out)

    # --- validation ---------------------------------------------------------------------------
    def _check_device(self, name, t):
        if t.device != self.device:
            raise ValueError(f"{name}: expected device {self.device} (where the weights are), got {t.device}")

    def _check_x(self, x):
        H = self.spec.hidden_size
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != H:
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected shape [M, {H}], got {got}")
        if x.dtype not in _X_DTYPES:
            raise ValueError(f"x: expected dtype bfloat16, float16 or float32, got {x.dtype}")
        self._check_device("x", x)

    def _check_out(self, name, t, dtype, M):
        H = self.spec.hidden_size
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (M, H):
            got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected shape [{M}, {H}], got {got}")
        if dtype is not None and t.dtype != dtype:
            raise ValueError(f"{name}: expected dtype {dtype} (x's dtype), got {t.dtype}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: expected a float tensor, got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor, got strides {list(t.stride())}")
        self._check_device(name, t)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()
