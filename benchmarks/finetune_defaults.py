"""Fine-tuning a trained preset: which `compile()` default keeps accuracy.

A pretrained preset fine-tuned with from-scratch settings (AdamW at 3e-4)
lost accuracy after one epoch (0.283 -> 0.250 test top-1 on 2,000 images,
reported in issue 12). This measures candidate defaults on the same model
and data, paired in one process:

- model: a trained CIFAR-100 preset (default `6x64_e10.cifar100`);
- fine-tuning data: the images `training/train.py` held out for validation
  (its stratified 10% split, seed 0), which the preset never trained on;
- evaluation: `--test_images` of the CIFAR-100 test split, a seeded random
  sample (the split is stored sorted by class);
- each candidate starts from the same weights, `--epochs` epochs, batch 32;
- two tasks: the preset's own 100 classes (every weight loaded), and
  CIFAR-100's 20 coarse classes on a new, random head (`num_classes=20`,
  each coarse class routed to the expert most of its fine classes use).

Usage:
    KERAS_BACKEND=jax python benchmarks/finetune_defaults.py \
        --data_path ../shared/datasets/cifar100.npz
Writes benchmarks/results/finetune_defaults.{md,json}.
"""

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "training"))

from common import machine  # noqa: E402
from common import write_results  # noqa: E402

import keras_mobile_moe as kmm  # noqa: E402
from data import stratified_split  # noqa: E402

CANDIDATES = {
    "AdamW 3e-4, wd 0.05 (from-scratch default)": lambda: (
        keras.optimizers.AdamW(3e-4, weight_decay=0.05)
    ),
    "AdamW 1e-4, wd 0.05": lambda: keras.optimizers.AdamW(
        1e-4, weight_decay=0.05
    ),
    "AdamW 3e-5, wd 0.05": lambda: keras.optimizers.AdamW(
        3e-5, weight_decay=0.05
    ),
    "Adam 5e-5 (keras-hub ImageClassifier)": lambda: keras.optimizers.Adam(
        5e-5
    ),
}


def top1(model, images, labels):
    logits = model.predict(images, batch_size=250, verbose=0)
    return float(np.mean(np.argmax(logits, -1) == labels))


def coarse_overrides(preset, data):
    """A new 20-class head; each coarse class goes to its fine classes'
    most frequent expert."""
    experts = np.asarray(
        kmm.MobileVMoE.presets[preset]["task"]["superclass_ids"]
    )
    coarse_of = kmm.datasets.cifar100.fine_to_coarse(
        data["y_train"], data["y_train_coarse"]
    )
    table = [
        int(np.bincount(experts[coarse_of == c]).argmax()) for c in range(20)
    ]
    return {"num_classes": 20, "superclass_ids": table}


def run(preset, data, train_idx, test_images, epochs, seed, task):
    label_key = "y_train" if task == "same" else "y_train_coarse"
    x_train, y_train = data["x_train"][train_idx], data[label_key][train_idx]
    test_idx = np.random.default_rng([seed, 1]).permutation(len(data["y_test"]))
    x_test = data["x_test"][test_idx[:test_images]]
    y_test = data[label_key.replace("train", "test")][test_idx[:test_images]]
    overrides = {} if task == "same" else coarse_overrides(preset, data)
    rows = []
    for name, make_optimizer in CANDIDATES.items():
        keras.utils.set_random_seed(seed)
        model = kmm.MobileVMoE.from_preset(preset, **overrides)
        model.compile(optimizer=make_optimizer())
        curve = [top1(model, x_test, y_test)]
        start = time.perf_counter()
        for _ in range(epochs):
            model.fit(x_train, y_train, batch_size=32, epochs=1, verbose=0)
            curve.append(top1(model, x_test, y_test))
        rows.append(
            {
                "task": task,
                "optimizer": name,
                "test_top1_per_epoch": curve,
                "seconds": time.perf_counter() - start,
            }
        )
        print(task, name, " -> ".join(f"{a:.4f}" for a in curve), flush=True)
    return rows


def write(rows, args, out_dir):
    header = " | ".join(f"epoch {i}" for i in range(args.epochs + 1))
    lines = [
        "# Fine-tuning defaults",
        "",
        f"`{args.preset}` fine-tuned on the {args.train_images} CIFAR-100 "
        "training images that `training/train.py` held out (never trained "
        f"on), batch 32; test top-1 on {args.test_images} random test images "
        f"after each epoch. {keras.config.backend()}, {machine()}.",
        "",
        "`same`: the preset's 100 classes, every weight loaded (the default "
        "after `from_preset(name)`). `new head`: CIFAR-100's 20 coarse "
        "classes on a new random head (`from_preset(name, num_classes=20)`).",
        "",
        f"| task | optimizer | {header} |",
        "|---|---|" + "---:|" * (args.epochs + 1),
    ]
    for row in rows:
        lines.append(
            f"| {row['task']} | {row['optimizer']} | "
            + " | ".join(f"{100 * a:.2f}%" for a in row["test_top1_per_epoch"])
            + " |"
        )
    write_results(
        "finetune_defaults",
        "\n".join(lines),
        {"args": vars(args), "rows": rows},
        out_dir,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="6x64_e10.cifar100")
    parser.add_argument("--data_path", default=None)
    parser.add_argument("--train_images", type=int, default=2000)
    parser.add_argument("--test_images", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out_dir", default=str(HERE / "results"))
    args = parser.parse_args()
    data = kmm.datasets.cifar100.load_data(args.data_path)
    _, held_out = stratified_split(data["y_train"], 0.1, 0)
    rng = np.random.default_rng(args.seed)
    train_idx = rng.permutation(held_out)[: args.train_images]
    rows = []
    for task in ("same", "new head"):
        rows += run(
            args.preset,
            data,
            train_idx,
            args.test_images,
            args.epochs,
            args.seed,
            task,
        )
    write(rows, args, args.out_dir)


if __name__ == "__main__":
    main()
