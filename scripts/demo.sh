#!/usr/bin/env bash
# `qmoe demo` on a fresh machine: sets up the environment (scripts/_setup.sh), then runs the demo.
# Extra arguments go to `qmoe demo` (e.g. `bash scripts/demo.sh --preset deepseek-v3 --tokens 4`).
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
"$VENV/bin/qmoe" demo "$@"
