"""What `qmoe check` runs: problems (a spec and a format), cases (inputs), and their inputs.

Per problem: every M in TOKENS; every M >= 1 again with ids of -1 (a token with none at all
among them); one shared-expert case; NaN propagation (a NaN in one token's input; a NaN weight
block in one expert, i.e. an E8M0 0xFF / E4M3 NaN / bf16 NaN scale); and two qualifications that
are properties rather than accuracy: run-to-run determinism (the same inputs twice, bitwise) and
batch invariance (each token's output alone and inside batches of several sizes, bitwise).
"""

from __future__ import annotations

import dataclasses
import zlib

import torch

from ...formats import FORMATS, QuantizedTensor
from ...spec import MoESpec, Routing, SwiGLU, presets
from ..common import preset_problems

TOKENS = (0, 1, 2, 3, 7, 64, 255, 1024, 4096)
"""Token counts every problem is checked at."""

TOLERANCES = {"bf16": 1e-2, "mxfp4": 1e-2, "nvfp4": 1e-2, "int4": 1e-2}
"""Largest relative error accepted per weight format, for W4A16 (bf16 activations): the
weights dequantize exactly, so the error comes from bf16 rounding of the intermediate and the
output (about 2e-3) and the summation order; the same bound for every format today. A backend
that quantizes activations needs a looser bound: --tolerance FMT=VALUE."""

INVARIANCE_SIZES = (1, 2, 3, 8, 16, 64, 256)
"""Batch sizes whose rows are compared with the same tokens inside the largest batch (GPU)."""
INVARIANCE_SIZES_QUICK = (1, 3, 16)
"""The same on quick (CPU) shapes."""

PROPERTIES = ("deterministic", "invariant")
"""Qualifications reported per backend; failures only when required (--require)."""


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

    formats: None (each preset's own format), or a list of format names.
    """
    problems = []
    for name, fmt in preset_problems(preset_names, formats):
        if name not in presets:
            raise ValueError(f"preset: expected one of {', '.join(presets)}, got {name!r}")
        if fmt not in FORMATS:
            raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
        base = presets[name]
        for spec in ([quick_spec(base)] if quick else [base, padded_spec(base)]):
            pid = f"{spec.name}/{fmt}"
            problems.append({"id": pid, "spec": spec_to_dict(spec), "format": fmt, "seed": zlib.crc32(pid.encode())})
    return problems


def _case(p, cid, M, kind="accuracy", **kw):
    return {"problem": p, "id": cid, "M": M, "kind": kind, "neg_ids": kw.get("neg_ids", False),
            "shared": kw.get("shared", False), "nan": kw.get("nan"), "sizes": kw.get("sizes")}


def make_cases(problems: list, tokens=TOKENS, *, quick: bool = False) -> list:
    """[{"problem": index, "id", "M", "kind", "neg_ids", "shared", "nan", "sizes"}]: per problem
    every M in tokens; every M >= 1 again with ids of -1; one shared-expert case and the NaN
    cases at the middle positive M; then "determinism" and "invariance" (kind = the property)."""
    positive = [m for m in tokens if m >= 1]
    sizes = INVARIANCE_SIZES_QUICK if quick else INVARIANCE_SIZES
    cases = []
    for p in range(len(problems)):
        cases += [_case(p, f"M={m}", m) for m in tokens]
        cases += [_case(p, f"M={m} ids=-1", m, neg_ids=True) for m in positive]
        if positive:
            m = positive[len(positive) // 2]
            cases.append(_case(p, f"M={m} +shared", m, shared=True))
            cases.append(_case(p, f"M={m} NaN input", m, kind="nan", nan="input"))
            cases.append(_case(p, f"M={m} NaN weight block", m, kind="nan", nan="weight"))
            cases.append(_case(p, f"M={m} determinism", m, kind="deterministic"))
        cases.append(_case(p, f"invariance M<={max(sizes)}", max(sizes), kind="invariant", sizes=list(sizes)))
    return cases


def case_inputs(spec: MoESpec, case: dict, seed: int, device):
    """Random inputs for a case, made on the CPU from the seed (identical on every device).

    Returns x [M, H] bf16, topk_ids [M, k] int32 (distinct experts per token; with neg_ids
    about a quarter are -1 and token 0 has none), topk_weights [M, k] float32 (positive, sum 1),
    shared_output [M, H] bf16 or None. A "NaN input" case puts a NaN in token M//2's x.
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
    if case.get("nan") == "input" and M:
        x[M // 2, H // 3] = float("nan")
    move = (lambda t: None if t is None else t.to(device))
    return move(x), move(ids), move(w), move(shared)


def with_nan_block(weights, expert: int = 0):
    """The weights with one scale of `expert`'s w13 (row 0, block 0) made NaN (E8M0 0xFF, E4M3
    NaN, bf16 NaN): every token routed to that expert must come out NaN. bf16 weights get a NaN
    element instead."""
    q = weights.w13
    data, scales = q.data.clone(), None if q.scales is None else q.scales.clone()
    if q.format == "mxfp4":
        scales[expert, 0, 0] = 0xFF
    elif q.format == "nvfp4":
        scales.view(torch.uint8)[expert, 0, 0] = 0x7F
    elif q.format == "int4":
        scales[expert, 0, 0] = float("nan")
    else:
        data[expert, 0, 0] = float("nan")
    w13 = QuantizedTensor(q.format, q.shape, data, scales, q.global_scale)
    return dataclasses.replace(weights, w13=w13)


__all__ = ["INVARIANCE_SIZES", "PROPERTIES", "TOKENS", "TOLERANCES", "case_inputs", "make_cases", "make_problems",
           "padded_spec", "quick_spec", "spec_from_dict", "spec_to_dict", "with_nan_block"]
