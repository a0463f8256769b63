#!/usr/bin/env bash
# Runs the fast test suite against the lowest numpy, scipy, pandas and pyarrow (the parquet
# extra) that pyproject.toml declares (its ">=" bounds, read from the file; pyarrow too, as
# the newest pyarrow needs numpy 2), with this project's torch
# (scripts/constraints.txt), in a separate venv (.venv-lowest), so every declared lower bound
# is a version the tests pass on. About 2.5 minutes on our shared 2-core machine with the venv in place, 4-5 from scratch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${LOWEST_VENV:-.venv-lowest}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
LOWEST="$VENV/lowest-constraints.txt"
"$VENV/bin/python" - "$LOWEST" <<'PY'
import re, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
deps = project["dependencies"] + project["optional-dependencies"]["parquet"]
pins = []
for dep in deps:
    m = re.match(r"(numpy|scipy|pandas|pyarrow)>=([\w.]+)", dep.replace(" ", ""))
    if m:
        pins.append(f"{m[1]}=={m[2]}")
assert len(pins) == 4, f"expected lower bounds for numpy, scipy, pandas, pyarrow in {deps}"
open(sys.argv[1], "w").write("\n".join(pins) + "\n")
print("lowest:", ", ".join(pins))
PY
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    "$VENV/bin/pip" install -q -c scripts/constraints.txt ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch
fi
"$VENV/bin/pip" install -q -c scripts/constraints.txt -c "$LOWEST" -e ".[test,plot,parquet]"
"$VENV/bin/python" -c "import numpy, scipy, pandas, pyarrow, torch; print('testing with numpy', numpy.__version__, 'scipy', scipy.__version__, 'pandas', pandas.__version__, 'pyarrow', pyarrow.__version__, 'torch', torch.__version__)"
"$VENV/bin/python" -m pytest -q -m "not slow and not realdata" -p no:cacheprovider "$@"
