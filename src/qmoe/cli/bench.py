"""`qmoe bench`: every usable backend on the same inputs, over presets x formats x token counts,
beside the ceilings of the same GPU measured at the start of the same run. A benchmark, never
a test.

Per cell: microseconds (median of CUDA-graph replays, the L2 flushed before each replay unless
--no-flush-l2; the replays of every backend at one M interleaved, one of each per round, so
a GPU's clock drift under minutes of full-rate GEMMs reaches all backends alike:
qmoe.timing.measure_many), GB/s of the distinct experts' packed weight bytes the call touches, TFLOP/s,
% of the roofline floor, and the ratio to the best OTHER backend of the same cell, where
floor = max(bytes / read bandwidth, FLOPs / bf16 GEMM rate) (qmoe.timing.floor_us), with
bytes = distinct experts' weights + scales + biases + x read + out written (logical, unpadded).
Two times per cell: `us`, the experts from given routing (what every backend computes, the
figure the ratios compare), and `layer_us`, the same backend's whole `MoE.__call__` (routing
included) for qmoe's own path.

On a CPU the presets are scaled down as `qmoe demo` does (--full for the real shapes): timings
there only try the command out.
"""

from __future__ import annotations

import functools
import time

import torch

from ..support import error_text
from ..tuning.buckets import BUCKETS
from .common import (Steps, add_json_argument, emit_json, json_to_stdout, number, output_path, parse_backends,
                     parse_device, parse_formats, parse_presets, parse_tokens, preset_problems, probe)

DEFAULT_TOKENS = BUCKETS


def add_arguments(p):
    p.add_argument("--preset", action="append", help="preset name (repeat or comma-separate; default gpt-oss-120b)")
    p.add_argument("--format", action="append", dest="formats",
                   help="mxfp4 | nvfp4 | int4 (repeatable; default: the preset's own format)")
    p.add_argument("--tokens", help=f"comma-separated token counts M (default {','.join(map(str, DEFAULT_TOKENS))})")
    p.add_argument("--backend", action="append", dest="backends",
                   help="backend name, or auto (the choice of the tuning table per M) (repeatable; default all usable)")
    p.add_argument("--reference-max-tokens", type=number("--reference-max-tokens", int, 0), default=64,
                   help="time the (slow) reference backend only up to this M (default %(default)s)")
    p.add_argument("--no-check", action="store_true", help="skip the relative-error check against float64")
    p.add_argument("--reps", type=number("--reps", int, 1), default=50, help="timed replays per cell (default %(default)s)")
    p.add_argument("--no-flush-l2", action="store_true",
                   help="do not flush the L2 before each timed replay (weights may then come from L2)")
    p.add_argument("--device", help="device (default cuda if present, else cpu)")
    p.add_argument("--full", action="store_true", help="on a CPU, the presets' real shapes (slow) instead of scaled down")
    add_json_argument(p, "the results")
    p.add_argument("--plot", help="write a PNG plot of latency against M to this path")
    p.add_argument("--seed", type=int, default=0)


def cell_metrics(spec, weights, topk_ids, us: float, roof: dict, x_bytes: int, out_bytes: int) -> dict:
    """GB/s, TFLOP/s and % of roofline for one timed call of `us` microseconds.

    topk_ids: [M, k] the routing the call used (-1 = no expert); x_bytes, out_bytes: bytes of
    the activations read and the output written. Returns {"M", "active_experts",
    "weight_bytes", "bytes", "flops", "us", "GBps", "TFLOPs"} and, with a GPU roofline,
    "floor_us", "floor_bound" ("memory" | "compute") and "pct_roofline".
    """
    from ..timing import floor_us

    M = topk_ids.shape[0]
    ids = topk_ids[(topk_ids >= 0) & (topk_ids < spec.num_experts)]
    active = int(torch.unique(ids).numel())
    wbytes = active * weights.expert_nbytes()
    bias_bytes = active * (2 * spec.intermediate_size + spec.hidden_size) * 4 if weights.has_bias else 0
    flops = spec.flops(ids.numel())
    total = wbytes + bias_bytes + x_bytes + out_bytes
    d = {"M": M, "active_experts": active, "weight_bytes": wbytes, "bytes": total, "flops": flops, "us": us,
         "GBps": wbytes / (us * 1e-6) / 1e9, "TFLOPs": flops / (us * 1e-6) / 1e12}
    fl = floor_us(total, flops, roof)
    if fl is not None:
        d["floor_us"], d["floor_bound"] = fl
        d["pct_roofline"] = 100.0 * fl[0] / us
    return d


def add_ratios(cells: list) -> None:
    """Per cell, `vs_best_other`: its time over the fastest OTHER backend's in the same
    (preset, format, M) (< 1: it is the fastest, by that factor), and `best_other`."""
    groups = {}
    for c in cells:
        if "us" in c:
            groups.setdefault((c["preset"], c["format"], c["M"]), []).append(c)
    for group in groups.values():
        for c in group:
            others = [o for o in group if o is not c and o["backend"] not in ("reference", "auto")]
            if others:
                best = min(others, key=lambda o: o["us"])
                c["vs_best_other"], c["best_other"] = c["us"] / best["us"], best["backend"]


class _Auto:
    """Stands for backend="auto" in the bench (what it runs is the plan's choice per M)."""

    capturable = True


def _inputs(spec, M, device, seed):
    g = torch.Generator(device=device).manual_seed(10_000 + seed * 7919 + M)
    x = torch.randn(M, spec.hidden_size, device=device, generator=g).to(torch.bfloat16)
    logits = torch.randn(M, spec.num_experts, device=device, generator=g)
    return x, logits


def run_bench(problems, tokens, backends, *, device, reps=50, check=True, ref_max_tokens=64, seed=0,
              flush_l2=True, scale_down=False, steps=None) -> dict:
    """Measure; returns the result dict (module doc). problems: [(preset name, format)];
    scale_down: use `qmoe demo`'s CPU shapes; steps: a common.Steps for progress, or None."""
    from .. import MoE
    from ..backends import get_backend
    from ..backends.reference import reference_moe, relative_error
    from ..routing import route
    from ..spec import preset
    from ..timing import measure_many, roofline
    from ..weights import random_weights
    from .demo import scaled_down
    from .env import collect as env_collect

    device = torch.device(device)
    say = steps.note if steps is not None else (lambda text: None)
    res = {"env": env_collect(), "roofline": roofline(device), "cells": [], "started": time.time(),
           "flush_l2": flush_l2, "scaled_down": scale_down}
    roof = res["roofline"]
    if roof.get("read_GBps") or roof.get("copy_GBps"):
        say(f"roofline: read {roof.get('read_GBps') or 0:.0f} GB/s, copy {roof['copy_GBps']:.0f} GB/s "
            f"(eager), bf16 GEMM {roof['bf16_TFLOPs']:.0f} TFLOP/s")
    for pname, fmt in problems:
        spec = preset(pname)
        if scale_down:
            spec = scaled_down(spec)
        t0 = time.time()
        weights = random_weights(spec, fmt, device, seed)
        say(f"{pname} {fmt}: weights ready in {time.time() - t0:.1f} s ({weights.nbytes / 2**30:.2f} GiB)")
        moes = {}

        def skip(name, why, short):  # a backend that cannot run here: reported, the others still run
            say(f"  {name}: {why}")
            res["cells"].append({"preset": pname, "format": fmt, "backend": name, "skipped": why})
            if steps is not None:
                steps.advance(f"{pname} {fmt} {name}: {short}", len(tokens))

        for name in backends:
            b, why = probe(name, spec, fmt, device) if name != "auto" else (_Auto(), "")
            if b is None:
                skip(name, f"not usable: {why}", "not usable")
                continue
            t1 = time.time()
            try:
                moes[name] = (b, MoE(spec, weights, backend=name, check_ids=False))
                if name == "auto":
                    b.capturable = all(get_backend(n).capturable for n in moes[name][1].plan.prepared)
                    cell_note = "; ".join(moes[name][1].explain(m).splitlines()[0] for m in tokens)
                    say(f"  auto: {cell_note}")
            except Exception as e:  # a backend that fails to prepare is reported, the others still run
                skip(name, f"prepare failed: {type(e).__name__}: {e}", "prepare failed")
                continue
            say(f"  {name}: prepared in {time.time() - t1:.1f} s")
        for M in tokens:
            x, logits = _inputs(spec, M, device, seed)
            ids, w = route(spec, logits)
            ref = reference_moe(spec, weights, x, ids, w) if check else None
            cells, experts_fns, layer_fns, graphs = {}, {}, {}, {}
            for name, (b, moe) in moes.items():
                if steps is not None:
                    steps.show(f"{pname} {fmt} {name} M={M}: checking")
                if name == "reference" and M > ref_max_tokens:
                    if steps is not None:
                        steps.advance(f"{pname} {fmt} {name} M={M}: skipped (--reference-max-tokens)")
                    continue
                cell = cells[name] = {"preset": pname, "format": fmt, "backend": name, "M": M}
                out = torch.empty(M, spec.hidden_size, dtype=torch.bfloat16, device=device)
                try:
                    if check:
                        probe_out = torch.full_like(out, float("nan"))
                        moe.experts(x, ids, w, out=probe_out)
                        cell["rel_err"] = relative_error(probe_out, ref)
                        cell["all_written"] = bool(torch.isfinite(probe_out).all())
                except Exception as e:  # a kernel error: recorded, not fatal
                    cell["error"] = error_text(e)
                    continue
                experts_fns[name] = functools.partial(moe.experts, x, ids, w, out=out)
                layer_fns[name] = functools.partial(moe, x, logits, out=out)
                graphs[name] = b.capturable
            if steps is not None:
                steps.show(f"{pname} {fmt} M={M}: timing {', '.join(experts_fns)} (interleaved)")
            # every backend's timed replays interleaved: the ratios are taken under the same conditions
            t_exp = measure_many(experts_fns, device=device, reps=reps, max_seconds=5, flush_l2=flush_l2,
                                 use_graph=graphs)
            t_layer = measure_many(layer_fns, device=device, reps=reps, max_seconds=5, flush_l2=flush_l2,
                                   use_graph=graphs)
            for name, cell in cells.items():
                r = t_exp.get(name, {})
                if "error" in r:
                    cell["error"] = r["error"]
                if "error" in cell:
                    say(f"  M={M:5d} {name:20s} failed: {cell['error']}")
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                else:
                    b, moe = moes[name]
                    cell.update(cell_metrics(spec, weights, ids, r["median_us"], roof, x.numel() * 2,
                                             x.numel() * 2))
                    layer = t_layer.get(name, {})
                    if "median_us" in layer:
                        cell["layer_us"] = layer["median_us"]
                    elif "error" in layer:
                        cell["layer_error"] = layer["error"]
                    if name == "auto":
                        cell["runs"] = moe.backend_for(M)
                    cell["timed_with"] = r["method"] + (" (interleaved)" if r.get("interleaved") else "")
                    if r.get("note"):
                        cell["timing_note"] = r["note"]
                res["cells"].append(cell)
                if steps is not None:
                    steps.advance(f"{pname} {fmt} {name} M={M}: "
                                  + (f"{cell['us']:.1f} us" if "us" in cell else "failed"))
        del moes, weights
        if device.type == "cuda":
            torch.cuda.empty_cache()
    add_ratios(res["cells"])
    return res


def format_table(res: dict) -> str:
    """A text table per (preset, format): rows M, a column per backend with its time, % of the
    roofline floor, ratio to the best other backend, and relative error."""
    lines = []
    roof = res.get("roofline") or {}
    if roof.get("bf16_TFLOPs"):
        lines.append(f"{roof['device']}: read {roof.get('read_GBps') or 0:.0f} GB/s, copy {roof['copy_GBps']:.0f} "
                     f"GB/s (eager), bf16 GEMM {roof['bf16_TFLOPs']:.0f} TFLOP/s; experts from given routing, "
                     f"us = median of CUDA-graph replays{', L2 flushed' if res.get('flush_l2') else ''}; "
                     f"(% of roofline floor) x vs best other backend; rel. error vs float64")
    cells = [c for c in res["cells"] if "us" in c]
    for key in dict.fromkeys((c["preset"], c["format"]) for c in cells):
        sub = [c for c in cells if (c["preset"], c["format"]) == key]
        names = list(dict.fromkeys(c["backend"] for c in sub))
        lines.append(f"\n{key[0]} {key[1]}" + (" (scaled down)" if res.get("scaled_down") else ""))
        lines.append(f"{'M':>6} {'floor':>8} " + " ".join(f"{n:>34}" for n in names))
        for M in sorted({c["M"] for c in sub}):
            row = {c["backend"]: c for c in sub if c["M"] == M}
            floor = next((c.get("floor_us") for c in row.values() if c.get("floor_us")), None)
            cols = []
            for n in names:
                c = row.get(n)
                if c is None:
                    cols.append(f"{'-':>34}")
                    continue
                pct = f"({c['pct_roofline']:3.0f}%)" if "pct_roofline" in c else "      "
                vs = f"x{c['vs_best_other']:.2f}" if "vs_best_other" in c else "     "
                err = f"{c['rel_err']:8.1e}" if "rel_err" in c else " " * 8
                cols.append(f"{c['us']:>10.1f} {pct} {vs:>6} {err}")
            lines.append(f"{M:>6} {'-' if floor is None else f'{floor:.1f}':>8} " + " ".join(cols))
    skipped = [c for c in res["cells"] if "skipped" in c or "error" in c]
    for c in skipped:
        lines.append(f"{c['backend']} ({c['preset']} {c['format']}"
                     + (f", M={c['M']}" if "M" in c else "") + f"): {c.get('skipped') or c.get('error')}")
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
    output_path(args.json, "--json")
    output_path(args.plot, "--plot")
    device = parse_device(args.device)
    problems = preset_problems(parse_presets(args.preset or ["gpt-oss-120b"]), parse_formats(args.formats))
    tokens = parse_tokens(args.tokens, default=DEFAULT_TOKENS)
    backends = parse_backends(args.backends, allow_auto=True)
    scale_down = device.type == "cpu" and not args.full
    if device.type == "cpu":
        import os

        os.environ.setdefault("TRITON_INTERPRET", "1")  # as qmoe demo: the triton backend's kernels on the CPU
    total = len(problems) * len(backends) * len(tokens)
    with Steps("qmoe bench", total) as steps:
        if device.type == "cpu":
            steps.note("no CUDA GPU here: scaled-down shapes (--full for the real ones); CPU times only try "
                       "the command out")
        res = run_bench(problems, tokens, backends, device=device, reps=args.reps, check=not args.no_check,
                        ref_max_tokens=args.reference_max_tokens, seed=args.seed, flush_l2=not args.no_flush_l2,
                        scale_down=scale_down, steps=steps)
    emit_json(args, res)
    if args.plot:
        p = plot(res, args.plot)
        print(f"plot: {p}" if p else "plot: matplotlib is not installed (pip install qmoe[plot])")
    if not json_to_stdout(args):
        print(format_table(res))
    return 0
