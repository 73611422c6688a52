"""The `triton` backend: qmoe's own Triton kernels (kernels/moe.py) for W4A16 MoE.

Formats: mxfp4, nvfp4, int4 (group 32). Runs on CUDA GPUs Triton supports, and on the CPU
through Triton's interpreter (TRITON_INTERPRET=1; slow, for tests on tiny shapes).

Launch configurations come from a table keyed by GPU name, format, shape (E, H, I, top_k)
and M bucket: `triton_configs.json` beside this file (shipped, measured by `qmoe tune
--kernels`) and the user's file (QMOE_TRITON_CONFIGS, default ~/.cache/qmoe/triton_configs.json)
on top; `default_config` covers anything not in a table.
"""

from __future__ import annotations

import json
import os
import warnings

import torch

from ..spec import MoESpec
from ..weights import ExpertWeights, random_weights
from .base import Backend, Prepared, Support, cuda_capability

FORMATS = ("mxfp4", "nvfp4", "int4")
M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
_SHIPPED = os.path.join(os.path.dirname(__file__), "triton_configs.json")


def user_config_path() -> str:
    """The user's kernel-config table (QMOE_TRITON_CONFIGS overrides the default path)."""
    return os.environ.get("QMOE_TRITON_CONFIGS") or os.path.join(
        os.path.expanduser("~"), ".cache", "qmoe", "triton_configs.json")


def bucket_of(m: int) -> int:
    """The largest M bucket <= m (1 for m <= 1)."""
    b = M_BUCKETS[0]
    for v in M_BUCKETS:
        if v <= m:
            b = v
    return b


def shape_key(fmt: str, E: int, H: int, I: int, top_k: int) -> str:
    return f"{fmt}:E{E}:H{H}:I{I}:k{top_k}"


def default_config(m: int, top_k: int, num_experts: int, fmt: str = "mxfp4"):
    """Launch configuration when no table entry exists, from `qmoe tune` runs on an H100 at
    gpt-oss-120b shapes (docs/performance.md): 16-row blocks while experts see up to ~12
    tokens (narrow 32-column tiles when almost every expert sees at most one token, so more
    programs stream the few active experts), 32-row blocks up to ~48 tokens per expert, then
    128-row blocks (int4 from 32 rows up with the weight as the MMA's first operand; the
    E2M1 formats cannot: see kernels/moe.py)."""
    from ..kernels.moe import KernelConfig

    swap = fmt == "int4"
    per_expert = m * top_k / num_experts
    if per_expert <= 0.1:
        return KernelConfig(block_m=16, block_n1=32, block_n2=32, swap=False, num_warps=4, num_stages=3, k_unroll=4)
    if per_expert <= 12:
        return KernelConfig(block_m=16, block_n1=64, block_n2=64, swap=False, num_warps=4, num_stages=3, k_unroll=4)
    if per_expert <= 48:
        return KernelConfig(block_m=32, block_n1=64, block_n2=64, swap=swap, num_warps=4, num_stages=3, k_unroll=2)
    if swap:
        return KernelConfig(block_m=128, block_n1=64, block_n2=64, swap=True, num_warps=4, num_stages=3, k_unroll=2)
    return KernelConfig(block_m=128, block_n1=128, block_n2=128, swap=False, num_warps=8, num_stages=3, k_unroll=2)


def _read_table(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        warnings.warn(f"qmoe: ignoring unreadable kernel-config table {path}: {e}")
        return {}


def load_config_table(gpu_name: str) -> dict:
    """{shape key: {M bucket (str): config dict}} for this GPU: shipped table, then the user's."""
    table = {}
    for path in (_SHIPPED, user_config_path()):
        for key, buckets in _read_table(path).get(gpu_name, {}).items():
            table.setdefault(key, {}).update(buckets)
    return table


class TritonBackend(Backend):
    name = "triton"

    def supports(self, spec, fmt, device) -> Support:
        try:
            import triton  # noqa: F401
        except Exception as e:  # an import error is a reason, never a crash
            return Support(False, f"triton is not importable: {e}")
        if fmt not in FORMATS:
            return Support(False, f"format {fmt} is not one of {', '.join(FORMATS)} (use the reference backend)")
        device = torch.device(device)
        if device.type == "cuda":
            cap = cuda_capability(device)
            if cap is None:
                return Support(False, "no CUDA GPU is visible")
            if cap < (8, 0):
                return Support(False, f"needs a GPU of compute capability 8.0 or newer (bf16 MMA); "
                                      f"this one is {cap[0]}.{cap[1]}")
            return Support(True, f"Triton kernels on SM{cap[0]}{cap[1]}")
        if device.type == "cpu":
            from ..kernels.moe import interpreted

            if interpreted():
                return Support(True, "Triton interpreter on the CPU (TRITON_INTERPRET=1; slow, tiny shapes)")
            return Support(False, "needs a CUDA GPU; on the CPU only through Triton's interpreter "
                                  "(set TRITON_INTERPRET=1 before starting Python)")
        return Support(False, f"device type {device.type} is not supported")

    def prepare(self, spec: MoESpec, weights: ExpertWeights) -> Prepared:
        from ..kernels.moe import MoEKernelWeights

        sup = self.supports(spec, weights.format, weights.device)
        if not sup.ok:
            raise ValueError(f"backend: triton cannot run {weights.format} on {weights.device}: {sup.reason}")
        kw = MoEKernelWeights.from_canonical(
            weights.format, weights.w13.data, weights.w13.scales, weights.w2.data, weights.w2.scales,
            weights.w13.global_scale, weights.w2.global_scale, weights.b13, weights.b2)
        gpu = torch.cuda.get_device_name(weights.device) if weights.device.type == "cuda" else "cpu"
        key = shape_key(weights.format, spec.num_experts, spec.hidden_size, spec.intermediate_size, spec.top_k)
        configs = load_config_table(gpu).get(key, {})
        tensors = {n: getattr(kw, n) for n in ("w13", "s13", "w2", "s2", "gs13", "gs2", "b13", "b2")
                   if getattr(kw, n) is not None}
        return Prepared(self.name, spec, weights.format, weights.device, tensors,
                        meta={"kernel_weights": kw, "gpu": gpu, "configs": configs, "shape_key": key})

    def config_for(self, prepared: Prepared, m: int):
        """The launch configuration used for m tokens (table entry for m's bucket, else default)."""
        from ..kernels.moe import KernelConfig

        entry = prepared.meta["configs"].get(str(bucket_of(m)))
        fmt = prepared.meta["kernel_weights"].fmt
        if entry and not (entry.get("swap") and fmt != "int4"):  # swap entries from older tables: unusable
            return KernelConfig(**entry)
        spec = prepared.spec
        return default_config(m, spec.top_k, spec.num_experts, prepared.meta["kernel_weights"].fmt)

    def forward(self, prepared, x, topk_ids, topk_weights, out, shared_output=None, config=None):
        from ..kernels.moe import fused_moe

        if x.shape[0] == 0:
            return out
        act = prepared.spec.activation
        cfg = config or self.config_for(prepared, x.shape[0])
        return fused_moe(x, topk_ids, topk_weights, prepared.meta["kernel_weights"],
                         act.alpha, act.beta, act.limit, cfg, out, shared_output)


    def candidates(self, m: int, top_k: int, num_experts: int, fmt: str = "mxfp4"):
        """Launch configurations worth timing at m tokens (about a dozen), from what won where
        on an H100 (docs/performance.md)."""
        from ..kernels.moe import KernelConfig as C

        per_expert = m * top_k / num_experts
        out = [default_config(m, top_k, num_experts, fmt)]
        if per_expert <= 12:
            out += [C(16, n1, n2, False, 4, st, u) for n1, n2 in ((32, 32), (32, 64), (64, 64))
                    for u in (2, 4) for st in (2, 3)]
            out += [C(16, 128, 128, False, 8, 3, 2), C(16, 64, 128, False, 4, 3, 4)]
        if per_expert <= 0.5:  # few active experts: GEMM2 as two half-K programs per tile
            out += [C(16, n1, n2, False, 4, 3, u, split_k=2) for n1, n2 in ((32, 32), (32, 64), (64, 64))
                    for u in (2, 4)]
        if 2 <= per_expert <= 64:
            out += [C(32, 64, 64, sw, 4, 3, u) for sw in (False, True) for u in (2, 4)]
            out += [C(64, 64, 64, True, 4, 3, 2)]
        if per_expert >= 16:
            out += [C(64, 128, 128, True, 8, 3, 2), C(128, 64, 64, True, 4, 3, 2), C(128, 64, 64, True, 4, 2, 2),
                    C(128, 64, 128, True, 4, 3, 2), C(128, 128, 128, True, 8, 3, 1), C(128, 128, 128, True, 8, 3, 2),
                    C(128, 128, 128, False, 8, 3, 2), C(64, 128, 128, False, 8, 3, 2), C(128, 64, 64, False, 4, 3, 2),
                    C(128, 128, 64, False, 8, 3, 2)]
        if fmt != "int4":  # the E2M1 decode has no wgmma-operand (swap) variant
            out = [c for c in out if not c.swap]
        return list(dict.fromkeys(out))

    def tune(self, spec: MoESpec, fmt: str, ms, device, progress=None, weights: ExpertWeights | None = None,
             reps: int = 20, write: bool = True) -> dict:
        """Time candidate launch configurations per M bucket on this GPU and keep the fastest.

        Each candidate's output is compared with the default configuration's (relative
        difference <= 1e-2, all elements written) before it may win. Returns
        {"gpu", "shape_key", "buckets": {bucket: {"config", "us", "default_us", "tried"}}};
        with write=True the winners go into the user's table (atomic replace).
        progress: None, a rich.progress.Progress (a task is added to it), or a callable
        progress(done, total, text) called after each candidate.
        """
        from dataclasses import asdict

        from ..kernels.moe import fused_moe
        from ..routing import route
        from ..timing import measure

        device = torch.device(device)
        warmup = 5
        if device.type == "cpu":  # the interpreter: times mean little there, keep the run short
            warmup, reps = 1, min(reps, 2)
        weights = weights or random_weights(spec, fmt, device, bias_std=0.5)
        prep = self.prepare(spec, weights)
        kw, act = prep.meta["kernel_weights"], spec.activation
        plan = [(bucket_of(m), self.candidates(bucket_of(m), spec.top_k, spec.num_experts, fmt)) for m in ms]
        total, done = sum(len(c) for _, c in plan), 0
        result = {"gpu": prep.meta["gpu"], "shape_key": prep.meta["shape_key"], "buckets": {}}
        if progress is not None and hasattr(progress, "add_task"):
            # a rich Progress; its columns may render custom fields (qmoe tune shows "what")
            bar, task = progress, progress.add_task("triton kernel configs", total=total, what="triton kernels")
            progress = (lambda d, t, text: bar.update(task, completed=d, description=f"triton {text}",
                                                      what=f"triton {text}"))
        for m, cands in plan:
            g = torch.Generator(device=device).manual_seed(m)
            x = torch.randn(m, spec.hidden_size, device=device, generator=g).to(torch.bfloat16)
            ids, w = route(spec, torch.randn(m, spec.num_experts, device=device, generator=g))
            base_cfg = default_config(m, spec.top_k, spec.num_experts, fmt)
            base = fused_moe(x, ids, w, kw, act.alpha, act.beta, act.limit, base_cfg,
                             torch.empty(m, spec.hidden_size, dtype=torch.bfloat16, device=device))
            best, tried = None, []
            for cfg in cands:
                out = torch.full_like(base, float("nan"))
                entry = {"config": asdict(cfg)}
                try:
                    fused_moe(x, ids, w, kw, act.alpha, act.beta, act.limit, cfg, out)
                    diff = ((out.float() - base.float()).norm() / base.float().norm()).item()
                    if not bool(torch.isfinite(out).all()) or diff > 1e-2:
                        entry["rejected"] = f"differs from the default configuration (rel. {diff:.2e})"
                    else:
                        entry["us"] = measure(lambda: fused_moe(x, ids, w, kw, act.alpha, act.beta, act.limit,
                                                                cfg, out), device=device, warmup=warmup,
                                              reps=reps)["median_us"]
                        if best is None or entry["us"] < best["us"]:
                            best = entry
                except Exception as e:  # e.g. out of shared memory for a large tile: skip it
                    entry["rejected"] = f"{type(e).__name__}: {str(e)[:200]}"
                tried.append(entry)
                done += 1
                if progress:
                    progress(done, total, f"M={m} bm{cfg.block_m} n{cfg.block_n1}/{cfg.block_n2}")
            default_us = measure(lambda: fused_moe(x, ids, w, kw, act.alpha, act.beta, act.limit, base_cfg, base),
                                 device=device, warmup=warmup, reps=reps)["median_us"]
            if best is not None:
                result["buckets"][str(m)] = {"config": best["config"], "us": best["us"],
                                             "default_us": default_us, "tried": tried}
        if write and result["buckets"]:
            write_configs(result["gpu"], result["shape_key"],
                          {b: v["config"] for b, v in result["buckets"].items()}, user_config_path())
        return result


def write_configs(gpu: str, key: str, buckets: dict, path: str) -> None:
    """Merge {bucket: config dict} for (gpu, shape key) into a table file, atomically."""
    import tempfile

    table = _read_table(path)
    table.setdefault(gpu, {}).setdefault(key, {}).update(buckets)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


BACKEND = TritonBackend()
