"""How every qmoe command times things: one `measure`, one CUDA-graph capture recipe, and the
machine's ceilings measured in the same run.

    r = measure(lambda: backend.forward(prepared, x, ids, w, out), device=x.device)
    r["median_us"], r["method"]        # e.g. 61.3, "cuda_graph"
    rs = measure_many({"a": fa, "b": fb}, device="cuda")   # timed calls interleaved: fair ratios
    roof = roofline("cuda")            # {"read_GBps": 4610.0, "copy_GBps": 4278.0, "bf16_TFLOPs": 797.0, ...}
    floor_us(weight_bytes, flops, roof)

On a GPU, `measure` captures the call in a CUDA graph (`capture_graph`) and times replays with
CUDA events, so the host's launch overhead (which an engine running CUDA graphs never pays) is
left out, and by default it flushes the L2 before every timed replay: a model runs other layers
between two calls of a MoE layer, and at decode the active experts would otherwise be served
from L2 (on an H200 the 4 active gpt-oss-120b experts, 53 MB, fit in its 60 MB). A call that
cannot be captured is timed eagerly between events instead, and the result says why. On a CPU
the wall clock.

The ceilings are never timed inside a graph: a device-to-device copy captured in a graph becomes
a memcpy node served by a copy engine and reads about 35% low on an H200. Weights are only
read, so the memory floor uses the read bandwidth of a streaming Triton kernel
(qmoe.kernels.bandwidth); the copy bandwidth is reported beside it.
"""

from __future__ import annotations

import statistics
import time

import torch

from .support import error_text

L2_FLUSH_BYTES = 256 << 20
"""Zeroed before each timed GPU call when flush_l2=True: larger than any current L2 (H200: 60 MB)."""


def capture_graph(fn) -> "torch.cuda.CUDAGraph":
    """A CUDA graph of one call of fn() on the current device: torch's recipe (one warm-up call
    on a side stream first, so lazy initialisations do not happen inside the capture). Raises
    whatever the capture raises."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph


def measure(fn, *, device, warmup: int = 5, reps: int = 50, use_graph: bool = True,
            max_seconds: float | None = None, flush_l2: bool = True) -> dict:
    """Time fn() (no arguments; its result is ignored).

    device: where fn runs ("cuda", "cuda:1", torch.device, or "cpu").
    warmup: untimed calls first (compilation, autotuning, allocator growth).
    reps: timed calls; the median is reported.
    use_graph: on CUDA, time replays of a CUDA graph of one call (falls back to eager calls
        between events when capture fails).
    max_seconds: cap on the time spent in timed calls; fewer reps (at least 3) are taken
        when one call is slow.
    flush_l2: on CUDA, overwrite a 256 MB buffer before each timed call so the weights come
        from memory, not from L2 (as in a model, where other layers run in between).

    Returns {"median_us": float, "min_us": float, "reps": int,
             "method": "cuda_graph" | "cuda_events" | "wall", "flush_l2": bool,
             "note": None or why a CUDA graph was not used}.
    """
    if not (isinstance(warmup, int) and warmup >= 0 and isinstance(reps, int) and reps >= 1):
        raise ValueError(f"warmup, reps: expected warmup >= 0 and reps >= 1, got {warmup!r}, {reps!r}")
    device = torch.device(device)
    if device.type == "cuda":
        with torch.cuda.device(device):
            return _measure_cuda(fn, warmup, reps, use_graph, max_seconds, flush_l2)
    return _measure_wall(fn, warmup, reps, max_seconds)


def _capped_reps(reps, max_seconds, seconds_per_call):
    if max_seconds is None or seconds_per_call <= 0:
        return reps
    return max(3, min(reps, int(max_seconds / seconds_per_call)))


def _summary(times_us, method, note, flush_l2=False):
    return {"median_us": statistics.median(times_us), "min_us": min(times_us), "reps": len(times_us),
            "method": method, "flush_l2": flush_l2, "note": note}


def _measure_wall(fn, warmup, reps, max_seconds):
    t0 = time.perf_counter_ns()
    for _ in range(warmup):
        fn()
    per_call = (time.perf_counter_ns() - t0) / 1e9 / warmup if warmup else 0.0
    times = []
    for _ in range(_capped_reps(reps, max_seconds, per_call)):
        t = time.perf_counter_ns()
        fn()
        times.append((time.perf_counter_ns() - t) / 1e3)
    return _summary(times, "wall", None)


def _measure_cuda(fn, warmup, reps, use_graph, max_seconds, flush_l2):
    run, method, note, reps = _ready_cuda(fn, warmup, reps, use_graph, max_seconds)
    return _summary(_event_times(run, reps, flush_l2), method, note, flush_l2)


def _ready_cuda(fn, warmup, reps, use_graph, max_seconds):
    """Warm fn up and capture it: (run, method, note, reps capped by max_seconds)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(max(warmup, 1)):
        fn()
    torch.cuda.synchronize()
    per_call = (time.perf_counter() - t0) / max(warmup, 1)
    reps = _capped_reps(reps, max_seconds, per_call)

    run, method, note = fn, "cuda_events", None
    if use_graph:
        try:
            run, method = capture_graph(fn).replay, "cuda_graph"
        except Exception as e:  # any capture failure: time eagerly and say why
            note = f"CUDA graph capture failed ({error_text(e)})"
            try:
                torch.cuda.synchronize()
            except Exception:
                pass
    else:
        note = "CUDA graphs not requested"
    return run, method, note, reps


def _event_times(run, reps, flush_l2=False) -> list:
    """Microseconds of `reps` calls of run(), each between its own pair of CUDA events."""
    return _interleaved_event_times({None: (run, reps)}, _flush_buffer(flush_l2))[None]


def _flush_buffer(flush_l2: bool):
    """The buffer zeroed before each timed call (None: no flush)."""
    return torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda") if flush_l2 else None


def _interleaved_event_times(runs: dict, scratch) -> dict:
    """{name: microseconds of its calls} for runs {name: (run, reps)}: round i calls every run
    that has more than i reps once, each between its own pair of CUDA events (after zeroing
    scratch, the L2 flush, unless it is None), starting at the i-th name and going round, so no
    run always follows the same one."""
    pairs = {n: [] for n in runs}
    for n in interleaved_order({n: reps for n, (_, reps) in runs.items()}):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if scratch is not None:
            scratch.zero_()
        s.record()
        runs[n][0]()
        e.record()
        pairs[n].append((s, e))
    torch.cuda.synchronize()
    return {n: [s.elapsed_time(e) * 1e3 for s, e in p] for n, p in pairs.items()}  # ms -> us


def interleaved_order(reps: dict) -> list:
    """The sequence of calls measure_many times for {name: reps}: round i calls every name with
    more than i reps once, starting at the (i mod n)-th name and going round."""
    names = list(reps)
    order = []
    for i in range(max(reps.values(), default=0)):
        order += [n for n in names[i % len(names):] + names[:i % len(names)] if i < reps[n]]
    return order


def measure_many(fns: dict, *, device, warmup: int = 5, reps: int = 50, use_graph=True,
                 max_seconds: float | None = None, flush_l2: bool = True) -> dict:
    """Time several callables against each other, as `measure` times one, with their timed calls
    interleaved: each is warmed up and captured first, then round i times one call of each (the
    order rotating from round to round), so the clock and temperature drift of a long run (an
    H200 slows under minutes of full-rate GEMMs) reaches all of them alike and their ratios are
    taken under the same conditions.

    fns: {name: fn}; use_graph: a bool for all, or {name: bool}; the other arguments as measure.
    Returns {name: measure's dict, with "interleaved": whether its calls were interleaved with
    others' (on a GPU; after a failed timed call the others are timed alone)} or, for a fn whose
    warm-up or timed calls raised, {name: {"error": "<Type>: <message>"}} (the others are still
    timed). On a CPU each fn is timed in turn by the wall clock.
    """
    if not (isinstance(warmup, int) and warmup >= 0 and isinstance(reps, int) and reps >= 1):
        raise ValueError(f"warmup, reps: expected warmup >= 0 and reps >= 1, got {warmup!r}, {reps!r}")
    device = torch.device(device)
    graph_for = use_graph if isinstance(use_graph, dict) else {n: use_graph for n in fns}
    out = {}
    if device.type != "cuda":
        for n, fn in fns.items():
            try:
                out[n] = _measure_wall(fn, warmup, reps, max_seconds)
            except Exception as e:
                out[n] = {"error": error_text(e)}
        return out
    with torch.cuda.device(device):
        try:  # before the captures hold their memory
            scratch = _flush_buffer(flush_l2)
        except Exception as e:
            return {n: {"error": f"no memory for the L2 flush buffer: {error_text(e)}"} for n in fns}
        ready = {}
        for n, fn in fns.items():
            try:
                ready[n] = _ready_cuda(fn, warmup, reps, graph_for.get(n, True), max_seconds)
            except Exception as e:  # out of memory, a kernel error: this one is reported, the others timed
                out[n] = {"error": error_text(e)}
                torch.cuda.empty_cache()
        runs = {n: (r[0], r[3]) for n, r in ready.items()}
        together = len(runs) > 1
        try:
            times = _interleaved_event_times(runs, scratch)
        except Exception:  # a timed call failed: time each alone, so the one that fails is named
            times, together = {}, False
            for n, run in runs.items():
                try:
                    times[n] = _interleaved_event_times({n: run}, scratch)[n]
                except Exception as e:
                    out[n] = {"error": error_text(e)}
        for n, (_, method, note, _) in ready.items():
            if n in times:
                out[n] = dict(_summary(times[n], method, note, flush_l2), interleaved=together)
    return {n: out[n] for n in fns}


def roofline(device, *, copy_bytes: int = 4 << 30, gemm_size: int = 8192, reps: int = 20) -> dict:
    """The GPU's measured ceilings, for "% of roofline" figures; every probe timed eagerly
    (CUDA events around each call, median of `reps`), never inside a graph.

    read_GBps: a Triton kernel reading `copy_bytes` once (qmoe.kernels.bandwidth).
    copy_GBps: a device-to-device copy of `copy_bytes` (bytes read + bytes written / s / 1e9).
    bf16_TFLOPs: a bf16 [n, n] @ [n, n] matmul with n = gemm_size, on random data.
    On a CPU all three are None (qmoe does not model CPU rooflines).
    Returns {"device": name, "read_GBps", "copy_GBps", "bf16_TFLOPs", "copy_bytes", "gemm_size",
             "method"}.
    """
    device = torch.device(device)
    res = {"device": device.type, "read_GBps": None, "copy_GBps": None, "bf16_TFLOPs": None,
           "copy_bytes": copy_bytes, "gemm_size": gemm_size, "method": "eager, CUDA events, median"}
    if device.type != "cuda":
        return res
    with torch.cuda.device(device):
        res["device"] = torch.cuda.get_device_name(device)
        src = torch.empty(copy_bytes // 4, dtype=torch.float32, device=device).uniform_()
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        us = statistics.median(_event_times(lambda: dst.copy_(src), reps))
        res["copy_GBps"] = 2 * src.numel() * 4 / (us * 1e-6) / 1e9
        del dst
        try:
            from .kernels.bandwidth import read_sum

            programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
            for _ in range(3):
                read_sum(src, programs)
            us = statistics.median(_event_times(lambda: read_sum(src, programs), reps))
            res["read_GBps"] = src.numel() * 4 / (us * 1e-6) / 1e9
        except Exception as e:  # no usable Triton: the floor falls back to the copy bandwidth
            res["read_note"] = f"read probe failed ({type(e).__name__}: {e}); floor uses copy bandwidth"
        del src
        n = gemm_size
        a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
        b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
        c = torch.empty(n, n, dtype=torch.bfloat16, device=device)
        for _ in range(3):
            torch.matmul(a, b, out=c)
        us = statistics.median(_event_times(lambda: torch.matmul(a, b, out=c), reps))
        res["bf16_TFLOPs"] = 2 * n ** 3 / (us * 1e-6) / 1e12
    return res


def floor_us(bytes_read: int, flops: int, roof: dict) -> tuple[float, str] | None:
    """(floor in microseconds, "memory" | "compute") for a call that reads `bytes_read` bytes and
    does `flops` FLOPs, from a `roofline` result: max(bytes / read bandwidth, FLOPs / bf16 rate).
    None when the roofline has no GPU numbers."""
    bw = roof.get("read_GBps") or roof.get("copy_GBps")
    if not bw or not roof.get("bf16_TFLOPs"):
        return None
    t_mem = bytes_read / (bw * 1e9) * 1e6
    t_flop = flops / (roof["bf16_TFLOPs"] * 1e12) * 1e6
    return (t_mem, "memory") if t_mem >= t_flop else (t_flop, "compute")


__all__ = ["L2_FLUSH_BYTES", "capture_graph", "floor_us", "interleaved_order", "measure", "measure_many", "roofline"]
