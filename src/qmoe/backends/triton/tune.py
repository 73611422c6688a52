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
    <= 1e-2, every element written) before it may win. The FINALISTS fastest of that first pass
    (and the fastest batch-invariant one) are then timed again against each other, interleaved
    (qmoe.timing.measure_many) with the default configuration beside them, and the winners come from
    that round (a finalist that fails in it is left out): the first pass times each
    candidate alone, and decode candidates within a few percent of each other change places with
    the clock from one pass to the next.
    Two winners per M are kept: the fastest configuration, and the fastest of the batch-invariant
    family (configs.invariant, and bitwise equal to the family's default configuration on these
    inputs: the family is a rule measured on an H200, this is its check on this GPU; a member that
    differs is marked "not_invariant" and never wins that entry); both go into the user's table
    (the latter in the batch-invariant entry), so either mode of the backend runs its own best.
    Returns {"gpu", "problem", "buckets": {m: {"config", "us", "default_us", "invariant_config",
    "invariant_us", "tried"}}, "path"}; "us", "invariant_us" and "default_us" are times in the
    final round (the first pass's where no finalist of the kind ran in it); "tried" holds every
    candidate's first-pass time ("us") or why it was rejected ("rejected") and, for the
    finalists, their final-round time ("final_us") or why they failed there ("final_error").
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
    plan = [(m, [_configs.with_whole_k(c, fmt, spec.hidden_size, kw.Hp)
                 for c in _configs.candidates(m, spec.top_k, spec.num_experts, fmt, padded=(kw.Hp, kw.Ip))])
            for m in sorted(set(ms))]
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
        inv_cfg = _configs.default_config(m, spec.top_k, spec.num_experts, fmt, True)
        base_inv = backend.forward(prep, x, ids, w, torch.empty_like(base), config=inv_cfg)
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
                    if _configs.invariant(cfg) and not torch.equal(out, base_inv):
                        entry["not_invariant"] = "its bits differ from the batch-invariant default's here"
                    entry["us"] = measure(lambda: backend.forward(prep, x, ids, w, out, config=cfg),
                                          device=device, warmup=warmup, reps=reps)["median_us"]
                    if best is None or entry["us"] < best[1]:
                        best = (cfg, entry["us"])
                    if _invariant(entry) and (best_inv is None or entry["us"] < best_inv[1]):
                        best_inv = (cfg, entry["us"])
            except Exception as e:  # e.g. out of shared memory for a large tile: skip it
                entry["rejected"] = f"{type(e).__name__}: {str(e)[:200]}"
            tried.append(entry)
            done += 1
            if progress:
                progress(done, total, f"M={m} bm{cfg.block_m} n{cfg.block_n1}/{cfg.block_n2}")
        if best is not None:   # the finalists again, interleaved, with the default beside them
            final, final_inv, default_us = _final_round(backend, prep, x, ids, w, tried, base_cfg, device, warmup,
                                                        reps)
            best, best_inv = final or best, final_inv or best_inv
            result["buckets"][m] = {"config": best[0], "us": best[1], "default_us": default_us, "tried": tried,
                                    "invariant_config": best_inv[0] if best_inv else None,
                                    "invariant_us": best_inv[1] if best_inv else None}
    if write and result["buckets"]:
        b = result["buckets"]
        _configs.write_configs(result["gpu"], fmt, spec, {m: v["config"] for m, v in b.items()}, path)
        inv = {m: v["invariant_config"] for m, v in b.items() if v["invariant_config"] is not None}
        result["path"] = str(_configs.write_configs(result["gpu"], fmt, spec, inv, path, batch_invariant=True))
    return result


def _invariant(entry) -> bool:
    """Whether a tried candidate may win the batch-invariant entry: in the family by its
    configuration (configs.invariant) and bitwise equal to the family's default on this GPU."""
    from ...kernels.moe import KernelConfig

    return _configs.invariant(KernelConfig(**entry["config"])) and "not_invariant" not in entry


FINALISTS = 3
"""The fastest candidates of the first pass that are timed again, interleaved, per M."""


def _final_round(backend, prep, x, ids, w, tried, base_cfg, device, warmup, reps):
    """Re-time the first pass's FINALISTS fastest candidates, its fastest batch-invariant one and
    the default configuration against each other, interleaved. Returns (best, best_inv,
    default_us): (config, us) of the fastest and of the fastest invariant finalist in that round
    (None where none ran), and the default's time in it. Each finalist's entry of `tried` gets its
    time in the round as "final_us", or why it failed there as "final_error"."""
    from ...kernels.moe import KernelConfig
    from ...timing import measure_many

    timed = sorted((t for t in tried if "us" in t), key=lambda t: t["us"])
    finalists = timed[:FINALISTS]
    inv = [t for t in timed if _invariant(t)]
    if inv and inv[0] not in finalists:
        finalists.append(inv[0])
    configs = [KernelConfig(**t["config"]) for t in finalists]
    runs = configs + ([] if base_cfg in configs else [base_cfg])
    outs = [torch.empty(x.shape[0], x.shape[1], dtype=torch.bfloat16, device=device) for _ in runs]
    fns = {i: (lambda i=i, c=c: backend.forward(prep, x, ids, w, outs[i], config=c)) for i, c in enumerate(runs)}
    res = measure_many(fns, device=device, warmup=warmup, reps=reps)
    for i, t in enumerate(finalists):
        if "median_us" in res[i]:
            t["final_us"] = res[i]["median_us"]
        else:
            t["final_error"] = res[i].get("error", "no time")
    ran = [(c, t["final_us"]) for c, t in zip(configs, finalists) if "final_us" in t]
    ran_inv = [(c, t["final_us"]) for c, t in zip(configs, finalists) if "final_us" in t and _invariant(t)]
    best = min(ran, key=lambda r: r[1]) if ran else None
    best_inv = min(ran_inv, key=lambda r: r[1]) if ran_inv else None
    return best, best_inv, res[runs.index(base_cfg)].get("median_us")


__all__ = ["tune"]
