"""`Support(ok, reason)`: the answer of every "can this run here?" probe in qmoe (backends,
routing): whether it can, and if not, why, in words a user can act on."""

from __future__ import annotations

from typing import NamedTuple


class Support(NamedTuple):
    """Whether something can run (a backend for a spec, format and device; the fused routing),
    and why or why not."""

    ok: bool
    reason: str

    def __bool__(self):
        return self.ok


__all__ = ["Support"]
