"""`qmoe tune`: time every usable backend over token counts on this GPU; write the tuning table.

    qmoe tune                                   # every preset in its own format
    qmoe tune --preset gpt-oss-120b --format mxfp4,int4
    qmoe tune --experts 64 --hidden 4096 --intermediate 1536 --top-k 8 --format nvfp4
    qmoe tune --kernels                         # first let backends that can tune their kernels do so

Each backend's `forward` is timed (no routing) on random weights and inputs, by
qmoe.timing.measure_many, the way `qmoe bench` times it (CUDA-graph replays where the backend
can be captured, the L2 flushed before each replay, every backend's replays of one M
interleaved, so all of them see the same clocks), so `auto` chooses by what a model will see.
Every usable backend's layout is prepared first and kept while the token counts are timed. The
result, one entry per (GPU, library versions, format, shape), is merged into the tuning table
(qmoe.tuning): a run of some backends or token counts keeps the other measurements. Weights'
values do not change a kernel's speed, so random weights measure what real ones would.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import torch

from .. import tuning
from ..routing import route
from ..spec import MoESpec, presets
from ..support import error_text
from ..timing import measure_many
from ..tuning.buckets import BUCKETS
from ..weights import random_weights
from .common import (Steps, add_problem_arguments, number, parse_backends, parse_device, parse_formats,
                     parse_presets, parse_tokens, preset_problems, probe)


def add_arguments(parser: argparse.ArgumentParser):
    add_problem_arguments(parser, "tune", "each preset's own format; mxfp4 for --experts ...")
    spec = parser.add_argument_group("an explicit shape instead of presets (all four together)")
    spec.add_argument("--experts", type=number("--experts", int, 1), metavar="E", help="num_experts")
    spec.add_argument("--hidden", type=number("--hidden", int, 1), metavar="H", help="hidden_size")
    spec.add_argument("--intermediate", type=number("--intermediate", int, 1), metavar="I",
                      help="intermediate_size (per expert)")
    spec.add_argument("--top-k", type=number("--top-k", int, 1), metavar="K", help="experts per token")
    parser.add_argument("--tokens", metavar="M,M,...", help=f"token counts (default {','.join(map(str, BUCKETS))})")
    parser.add_argument("--backend", action="append", metavar="NAME",
                        help="backend(s) to time (default every usable qmoe backend; 'module:attr' for an "
                             "object following the backend protocol)")
    parser.add_argument("--device", help="device (default cuda)")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="measure on the CPU when there is no GPU (for tests; CPU numbers choose nothing useful)")
    parser.add_argument("--kernels", action="store_true",
                        help="first run kernel-level tuning of backends that offer it (launch configs)")
    parser.add_argument("--kernel-report", metavar="PATH",
                        help="with --kernels: write every launch configuration tried, with its time or why it was "
                             "rejected, to this JSON file (written after each problem)")
    parser.add_argument("--tuning-file", metavar="PATH",
                        help=f"tuning table to update (default ${tuning.ENV_VAR} or ~/.cache/qmoe/tuning.json)")
    parser.add_argument("--reps", type=number("--reps", int, 1), default=50,
                        help="timed calls per measurement (default 50)")
    parser.add_argument("--warmup", type=number("--warmup", int, 0), default=5, help="untimed calls first (default 5)")
    parser.add_argument("--max-seconds", type=number("--max-seconds", float, 0, above=True), default=1.0,
                        help="cap on timed calls per measurement, for slow backends (default 1.0)")
    parser.add_argument("--no-flush-l2", action="store_true",
                        help="do not evict the L2 before each timed call (by default weights come from memory, "
                             "as between the layers of a model)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")


def problems_from_args(args) -> list:
    """[(MoESpec, format)] named by the arguments."""
    explicit = [args.experts, args.hidden, args.intermediate, args.top_k]
    formats = parse_formats(args.format)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError("--experts, --hidden, --intermediate, --top-k: expected all four together, got "
                             + ", ".join(f"{n}={v}" for n, v in zip(("experts", "hidden", "intermediate", "top-k"),
                                                                     explicit)))
        if args.preset:
            raise ValueError("--preset: expected either presets or an explicit shape, got both")
        if args.top_k > args.experts:  # the inputs are routed: before minutes of making weights
            raise ValueError(f"--top-k: routing chooses top_k distinct experts: expected at most --experts "
                             f"({args.experts}), got {args.top_k}")
        spec = MoESpec(args.experts, args.top_k, args.hidden, args.intermediate, name="custom")
        return [(spec, f) for f in (formats or ["mxfp4"])]
    return [(presets[n], f) for n, f in preset_problems(parse_presets(args.preset), formats)]


def _inputs(spec, tokens, device, seed):
    """Per M: x [M, H] bf16, topk_ids [M, k] int32, topk_weights [M, k] fp32 (routed from random
    logits with the spec's own routing), out [M, H] bf16."""
    gen = torch.Generator().manual_seed(seed)
    res = {}
    for m in tokens:
        x = torch.randn(m, spec.hidden_size, generator=gen).to(torch.bfloat16)
        ids, w = route(spec, torch.randn(m, spec.num_experts, generator=gen))
        res[m] = (x.to(device), ids.to(device), w.to(device),
                  torch.empty(m, spec.hidden_size, dtype=torch.bfloat16, device=device))
    return res


def _free(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


def tune_problem(spec: MoESpec, fmt: str, backends, tokens, device, *, reps=50, warmup=5, max_seconds=1.0,
                 flush_l2=True, seed=0, kernels=False, steps=None, reports=None) -> tuple:
    """Time every usable backend at every token count for one (spec, format).

    Returns (key, entry) for qmoe.tuning.write_entries, and a list of kernel-tuning report lines.
    reports: a list to receive each kernel tuning's whole result (every configuration tried).
    """
    device = torch.device(device)
    env = tuning.environment(device)
    weights = random_weights(spec, fmt, device, seed)
    inputs = _inputs(spec, tokens, device, seed)
    times, methods, layout, excluded, errors, kernel_lines, ready = {}, {}, {}, {}, {}, [], {}
    what = f"{spec.name or 'custom'} {fmt}"
    for name in backends:
        b, reason = probe(name, spec, fmt, device)
        if b is None:
            excluded[name] = reason
            if steps is not None:
                steps.advance(f"{what} {name}: not usable", len(tokens))
            continue
        if kernels and b.tunable:
            if steps is not None:
                steps.show(f"{what} {name}: tuning its launch configurations")
            result = b.tune(spec, fmt, list(tokens), device)
            if reports is not None:
                reports.append({"problem": what, "backend": name, "result": result})
            kernel_lines.append(f"{name} kernel tuning for {what}: "
                                + json.dumps(_kernel_summary(result), default=str, sort_keys=True))
        try:
            ready[name] = (b, b.prepare(spec, weights))
        except Exception as e:
            excluded[name] = f"prepare raised {error_text(e)}"
            if steps is not None:
                steps.advance(f"{what} {name}: prepare failed", len(tokens))
            _free(device)
            continue
        layout[name] = ready[name][1].nbytes
    for m in tokens:  # every backend's timed calls interleaved, as qmoe bench times them
        x, ids, w, out = inputs[m]
        if steps is not None:
            steps.show(f"{what} M={m}: timing {', '.join(ready)} (interleaved)")
        fns = {n: functools.partial(b.forward, p, x, ids, w, out) for n, (b, p) in ready.items()}
        rs = measure_many(fns, device=device, warmup=warmup, reps=reps, max_seconds=max_seconds, flush_l2=flush_l2,
                          use_graph={n: b.capturable for n, (b, _) in ready.items()})
        for name, r in rs.items():
            if "error" in r:  # out of memory at a large M, a kernel error: recorded, not fatal
                errors.setdefault(name, {})[m] = r["error"]
                _free(device)
            else:
                times.setdefault(name, {})[m] = r["median_us"]
                methods[name] = (r["method"] + (", L2 flushed" if r["flush_l2"] else "")
                                 + (", interleaved" if r.get("interleaved") else "")
                                 + (f" ({r['note']})" if r["note"] else ""))
            if steps is not None:
                steps.advance(f"{what} {name} M={m}")
    ready = None
    _free(device)
    if kernels and not kernel_lines:
        why = "; ".join(f"{n}: {r}" for n, r in excluded.items()) or "no usable backend is tunable"
        kernel_lines.append(f"kernel tuning unavailable for {spec.name or 'custom'} {fmt}: no usable backend "
                            f"offers it ({why})")
    key, entry = tuning.make_entry(env, fmt, spec, times, methods=methods, layout_bytes=layout,
                                   excluded=excluded, errors=errors)
    return key, entry, kernel_lines


def _kernel_summary(result: dict) -> dict:
    """What a backend's tune() chose, per M: config and time against the default's."""
    out = {"gpu": result.get("gpu"), "path": result.get("path"), "buckets": {}}
    for m, b in result.get("buckets", {}).items():
        cfg, inv = b["config"], b.get("invariant_config")
        out["buckets"][m] = {"config": getattr(cfg, "__dict__", cfg), "us": round(b["us"], 1),
                             "default_us": round(b["default_us"], 1)}
        if b.get("invariant_us"):
            out["buckets"][m].update(invariant_config=getattr(inv, "__dict__", inv),
                                     invariant_us=round(b["invariant_us"], 1))
    return out


def run(args) -> int:
    from rich.console import Console

    if args.kernel_report and not args.kernels:
        print("qmoe tune: --kernel-report needs --kernels", file=sys.stderr)
        return 2
    if args.kernel_report:  # before minutes of measuring, not after
        folder = os.path.dirname(os.path.abspath(args.kernel_report))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            print(f"qmoe tune: --kernel-report {args.kernel_report}: folder {folder} does not exist or is not "
                  f"writable", file=sys.stderr)
            return 2
    device = parse_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.allow_cpu:
        print("qmoe tune measures on a GPU; none here (--allow-cpu measures the CPU anyway, for tests)",
              file=sys.stderr)
        return 2
    problems = problems_from_args(args)
    tokens = parse_tokens(args.tokens, default=BUCKETS)
    backends = parse_backends(args.backend)
    path = tuning.TABLE.check_writable(args.tuning_file)  # before minutes of measuring, not after
    if args.kernels:
        from ..backends.triton.configs import USER_TABLE

        USER_TABLE.check_writable()

    console = Console()
    entries, kernel_lines, reports = {}, [], []
    with Steps("qmoe tune", len(problems) * len(backends) * len(tokens)) as steps:
        for spec, fmt in problems:
            steps.show(f"{spec.name or 'custom'} {fmt}: making weights")
            key, entry, lines = tune_problem(spec, fmt, backends, tokens, device, reps=args.reps, warmup=args.warmup,
                                             max_seconds=args.max_seconds, flush_l2=not args.no_flush_l2,
                                             seed=args.seed, kernels=args.kernels, steps=steps, reports=reports)
            entries[key] = entry
            kernel_lines += lines
            tuning.write_entries({key: entry}, path)  # each problem as it is measured: nothing lost
            if args.kernel_report:
                with open(args.kernel_report, "w") as f:
                    json.dump(reports, f, indent=1, default=lambda o: getattr(o, "__dict__", str(o)))
            for line in lines:
                steps.note(line)
            _free(device)
    for line in kernel_lines:
        console.print(line, highlight=False, soft_wrap=True, markup=False)
    for key, entry in entries.items():
        _print_entry(console, entry)
    console.print(f"merged {len(entries)} entr{'y' if len(entries) == 1 else 'ies'} into {path}",
                  highlight=False, soft_wrap=True, markup=False)
    return 0 if any(e["times_us"] for e in entries.values()) else 1


def _print_entry(console, entry):
    from rich.table import Table

    s = entry["shape"]
    table = Table(title=f"{entry['gpu']} {entry['format']} E={s['num_experts']} H={s['hidden_size']} "
                        f"I={s['intermediate_size']} k={s['top_k']} (us per call)")
    names = list(entry["times_us"])
    table.add_column("M", justify="right")
    for n in names:
        table.add_column(n, justify="right")
    ms = sorted({int(m) for d in entry["times_us"].values() for m in d})
    for m in ms:
        row = {n: entry["times_us"][n].get(str(m)) for n in names}
        best = min((t for t in row.values() if t is not None), default=None)
        table.add_row(str(m), *("-" if t is None else f"[bold]{t:.1f}[/bold]" if t == best else f"{t:.1f}"
                                for t in row.values()))
    console.print(table)
    for n, why in entry["excluded"].items():
        console.print(f"{n}: not measured: {why}", highlight=False, soft_wrap=True, markup=False)
    for n, errs in entry["errors"].items():
        for m, e in errs.items():
            console.print(f"{n} at M={m}: failed: {e}", highlight=False, soft_wrap=True, markup=False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="qmoe tune", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
