#!/usr/bin/env bash
# The test suite on a fresh machine: sets up the environment (scripts/_setup.sh), runs pytest.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh tests/test_cli.py -x`).
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
cd "$ROOT"
set +e
"$PY" -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    # pytest's "no tests collected" is not a pass
    echo "scripts/test.sh: pytest collected no tests" >&2
    exit 1
fi
exit "$rc"
