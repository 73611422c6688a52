"""The import rules of docs/architecture.md, read from the sources (ast): every layer imports only
the layers below it, kernels import nothing else of qmoe, nothing imports the commands, and the
library never prints."""

import ast
from pathlib import Path

import qmoe

SRC = Path(qmoe.__file__).resolve().parent

LAYERS = {
    "support": 0, "formats": 0, "spec": 1, "weights": 2, "kernels": 2, "tuning": 3, "timing": 3, "routing": 4,
    "backends": 5, "dispatch": 6, "parallel": 7, "moe": 8, "nn": 9, "integrations": 10, "cli": 11,
}
"""Rank of each top-level part of the package: a part may import parts of lower rank (and itself)."""
KERNELS_MAY_IMPORT = {"kernels"}
PUBLIC = ("__init__", "__main__")


def _part(module: str):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "qmoe" else None


def imports_of(path: Path):
    """(line, imported qmoe module) for every qmoe import in a source file, relative ones resolved."""
    rel = path.relative_to(SRC.parent).with_suffix("")
    pkg = list(rel.parts[:-1])
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "qmoe":
                    yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                # `from .. import x`: x is a module of that package, or a name defined in it
                names = [mod] if node.module else [
                    f"{mod}.{a.name}" if _is_module(f"{mod}.{a.name}") else mod for a in node.names]
                for n in names:
                    yield node.lineno, n
            elif node.module and node.module.split(".")[0] == "qmoe":
                yield node.lineno, node.module


def _is_module(name: str) -> bool:
    p = SRC.parent.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def sources():
    return sorted(p for p in SRC.rglob("*.py"))


def test_every_part_has_a_layer():
    parts = {p.relative_to(SRC).parts[0].removesuffix(".py") for p in sources()}
    assert parts - set(LAYERS) - set(PUBLIC) == set()


def test_layers_import_only_downward():
    broken = []
    for path in sources():
        me = path.relative_to(SRC).parts[0].removesuffix(".py")
        if me in PUBLIC:
            for line, mod in imports_of(path):
                if _part(mod) == "cli" and me == "__init__":
                    broken.append(f"{path.relative_to(SRC)}:{line} the package imports the commands ({mod})")
            continue
        for line, mod in imports_of(path):
            other = _part(mod)
            if mod == "qmoe":
                other = "__init__"
            if other is None or other == me:
                continue
            if me == "kernels" and other not in KERNELS_MAY_IMPORT:
                broken.append(f"{path.relative_to(SRC)}:{line} kernels import {mod}")
            elif other in PUBLIC:
                if me != "cli":  # the commands may use the public names; the library may not (cycles)
                    broken.append(f"{path.relative_to(SRC)}:{line} imports the top-level package ({mod})")
            elif LAYERS[other] >= LAYERS[me]:
                broken.append(f"{path.relative_to(SRC)}:{line} {me} (layer {LAYERS[me]}) imports {mod} "
                              f"(layer {LAYERS[other]})")
    assert broken == []


def test_the_library_never_prints():
    found = []
    for path in sources():
        if path.relative_to(SRC).parts[0] in ("cli", "__main__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                found.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert found == []


def test_the_rule_checker_sees_a_violation(tmp_path, monkeypatch):
    """The checker itself can fail: a kernels module importing the backends is reported."""
    fake = SRC / "kernels" / "_layer_rule_probe.py"
    fake.write_text("from ..backends import get_backend\n")
    try:
        broken = []
        for line, mod in imports_of(fake):
            if _part(mod) not in KERNELS_MAY_IMPORT:
                broken.append(mod)
        assert broken == ["qmoe.backends"]
    finally:
        fake.unlink()
