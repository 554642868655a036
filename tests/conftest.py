"""Shared test helpers: tiny configs, the CIFAR-100 fixture, gradients.
The checks every layer, loss and model gets are in tests/harness.py.

Run with KERAS_BACKEND set to jax, tensorflow or torch; `make test` runs all
three at once (scripts/run_tests.sh).

Backend-independent tests run in one backend's session only. A test (or a
module, through `pytestmark`) marked `@pytest.mark.backend_independent`
checks something no Keras backend computes: numpy-only code (capacities,
super-class discovery, the CIFAR-100 loader), the import graph, the wheel
and the README, file I/O faults, the registered-class list, TensorFlow
subprocesses started whatever the session's backend. Running it three
times adds CI time, not coverage, so it runs in the session of
KMM_BACKEND_INDEPENDENT_ON (default torch, the shortest session) and is
skipped in the others with a reason saying where it runs. `make test` runs
every backend, so each such test runs once per CI run; a one-backend run
with another backend skips them (set KMM_BACKEND_INDEPENDENT_ON to run
them there).

A test marked `@pytest.mark.only_on("tensorflow", why="...")` (or another
backend) runs in that backend's session only: its subject does not depend
on the session's backend, but it needs one, e.g. a TFLite file's contents
(TensorFlow converts the file from the same weights whatever the session's
backend, in process only on TensorFlow), or a training CLI option whose
math the unit tests check on every backend. `why` is the skip reason the
other sessions show.
"""

import os

import keras
import numpy as np
import pytest

import keras_mobile_moe as kmm

BACKEND = keras.config.backend()
BACKEND_INDEPENDENT_ON = os.environ.get("KMM_BACKEND_INDEPENDENT_ON", "torch")

# House rule 12: tiny shapes (32x32 images, patch 8, width <= 48, 4 experts).
TINY = dict(
    image_shape=(32, 32, 3),
    patch_size=8,
    num_layers=3,
    hidden_dim=32,
    num_heads=2,
    mlp_dim=64,
    num_experts=4,
    top_k=1,
    num_moe_layers=2,
)


# training/train.py flags for a tiny run on the committed fixture (the
# training and guide tests).
TINY_TRAIN_ARGS = [
    "--data=fixture",
    "--image_size=32",
    "--patch_size=8",
    "--override=num_layers=2",
    "--override=hidden_dim=16",
    "--override=num_heads=2",
    "--override=mlp_dim=32",
    "--batch_size=32",
    "--seed=3",
    "--verbose=2",
]


def tiny_backbone(**overrides):
    return kmm.MobileVMoEBackbone(**{**TINY, **overrides})


def tiny_superclass_ids(num_experts=4):
    """CIFAR-100's fine -> coarse table folded onto `num_experts` groups."""
    data = fixture()
    coarse = kmm.datasets.cifar100.fine_to_coarse(
        data["y_train"], data["y_train_coarse"]
    )
    return (coarse * num_experts // 20).tolist()


_FIXTURE = {}


def fixture():
    if not _FIXTURE:
        _FIXTURE.update(kmm.datasets.cifar100.load_fixture())
    return _FIXTURE


def scaled_images(images):
    return images.astype("float32") / 127.5 - 1.0


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def gradients(layer, loss_fn, *args):
    """Gradients of `loss_fn(layer(*args, training=True))` w.r.t. every
    trainable variable of `layer`, as numpy arrays (None if unconnected)."""
    variables = layer.trainable_variables
    if BACKEND == "jax":
        import jax

        non_trainable = [v.value for v in layer.non_trainable_variables]

        def loss(values):
            outputs, _ = layer.stateless_call(
                values, non_trainable, *args, training=True
            )
            return loss_fn(outputs)

        grads = jax.grad(loss)([v.value for v in variables])
        return [np.asarray(g) for g in grads]
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn(layer(*args, training=True))
        grads = tape.gradient(loss, variables)
        # Gathered kernels get IndexedSlices; densify them.
        return [
            None if g is None else np.asarray(tf.convert_to_tensor(g))
            for g in grads
        ]
    if BACKEND == "torch":
        import torch

        loss = loss_fn(layer(*args, training=True))
        grads = torch.autograd.grad(
            loss, [v.value for v in variables], allow_unused=True
        )
        return [None if g is None else g.detach().cpu().numpy() for g in grads]
    raise ValueError(BACKEND)


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "backend_independent: checks no Keras backend computes; runs in the "
        "KMM_BACKEND_INDEPENDENT_ON session only (see tests/conftest.py)",
    )
    config.addinivalue_line(
        "markers",
        "only_on(backend, why): runs in that backend's session only; `why` "
        "says why the other sessions add no coverage (tests/conftest.py)",
    )


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(
        reason=f"backend-independent: runs once, in the KERAS_BACKEND="
        f"{BACKEND_INDEPENDENT_ON} session (tests/conftest.py)"
    )
    for item in items:
        only_on = item.get_closest_marker("only_on")
        if only_on is not None:
            (backend,) = only_on.args
            if backend != BACKEND:
                why = only_on.kwargs["why"]
                item.add_marker(
                    pytest.mark.skip(
                        reason=f"runs in the KERAS_BACKEND={backend} session "
                        f"only: {why} (tests/conftest.py)"
                    )
                )
        elif (
            item.get_closest_marker("backend_independent")
            and BACKEND != BACKEND_INDEPENDENT_ON
        ):
            item.add_marker(skip)
