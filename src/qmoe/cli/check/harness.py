"""The parent side of `qmoe check`: one worker process per backend (worker.py), restarted after
crashes; a case that crashes its process (illegal memory access, abort, segfault) or hangs past
the timeout is reported as a crash or timeout and a fresh process goes on with the next case."""

from __future__ import annotations

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
from pathlib import Path

from .worker import PROTOCOL

STARTUP_S = 300.0
"""Seconds a worker may take to start (import torch and the backend) before it counts as hung."""

REPORT_VERSION = 2
"""Version of the JSON report (`qmoe check --json`)."""

def _worker_env() -> dict:
    env = dict(os.environ)
    # the worker must import this very qmoe, wherever it was imported from
    root = str(Path(__file__).resolve().parents[3])
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
                  on_result=None, require=()) -> dict:
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
                   "tolerances": tolerances, "timing": timing, "require": list(require)}
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
        proc = subprocess.Popen([sys.executable, "-m", "qmoe.cli.check.worker", job_path],
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
               max_restarts=8, progress=None, require=()) -> dict:
    """Check every backend; returns the JSON report (see `write_report`).

    progress: None or a callable(backend name, case index, result) for each result.
    """
    report = {"qmoe_check": REPORT_VERSION, "env": None, "device": device, "tolerances": tolerances,
              "require": list(require),
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
                              timeout=timeout, max_restarts=max_restarts, on_result=on_result, require=require)
        report["env"] = report["env"] or r["env"]
        report["backends"][name] = {"usable": r["usable"], "reason": r["reason"], "restarts": r["restarts"]}
        for i, case in enumerate(cases):
            res = r["results"].get(i, {"status": "not run", "detail": "no result"})
            prob = problems[case["problem"]]
            report["results"].append({"backend": name, "problem": prob["id"], "case": case["id"],
                                      "M": case["M"], "kind": case.get("kind", "accuracy"),
                                      "format": prob["format"], **res})
    counts = {}
    for res in report["results"]:
        counts[res["status"]] = counts.get(res["status"], 0) + 1
    report["summary"] = counts
    return report


__all__ = ["REPORT_VERSION", "check_backend", "run_checks"]
