#!/usr/bin/env bash
# Runs pytest on every backend in $BACKENDS (`make test` calls this).
#
# The backends' sessions run at the same time, each pinned to one thread
# (TEST_JOBS=1 runs them one after another). Why: most of a session is
# Python, tracing and XLA/TFLite compilation on one core, and subprocesses
# (guides, training, conversion) that start and import on one core; three
# one-thread sessions keep both cores of the 2-core CI machine busy without
# the six competing thread pools of three default sessions.
#
# Each session's log is printed whole when it ends; any non-zero pytest
# status (5 = nothing collected included) fails the run.
set -uo pipefail

PYTHON=${PYTHON:-.venv/bin/python}
BACKENDS=${BACKENDS:-"jax tensorflow torch"}
TEST_JOBS=${TEST_JOBS:-3}

# One thread per session: TensorFlow, XLA (JAX) and torch/OpenMP pools.
# The tests' tiny models spend far more time in XLA's LLVM compilation than
# running; LLVM's optimisation level 0 (no expensive passes; XLA does not
# use fast-math on CPU, so results do not change) cut test_mone.py +
# test_mobile_vmoe.py on JAX from 191 s to 147 s. Only the tests get it.
# XLA stops reading flags at the recipe's unprefixed
# `intra_op_parallelism_threads=1`: the -- flags come first.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TF_NUM_INTRAOP_THREADS=${TF_NUM_INTRAOP_THREADS:-1}
export TF_NUM_INTEROP_THREADS=${TF_NUM_INTEROP_THREADS:-1}
export XLA_FLAGS=${XLA_FLAGS:-"--xla_backend_optimization_level=0 \
--xla_llvm_disable_expensive_passes=true \
--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"}

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT

# The JAX session is the longest (XLA compiles every tiny model): it runs
# as JAX_TEST_WORKERS pytest-xdist workers, a test module each at a time
# (--dist loadfile: module fixtures are built once), so that it takes both
# cores once the other sessions have finished. 1 runs it in one process.
JAX_TEST_WORKERS=${JAX_TEST_WORKERS:-2}

run_one() {
    local backend=$1
    shift
    local start=$SECONDS
    local workers=()
    if [ "$backend" = jax ] && [ "$JAX_TEST_WORKERS" -gt 1 ]; then
        workers=(-n "$JAX_TEST_WORKERS" --dist loadfile)
    fi
    KERAS_BACKEND=$backend "$PYTHON" -m pytest -q -p no:cacheprovider \
        "${workers[@]}" "$@" >"$logs/$backend.log" 2>&1
    local status=$?
    echo "$status" >"$logs/$backend.status"
    echo "--- KERAS_BACKEND=$backend finished: status $status," \
        "$((SECONDS - start)) s"
}

running=0
for backend in $BACKENDS; do
    if [ "$running" -ge "$TEST_JOBS" ]; then
        wait -n
        running=$((running - 1))
    fi
    run_one "$backend" "$@" &
    running=$((running + 1))
done
wait

status=0
for backend in $BACKENDS; do
    echo "=== KERAS_BACKEND=$backend"
    cat "$logs/$backend.log"
    code=$(cat "$logs/$backend.status" 2>/dev/null || echo missing)
    if [ "$code" != 0 ]; then
        echo "KERAS_BACKEND=$backend: pytest exited with status $code"
        status=1
    fi
done
exit "$status"
