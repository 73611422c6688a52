"""How qmoe times things: one `measure` for every command, and the machine's roofline.

    r = measure(lambda: backend.forward(prepared, x, ids, w, out), device=x.device)
    r["median_us"], r["method"]        # e.g. 61.3, "cuda_graph"
    roofline("cuda")                   # {"copy_GBps": 3021.4, "bf16_TFLOPs": 689.0, ...}

On a GPU, `measure` captures the call in a CUDA graph and times replays with CUDA events, so
the host's launch overhead (which an engine running CUDA graphs never pays) is left out; a call
that cannot be captured (it synchronizes with the host, say) is timed eagerly between events
instead, and the result says why. On a CPU it uses the wall clock.
"""

from __future__ import annotations

import statistics
import time

import torch

_L2_FLUSH_BYTES = 256 << 20
"""Zeroed before each timed GPU call when flush_l2=True: larger than any current L2 (H100 50 MB)."""


def measure(fn, *, device, warmup: int = 5, reps: int = 50, use_graph: bool = True,
            max_seconds: float | None = None, flush_l2: bool = False) -> dict:
    """Time fn() (no arguments; its result is ignored).

    device: where fn runs ("cuda", "cuda:1", torch.device, or "cpu").
    warmup: untimed calls first (compilation, autotuning, allocator growth).
    reps: timed calls; the median is reported.
    use_graph: on CUDA, time replays of a CUDA graph of one call (falls back to eager calls
        between events when capture fails).
    max_seconds: cap on the time spent in timed calls; fewer reps (at least 3) are taken
        when one call is slow.
    flush_l2: on CUDA, overwrite a 256 MB buffer before each timed call so the weights
        come from memory, not from L2 (closer to a model where other layers run in between).

    Returns {"median_us": float, "min_us": float, "reps": int,
             "method": "cuda_graph" | "cuda_events" | "wall",
             "note": None or why a CUDA graph was not used}.
    """
    if warmup < 0 or reps < 1:
        raise ValueError(f"warmup, reps: expected warmup >= 0 and reps >= 1, got {warmup}, {reps}")
    device = torch.device(device)
    if device.type == "cuda":
        with torch.cuda.device(device):
            return _measure_cuda(fn, warmup, reps, use_graph, max_seconds, flush_l2)
    return _measure_wall(fn, warmup, reps, max_seconds)


def _capped_reps(reps, max_seconds, seconds_per_call):
    if max_seconds is None or seconds_per_call <= 0:
        return reps
    return max(3, min(reps, int(max_seconds / seconds_per_call)))


def _summary(times_us, method, note):
    return {"median_us": statistics.median(times_us), "min_us": min(times_us), "reps": len(times_us),
            "method": method, "note": note}


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
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(max(warmup, 1)):
        fn()
    torch.cuda.synchronize()
    per_call = (time.perf_counter() - t0) / max(warmup, 1)
    reps = _capped_reps(reps, max_seconds, per_call)

    run, method, note = fn, "cuda_events", None
    if use_graph:
        graph = torch.cuda.CUDAGraph()
        try:
            # torch's recipe: run once on a side stream first so lazy initialisations
            # (cuBLAS workspaces, allocator pools) do not happen inside the capture
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph):
                fn()
            torch.cuda.synchronize()
            run, method = graph.replay, "cuda_graph"
        except Exception as e:  # any capture failure: time eagerly and say why
            note = f"CUDA graph capture failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            try:
                torch.cuda.synchronize()
            except Exception:
                pass
    else:
        note = "CUDA graphs not requested"

    scratch = torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda") if flush_l2 else None
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        if scratch is not None:
            scratch.zero_()
        s.record()
        run()
        e.record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]  # ms -> us
    return _summary(times, method, note)


def roofline(device, *, copy_bytes: int = 1 << 30, gemm_size: int = 8192, reps: int = 20) -> dict:
    """The GPU's measured ceilings, for "% of roofline" figures.

    copy_GBps: a device-to-device copy of `copy_bytes` (bytes read + bytes written per second / 1e9).
    bf16_TFLOPs: a bf16 [n, n] @ [n, n] matmul with n = gemm_size (2 n^3 FLOPs per call / 1e12).
    On a CPU both are None (qmoe does not model CPU rooflines).
    Returns {"device": name, "copy_GBps", "bf16_TFLOPs", "copy_bytes", "gemm_size"}.
    """
    device = torch.device(device)
    res = {"device": device.type, "copy_GBps": None, "bf16_TFLOPs": None,
           "copy_bytes": copy_bytes, "gemm_size": gemm_size}
    if device.type != "cuda":
        return res
    res["device"] = torch.cuda.get_device_name(device)
    src = torch.empty(copy_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device=device, reps=reps)
    res["copy_GBps"] = 2 * src.numel() * 4 / (t["median_us"] * 1e-6) / 1e9
    src = dst = None  # free 2 x copy_bytes before the GEMM's buffers
    n = gemm_size
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    c = torch.empty(n, n, dtype=torch.bfloat16, device=device)
    t = measure(lambda: torch.matmul(a, b, out=c), device=device, reps=reps)
    res["bf16_TFLOPs"] = 2 * n ** 3 / (t["median_us"] * 1e-6) / 1e12
    return res


__all__ = ["measure", "roofline"]
