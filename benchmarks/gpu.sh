#!/usr/bin/env bash
# GPU check, one command (under 8 minutes on one H100/H200): the CUDA tests (tests/test_cuda.py),
# then benchmarks/gpu.py (ML-20M-shaped epochs of Mult-VAE, Mult-DAE and RecVAE, evaluation,
# all-users top-100, EASE's fit), which writes benchmarks/results/gpu.json and gpu.md.
#
#   bash benchmarks/gpu.sh                 # from anywhere; PYTHON=... picks the interpreter
#   bash benchmarks/gpu.sh --no-ease       # extra arguments go to benchmarks/gpu.py
#
# Each step has its own time limit (TEST_TIMEOUT_S, BENCH_TIMEOUT_S; 150 + 320 s by default).
# The benchmark runs even when a test fails, and rewrites its results after every step, so a
# step stopped by its limit keeps what was measured before it. Exit status: 2 without CUDA,
# else 0 when the tests and the benchmark passed, 1 otherwise.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
TEST_TIMEOUT_S="${TEST_TIMEOUT_S:-150}"
BENCH_TIMEOUT_S="${BENCH_TIMEOUT_S:-320}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 2)'; then
    echo "gpu.sh: no CUDA device for $PYTHON (torch.cuda.is_available() is false); nothing run" >&2
    exit 2
fi
"$PYTHON" -c 'import torch; print(f"gpu.sh: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")'

start=$SECONDS
tests_rc=0
echo "== CUDA tests (limit ${TEST_TIMEOUT_S} s)"
timeout --kill-after=10 "$TEST_TIMEOUT_S" "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py || tests_rc=$?
echo "== CUDA tests: exit $tests_rc after $((SECONDS - start)) s"

bench_start=$SECONDS
bench_rc=0
echo "== benchmarks/gpu.py (limit ${BENCH_TIMEOUT_S} s)"
timeout --kill-after=10 "$BENCH_TIMEOUT_S" "$PYTHON" benchmarks/gpu.py "$@" || bench_rc=$?
echo "== benchmarks/gpu.py: exit $bench_rc after $((SECONDS - bench_start)) s"

echo "gpu.sh: done in $((SECONDS - start)) s; tests exit $tests_rc, benchmark exit $bench_rc"
case " $* " in
    *" --quick "*|*" --out "*|*" --out="*) echo "gpu.sh: gpu.py was given --quick or --out: see its output above for where (if anywhere) it wrote" ;;
    *) echo "gpu.sh: results in $ROOT/benchmarks/results/gpu.md and gpu.json" ;;
esac
if [ "$tests_rc" -eq 124 ] || [ "$bench_rc" -eq 124 ]; then
    echo "gpu.sh: a step ran past its time limit (exit 124); its results file says which step was cut short" >&2
fi
if [ "$tests_rc" -ne 0 ] || [ "$bench_rc" -ne 0 ]; then
    exit 1
fi
