"""Shared test helpers: tiny configs, the CIFAR-100 fixture, gradients.

Run with KERAS_BACKEND set to jax, tensorflow or torch; `make test` runs all
three.
"""

import keras
import numpy as np
import pytest

import keras_mobile_moe as kmm

BACKEND = keras.config.backend()

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
