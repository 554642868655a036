"""Trains a keras_mobile_moe preset architecture on CIFAR-100.

Daxberger et al., "Mobile V-MoEs", arXiv 2309.04354: dense ViTs and their
Mobile V-MoE twins trained with the same recipe, CIFAR-100 images resized to
the model input (224x224, patch 32). Holds out a stratified validation split
of the training set; the test set is used once, for the final number.

Writes into `--workdir`:
  backup/          checkpoint of the last finished epoch (weights, optimizer,
                   epoch); a re-run of the same command resumes from it
  log.csv          one row per epoch (keras.callbacks.CSVLogger)
  tensorboard/     TensorBoard logs (when tensorflow is installed)
  preset/          the trained classifier as a keras-hub preset directory
                   (loads with kmm.MobileVMoE.from_preset(dir)); metadata.json
                   records the command, data, recipe, epochs and accuracy
  results.json     architecture, FLOPs, params, accuracy, wall time, machine

Usage:
  KERAS_BACKEND=jax python training/train.py --preset 6x64_e10 \
      --data_path ../shared/datasets/cifar100.npz --epochs 10 \
      --superclasses groups.json --workdir runs/6x64_e10
  # tiny smoke run on the committed fixture:
  python training/train.py --preset 6x64_e10 --data fixture --epochs 1 \
      --image_size 32 --patch_size 8 --override hidden_dim=16 ...
"""

import csv
import inspect
import json
import os
import shlex
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "benchmarks"))

import recipes  # noqa: E402
from common import machine  # noqa: E402
from trainer import Trainer  # noqa: E402
from trainer import evaluate  # noqa: E402

import data as data_lib  # noqa: E402
import keras_mobile_moe as kmm  # noqa: E402
from keras_mobile_moe.atomic_io import write_json  # noqa: E402
from keras_mobile_moe.atomic_io import write_text  # noqa: E402

PRESET = flags.DEFINE_string("preset", "6x64_e10", "Preset architecture.")
DATA = flags.DEFINE_enum(
    "data",
    "full",
    ["full", "fixture"],
    "full CIFAR-100 or the committed fixture.",
)
DATA_PATH = flags.DEFINE_string(
    "data_path", None, "cifar100.npz (default: $KMM_CIFAR100_PATH)."
)
RECIPE = flags.DEFINE_string("recipe", "auto", "deit, vit or auto (by width).")
EPOCHS = flags.DEFINE_integer("epochs", 10, "Training epochs.")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Batch size.")
LEARNING_RATE = flags.DEFINE_float(
    "learning_rate", None, "Peak learning rate (default: the recipe's, scaled)."
)
SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", None, "Model input size (default: the preset's, 224)."
)
PATCH_SIZE = flags.DEFINE_integer("patch_size", None, "Patch size override.")
OVERRIDE = flags.DEFINE_multi_string(
    "override", [], "Extra from_preset overrides, key=value (JSON values)."
)
VAL_FRACTION = flags.DEFINE_float(
    "val_fraction", 0.1, "Stratified validation share of the training set."
)
ROUTING = flags.DEFINE_enum(
    "routing",
    "superclass",
    ["superclass", "learned", "random", "token"],
    "MoE routing: super-class supervised, learned end to end, a seeded "
    "random balanced class->expert map (supervised), or per-token V-MoE.",
)
SUPERCLASSES = flags.DEFINE_string(
    "superclasses",
    None,
    "For --routing superclass: 'coarse' (CIFAR-100's 20 super-classes, E=20) "
    "or a .npy/.json file of one group id per class (discover_superclasses.py)."
    " Default: coarse if the model has 20 experts, else required.",
)
NUM_EXPERTS = flags.DEFINE_integer("num_experts", None, "Override E.")
INIT_FROM = flags.DEFINE_string(
    "init_from",
    None,
    "Start from this trained dense preset (name, directory or hf:// "
    "handle). A Mobile V-MoE is sparse-upcycled from it (Komatsuzaki et al., "
    "ICLR 2023, kmm.upcycle): experts copy its MLPs, the router starts fresh, "
    "and gates are normalised so training starts from the dense model's "
    "function. A dense model continues from its weights (the control run of "
    "an upcycling experiment: the same extra epochs without experts).",
)
CAPACITY_FACTOR = flags.DEFINE_float(
    "capacity_factor", 1.0, "Expert capacity factor for --routing token."
)
DISTRIBUTION = flags.DEFINE_enum(
    "distribution", "none", ["none", "data", "expert"], "JAX distribution."
)
TRAINING_BUDGETS = flags.DEFINE_string(
    "training_budgets",
    None,
    "MoNE only: the capacity budgets of the training steps. 'adaptive' (a "
    "budget drawn per step from 0.15, 0.25, ..., 0.95: the paper's adaptive "
    "model, usable at any budget), 'none' (every step at the model's "
    "capacity_budget), or comma-separated budgets such as '0.3,0.5'. "
    "Default: the preset's.",
)
MAX_STEPS = flags.DEFINE_integer(
    "max_steps_per_epoch", None, "Cap on steps per epoch (smoke runs)."
)
WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output directory.", required=True
)
LOG_EVERY = flags.DEFINE_integer(
    "log_every",
    50,
    "Log progress every this many steps when not on a terminal.",
)
STEP_DELAY = flags.DEFINE_float(
    "step_delay", 0.0, "Seconds to sleep after every step (interruption tests)."
)
VERBOSE = flags.DEFINE_integer(
    "verbose", None, "fit verbosity (default: 1 on a terminal, else 2)."
)


# ---------------------------------------------------------------- data


def load_cifar100():
    if DATA.value == "fixture":
        return kmm.datasets.cifar100.load_fixture()
    return kmm.datasets.cifar100.load_data(DATA_PATH.value)


def coarse_table(dataset):
    return kmm.datasets.cifar100.fine_to_coarse(
        np.concatenate([dataset["y_train"], dataset["y_test"]]),
        np.concatenate([dataset["y_train_coarse"], dataset["y_test_coarse"]]),
    )


def read_groups(path):
    """One group id per class from a .npy or .json file."""
    if path.endswith(".npy"):
        groups = np.load(path, allow_pickle=False)
    else:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
        if isinstance(content, dict):
            content = content["superclass_ids"]
        groups = np.asarray(content)
    groups = np.asarray(groups).reshape(-1).astype(int)
    if groups.min() < 0:
        raise ValueError(f"{path}: negative group id.")
    return groups


def random_groups(num_classes, num_experts, seed):
    """A seeded random balanced class -> expert map."""
    rng = np.random.default_rng([seed, 104729])
    return rng.permutation(np.arange(num_classes) % num_experts)


# ---------------------------------------------------------------- model


def parse_overrides(items):
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--override {item!r}: expected key=value.")
        try:
            overrides[key] = json.loads(value)
        except ValueError:
            overrides[key] = value
        if isinstance(overrides[key], list):
            overrides[key] = tuple(overrides[key])
    return overrides


def preset_family(preset):
    """(task class, backbone config) of `--preset`: the family the preset
    loader finds for a built-in name or a preset directory."""
    try:
        family, backbone_config = kmm.preset_loader.family_of_preset(preset)
    except ValueError as error:
        raise ValueError(f"--preset: {error}") from None
    return family.task_cls, backbone_config


def parse_training_budgets(value):
    """--training_budgets -> the MoNE `training_budgets` argument."""
    if value in ("adaptive", "none"):
        return None if value == "none" else value
    try:
        return [float(v) for v in value.split(",")]
    except ValueError:
        raise ValueError(
            f"Received: --training_budgets={value!r}. Accepted: 'adaptive', "
            "'none' or comma-separated budgets such as '0.3,0.5'."
        ) from None


def flag_overrides(cls, recipe, num_classes):
    """`from_preset` overrides from the recipe and the flags (--image_size,
    --patch_size, --override, --training_budgets)."""
    overrides = {"num_classes": num_classes}
    if recipe.drop_path_rate:
        overrides["drop_path_rate"] = recipe.drop_path_rate
    if recipe.dropout:
        overrides["dropout"] = recipe.dropout
    if IMAGE_SIZE.value:
        overrides["image_shape"] = (IMAGE_SIZE.value, IMAGE_SIZE.value, 3)
    if PATCH_SIZE.value:
        overrides["patch_size"] = PATCH_SIZE.value
    overrides.update(parse_overrides(OVERRIDE.value))
    if TRAINING_BUDGETS.value is not None:
        if cls is not kmm.MoNE:
            raise ValueError(
                f"--training_budgets is for MoNE presets; "
                f"--preset={PRESET.value!r} is a {cls.__name__}."
            )
        overrides["training_budgets"] = parse_training_budgets(
            TRAINING_BUDGETS.value
        )
    return overrides


def superclass_groups(dataset, num_experts, num_classes):
    """--routing superclass: the class -> expert table and where it came
    from (--superclasses: 'coarse' or a groups file)."""
    source = SUPERCLASSES.value or ("coarse" if num_experts == 20 else None)
    if source is None:
        raise ValueError(
            f"--routing superclass with {num_experts} experts needs "
            "--superclasses: 'coarse' (CIFAR-100's 20 super-classes; "
            "sets E=20) or a groups file written by "
            "training/discover_superclasses.py."
        )
    groups = (
        coarse_table(dataset) if source == "coarse" else read_groups(source)
    )
    if len(groups) != num_classes:
        raise ValueError(
            f"--superclasses {source}: {len(groups)} entries, expected "
            f"one per class ({num_classes})."
        )
    return groups, source


def routing_overrides(dataset, num_experts, num_classes):
    """A Mobile V-MoE's routing overrides (--routing, --superclasses,
    --capacity_factor) and their description for results.json."""
    mode = ROUTING.value
    routing = {"mode": mode}
    overrides = {}
    groups = None
    if mode == "superclass":
        groups, routing["superclasses"] = superclass_groups(
            dataset, num_experts, num_classes
        )
        num_experts = int(groups.max()) + 1
    elif mode == "random":
        groups = random_groups(num_classes, num_experts, SEED.value)
    overrides["num_experts"] = int(num_experts)
    if mode == "token":
        overrides["router_type"] = "token"
        overrides["capacity_factor"] = CAPACITY_FACTOR.value
    if groups is not None:
        overrides["superclass_ids"] = [int(g) for g in groups]
        overrides["routing"] = "superclass"
        routing["superclass_ids"] = overrides["superclass_ids"]
    else:
        overrides["routing"] = "learned"
    routing["num_experts"] = int(num_experts)
    if INIT_FROM.value:
        # With normalised gates the upcycled model is exactly the dense one
        # at the start, whatever the fresh router picks.
        overrides["normalize_gates"] = True
    return overrides, routing


def build_model(dataset, recipe, num_classes=100):
    """The classifier (random weights, or --init_from's), a description of
    its routing, and the `from_preset` overrides."""
    preset = PRESET.value
    cls, backbone_config = preset_family(preset)
    overrides = flag_overrides(cls, recipe, num_classes)
    routing = {"mode": None}
    config = {**backbone_config, **overrides}
    if NUM_EXPERTS.value:
        config["num_experts"] = NUM_EXPERTS.value
    defaults = inspect.signature(kmm.models.MobileVMoEBackbone).parameters
    num_experts = config.get("num_experts", defaults["num_experts"].default)
    is_moe = cls is kmm.MobileVMoE and bool(
        config.get("num_moe_layers", defaults["num_moe_layers"].default)
        and num_experts
    )
    if is_moe:
        extra, routing = routing_overrides(dataset, num_experts, num_classes)
        overrides.update(extra)
    if DISTRIBUTION.value != "none":
        # Set before the model is built, so its variables get their layouts;
        # the expert mesh axis must divide the number of experts.
        keras.distribution.set_distribution(
            kmm.distribution.make_distribution(
                DISTRIBUTION.value, num_experts=routing.get("num_experts")
            )
        )
    model = cls.from_preset(preset, load_weights=False, **overrides)
    if INIT_FROM.value:
        if cls is not kmm.MobileVMoE:
            raise ValueError(
                f"Received: --init_from={INIT_FROM.value!r} with "
                f"--preset={preset!r}, a {cls.__name__}. --init_from starts a "
                "Mobile V-MoE (upcycled) or a dense ViT (continued) from a "
                "dense preset."
            )
        routing["init_from"] = upcycle_into(model, INIT_FROM.value, dataset)
    return model, routing, overrides


def upcycle_into(model, dense_preset, dataset):
    """Sets `model`'s weights from the dense `dense_preset`: by sparse
    upcycling (`kmm.upcycle` with `model`'s experts, table and gates) when
    `model` is a Mobile V-MoE, as a copy when it is dense. Returns what
    results.json records about it."""
    backbone = model.backbone
    dense = kmm.MobileVMoE.from_preset(dense_preset)
    if dense.backbone.num_moe_layers:
        raise ValueError(
            f"Received: --init_from={dense_preset!r}, a Mobile V-MoE with "
            f"{dense.backbone.num_moe_layers} MoE layers. Expected a dense "
            "preset (num_moe_layers=0), e.g. one trained with --preset 6x64."
        )
    keys = (
        "num_layers",
        "hidden_dim",
        "num_heads",
        "mlp_dim",
        "patch_size",
        "image_shape",
        "use_class_token",
    )
    different = {
        k: (getattr(dense.backbone, k), getattr(backbone, k))
        for k in keys
        if tuple(np.atleast_1d(getattr(dense.backbone, k)))
        != tuple(np.atleast_1d(getattr(backbone, k)))
    }
    if model.num_classes != dense.num_classes:
        different["num_classes"] = (dense.num_classes, model.num_classes)
    if different:
        raise ValueError(
            f"Received: --init_from={dense_preset!r}, whose architecture "
            "differs from the model being trained in "
            + ", ".join(
                f"{k} (preset {a}, model {b})"
                for k, (a, b) in different.items()
            )
            + ". Expected the same architecture apart from the experts: "
            "pass the flags (--image_size, --patch_size, --override) the "
            "dense preset was trained with."
        )
    upcycled = (
        dense
        if not backbone.is_moe
        else kmm.upcycle(
            dense,
            num_experts=backbone.num_experts,
            num_moe_layers=backbone.num_moe_layers,
            top_k=backbone.top_k,
            superclass_ids=model.superclass_ids,
            normalize_gates=backbone.normalize_gates,
            router_pooling=backbone.router_pooling,
            routing=model.routing,
        )
    )
    for target, source in zip(model.weights, upcycled.weights, strict=True):
        target.assign(keras.ops.convert_to_numpy(source))
    images = dataset["x_test"][:32]
    difference = float(
        np.abs(
            np.asarray(model.predict(images, verbose=0))
            - np.asarray(dense.predict(images, verbose=0))
        ).max()
    )
    start = (
        f"upcycled from {dense_preset}: {backbone.num_experts} experts in the "
        f"last {backbone.num_moe_layers} blocks"
        if backbone.is_moe
        else f"continuing from {dense_preset}"
    )
    print(
        f"{start}; max |logit difference| to the dense model at the start "
        f"{difference:.1e}",
        flush=True,
    )
    return {
        "preset": dense_preset,
        "initial_max_abs_logit_difference": difference,
    }


def make_optimizer(recipe, steps_per_epoch, epochs, batch_size):
    peak = LEARNING_RATE.value or recipe.learning_rate(batch_size)
    total = max(1, steps_per_epoch * epochs)
    warmup = int(round(recipe.warmup(epochs) * steps_per_epoch))
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else peak,
        decay_steps=max(1, total - warmup),
        alpha=min(1.0, recipe.min_learning_rate / peak),
        warmup_target=peak if warmup else None,
        warmup_steps=warmup,
    )
    optimizer = keras.optimizers.AdamW(
        learning_rate=schedule,
        weight_decay=recipe.weight_decay,
        clipnorm=recipe.clipnorm,
    )
    optimizer.exclude_from_weight_decay(
        var_names=["bias", "gamma", "beta", "norm", "class_token", "position"]
    )
    return optimizer, peak


# ---------------------------------------------------------------- callbacks


class EpochTimer(keras.callbacks.Callback):
    """Adds `epoch_seconds` and `images_per_second` to the epoch logs."""

    def __init__(self, images_per_epoch):
        super().__init__()
        self.images_per_epoch = images_per_epoch

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self.start
        if logs is not None:
            logs["epoch_seconds"] = seconds
            logs["train_images_per_second"] = self.images_per_epoch / seconds
        logging.info(
            "epoch %d: %.1f s, %.1f train images/s",
            epoch + 1,
            seconds,
            self.images_per_epoch / seconds,
        )


class StepLogger(keras.callbacks.Callback):
    """Progress lines (step, loss, images/s) every `every` steps, for logs."""

    def __init__(self, every, steps, batch_size, delay=0.0):
        super().__init__()
        self.every, self.steps, self.batch_size = every, steps, batch_size
        self.delay = delay

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch, self.start = epoch, time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if self.delay:
            time.sleep(self.delay)
        if self.every and (batch + 1) % self.every == 0:
            seconds = time.perf_counter() - self.start
            logs = logs or {}
            print(
                f"epoch {self.epoch + 1} step {batch + 1}/{self.steps}: "
                + ", ".join(f"{k} {float(v):.4f}" for k, v in logs.items())
                + f", {(batch + 1) * self.batch_size / seconds:.1f} images/s",
                flush=True,
            )


def tensorboard_callback(workdir):
    try:
        import tensorboard  # noqa: F401
        import tensorflow  # noqa: F401
    except ImportError as error:
        print(
            "TensorBoard logging is off: keras.callbacks.TensorBoard writes "
            f"its event files with tensorflow and tensorboard ({error}; pip "
            "install 'keras-mobile-moe[training,tensorflow]'). CSV logging "
            "is on.",
            flush=True,
        )
        return None
    return keras.callbacks.TensorBoard(
        os.path.join(workdir, "tensorboard"),
        write_graph=False,
        update_freq="epoch",
    )


def backup_epoch(backup_dir):
    path = os.path.join(backup_dir, "training_metadata.json")
    if not os.path.isfile(path):
        return 0
    with open(path, encoding="utf-8") as f:
        return int(json.load(f)["epoch"])


# ---------------------------------------------------------------- evaluation


# The budgets at which a trained MoNE is evaluated (results.json
# "budget_curve"; the report's accuracy-vs-budget table).
CURVE_BUDGETS = tuple(round(0.1 * i, 1) for i in range(2, 11))


def budget_sweep(model, trainer, test):
    """MoNE: test top-1, FLOPs and activated parameters at the budgets
    0.2, 0.3, ..., 1.0 (those the model allows), the same weights each
    time; the model's own budget is restored afterwards."""
    own = model.capacity_budget
    lowest = 1.0 / 2 ** (model.backbone.num_nested_experts - 1)
    curve = []
    try:
        for budget in CURVE_BUDGETS:
            if budget < lowest:
                continue
            model.capacity_budget = budget
            trainer.predict_function = None  # traced for the old budget
            top1, _ = evaluate(trainer.predict_on_batch, test, None)
            curve.append(
                {
                    "capacity_budget": budget,
                    "test_top1": top1,
                    "flops": int(kmm.count_flops(model)),
                    "activated_params": int(kmm.flops.activated_params(model)),
                    "token_counts": list(model.backbone.token_counts()),
                }
            )
            print(
                f"capacity budget {budget:.1f}: test top-1 {top1:.4f}",
                flush=True,
            )
    finally:
        model.capacity_budget = own
        trainer.predict_function = None
    return curve


# ---------------------------------------------------------------- steps


def start_distribution(backend):
    """Checks --distribution against the backend; joins a multi-host job."""
    if DISTRIBUTION.value == "none":
        return
    if backend != "jax":
        raise ValueError(
            f"--distribution {DISTRIBUTION.value} runs on the JAX backend "
            f"only; this is KERAS_BACKEND={backend}. Use "
            "KERAS_BACKEND=jax or --distribution none."
        )
    if int(os.environ.get("KERAS_DISTRIBUTION_NUM_PROCESSES", "1")) > 1:
        # Several hosts: join the job before any JAX computation (this
        # runs jax.distributed.initialize()).
        keras.distribution.initialize()


def make_recipe():
    """The --recipe for the model's width (--override hidden_dim=... or
    the preset's)."""
    width = parse_overrides(OVERRIDE.value).get("hidden_dim")
    if width is None:
        width = preset_family(PRESET.value)[1]["hidden_dim"]
    return recipes.get_recipe(RECIPE.value, width)


def make_batches(dataset, recipe, num_classes):
    """The train (augmented by the recipe), validation (a stratified share
    of the training set, or None) and test batches, and the split sizes."""
    train_idx, val_idx = data_lib.stratified_split(
        dataset["y_train"], VAL_FRACTION.value, SEED.value
    )
    batch_size = BATCH_SIZE.value
    train = data_lib.CifarBatches(
        dataset["x_train"][train_idx],
        dataset["y_train"][train_idx],
        batch_size,
        num_classes,
        recipe=recipe,
        seed=SEED.value,
        max_steps=MAX_STEPS.value,
    )
    val = None
    if len(val_idx):
        val = data_lib.CifarBatches(
            dataset["x_train"][val_idx],
            dataset["y_train"][val_idx],
            batch_size,
            num_classes,
            max_steps=MAX_STEPS.value,
        )
    test = data_lib.CifarBatches(
        dataset["x_test"], dataset["y_test"], batch_size, num_classes
    )
    sizes = {
        "train_images": int(len(train_idx)),
        "val_images": int(len(val_idx)),
        "test_images": int(len(dataset["y_test"])),
    }
    return train, val, test, sizes


def make_trainer(model, recipe, train, source_size):
    """The compiled `Trainer` of `model` (the classifier's loss, with the
    recipe's label smoothing on one-hot or Mixup/CutMix targets) and the
    peak learning rate."""
    optimizer, peak_lr = make_optimizer(
        recipe, len(train), EPOCHS.value, BATCH_SIZE.value
    )
    trainer = Trainer(model, source_size)
    trainer.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=recipe.label_smoothing
        ),
        metrics=[keras.metrics.CategoricalAccuracy("accuracy")],
    )
    return trainer, peak_lr


def fit_callbacks(workdir, train):
    """Checkpointing (BackupAndRestore), CSV / TensorBoard logs, timing and
    progress lines; and the fit verbosity."""
    batch_size = BATCH_SIZE.value
    callbacks = [
        keras.callbacks.BackupAndRestore(
            os.path.join(workdir, "backup"), delete_checkpoint=False
        ),
        EpochTimer(len(train) * batch_size),
        keras.callbacks.CSVLogger(
            os.path.join(workdir, "log.csv"), append=True
        ),
    ]
    tensorboard = tensorboard_callback(workdir)
    if tensorboard is not None:
        callbacks.append(tensorboard)
    verbose = VERBOSE.value
    if verbose is None:
        verbose = 1 if sys.stdout.isatty() else 2
    if verbose != 1 or STEP_DELAY.value:
        callbacks.append(
            StepLogger(
                LOG_EVERY.value if verbose != 1 else 0,
                len(train),
                batch_size,
                STEP_DELAY.value,
            )
        )
    return callbacks, verbose


def score(model, trainer, val, test):
    """Validation and test top-1 and router accuracy, and (MoNE) the
    accuracy-vs-budget curve."""
    superclass_ids = getattr(model, "superclass_ids", None)
    if getattr(model, "router_loss", None) is None:
        superclass_ids = None
    scores = {"val_top1": None, "val_router_accuracy": None}
    if val is not None:
        val.max_steps = None
        scores["val_top1"], scores["val_router_accuracy"] = evaluate(
            trainer.predict_on_batch, val, superclass_ids
        )
    scores["test_top1"], scores["test_router_accuracy"] = evaluate(
        trainer.predict_on_batch, test, superclass_ids
    )
    print(
        f"val top-1 {scores['val_top1']}, test top-1 "
        f"{scores['test_top1']:.4f}, test router accuracy "
        f"{scores['test_router_accuracy']}",
        flush=True,
    )
    scores["budget_curve"] = None
    if isinstance(model, kmm.MoNE):
        scores["budget_curve"] = budget_sweep(model, trainer, test)
    return scores


def save_preset(model, preset_dir, training_info):
    """Saves the classifier as a preset; its metadata.json and model card
    record `training_info`."""
    model.save_to_preset(preset_dir)
    metadata_path = os.path.join(preset_dir, "metadata.json")
    with open(metadata_path, encoding="utf-8") as f:
        metadata = json.load(f)
    metadata["training"] = training_info
    write_json(metadata_path, metadata)
    card_path = os.path.join(preset_dir, "README.md")
    with open(card_path, encoding="utf-8") as f:
        card = f.read()
    info = training_info
    write_text(
        card_path,
        card
        + (
            "\n## Training\n\n"
            f"Trained with `training/train.py` on {info['dataset']} "
            f"({info['train_images']} training images, "
            f"{info['val_images']} held out for validation), "
            f"{info['epochs']} epochs, seed {info['seed']}, "
            f"{info['backend']} backend, recipe `{info['recipe']['name']}`."
            "\n\n"
            f"- test top-1: {info['test_top1']:.4f}\n"
            f"- validation top-1: {info['val_top1']}\n"
            f"- test router accuracy: {info['test_router_accuracy']}\n\n"
            f"Command:\n\n```\n{info['command']}\n```\n"
        ),
    )


ARCH_KEYS = (
    "num_layers",
    "hidden_dim",
    "num_heads",
    "mlp_dim",
    "patch_size",
    "num_experts",
    "top_k",
    "num_moe_layers",
    "router_type",
    "capacity_factor",
    "drop_path_rate",
    "num_nested_experts",
    "capacity_budget",
)


def architecture(model):
    """results.json's `arch`: the backbone's settings and the family."""
    backbone = model.backbone
    arch = {k: getattr(backbone, k) for k in ARCH_KEYS if hasattr(backbone, k)}
    arch["family"] = type(model).preset_family
    if isinstance(model, kmm.MoNE):
        arch["training_budgets"] = model.training_budgets
    arch["image_shape"] = list(backbone.image_shape)
    arch["is_moe"] = bool(getattr(backbone, "is_moe", False))
    return arch


def add_history(results, workdir):
    """Adds log.csv's rows and the summed epoch times (also those of the
    sessions before a resume, which may have run on another machine;
    `machine` is this session's)."""
    log_path = os.path.join(workdir, "log.csv")
    if not os.path.isfile(log_path):
        return
    with open(log_path, encoding="utf-8") as f:
        results["history"] = list(csv.DictReader(f))
    results["train_seconds"] = sum(
        float(row.get("epoch_seconds") or 0) for row in results["history"]
    )


# ---------------------------------------------------------------- main


def main(argv):
    del argv
    start = time.perf_counter()
    workdir = WORKDIR.value
    os.makedirs(workdir, exist_ok=True)
    command = " ".join(shlex.quote(a) for a in sys.argv)
    backend = keras.config.backend()
    start_distribution(backend)

    keras.utils.set_random_seed(SEED.value)
    dataset = load_cifar100()
    num_classes = 100
    recipe = make_recipe()
    model, routing, overrides = build_model(dataset, recipe, num_classes)
    train, val, test, sizes = make_batches(dataset, recipe, num_classes)
    # The Trainer resizes and scales in its graph; the preprocessor is put
    # back for the saved preset.
    preprocessor, model.preprocessor = model.preprocessor, None
    trainer, peak_lr = make_trainer(
        model, recipe, train, dataset["x_train"].shape[1:3]
    )

    resumed_from = backup_epoch(os.path.join(workdir, "backup"))
    train.epoch = resumed_from
    print(
        f"== {PRESET.value} ({type(model).__name__}, "
        f"{model.count_params() / 1e6:.2f}M params, input "
        f"{tuple(model.backbone.image_shape[:2])}) on {backend}; recipe "
        f"{recipe.name}, {EPOCHS.value} epochs x {len(train)} steps of "
        f"{BATCH_SIZE.value}, peak lr {peak_lr:.2e}; "
        f"{sizes['train_images']} train / {sizes['val_images']} val / "
        f"{sizes['test_images']} test images; routing {routing.get('mode')}"
        + (f"; resuming after epoch {resumed_from}" if resumed_from else ""),
        flush=True,
    )
    callbacks, verbose = fit_callbacks(workdir, train)
    fit_start = time.perf_counter()
    trainer.fit(
        train,
        validation_data=val,
        epochs=EPOCHS.value,
        callbacks=callbacks,
        verbose=verbose,
    )
    fit_seconds = time.perf_counter() - fit_start
    scores = score(model, trainer, val, test)

    # The preset: the classifier with its preprocessor.
    model.preprocessor = preprocessor
    training_info = {
        "command": command,
        "backend": backend,
        "dataset": "cifar100" if DATA.value == "full" else "cifar100-fixture",
        **sizes,
        "epochs": EPOCHS.value,
        "steps_per_epoch": len(train),
        "batch_size": BATCH_SIZE.value,
        "seed": SEED.value,
        "recipe": recipe.as_dict(),
        "peak_learning_rate": peak_lr,
        "routing": {k: v for k, v in routing.items() if k != "superclass_ids"},
        "val_top1": scores["val_top1"],
        "test_top1": scores["test_top1"],
        "test_router_accuracy": scores["test_router_accuracy"],
    }
    preset_dir = os.path.join(workdir, "preset")
    save_preset(model, preset_dir, training_info)

    results = {
        "preset": PRESET.value,
        "arch": architecture(model),
        "overrides": {
            k: v for k, v in overrides.items() if k != "superclass_ids"
        },
        "flops": int(kmm.count_flops(model)),
        "params": int(model.count_params()),
        "activated_params": int(kmm.flops.activated_params(model)),
        "epochs": EPOCHS.value,
        "resumed_from_epoch": resumed_from,
        **scores,
        "training_budget_steps": (
            {str(k): v for k, v in sorted(trainer.budget_steps.items())}
            if getattr(model, "training_budgets", None)
            else None
        ),
        "fit_seconds": fit_seconds,
        "wall_seconds": time.perf_counter() - start,
        "machine": machine(),
        "training": training_info,
    }
    add_history(results, workdir)
    write_json(os.path.join(workdir, "results.json"), results)
    print(f"wrote {preset_dir} and {os.path.join(workdir, 'results.json')}")


if __name__ == "__main__":
    app.run(main)
