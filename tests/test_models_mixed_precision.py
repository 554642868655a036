"""Mixed precision end to end on the models (issue 17, item 3).

`tests/test_layers_mixed_precision.py` checks each layer; this module checks
the backbones and classifiers built under `mixed_float16` /
`mixed_bfloat16`, given as `dtype=` or as the global policy: float32
weights, outputs in the compute dtype, and the documented exceptions in
float32 on purpose (the router outputs, `SuperclassRouterLoss` and the
classification loss). `fit` reduces the loss on the CIFAR-100 fixture
without NaN; under `mixed_float16`, `compile` wraps the optimizer in Keras'
`LossScaleOptimizer`. Tiny models and a few steps, on every backend.
"""

import keras
import numpy as np
import pytest

import keras_mobile_moe as kmm
from conftest import fixture
from conftest import scaled_images
from conftest import to_numpy

POLICIES = {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}
SMALL = dict(
    image_shape=(32, 32, 3),
    patch_size=8,
    num_layers=2,
    hidden_dim=32,
    num_heads=2,
    mlp_dim=64,
)
# Backbone outputs that stay float32 under every policy (the routers'
# logits / probabilities), by family.
FLOAT32_OUTPUTS = {"moe": ("router_logits",), "mone": ("router_probs",)}


def _classifier(family, num_classes=4, superclass_ids=None, dtype=None):
    if family == "mone":
        backbone = kmm.MoNEBackbone(**SMALL, capacity_budget=0.5, dtype=dtype)
        return kmm.MoNE(backbone, num_classes=num_classes)
    backbone = kmm.MobileVMoEBackbone(
        **SMALL, num_experts=4, num_moe_layers=1, dtype=dtype
    )
    return kmm.MobileVMoE(
        backbone,
        num_classes=num_classes,
        superclass_ids=superclass_ids or [0, 1, 2, 3][:num_classes],
    )


def _dtype(x):
    return keras.backend.standardize_dtype(x.dtype)


@pytest.fixture
def global_policy():
    """Sets the global dtype policy for one test, then float32 again."""
    yield keras.config.set_dtype_policy
    keras.config.set_dtype_policy("float32")


@pytest.mark.parametrize("given_as", ["argument", "global"])
@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("family", ["moe", "mone"])
def test_models_compute_in_the_policy_dtype(
    family, policy, given_as, global_policy
):
    if given_as == "global":
        global_policy(policy)
        model = _classifier(family)
    else:
        model = _classifier(family, dtype=policy)
    compute = POLICIES[policy]
    assert model.dtype_policy.name == policy
    assert model.backbone.dtype_policy.name == policy
    assert all(w.dtype == "float32" for w in model.weights)
    images = scaled_images(fixture()["x_test"][:2])

    outputs = model.backbone(images)
    for key, value in outputs.items():
        if key in FLOAT32_OUTPUTS[family]:
            assert _dtype(value) == "float32", key
        elif "float" in _dtype(value):
            assert _dtype(value) == compute, key
        assert np.isfinite(to_numpy(value).astype("float32")).all(), key
    assert _dtype(model(images)) == compute
    if family == "moe":
        train_outputs = model(images, training=True)
        assert _dtype(train_outputs["logits"]) == compute
        assert _dtype(train_outputs["router_logits"]) == "float32"

    # Every layer computes in the policy's dtype but the routers' own.
    routers = (kmm.layers.ImageRouter, kmm.layers.NestedExpertRouter)
    router_parts = {
        id(sub)
        for layer in model._flatten_layers()
        if isinstance(layer, routers)
        for sub in layer._flatten_layers(include_self=False)
    }
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.InputLayer):
            continue
        expected = "float32" if id(layer) in router_parts else compute
        assert layer.compute_dtype == expected, layer.name
    assert router_parts


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_losses_stay_float32(policy):
    model = _classifier("moe", dtype=policy)
    images = scaled_images(fixture()["x_test"][:4])
    labels = np.array([0, 1, 2, 3])
    y_pred = model(images, training=True)
    # The classification loss and SuperclassRouterLoss: float32 on half
    # precision logits (a float16 cross-entropy overflows / underflows).
    half_logits = keras.ops.cast(y_pred["router_logits"], POLICIES[policy])
    assert _dtype(model.router_loss(labels, half_logits)) == "float32"
    model.compile()
    loss = model.compute_loss(images, labels, y_pred, training=True)
    assert _dtype(loss) == "float32"
    assert np.isfinite(float(to_numpy(loss)))


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("family", ["moe", "mone"])
def test_fit_reduces_the_loss_under_mixed_precision(family, policy):
    data = fixture()
    # The fixture is sorted by class: its first 80 images are classes 0-9.
    images = scaled_images(data["x_train"][:80])
    labels = data["y_train"][:80]
    assert sorted(set(labels.tolist())) == list(range(10))
    superclass_ids = [c % 4 for c in range(10)]
    model = _classifier(
        family, num_classes=10, superclass_ids=superclass_ids, dtype=policy
    )
    model.compile(optimizer=keras.optimizers.Adam(2e-3))
    scaled = isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    # Keras' loss scaling keeps float16 gradients from underflowing; bfloat16
    # has float32's exponent range and needs none.
    assert scaled == (policy == "mixed_float16")
    # The epochs' mean training losses (classification, plus the router
    # loss for Mobile V-MoE): no evaluate step to compile (CI time).
    history = model.fit(images, labels, batch_size=16, epochs=3, verbose=0)
    losses = history.history["loss"]
    assert np.isfinite(losses).all(), losses
    assert losses[-1] < losses[0], losses
    assert all(np.isfinite(to_numpy(w)).all() for w in model.trainable_weights)
