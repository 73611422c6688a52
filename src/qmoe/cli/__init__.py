"""The `qmoe` command (also `python -m qmoe`).

Each command lives in its own module of this package exposing `add_arguments(parser)` and
`run(args) -> int`; what they share (flags, output conventions, progress) is in `common`. A
command's module is imported only when that command runs, so `qmoe env` keeps working when
another command's module is broken or absent from this build. The library never imports this
package.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "env": ("qmoe.cli.env", "what is installed here and which backend can run which format, and why not"),
    "demo": ("qmoe.cli.demo", "run a quantized MoE layer on every usable backend: error and time per call"),
    "bench": ("qmoe.cli.bench", "benchmark backends: latency, GB/s, TFLOP/s and %% of the roofline"),
    "tune": ("qmoe.cli.tune", "measure the backends on this GPU and write the tuning table"),
    "check": ("qmoe.cli.check", "qualify every usable backend against the reference backend"),
}
"""Command name -> (module, one-line help)."""


def _command_in(argv: list[str]) -> str | None:
    """The command named in argv: the first argument that is not an option."""
    for a in argv:
        if not a.startswith("-"):
            return a
    return None


def _load(name: str):
    """Import a command's module; returns (module, None) or (None, error message)."""
    modname = COMMANDS[name][0]
    try:
        return importlib.import_module(modname), None
    except ModuleNotFoundError as e:
        if e.name == modname:
            return None, f"qmoe {name}: not available in this build ({modname} is missing)"
        return None, f"qmoe {name}: needs the Python package {e.name!r}, which is not installed ({e})"
    except Exception as e:  # a broken module must not take the other commands down
        return None, f"qmoe {name}: failed to load {modname}: {type(e).__name__}: {e}"


def build_parser(command: str | None = None):
    """The argument parser; only `command`'s module is imported to add its options.

    Returns (parser, module or None, load error message or None).
    """
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="qmoe",
        description="qmoe: the expert layers of 4-bit quantized MoE LLMs on the fastest kernel backend.")
    parser.add_argument("--version", action="version", version=f"qmoe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    module = error = None
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module, error = _load(name)
            if module is not None:
                module.add_arguments(p)
    return parser, module, error


def main(argv: list[str] | None = None) -> int:
    """Run the qmoe command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_in(argv)
    parser, module, error = build_parser(command if command in COMMANDS else None)
    if error is not None:
        print(error, file=sys.stderr)
        return 2
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad option (2, argparse printed why)
        return e.code if isinstance(e.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(module.run(args) or 0)
    except ValueError as e:
        # bad input reaches us as ValueError naming the argument: a message, not a traceback
        print(f"qmoe {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qmoe {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`qmoe env --json | head`): not an error of ours
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
