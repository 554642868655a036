"""Training throughput: train.py's full step against the bare step, MoE
against dense.

For each input configuration (the paper's 224x224 / patch 32, resized in the
graph from 32x32 sources as `training/train.py` does, and CIFAR-native
32x32 / patch 4), scale (6x64, 12x64; dense `{scale}` and Mobile V-MoE
`{scale}_e10`, 100 classes, E=10 super-class routed) and recipe (`vit`:
crop + flip; `deit`: + RandAugment, Mixup/CutMix, random erasing,
stochastic depth), this builds the model and `trainer.Trainer` exactly as
`train.py` does (AdamW, cosine schedule, label smoothing, router loss) and
times two kinds of training step, paired and interleaved in one process:

- `pipeline`: `train.py`'s step: the next batch of `data.CifarBatches`
  (permutation, augmentation) then the compiled train step. `train.py`'s
  `fit` loads its `PyDataset` (workers=1) synchronously, so this is its
  loop without callbacks.
- `bare`: the same compiled train step on one pre-made batch already on
  the device;
- `loader`: the `CifarBatches` batch alone (no step): where the difference
  between the two goes.

Before that, `--eager_batches` batches of the `deit` loader are timed with
its Keras augmentation layers run eagerly and compiled
(`CifarBatches(compile_augmentation=...)`), the change that made the `deit`
loader usable.

Each step is a `Trainer.train_on_batch` call (its logs come back to the
host, so the step has finished). Dense and MoE, pipeline and bare of one
(input, scale, recipe) group run in turns, `--rounds` rounds of `--steps`
steps each, after `--warmup` untimed steps (compilation). Reported: median
images/s, pipeline/bare (goal >= 0.85) and MoE/dense time per image (goal
<= 1.10, judged on the sum of the pipeline and bare times, the most samples),
with the machine. These machines are shared and noisy: read the
ratios, which share the noise.

Usage:
    KERAS_BACKEND=jax python benchmarks/train_throughput.py \
        [--data_path ../shared/datasets/cifar100.npz] [--steps 4 --rounds 3]
Writes benchmarks/results/train_throughput.{md,json}.
"""

import argparse
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "training"))

import recipes  # noqa: E402
from common import machine  # noqa: E402
from common import markdown_table  # noqa: E402
from common import write_results  # noqa: E402
from trainer import Trainer  # noqa: E402

import data as data_lib  # noqa: E402
import keras_mobile_moe as kmm  # noqa: E402

GOAL_PIPELINE = 0.85
GOAL_MOE = 1.10
INPUTS = {"224/32": (224, 32), "32/4": (32, 4)}


def load_images(data_path):
    path = data_path or os.environ.get("KMM_CIFAR100_PATH")
    default = HERE.parent.parent / "shared" / "datasets" / "cifar100.npz"
    if path is None and default.is_file():
        path = str(default)
    if path is None:
        data = kmm.datasets.cifar100.load_fixture()
        return data["x_train"], data["y_train"], "fixture (800 images)"
    data = kmm.datasets.cifar100.load_data(path)
    return data["x_train"], data["y_train"], "CIFAR-100 train (50,000 images)"


def build_trainer(preset, image_size, patch_size, recipe, batch_size, seed):
    """The model and Trainer of `train.py --preset preset` (random
    super-class table for the MoE: routing cost does not depend on it)."""
    keras.utils.set_random_seed(seed)
    overrides = {
        "num_classes": 100,
        "image_shape": (image_size, image_size, 3),
        "patch_size": patch_size,
    }
    if recipe.drop_path_rate:
        overrides["drop_path_rate"] = recipe.drop_path_rate
    if kmm.MobileVMoE.presets[preset]["backbone"].get("num_moe_layers", 0):
        rng = np.random.default_rng([seed, 104729])
        overrides["superclass_ids"] = [
            int(g) for g in rng.permutation(np.arange(100) % 10)
        ]
        overrides["routing"] = "superclass"
    model = kmm.MobileVMoE.from_preset(preset, load_weights=False, **overrides)
    model.preprocessor = None
    trainer = Trainer(model, (32, 32))
    peak = recipe.learning_rate(batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0,
        decay_steps=10_000,
        alpha=recipe.min_learning_rate / peak,
        warmup_target=peak,
        warmup_steps=500,
    )
    optimizer = keras.optimizers.AdamW(
        schedule, weight_decay=recipe.weight_decay, clipnorm=recipe.clipnorm
    )
    optimizer.exclude_from_weight_decay(
        var_names=["bias", "gamma", "beta", "norm", "class_token", "position"]
    )
    trainer.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=recipe.label_smoothing
        ),
        metrics=[keras.metrics.CategoricalAccuracy("accuracy")],
    )
    return model, trainer


class Runner:
    """One timed series: `step()` runs one training step (`mode` "pipeline"
    or "bare") or only loads the next batch ("loader")."""

    def __init__(self, trainer, batches, mode):
        self.trainer, self.batches, self.mode = trainer, batches, mode
        self.bare = mode == "bare"
        self.index = 0
        if self.bare:
            x, y = batches[0]
            self.x = keras.ops.convert_to_tensor(x)
            self.y = keras.ops.convert_to_tensor(y)
        else:
            batches.warm_up()
        self.seconds = []

    def step(self):
        if self.bare:
            self.trainer.train_on_batch(self.x, self.y)
            return
        if self.index == len(self.batches):
            self.batches.on_epoch_end()
            self.index = 0
        x, y = self.batches[self.index]
        self.index += 1
        if self.mode == "pipeline":
            self.trainer.train_on_batch(x, y)


def time_group(runners, warmup, rounds, steps):
    for runner in runners.values():
        for _ in range(warmup):
            runner.step()
    for _ in range(rounds):
        for runner in runners.values():
            start = time.perf_counter()
            for _ in range(steps):
                runner.step()
            runner.seconds.append((time.perf_counter() - start) / steps)
    return {name: statistics.median(r.seconds) for name, r in runners.items()}


def loader_seconds(images, labels, batch, recipe, seed, compiled, count):
    """Median seconds per batch of the loader alone (after one batch of
    warm-up / tracing per mix kind)."""
    batches = data_lib.CifarBatches(
        images,
        labels,
        batch,
        100,
        recipe=recipe,
        seed=seed,
        compile_augmentation=compiled,
    )
    batches.warm_up()
    seconds = []
    for i in range(count):
        start = time.perf_counter()
        batches[i]
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_path", default=None)
    parser.add_argument("--inputs", nargs="+", default=list(INPUTS))
    parser.add_argument("--scales", nargs="+", default=["6x64", "12x64"])
    parser.add_argument("--recipes", nargs="+", default=["vit", "deit"])
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--eager_batches",
        type=int,
        default=3,
        help="deit loader batches timed eagerly and compiled (0: skip).",
    )
    parser.add_argument("--out_dir", default=None)
    return parser.parse_args()


def check_loader(images, labels, args):
    """The deit loader's seconds per batch, eager and compiled (or None)."""
    if not args.eager_batches:
        return None
    deit = recipes.get_recipe("deit", 64)
    check = {
        mode: loader_seconds(
            images,
            labels,
            args.batch_size,
            deit,
            args.seed,
            mode == "compiled",
            args.eager_batches,
        )
        for mode in ("eager", "compiled")
    }
    print(f"deit loader seconds per batch: {check}", flush=True)
    return check


def make_runners(images, labels, input_name, scale, recipe, args):
    """The timed series of one row: dense and MoE train steps (pipeline and
    bare) and the loader alone; and the two models' FLOPs."""
    image_size, patch_size = INPUTS[input_name]
    batch = args.batch_size

    def batches():
        return data_lib.CifarBatches(
            images, labels, batch, 100, recipe=recipe, seed=args.seed
        )

    runners, flops = {}, {}
    for kind, preset in (("dense", scale), ("moe", f"{scale}_e10")):
        model, trainer = build_trainer(
            preset, image_size, patch_size, recipe, batch, args.seed
        )
        flops[kind] = kmm.count_flops(model)
        for mode in ("pipeline", "bare"):
            runners[(kind, mode)] = Runner(trainer, batches(), mode)
    runners[("data", "loader")] = Runner(None, batches(), "loader")
    return runners, flops


def throughput_row(runners, times, flops, batch):
    """Images/s and the pipeline/bare and MoE/dense ratios of one group."""
    row = {
        "batch_size": batch,
        "dense_flops": int(flops["dense"]),
        "moe_flops": int(flops["moe"]),
        "seconds_per_step": {f"{k}_{m}": t for (k, m), t in times.items()},
        "all_seconds_per_step": {
            f"{k}_{m}": r.seconds for (k, m), r in runners.items()
        },
        "loader_seconds_per_batch": times[("data", "loader")],
    }
    for kind in ("dense", "moe"):
        for mode in ("pipeline", "bare"):
            row[f"{kind}_{mode}_images_per_s"] = batch / times[(kind, mode)]
        row[f"{kind}_pipeline_over_bare"] = (
            times[(kind, "bare")] / times[(kind, "pipeline")]
        )
    for mode in ("pipeline", "bare"):
        row[f"moe_over_dense_{mode}"] = (
            times[("moe", mode)] / times[("dense", mode)]
        )
    row["moe_over_dense"] = (
        times[("moe", "pipeline")] + times[("moe", "bare")]
    ) / (times[("dense", "pipeline")] + times[("dense", "bare")])
    return row


def print_row(row, times):
    batch = row["batch_size"]
    print(
        f"{row['input']} {row['scale']} {row['recipe']}: "
        + ", ".join(
            f"{k}_{m} {batch / t:.0f} img/s"
            for (k, m), t in times.items()
            if m != "loader"
        )
        + f", loader {1000 * times[('data', 'loader')]:.0f} ms/batch"
        + f"; pipeline/bare dense {row['dense_pipeline_over_bare']:.2f}"
        f" moe {row['moe_pipeline_over_bare']:.2f}; MoE/dense "
        f"bare {row['moe_over_dense_bare']:.2f} pipeline "
        f"{row['moe_over_dense_pipeline']:.2f}",
        flush=True,
    )


def main():
    args = parse_args()
    images, labels, source = load_images(args.data_path)
    start = time.perf_counter()
    loader_check = check_loader(images, labels, args)
    rows = []
    for input_name in args.inputs:
        for scale in args.scales:
            for recipe_name in args.recipes:
                recipe = recipes.get_recipe(recipe_name, 64)
                runners, flops = make_runners(
                    images, labels, input_name, scale, recipe, args
                )
                times = time_group(
                    runners, args.warmup, args.rounds, args.steps
                )
                row = {
                    "input": input_name,
                    "scale": scale,
                    "recipe": recipe_name,
                }
                row.update(
                    throughput_row(runners, times, flops, args.batch_size)
                )
                rows.append(row)
                print_row(row, times)
    payload = {
        "args": vars(args),
        "data": source,
        "seconds": time.perf_counter() - start,
        "deit_loader_seconds_per_batch": loader_check,
        "rows": rows,
    }
    write_results(
        "train_throughput", render(payload, machine()), payload, args.out_dir
    )


def render(payload, machine_string):
    """The markdown report of a run (also re-renderable from its JSON)."""
    args, rows = payload["args"], payload["rows"]
    batch = args["batch_size"]

    def ok(value, goal, low):
        return "yes" if (value >= goal if low else value <= goal) else "no"

    columns = [
        ("input/patch", lambda r: r["input"]),
        ("scale", lambda r: r["scale"]),
        ("recipe", lambda r: r["recipe"]),
        (
            "dense pipeline img/s",
            lambda r: f"{r['dense_pipeline_images_per_s']:.0f}",
        ),
        ("dense bare img/s", lambda r: f"{r['dense_bare_images_per_s']:.0f}"),
        (
            "MoE pipeline img/s",
            lambda r: f"{r['moe_pipeline_images_per_s']:.0f}",
        ),
        ("MoE bare img/s", lambda r: f"{r['moe_bare_images_per_s']:.0f}"),
        (
            "loader ms/batch",
            lambda r: f"{1000 * r['loader_seconds_per_batch']:.0f}",
        ),
        (
            "pipeline/bare dense",
            lambda r: f"{r['dense_pipeline_over_bare']:.2f}",
        ),
        ("pipeline/bare MoE", lambda r: f"{r['moe_pipeline_over_bare']:.2f}"),
        (
            f"pipeline >= {GOAL_PIPELINE}",
            lambda r: ok(
                min(r["dense_pipeline_over_bare"], r["moe_pipeline_over_bare"]),
                GOAL_PIPELINE,
                True,
            ),
        ),
        ("MoE/dense time (bare)", lambda r: f"{r['moe_over_dense_bare']:.2f}"),
        (
            "MoE/dense time (pipeline)",
            lambda r: f"{r['moe_over_dense_pipeline']:.2f}",
        ),
        ("MoE/dense time (both)", lambda r: f"{r['moe_over_dense']:.2f}"),
        (
            f"MoE <= {GOAL_MOE}",
            lambda r: ok(r["moe_over_dense"], GOAL_MOE, False),
        ),
    ]
    lines = [
        "# Training throughput",
        "",
        "`benchmarks/train_throughput.py`, "
        f"{payload.get('backend', keras.config.backend())} backend, "
        f"{machine_string}; batch {batch}, images from "
        f"{payload['data']}; {args['rounds']} rounds x {args['steps']} steps "
        f"per series after {args['warmup']} warm-up steps, median seconds "
        f"per step; {payload['seconds'] / 60:.1f} min in all. Pipeline: "
        "`CifarBatches` + train step (`train.py`'s step); bare: the train "
        "step on a pre-made device batch; loader: the `CifarBatches` batch "
        "alone. pipeline/bare is a throughput ratio (goal >= "
        f"{GOAL_PIPELINE}); MoE/dense is a time ratio (goal <= {GOAL_MOE}, "
        "judged on pipeline + bare times). The machine is shared: absolute "
        "images/s move with its load, the paired ratios less, but a single "
        "ratio of a few steps still moves by +-0.15.",
        "",
        markdown_table(columns, rows),
    ]
    check = payload.get("deit_loader_seconds_per_batch")
    if check:
        lines += [
            "",
            f"`deit` loader alone, seconds per batch of {batch} (median of "
            f"{args['eager_batches']}): Keras augmentation layers eager "
            f"{check['eager']:.2f} s, compiled (`tf.function`) "
            f"{check['compiled']:.2f} s.",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
