"""Data- and expert-parallel training (`kmm.distribution`).

Keras distributions exist for the JAX backend only. The multi-device test
runs a subprocess with `KERAS_BACKEND=jax` and four virtual CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=4`, which must be set
before JAX is imported), trains the same tiny Mobile V-MoE on the CIFAR-100
fixture on 1 device, with `"data"` on 4 devices and with `"expert"` on a
2x2 mesh (2-way data x 2-way expert parallel), compares the loss curves and
the trained weights, and checks the expert weights' shardings (also on a
1x4 mesh: one expert per device). It could run from any
backend's session, but it only needs to run once: it runs in the JAX
session.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import pytest

import keras_mobile_moe as kmm
from keras_mobile_moe.distribution import make_distribution

BACKEND = keras.config.backend()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRAIN_SCRIPT = textwrap.dedent(
    """
    import json
    import sys

    import keras
    import numpy as np

    import keras_mobile_moe as kmm

    assert keras.config.backend() == "jax"
    assert len(keras.distribution.list_devices()) == 4

    def tiny_model(num_experts=4):
        backbone = kmm.models.MobileVMoEBackbone(
            image_shape=(32, 32, 3), patch_size=8, num_layers=2,
            hidden_dim=16, num_heads=2, mlp_dim=32, num_experts=num_experts,
            num_moe_layers=1)
        return kmm.MobileVMoE(
            backbone, num_classes=100,
            superclass_ids=(coarse * num_experts // 20).tolist())

    data = kmm.datasets.cifar100.load_fixture()
    coarse = kmm.datasets.cifar100.fine_to_coarse(
        data["y_train"], data["y_train_coarse"])
    order = np.random.default_rng(0).permutation(len(data["y_train"]))[:64]
    images = data["x_train"][order].astype("float32") / 127.5 - 1.0
    labels = data["y_train"][order]

    class Losses(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            curve.append(float(logs["loss"]))

    def layouts_of(model):
        layouts = {}
        for v in model.variables + model.optimizer.variables:
            # The expert weights and their Adam slots, e.g.
            # "moe_block_1/moe/kernel_in",
            # "adam/moe_block_1_moe_kernel_in_momentum".
            if any(name in v.path for name in (
                    "kernel_in", "kernel_out", "bias_in", "bias_out")):
                value = v.value
                layouts[v.path] = {
                    "shape": list(v.shape),
                    "spec": [None if a is None else str(a)
                             for a in getattr(value.sharding, "spec", ())],
                    "shard_shape": list(value.addressable_shards[0].data.shape),
                    "num_shards": len({
                        str(s.index) for s in value.addressable_shards}),
                    "replicated": bool(value.sharding.is_fully_replicated),
                }
        return layouts

    def train(distribution, epochs=2):
        keras.distribution.set_distribution(distribution)
        keras.utils.set_random_seed(0)
        model = tiny_model()
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
        model.optimizer.build(model.trainable_variables)
        initial = [np.asarray(v.value) for v in model.weights]
        global curve
        curve = []
        if epochs:
            model.fit(images, labels, batch_size=16, epochs=epochs,
                      shuffle=False, verbose=0, callbacks=[Losses()])
        weights = [np.asarray(v.value) for v in model.weights]
        keras.distribution.set_distribution(None)
        return {"curve": curve, "initial": initial, "weights": weights,
                "layouts": layouts_of(model)}

    runs = {
        "single": train(None),
        "data": train(kmm.distribution.make_distribution("data")),
        "expert_2x2": train(kmm.distribution.make_distribution(
            "expert", num_experts=2)),
        # Layouts only (no training): every device holds one expert.
        "expert_1x4": train(kmm.distribution.make_distribution("expert"),
                            epochs=0),
    }
    def max_diff(name, key):
        return max(float(np.max(np.abs(a - b))) for a, b in
                   zip(runs[name][key], runs["single"][key]))

    results = {
        name: {"curve": run["curve"], "layouts": run["layouts"],
               "max_initial_diff": max_diff(name, "initial"),
               "max_weight_diff": max_diff(name, "weights")}
        for name, run in runs.items()
    }
    results["meshes"] = {
        name: list(kmm.distribution.make_distribution(*args).device_mesh.shape)
        for name, args in [
            ("expert", ("expert",)),
            ("expert_e2", ("expert", None, "batch", "model", 2)),
            ("expert_e10", ("expert", None, "batch", "model", 10)),
            ("expert_m1", ("expert", None, "batch", "model", None, 1)),
        ]
    }
    # Three experts cannot be split over a model axis of 4 devices.
    keras.distribution.set_distribution(
        kmm.distribution.make_distribution("expert"))
    try:
        tiny_model(num_experts=3)
    except ValueError as error:
        results["indivisible_error"] = str(error)
    keras.distribution.set_distribution(None)
    print("RESULTS " + json.dumps(results))
    """
)


@pytest.mark.skipif(
    BACKEND != "jax",
    reason="runs its own KERAS_BACKEND=jax subprocess; run once, in the JAX "
    "session, to save CI time",
)
def test_data_and_expert_parallel_training_match_one_device():
    env = dict(os.environ)
    env.update(
        KERAS_BACKEND="jax",
        # First: XLA stops reading flags at a token it does not parse (the
        # "intra_op_parallelism_threads=1" that single-thread recipes, and
        # scripts/run_tests.sh, pass), and the device count would be lost.
        XLA_FLAGS=(
            "--xla_force_host_platform_device_count=4 "
            + env.get("XLA_FLAGS", "")
        ).strip(),
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
    )
    process = subprocess.run(
        [sys.executable, "-c", TRAIN_SCRIPT],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = [
        line
        for line in process.stdout.splitlines()
        if line.startswith("RESULTS ")
    ]
    assert process.returncode == 0 and lines, (
        process.stdout[-3000:] + process.stderr[-6000:]
    )
    results = json.loads(lines[-1][len("RESULTS ") :])

    import numpy as np

    single = results["single"]
    assert len(single["curve"]) == 8  # 2 epochs x 4 steps of 16 images
    assert np.all(np.isfinite(single["curve"]))
    for name in ("data", "expert_2x2"):
        np.testing.assert_allclose(
            results[name]["curve"],
            single["curve"],
            rtol=1e-4,
            atol=1e-5,
            err_msg=name,
        )
        # The trained weights agree too: 8 Adam steps of up to 1e-3 each;
        # seen ~1.3e-5 apart (Adam rescales the float32 rounding noise of
        # near-zero gradients).
        assert results[name]["max_weight_diff"] < 1e-4, (
            name,
            results[name]["max_weight_diff"],
        )
    # Same seed, same initial weights, however they are laid out.
    for name in ("data", "expert_2x2", "expert_1x4"):
        assert results[name]["max_initial_diff"] == 0.0, name
    assert results["expert_1x4"]["curve"] == []  # layouts only

    # Weights (and Adam slots): replicated with "data", split along the
    # expert axis with "expert".
    expert_weights = [
        p for p in results["data"]["layouts"] if p.startswith("moe_block")
    ]
    assert len(expert_weights) == 4  # kernel_in, bias_in, kernel_out, bias_out
    assert len(results["data"]["layouts"]) == 12  # + 2 Adam slots each
    for layout in results["data"]["layouts"].values():
        assert layout["replicated"]
        assert layout["shard_shape"] == layout["shape"]
    for name, model_size in (("expert_2x2", 2), ("expert_1x4", 4)):
        layouts = results[name]["layouts"]
        assert len(layouts) == 12
        for path, layout in layouts.items():
            assert layout["spec"][0] == "model", (name, path, layout)
            assert all(axis is None for axis in layout["spec"][1:])
            assert not layout["replicated"]
            assert layout["shape"][0] == 4
            assert layout["shard_shape"] == (
                [4 // model_size] + layout["shape"][1:]
            ), (name, path, layout)
            assert layout["num_shards"] == model_size

    assert results["meshes"] == {
        "expert": [1, 4],
        "expert_e2": [2, 2],
        "expert_e10": [2, 2],
        "expert_m1": [4, 1],
    }
    error = results["indivisible_error"]
    assert "has 3 experts" in error and "num_experts=E" in error, error


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(kind="model"), r"kind='model'.*\['data', 'expert'\]"),
        (dict(kind=None), r"kind=None"),
        (dict(kind="data", batch_dim_name=""), "batch_dim_name=''"),
        (dict(kind="expert", model_dim_name=3), "model_dim_name=3"),
        (
            dict(kind="expert", batch_dim_name="x", model_dim_name="x"),
            "two different",
        ),
        (dict(kind="expert", num_experts=0), "num_experts=0"),
        (dict(kind="expert", model_parallel=2.0), "model_parallel=2.0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_distribution(**kwargs)


@pytest.mark.skipif(BACKEND == "jax", reason="checks the non-JAX error")
def test_needs_jax_backend():
    with pytest.raises(RuntimeError, match=rf"'{BACKEND}'.*KERAS_BACKEND=jax"):
        make_distribution("data")


@pytest.mark.skipif(BACKEND != "jax", reason="Keras distributions need JAX")
def test_one_device_in_process():
    devices = keras.distribution.list_devices()[:1]
    data = make_distribution("data", devices=devices)
    assert isinstance(data, keras.distribution.DataParallel)
    assert data.device_mesh.shape == (1,)
    expert = make_distribution("expert", devices=devices, num_experts=10)
    assert isinstance(expert, kmm.distribution.ExpertParallel)
    assert tuple(expert.device_mesh.shape) == (1, 1)
    assert expert.device_mesh.axis_names == ["batch", "model"]
    with pytest.raises(ValueError, match="devices=\\[\\]"):
        make_distribution("data", devices=[])
    with pytest.raises(ValueError, match="devices='cpu:0'"):
        make_distribution("data", devices="cpu:0")
    with pytest.raises(ValueError, match="model_parallel=2 with 1 devices"):
        make_distribution("expert", devices=devices, model_parallel=2)
