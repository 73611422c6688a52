"""`qmoe bench`: latency of every usable backend over presets x formats x token counts, next to
the roofline of the same GPU measured at the start of the run. A benchmark, never a test.

Per cell: microseconds (median of CUDA-graph replays), GB/s of the distinct experts' packed
weight bytes the call touches, TFLOP/s, and % of the roofline floor, where
floor = max(bytes / copy bandwidth, FLOPs / bf16 GEMM rate) with bytes = distinct experts'
weights + scales + biases + x read + out written (logical, unpadded shapes).
qmoe's backends are timed through `MoE.__call__`, so routing (top-k and token grouping) is
included; `experts_us` is the same call from given routing.
"""

from __future__ import annotations

import json
import os
import time

import torch

DEFAULT_TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 8192)


def add_arguments(p):
    p.add_argument("--preset", action="append", help="preset name (repeatable; default gpt-oss-120b)")
    p.add_argument("--format", action="append", dest="formats",
                   help="mxfp4 | nvfp4 | int4 (repeatable; default: the preset's own format)")
    p.add_argument("--tokens", default=",".join(map(str, DEFAULT_TOKENS)),
                   help="comma-separated token counts M (default %(default)s)")
    p.add_argument("--backend", action="append", dest="backends", help="backend name (repeatable; default all usable)")
    p.add_argument("--reference-max-tokens", type=int, default=64,
                   help="time the (slow) reference backend only up to this M (default %(default)s)")
    p.add_argument("--no-check", action="store_true", help="skip the relative-error check against float64")
    p.add_argument("--reps", type=int, default=50, help="timed replays per cell (default %(default)s)")
    p.add_argument("--json", default="qmoe-bench.json", help="where to write the results (default %(default)s)")
    p.add_argument("--plot", default="qmoe-bench.png", help="PNG plot of latency against M ('' for none)")
    p.add_argument("--seed", type=int, default=0)


def cell_metrics(spec, weights, topk_ids, us: float, roof: dict, x_bytes: int, out_bytes: int) -> dict:
    """GB/s, TFLOP/s and % of roofline for one timed call."""
    M = topk_ids.shape[0]
    ids = topk_ids[topk_ids >= 0]
    active = int(torch.unique(ids).numel())
    wbytes = active * weights.expert_nbytes()
    bias_bytes = active * (2 * spec.intermediate_size + spec.hidden_size) * 4 if weights.has_bias else 0
    flops = 2 * int(ids.numel()) * 3 * spec.hidden_size * spec.intermediate_size
    d = {"M": M, "active_experts": active, "weight_bytes": wbytes, "flops": flops, "us": us,
         "GBps": wbytes / (us * 1e-6) / 1e9, "TFLOPs": flops / (us * 1e-6) / 1e12}
    if roof.get("copy_GBps"):
        t_mem = (wbytes + bias_bytes + x_bytes + out_bytes) / (roof["copy_GBps"] * 1e9) * 1e6
        t_flop = flops / (roof["bf16_TFLOPs"] * 1e12) * 1e6
        d["floor_us"] = max(t_mem, t_flop)
        d["floor_bound"] = "memory" if t_mem >= t_flop else "compute"
        d["pct_roofline"] = 100.0 * d["floor_us"] / us
    return d


def _inputs(spec, M, device, seed):
    g = torch.Generator(device=device).manual_seed(10_000 + seed * 7919 + M)
    x = torch.randn(M, spec.hidden_size, device=device, generator=g).to(torch.bfloat16)
    logits = torch.randn(M, spec.num_experts, device=device, generator=g)
    return x, logits


def run_bench(presets, formats, tokens, backends, *, device, reps=50, check=True, ref_max_tokens=64,
              seed=0, log=print) -> dict:
    """Measure; returns the result dict (see module doc). `log` receives progress lines."""
    from . import MoE
    from .backends import BACKEND_NAMES, get_backend
    from .backends.reference import reference_moe
    from .dispatch import route  # what MoE.__call__ runs (the fused kernel on a GPU)
    from .spec import PRESET_FORMATS, preset
    from .timing import measure, roofline
    from .weights import random_weights
    from .envinfo import collect as env_collect

    device = torch.device(device)
    res = {"env": env_collect(), "roofline": roofline(device, copy_bytes=4 << 30), "cells": [], "started": time.time()}
    roof = res["roofline"]
    if roof.get("copy_GBps"):
        log(f"roofline: copy {roof['copy_GBps']:.0f} GB/s, bf16 GEMM {roof['bf16_TFLOPs']:.0f} TFLOP/s")
    for pname in presets:
        spec = preset(pname)
        for fmt in formats or [PRESET_FORMATS[pname]]:
            t0 = time.time()
            weights = random_weights(spec, fmt, device, seed, bias_std=0.5)
            log(f"{pname} {fmt}: weights ready in {time.time() - t0:.1f} s ({weights.nbytes / 2**30:.2f} GiB)")
            names = backends or [n for n in BACKEND_NAMES]
            moes = {}
            for name in names:
                try:
                    sup = get_backend(name).supports(spec, fmt, device)
                except Exception as e:  # a backend module that cannot import is reported, not fatal
                    sup = (False, f"{type(e).__name__}: {e}")
                if not sup[0]:
                    log(f"  {name}: not usable: {sup[1]}")
                    res["cells"].append({"preset": pname, "format": fmt, "backend": name, "skipped": sup[1]})
                    continue
                t1 = time.time()
                moes[name] = MoE(spec, weights, backend=name, check_ids=False)
                log(f"  {name}: prepared in {time.time() - t1:.1f} s")
            for M in tokens:
                x, logits = _inputs(spec, M, device, seed)
                ids, w = route(spec, logits)
                ref = reference_moe(spec, weights, x, ids, w) if check else None
                for name, moe in moes.items():
                    if name == "reference" and M > ref_max_tokens:
                        continue
                    cell = {"preset": pname, "format": fmt, "backend": name}
                    if check:
                        out = torch.full((M, spec.hidden_size), float("nan"), dtype=torch.bfloat16, device=device)
                        moe(x, logits, out=out)
                        err = ((out.double() - ref).norm() / ref.norm()).item()
                        cell["rel_err"] = err
                        cell["all_written"] = bool(torch.isfinite(out).all())
                    out = torch.empty(M, spec.hidden_size, dtype=torch.bfloat16, device=device)
                    t_full = measure(lambda: moe(x, logits, out=out), device=device, reps=reps, max_seconds=5)
                    t_exp = measure(lambda: moe.experts(x, ids, w, out=out), device=device, reps=reps,
                                    max_seconds=5)
                    cell.update(cell_metrics(spec, weights, ids, t_full["median_us"], roof,
                                             x.numel() * 2, out.numel() * 2))
                    cell["experts_us"] = t_exp["median_us"]
                    cell["timed_with"] = t_full["method"]
                    if t_full.get("note"):
                        cell["timing_note"] = t_full["note"]
                    res["cells"].append(cell)
                    log(f"  M={M:5d} {name:20s} {cell['us']:10.1f} us  experts {cell['experts_us']:10.1f} us"
                        f"  err {cell.get('rel_err', float('nan')):.2e}  {cell.get('pct_roofline', 0):5.1f}% roof")
            del moes, weights
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return res


def format_table(res: dict) -> str:
    """A text table: one block per (preset, format), rows M, a column per backend."""
    lines = []
    roof = res.get("roofline") or {}
    if roof.get("copy_GBps"):
        lines.append(f"{roof['device']}: copy {roof['copy_GBps']:.0f} GB/s, bf16 GEMM {roof['bf16_TFLOPs']:.0f} TFLOP/s"
                     f"; times in us (median of CUDA-graph replays, routing included), "
                     f"(% of roofline), rel. error vs float64")
    cells = [c for c in res["cells"] if "us" in c]
    for key in dict.fromkeys((c["preset"], c["format"]) for c in cells):
        sub = [c for c in cells if (c["preset"], c["format"]) == key]
        names = list(dict.fromkeys(c["backend"] for c in sub))
        lines.append(f"\n{key[0]} {key[1]}")
        lines.append(f"{'M':>6} {'floor':>8} " + " ".join(f"{n:>28}" for n in names))
        for M in sorted({c["M"] for c in sub}):
            row = {c["backend"]: c for c in sub if c["M"] == M}
            floor = next((c.get("floor_us") for c in row.values() if c.get("floor_us")), None)
            cols = []
            for n in names:
                c = row.get(n)
                if c is None:
                    cols.append(f"{'-':>28}")
                else:
                    cols.append(f"{c['us']:>10.1f} ({c.get('pct_roofline', 0):4.0f}%) {c.get('rel_err', float('nan')):9.1e}")
            lines.append(f"{M:>6} {floor if floor is None else round(floor, 1)!s:>8} " + " ".join(cols))
    return "\n".join(lines)


def plot(res: dict, path: str) -> str | None:
    """Latency against M per backend (log-log), roofline floor drawn; None if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cells = [c for c in res["cells"] if "us" in c]
    keys = list(dict.fromkeys((c["preset"], c["format"]) for c in cells))
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(6 * max(1, len(keys)), 4.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        sub = [c for c in cells if (c["preset"], c["format"]) == key]
        for n in dict.fromkeys(c["backend"] for c in sub):
            pts = sorted((c["M"], c["us"]) for c in sub if c["backend"] == n)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=n)
        fl = sorted({(c["M"], c["floor_us"]) for c in sub if c.get("floor_us")})
        if fl:
            ax.plot([p[0] for p in fl], [p[1] for p in fl], "k--", label="roofline floor")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens M")
        ax.set_ylabel("microseconds")
        ax.set_title(f"{key[0]} {key[1]}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(args) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        print("qmoe bench: no CUDA GPU here; timings on the CPU mean little (use --preset with tiny tokens "
              "only to try the command)")
    try:
        tokens = [int(v) for v in args.tokens.split(",") if v]
    except ValueError:
        print(f"qmoe bench: --tokens: expected comma-separated integers, got {args.tokens!r}")
        return 2
    res = run_bench(args.preset or ["gpt-oss-120b"], args.formats, tokens, args.backends, device=device,
                    reps=args.reps, check=not args.no_check, ref_max_tokens=args.reference_max_tokens,
                    seed=args.seed)
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)
    if args.plot:
        p = plot(res, args.plot)
        print(f"plot: {p}" if p else "plot: matplotlib is not installed (pip install qmoe[plot])")
    print(f"results: {os.path.abspath(args.json)}")
    print(format_table(res))
    return 0
