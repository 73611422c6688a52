"""`Support(ok, reason)`: the answer of every "can this run here?" probe in qmoe (backends,
routing): whether it can, and if not, why, in words a user can act on; `error_text(e)`: an
exception in one line, as reports record a failure they survive."""

from __future__ import annotations

from typing import NamedTuple


class Support(NamedTuple):
    """Whether something can run (a backend for a spec, format and device; the fused routing),
    and why or why not."""

    ok: bool
    reason: str

    def __bool__(self):
        return self.ok


def error_text(e: BaseException) -> str:
    """"<Type>: <first line of the message>" (just "<Type>: " for an empty message)."""
    text = str(e)
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


__all__ = ["Support", "error_text"]
