"""`qmoe check`: qualify every backend on this machine against the reference, crash-isolated.

For each preset (and format) a shape matrix of cases is run: token counts M in TOKENS, expert
ids of -1 (a token with no expert at all among them), a shared-expert output, and a variant of
each preset whose hidden and intermediate sizes need padding. Each case:
- random inputs from a seed derived from the problem and case names (two runs see the same);
- the output poisoned with NaN before the backend runs, so an unwritten element fails;
- relative error ||out - ref|| / ||ref|| against `reference_moe` in float64 on the same
  (dequantized) weights, compared with TOLERANCES[format];
- on a GPU, the call captured in a CUDA graph and replayed (into a re-poisoned output) must
  match the eager result;
- optionally (--time) the median time per call, for `--compare`.

Each backend runs in its own process (`python -m qmoe.check --worker JOB`), which prints one
protocol line per event; when it dies (illegal memory access, abort, segfault) or hangs past
--timeout, the case it was running is reported as a crash or timeout and a fresh process
continues with the next case. A CUDA error inside a case also ends its process, because the
CUDA context is unusable afterwards.

Without a GPU, or with --quick, presets are scaled down (E/16 experts, H and I /32, kept odd
multiples of 32 so they still need padding) to run in minutes on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import torch

from .backends import BACKEND_NAMES, get_backend
from .backends.reference import reference_moe
from .formats import FORMATS
from .spec import PRESET_FORMATS, MoESpec, Routing, SwiGLU, presets
from .weights import ExpertWeights
from .weights import random_weights as _random_weights

TOKENS = (0, 1, 2, 3, 7, 64, 255, 1024, 4096)
"""Token counts every problem is checked at."""

TOLERANCES = {"bf16": 1e-2, "mxfp4": 1e-2, "nvfp4": 1e-2, "int4": 1e-2}
"""Largest relative error accepted per weight format, for W4A16 (bf16 activations): the
weights dequantize exactly, so the error comes from bf16 rounding of the intermediate and the
output (about 2e-3) and the summation order; the same bound for every format today. A backend
that quantizes activations needs a looser bound: --tolerance FMT=VALUE."""

PROTOCOL = "QMOE-CHECK "
"""Prefix of the worker's protocol lines on stdout (anything else a library prints is ignored)."""

STARTUP_S = 300.0
"""Seconds a worker may take to start (import torch and the backend) before it counts as hung."""

FAILED = ("fail", "crash", "timeout", "not run")
"""Statuses that make `qmoe check` exit non-zero ("pass" and "skip" do not)."""


# --- backends, problems and inputs ---------------------------------------------------------------
def load_backend(name: str):
    """A backend object: a qmoe backend name, or "module:attr" naming any object that follows
    the backend protocol (out-of-tree backends, tests)."""
    if ":" in name:
        mod, _, attr = name.partition(":")
        return getattr(importlib.import_module(mod), attr)
    return get_backend(name)


def random_weights(spec: MoESpec, fmt: str, device, seed: int = 0) -> ExpertWeights:
    """qmoe.weights.random_weights with check's scales: weights std 1/sqrt(K), biases std 0.1."""
    return _random_weights(spec, fmt, device, seed, bias_std=0.1)


def quick_spec(spec: MoESpec) -> MoESpec:
    """The spec scaled down for a CPU: E/16 experts (at least 2*top_k, a multiple of n_group),
    H and I / 32, rounded to odd multiples of 32 (every format's block divides them; not
    multiples of 64 or 128, so backends still pad)."""
    def dim(d):
        d = max(32, round(d / 32 / 32) * 32)
        return d + 32 if d % 64 == 0 else d

    ng = spec.routing.n_group
    E = -(-max(spec.num_experts // 16, 2 * spec.top_k) // ng) * ng
    return dataclasses.replace(spec, num_experts=min(E, spec.num_experts), hidden_size=dim(spec.hidden_size),
                               intermediate_size=dim(spec.intermediate_size), name=f"{spec.name}-quick")


def padded_spec(spec: MoESpec) -> MoESpec:
    """The spec with H and I moved to odd multiples of 32 (H + 32 when H is a multiple of 64),
    and the experts cut as in `quick_spec` (padding does not depend on E): every backend must
    pad and trim both GEMMs."""
    def dim(d):
        return d + 32 if d % 64 == 0 else d

    E = quick_spec(spec).num_experts
    return dataclasses.replace(spec, num_experts=E, hidden_size=dim(spec.hidden_size),
                               intermediate_size=dim(spec.intermediate_size), name=f"{spec.name}-padded")


def spec_to_dict(spec: MoESpec) -> dict:
    return dataclasses.asdict(spec)


def spec_from_dict(d: dict) -> MoESpec:
    d = dict(d)
    return MoESpec(**{**d, "activation": SwiGLU(**d["activation"]), "routing": Routing(**d["routing"])})


def make_problems(preset_names, formats=None, quick: bool = False) -> list:
    """[{"id", "spec" (dict), "format", "seed"}]: per preset and format, the preset's shape
    (scaled down when quick) and, at full size, its padded variant.

    formats: None (each preset's own format, PRESET_FORMATS), or a list of format names.
    """
    problems = []
    for name in preset_names:
        if name not in presets:
            raise ValueError(f"preset: expected one of {', '.join(presets)}, got {name!r}")
        base = presets[name]
        specs = [quick_spec(base)] if quick else [base, padded_spec(base)]
        for fmt in (formats or [PRESET_FORMATS[name]]):
            if fmt not in FORMATS:
                raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
            for spec in specs:
                pid = f"{spec.name}/{fmt}"
                problems.append({"id": pid, "spec": spec_to_dict(spec), "format": fmt,
                                 "seed": zlib.crc32(pid.encode())})
    return problems


def make_cases(problems: list, tokens=TOKENS) -> list:
    """[{"problem": index, "id", "M", "neg_ids", "shared"}]: every M in tokens; every M >= 1
    again with ids of -1; one shared-expert case at the middle positive M."""
    positive = [m for m in tokens if m >= 1]
    cases = []
    for p in range(len(problems)):
        for m in tokens:
            cases.append({"problem": p, "id": f"M={m}", "M": m, "neg_ids": False, "shared": False})
        for m in positive:
            cases.append({"problem": p, "id": f"M={m} ids=-1", "M": m, "neg_ids": True, "shared": False})
        if positive:
            m = positive[len(positive) // 2]
            cases.append({"problem": p, "id": f"M={m} +shared", "M": m, "neg_ids": False, "shared": True})
    return cases


def case_inputs(spec: MoESpec, case: dict, seed: int, device):
    """Random inputs for a case, made on the CPU from the seed (identical on every device).

    Returns x [M, H] bf16, topk_ids [M, k] int32 (distinct experts per token; with neg_ids
    about a quarter are -1 and token 0 has none), topk_weights [M, k] float32 (positive, sum 1),
    shared_output [M, H] bf16 or None.
    """
    gen = torch.Generator().manual_seed(seed ^ zlib.crc32(case["id"].encode()))
    M, E, k, H = case["M"], spec.num_experts, spec.top_k, spec.hidden_size
    x = torch.randn(M, H, generator=gen).to(torch.bfloat16)
    ids = torch.rand(M, E, generator=gen).topk(k, dim=1).indices.to(torch.int32)
    w = torch.softmax(torch.randn(M, k, generator=gen), dim=1)
    if case["neg_ids"] and M:
        ids[torch.rand(M, k, generator=gen) < 0.25] = -1
        ids[0] = -1
    shared = torch.randn(M, H, generator=gen).to(torch.bfloat16) if case["shared"] else None
    move = (lambda t: None if t is None else t.to(device))
    return move(x), move(ids), move(w), move(shared)


# --- one case, in process -----------------------------------------------------------------------
def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (||out|| when ref is all zeros)."""
    diff = (out.double() - ref).norm().item()
    norm = ref.norm().item()
    return diff / norm if norm > 0 else diff


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _capturable(backend) -> bool:
    # the reference backend synchronizes with the host by design (documented as not capturable)
    return bool(getattr(backend, "capturable", True))


def run_case(backend, prepared, spec: MoESpec, weights: ExpertWeights, case: dict, *, seed: int,
             tolerance: float, graph: bool = False, timing: bool = False) -> dict:
    """Run one case on a prepared backend and judge it.

    Returns {"status": "pass" | "fail", "rel_err": float or None, "detail": str,
             "graph": str or None, "us": float or None, "timing": how it was timed or None}.
    """
    device = weights.device
    x, ids, w, shared = case_inputs(spec, case, seed, device)
    M, H = case["M"], spec.hidden_size
    res = {"status": "pass", "rel_err": None, "detail": "", "graph": None, "us": None, "timing": None}
    ref = reference_moe(spec, weights, x, ids, w, shared, dtype=torch.float64)
    out = torch.full((M, H), float("nan"), dtype=x.dtype, device=device)
    try:
        ret = backend.forward(prepared, x, ids, w, out, shared)
        _sync(device)
    except Exception as e:
        res.update(status="fail", detail=f"forward raised {type(e).__name__}: {_first_line(e)}")
        return res
    problems = []
    if ret is not out:
        problems.append("forward returned a tensor other than `out`")
    bad = int((~torch.isfinite(out)).sum())
    if bad:
        problems.append(f"{bad} of {out.numel()} output elements are NaN/Inf (unwritten?)")
    else:
        res["rel_err"] = _rel(out, ref)
        if res["rel_err"] > tolerance:
            problems.append(f"relative error {res['rel_err']:.3g} > {tolerance:g}")
    if graph and M > 0:
        if _capturable(backend):
            ok, res["graph"] = _graph_check(backend, prepared, x, ids, w, shared, out, tolerance)
            if not ok:
                problems.append(res["graph"])
        else:
            res["graph"] = "not capturable (synchronizes with the host by design)"
    if timing and M > 0 and not problems:
        from .timing import measure

        t = measure(lambda: backend.forward(prepared, x, ids, w, out, shared), device=device,
                    warmup=3, reps=20, max_seconds=1.0, use_graph=_capturable(backend))
        res["us"], res["timing"] = t["median_us"], t["method"]
    if problems:
        res.update(status="fail", detail="; ".join(problems))
    return res


def _graph_check(backend, prepared, x, ids, w, shared, eager, tolerance):
    """Capture one call in a CUDA graph, replay it into a poisoned output, compare with eager."""
    gout = torch.full_like(eager, float("nan"))
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            backend.forward(prepared, x, ids, w, gout, shared)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            backend.forward(prepared, x, ids, w, gout, shared)
        gout.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
    except Exception as e:
        return False, f"CUDA graph capture/replay failed: {type(e).__name__}: {_first_line(e)}"
    if torch.equal(gout, eager):
        return True, "replay == eager (bitwise)"
    if not torch.isfinite(gout).all():
        return False, "CUDA graph replay left NaN/Inf in the output"
    rel = _rel(gout, eager.double())
    if rel <= tolerance:
        return True, f"replay within {rel:.2g} of eager (not bitwise)"
    return False, f"CUDA graph replay differs from eager: relative {rel:.3g}"


def _first_line(e) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else ""


def _cuda_broken(detail: str) -> bool:
    # after these the CUDA context is unusable: later cases in this process would all fail
    return any(s in detail for s in ("CUDA error", "AcceleratorError", "illegal memory access",
                                     "device-side assert"))


# --- the worker process ---------------------------------------------------------------------------
def _emit(event: dict):
    sys.stdout.write(PROTOCOL + json.dumps(event) + "\n")
    sys.stdout.flush()


def _worker(job_path: str) -> int:
    """Run job["cases"][job["start"]:] on one backend, printing protocol events."""
    from .tuning import environment

    job = json.loads(Path(job_path).read_text())
    device = torch.device(job["device"])
    _emit({"event": "hello", "env": environment(device)})
    try:
        backend = load_backend(job["backend"])
    except Exception as e:  # missing module, failed import: not usable here, not a failure
        _emit({"event": "unusable", "reason": f"{type(e).__name__}: {_first_line(e)}"})
        return 0
    problems, cases = job["problems"], job["cases"]
    current, state = None, None  # problem index; (prepared, spec, weights) or a skip/fail reason
    for i in range(job["start"], len(cases)):
        case = cases[i]
        if case["problem"] != current:
            current, state = case["problem"], None
            prob = problems[current]
            _emit({"event": "problem", "p": current})
            spec, fmt = spec_from_dict(prob["spec"]), prob["format"]
            try:
                sup = backend.supports(spec, fmt, device)
            except Exception as e:
                sup = (False, f"supports() raised {type(e).__name__}: {_first_line(e)}")
            if not sup[0]:
                state = ("skip", sup[1])
            else:
                try:
                    weights = random_weights(spec, fmt, device, prob["seed"])
                    state = (backend.prepare(spec, weights), spec, weights)
                except Exception as e:
                    state = ("fail", f"prepare raised {type(e).__name__}: {_first_line(e)}")
        _emit({"event": "start", "i": i})
        if state[0] in ("skip", "fail"):
            res = {"status": state[0], "detail": state[1]}
        else:
            prepared, spec, weights = state
            try:
                res = run_case(backend, prepared, spec, weights, case, seed=problems[current]["seed"],
                               tolerance=job["tolerances"][problems[current]["format"]],
                               graph=device.type == "cuda", timing=job["timing"])
            except Exception as e:  # the reference or the inputs failed (out of memory, say)
                res = {"status": "fail", "detail": f"checking raised {type(e).__name__}: {_first_line(e)}"}
        _emit({"event": "result", "i": i, "result": res})
        if res["status"] == "fail" and _cuda_broken(res.get("detail", "")):
            _emit({"event": "restart", "reason": "CUDA context unusable after this case"})
            return 3
    _emit({"event": "done"})
    return 0


# --- the parent: one worker process per backend, restarted after crashes ----------------------------
def _worker_env() -> dict:
    env = dict(os.environ)
    # the worker must import this very qmoe, wherever it was imported from
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exited with status {rc}"


def _tail(path, lines=8) -> str:
    try:
        text = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def check_backend(name: str, problems: list, cases: list, *, device: str, tolerances: dict,
                  timing: bool = False, timeout: float = 600.0, max_restarts: int = 8,
                  on_result=None) -> dict:
    """Run every case on one backend in worker processes.

    on_result(i, result) is called as results arrive (progress).
    Returns {"name", "usable": bool, "reason", "restarts", "env", "results": {case index: result}}.
    """
    out = {"name": name, "usable": True, "reason": "", "restarts": 0, "env": None, "results": {}}
    results = out["results"]

    def record(i, res):
        results[i] = res
        if on_result is not None:
            on_result(i, res)

    start = 0
    with tempfile.TemporaryDirectory(prefix="qmoe-check-") as tmp:
        while start < len(cases):
            job = {"backend": name, "device": device, "problems": problems, "cases": cases, "start": start,
                   "tolerances": tolerances, "timing": timing}
            job_path = os.path.join(tmp, "job.json")
            Path(job_path).write_text(json.dumps(job))
            err_path = os.path.join(tmp, f"stderr-{out['restarts']}.txt")
            events = _run_worker(job_path, err_path, timeout)
            running, preparing, last, done, timed_out, rc = None, None, None, False, False, None
            for ev in events:
                kind = ev.get("event")
                if kind == "hello":
                    out["env"] = out["env"] or ev.get("env")
                elif kind == "unusable":
                    events.close()  # ends the worker now, before its folder goes
                    out.update(usable=False, reason=ev["reason"])
                    for i in range(start, len(cases)):
                        record(i, {"status": "skip", "detail": f"not usable: {ev['reason']}"})
                    return out
                elif kind == "problem":
                    preparing, running = ev["p"], None
                elif kind == "start":
                    running, preparing = ev["i"], None
                elif kind == "result":
                    record(ev["i"], ev["result"])
                    running, last = None, ev["i"]
                elif kind == "done":
                    done = True
                elif kind == "_timeout":
                    timed_out = True
                elif kind == "_exit":
                    rc = ev["rc"]
            if done:
                break
            why = f"timed out after {timeout:g} s" if timed_out else f"worker {_describe_exit(rc)}"
            tail = _tail(err_path)
            detail = why + (f"; stderr: {tail}" if tail and not timed_out else "")
            status = "timeout" if timed_out else "crash"
            if running is not None:
                record(running, {"status": status, "detail": detail})
                start = running + 1
            elif preparing is not None:
                # died while generating weights or preparing: every case of that problem is lost
                lost = [i for i in range(start, len(cases)) if cases[i]["problem"] == preparing]
                for i in lost:
                    record(i, {"status": status, "detail": "while preparing: " + detail})
                start = lost[-1] + 1 if lost else start + 1
            elif last is not None:
                start = last + 1  # ended between cases (a CUDA error was reported): go on afresh
            else:
                # nothing started: a restart would fail the same way
                for i in range(start, len(cases)):
                    record(i, {"status": status, "detail": "worker failed before any case: " + detail})
                return out
            if start >= len(cases):
                break
            if out["restarts"] >= max_restarts:
                for i in range(start, len(cases)):
                    record(i, {"status": "not run", "detail": f"worker died {out['restarts'] + 1} times"})
                break
            out["restarts"] += 1
    return out


def _run_worker(job_path, err_path, timeout):
    """Yield the worker's protocol events; then {"event": "_timeout"} if it hung (it is killed)
    and {"event": "_exit", "rc": returncode}."""
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "qmoe.check", "--worker", job_path],
                                stdout=subprocess.PIPE, stderr=err, env=_worker_env(), text=True)
        lines = queue.Queue()

        def read():
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        started = False  # importing torch on a busy machine is not a hang: allow STARTUP_S for it
        try:
            while True:
                try:
                    line = lines.get(timeout=timeout if started else max(timeout, STARTUP_S))
                except queue.Empty:
                    proc.kill()
                    yield {"event": "_timeout"}
                    break
                if line is None:
                    break
                at = line.find(PROTOCOL)  # a library may have printed without a newline before it
                if at >= 0:
                    started = True
                    yield json.loads(line[at + len(PROTOCOL):])
        finally:
            if proc.poll() is None:
                proc.kill()
            rc = proc.wait()
            proc.stdout.close()
    yield {"event": "_exit", "rc": rc}


def _missing_module(name: str) -> str | None:
    """Why a backend's module cannot exist here (found without importing it), or None."""
    module = name.partition(":")[0] if ":" in name else f"qmoe.backends.{name}"
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package is missing
        found = False
    return None if found else f"not available in this build ({module} is missing)"


def run_checks(backends, problems, cases, *, device, tolerances, timing=False, timeout=600.0,
               max_restarts=8, progress=None) -> dict:
    """Check every backend; returns the JSON report (see `write_report`).

    progress: None or a callable(backend name, case index, result) for each result.
    """
    report = {"qmoe_check": 1, "env": None, "device": device, "tolerances": tolerances,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "backends": {}, "results": []}
    for name in backends:
        def on_result(i, res, name=name):
            if progress is not None:
                progress(name, i, res)

        missing = _missing_module(name)
        if missing is not None:  # no need to start a process to learn that
            r = {"usable": False, "reason": missing, "restarts": 0, "env": None, "results": {}}
            for i in range(len(cases)):
                r["results"][i] = {"status": "skip", "detail": f"not usable: {missing}"}
                on_result(i, r["results"][i])
        else:
            r = check_backend(name, problems, cases, device=device, tolerances=tolerances, timing=timing,
                              timeout=timeout, max_restarts=max_restarts, on_result=on_result)
        report["env"] = report["env"] or r["env"]
        report["backends"][name] = {"usable": r["usable"], "reason": r["reason"], "restarts": r["restarts"]}
        for i, case in enumerate(cases):
            res = r["results"].get(i, {"status": "not run", "detail": "no result"})
            prob = problems[case["problem"]]
            report["results"].append({"backend": name, "problem": prob["id"], "case": case["id"],
                                      "M": case["M"], "format": prob["format"], **res})
    counts = {}
    for res in report["results"]:
        counts[res["status"]] = counts.get(res["status"], 0) + 1
    report["summary"] = counts
    return report


# --- comparing two reports ----------------------------------------------------------------------
def compare_reports(before: dict, after: dict, threshold: float = 0.10) -> dict:
    """What changed between two `qmoe check --json` reports.

    Returns {"env": [(what, before, after)], "broke": [...], "fixed": [...], "changed": [...],
             "slower": [...], "faster": [...], "only_before": [...], "only_after": [...]};
    broke/fixed/changed: (backend, problem, case, status before, status after, detail after);
    slower/faster: (backend, problem, case, us before, us after) where the time changed by more
    than `threshold` (0.10 = 10%).
    """
    def index(rep):
        return {(r["backend"], r["problem"], r["case"]): r for r in rep.get("results", [])}

    b, a = index(before), index(after)
    res = {k: [] for k in ("env", "broke", "fixed", "changed", "slower", "faster", "only_before", "only_after")}
    eb, ea = before.get("env") or {}, after.get("env") or {}
    for what in ("gpu", "capability"):
        if eb.get(what) != ea.get(what):
            res["env"].append((what, eb.get(what), ea.get(what)))
    vb, va = eb.get("versions") or {}, ea.get("versions") or {}
    for lib in sorted(set(vb) | set(va)):
        if vb.get(lib) != va.get(lib):
            res["env"].append((lib, vb.get(lib), va.get(lib)))
    for key in sorted(set(b) | set(a)):
        if key not in a:
            res["only_before"].append(key)
            continue
        if key not in b:
            res["only_after"].append(key)
            continue
        sb, sa = b[key]["status"], a[key]["status"]
        row = (*key, sb, sa, a[key].get("detail", ""))
        if sb != sa:
            if sb == "pass" and sa in FAILED:
                res["broke"].append(row)
            elif sb in FAILED and sa == "pass":
                res["fixed"].append(row)
            else:
                res["changed"].append(row)
        tb, ta = b[key].get("us"), a[key].get("us")
        if tb and ta:
            if ta > tb * (1 + threshold):
                res["slower"].append((*key, tb, ta))
            elif tb > ta * (1 + threshold):
                res["faster"].append((*key, tb, ta))
    return res


# --- the command ---------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--preset", action="append", metavar="NAME",
                        help=f"preset(s) to check (repeat or comma-separate; default all: {', '.join(presets)})")
    parser.add_argument("--format", action="append", metavar="FMT",
                        help="weight format(s) (default: each preset's own format; 'all' for every format)")
    parser.add_argument("--backend", action="append", metavar="NAME",
                        help="backend(s) to check (default: every qmoe backend; 'module:attr' for an "
                             "object following the backend protocol)")
    parser.add_argument("--tokens", metavar="M,M,...", help=f"token counts (default {','.join(map(str, TOKENS))})")
    parser.add_argument("--quick", action="store_true",
                        help="scaled-down shapes (automatic without a GPU)")
    parser.add_argument("--device", help="device to check on (default cuda if present, else cpu)")
    parser.add_argument("--time", action="store_true", help="also time each case (stored for --compare)")
    parser.add_argument("--tolerance", action="append", metavar="FMT=VALUE",
                        help="override a format's relative-error tolerance")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds a started worker may stay silent (one case, or preparing weights; the "
                             "first FlashInfer call may compile for minutes) before it counts as hung (default 600)")
    parser.add_argument("--max-restarts", type=int, default=8,
                        help="fresh worker processes per backend after crashes (default 8)")
    parser.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"),
                        help="compare two --json reports instead of checking")
    parser.add_argument("--threshold", type=float, default=0.10,
                        help="with --compare: report times that changed by more than this fraction (default 0.10)")
    parser.add_argument("--worker", metavar="JOB", help=argparse.SUPPRESS)


def _split(values) -> list:
    return [v.strip() for item in (values or []) for v in item.split(",") if v.strip()]


def _parse_tokens(text) -> tuple:
    if text is None:
        return TOKENS
    try:
        tokens = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        tokens = ()
    if not tokens or min(tokens) < 0:
        raise ValueError(f"--tokens: expected comma-separated integers >= 0, got {text!r}")
    return tokens


def _parse_tolerances(items) -> dict:
    tol = dict(TOLERANCES)
    for item in items or []:
        fmt, _, value = item.partition("=")
        try:
            v = float(value)
        except ValueError:
            v = -1.0
        if fmt not in FORMATS or not v > 0:
            raise ValueError(f"--tolerance: expected FMT=VALUE with FMT in {', '.join(FORMATS)} and VALUE > 0, "
                             f"got {item!r}")
        tol[fmt] = v
    return tol


def run(args) -> int:
    if args.worker:
        return _worker(args.worker)
    from rich.console import Console

    console = Console()
    if args.compare:
        return _run_compare(args, console)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or torch.device(device).type != "cuda"
    preset_names = _split(args.preset) or list(presets)
    formats = _split(args.format)
    formats = list(FORMATS) if formats == ["all"] else (formats or None)
    problems = make_problems(preset_names, formats, quick)
    cases = make_cases(problems, _parse_tokens(args.tokens))
    backends = _split(args.backend) or list(BACKEND_NAMES)
    tolerances = _parse_tolerances(args.tolerance)
    if quick and not args.quick:
        console.print("[dim]no GPU: checking scaled-down shapes (--quick)[/dim]")

    report = _run_with_progress(backends, problems, cases, device, tolerances, args)
    report["quick"] = quick
    _print_summary(console, report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        console.print(f"report written to {args.json}", highlight=False, soft_wrap=True, markup=False)
    return 1 if any(r["status"] in FAILED for r in report["results"]) else 0


def _run_with_progress(backends, problems, cases, device, tolerances, args):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[what]}"))
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task("qmoe check", total=len(backends) * len(cases), what="")
        failures = [0]

        def progress(name, i, res):
            failures[0] += res["status"] in FAILED
            case = cases[i]
            bar.update(task, advance=1, description=f"qmoe check ({failures[0]} failed)",
                       what=f"{name} {problems[case['problem']]['id']} {case['id']}: {res['status']}")

        return run_checks(backends, problems, cases, device=device, tolerances=tolerances, timing=args.time,
                          timeout=args.timeout, max_restarts=args.max_restarts, progress=progress)


def _print_summary(console, report):
    from rich.markup import escape
    from rich.table import Table

    env = report.get("env") or {}
    versions = ", ".join(f"{k} {v or '-'}" for k, v in sorted((env.get("versions") or {}).items()))
    console.print(f"[bold]qmoe check[/bold] on {escape(str(env.get('gpu', report['device'])))}"
                  f"{' (quick shapes)' if report.get('quick') else ''}: {escape(versions)}", soft_wrap=True)
    table = Table()
    for col in ("backend", "pass", "fail", "crash", "timeout", "skip", "worst rel err"):
        table.add_column(col, justify="left" if col == "backend" else "right")
    notes = []
    for name, info in report["backends"].items():
        rows = [r for r in report["results"] if r["backend"] == name]
        n = {s: sum(r["status"] == s for r in rows) for s in ("pass", "fail", "crash", "timeout", "skip")}
        errs = [r["rel_err"] for r in rows if r.get("rel_err") is not None]
        table.add_row(name, *(str(n[s]) for s in ("pass", "fail", "crash", "timeout", "skip")),
                      f"{max(errs):.2e}" if errs else "-")
        if not info["usable"]:
            notes.append(f"{name}: not usable: {info['reason']}")
        else:
            skipped = sorted({r.get("detail", "") for r in rows if r["status"] == "skip"})
            notes += [f"{name}: skipped: {d}" for d in skipped]
            if info["restarts"]:
                notes.append(f"{name}: {info['restarts']} fresh worker process(es) after crashes")
    console.print(table)
    for line in notes:
        console.print(line, highlight=False, soft_wrap=True, markup=False)
    bad = [r for r in report["results"] if r["status"] in FAILED]
    for r in bad[:40]:
        console.print(f"[red]{r['status'].upper()}[/red] "
                      + escape(f"{r['backend']} {r['problem']} {r['case']}: {r['detail']}"),
                      highlight=False, soft_wrap=True)
    if len(bad) > 40:
        console.print(f"... and {len(bad) - 40} more (see --json)")
    console.print("[green]all checked cases pass[/green]" if not bad else f"[red]{len(bad)} case(s) failed[/red]")


def _run_compare(args, console) -> int:
    if not args.threshold >= 0:
        raise ValueError(f"--threshold: expected a fraction >= 0, got {args.threshold}")
    reports = []
    for path in args.compare:
        try:
            reports.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--compare: cannot read a qmoe check report from {path}: {e}") from None
    d = compare_reports(*reports, threshold=args.threshold)

    def say(text):
        console.print(text, highlight=False, soft_wrap=True, markup=False)

    for what, b, a in d["env"]:
        say(f"{what}: {b or '-'} -> {a or '-'}")
    for title, rows in (("broke", d["broke"]), ("fixed", d["fixed"]), ("status changed", d["changed"])):
        for be, prob, case, sb, sa, detail in rows:
            why = f" ({detail})" if detail and sa != "pass" else ""
            say(f"{title.upper()}: {be} {prob} {case}: {sb} -> {sa}{why}")
    pct = round(args.threshold * 100)
    for be, prob, case, tb, ta in d["slower"]:  # after > before x (1 + threshold)
        say(f"SLOWER by more than {pct}%: {be} {prob} {case}: {tb:.1f} -> {ta:.1f} us ({ta / tb - 1:+.0%})")
    for be, prob, case, tb, ta in d["faster"]:  # before > after x (1 + threshold): a speed-up factor
        say(f"FASTER by more than {pct}%: {be} {prob} {case}: {tb:.1f} -> {ta:.1f} us ({tb / ta:.2f}x as fast)")
    for title, rows in (("only in before", d["only_before"]), ("only in after", d["only_after"])):
        if rows:
            say(f"{len(rows)} case(s) {title}")
    regressions = len(d["broke"]) + len(d["slower"])
    say(f"{len(d['broke'])} broke, {len(d['fixed'])} fixed, {len(d['slower'])} slower, {len(d['faster'])} faster")
    return 1 if regressions else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="qmoe check", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
