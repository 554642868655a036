#!/usr/bin/env bash
# The 100-epoch CIFAR-100 runs that train on the CPU in the background, a few
# epochs per session, resumed from the checkpoints committed in
# training/checkpoints/ (BackupAndRestore: weights, optimizer state, epoch).
#
#   bash training/cpu_runs.sh start    # restore checkpoints, start every run
#   bash training/cpu_runs.sh status   # last epoch line of every run
#   bash training/cpu_runs.sh save     # copy the latest checkpoints back
#
# Each run gets one core (taskset) and nice 19, so the session's own work and
# tests keep priority. Runs write into $RUNS (default /work/runs, outside the
# checkout so a new work tree does not lose them).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-/work/runs}
PY=${PY:-.venv/bin/python}
export KERAS_BACKEND=jax
export KMM_CIFAR100_PATH=${KMM_CIFAR100_PATH:-$PWD/../shared/datasets/cifar100.npz}
# One thread each: two runs share the two cores.
export XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1

GROUPS_FILE=benchmarks/results/cifar100/superclasses/groups_6x64_15ep.json
# CIFAR-native input (32x32, patch 4: 64 tokens, no upsampling), batch 128
# (35,100 optimizer steps in 100 epochs), AdamW at 1e-3 as in Lee et al. 2021.
COMMON="--image_size 32 --patch_size 4 --batch_size 128 --learning_rate 1e-3 \
--recipe vit --epochs 100 --seed 0 --log_every 100"
declare -A RUN_ARGS=(
  [6x64_p4_100ep_s0]="--preset 6x64"
  [6x64_e10_p4_100ep_s0]="--preset 6x64_e10 --superclasses $GROUPS_FILE"
)

case "${1:-status}" in
  start)
    mkdir -p "$RUNS"
    core=0
    for run in "${!RUN_ARGS[@]}"; do
      if [ -d "training/checkpoints/$run" ] && [ ! -d "$RUNS/$run/backup" ]; then
        mkdir -p "$RUNS/$run"
        cp -r "training/checkpoints/$run" "$RUNS/$run/backup"
      fi
      # shellcheck disable=SC2086
      nohup taskset -c $((core % $(nproc))) nice -n 19 "$PY" training/train.py \
        ${RUN_ARGS[$run]} $COMMON --workdir "$RUNS/$run" \
        >> "$RUNS/$run.log" 2>&1 &
      echo "started $run (pid $!), log $RUNS/$run.log"
      core=$((core + 1))
    done
    ;;
  status)
    for run in "${!RUN_ARGS[@]}"; do
      echo "$run: $(grep -E '^[0-9]+/[0-9]+ - ' "$RUNS/$run.log" 2>/dev/null | tail -n 1 | cut -c1-200)"
      cat "$RUNS/$run/backup/training_metadata.json" 2>/dev/null && echo
    done
    ;;
  save)
    mkdir -p training/checkpoints
    for run in "${!RUN_ARGS[@]}"; do
      if [ -f "$RUNS/$run/backup/training_metadata.json" ]; then
        rm -rf "training/checkpoints/$run.tmp"
        cp -r "$RUNS/$run/backup" "training/checkpoints/$run.tmp"
        rm -rf "training/checkpoints/$run"
        mv "training/checkpoints/$run.tmp" "training/checkpoints/$run"
        echo "saved $run: $(cat "training/checkpoints/$run/training_metadata.json")"
      fi
    done
    ;;
  *)
    echo "usage: $0 start|status|save" >&2
    exit 2
    ;;
esac
