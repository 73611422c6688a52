"""The plan of a MoE: which prepared layout runs at which token count, and why.

backend="auto" picks per token count from the tuning table (qmoe.tuning), else static rules.
A Plan holds up to two prepared layouts and a list of token-count ranges, each naming the
backend that runs it and why. Choosing costs one bisect on a Python int (M = x.shape[0]), and
the callable that runs M tokens (the backend with its M-dependent launch configuration bound,
Backend.runner) is resolved once per M and cached: no host synchronization, no lookup per call,
nothing that breaks CUDA-graph capture.

Selection from a tuning entry, among the backends usable now:
- every measured token-count bucket has a winner (the fastest usable backend there);
- one layout is kept if one backend wins everywhere; otherwise the pair of layouts that loses
  least to the per-bucket winners is kept (loss = sum over buckets of log(time / winner's time),
  i.e. every bucket counts equally, by how much slower it runs), provided
  - the pair beats the best single layout by at least SECOND_LAYOUT_MIN_GAIN (a second copy
    of the weights for a few percent is not worth it), and
  - both layouts together fit in max_layout_bytes (default DEFAULT_LAYOUT_BUDGET x the canonical
    weights' bytes; a single layout is always allowed, it is needed to run at all);
- a token count M runs the bucket qmoe.tuning.buckets.nearest_bucket gives (the one rule).
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass, field

import torch

from .. import tuning
from ..backends import Prepared, get_backend
from ..spec import MoESpec
from ..tuning.buckets import bucket_ranges
from ..weights import ExpertWeights

STATIC_ORDER = ("triton", "reference")
"""Fallback preference when no tuning table covers this GPU and shape."""

DEFAULT_LAYOUT_BUDGET = 2.5
"""Default max_layout_bytes, in multiples of the canonical weights' bytes: room for two
prepared layouts even when each is padded (gpt-oss pads 2880 to 2944, +4.5%)."""

SECOND_LAYOUT_MIN_GAIN = 1.05
"""A second layout is kept only if it makes the buckets it takes over at least this much faster
in total (product of their speedups)."""

_MISSING = math.log(1000.0)
"""Loss charged to a bucket that no kept layout has a time for (as if 1000x slower)."""


@dataclass
class Plan:
    """Which prepared layout runs at which token count.

    prepared: backend name -> Prepared; ranges: [(min_tokens, backend name, why)], sorted by
    min_tokens; the entry with the largest min_tokens <= M runs M tokens.
    notes: lines `explain` adds after the choice (layouts kept, exclusions, tuning entry).
    """

    prepared: dict = field(default_factory=dict)
    ranges: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    _runners: dict = field(default_factory=dict, repr=False)

    def _range(self, num_tokens: int):
        i = bisect.bisect_right([r[0] for r in self.ranges], num_tokens) - 1
        return self.ranges[max(i, 0)]

    def backend_for(self, num_tokens: int) -> str:
        """The backend name that runs num_tokens tokens (a Python int; no GPU work)."""
        return self._range(num_tokens)[1]

    def runner(self, num_tokens: int):
        """(backend, run) for num_tokens tokens: run(x, topk_ids, topk_weights, out,
        shared_output=None) -> out, resolved on the first call with this M and cached."""
        hit = self._runners.get(num_tokens)
        if hit is None:
            name = self.backend_for(num_tokens)
            backend = get_backend(name)
            hit = (backend, backend.runner(self.prepared[name], num_tokens))
            self._runners[num_tokens] = hit
        return hit

    def explain(self, num_tokens: int) -> str:
        """"M=<n>: <backend> (<why>)", then one indented line per note."""
        _, name, why = self._range(num_tokens)
        return "\n".join([f"M={num_tokens}: {name} ({why})"] + [f"  {n}" for n in self.notes])


def run_poisoning(run, num_experts: int, x, topk_ids, topk_weights, out, shared_output=None):
    """run(x, ids, topk_weights, out, shared_output) for a backend that does not poison bad ids
    itself: ids outside [-1, num_experts) reach it as -1, and their tokens' rows of out become
    NaN afterwards. On the device, no host sync; topk_ids: [M, k] int32. Returns out."""
    bad = (topk_ids < -1) | (topk_ids >= num_experts)
    run(x, torch.where(bad, -1, topk_ids), topk_weights, out, shared_output)
    return out.masked_fill_(bad.any(dim=1, keepdim=True), float("nan"))


@dataclass
class Choice:
    """What `choose_layouts` decided.

    kept: backend names whose layouts are prepared (decode winner first);
    assignment: bucket M -> backend name (one of kept);
    note: why these layouts (winners, budget) in a sentence.
    """

    kept: list
    assignment: dict
    note: str


def choose_layouts(times_us: dict, layout_bytes: dict, budget: int | None) -> Choice:
    """Choose up to two layouts from measured times (pure logic, no GPU).

    times_us: backend -> {M: microseconds} (usable backends only; a missing M means not measured)
    layout_bytes: backend -> bytes its prepared layout takes
    budget: max bytes of two layouts together (None: no limit)
    """
    names = [n for n in times_us if times_us[n]]
    if not names:
        raise ValueError("times_us: expected at least one backend with measured times, got none")
    times_us = {n: times_us[n] for n in names}
    buckets = _buckets(times_us)
    best = {m: min(times_us[n][m] for n in names if m in times_us[n]) for m in buckets}

    def loss(kept):
        return _loss(times_us, kept)

    def wins(name):
        return sum(1 for m in buckets if times_us[name].get(m) == best[m])

    def size(kept):
        return sum(layout_bytes.get(n, 0) for n in kept)

    order = {n: i for i, n in enumerate(names)}
    single = min(names, key=lambda n: (loss([n]), -wins(n), size([n]), order[n]))
    pairs = sorted(itertools.combinations(names, 2), key=lambda p: (loss(p), size(p)))
    worth = [p for p in pairs if loss([single]) - loss(p) >= math.log(SECOND_LAYOUT_MIN_GAIN)]
    fitting = [p for p in worth if budget is None or size(p) <= budget]

    winners = sorted({n for n in names if wins(n)}, key=order.get)
    if fitting:
        kept = list(fitting[0])
        note = (f"kept 2 layouts: {kept[0]} and {kept[1]} ({_gb(size(kept))} of max_layout_bytes "
                f"{_gb(budget) if budget is not None else 'unlimited'})")
    else:
        kept = [single]
        if worth:
            p = worth[0]
            note = (f"kept 1 layout: {single} (wins {wins(single)} of {len(buckets)} buckets); "
                    f"{p[0]} + {p[1]} would run faster but need {_gb(size(p))} > max_layout_bytes "
                    f"{_gb(budget)}")
        elif len(winners) > 1:
            note = (f"kept 1 layout: {single}; the other winners ({', '.join(w for w in winners if w != single)}) "
                    f"gain less than {SECOND_LAYOUT_MIN_GAIN:g}x over it, not worth a second layout")
        else:
            note = f"kept 1 layout: {single} (fastest at every measured bucket)"
    return Choice(_order_by_first_bucket(kept, buckets, times_us), _assign(kept, buckets, times_us), note)


def _buckets(times_us):
    return sorted({m for d in times_us.values() for m in d})


def _loss(times_us, kept):
    """Sum over buckets of log(best kept time / best time of all): 0 when kept wins everywhere."""
    total = 0.0
    for m in _buckets(times_us):
        best = min(d[m] for d in times_us.values() if m in d)
        ts = [times_us[n][m] for n in kept if m in times_us[n]]
        total += math.log(min(ts) / best) if ts else _MISSING
    return total


def _assign(kept, buckets, times_us):
    assignment = {}
    for m in buckets:
        ts = [(times_us[n][m], n) for n in kept if m in times_us[n]]
        if ts:
            assignment[m] = min(ts)[1]
    for m in buckets:  # buckets no kept layout measured: take the nearest measured bucket's choice
        if m not in assignment:
            near = min(assignment, key=lambda b: abs(math.log(b / m)), default=None)
            assignment[m] = assignment[near] if near is not None else kept[0]
    return assignment


def _order_by_first_bucket(kept, buckets, times_us):
    assignment = _assign(kept, buckets, times_us)
    first = {n: min((m for m in buckets if assignment[m] == n), default=math.inf) for n in kept}
    return sorted(kept, key=lambda n: first[n])


def _gb(n) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB" if n >= 1e4 else f"{n} B"


def probe(name, spec, fmt, device):
    """(backend or None, reason): usable here, or why not (import failures included); never raises."""
    try:
        b = get_backend(name)
    except ValueError as e:  # a backend module that is missing or fails to import is just not usable
        return None, str(e).removeprefix("backend: ")
    sup = b.supports(spec, fmt, device)
    return (b, sup.reason) if sup.ok else (None, sup.reason)


def make_plan(spec: MoESpec, weights: ExpertWeights, backend: str = "auto",
              max_layout_bytes: int | None = None, *, tuning_table=None) -> Plan:
    """Prepare the layout(s) a MoE needs.

    backend: "auto" or a backend name.
    max_layout_bytes: for "auto", the most bytes two prepared layouts may take together
        (None: DEFAULT_LAYOUT_BUDGET x weights.nbytes); one layout is always kept.
    tuning_table: for "auto", a table dict or a path (None: qmoe.tuning.default_path()).
    """
    device = weights.device
    if not isinstance(backend, str):
        raise ValueError(f"backend: expected 'auto' or a backend name, got {backend!r}")
    if backend != "auto":
        b = get_backend(backend)
        return Plan({backend: b.prepare(spec, weights)}, [(0, backend, "chosen by the caller")])
    if max_layout_bytes is None:
        budget = int(DEFAULT_LAYOUT_BUDGET * weights.nbytes)
        budget_note = f"{DEFAULT_LAYOUT_BUDGET:g} x the canonical weights"
    elif isinstance(max_layout_bytes, int) and max_layout_bytes >= 0:
        budget, budget_note = max_layout_bytes, "given"
    else:
        raise ValueError(f"max_layout_bytes: expected None or an int >= 0, got {max_layout_bytes!r}")

    notes = []
    found = tuning.lookup(spec, weights.format, device, tuning_table)
    if found is None:
        notes.append(f"no tuning entry for this GPU, format {weights.format} and shape (run `qmoe tune`)")
    else:
        plan = _measured_plan(spec, weights, found, budget, budget_note, notes)
        if plan is not None:
            return plan
    return _static_plan(spec, weights, notes)


def _static_plan(spec, weights, notes):
    excluded = []
    for name in STATIC_ORDER:
        b, reason = probe(name, spec, weights.format, weights.device)
        if b is not None:
            why = "static rule: first usable of " + ", ".join(STATIC_ORDER)
            if excluded:
                why += "; excluded: " + "; ".join(excluded)
            return Plan({name: b.prepare(spec, weights)}, [(0, name, why)], notes)
        excluded.append(f"{name}: {reason}")
    raise ValueError("backend: no usable backend: " + "; ".join(excluded))


def _measured_plan(spec, weights, found, budget, budget_note, notes):
    key, entry = found
    fmt, device = weights.format, weights.device
    all_times = tuning.entry_times(entry)  # lookup only returns validated entries
    times, backends, excluded = {}, {}, []
    for name, per_m in all_times.items():
        b, reason = probe(name, spec, fmt, device)
        if b is None:
            excluded.append(f"{name}: {reason}")
        elif per_m:
            backends[name] = b
            times[name] = per_m
    for name, reason in entry.get("excluded", {}).items():
        excluded.append(f"{name}: {reason} (when tuned)")
    if not times:
        notes.append("tuning entry found, but none of its measured backends is usable now: " + "; ".join(excluded))
        return None

    # layout sizes as measured by `qmoe tune`; a backend it did not record is assumed to copy the weights
    sizes = {n: int(entry.get("layout_bytes", {}).get(n, weights.nbytes)) for n in times}
    choice = choose_layouts(times, sizes, budget)
    prepared, drop_why = {}, None
    for n in choice.kept:
        try:
            prepared[n] = backends[n].prepare(spec, weights)
        except Exception as e:  # out of memory for a second layout, say: run on the other one
            if len(choice.kept) == 1:
                raise
            drop_why = f"preparing {n} raised {type(e).__name__}: {e}"
    actual = sum(p.nbytes for p in prepared.values())
    if len(prepared) == 2 and actual > budget:
        # the table's sizes were off (another version of a backend, say): keep the better one
        drop = max(choice.kept, key=lambda n: _loss(times, [n]))
        del prepared[drop]
        drop_why = f"with {drop} the prepared layouts took {_gb(actual)} > max_layout_bytes {_gb(budget)}"
    note = choice.note
    if drop_why is not None:
        keep = next(iter(prepared))
        note = f"kept 1 layout: {keep}; {drop_why}"
        times = {keep: times[keep]}
        choice = Choice([keep], _assign([keep], _buckets(times), times), note)

    ranges = []
    for lo, m in bucket_ranges(sorted(choice.assignment)):
        name = choice.assignment[m]
        here = sorted((d[m], n) for n, d in all_times.items() if m in d)
        why = f"measured at M={m} on {entry.get('gpu')}: " + ", ".join(
            f"{n} {t:.1f} us" + ("" if n in backends else " (excluded)") for t, n in here)
        fastest = min(((t, n) for t, n in here if n in backends), default=None)
        if fastest is not None and fastest[1] != name:
            why += f"; {fastest[1]} is faster here but its layout is not kept"
        ranges.append((lo, name, why))
    notes.append(f"{note}; budget {budget_note}")
    if excluded:
        notes.append("excluded: " + "; ".join(excluded))
    notes.append(f"tuning entry measured {entry.get('measured_at', '?')}: {key}")
    return Plan(prepared, ranges, notes)


__all__ = ["Choice", "DEFAULT_LAYOUT_BUDGET", "Plan", "Prepared", "STATIC_ORDER", "choose_layouts", "make_plan",
           "probe", "run_poisoning"]
