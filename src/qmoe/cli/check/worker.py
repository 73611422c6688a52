"""The worker process of `qmoe check`: one backend, a list of cases, one protocol line per event.

    python -m qmoe.cli.check.worker JOB.json

The parent (harness.py) reads the lines starting with PROTOCOL; anything else a library prints
is ignored. A CUDA error inside a case ends the process (the CUDA context is unusable after
it), and the parent starts a fresh one at the next case.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

PROTOCOL = "QMOE-CHECK "
"""Prefix of the worker's protocol lines on stdout."""


def emit(event: dict):
    sys.stdout.write(PROTOCOL + json.dumps(event) + "\n")
    sys.stdout.flush()


def _first_line(e) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else ""


def cuda_broken(detail: str) -> bool:
    """Whether a failure's text says the CUDA context is unusable (later cases would all fail)."""
    return any(s in detail for s in ("CUDA error", "AcceleratorError", "illegal memory access",
                                     "device-side assert"))


def main(job_path: str) -> int:
    """Run job["cases"][job["start"]:] on one backend, printing protocol events."""
    from ...tuning import environment
    from ...weights import random_weights
    from ..common import load_backend
    from .cases import spec_from_dict
    from .run import run_case

    job = json.loads(Path(job_path).read_text())
    device = torch.device(job["device"])
    emit({"event": "hello", "env": environment(device)})
    try:
        backend = load_backend(job["backend"])
    except Exception as e:  # missing module, failed import: not usable here, not a failure
        cause = e.__cause__ or e
        emit({"event": "unusable", "reason": f"{type(cause).__name__}: {_first_line(cause)}"})
        return 0
    problems, cases = job["problems"], job["cases"]
    current, state = None, None  # problem index; (prepared, spec, weights) or a skip/fail reason
    for i in range(job["start"], len(cases)):
        case = cases[i]
        if case["problem"] != current:
            current, state = case["problem"], None
            prob = problems[current]
            emit({"event": "problem", "p": current})
            spec, fmt = spec_from_dict(prob["spec"]), prob["format"]
            sup = backend.supports(spec, fmt, device)
            if not sup[0]:
                state = ("skip", sup[1])
            else:
                try:
                    weights = random_weights(spec, fmt, device, prob["seed"])
                    state = (backend.prepare(spec, weights), spec, weights)
                except Exception as e:
                    state = ("fail", f"prepare raised {type(e).__name__}: {_first_line(e)}")
        emit({"event": "start", "i": i})
        if state[0] in ("skip", "fail"):
            res = {"status": state[0], "detail": state[1]}
        else:
            prepared, spec, weights = state
            try:
                res = run_case(backend, prepared, spec, weights, case, seed=problems[current]["seed"],
                               tolerance=job["tolerances"][problems[current]["format"]],
                               graph=device.type == "cuda", timing=job["timing"], require=job.get("require", ()))
            except Exception as e:  # the reference or the inputs failed (out of memory, say)
                res = {"status": "fail", "detail": f"checking raised {type(e).__name__}: {_first_line(e)}"}
        emit({"event": "result", "i": i, "result": res})
        if res["status"] == "fail" and cuda_broken(res.get("detail", "")):
            emit({"event": "restart", "reason": "CUDA context unusable after this case"})
            return 3
    emit({"event": "done"})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
