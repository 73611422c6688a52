"""Backend selection for backend="auto" (static rules for now; the tuning table extends this)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .backends import Prepared, get_backend
from .spec import MoESpec
from .weights import ExpertWeights

STATIC_ORDER = ("triton", "reference")
"""Fallback preference when no tuning table covers this GPU and shape."""


@dataclass
class Plan:
    """Which prepared layout runs at which token count.

    prepared: backend name -> Prepared; ranges: [(min_tokens, backend name, why)], sorted by
    min_tokens; the entry with the largest min_tokens <= M runs M tokens.
    """

    prepared: dict = field(default_factory=dict)
    ranges: list = field(default_factory=list)

    def backend_for(self, num_tokens: int) -> str:
        chosen = self.ranges[0][1]
        for lo, name, _ in self.ranges:
            if num_tokens >= lo:
                chosen = name
        return chosen

    def explain(self, num_tokens: int) -> str:
        chosen = self.ranges[0]
        for r in self.ranges:
            if num_tokens >= r[0]:
                chosen = r
        return f"M={num_tokens}: {chosen[1]} ({chosen[2]})"


def make_plan(spec: MoESpec, weights: ExpertWeights, backend: str = "auto",
              max_layout_bytes: int | None = None) -> Plan:
    """Prepare the layout(s) a MoE needs. backend: "auto" or a backend name."""
    device = weights.device
    if backend != "auto":
        b = get_backend(backend)
        sup = b.supports(spec, weights.format, device)
        if not sup.ok:
            raise ValueError(f"backend: {backend} cannot run format {weights.format} on {device}: {sup.reason}")
        return Plan({backend: b.prepare(spec, weights)}, [(0, backend, "chosen by the caller")])
    excluded = []
    for name in STATIC_ORDER:
        b = get_backend(name)
        sup = b.supports(spec, weights.format, device)
        if sup.ok:
            why = "static rule: first usable of " + ", ".join(STATIC_ORDER)
            if excluded:
                why += "; excluded: " + "; ".join(excluded)
            return Plan({name: b.prepare(spec, weights)}, [(0, name, why)])
        excluded.append(f"{name}: {sup.reason}")
    raise ValueError("backend: no usable backend: " + "; ".join(excluded))


__all__ = ["Plan", "Prepared", "STATIC_ORDER", "make_plan"]
