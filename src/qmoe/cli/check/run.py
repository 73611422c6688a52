"""Running and judging one case on a prepared backend, in this process.

Accuracy cases: the output poisoned with NaN before the backend runs (an unwritten element
fails), relative error against `reference_moe` in float64 on the same dequantized weights, and
on a GPU the call captured in a CUDA graph and replayed into a re-poisoned output, which must
match the eager result. NaN cases: the output must be NaN exactly in the rows the reference
makes NaN, and right elsewhere. Property cases (determinism, batch invariance) report whether
the property holds ("pass") or not ("no": a fact, a failure only when required).
"""

from __future__ import annotations

import torch

from ...backends.reference import reference_moe, relative_error
from .cases import case_inputs, with_nan_block


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _first_line(e) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else ""


def _forward(backend, prepared, x, ids, w, shared):
    out = torch.full_like(x, float("nan"))
    ret = backend.forward(prepared, x, ids, w, out, shared)
    _sync(x.device)
    return out, ret


def run_case(backend, prepared, spec, weights, case: dict, *, seed: int, tolerance: float,
             graph: bool = False, timing: bool = False, require=()) -> dict:
    """Run one case on a prepared backend and judge it.

    require: properties ("deterministic", "invariant") whose absence fails the case.
    Returns {"status": "pass" | "fail" | "no", "rel_err": float or None, "detail": str,
             "graph": str or None, "us": float or None, "timing": how it was timed or None}.
    """
    kind = case.get("kind", "accuracy")
    if kind in ("deterministic", "invariant"):
        return _property_case(backend, prepared, spec, weights, case, seed, kind in require)
    device = weights.device
    if kind == "nan" and case.get("nan") == "weight":
        weights = with_nan_block(weights)
        prepared = backend.prepare(spec, weights)
    x, ids, w, shared = case_inputs(spec, case, seed, device)
    if kind == "nan" and case.get("nan") == "weight" and x.shape[0]:
        ids[x.shape[0] // 2, 0] = 0  # one token surely routed to the NaN expert
        ids[x.shape[0] // 2, 1:] = torch.where(ids[x.shape[0] // 2, 1:] == 0, -1, ids[x.shape[0] // 2, 1:])
    M = case["M"]
    res = {"status": "pass", "rel_err": None, "detail": "", "graph": None, "us": None, "timing": None}
    ref = reference_moe(spec, weights, x, ids, w, shared, dtype=torch.float64)
    try:
        out, ret = _forward(backend, prepared, x, ids, w, shared)
    except Exception as e:
        res.update(status="fail", detail=f"forward raised {type(e).__name__}: {_first_line(e)}")
        return res
    problems = []
    if ret is not out:
        problems.append("forward returned a tensor other than `out`")
    if kind == "nan":
        problems += _judge_nan(out, ref, tolerance, res)
    else:
        problems += _judge_values(out, ref, tolerance, res, "output elements are NaN/Inf (unwritten?)", "")
    if graph and M > 0 and kind == "accuracy":
        if backend.capturable:
            ok, res["graph"] = _graph_check(backend, prepared, x, ids, w, shared, out, tolerance)
            if not ok:
                problems.append(res["graph"])
        else:
            res["graph"] = "not capturable (declared by the backend)"
    if timing and M > 0 and not problems and kind == "accuracy":
        from ...timing import measure

        t = measure(lambda: backend.forward(prepared, x, ids, w, out, shared), device=device,
                    warmup=3, reps=20, max_seconds=1.0, use_graph=backend.capturable)
        res["us"], res["timing"] = t["median_us"], t["method"]
    if problems:
        res.update(status="fail", detail="; ".join(problems))
    return res


def _judge_nan(out, ref, tolerance, res) -> list:
    """NaN exactly in the reference's NaN rows (whole rows), right elsewhere."""
    problems = []
    want = torch.isnan(ref).any(dim=1)
    if not bool(want.any()):
        return ["the case put no NaN into the reference: it checks nothing"]
    got_all = torch.isnan(out).all(dim=1)
    missing = int((want & ~got_all).sum())
    if missing:
        problems.append(f"{missing} row(s) the reference makes NaN are not all NaN: the backend dropped a NaN")
    rest = ~want
    if bool(rest.any()):
        problems += _judge_values(out[rest], ref[rest], tolerance, res,
                                  "elements outside the NaN rows are NaN/Inf (the NaN spread or was unwritten)",
                                  " outside the NaN rows")
    return problems


def _judge_values(out, ref, tolerance, res, unwritten: str, where: str) -> list:
    """[] when every element of out is finite and within `tolerance` of ref (res["rel_err"] set),
    else the problem, in words."""
    bad = int((~torch.isfinite(out)).sum())
    if bad:
        return [f"{bad} of {out.numel()} {unwritten}"]
    res["rel_err"] = relative_error(out, ref)
    if res["rel_err"] > tolerance:
        return [f"relative error{where} {res['rel_err']:.3g} > {tolerance:g}"]
    return []


def _graph_check(backend, prepared, x, ids, w, shared, eager, tolerance):
    """Capture one call in a CUDA graph, replay it into a poisoned output, compare with eager."""
    from ...timing import capture_graph

    gout = torch.full_like(eager, float("nan"))
    try:
        g = capture_graph(lambda: backend.forward(prepared, x, ids, w, gout, shared))
        gout.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
    except Exception as e:
        return False, f"CUDA graph capture/replay failed: {type(e).__name__}: {_first_line(e)}"
    if torch.equal(gout, eager):
        return True, "replay == eager (bitwise)"
    if not torch.isfinite(gout).all():
        return False, "CUDA graph replay left NaN/Inf in the output"
    rel = relative_error(gout, eager)
    if rel <= tolerance:
        return True, f"replay within {rel:.2g} of eager (not bitwise)"
    return False, f"CUDA graph replay differs from eager: relative {rel:.3g}"


def _property_case(backend, prepared, spec, weights, case, seed, required) -> dict:
    """Determinism (the same call twice, bitwise) or batch invariance (every prefix size in
    case["sizes"] against the largest batch, row by row, bitwise)."""
    res = {"status": "pass", "rel_err": None, "detail": "", "graph": None, "us": None, "timing": None}
    x, ids, w, _ = case_inputs(spec, case, seed, weights.device)
    try:
        if case["kind"] == "deterministic":
            outs = [_forward(backend, prepared, x, ids, w, None)[0] for _ in range(3)]
            differ = [int((~_same(o, outs[0])).any(dim=1).sum()) for o in outs[1:]]
            holds = not any(differ)
            res["detail"] = ("3 runs bitwise equal" if holds
                             else f"rows differing from the first run: {differ} of {x.shape[0]}")
        else:
            full = _forward(backend, prepared, x, ids, w, None)[0]
            seen = []
            for m in case["sizes"]:
                part = _forward(backend, prepared, x[:m].contiguous(), ids[:m].contiguous(), w[:m].contiguous(),
                                None)[0]
                n = int((~_same(part, full[:m])).any(dim=1).sum())
                if n:
                    seen.append(f"M={m}: {n} row(s)")
            holds = not seen
            res["detail"] = (f"rows of batches of {case['sizes'][:-1]} equal the same tokens in a batch of "
                             f"{case['sizes'][-1]}, bitwise" if holds else
                             "rows differing from the same tokens in a batch of "
                             f"{case['sizes'][-1]}: " + ", ".join(seen))
    except Exception as e:
        res.update(status="fail", detail=f"forward raised {type(e).__name__}: {_first_line(e)}")
        return res
    if not holds:
        res["status"] = "fail" if required else "no"
    return res


def _same(a, b):
    """Elementwise bitwise equality (NaN equal to NaN of the same bits)."""
    return a.view(torch.int16) == b.view(torch.int16) if a.dtype in (torch.bfloat16, torch.float16) else \
        a.view(torch.int32) == b.view(torch.int32) if a.dtype == torch.float32 else a == b


__all__ = ["run_case"]
