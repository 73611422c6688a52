# Sourced by demo.sh and test.sh: makes (or reuses) a virtual environment with qmoe installed
# from this checkout, needing only python3 (>= 3.10) with pip and venv.
#   QMOE_VENV  where the environment lives (default: .venv in the checkout)
# A torch already in the environment is kept; a CUDA build installed there first works too.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${QMOE_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
    echo "== creating $VENV" >&2
    python3 -m venv "$VENV"
fi
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    # pinned on purpose: a plain `torch` resolves to the newest CUDA build (several GB), while
    # this version has a CPU wheel on the project's machines
    echo "== installing torch 2.13.0" >&2
    "$PY" -m pip install --progress-bar off torch==2.13.0
fi
# reinstall only when pyproject.toml (the dependencies) or the checkout changed
stamp="$VENV/.qmoe-installed"
want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1) $ROOT"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! "$PY" -c "import qmoe, pytest, hypothesis, rich" >/dev/null 2>&1; then
    echo "== installing qmoe (editable) with its test tools" >&2
    "$PY" -m pip install --progress-bar off -e "$ROOT[test]"
    echo "$want" > "$stamp"
fi
