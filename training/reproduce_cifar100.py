"""Runs the CIFAR-100 reproduction: dense baselines, discovery, MoE twins.

The paper's three steps for every scale, with the same recipe, epochs and
seed for each dense/MoE pair:

1. train the dense ViTs (`train.py --preset 6x64 ...`), all scales at once;
2. discover E=10 super-classes from each dense model's confusion matrix on
   the held-out validation split (`discover_superclasses.py`);
3. train the Mobile V-MoE twins on their own dense model's groups, all at
   once, plus (with `--coarse_scale`) an E=20 MoE routed by CIFAR-100's 20
   coarse classes.

Runs of one phase share the machine (`--parallel` at a time). Each run's
output is prefixed with its name; each run keeps its own workdir, so a
killed reproduction re-run with the same flags resumes every run from its
last finished epoch (`train.py` checkpoints every epoch) and skips finished
discoveries. At the end every `results.json` is copied to
`--results_dir/<run>.json` for `make_cifar100_report.py`.

Usage:
  KERAS_BACKEND=jax python training/reproduce_cifar100.py \
      --data_path ../shared/datasets/cifar100.npz --epochs 100 \
      --workdir runs --results_dir runs/results
"""

import os
import shutil
import subprocess
import sys
import threading
import time

from absl import app
from absl import flags

HERE = os.path.dirname(os.path.abspath(__file__))

SCALES = flags.DEFINE_list(
    "scales", ["6x64", "12x64", "6x96", "12x96"], "Dense preset names."
)
COARSE_SCALE = flags.DEFINE_string(
    "coarse_scale",
    "6x64",
    "Scale of the extra E=20 coarse-class run ('' for none).",
)
EPOCHS = flags.DEFINE_integer("epochs", 100, "Epochs of every run.")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Batch size of every run.")
SEED = flags.DEFINE_integer("seed", 0, "Seed of every run.")
DATA_PATH = flags.DEFINE_string(
    "data_path", None, "cifar100.npz (default: $KMM_CIFAR100_PATH)."
)
WORKDIR = flags.DEFINE_string(
    "workdir", None, "One workdir per run inside.", required=True
)
RESULTS_DIR = flags.DEFINE_string(
    "results_dir",
    None,
    "Where the results JSONs go (default: <workdir>/results).",
)
PARALLEL = flags.DEFINE_integer("parallel", 5, "Runs at a time.")
TRAIN_ARGS = flags.DEFINE_multi_string(
    "train_arg",
    [],
    "Extra train.py flag for every run, e.g. --train_arg=--learning_rate=1e-3.",
)
LOG_EVERY = flags.DEFINE_integer("log_every", 100, "train.py progress lines.")


def _pump(name, stream, lock):
    for line in stream:
        with lock:
            print(f"[{name}] {line}", end="", flush=True)


def run_all(jobs, parallel):
    """Runs (name, argv) jobs, `parallel` at a time; raises if any fails."""
    lock = threading.Lock()
    pending, running, failed = list(jobs), [], []
    while pending or running:
        while pending and len(running) < parallel:
            name, argv = pending.pop(0)
            print(f"== start {name}: {' '.join(argv)}", flush=True)
            proc = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
            )
            pump = threading.Thread(
                target=_pump, args=(name, proc.stdout, lock)
            )
            pump.start()
            running.append((name, proc, pump, time.perf_counter()))
        time.sleep(1.0)
        for item in list(running):
            name, proc, pump, start = item
            if proc.poll() is None:
                continue
            pump.join()
            running.remove(item)
            seconds = time.perf_counter() - start
            print(
                f"== {name} exited {proc.returncode} after {seconds:.0f} s",
                flush=True,
            )
            if proc.returncode:
                failed.append(name)
    if failed:
        raise RuntimeError(
            f"These runs failed (see their output above): {failed}"
        )


def train_job(name, preset, *extra):
    argv = [
        sys.executable,
        os.path.join(HERE, "train.py"),
        f"--preset={preset}",
        f"--epochs={EPOCHS.value}",
        f"--batch_size={BATCH_SIZE.value}",
        f"--seed={SEED.value}",
        f"--workdir={os.path.join(WORKDIR.value, name)}",
        f"--log_every={LOG_EVERY.value}",
        "--verbose=2",
        *([f"--data_path={DATA_PATH.value}"] if DATA_PATH.value else []),
        *extra,
        *TRAIN_ARGS.value,
    ]
    return name, argv


def main(argv):
    del argv
    workdir = WORKDIR.value
    results_dir = RESULTS_DIR.value or os.path.join(workdir, "results")
    os.makedirs(results_dir, exist_ok=True)
    start = time.perf_counter()

    run_all([train_job(s, s) for s in SCALES.value], PARALLEL.value)
    print(
        f"== dense runs done after {time.perf_counter() - start:.0f} s",
        flush=True,
    )

    discoveries = []
    for scale in SCALES.value:
        out = os.path.join(workdir, f"groups_{scale}")
        if os.path.isfile(out + ".json"):
            continue
        discoveries.append(
            (
                f"groups_{scale}",
                [
                    sys.executable,
                    os.path.join(HERE, "discover_superclasses.py"),
                    f"--preset_dir={os.path.join(workdir, scale, 'preset')}",
                    "--num_superclasses=10",
                    f"--out={out}",
                    *(
                        [f"--data_path={DATA_PATH.value}"]
                        if DATA_PATH.value
                        else []
                    ),
                ],
            )
        )
    run_all(discoveries, PARALLEL.value)

    moe_jobs = [
        train_job(
            f"{s}_e10",
            f"{s}_e10",
            f"--superclasses={os.path.join(workdir, f'groups_{s}.json')}",
        )
        for s in SCALES.value
    ]
    if COARSE_SCALE.value:
        scale = COARSE_SCALE.value
        moe_jobs.append(
            train_job(
                f"{scale}_e20_coarse", f"{scale}_e10", "--superclasses=coarse"
            )
        )
    run_all(moe_jobs, PARALLEL.value)

    names = list(SCALES.value) + [name for name, _ in moe_jobs]
    for name in names:
        shutil.copy(
            os.path.join(workdir, name, "results.json"),
            os.path.join(results_dir, f"{name}.json"),
        )
    for scale in SCALES.value:
        shutil.copy(
            os.path.join(workdir, f"groups_{scale}.json"),
            os.path.join(results_dir, f"groups_{scale}.json"),
        )
    print(
        f"== reproduction done in {time.perf_counter() - start:.0f} s; results "
        f"in {results_dir}",
        flush=True,
    )


if __name__ == "__main__":
    app.run(main)
