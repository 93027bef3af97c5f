#!/usr/bin/env bash
# The project's one test command (README, .ci/run): set up .venv if needed, then lint, type-check, test.
# Works on a fresh machine: everything comes from PyPI (torch 2.13.0 CPU is served from local disk here).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.fgloc-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -e '.[test,parity,torchvision]'
  touch "$stamp"
fi
echo "== ruff"
ruff check .
ruff format --check .
echo "== pyright"
pyright
echo "== pytest"
# Two workers by default (CI has 2 cores; XLA compilation and the CLI subprocess tests are
# single-threaded), one test file per worker so module fixtures are built once.
python -m pytest -q -n "${FGLOC_TEST_WORKERS:-2}" --dist loadfile "$@"
