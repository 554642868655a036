"""Discovers super-classes for Mobile V-MoE routing from a dense model.

Daxberger et al., "Mobile V-MoEs", arXiv 2309.04354, Sec. 3 and Table 1:

1. train the dense baseline (or load it from a preset directory written by
   `training/train.py`);
2. compute its confusion matrix on the held-out validation split (the same
   seeded stratified split train.py used: never the test set);
3. cluster the confusion graph into E groups with
   `kmm.superclasses_from_confusion(confusion, E)`.

Prints the groups with their class names (cf. the paper's Table 1), the
adjusted Rand index and purity against CIFAR-100's 20 coarse classes, and
writes `<out>.npy` and `<out>.json` (one group id per class), which
`training/train.py --superclasses <out>.json` reads.

Usage:
  KERAS_BACKEND=jax python training/discover_superclasses.py \
      --preset_dir runs/6x64/preset --num_superclasses 10 --out groups_6x64
  # or train the dense baseline first (extra flags go to train.py):
  python training/discover_superclasses.py --train_preset 6x64 \
      --workdir runs/6x64 --num_superclasses 10 --out groups_6x64 \
      -- --epochs 10 --data_path cifar100.npz
"""

import json
import os
import subprocess
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import data as data_lib  # noqa: E402
import keras_mobile_moe as kmm  # noqa: E402

PRESET_DIR = flags.DEFINE_string(
    "preset_dir", None, "Trained dense classifier (preset directory)."
)
TRAIN_PRESET = flags.DEFINE_string(
    "train_preset",
    None,
    "Train this dense preset with train.py into --workdir first.",
)
WORKDIR = flags.DEFINE_string(
    "workdir", None, "train.py workdir (with --train_preset)."
)
NUM_SUPERCLASSES = flags.DEFINE_integer("num_superclasses", 10, "E.")
OUT = flags.DEFINE_string(
    "out", None, "Output path without extension.", required=True
)
DATA = flags.DEFINE_enum(
    "data", None, ["full", "fixture"], "Default: as trained."
)
DATA_PATH = flags.DEFINE_string("data_path", None, "cifar100.npz.")
VAL_FRACTION = flags.DEFINE_float("val_fraction", None, "Default: as trained.")
SEED = flags.DEFINE_integer("seed", None, "Split seed (default: as trained).")
CLUSTER_SEED = flags.DEFINE_integer("cluster_seed", 0, "k-means seed.")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Inference batch size.")


def confusion_matrix(model, converter, batches, num_classes):
    """Counts [true class, predicted class] over 32x32 batches in [0, 255].

    `converter` is the preset's image converter (resize and scale, as in
    training); `model` has no preprocessor of its own.
    """
    confusion = np.zeros((num_classes, num_classes), np.int64)
    for i in range(len(batches)):
        x, y = batches[i]
        logits = np.asarray(model.predict_on_batch(converter(x)))
        np.add.at(confusion, (np.argmax(y, -1), np.argmax(logits, -1)), 1)
    return confusion


def dense_preset(extra_args):
    """--preset_dir, or the preset that --train_preset trains first."""
    if not TRAIN_PRESET.value:
        if not PRESET_DIR.value:
            raise ValueError("Pass --preset_dir or --train_preset/--workdir.")
        return PRESET_DIR.value
    if not WORKDIR.value:
        raise ValueError("--train_preset needs --workdir.")
    command = [
        sys.executable,
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"),
        f"--preset={TRAIN_PRESET.value}",
        f"--workdir={WORKDIR.value}",
        *extra_args,
    ]
    print("training the dense baseline:", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    return os.path.join(WORKDIR.value, "preset")


def validation_split(preset_dir):
    """The dataset and the held-out split the preset was trained without
    (as train.py recorded it in metadata.json, unless flags say otherwise)."""
    with open(os.path.join(preset_dir, "metadata.json"), encoding="utf-8") as f:
        trained = json.load(f).get("training", {})
    data_kind = DATA.value or (
        "fixture" if trained.get("dataset") == "cifar100-fixture" else "full"
    )
    seed = SEED.value if SEED.value is not None else trained.get("seed", 0)
    if VAL_FRACTION.value is not None:
        fraction = VAL_FRACTION.value
    else:
        n_val = trained.get("val_images")
        n_all = n_val + trained["train_images"] if n_val is not None else None
        fraction = n_val / n_all if n_all else 0.1
    if fraction <= 0:
        raise ValueError(
            "The confusion matrix comes from the held-out validation split; "
            "the model was trained without one (val_fraction 0)."
        )
    if data_kind == "fixture":
        dataset = kmm.datasets.cifar100.load_fixture()
    else:
        dataset = kmm.datasets.cifar100.load_data(DATA_PATH.value)
    _, val_idx = data_lib.stratified_split(dataset["y_train"], fraction, seed)
    return dataset, val_idx


def validation_confusion(preset_dir, dataset, val_idx):
    """The preset's confusion matrix on the validation images."""
    model = kmm.MobileVMoE.from_preset(preset_dir)
    converter = model.preprocessor.image_converter
    model.preprocessor = None
    batches = data_lib.CifarBatches(
        dataset["x_train"][val_idx],
        dataset["y_train"][val_idx],
        BATCH_SIZE.value,
        model.num_classes,
    )
    return confusion_matrix(model, converter, batches, model.num_classes)


def compare_with_coarse(groups, dataset):
    """(adjusted Rand index, purity) of the groups vs the 20 coarse classes."""
    coarse = kmm.datasets.cifar100.fine_to_coarse(
        np.concatenate([dataset["y_train"], dataset["y_test"]]),
        np.concatenate([dataset["y_train_coarse"], dataset["y_test_coarse"]]),
    )
    ari = float(kmm.superclasses.adjusted_rand_index(groups, coarse))
    purity = float(kmm.superclasses.purity(groups, coarse))
    return ari, purity


def write_groups(out, groups, content):
    """`<out>.npy` (the ids) and `<out>.json` (ids and `content`)."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    np.save(out + ".npy", groups.astype(np.int64))
    with open(out + ".json", "w", encoding="utf-8") as f:
        json.dump(
            {"superclass_ids": [int(g) for g in groups], **content}, f, indent=2
        )
        f.write("\n")
    print(f"wrote {out}.npy and {out}.json")


def main(argv):
    preset_dir = dense_preset(argv[1:])
    dataset, val_idx = validation_split(preset_dir)
    confusion = validation_confusion(preset_dir, dataset, val_idx)
    accuracy = np.trace(confusion) / confusion.sum()
    num_groups = NUM_SUPERCLASSES.value
    groups = kmm.superclasses_from_confusion(
        confusion, num_groups, seed=CLUSTER_SEED.value
    )
    ari, purity = compare_with_coarse(groups, dataset)
    names = [str(n) for n in dataset["class_names"]]
    members = [
        [names[c] for c in np.flatnonzero(groups == g)]
        for g in range(num_groups)
    ]
    print(
        f"\nconfusion of {preset_dir} on {len(val_idx)} held-out validation "
        f"images (top-1 {accuracy:.3f}); {num_groups} super-classes:\n"
    )
    for g, group in enumerate(members):
        print(f"  {g:2d} ({len(group):2d}): " + ", ".join(group))
    print(
        f"\nvs CIFAR-100's 20 coarse classes: adjusted Rand index {ari:.3f}, "
        f"purity {purity:.3f}"
    )
    write_groups(
        OUT.value,
        groups,
        {
            "num_superclasses": num_groups,
            "groups": members,
            "source_preset": os.path.abspath(preset_dir),
            "val_images": int(len(val_idx)),
            "val_top1": float(accuracy),
            "adjusted_rand_index_vs_coarse": ari,
            "purity_vs_coarse": purity,
            "coarse_names": [str(n) for n in dataset["coarse_names"]],
            "cluster_seed": CLUSTER_SEED.value,
        },
    )


if __name__ == "__main__":
    app.run(main)
