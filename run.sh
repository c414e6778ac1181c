#!/usr/bin/env bash
# One-step set-up and run, on a fresh machine with only Python 3.10+:
#   ./run.sh demo   - create .venv, install, run the end-to-end demo on built-in data
#   ./run.sh test   - create .venv, install, run the linter and the full test suite
# Extra arguments are passed on (to the demo script, or to pytest).
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=${RWSFMT_VENV:-.venv}

setup() {
    if [ ! -x "$VENV/bin/python" ]; then
        echo "==> creating $VENV"
        "$PYTHON" -m venv "$VENV"
    fi
    local py="$VENV/bin/python"
    if ! "$py" -c "import torch" 2>/dev/null; then
        echo "==> installing torch 2.13.0 (CPU build) first"
        "$py" -m pip install -q --upgrade pip
        "$py" -m pip install -q torch==2.13.0
    fi
    echo "==> installing rwsfmt with its test and demo extras"
    "$py" -m pip install -q -e ".[test,demo]"
}

case "${1:-}" in
    demo)
        shift
        setup
        exec "$VENV/bin/python" examples/demo.py "$@"
        ;;
    test)
        shift
        setup
        echo "==> ruff check"
        "$VENV/bin/python" -m ruff check .
        echo "==> pytest"
        exec "$VENV/bin/python" -m pytest -q "$@"
        ;;
    *)
        echo "usage: ./run.sh demo [ARGS...] | ./run.sh test [PYTEST ARGS...]" >&2
        exit 2
        ;;
esac
