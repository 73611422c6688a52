"""`qmoe demo`: the main job on an embedded default.

One MoE layer's experts, with weights quantized from random float weights, run on every
usable backend on the same inputs; a table of the relative error against a float64
computation on the dequantized weights, and the time per call.

With a GPU: a real gpt-oss-120b layer (128 experts, H = I = 2880). Without one: the same
layer scaled down (8 experts, H = I = 256) so it runs in seconds on a CPU, with the
triton backend under Triton's interpreter.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import replace

import torch

from ..backends.reference import relative_error
from ..formats import FORMATS
from ..spec import MoESpec, presets
from ..weights import random_weights
from .common import add_json_argument, emit_json, json_to_stdout, load_backend, number, output_path

DEFAULT_PRESET = "gpt-oss-120b"
CPU_SIZE = 256
"""hidden_size and intermediate_size of the scaled-down layer on CPU."""
TOLERANCE = 1e-2
"""Relative error a backend must stay within (4-bit weights are exact after dequantization;
what remains is bf16 rounding of activations and outputs and fp32 accumulation)."""
CPU_TIME_BUDGET_S = 0.5
"""Seconds of repeated calls spent timing one backend on CPU."""


def scaled_down(spec: MoESpec) -> MoESpec:
    """The spec at CPU size: H = I = 256 and a few experts, same top_k, activation and routing.

    Keeps whole routing groups, and enough experts in the kept groups to choose top_k from.
    """
    r = spec.routing
    num_experts = max(8, 2 * spec.top_k)
    num_experts = -(-num_experts // r.n_group) * r.n_group
    while r.topk_group * (num_experts // r.n_group) < spec.top_k:
        num_experts += r.n_group
    return replace(spec, num_experts=min(num_experts, spec.num_experts),
                   hidden_size=min(CPU_SIZE, spec.hidden_size),
                   intermediate_size=min(CPU_SIZE, spec.intermediate_size))


def random_inputs(spec: MoESpec, tokens: int, dtype: torch.dtype, device: torch.device, seed: int = 1):
    """x [M, H] `dtype` ~ N(0, 1); router_logits [M, E] fp32 ~ N(0, 1); correction_bias [E] fp32
    for the routing modes that use one, else None."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(tokens, spec.hidden_size, generator=g, device=device).to(dtype)
    logits = torch.randn(tokens, spec.num_experts, generator=g, device=device)
    bias = None
    if spec.routing.mode != "softmax":
        bias = torch.randn(spec.num_experts, generator=g, device=device) * 0.1
    return x, logits, bias


def time_per_call(fn, device: torch.device, budget_s: float = CPU_TIME_BUDGET_S, max_calls: int = 20,
                  use_graph: bool = True) -> tuple[float, str]:
    """(median microseconds per call of fn(), how it was timed); the caller has run fn once.

    CUDA: qmoe.timing.measure (CUDA-graph replays, or CUDA events when a call cannot be
    captured), like `qmoe bench`. CPU: the wall clock, stopping after max_calls or once
    budget_s is spent (after at least one call): a backend under Triton's interpreter takes
    seconds per call, and the demo must stay quick.
    """
    if device.type == "cuda":
        from .timing import measure

        r = measure(fn, device=device, warmup=3, reps=max_calls, max_seconds=budget_s, use_graph=use_graph)
        return r["median_us"], r["method"]
    times = []
    start = time.perf_counter()
    while len(times) < max_calls and (not times or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6, "wall"


def run_backend(name, spec, weights, x, logits, bias, ref, device):
    """One row of the table: prepare, one poisoned-output call checked against ref, timing."""
    from .. import MoE

    row = {"backend": name, "usable": False, "reason": "", "rel_error": None, "ok": None,
           "prepare_s": None, "time_us": None, "timing": None}
    try:
        backend = load_backend(name)
    except ValueError as e:
        row["reason"] = str(e).removeprefix("backend: ")
        return row
    try:
        ok, reason = backend.supports(spec, weights.format, device)
    except Exception as e:  # supports() must not raise; if it does, that is the reason
        ok, reason = False, f"supports() raised {type(e).__name__}: {e}"
    row["reason"] = str(reason)
    if not ok:
        return row
    row["usable"] = True
    try:
        t0 = time.perf_counter()
        moe = MoE(spec, weights, backend=name, check_ids=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        row["prepare_s"] = time.perf_counter() - t0
        out = torch.full_like(x, float("nan"))  # unwritten elements must show up as errors
        t0 = time.perf_counter()
        moe(x, logits, bias, out=out)
        first_s = time.perf_counter() - t0
        rel = relative_error(out, ref)
        row["ok"] = rel <= TOLERANCE  # False for NaN too
        if not math.isfinite(rel):  # kept out of the JSON, which has no NaN
            row["reason"] = "the output holds NaN or inf (elements left unwritten, or an overflow)"
        else:
            row["rel_error"] = rel
            if not row["ok"]:
                row["reason"] = f"relative error {rel:.2e} is above the tolerance {TOLERANCE:g}"
        if device.type == "cpu" and first_s >= CPU_TIME_BUDGET_S:
            # seconds per call (Triton's interpreter): the first call is timing enough
            row["time_us"], row["timing"] = first_s * 1e6, "wall"
        else:
            # the reference backend syncs with the host (it looks up the active experts), so
            # it cannot be captured in a CUDA graph: time it eagerly rather than fail a capture
            row["time_us"], row["timing"] = time_per_call(lambda: moe(x, logits, bias, out=out), device,
                                                          use_graph=backend.capturable)
    except Exception as e:  # a crashing backend is a failed row; the others still run
        row["ok"] = False
        row["reason"] = f"failed: {type(e).__name__}: {e}"
    return row


# --- the command ----------------------------------------------------------------------------

def add_arguments(parser) -> None:
    from ..backends import BACKEND_NAMES

    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=list(presets),
                        help=f"which model's layer (default {DEFAULT_PRESET}); scaled down on CPU unless --full")
    parser.add_argument("--tokens", type=number("--tokens", int, 1), default=None, metavar="M",
                        help="tokens in the batch (default 64 on a GPU, 16 on CPU)")
    parser.add_argument("--format", default="mxfp4", choices=list(FORMATS),
                        help="weight format the float weights are quantized to (default mxfp4)")
    parser.add_argument("--backend", action="append", choices=list(BACKEND_NAMES), metavar="NAME",
                        help=f"run only this backend (repeatable; default all): {', '.join(BACKEND_NAMES)}")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="activation dtype (default bfloat16)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where to run (default: cuda if there is a GPU, else cpu)")
    parser.add_argument("--full", action="store_true",
                        help="on CPU, run the preset's real shapes instead of the scaled-down layer (slow)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    add_json_argument(parser, "the results")


def run(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    output_path(args.json, "--json")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: expected cpu or auto on a machine without a CUDA GPU, got cuda")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    if device.type == "cpu":
        # Triton kernels run on CPU only under its interpreter, which is chosen when the kernels
        # are imported: set it before any backend is imported (a user's explicit value wins)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from ..backends import BACKEND_NAMES
    from ..backends.reference import reference_moe
    from ..routing import route

    spec = presets[args.preset]
    full_spec = spec
    if device.type == "cpu" and not args.full:
        spec = scaled_down(spec)
    tokens = args.tokens or (64 if device.type == "cuda" else 16)
    dtype = getattr(torch, args.dtype)
    names = [n for n in BACKEND_NAMES if not args.backend or n in args.backend]

    err = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True, disable=not err.is_terminal) as progress:
        task = progress.add_task(f"quantizing {spec.num_experts} experts to {args.format}",
                                 total=2 * spec.num_experts)
        weights = random_weights(spec, args.format, device, args.seed, on_expert=lambda: progress.advance(task))
        x, logits, bias = random_inputs(spec, tokens, dtype, device, args.seed + 1)
        progress.update(task, description="float64 computation on the dequantized weights",
                        completed=0, total=None)
        topk_ids, topk_weights = route(spec, logits, bias)
        ref = reference_moe(spec, weights, x, topk_ids, topk_weights, dtype=torch.float64)
        rows = []
        for name in names:
            progress.update(task, description=f"running {name}")
            rows.append(run_backend(name, spec, weights, x, logits, bias, ref, device))

    result = {
        "preset": args.preset,
        "scaled_down": spec != full_spec,
        "spec": {"num_experts": spec.num_experts, "top_k": spec.top_k, "hidden_size": spec.hidden_size,
                 "intermediate_size": spec.intermediate_size, "routing": spec.routing.mode, "bias": spec.bias},
        "format": args.format,
        "weights_bytes": weights.nbytes,
        "tokens": tokens,
        "dtype": args.dtype,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "tolerance": TOLERANCE,
        "backends": rows,
    }
    emit_json(args, result)
    if not json_to_stdout(args):
        print_table(result, full_spec)
    usable = [r for r in rows if r["usable"]]
    return 0 if usable and all(r["ok"] for r in usable) else 1


def format_time(us: float) -> str:
    """Microseconds as a short human figure: 58.2 us, 712 ms, 8.95 s."""
    if us < 1e3:
        return f"{us:.1f} us"
    if us < 1e6:
        return f"{us / 1e3:.3g} ms"
    return f"{us / 1e6:.3g} s"


def print_table(result: dict, full_spec: MoESpec) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    s = result["spec"]
    shape = f"E={s['num_experts']}, top_k={s['top_k']}, H={s['hidden_size']}, I={s['intermediate_size']}"
    if result["scaled_down"]:
        shape += (f"; scaled down for CPU from E={full_spec.num_experts}, H={full_spec.hidden_size}, "
                  f"I={full_spec.intermediate_size}")
    console.print(escape(f"{result['preset']} layer ({shape}), {result['format']} weights "
                         f"({result['weights_bytes'] / 1e6:.1f} MB), {result['tokens']} tokens of "
                         f"{result['dtype']}, on {result['device']}"))
    table = Table()
    table.add_column("backend", style="bold", no_wrap=True)
    table.add_column("rel. error", justify="right", no_wrap=True)
    table.add_column(f"within {result['tolerance']:g}", no_wrap=True)
    table.add_column("time / call", justify="right", no_wrap=True)
    table.add_column("prepare s", justify="right", no_wrap=True)
    not_run = []
    for r in result["backends"]:
        if not r["usable"]:
            not_run.append(r)
            continue
        err = "nan" if r["ok"] is False and r["rel_error"] is None else \
            "-" if r["rel_error"] is None else f"{r['rel_error']:.2e}"
        ok = "[green]yes[/green]" if r["ok"] else "[red]NO[/red]"
        us = "-" if r["time_us"] is None else format_time(r["time_us"])
        prep = "-" if r["prepare_s"] is None else f"{r['prepare_s']:.2f}"
        table.add_row(r["backend"], err, ok, us, prep)
    console.print(table)
    console.print("relative error = ||out - ref|| / ||ref||, ref = float64 on the dequantized weights; "
                  "time per call includes routing")
    methods = {"cuda_graph": "CUDA-graph replays", "cuda_events": "CUDA events around eager calls",
               "wall": "wall clock"}
    timed = sorted({methods.get(r["timing"], r["timing"]) for r in result["backends"] if r["timing"]})
    if timed:
        console.print(f"times: medians of {', '.join(timed)}")
    for r in result["backends"]:
        if r["usable"] and not r["ok"]:
            console.print(escape(f"{r['backend']}: {r['reason']}"), style="red")
    if result["scaled_down"]:
        console.print("(scaled down to run in seconds on CPU; --full for the real shapes)")
    if not_run:
        console.print("not run:")
        for r in not_run:
            console.print(escape(f"  {r['backend']}: {r['reason']}"))


__all__ = ["random_inputs", "run_backend", "scaled_down", "time_per_call"]
