"""Evaluates a trained preset on CIFAR-100's test split.

Runs the preset as users get it (its own image converter resizes and scales
the raw 32x32 images) and reports test top-1 and, for a Mobile V-MoE trained
with super-class routing, router accuracy (the share of images sent to the
expert of their class's super-class).

With `--results`, the numbers also go into that `results.json` (written by
`train.py`): `test_top1` and `test_router_accuracy` are replaced, the values
they had are kept under `test_at_training`, and `test_evaluation` records the
command, data file and machine. Use it when a model was trained with a
different copy of the test split at hand (e.g. on a remote machine).

Usage:
  python training/evaluate.py --preset_dir runs/6x64_e10/preset \
      --data_path ../shared/datasets/cifar100.npz \
      [--results runs/6x64_e10/results.json]
"""

import json
import os
import shlex
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "benchmarks"))

from common import machine  # noqa: E402
from trainer import evaluate  # noqa: E402

import data as data_lib  # noqa: E402
import keras_mobile_moe as kmm  # noqa: E402

PRESET_DIR = flags.DEFINE_string(
    "preset_dir", None, "Preset directory.", required=True
)
DATA = flags.DEFINE_enum("data", "full", ["full", "fixture"], "Dataset.")
DATA_PATH = flags.DEFINE_string(
    "data_path", None, "cifar100.npz (default: $KMM_CIFAR100_PATH)."
)
BATCH_SIZE = flags.DEFINE_integer("batch_size", 250, "Inference batch size.")
RESULTS = flags.DEFINE_string("results", None, "results.json to update.")


def preset_accuracies(model, images, labels, batch_size):
    """(top-1, router accuracy or None) of a classifier preset on raw images."""
    converter = model.preprocessor.image_converter
    graph = keras.Model(model.input, model.output)  # logits and router logits
    table = None
    if getattr(model, "router_loss", None) is not None:
        table = model.superclass_ids
    batches = data_lib.CifarBatches(
        images, labels, batch_size, model.num_classes
    )
    return evaluate(
        lambda x: graph.predict_on_batch(converter(x)), batches, table
    )


def main(argv):
    del argv
    start = time.perf_counter()
    if DATA.value == "fixture":
        data = kmm.datasets.cifar100.load_fixture()
        source = "cifar100-fixture"
    else:
        data = kmm.datasets.cifar100.load_data(DATA_PATH.value)
        source = DATA_PATH.value or os.environ.get(
            kmm.datasets.cifar100.ENV_VAR, "download"
        )
    model = kmm.MobileVMoE.from_preset(PRESET_DIR.value)
    top1, router = preset_accuracies(
        model, data["x_test"], data["y_test"], BATCH_SIZE.value
    )
    print(
        f"{PRESET_DIR.value}: test top-1 {top1:.4f}, router accuracy {router} "
        f"on {len(data['y_test'])} test images",
        flush=True,
    )
    if RESULTS.value:
        with open(RESULTS.value, encoding="utf-8") as f:
            results = json.load(f)
        results["test_at_training"] = {
            "test_top1": results.get("test_top1"),
            "test_router_accuracy": results.get("test_router_accuracy"),
        }
        results["test_top1"] = top1
        results["test_router_accuracy"] = router
        results["test_evaluation"] = {
            "command": " ".join(shlex.quote(a) for a in sys.argv),
            "data": source,
            "test_images": int(len(data["y_test"])),
            "backend": keras.config.backend(),
            "machine": machine(),
            "seconds": time.perf_counter() - start,
        }
        tmp = RESULTS.value + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
        os.replace(tmp, RESULTS.value)
        print(f"updated {RESULTS.value}")


if __name__ == "__main__":
    app.run(main)
