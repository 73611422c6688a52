"""The `triton` backend: qmoe's own Triton kernels (qmoe.kernels.moe) for W4A16 MoE.

Formats: mxfp4, nvfp4, int4 (group 32). Runs on CUDA GPUs of compute capability 8.0 and up,
and on the CPU through Triton's interpreter (TRITON_INTERPRET=1; slow, for tests on tiny
shapes). Prepared layout: qmoe.kernels.layout (K in quads of four scale groups read as 16-bit
elements, N and K padded to 128, the codes' bits arranged per 4-byte word for the decode),
made by MoEKernelWeights.from_canonical.

Launch configurations: per M bucket from the measured tables (configs.py), else defaults;
`runner(prepared, m)` binds the configuration once per token count, so a call costs no lookup.

Batch invariance (`batch_invariant`, a switch, off by default): only configurations of one
arithmetic family run (configs.invariant: both GEMMs on wgmma, which for decode means the weight
first; no split-K), so a token's output is bitwise the same whatever else is in the batch and
whichever bucket's configuration runs (the grouping only decides which program computes a row,
never the row's arithmetic; measured at 4096-token prefixes for mxfp4, int4 and nvfp4 with the
shipped entries of gpt-oss-120b, kimi-k2.5 and qwen3-30b-a3b on an H200, and checked by the
tuner: an invariant winner must give the family's default configuration's bits). Since session
10 the family holds the fastest prefill tiles (the shipped table's prefill entries have the same
tiles in both modes). Since session 16 the default mode stores the slots' rows in bf16 there
(KernelConfig.y_bf16), and since session 17 so does every member of the family (a row rounded
once from an invariant sum stays invariant): at M = 1024 to 8192 the two modes' shipped entries
are the same kernels for kimi-k2.5, qwen3-30b-a3b and gpt-oss-120b up to 4096 (with fp32 rows the
mode took 1.00-1.08x the default's time there; not re-measured on a GPU since). At decode it keeps
the 8-row mma.sync tiles out, which the default table runs from M = 1 to 64: the mode took 1.22 /
0.99 / 1.14 / 1.18x the default's time at M = 1 / 4 / 16 / 64 for gpt-oss-120b, 1.22 / 1.18 /
1.25 / 1.29x for kimi-k2.5, 1.14 / 1.04 / 1.09 / 1.07x for qwen3-30b-a3b (qmoe bench on an H200,
docs/performance.md session 15), more than the 3% that would make it the default.
Switch it on before building a MoE:

    qmoe.backends.get_backend("triton").batch_invariant = True
    moe = qmoe.MoE(spec, weights, backend="triton")   # its plan reads the invariant table

For the commands, `INVARIANT` is the backend in that mode (--backend qmoe.backends.triton:INVARIANT).
Ids outside [-1, E) are dropped by the grouping and poison their token's output row with NaN
inside the combine kernel: no host sync, no out-of-bounds access (`poisons_bad_ids`).
"""

from __future__ import annotations

import torch

from ...spec import MoESpec
from ...weights import ExpertWeights
from ..base import Backend, Prepared, Support, cuda_capability
from . import configs as _configs


class TritonBackend(Backend):
    name = "triton"
    formats = ("mxfp4", "nvfp4", "int4")
    capturable = True
    tunable = True
    first_use = "Triton compiles each launch configuration on its first call (seconds; cached on disk)"
    poisons_bad_ids = True

    def __init__(self, batch_invariant: bool = False):
        self.batch_invariant = batch_invariant

    def format_hint(self, fmt):
        return " (use the reference backend)" if fmt == "bf16" else ""

    def _supports(self, spec, fmt, device) -> Support:
        try:
            import triton
        except Exception as e:  # an import error is a reason, never a crash
            return Support(False, f"triton is not importable: {e}")
        if device.type == "cuda":
            cap = cuda_capability(device)
            if cap is None:
                return Support(False, "no CUDA GPU is visible")
            if cap < (8, 0):
                return Support(False, f"needs a GPU of compute capability 8.0 or newer (bf16 MMA); "
                                      f"this one is {cap[0]}.{cap[1]}")
            if cap == (9, 0):   # wgmma, Hopper's only: a known Triton race on its register operands
                from ...kernels import register_wgmma_hazard

                hazard = register_wgmma_hazard(triton.__version__)
                if hazard:
                    return Support(True, f"Triton kernels on SM90; caveat: {hazard}")
            return Support(True, f"Triton kernels on SM{cap[0]}{cap[1]}")
        if device.type == "cpu":
            from ...kernels import interpreted

            if interpreted():
                return Support(True, "Triton interpreter on the CPU (TRITON_INTERPRET=1; slow, tiny shapes)")
            return Support(False, "needs a CUDA GPU; on the CPU only through Triton's interpreter "
                                  "(set TRITON_INTERPRET=1 before starting Python)")
        return Support(False, f"device type {device.type} is not supported")

    def _prepare(self, spec: MoESpec, weights: ExpertWeights) -> Prepared:
        from ...kernels.moe import MoEKernelWeights

        kw = MoEKernelWeights.from_canonical(
            weights.format, weights.w13.data, weights.w13.scales, weights.w2.data, weights.w2.scales,
            weights.w13.global_scale, weights.w2.global_scale, weights.b13, weights.b2)
        gpu = torch.cuda.get_device_name(weights.device) if weights.device.type == "cuda" else "cpu"
        configs, notes = _configs.load_configs(gpu, weights.format, spec, _configs.USER_TABLE.path(),
                                               batch_invariant=self.batch_invariant)
        tensors = {n: getattr(kw, n) for n in ("w13", "s13", "w2", "s2", "gs13", "gs2", "b13", "b2")
                   if getattr(kw, n) is not None}
        return Prepared(self.name, spec, weights.format, weights.device, tensors,
                        meta={"kernel_weights": kw, "gpu": gpu, "configs": configs, "config_notes": notes + kw.notes,
                              "runners": {}, "batch_invariant": self.batch_invariant})

    def config_for(self, prepared: Prepared, m: int):
        """The launch configuration used for m tokens (the table's, by the one bucket rule, else
        the default)."""
        return _configs.config_for(prepared.meta["configs"], m, prepared.spec, prepared.format,
                                   prepared.meta["batch_invariant"])

    def runner(self, prepared: Prepared, m: int):
        """forward for m tokens with its launch configuration bound (resolved once per m)."""
        run = prepared.meta["runners"].get(m)
        if run is None:
            cfg = self.config_for(prepared, m)
            kw, act = prepared.meta["kernel_weights"], prepared.spec.activation
            from ...kernels.moe import fused_moe  # imported once per m, not on every call

            def run(x, topk_ids, topk_weights, out, shared_output=None):
                return fused_moe(x, topk_ids, topk_weights, kw, act.alpha, act.beta, act.limit, cfg, out,
                                 shared_output)

            prepared.meta["runners"][m] = run
        return run

    def forward(self, prepared, x, topk_ids, topk_weights, out, shared_output=None, config=None):
        """As Backend.forward; config: a KernelConfig to run instead of the table's (tuning, tests)."""
        if x.shape[0] == 0:
            return out
        if config is None:
            return self.runner(prepared, x.shape[0])(x, topk_ids, topk_weights, out, shared_output)
        from ...kernels.moe import fused_moe

        act = prepared.spec.activation
        return fused_moe(x, topk_ids, topk_weights, prepared.meta["kernel_weights"], act.alpha, act.beta,
                         act.limit, config, out, shared_output)

    def tune(self, spec: MoESpec, fmt: str, ms, device, **kwargs) -> dict:
        """Time candidate launch configurations per M on this GPU and keep the fastest (see tune.py)."""
        from .tune import tune

        return tune(self, spec, fmt, ms, device, **kwargs)


BACKEND = TritonBackend()

INVARIANT = TritonBackend(batch_invariant=True)
"""The backend in batch-invariant mode, for the commands, which take "module:attr" backend names:
`qmoe check --backend qmoe.backends.triton:INVARIANT --require invariant` qualifies the mode on
this GPU, `qmoe bench --backend triton,qmoe.backends.triton:INVARIANT` times both modes side by
side. In code, `qmoe.MoE(spec, weights, backend="qmoe.backends.triton:INVARIANT")` runs it too."""
