"""Kernel-level tuning of the triton backend (`qmoe tune --kernels`): time the candidate launch
configurations per M bucket on this GPU, keep the fastest correct one, write the user's table."""

from __future__ import annotations

from dataclasses import asdict

import torch

from ...weights import random_weights
from . import configs as _configs


def tune(backend, spec, fmt: str, ms, device, progress=None, weights=None, reps: int = 20,
         write: bool = True, path=None) -> dict:
    """Time candidate launch configurations (configs.candidates) per M and keep the fastest.

    spec, fmt: the problem; ms: token counts (each is a bucket of its own); device: a CUDA
    device (or the CPU under the interpreter, for tests: timings mean nothing there);
    progress: None, a rich.progress.Progress (a task is added to it), or a callable
    progress(done, total, text) called after each candidate; weights: ExpertWeights to use
    (default: random ones); reps: timed replays per candidate (CUDA graphs, L2 flushed);
    write: merge the winners into the user's config table (`path`, default its usual place).
    Each candidate's output is compared with the default configuration's (relative difference
    <= 1e-2, every element written) before it may win.
    Two winners per M are kept: the fastest configuration, and the fastest of the batch-invariant
    family (configs.invariant); both go into the user's table (the latter in the batch-invariant
    entry), so either mode of the backend runs its own best.
    Returns {"gpu", "problem", "buckets": {m: {"config", "us", "default_us", "invariant_config",
    "invariant_us", "tried"}}, "path"}.
    """
    from ...kernels.moe import MoEKernelWeights  # noqa: F401  (fails early without triton)
    from ...routing import route
    from ...timing import measure

    device = torch.device(device)
    if write:
        _configs.USER_TABLE.check_writable(path)
    warmup = 5
    if device.type == "cpu":  # the interpreter: times mean little there, keep the run short
        warmup, reps = 1, min(reps, 2)
    weights = weights or random_weights(spec, fmt, device)
    prep = backend.prepare(spec, weights)
    kw = prep.meta["kernel_weights"]
    plan = [(m, [c for c in _configs.candidates(m, spec.top_k, spec.num_experts, fmt)
                 if c.problem_with(fmt, kw.Hp, kw.Ip) is None]) for m in sorted(set(ms))]
    total, done = sum(len(c) for _, c in plan), 0
    result = {"gpu": prep.meta["gpu"], "problem": _configs.problem(prep.meta["gpu"], fmt, spec), "buckets": {}}
    if progress is not None and hasattr(progress, "add_task"):
        bar = progress
        task = bar.add_task("triton kernel configs", total=total, what="triton kernels")
        progress = (lambda d, t, text: bar.update(task, completed=d, description=f"triton {text}",
                                                  what=f"triton {text}"))
    for m, cands in plan:
        g = torch.Generator(device=device).manual_seed(m)
        x = torch.randn(m, spec.hidden_size, device=device, generator=g).to(torch.bfloat16)
        ids, w = route(spec, torch.randn(m, spec.num_experts, device=device, generator=g))
        base_cfg = _configs.default_config(m, spec.top_k, spec.num_experts, fmt)
        base = backend.forward(prep, x, ids, w, torch.empty(m, spec.hidden_size, dtype=torch.bfloat16,
                                                            device=device), config=base_cfg)
        best, best_inv, tried = None, None, []
        for cfg in cands:
            out = torch.full_like(base, float("nan"))
            entry = {"config": asdict(cfg)}
            try:
                backend.forward(prep, x, ids, w, out, config=cfg)
                diff = ((out.float() - base.float()).norm() / base.float().norm()).item()
                if not bool(torch.isfinite(out).all()) or diff > 1e-2:
                    entry["rejected"] = f"differs from the default configuration (rel. {diff:.2e})"
                else:
                    entry["us"] = measure(lambda: backend.forward(prep, x, ids, w, out, config=cfg),
                                          device=device, warmup=warmup, reps=reps)["median_us"]
                    if best is None or entry["us"] < best[1]:
                        best = (cfg, entry["us"])
                    if _configs.invariant(cfg) and (best_inv is None or entry["us"] < best_inv[1]):
                        best_inv = (cfg, entry["us"])
            except Exception as e:  # e.g. out of shared memory for a large tile: skip it
                entry["rejected"] = f"{type(e).__name__}: {str(e)[:200]}"
            tried.append(entry)
            done += 1
            if progress:
                progress(done, total, f"M={m} bm{cfg.block_m} n{cfg.block_n1}/{cfg.block_n2}")
        default_us = measure(lambda: backend.forward(prep, x, ids, w, base, config=base_cfg),
                             device=device, warmup=warmup, reps=reps)["median_us"]
        if best is not None:
            result["buckets"][m] = {"config": best[0], "us": best[1], "default_us": default_us, "tried": tried,
                                    "invariant_config": best_inv[0] if best_inv else None,
                                    "invariant_us": best_inv[1] if best_inv else None}
    if write and result["buckets"]:
        b = result["buckets"]
        _configs.write_configs(result["gpu"], fmt, spec, {m: v["config"] for m, v in b.items()}, path)
        inv = {m: v["invariant_config"] for m, v in b.items() if v["invariant_config"] is not None}
        result["path"] = str(_configs.write_configs(result["gpu"], fmt, spec, inv, path, batch_invariant=True))
    return result


__all__ = ["tune"]
