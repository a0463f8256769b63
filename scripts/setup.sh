#!/usr/bin/env bash
# Creates .venv and installs recvae with its test, plot, Parquet, tuning-study and docs extras.
#
# The package declares a torch range; this project's machines use the exact torch of
# scripts/constraints.txt (2.13.0), installed on its own first: an unpinned torch pulls a
# multi-GB CUDA build. On Linux
# without a GPU, set TORCH_INDEX_URL to PyTorch's CPU wheel index to get the
# small CPU build from the internet; machines that carry a local CPU wheel
# (as our CI does) pick it up with no setting.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        .venv/bin/pip install -q -c scripts/constraints.txt torch --index-url "$TORCH_INDEX_URL"
    else
        .venv/bin/pip install -q -c scripts/constraints.txt torch
    fi
fi
.venv/bin/pip install -q -c scripts/constraints.txt -e ".[test,plot,parquet,tune,docs]"

# This project's own machines (CI, developers) have no internet and keep real MovieLens files
# in ../shared/data: link them into ./data so the README's commands find them there. On other
# machines nothing happens and the loader downloads from GroupLens.
if [ -d ../shared/data ]; then
    for src in ../shared/data/ml-*; do
        name=$(basename "$src")
        [ -e "data/$name" ] || ln -s "../$src" "data/$name"
    done
fi
