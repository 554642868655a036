"""training/train.py and discover_superclasses.py, end to end on the fixture.

Each test runs the programs in subprocesses (on the backend of
KERAS_BACKEND) with a tiny architecture (32x32 input, patch 8, 2 layers,
width 16, 4 experts) on the committed CIFAR-100 fixture.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

import keras_mobile_moe as kmm
from conftest import TINY_TRAIN_ARGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "training", "train.py")
DISCOVER = os.path.join(ROOT, "training", "discover_superclasses.py")
TINY_ARGS = [
    "--preset=6x64_e10",
    *TINY_TRAIN_ARGS,
    "--routing=random",
    "--num_experts=4",
]


def env():
    out = dict(os.environ)
    out["KERAS_BACKEND"] = keras.config.backend()
    out.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return out


def run_program(script, *args, timeout=240):
    """Runs a training/ or scripts/ program; asserts it succeeds; its stdout."""
    result = subprocess.run(
        [sys.executable, script, *args],
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


def train(workdir, *args, timeout=240):
    return run_program(
        TRAIN, *TINY_ARGS, f"--workdir={workdir}", *args, timeout=timeout
    )


def read_log(workdir):
    with open(os.path.join(workdir, "log.csv"), encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("smoke"))
    stdout = train(workdir, "--epochs=2", "--max_steps_per_epoch=4")
    return workdir, stdout


def test_smoke_run_writes_preset_results_and_logs(smoke_run):
    workdir, stdout = smoke_run
    assert "test top-1" in stdout
    with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    for key in (
        "flops",
        "params",
        "activated_params",
        "val_top1",
        "test_top1",
        "test_router_accuracy",
        "wall_seconds",
        "machine",
    ):
        assert results[key] is not None, key
    assert results["epochs"] == 2
    assert results["arch"]["num_experts"] == 4
    assert results["activated_params"] < results["params"]
    assert results["training"]["backend"] == keras.config.backend()
    assert 0.0 <= results["test_router_accuracy"] <= 1.0
    rows = read_log(workdir)
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert results["train_seconds"] == pytest.approx(
        sum(float(r["epoch_seconds"]) for r in rows)
    )
    assert "router_accuracy" in rows[0] and "val_accuracy" in rows[0]
    assert np.isfinite(float(rows[-1]["loss"]))

    preset = os.path.join(workdir, "preset")
    with open(os.path.join(preset, "metadata.json"), encoding="utf-8") as f:
        training = json.load(f)["training"]
    assert "train.py" in training["command"]
    assert training["dataset"] == "cifar100-fixture"
    assert training["test_top1"] == results["test_top1"]
    model = kmm.MobileVMoE.from_preset(preset)
    assert model.backbone.num_experts == 4
    assert len(model.superclass_ids) == 100
    images = kmm.datasets.cifar100.load_fixture()["x_test"][:4]
    assert model.predict(images, verbose=0).shape == (4, 100)


def test_same_seed_same_losses(smoke_run, tmp_path):
    workdir, _ = smoke_run
    train(str(tmp_path), "--epochs=2", "--max_steps_per_epoch=4")
    first, second = read_log(workdir), read_log(str(tmp_path))
    for key in ("loss", "router_loss", "val_loss"):
        np.testing.assert_allclose(
            [float(r[key]) for r in first],
            [float(r[key]) for r in second],
            rtol=1e-5,
            err_msg=key,
        )


def test_resumes_after_being_killed(tmp_path):
    workdir = str(tmp_path)
    args = [
        sys.executable,
        TRAIN,
        *TINY_ARGS,
        f"--workdir={workdir}",
        "--epochs=3",
        "--max_steps_per_epoch=6",
        "--step_delay=0.5",
        "--val_fraction=0.05",
    ]
    metadata = os.path.join(workdir, "backup", "training_metadata.json")
    process = subprocess.Popen(
        args, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 200
        while not os.path.exists(metadata):
            assert process.poll() is None, "train.py ended before epoch 1"
            assert time.time() < deadline, "no checkpoint after 200 s"
            time.sleep(0.1)
        time.sleep(1.0)  # into epoch 2 (6 steps of >= 0.5 s)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    with open(metadata, encoding="utf-8") as f:
        saved_epoch = json.load(f)["epoch"]
    assert saved_epoch == 1
    assert not os.path.exists(os.path.join(workdir, "results.json"))

    result = subprocess.run(
        args, env=env(), capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-5000:]
    assert "resuming after epoch 1" in result.stdout
    with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    assert results["resumed_from_epoch"] == 1
    epochs = [int(r["epoch"]) for r in read_log(workdir)]
    assert epochs[0] == 0 and epochs[-1] == 2 and 1 in epochs
    assert "0" not in [r["epoch"] for r in read_log(workdir)[1:]]


@pytest.mark.only_on(
    "tensorflow",
    why=(
        "the discovery program (a preset's predictions, then numpy); "
        "predictions are tested on every backend"
    ),
)
def test_discover_superclasses_writes_groups(smoke_run, tmp_path):
    workdir, _ = smoke_run
    out = str(tmp_path / "groups")
    stdout = run_program(
        DISCOVER,
        f"--preset_dir={os.path.join(workdir, 'preset')}",
        "--num_superclasses=4",
        f"--out={out}",
    )
    assert "adjusted Rand index" in stdout
    groups = np.load(out + ".npy")
    assert groups.shape == (100,) and set(groups.tolist()) == {0, 1, 2, 3}
    with open(out + ".json", encoding="utf-8") as f:
        content = json.load(f)
    assert content["superclass_ids"] == groups.tolist()
    assert sum(len(g) for g in content["groups"]) == 100


def test_token_routing_flag_trains(tmp_path):
    """--routing token: per-token V-MoE routing (no image router)."""
    workdir = tmp_path / "token"
    train(workdir, "--routing=token", "--epochs=1", "--max_steps_per_epoch=2")
    with open(workdir / "results.json", encoding="utf-8") as f:
        results = json.load(f)
    assert results["arch"]["router_type"] == "token"
    assert results["test_router_accuracy"] is None
    # Every expert can receive an image's tokens: all parameters count.
    assert results["activated_params"] == results["params"]


@pytest.mark.skipif(
    keras.config.backend() != "jax",
    reason="keras.distribution runs on JAX; covered in the JAX session",
)
@pytest.mark.parametrize("kind", ["data", "expert"])
def test_distribution_flag_trains_on_two_devices(tmp_path, kind):
    workdir = tmp_path / kind
    result = subprocess.run(
        [
            sys.executable,
            TRAIN,
            *TINY_ARGS,
            f"--workdir={workdir}",
            f"--distribution={kind}",
            "--epochs=1",
            "--max_steps_per_epoch=2",
        ],
        env={**env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    with open(workdir / "results.json", encoding="utf-8") as f:
        assert json.load(f)["epochs"] == 1


def test_distribution_flag_needs_jax(tmp_path):
    if keras.config.backend() == "jax":
        pytest.skip("the error is for the TensorFlow and PyTorch backends")
    result = subprocess.run(
        [
            sys.executable,
            TRAIN,
            *TINY_ARGS,
            f"--workdir={tmp_path}",
            "--distribution=data",
            "--epochs=1",
        ],
        env=env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode != 0
    assert "--distribution data runs on the JAX backend" in result.stderr


def _load(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        f"kmm_training_{name}", os.path.join(ROOT, "training", f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stratified_split_and_seeded_batches():
    data_lib = _load("data")
    recipes = _load("recipes")
    fixture = kmm.datasets.cifar100.load_fixture()
    labels = fixture["y_train"]
    train_idx, val_idx = data_lib.stratified_split(labels, 0.25, seed=1)
    assert len(np.intersect1d(train_idx, val_idx)) == 0
    assert len(train_idx) + len(val_idx) == len(labels)
    for c in np.unique(labels):
        n = np.sum(labels == c)
        assert np.sum(labels[val_idx] == c) == round(0.25 * n)
    again = data_lib.stratified_split(labels, 0.25, seed=1)[1]
    np.testing.assert_array_equal(again, val_idx)

    batches = data_lib.CifarBatches(
        fixture["x_train"],
        labels,
        16,
        100,
        recipe=recipes.get_recipe("vit", 64),
        seed=5,
    )
    x0, y0 = batches[0]
    np.testing.assert_array_equal(batches[0][0], x0)
    assert x0.shape == (16, 32, 32, 3) and x0.min() >= 0 and x0.max() <= 255
    assert len(np.unique(np.argmax(y0, -1))) > 4  # shuffled, not class-sorted
    batches.on_epoch_end()
    assert not np.array_equal(batches[0][1], y0)

    evaluation = data_lib.CifarBatches(
        fixture["x_test"], fixture["y_test"], 64, 100
    )
    assert len(evaluation) == 4 and evaluation[3][0].shape == (8, 32, 32, 3)
    # Evaluation batches are the images as they are (no augmentation).
    np.testing.assert_array_equal(evaluation[0][0], fixture["x_test"][:64])


def test_deit_recipe_augments_with_soft_labels():
    data_lib = _load("data")
    recipes = _load("recipes")
    recipe = recipes.get_recipe("auto", 192)
    assert recipe.name == "deit" and recipe.soft_labels
    fixture = kmm.datasets.cifar100.load_fixture()
    batches = data_lib.CifarBatches(
        fixture["x_train"],
        fixture["y_train"],
        8,
        100,
        recipe=recipe,
        seed=2,
    )
    x, y = batches[0]
    x_again, y_again = batches[0]
    np.testing.assert_array_equal(x, x_again)
    np.testing.assert_array_equal(y, y_again)
    np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-5)
    assert np.all(np.isfinite(x)) and x.min() >= 0 and x.max() <= 255
    # The same seed draws the same crops and flips: the vit recipe's batch
    # is the deit batch before RandAugment, Mixup/CutMix and erasing.
    plain = data_lib.CifarBatches(
        fixture["x_train"],
        fixture["y_train"],
        8,
        100,
        recipe=recipes.get_recipe("vit", 64),
        seed=2,
    )
    assert not np.allclose(plain[0][0], x)
    assert np.sum(y > 0) > np.sum(plain[0][1] > 0)  # mixed targets
    batches.warm_up()  # traces the compiled layers; batches stay the same
    np.testing.assert_array_equal(batches[0][0], x)
    batches.on_epoch_end()
    assert not np.array_equal(batches[0][0], x)
    # The eager path (benchmarks/train_throughput.py compares it) draws
    # the same random choices of its own: valid, seeded batches.
    eager = data_lib.CifarBatches(
        fixture["x_train"],
        fixture["y_train"],
        8,
        100,
        recipe=recipe,
        seed=2,
        compile_augmentation=False,
    )
    x_eager, y_eager = eager[1]
    np.testing.assert_array_equal(eager[1][0], x_eager)
    np.testing.assert_allclose(y_eager.sum(-1), 1.0, rtol=1e-5)
    assert x_eager.min() >= 0 and x_eager.max() <= 255
    with pytest.raises(ValueError, match="Accepted: 'auto'"):
        recipes.get_recipe("adam", 64)


def test_trainer_resizes_and_scales_like_the_preset():
    # train.py feeds 32x32 images in [0, 255]; its Trainer upsamples and
    # scales them in the graph. The saved preset must see the same inputs
    # through its image converter.
    trainer_lib = _load("trainer")
    model = kmm.MobileVMoE.from_preset(
        "6x64_e10",
        load_weights=False,
        num_classes=100,
        image_shape=(64, 64, 3),
        patch_size=16,
        num_layers=2,
        hidden_dim=16,
        num_heads=2,
        mlp_dim=32,
        num_experts=4,
        routing="learned",
    )
    images = kmm.datasets.cifar100.load_fixture()["x_test"][:6]
    expected = model.predict(images, verbose=0)
    preprocessor, model.preprocessor = model.preprocessor, None
    trainer = trainer_lib.Trainer(model)
    out = trainer.predict_on_batch(images.astype("float32"))
    np.testing.assert_allclose(out["logits"], expected, atol=1e-5, rtol=1e-5)
    assert out["router_logits"].shape == (6, 4)
    model.preprocessor = preprocessor


def h5_paths(path):
    import h5py

    paths = {}
    with h5py.File(path, "r") as f:
        f.visititems(
            lambda name, obj: (
                paths.__setitem__(name, obj.shape)
                if isinstance(obj, h5py.Dataset)
                else None
            )
        )
    return paths


def test_trainer_loads_and_writes_the_committed_checkpoint_format(tmp_path):
    # training/cpu_runs.sh resumes 100-epoch runs from the BackupAndRestore
    # checkpoints in training/checkpoints/ (a copy is read here): every
    # weight and optimizer variable loads, and a new checkpoint has exactly
    # the same entries.
    import shutil
    import warnings

    trainer_lib = _load("trainer")
    source = os.path.join(
        ROOT,
        "training",
        "checkpoints",
        "6x64_e10_p4_100ep_s0",
        "latest.weights.h5",
    )
    checkpoint = str(tmp_path / "latest.weights.h5")
    shutil.copy(source, checkpoint)
    model = kmm.MobileVMoE.from_preset(
        "6x64_e10",
        load_weights=False,
        num_classes=100,
        image_shape=(32, 32, 3),
        patch_size=4,
        routing="learned",
    )
    model.preprocessor = None
    trainer = trainer_lib.Trainer(model)
    # train.py's learning rate is a schedule (not an optimizer variable).
    schedule = keras.optimizers.schedules.CosineDecay(1e-3, 10)
    trainer.compile(
        optimizer=keras.optimizers.AdamW(schedule),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
    )
    trainer.optimizer.build(trainer.trainable_variables)
    saved = h5_paths(checkpoint)
    if keras.config.backend() == "jax":
        # cpu_runs.sh trains on JAX; optimizer variables are stored by
        # index, in the order of the backend that wrote them.
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a skipped variable warns
            trainer.load_weights(checkpoint)
        head = model.get_layer("predictions").kernel
        import h5py

        with h5py.File(checkpoint, "r") as f:
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(head),
                f["layers/functional/layers/dense/vars/0"][()],
            )
    rewritten = str(tmp_path / "rewritten.weights.h5")
    trainer.save_weights(rewritten)
    written = h5_paths(rewritten)
    assert sorted(written) == sorted(saved)
    if keras.config.backend() == "jax":
        assert written == saved  # the same shapes at the same indices


@pytest.mark.only_on(
    "tensorflow",
    why=(
        "the evaluation program; a preset's predictions are tested on "
        "every backend"
    ),
)
def test_evaluate_records_the_test_accuracy_of_a_preset(smoke_run, tmp_path):
    workdir, _ = smoke_run
    with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
        trained = json.load(f)
    results = tmp_path / "results.json"
    results.write_text(json.dumps(trained))
    stdout = run_program(
        os.path.join(ROOT, "training", "evaluate.py"),
        f"--preset_dir={os.path.join(workdir, 'preset')}",
        "--data=fixture",
        f"--results={results}",
    )
    updated = json.loads(results.read_text())
    # The preset through its own image converter scores what train.py's
    # in-graph resize scored on the same 200 test images.
    assert updated["test_top1"] == pytest.approx(trained["test_top1"])
    assert updated["test_router_accuracy"] == pytest.approx(
        trained["test_router_accuracy"]
    )
    assert updated["test_at_training"]["test_top1"] == trained["test_top1"]
    assert updated["test_evaluation"]["test_images"] == 200
    assert "test top-1" in stdout


@pytest.mark.only_on(
    "torch",
    why=(
        "the publishing program's files; loading presets is tested on "
        "every backend (test_presets_hub.py)"
    ),
)
def test_publish_preset_stores_compact_weights_and_a_registry_entry(
    smoke_run, tmp_path
):
    import h5py

    from keras_mobile_moe import preset_registry

    workdir, _ = smoke_run
    run_program(
        os.path.join(ROOT, "scripts", "publish_preset.py"),
        f"--preset_dir={os.path.join(workdir, 'preset')}",
        "--name=6x64_e4_fixture",
        f"--results={os.path.join(workdir, 'results.json')}",
        f"--presets_dir={tmp_path}",
    )
    entry = json.loads((tmp_path / "6x64_e4_fixture.json").read_text())
    preset_registry.validate_entry(entry, "test")
    assert entry["weights"] == "6x64_e4_fixture"
    assert entry["backbone"]["num_experts"] == 4
    assert len(entry["task"]["superclass_ids"]) == 100
    with h5py.File(tmp_path / "6x64_e4_fixture" / "model.weights.h5") as f:
        dtypes = set()
        f.visititems(
            lambda _, item: (
                dtypes.add(item.dtype)
                if isinstance(item, h5py.Dataset) and item.size > 1
                else None
            )
        )
    assert dtypes == {np.dtype("float16")}
    original = kmm.MobileVMoE.from_preset(os.path.join(workdir, "preset"))
    compact = kmm.MobileVMoE.from_preset(str(tmp_path / "6x64_e4_fixture"))
    assert entry["params"] == compact.count_params()
    images = kmm.datasets.cifar100.load_fixture()["x_test"][:32]
    np.testing.assert_allclose(
        compact.predict(images, verbose=0),
        original.predict(images, verbose=0),
        atol=0.05,
    )


MONE_ARGS = [*TINY_TRAIN_ARGS, "--epochs=1"]


@pytest.mark.only_on(
    "torch",
    why=(
        "the CLI's MoNE options; adaptive-budget training itself is "
        "tested on every backend (test_mone.py)"
    ),
)
def test_mone_trains_adaptive_budgets_and_reports_the_budget_curve(tmp_path):
    from keras_mobile_moe.models.mone.mone_image_classifier import (
        ADAPTIVE_BUDGETS,
    )

    workdir = str(tmp_path / "mone")
    stdout = run_program(
        TRAIN,
        "--preset=6x64_mone",
        *MONE_ARGS,
        "--max_steps_per_epoch=6",
        "--training_budgets=adaptive",
        f"--workdir={workdir}",
    )
    assert "capacity budget 0.2: test top-1" in stdout
    with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    assert results["arch"]["family"] == "mone"
    assert results["arch"]["training_budgets"] == "adaptive"
    assert results["arch"]["capacity_budget"] == 0.5
    assert not results["arch"]["is_moe"]
    # Every training step ran at a drawn budget (the Trainer dispatched it),
    # and not all at one.
    steps = results["training_budget_steps"]
    assert sum(steps.values()) == 6
    assert {float(b) for b in steps} <= set(ADAPTIVE_BUDGETS)
    assert len(steps) > 1
    curve = results["budget_curve"]
    assert [p["capacity_budget"] for p in curve] == [
        0.2,
        0.3,
        0.4,
        0.5,
        0.6,
        0.7,
        0.8,
        0.9,
        1.0,
    ]
    flops = [p["flops"] for p in curve]
    assert flops == sorted(flops) and flops[0] < flops[-1]
    at_half = curve[3]
    assert at_half["flops"] == results["flops"]
    assert at_half["test_top1"] == results["test_top1"]
    assert all(0.0 <= p["test_top1"] <= 1.0 for p in curve)
    assert results["activated_params"] == results["params"]
    assert curve[-1]["token_counts"] == [0, 0, 0, 16]

    preset = os.path.join(workdir, "preset")
    model = kmm.MoNE.from_preset(preset)
    assert model.training_budgets == "adaptive"
    assert model.capacity_budget == 0.5  # the sweep restored it
    images = kmm.datasets.cifar100.load_fixture()["x_test"][:4]
    assert model.predict(images, verbose=0).shape == (4, 100)

    # A MoNE preset directory is a MoNE (its task.json says so, not its
    # name); --training_budgets none trains at its capacity budget.
    again = str(tmp_path / "again")
    run_program(
        TRAIN,
        f"--preset={preset}",
        *MONE_ARGS,
        "--max_steps_per_epoch=1",
        "--training_budgets=none",
        f"--workdir={again}",
    )
    with open(os.path.join(again, "results.json"), encoding="utf-8") as f:
        from_dir = json.load(f)
    assert from_dir["arch"]["family"] == "mone"
    assert from_dir["training_budget_steps"] is None
    assert len(from_dir["budget_curve"]) == 9

    # The report: accuracy against budget next to the dense twin.
    results_dir = tmp_path / "results"
    results_dir.mkdir()
    (results_dir / "mone_6x64.json").write_text(json.dumps(results))
    dense = json.loads(json.dumps(results))
    dense["arch"].update(family="mobile_vmoe", num_experts=0)
    dense["arch"].pop("training_budgets")
    dense.pop("budget_curve")
    dense["test_top1"], dense["flops"] = 0.5, 2 * results["flops"]
    (results_dir / "dense_6x64.json").write_text(json.dumps(dense))
    out = str(tmp_path / "report")
    run_program(
        os.path.join(ROOT, "training", "make_cifar100_report.py"),
        f"--results_dir={results_dir}",
        f"--out={out}",
    )
    with open(out + ".md", encoding="utf-8") as f:
        report = f.read()
    assert "## MoNE: accuracy against compute budget" in report
    assert "dense twin dense_6x64 (50.00%" in report
    row = next(
        line for line in report.splitlines() if line.startswith("| 0.5 |")
    )
    delta = 100 * (results["test_top1"] - 0.5)
    assert row.split("|")[3].strip() == f"{results['flops'] / 1e6:.2f}"
    assert row.split("|")[4].strip() == "0.50"
    assert row.split("|")[5].strip() == f"{delta:+.2f}"
    assert os.path.getsize(out + "_mone.png") > 1000
    # The MoNE run is not mistaken for a dense ViT in the dense/MoE table.
    assert "| mone_6x64 |" in report
    row = next(l for l in report.splitlines() if l.startswith("| 2x16 | 3 |"))
    assert row.split("|")[6].strip() == "50.00"  # dense top-1, not MoNE's


@pytest.mark.only_on(
    "torch",
    why=(
        "the CLI's --init_from; upcycling itself is tested on every "
        "backend (test_upcycle.py)"
    ),
)
def test_init_from_upcycles_a_trained_dense_preset(tmp_path):
    dense_dir = str(tmp_path / "dense")
    train(dense_dir, "--preset=6x64", "--epochs=1", "--max_steps_per_epoch=2")
    dense_preset = os.path.join(dense_dir, "preset")
    moe_dir = str(tmp_path / "moe")
    stdout = train(
        moe_dir,
        f"--init_from={dense_preset}",
        "--epochs=1",
        "--max_steps_per_epoch=2",
    )
    assert f"upcycled from {dense_preset}" in stdout
    with open(os.path.join(moe_dir, "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    init = results["training"]["routing"]["init_from"]
    assert init["preset"] == dense_preset
    # Normalised gates: the upcycled model starts as the dense function.
    assert init["initial_max_abs_logit_difference"] < 1e-4
    assert results["overrides"]["normalize_gates"] is True
    assert results["arch"]["num_experts"] == 4 and results["arch"]["is_moe"]
    # A dense model continues from it (the control run).
    stdout = train(
        str(tmp_path / "continued"),
        "--preset=6x64",
        f"--init_from={dense_preset}",
        "--epochs=1",
        "--max_steps_per_epoch=2",
    )
    assert f"continuing from {dense_preset}; max |logit difference" in stdout
    # A dense preset of another width is refused before training.
    result = subprocess.run(
        [
            sys.executable,
            TRAIN,
            *TINY_ARGS,
            "--override=hidden_dim=24",
            f"--init_from={dense_preset}",
            f"--workdir={tmp_path / 'bad'}",
        ],
        env=env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode != 0
    assert "hidden_dim (preset 16, model 24)" in result.stderr
