"""Mobile V-MoE backbone and classifier: configs, saving, training, routing,
sparse compute and argument checks."""

import keras
import numpy as np
import pytest

import keras_mobile_moe as kmm
from conftest import TINY
from conftest import fixture
from conftest import gradients
from conftest import scaled_images
from conftest import tiny_backbone
from conftest import tiny_superclass_ids
from conftest import to_numpy
from harness import assert_batch_independent
from harness import assert_finite_nonzero_gradients
from harness import run_backbone_test
from harness import run_preprocessing_test
from harness import run_task_test


def tiny_classifier(num_classes=100, **backbone_overrides):
    return kmm.MobileVMoE(
        tiny_backbone(**backbone_overrides),
        num_classes=num_classes,
        superclass_ids=tiny_superclass_ids() if num_classes == 100 else None,
    )


def images(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, size=(n, 32, 32, 3)).astype("float32")


# --- config and saving --------------------------------------------------


@pytest.mark.parametrize("moe_layers", [0, 2])
def test_backbone_harness(moe_layers, tmp_path):
    backbone = tiny_backbone(num_moe_layers=moe_layers, drop_path_rate=0.1)
    keys = (
        ("sequence_output", "router_logits")
        if moe_layers
        else ("sequence_output",)
    )
    run_backbone_test(backbone, images(), tmp_path, keys)


@pytest.mark.parametrize("moe_layers", [0, 2])
def test_classifier_harness(moe_layers, tmp_path):
    model = tiny_classifier(num_moe_layers=moe_layers)
    loaded = run_task_test(
        model, images(), tmp_path, kmm.MobileVMoEImageClassifier
    )
    assert loaded.superclass_ids == model.superclass_ids


def test_preprocessing_harness():
    run_preprocessing_test(
        kmm.models.MobileVMoEImageConverter,
        kmm.models.MobileVMoEImageClassifierPreprocessor,
        fixture()["x_test"][:2].astype("float32"),
    )


# --- outputs ------------------------------------------------------------


def test_outputs_in_training_and_inference():
    model = tiny_classifier()
    x = images()
    logits = model(x)
    assert tuple(logits.shape) == (4, 100)
    train_out = model(x, training=True)
    assert set(train_out) == {"logits", "router_logits"}
    assert tuple(train_out["router_logits"].shape) == (4, 4)
    dense = tiny_classifier(num_moe_layers=0)
    assert tuple(dense(x, training=True).shape) == (4, 100)


def test_preprocessor_resizes_and_scales_raw_images():
    model = kmm.MobileVMoE.from_preset(
        "6x64_e10", load_weights=False, num_classes=10, image_shape=(64, 64, 3)
    )
    raw = fixture()["x_test"][:3]  # uint8 32x32
    assert model.predict(raw, verbose=0).shape == (3, 10)


def test_dense_baseline_with_mlp_scaled_by_k():
    top_k, width = 2, TINY["mlp_dim"]
    moe = tiny_backbone(top_k=top_k)
    dense = tiny_backbone(
        num_moe_layers=0, mlp_dim=[width, top_k * width, top_k * width]
    )
    moe_flops, dense_flops = kmm.count_flops(moe), kmm.count_flops(dense)
    # The same inference FLOPs up to the router and the gates.
    assert abs(moe_flops - dense_flops) / dense_flops < 0.01
    assert [b.mlp.intermediate_dim for b in dense.encoder_blocks] == [
        64,
        128,
        128,
    ]
    config = dense.get_config()
    assert kmm.MobileVMoEBackbone.from_config(config).get_config() == config
    with pytest.raises(ValueError, match="one int per layer"):
        tiny_backbone(mlp_dim=[64, 64])


# --- training -------------------------------------------------------------


def fixture_batch(n=256):
    data = fixture()
    return scaled_images(data["x_train"][:n]), data["y_train"][:n]


def test_fit_reduces_loss_and_trains_router_on_cifar100_fixture():
    model = tiny_classifier()
    model.compile(optimizer=keras.optimizers.Adam(2e-3))
    x, y = fixture_batch(256)
    history = model.fit(x, y, batch_size=64, epochs=6, verbose=0, shuffle=False)
    loss = history.history["loss"]
    router_loss = history.history["router_loss"]
    assert loss[-1] < loss[0] - 0.2, loss
    assert router_loss[-1] < router_loss[0] - 0.05, router_loss
    assert history.history["router_accuracy"][-1] > 0.3
    results = model.evaluate(x, y, verbose=0, return_dict=True)
    assert "router_accuracy" not in results and "accuracy" in results


def test_default_compile_trains_out_of_the_box():
    model = tiny_classifier()  # compiled with defaults by the constructor
    x, y = fixture_batch(128)
    history = model.fit(x, y, batch_size=32, epochs=4, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert "router_loss" in history.history


def test_router_loss_is_added_with_its_weight():
    model = tiny_classifier()
    x, y = fixture_batch(8)
    outputs = model(x, training=False)
    train_out = model(x, training=True)
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    router = kmm.losses.SuperclassRouterLoss(model.superclass_ids)
    want = float(to_numpy(ce(y, train_out["logits"]))) + 0.3 * float(
        to_numpy(router(y, train_out["router_logits"]))
    )
    got = float(to_numpy(model.compute_loss(x, y, train_out, training=True)))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    plain = float(to_numpy(model.compute_loss(x, y, outputs, training=False)))
    np.testing.assert_allclose(
        plain, float(to_numpy(ce(y, outputs))), rtol=1e-5
    )


def test_learned_routing_trains_router_without_router_loss():
    model = kmm.MobileVMoE(tiny_backbone(), num_classes=100, routing="learned")
    x, y = fixture_batch(16)
    train_out = model(x, training=True)
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    got = float(to_numpy(model.compute_loss(x, y, train_out, training=True)))
    np.testing.assert_allclose(
        got, float(to_numpy(ce(y, train_out["logits"]))), rtol=1e-5
    )
    grads = gradients(
        model.backbone,
        lambda out: keras.ops.sum(out["sequence_output"] ** 2),
        x,
    )
    names = [v.path for v in model.backbone.trainable_variables]
    router_grads = [g for n, g in zip(names, grads) if "router" in n]
    assert router_grads and all(np.abs(g).sum() > 0 for g in router_grads)


def test_superclass_routing_without_table_fails_clearly_at_fit():
    model = kmm.MobileVMoE(tiny_backbone(), num_classes=10)
    x, y = fixture_batch(8)
    with pytest.raises(ValueError, match="superclass_ids"):
        model.fit(x, y % 10, epochs=1, verbose=0)


# --- gradients and sparse compute ------------------------------------------


def router_reaching_every_expert(backbone, x):
    """Sets a router kernel under which the batch reaches every expert."""
    dense = backbone.router.dense
    for seed in range(50):
        kernel = np.random.default_rng(seed).normal(size=dense.kernel.shape)
        dense.kernel.assign(50.0 * kernel.astype("float32"))
        logits = to_numpy(backbone(x)["router_logits"])
        chosen = np.argmax(logits, axis=-1)
        if set(chosen) == set(range(backbone.num_experts)):
            return chosen
    raise AssertionError(f"no router kernel reached every expert: {chosen}")


def test_every_trainable_weight_gets_a_finite_nonzero_gradient():
    backbone = tiny_backbone(top_k=2, drop_path_rate=0.1)
    model = kmm.MobileVMoE(
        backbone, num_classes=100, superclass_ids=tiny_superclass_ids()
    )
    x = images(32)
    router_reaching_every_expert(backbone, x)
    y = np.arange(32) % 100

    def loss(out):
        return model.compute_loss(x, y, out, training=True)

    assert_finite_nonzero_gradients(model, loss, x)


def test_expert_no_image_chose_gets_zero_gradient():
    moe = kmm.layers.ImageRoutedMoE(num_experts=4, intermediate_dim=32)
    tokens = np.random.default_rng(1).normal(size=(6, 5, 16)).astype("float32")
    indices = np.array([[0], [1], [1], [3], [0], [3]], "int32")  # never 2
    gates = np.full((6, 1), 0.7, "float32")
    moe(tokens, indices, gates)  # build
    grads = gradients(
        moe, lambda out: keras.ops.sum(out**2), tokens, indices, gates
    )
    for variable, grad in zip(moe.trainable_variables, grads):
        assert np.all(grad[2] == 0), variable.path
        for used in (0, 1, 3):
            assert np.abs(grad[used]).sum() > 0, variable.path


def test_changing_one_images_expert_changes_only_that_image():
    moe = kmm.layers.ImageRoutedMoE(num_experts=4, intermediate_dim=32)
    tokens = np.random.default_rng(2).normal(size=(5, 5, 16)).astype("float32")
    gates = np.full((5, 1), 0.8, "float32")
    indices = np.array([[0], [1], [2], [3], [0]], "int32")
    before = to_numpy(moe(tokens, indices, gates))
    changed = indices.copy()
    changed[2] = 1
    after = to_numpy(moe(tokens, changed, gates))
    assert not np.allclose(after[2], before[2])
    np.testing.assert_array_equal(
        np.delete(after, 2, 0), np.delete(before, 2, 0)
    )


def test_results_do_not_depend_on_the_rest_of_the_batch():
    model = tiny_classifier()
    assert_batch_independent(model, images(8, seed=3), images(8, seed=4))


def test_no_image_is_dropped_when_all_choose_one_expert():
    backbone = tiny_backbone()
    dense = backbone.router.dense
    dense.kernel.assign(np.zeros(dense.kernel.shape, "float32"))
    dense.bias.assign(np.array([0.0, 0.0, 9.0, 0.0], "float32"))
    model = kmm.MobileVMoE(backbone, num_classes=10, routing="learned")
    x = images(16)
    assert set(np.argmax(to_numpy(backbone(x)["router_logits"]), -1)) == {2}
    batched = to_numpy(model(x))
    single = np.concatenate([to_numpy(model(x[i : i + 1])) for i in range(16)])
    np.testing.assert_allclose(batched, single, atol=1e-5)


# --- argument and input checks ---------------------------------------------


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"top_k": 5}, "top_k=5"),
        ({"num_moe_layers": 4}, "num_moe_layers=4 is larger than num_layers=3"),
        ({"num_heads": 3}, "hidden_dim=32 is not divisible by num_heads=3"),
        ({"image_shape": (30, 30, 3)}, "not divisible by patch_size=8"),
        ({"image_shape": (32, 32)}, "image_shape"),
        ({"num_experts": 0}, "num_experts=0"),
        ({"router_pooling": "token", "use_class_token": False}, "class token"),
        ({"drop_path_rate": 1.0}, "drop_path_rate=1.0"),
    ],
)
def test_bad_backbone_arguments_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_backbone(**overrides)


@pytest.mark.parametrize(
    "shape",
    [(2, 32, 32), (2, 16, 16, 3), (2, 32, 32, 1), (2, 1, 32, 32, 3)],
    ids=["rank", "size", "channels", "rank5"],
)
def test_wrong_images_raise(shape):
    model = tiny_classifier()
    # Either our check or Keras' input spec: both name the input, the shape
    # received and the shape accepted.
    message = r"images[\s\S]*32, 32, 3[\s\S]*" + ", ".join(map(str, shape))
    with pytest.raises(ValueError, match=message):
        model(np.zeros(shape, "float32"))
    with pytest.raises(ValueError, match=message):
        model.backbone(np.zeros(shape, "float32"))


@pytest.mark.parametrize(
    "table, match",
    [
        ([0, 1, 2], "3 entries but the model has num_classes=100"),
        ([4] * 100, "id 4 but there are num_experts=4"),
        ([-1] * 100, "negative id"),
    ],
)
def test_bad_superclass_tables_raise(table, match):
    with pytest.raises(ValueError, match=match):
        kmm.MobileVMoE(tiny_backbone(), num_classes=100, superclass_ids=table)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"routing": "random"}, "routing='random'"),
        ({"pooling": "max"}, "pooling='max'"),
        ({"router_loss_weight": -1.0}, "router_loss_weight=-1.0"),
        ({"num_classes": 0}, "num_classes=0"),
    ],
)
def test_bad_classifier_arguments_raise(kwargs, match):
    kwargs = {"num_classes": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        kmm.MobileVMoE(tiny_backbone(), **kwargs)


def test_learned_routing_rejects_renormalised_single_gate():
    with pytest.raises(ValueError, match="normalize_gates=False"):
        kmm.MobileVMoE(
            tiny_backbone(normalize_gates=True),
            num_classes=10,
            routing="learned",
        )


def test_fit_shuffles_arrays_sorted_by_class():
    # keras-hub's Task.fit ignores shuffle=True for arrays; the fixture is
    # sorted by class, so unshuffled batches would hold 1-2 classes each.
    model = tiny_classifier()
    x, y = fixture_batch(256)
    assert np.all(np.diff(y) >= 0)
    batch = next(iter(model._batches(x, y, None, 64, shuffle=True)))
    assert len(set(np.asarray(batch[1]).tolist())) > 20
    history = model.fit(
        x, y, batch_size=64, epochs=1, verbose=0, validation_split=0.25
    )
    assert "val_loss" in history.history
