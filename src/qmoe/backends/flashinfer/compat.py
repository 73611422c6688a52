"""Everything qmoe knows about FlashInfer's changing API, in one place.

FlashInfer inserts parameters positionally between releases, returns lists from some ops
and tensors from others, changed the SM90 weight interleave twice, and shipped releases
with kernel races. The three flashinfer_* backends talk to FlashInfer only through this
module, which:

- imports FlashInfer only when a backend is asked about (never when qmoe is imported) and
  keeps FlashInfer's own logging at warning level unless the user set its variables;
- discovers features by probing the installed package (functions present, parameter
  names from `inspect.signature`), never by version strings alone;
- calls with keyword arguments only, and normalizes what comes back (tensor, list, tuple)
  into the caller's output tensor;
- stamps every prepared layout with the FlashInfer version that made it and refuses a
  layout made under another version;
- holds the known-defect table: a FlashInfer version with a known defect on a path makes
  that path unsupported, with the reason, unless the user sets the one override,
  QMOE_FLASHINFER_FORCE=1 (which also admits paths qmoe has not yet checked on a GPU).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import os
import re
import sys
from typing import NamedTuple

import torch

from ..base import Backend, Support, cuda_capability

FORCE_ENV = "QMOE_FLASHINFER_FORCE"
"""The one documented override: "1" runs FlashInfer paths past a known defect of the
installed version or a missing hardware check. It never overrides a missing function,
a wrong GPU or a missing package."""

INSTALL_HINT = "pip install 'qmoe[flashinfer]' (docs/flashinfer.md: offline install)"


class Defect(NamedTuple):
    """FlashInfer versions first..last (inclusive, PEP 440 order) are broken on `path`."""

    path: str
    first: str
    last: str
    reason: str


KNOWN_DEFECTS = (
    Defect("cutlass_sm90_w4a16", "0.6.10", "0.6.15.post1",
           "the SM90 W4A16 MXFP4 MoE GEMM races (an in-place TMA descriptor update meets in-flight "
           "scale loads) and sporadically writes wrong tiles (flashinfer issue 5438)"),
    Defect("cutlass_sm90_w4a16", "0.6.16.post3", "0.6.17",
           "these releases ship the same SM90 mixed-input collective source as 0.6.10-0.6.15.post1, "
           "the one with the tile race of flashinfer issue 5438 (0.6.16-0.6.16.post2 and >= 0.6.18 "
           "carry the rewritten one)"),
)

HARDWARE_CHECKED = frozenset({"cutlass_sm90_w4a16"})
"""Paths whose layouts qmoe has checked against its reference on a GPU. Other paths follow
FlashInfer's own weight-preparation code read from its sources; they run only when forced."""


def device_capability(device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device, None without one. Tests replace this function to
    run the backends' logic on CPU tensors; nothing else should."""
    return cuda_capability(device)


def has_module(name: str) -> bool:
    """Whether a top-level module (e.g. "cutlass" of nvidia-cutlass-dsl) is importable,
    without importing it."""
    if sys.modules.get(name) is not None:
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def forced() -> bool:
    """Whether the user set QMOE_FLASHINFER_FORCE=1."""
    return os.environ.get(FORCE_ENV, "").strip() == "1"


# --- versions -------------------------------------------------------------------------------
_VERSION = re.compile(r"v?(\d+(?:\.\d+)*)(?:(a|b|rc)(\d+))?(?:\.?post(\d+))?(?:\.?dev(\d+))?(?:\+[\w.]+)?$")


def version_key(version: str) -> tuple | None:
    """A sortable key for a PEP 440 version string (dev < a < b < rc < release < post),
    or None when the string is not one."""
    m = _VERSION.match(version.strip())
    if not m:
        return None
    release = tuple(int(p) for p in m.group(1).split("."))
    release += (0,) * (6 - len(release))
    pre_kind, pre_n, post, dev = m.group(2), m.group(3), m.group(4), m.group(5)
    if pre_kind:
        pre = (("a", "b", "rc").index(pre_kind), int(pre_n))
    elif dev is not None and post is None:
        pre = (-1, 0)  # X.devN comes before every pre-release of X
    else:
        pre = (3, 0)
    return (release, pre, -1 if post is None else int(post), (1, 0) if dev is None else (0, int(dev)))


def known_defect(path: str, version: str) -> str | None:
    """The reason `version` must not run `path`, or None. An unparseable version string is
    refused too: its defects cannot be looked up."""
    key = version_key(version)
    if key is None:
        return f"cannot check known defects: unrecognized FlashInfer version string {version!r}"
    for d in KNOWN_DEFECTS:
        if d.path == path and version_key(d.first) <= key <= version_key(d.last):
            return f"flashinfer {version} has a known defect on this path: {d.reason}"
    return None


def gate(path: str, version: str) -> tuple[bool, str]:
    """Known-defect and hardware-check gate of a path: (ok, note for the Support reason)."""
    why = known_defect(path, version)
    if why is None and path not in HARDWARE_CHECKED:
        why = (f"path {path}: qmoe prepares its layout as FlashInfer {version}'s own preparation code "
               f"does, but has not yet checked it against its reference on such a GPU")
    if why is None:
        return True, ""
    if forced():
        return True, f"; forced by {FORCE_ENV}=1 despite: {why}"
    return False, f"{why}; set {FORCE_ENV}=1 to run it anyway (then qualify it with `qmoe check`)"


# --- logging ----------------------------------------------------------------------------------
_LOG_ENV = ("FLASHINFER_LOGGING_LEVEL", "FLASHINFER_LOGLEVEL")
_user_logging: bool | None = None


def quiet_logging() -> None:
    """Keep FlashInfer's loggers at WARNING unless the user set FLASHINFER_LOGGING_LEVEL or
    FLASHINFER_LOGLEVEL (FlashInfer's own variables) before qmoe first touched FlashInfer.

    FlashInfer reads FLASHINFER_LOGGING_LEVEL (default "info") when its JIT logger is made,
    and 0.6.11 shipped with debug logging that grew CI logs to gigabytes, so the default is
    set before the import and every `flashinfer*` logger is clamped after it (modules
    imported later are clamped again after each prepare).
    """
    global _user_logging
    if _user_logging is None:
        _user_logging = any(k in os.environ for k in _LOG_ENV)
    if _user_logging:
        return
    os.environ.setdefault("FLASHINFER_LOGGING_LEVEL", "WARNING")
    for name, lg in list(logging.Logger.manager.loggerDict.items()):
        if name.split(".")[0] == "flashinfer" and isinstance(lg, logging.Logger) \
                and lg.level < logging.WARNING:
            lg.setLevel(logging.WARNING)


# --- the probed package -----------------------------------------------------------------------
class FlashInfer:
    """What the installed FlashInfer offers, found by probing (never by version alone).

    version: flashinfer.__version__; commit: its git commit when it reports one.
    """

    def __init__(self, module):
        self.module = module
        self.version = str(getattr(module, "__version__", "unknown"))
        self.commit = getattr(module, "__git_commit__", None) or None
        self._params = {}

    @property
    def fingerprint(self) -> str:
        """What a prepared layout is keyed by: the version and, when known, the commit."""
        return f"{self.version}+{self.commit}" if self.commit else self.version

    def get(self, where: str, name: str):
        """Attribute `name` of module `where` (e.g. "flashinfer.fused_moe"), None if either
        is missing or fails to import."""
        try:
            mod = importlib.import_module(where)
        except Exception:  # a broken optional submodule means the feature is missing
            return None
        return getattr(mod, name, None)

    def params(self, fn) -> frozenset:
        """Parameter names of a FlashInfer function (follows functools.wraps)."""
        key = id(fn)
        if key not in self._params:
            try:
                self._params[key] = frozenset(inspect.signature(fn).parameters)
            except (TypeError, ValueError):
                self._params[key] = frozenset()
        return self._params[key]

    def missing(self, where: str, name: str, params=()) -> str | None:
        """Why `where.name(params...)` cannot be called on this version, or None."""
        fn = self.get(where, name)
        if fn is None:
            return f"flashinfer {self.version} has no {where}.{name}"
        lacking = [p for p in params if p not in self.params(fn)]
        if lacking:
            return f"flashinfer {self.version}: {name} has no parameter {', '.join(lacking)}"
        return None

    def call(self, where: str, name: str, kwargs: dict, optional: dict | None = None):
        """Call where.name with keyword arguments only.

        kwargs: must all be parameters of the function (a missing one is a RuntimeError
        naming it: the backend's supports() should have refused this version);
        optional: passed only where the function has that parameter (added in some release).
        """
        fn = self.get(where, name)
        if fn is None:
            raise RuntimeError(f"flashinfer {self.version} has no {where}.{name}")
        accepted = self.params(fn)
        lacking = sorted(set(kwargs) - accepted)
        if lacking:
            raise RuntimeError(f"flashinfer {self.version}: {name} has no parameter {', '.join(lacking)}")
        kw = dict(kwargs)
        for k, v in (optional or {}).items():
            if k in accepted:
                kw[k] = v
        return fn(**kw)


_loaded: tuple = (object(), None, "")


def load() -> tuple[FlashInfer | None, str]:
    """(FlashInfer, "") when FlashInfer imports, else (None, why not).

    The result is cached per module object in sys.modules, so a test that installs a fake
    package, or a process that imports FlashInfer later, gets a fresh probe.
    """
    global _loaded
    current = sys.modules.get("flashinfer")
    if _loaded[0] is current:
        return _loaded[1], _loaded[2]
    quiet_logging()
    try:
        module = importlib.import_module("flashinfer")
        importlib.import_module("flashinfer.fused_moe")
    except ImportError as e:
        if getattr(e, "name", None) == "flashinfer" and sys.modules.get("flashinfer") is None:
            result = (None, f"flashinfer is not installed ({INSTALL_HINT})")
        else:
            result = (None, f"flashinfer failed to import: {type(e).__name__}: {e}")
    except Exception as e:  # FlashInfer raises RuntimeError and others at import on odd setups
        result = (None, f"flashinfer failed to import: {type(e).__name__}: {e}")
    else:
        result = (FlashInfer(module), "")
    quiet_logging()
    _loaded = (sys.modules.get("flashinfer"), *result)
    return result


# --- prepared layouts ---------------------------------------------------------------------------
def stamp(fi: FlashInfer) -> dict:
    """Meta entries that key a prepared layout by the FlashInfer that made it."""
    return {"flashinfer": fi.fingerprint}


def check_prepared(prepared, backend: str) -> FlashInfer:
    """The loaded FlashInfer, after checking that `prepared` was made by `backend` under this
    very FlashInfer version (ValueError otherwise: layouts change between versions)."""
    if getattr(prepared, "backend", None) != backend:
        raise ValueError(f"prepared: expected a layout prepared by {backend}, "
                         f"got one by {getattr(prepared, 'backend', type(prepared).__name__)}")
    fi, why = load()
    if fi is None:
        raise ValueError(f"prepared: made under flashinfer {prepared.meta.get('flashinfer')}, "
                         f"but FlashInfer is not usable now: {why}")
    made = prepared.meta.get("flashinfer")
    if made != fi.fingerprint:
        raise ValueError(f"prepared: layout made under flashinfer {made}, but flashinfer {fi.fingerprint} "
                         f"is loaded; FlashInfer's weight layouts change between versions, so prepare the "
                         f"weights again under this version")
    return fi


# --- calls ----------------------------------------------------------------------------------------
def first_tensor(result, name: str) -> torch.Tensor:
    """The output tensor of a FlashInfer MoE op: the op's return value itself, or the first
    element of the list/tuple some ops and versions return."""
    if isinstance(result, (list, tuple)) and result and isinstance(result[0], torch.Tensor):
        return result[0]
    if isinstance(result, torch.Tensor):
        return result
    raise RuntimeError(f"flashinfer {name} returned {type(result).__name__}; expected a tensor or a list "
                       f"whose first element is the output")


def routable(topk_ids: torch.Tensor, topk_weights: torch.Tensor):
    """topk_ids [M, k] int, topk_weights [M, k] float -> (ids int32, weights fp32) where an id
    of -1 (expert not on this rank) becomes expert 0 with weight 0: FlashInfer's kernels take
    no -1 ids, and a zero weight contributes nothing. No host sync."""
    off = topk_ids < 0
    ids = torch.where(off, torch.zeros_like(topk_ids), topk_ids).to(torch.int32)
    weights = torch.where(off, torch.zeros_like(topk_weights), topk_weights).to(torch.float32)
    return ids.contiguous(), weights.contiguous()


def routable_spare(topk_ids: torch.Tensor, topk_weights: torch.Tensor, first_spare: int):
    """Like `routable`, but the j-th slot of a token, when -1, goes to spare expert
    first_spare + j (an all-zero expert the layout appends) with weight 0. So no token names
    the same expert twice: FlashInfer's SM90 CUTLASS MoE gives wrong, run-dependent results
    when one does (seen with 0.6.18.post1 on an H100; `qmoe check` cases with ids of -1).
    No host sync."""
    off = topk_ids < 0
    spare = first_spare + torch.arange(topk_ids.shape[1], device=topk_ids.device, dtype=topk_ids.dtype)
    ids = torch.where(off, spare.expand_as(topk_ids), topk_ids).to(torch.int32)
    weights = torch.where(off, torch.zeros_like(topk_weights), topk_weights).to(torch.float32)
    return ids.contiguous(), weights.contiguous()


def padded(n: int, multiple: int) -> int:
    """n rounded up to a multiple."""
    return -(-n // multiple) * multiple


def pad_cols(x: torch.Tensor, cols: int) -> torch.Tensor:
    """x: [M, H] -> [M, cols] with zero columns appended (x itself when H == cols)."""
    if x.shape[1] == cols:
        return x
    y = x.new_zeros(x.shape[0], cols)
    y[:, :x.shape[1]] = x
    return y


# --- weight layout steps shared by the FlashInfer paths --------------------------------------------
def up_gate(t: torch.Tensor, rows: int, fill=0) -> torch.Tensor:
    """Canonical [E, 2I, ...] rows [gate; up] -> FlashInfer's gated-GEMM order [up; gate],
    each half padded with `fill` to `rows` rows: [E, 2 * rows, ...]. Inverse: `gate_up`."""
    E, two_i = t.shape[:2]
    i = two_i // 2
    out = t.new_full((E, 2 * rows, *t.shape[2:]), fill)
    out[:, :i] = t[:, i:]
    out[:, rows:rows + i] = t[:, :i]
    return out


def gate_up(t: torch.Tensor, intermediate_size: int) -> torch.Tensor:
    """Inverse of `up_gate`: [E, 2 * rows, ...] [up; gate] padded -> [E, 2I, ...] [gate; up]."""
    rows = t.shape[1] // 2
    i = intermediate_size
    return torch.cat((t[:, rows:rows + i], t[:, :i]), dim=1)


def pad_last2(t: torch.Tensor, rows: int, cols: int, fill=0) -> torch.Tensor:
    """[E, r, c] -> [E, rows, cols], the new entries set to `fill` (t itself if no padding)."""
    E, r, c = t.shape
    if (r, c) == (rows, cols):
        return t.contiguous()
    out = t.new_full((E, rows, cols), fill)
    out[:, :r, :c] = t
    return out


__all__ = ["FORCE_ENV", "KNOWN_DEFECTS", "HARDWARE_CHECKED", "Defect", "FlashInfer", "check_prepared",
           "device_capability", "first_tensor", "forced", "gate", "gate_up", "has_module", "known_defect", "load",
           "pad_cols", "pad_last2", "padded", "quiet_logging", "routable", "stamp", "up_gate",
           "version_key"]


_BSI_PLACES = ("flashinfer.fp4_quantization", "flashinfer.quantization.fp4_quantization")


def block_scale_interleave_place(fi: FlashInfer) -> str | None:
    """The module of the installed FlashInfer that holds block_scale_interleave, or None."""
    for where in _BSI_PLACES:
        if fi.get(where, "block_scale_interleave") is not None:
            return where
    return None


class FlashInferBackend(Backend):
    """Base of the FlashInfer backends: the shared gate; subclasses write _supports / _prepare."""

    experimental = False
    """True for paths qmoe has not yet checked on hardware (they run only when forced)."""

    @staticmethod
    def _gated(path: str, fi, what: str) -> Support:
        """The last step of every _supports: the known-defect / not-yet-verified gate for `path`
        under the installed version; `what` names the kernel when it passes."""
        ok, note = gate(path, fi.version)
        return Support(True, f"{what}{note}") if ok else Support(False, note)
