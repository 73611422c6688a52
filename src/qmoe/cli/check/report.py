"""Reading `qmoe check` reports: the summary printed after a run, and comparing two runs."""

from __future__ import annotations

import json
from pathlib import Path

FAILED = ("fail", "crash", "timeout", "not run")
"""Statuses that make `qmoe check` exit non-zero ("pass", "no" and "skip" do not; "no" is a
property that does not hold and was not required)."""


def read_report(path) -> dict:
    """A `qmoe check --json` report from a file (ValueError naming the file and why it is not one)."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--compare: cannot read a qmoe check report from {path}: {e}") from None
    why = None
    if not isinstance(report, dict):
        why = f"it holds a JSON {type(report).__name__}, not an object"
    elif "qmoe_check" not in report:
        why = "it has no 'qmoe_check' field (not written by `qmoe check --json`)"
    elif not isinstance(report.get("results"), list):
        why = "its 'results' is not a list"
    else:
        for i, r in enumerate(report["results"]):
            if not isinstance(r, dict) or not all(isinstance(r.get(k), str) for k in ("backend", "problem", "case",
                                                                                      "status")):
                why = f"result {i} lacks backend / problem / case / status"
                break
    if why is not None:
        raise ValueError(f"--compare: {path} is not a qmoe check report: {why}")
    return report


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
