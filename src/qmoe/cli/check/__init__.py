"""`qmoe check`: qualify every backend on this machine against the reference, crash-isolated.

For each preset (and format) a shape matrix of cases is run (cases.py): token counts M in TOKENS,
expert ids of -1, a shared-expert output, NaN propagation, a variant of each preset whose hidden
and intermediate sizes need padding, and two properties: run-to-run determinism and batch
invariance (reported per backend; failures only with --require). Each case's output is poisoned
with NaN first and compared in float64 with the reference on the same dequantized weights
(run.py); on a GPU the call is also captured in a CUDA graph and replayed.

Each backend runs in its own process (worker.py, harness.py): when it dies or hangs, the case it
was running is reported as a crash or timeout, and a fresh process goes on with the next case.
Without a GPU, or with --quick, presets are scaled down to run in minutes on a CPU.

    package layout: cases.py (problems, cases, inputs), run.py (one case, judged), worker.py (the
    worker process), harness.py (worker processes, restarts), report.py (summary input, --compare)
"""

from __future__ import annotations

import argparse

import torch

from ...formats import FORMATS
from ..common import (Steps, add_problem_arguments, emit_json, number, output_path, parse_backends, parse_choices,
                      parse_device, parse_formats, parse_presets, parse_tokens)
from .cases import (PROPERTIES, TOKENS, TOLERANCES, case_inputs, make_cases, make_problems, padded_spec,
                    quick_spec, spec_from_dict, spec_to_dict)
from .harness import check_backend, run_checks
from .report import FAILED, compare_reports, read_report
from .run import run_case


def add_arguments(parser: argparse.ArgumentParser):
    add_problem_arguments(parser, "check")
    parser.add_argument("--backend", action="append", metavar="NAME",
                        help="backend(s) to check (default: every qmoe backend; 'module:attr' for an "
                             "object following the backend protocol)")
    parser.add_argument("--tokens", metavar="M,M,...", help=f"token counts (default {','.join(map(str, TOKENS))})")
    parser.add_argument("--quick", action="store_true", help="scaled-down shapes (automatic without a GPU)")
    parser.add_argument("--device", help="device to check on (default cuda if present, else cpu)")
    parser.add_argument("--time", action="store_true", help="also time each case (stored for --compare)")
    parser.add_argument("--tolerance", action="append", metavar="FMT=VALUE",
                        help="override a format's relative-error tolerance")
    parser.add_argument("--require", metavar="PROPS",
                        help=f"properties whose absence fails the check: {', '.join(PROPERTIES)} (comma-separated)")
    parser.add_argument("--timeout", type=number("--timeout", float, 0, above=True), default=600.0,
                        help="seconds a started worker may stay silent (one case, or preparing weights; the "
                             "first FlashInfer call may compile for minutes) before it counts as hung (default 600)")
    parser.add_argument("--max-restarts", type=number("--max-restarts", int, 0), default=8,
                        help="fresh worker processes per backend after crashes (default 8)")
    parser.add_argument("--json", metavar="PATH", help="write the full report as JSON to PATH ('-': stdout)")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"),
                        help="compare two --json reports instead of checking")
    parser.add_argument("--threshold", type=number("--threshold", float, 0), default=0.10,
                        help="with --compare: report times that changed by more than this fraction (default 0.10)")


def parse_tolerances(items) -> dict:
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


def parse_require(text) -> tuple:
    return tuple(parse_choices([text] if text else [], PROPERTIES, "--require", "a comma-separated subset of"))


def run(args) -> int:
    from rich.console import Console

    console = Console()
    if args.compare:
        return _run_compare(args, console)
    output_path(args.json, "--json")
    device = str(parse_device(args.device))
    quick = args.quick or torch.device(device).type != "cuda"
    problems = make_problems(parse_presets(args.preset), parse_formats(args.format) or None, quick)
    cases = make_cases(problems, parse_tokens(args.tokens, minimum=0, default=TOKENS), quick=quick)
    backends = parse_backends(args.backend)
    tolerances = parse_tolerances(args.tolerance)
    require = parse_require(args.require)
    if quick and not args.quick:
        console.print("[dim]no GPU: checking scaled-down shapes (--quick)[/dim]")

    with Steps("qmoe check", len(backends) * len(cases)) as steps:
        failures = [0]

        def progress(name, i, res):
            failures[0] += res["status"] in FAILED
            case = cases[i]
            steps.advance(f"{name} {problems[case['problem']]['id']} {case['id']}: {res['status']}"
                          + (f" ({failures[0]} failed so far)" if failures[0] else ""))

        report = run_checks(backends, problems, cases, device=device, tolerances=tolerances, timing=args.time,
                            timeout=args.timeout, max_restarts=args.max_restarts, progress=progress, require=require)
    report["quick"] = quick
    if args.json != "-":
        print_summary(console, report)
    emit_json(args, report)
    if args.json not in (None, "-"):
        console.print(f"report written to {args.json}", highlight=False, soft_wrap=True, markup=False)
    return 1 if any(r["status"] in FAILED for r in report["results"]) else 0


def _property(rows, kind) -> str:
    rows = [r for r in rows if r.get("kind") == kind]
    if not rows or all(r["status"] == "skip" for r in rows):
        return "-"
    if all(r["status"] == "pass" for r in rows if r["status"] != "skip"):
        return "yes"
    return "NO" if any(r["status"] in ("no", "fail") for r in rows) else "?"


def print_summary(console, report):
    from rich.markup import escape
    from rich.table import Table

    env = report.get("env") or {}
    versions = ", ".join(f"{k} {v or '-'}" for k, v in sorted((env.get("versions") or {}).items()))
    console.print(f"[bold]qmoe check[/bold] on {escape(str(env.get('gpu', report['device'])))}"
                  f"{' (quick shapes)' if report.get('quick') else ''}: {escape(versions)}", soft_wrap=True)
    table = Table()
    for col in ("backend", "pass", "fail", "crash", "timeout", "skip", "worst rel err", "deterministic",
                "batch-invariant"):
        if col == "backend":  # a module:attr name folds over lines rather than losing its end
            table.add_column(col, justify="left", overflow="fold")
        else:
            table.add_column(col, justify="right")
    notes = []
    total_pass = total_skip = 0
    for name, info in report["backends"].items():
        rows = [r for r in report["results"] if r["backend"] == name]
        n = {s: sum(r["status"] == s for r in rows) for s in ("pass", "fail", "crash", "timeout", "skip")}
        total_pass += n["pass"]
        total_skip += n["skip"]
        errs = [r["rel_err"] for r in rows if r.get("rel_err") is not None]
        table.add_row(name, *(str(n[s]) for s in ("pass", "fail", "crash", "timeout", "skip")),
                      f"{max(errs):.2e}" if errs else "-", _property(rows, "deterministic"),
                      _property(rows, "invariant"))
        if not info["usable"]:
            notes.append(f"{name}: not usable: {info['reason']}")
        else:
            skipped = sorted({r.get("detail", "") for r in rows if r["status"] == "skip"})
            notes += [f"{name}: skipped: {d}" for d in skipped]
            if info["restarts"]:
                notes.append(f"{name}: {info['restarts']} fresh worker process(es) after crashes")
        for r in rows:
            if r.get("kind") in PROPERTIES and r["status"] in ("no", "fail"):
                notes.append(f"{name} {r['problem']} {r['case']}: {r['detail']}")
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
    skipped = f"; {total_skip} skipped (see above)" if total_skip else ""
    if bad:
        console.print(f"[red]{len(bad)} case(s) failed[/red], {total_pass} passed{skipped}", highlight=False)
    elif total_pass == 0:
        console.print(f"[yellow]no case was checked[/yellow]{skipped}", highlight=False)
    else:
        console.print(f"[green]all {total_pass} checked cases pass[/green]{skipped}", highlight=False)


def _run_compare(args, console) -> int:
    reports = [read_report(path) for path in args.compare]
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
    """`qmoe check` as a function (tests): returns the exit status."""
    from .. import main as cli_main

    return cli_main(["check", *(argv or [])])


__all__ = ["FAILED", "PROPERTIES", "TOKENS", "TOLERANCES", "add_arguments", "case_inputs", "check_backend",
           "compare_reports", "main", "make_cases", "make_problems", "padded_spec", "parse_require",
           "parse_tolerances", "print_summary", "quick_spec", "read_report", "run", "run_case", "run_checks",
           "spec_from_dict", "spec_to_dict"]
