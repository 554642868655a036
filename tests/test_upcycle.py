"""`kmm.upcycle`: a dense ViT becomes a Mobile V-MoE whose experts start as
copies of the dense MLPs (Komatsuzaki et al., ICLR 2023). Tests the exact
relation of its initial output to the dense model's. Runs on the backend in
KERAS_BACKEND."""

import keras
import numpy as np
import pytest

import keras_mobile_moe as kmm
from conftest import fixture
from conftest import scaled_images
from conftest import to_numpy

SUPERCLASSES = [0, 1, 2, 3, 0, 1]


def dense_classifier(seed=0, mlp_activation="keras_mobile_moe>gelu_tanh"):
    keras.utils.set_random_seed(seed)
    backbone = kmm.MobileVMoEBackbone(
        image_shape=(32, 32, 3),
        patch_size=8,
        num_layers=3,
        hidden_dim=32,
        num_heads=2,
        mlp_dim=64,
        num_moe_layers=0,
        num_experts=0,
        mlp_activation=mlp_activation,
    )
    model = kmm.MobileVMoE(backbone, num_classes=6)
    # Non-zero biases and norms, so that every copied tensor matters.
    rng = np.random.RandomState(seed)
    for variable in model.weights:
        value = to_numpy(variable)
        variable.assign(
            value + rng.normal(0, 0.1, value.shape).astype("float32")
        )
    return model


def images(n=16):
    return scaled_images(fixture()["x_test"][:n])


def test_upcycled_model_computes_the_dense_function_with_normalized_gates():
    dense = dense_classifier()
    moe = kmm.upcycle(
        dense, num_experts=4, num_moe_layers=2, superclass_ids=SUPERCLASSES
    )
    assert moe.backbone.num_experts == 4 and moe.backbone.num_moe_layers == 2
    assert moe.backbone.normalize_gates is True
    assert moe.superclass_ids == SUPERCLASSES
    x = images()
    want = to_numpy(dense.predict(x, verbose=0))
    got = to_numpy(moe.predict(x, verbose=0))
    assert np.abs(got - want).max() <= 1e-5
    # The images are really routed to several experts (not a trivial router).
    routed = to_numpy(moe(x, training=True)["router_logits"]).argmax(-1)
    assert len(set(routed.tolist())) > 1


def test_top_k_2_also_keeps_the_dense_function():
    dense = dense_classifier(mlp_activation="gelu")
    moe = kmm.upcycle(dense, num_experts=4, num_moe_layers=1, top_k=2)
    x = images(8)
    assert (
        np.abs(
            to_numpy(moe.predict(x, verbose=0))
            - to_numpy(dense.predict(x, verbose=0))
        ).max()
        <= 1e-5
    )


def test_without_normalized_gates_moe_blocks_scale_the_dense_mlp_by_gate():
    dense = dense_classifier()
    moe = kmm.upcycle(
        dense, num_experts=4, num_moe_layers=1, normalize_gates=False
    )
    block, dense_block = (
        moe.backbone.encoder_blocks[-1],
        dense.backbone.encoder_blocks[-1],
    )
    rng = np.random.RandomState(1)
    tokens = rng.normal(size=(5, 17, 32)).astype("float32")
    _, indices, gates = moe.backbone.router(tokens)
    got = to_numpy(block.mlp(tokens, indices, gates))
    want = to_numpy(gates)[:, 0, None, None] * to_numpy(dense_block.mlp(tokens))
    assert np.abs(got - want).max() <= 1e-5
    # so the model's output is no longer the dense one
    x = images(8)
    assert (
        np.abs(
            to_numpy(moe.predict(x, verbose=0))
            - to_numpy(dense.predict(x, verbose=0))
        ).max()
        > 1e-3
    )


def test_weights_copied_router_fresh_and_dense_model_untouched():
    dense = dense_classifier()
    before = [to_numpy(w).copy() for w in dense.weights]
    moe = kmm.upcycle(dense.backbone, num_experts=3, num_moe_layers=2)
    assert isinstance(moe, kmm.MobileVMoEBackbone)
    for old, new in zip(
        dense.backbone.encoder_blocks[1:], moe.encoder_blocks[1:]
    ):
        for e in range(3):
            np.testing.assert_array_equal(
                to_numpy(new.mlp.kernel_in)[e],
                to_numpy(old.mlp.dense_in.kernel),
            )
            np.testing.assert_array_equal(
                to_numpy(new.mlp.bias_out)[e], to_numpy(old.mlp.dense_out.bias)
            )
    np.testing.assert_array_equal(
        to_numpy(moe.encoder_blocks[0].mlp.dense_in.kernel),
        to_numpy(dense.backbone.encoder_blocks[0].mlp.dense_in.kernel),
    )
    assert moe.router is not None and np.all(
        to_numpy(moe.router.dense.bias) == 0
    )
    for old, now in zip(before, dense.weights):
        np.testing.assert_array_equal(old, to_numpy(now))
    # The upcycled backbone round-trips through its config.
    config = moe.get_config()
    assert kmm.MobileVMoEBackbone.from_config(config).get_config() == config


def test_upcycle_rejects_bad_inputs():
    dense = dense_classifier()
    moe = kmm.upcycle(dense, num_experts=2, num_moe_layers=1)
    with pytest.raises(ValueError, match="num_moe_layers=1"):
        kmm.upcycle(moe)
    with pytest.raises(ValueError, match="num_moe_layers=4"):
        kmm.upcycle(dense, num_moe_layers=4)
    with pytest.raises(ValueError, match="top_k=3"):
        kmm.upcycle(dense, num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="superclass_ids"):
        kmm.upcycle(dense.backbone, superclass_ids=[0] * 6)
    with pytest.raises(ValueError, match="Received: str"):
        kmm.upcycle("not a model")


def test_from_preset_with_experts_on_a_dense_preset_upcycles(tmp_path):
    dense = dense_classifier()
    folder = str(tmp_path / "dense")
    dense.save_to_preset(folder)
    moe = kmm.MobileVMoE.from_preset(
        folder, num_experts=4, num_moe_layers=2, superclass_ids=SUPERCLASSES
    )
    assert moe.backbone.num_moe_layers == 2 and moe.backbone.num_experts == 4
    x = images(8)
    assert (
        np.abs(
            to_numpy(moe.predict(x, verbose=0))
            - to_numpy(dense.predict(x, verbose=0))
        ).max()
        <= 1e-5
    )
    backbone = kmm.MobileVMoEBackbone.from_preset(
        folder, num_experts=2, num_moe_layers=1
    )
    assert backbone.num_moe_layers == 1


def test_upcycled_classifier_fine_tunes_at_the_dense_models_rate(tmp_path):
    folder = str(tmp_path / "dense")
    dense_classifier().save_to_preset(folder)
    rates = {}
    for name, dense in (
        ("scratch", dense_classifier()),
        ("pretrained", kmm.MobileVMoE.from_preset(folder)),
        ("new_head", kmm.MobileVMoE.from_preset(folder, num_classes=6)),
    ):
        moe = kmm.upcycle(
            dense, num_experts=2, num_moe_layers=1, superclass_ids=[0, 1] * 3
        )
        assert moe.weights_source == name
        moe.compile()
        rates[name] = float(to_numpy(moe.optimizer.learning_rate))
    assert rates["scratch"] > rates["new_head"] > rates["pretrained"]
