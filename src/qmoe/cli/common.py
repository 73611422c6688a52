"""What every `qmoe` command shares: argument parsing, output conventions, progress.

Conventions (every command):
- `--json`: print the machine-readable result to stdout instead of the tables;
  `--json PATH`: write it to PATH (and print the tables as usual). Nothing else is written
  unless asked (the tuning tables of `qmoe tune` are its purpose), and every output path is
  checked before the work starts, so a long run is never lost to a bad path at the end.
- Bad flags are ValueErrors naming the flag, reported by `qmoe.cli.main` on stderr with exit
  status 2, before any set-up.
- Long work shows progress on stderr: a bar on a terminal, otherwise one line per step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

from ..backends import BACKEND_NAMES, get_backend
from ..dispatch.plan import probe  # noqa: F401  ((backend or None, reason) for a --backend name: one home)
from ..formats import FORMATS
from ..spec import PRESET_FORMATS, presets


# --- flags ------------------------------------------------------------------------------------
def split(values) -> list:
    """Repeated and comma-separated flag values, flattened: ["a,b", "c"] -> ["a", "b", "c"]."""
    return [v.strip() for item in (values or []) for v in str(item).split(",") if v.strip()]


def parse_tokens(text, *, flag: str = "--tokens", minimum: int = 1, default=()) -> tuple:
    """Comma-separated token counts >= minimum, sorted and distinct; `default` when text is None."""
    if text is None:
        return tuple(default)
    try:
        tokens = tuple(sorted({int(t) for t in str(text).split(",") if t.strip()}))
    except ValueError:
        tokens = ()
    if not tokens or tokens[0] < minimum:
        raise ValueError(f"{flag}: expected comma-separated integers >= {minimum}, got {text!r}")
    return tokens


def number(flag: str, kind=int, minimum=None, *, above: bool = False):
    """An argparse `type` accepting a finite `kind` >= minimum (> minimum with above=True); a bad
    value is a ValueError naming the flag (reported by qmoe.cli.main)."""
    def parse(text):
        try:
            v = kind(text)
        except (TypeError, ValueError):
            v = None
        ok = v is not None and (kind is int or math.isfinite(v)) and (
            minimum is None or (v > minimum if above else v >= minimum))
        if not ok:
            rel = ">" if above else ">="
            want = f"{'an integer' if kind is int else 'a number'}" + (f" {rel} {minimum}" if minimum is not None else "")
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        return v

    parse.__name__ = flag
    return parse


def parse_device(text) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N' naming a device that exists here (ValueError otherwise)."""
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device: expected cpu, cuda or cuda:N, got {text!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device: expected cpu on a machine without a CUDA GPU, got {text!r}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device: this machine has {torch.cuda.device_count()} CUDA GPU(s), got {text!r}")
    elif device.type != "cpu":
        raise ValueError(f"--device: expected cpu, cuda or cuda:N, got {text!r}")
    return device


def parse_choices(values, allowed, flag: str, what: str = "one of", extra: str = "") -> list:
    """Repeated / comma-separated flag values, each one of `allowed` (ValueError naming the flag)."""
    names = split(values)
    for n in names:
        if n not in allowed:
            raise ValueError(f"{flag}: expected {what} {', '.join(allowed)}{extra}, got {n!r}")
    return names


def parse_presets(values, flag: str = "--preset") -> list:
    """Preset names (every preset when none is given)."""
    return parse_choices(values, list(presets), flag) or list(presets)


def parse_formats(values, flag: str = "--format") -> list:
    """Format names ('all' for every format); [] when none is given (each preset's own)."""
    if split(values) == ["all"]:
        return list(FORMATS)
    return parse_choices(values, FORMATS, flag, extra=" or 'all'")


def add_problem_arguments(parser, verb: str, format_default: str = "each preset's own format") -> None:
    """--preset and --format, as every command that runs presets takes them."""
    parser.add_argument("--preset", action="append", metavar="NAME",
                        help=f"preset(s) to {verb} (repeat or comma-separate; default all: {', '.join(presets)})")
    parser.add_argument("--format", action="append", metavar="FMT",
                        help=f"weight format(s) (default: {format_default}; 'all' for every format)")


def preset_problems(preset_names, formats) -> list:
    """[(preset name, format)]: each preset in the given formats, else in its own."""
    return [(n, f) for n in preset_names for f in (formats or [PRESET_FORMATS[n]])]


def parse_backends(values, flag: str = "--backend", allow_auto: bool = False) -> list:
    """Backend names (every qmoe backend when none is given); 'module:attr' names an object that
    follows the backend protocol; with allow_auto, 'auto' (the per-M choice of the tuning table).
    An unknown name is an error, never an empty result."""
    names = split(values) or list(BACKEND_NAMES)
    known = list(BACKEND_NAMES) + (["auto"] if allow_auto else [])
    for n in names:
        if ":" not in n and n not in known:
            raise ValueError(f"{flag}: expected one of {', '.join(known)} (or module:attr), got {n!r}")
    return names


def load_backend(name: str):
    """A backend object by the commands' --backend name (registry.get_backend: a qmoe backend
    name or "module:attr"). ValueError when it cannot be loaded."""
    return get_backend(name)


# --- output -----------------------------------------------------------------------------------
def add_json_argument(parser, what: str) -> None:
    parser.add_argument("--json", nargs="?", const="-", metavar="PATH",
                        help=f"{what} as JSON: to stdout instead of the tables, or to PATH")


def output_path(path, flag: str) -> Path | None:
    """A file path that can be written, checked now (ValueError naming the flag otherwise);
    None for None or '-' (stdout)."""
    if path is None or path == "-":
        return None
    p = Path(os.fspath(path)).expanduser()
    if p.is_dir():
        raise ValueError(f"{flag}: {p} is a folder; give a file path")
    if not p.parent.is_dir():
        raise ValueError(f"{flag}: folder {p.parent} does not exist")
    if not os.access(p.parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ValueError(f"{flag}: {p} is not writable")
    return p


def json_to_stdout(args) -> bool:
    """Whether --json asked for JSON on stdout (instead of the tables)."""
    return getattr(args, "json", None) == "-"


def emit_json(args, obj) -> None:
    """Write obj where --json said (stdout or a file); nothing without --json."""
    dest = getattr(args, "json", None)
    if dest is None:
        return
    text = json.dumps(obj, indent=1, default=str, allow_nan=False)
    if dest == "-":
        sys.stdout.write(text + "\n")
    else:
        Path(dest).expanduser().write_text(text + "\n")


def console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr)


class Steps:
    """Progress on stderr: a rich bar on a terminal, otherwise one line per step.

    with Steps("qmoe bench", total=n) as steps:
        steps.advance("gpt-oss-120b mxfp4 triton M=16")   # one step done, with what it was
        steps.note("weights ready in 3.1 s")               # a line (terminal: above the bar)
    """

    def __init__(self, title: str, total: int | None = None):
        self.title, self.total, self.done = title, total, 0
        self._con = console(stderr=True)
        self._bar = self._task = None

    def __enter__(self):
        if self._con.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn(self.title), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("{task.fields[what]}"), console=self._con)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.title, total=self.total, what="")
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def advance(self, what: str = "", n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, advance=n, what=what)
        else:
            of = f"/{self.total}" if self.total else ""
            print(f"{self.title} [{self.done}{of}] {what}", file=sys.stderr, flush=True)

    def show(self, what: str) -> None:
        """What is running now (a bar's text; a line otherwise)."""
        if self._bar is not None:
            self._bar.update(self._task, what=what)
        else:
            print(f"{self.title}: {what}", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text, highlight=False, markup=False, soft_wrap=True)
        else:
            print(f"{self.title}: {text}", file=sys.stderr, flush=True)


__all__ = ["Steps", "add_json_argument", "add_problem_arguments", "parse_choices", "console", "emit_json", "json_to_stdout", "load_backend", "number",
           "output_path", "parse_backends", "parse_device", "parse_formats", "parse_presets", "parse_tokens",
           "preset_problems", "probe", "split"]
