#!/usr/bin/env bash
# Builds the documentation site into docs/_build/html (open docs/_build/html/index.html), with
# every warning an error, then runs the docs' and docstrings' doctest examples. Needs the `docs`
# extra (scripts/setup.sh installs it); reads nothing from the network.
#   bash scripts/docs.sh            # build and run the examples
#   bash scripts/docs.sh --check    # also load every page in headless Chromium (scripts/check_site.py)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${DOCS_OUT:-docs/_build}
"$PY" -m sphinx -E -W --keep-going -q -b html docs "$OUT/html"
"$PY" -m sphinx -E -W --keep-going -q -b doctest docs "$OUT/doctest"
if [ "${1:-}" = "--check" ]; then
    "$PY" scripts/check_site.py "$OUT/html"
fi
echo "docs: $OUT/html/index.html"
