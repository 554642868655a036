"""Soft targets (one-hot, Mixup/CutMix mixtures) in the router loss and in
the Mobile V-MoE task's `compute_loss`, on every backend."""

import keras
import numpy as np
import pytest

import keras_mobile_moe as kmm
from conftest import fixture
from conftest import gradients
from conftest import scaled_images
from conftest import tiny_backbone
from conftest import to_numpy

# Three classes, two experts: class 0 -> expert 0, classes 1, 2 -> expert 1.
TABLE = [0, 1, 1]
PROBS = np.array([[0.25, 0.75], [0.6, 0.4]], "float32")
MIXED = np.array([[0.2, 0.5, 0.3], [0.7, 0.0, 0.3]], "float32")


def log_softmax(x):
    x = np.asarray(x, "float64")
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def test_router_loss_one_hot_equals_integer_labels_exactly():
    loss = kmm.losses.SuperclassRouterLoss(TABLE)
    logits = np.random.default_rng(0).normal(size=(6, 2)).astype("float32")
    labels = np.array([0, 1, 2, 2, 1, 0])
    sparse = to_numpy(loss(labels, logits))
    one_hot = to_numpy(loss(np.eye(3, dtype="float32")[labels], logits))
    assert sparse == one_hot


def test_router_loss_of_a_mixed_target_by_hand():
    loss = kmm.losses.SuperclassRouterLoss(TABLE)
    # Super-class targets: [0.2, 0.8] and [0.7, 0.3].
    want = (
        -(
            (0.2 * np.log(0.25) + 0.8 * np.log(0.75))
            + (0.7 * np.log(0.6) + 0.3 * np.log(0.4))
        )
        / 2
    )
    got = float(to_numpy(loss(MIXED, np.log(PROBS))))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    targets = to_numpy(loss.superclass_targets(MIXED, 2))
    np.testing.assert_allclose(targets, [[0.2, 0.8], [0.7, 0.3]], rtol=1e-6)
    smoothed = kmm.losses.SuperclassRouterLoss(TABLE, label_smoothing=0.2)
    # Smoothing mixes 0.2 of the uniform [0.5, 0.5] into the targets.
    rows = 0.8 * np.array([[0.2, 0.8], [0.7, 0.3]]) + 0.1
    want = -np.mean(np.sum(rows * np.log(PROBS), axis=-1))
    got = float(to_numpy(smoothed(MIXED, np.log(PROBS))))
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize(
    "y_true,message",
    [
        (np.ones((2, 4)) / 4, r"y_true of shape \(2, 4\).*\[batch, 3\]"),
        (np.full((2, 3), 0.5), r"y_true of shape \(2, 3\).*rows sum to 1"),
        (np.array([[1.5, -0.5, 0.0]] * 2), r"values in \[-0.5, 1.5\]"),
        (np.array([0, 3]), r"y_true of shape \(2,\).*\[0, 3\)"),
        (np.zeros((2, 3, 1)), r"y_true of shape \(2, 3, 1\)"),
        (np.array([0, 1, 2]), r"y_true of shape \(3,\).*for 2 images"),
    ],
)
def test_router_loss_rejects_bad_targets(y_true, message):
    loss = kmm.losses.SuperclassRouterLoss(TABLE)
    with pytest.raises(ValueError, match=message):
        loss(y_true, np.log(PROBS))


def test_router_loss_checks_tensor_shapes_too():
    loss = kmm.losses.SuperclassRouterLoss(TABLE)
    targets = keras.ops.convert_to_tensor(np.ones((2, 4), "float32") / 4)
    with pytest.raises(ValueError, match=r"y_true of shape \(2, 4\)"):
        loss(targets, keras.ops.convert_to_tensor(np.log(PROBS)))


def test_router_loss_gradients_are_finite_for_mixed_targets():
    router = keras.layers.Dense(2)
    features = np.random.default_rng(1).normal(size=(2, 5)).astype("float32")
    router.build(features.shape)
    loss = kmm.losses.SuperclassRouterLoss(TABLE)
    grads = gradients(router, lambda logits: loss(MIXED, logits), features)
    assert all(g is not None and np.isfinite(g).all() for g in grads)
    assert any(np.abs(g).max() > 0 for g in grads)


def soft_classifier():
    backbone = tiny_backbone(num_experts=2)
    model = kmm.MobileVMoE(
        backbone, num_classes=3, superclass_ids=TABLE, routing="superclass"
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
    )
    return model


def test_task_loss_soft_one_hot_equals_integer_labels():
    model = soft_classifier()
    x = scaled_images(fixture()["x_train"][:6])
    labels = np.array([0, 1, 2, 2, 1, 0])
    out = model(x, training=True)
    model.compile(optimizer="adam")  # the sparse default
    sparse = to_numpy(model.compute_loss(x, labels, out, training=True))
    model.compile(
        optimizer="adam",
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
    )
    one_hot = np.eye(3, dtype="float32")[labels]
    dense = to_numpy(model.compute_loss(x, one_hot, out, training=True))
    np.testing.assert_allclose(dense, sparse, rtol=1e-6)


def test_task_loss_of_a_mixed_target_by_hand():
    model = soft_classifier()
    x = scaled_images(fixture()["x_train"][:2])
    out = model(x, training=True)
    logits, router = to_numpy(out["logits"]), to_numpy(out["router_logits"])
    classes = -np.mean(np.sum(MIXED * log_softmax(logits), axis=-1))
    experts = np.array([[0.2, 0.8], [0.7, 0.3]])
    routing = -np.mean(np.sum(experts * log_softmax(router), axis=-1))
    got = float(to_numpy(model.compute_loss(x, MIXED, out, training=True)))
    np.testing.assert_allclose(got, classes + 0.3 * routing, rtol=1e-5)


def test_task_fits_mixed_targets_with_its_router_loss():
    model = soft_classifier()
    x = scaled_images(fixture()["x_train"][:8])
    y = np.roll(np.eye(3, dtype="float32")[np.arange(8) % 3], 1, axis=0)
    y = 0.6 * np.eye(3, dtype="float32")[np.arange(8) % 3] + 0.4 * y
    history = model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert np.isfinite(history.history["router_loss"]).all()
    assert 0.0 <= history.history["router_accuracy"][0] <= 1.0
    assert all(np.isfinite(to_numpy(w)).all() for w in model.weights)
    with pytest.raises(ValueError, match="rows sum to 1"):
        model.fit(x, y * 0.5, epochs=1, verbose=0)
