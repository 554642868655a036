"""FLOPs against the paper and XLA; the preset registry."""

import json
import re

import keras
import numpy as np
import pytest

import keras_mobile_moe as kmm
from conftest import BACKEND
from conftest import tiny_backbone
from harness import xla_flops
from keras_mobile_moe import preset_registry

# Daxberger et al. 2023, Fig. 3a (MFLOPs, patch 32, 224x224).
PAPER_MFLOPS = {
    "12x384": 2297,
    "9x384": 1752,
    "6x384": 1207,
    "12x192": 618,
    "9x192": 478,
    "6x192": 338,
    "12x96": 176,
    "9x96": 140,
    "6x96": 103,
    "12x64": 88,
    "9x64": 71,
    "6x64": 54,
}


@pytest.mark.parametrize("scale", sorted(PAPER_MFLOPS))
def test_flops_reproduce_the_paper_within_3_percent(scale):
    for name in (scale, f"{scale}_e10"):
        entry = kmm.MobileVMoE.presets[name]
        backbone = kmm.MobileVMoEBackbone(
            **preset_registry.backbone_config(entry, {})
        )
        model = kmm.MobileVMoE(backbone, num_classes=1000, compile=False)
        flops = kmm.count_flops(model)
        assert abs(flops / (PAPER_MFLOPS[scale] * 1e6) - 1) < 0.03, (
            name,
            flops,
        )
        assert flops == entry["flops"]


def test_moe_costs_the_dense_flops_plus_the_router():
    dense = kmm.count_flops(tiny_backbone(num_moe_layers=0))
    moe = kmm.count_flops(tiny_backbone())
    parts = kmm.flops_breakdown(tiny_backbone())
    # k = 1: the same MLP work; the router and the gate scaling are extra.
    assert moe - dense == parts["router"] + 2 * 17 * 32
    # k = 2: each of the 2 MoE blocks runs one more expert MLP per token
    # (and one more gate product and sum).
    top2 = kmm.flops_breakdown(tiny_backbone(top_k=2))
    block = kmm.flops.transformer_block_flops
    one_mlp = block(17, 32, 2, 64, 2)["mlp"] - block(17, 32, 2, 64, 1)["mlp"]
    assert top2["mlp"] - parts["mlp"] == 2 * (one_mlp + 2 * 17 * 32)


def test_count_flops_rejects_unknown_models():
    import keras

    with pytest.raises(ValueError, match="count_flops does not know"):
        kmm.count_flops(keras.Sequential([keras.layers.Dense(2)]))


@pytest.mark.skipif(BACKEND != "jax", reason="XLA cost analysis is JAX's")
@pytest.mark.parametrize(
    "overrides",
    [
        {"num_moe_layers": 0},
        {},
        {"top_k": 2, "router_pooling": "mean"},
        {"use_class_token": False, "router_pooling": "mean"},
    ],
    ids=["dense", "moe", "moe_top2_mean", "no_class_token"],
)
def test_flops_match_xla_cost_analysis(overrides):
    model = kmm.MobileVMoE(
        tiny_backbone(**overrides), num_classes=10, pooling="avg", compile=False
    )
    xla = xla_flops(model, (32, 32, 3))
    ours = kmm.count_flops(model)
    assert abs(ours / xla - 1) < 0.05, (ours, xla)


@pytest.mark.skipif(BACKEND != "jax", reason="XLA cost analysis is JAX's")
def test_paper_scale_flops_match_xla_cost_analysis():
    model = kmm.MobileVMoE.from_preset("6x64_e10", load_weights=False)
    xla = xla_flops(model, (224, 224, 3))
    assert abs(kmm.count_flops(model) / xla - 1) < 0.05


# --- presets --------------------------------------------------------------


def test_every_paper_scale_has_dense_and_moe_presets_and_aliases():
    names = set(kmm.MobileVMoE.presets)
    for layers in (12, 9, 6):
        for width in (384, 192, 96, 64):
            assert {f"{layers}x{width}", f"{layers}x{width}_e10"} <= names
    assert {"tiny", "tiny_e10", "small", "small_e10"} <= names
    assert kmm.MobileVMoE.presets["tiny_e10"]["variant"] == "12x192"
    assert (
        kmm.MobileVMoEBackbone.presets.keys() == kmm.MobileVMoE.presets.keys()
    )


def test_preset_files_are_valid_and_match_the_variant_table():
    for path in preset_registry.presets_dir().glob("*.json"):
        entry = json.loads(path.read_text())
        assert path.stem == entry["name"]
        config = preset_registry.backbone_config(entry, {})
        assert (
            config["num_heads"]
            == {384: 6, 192: 3, 96: 3, 64: 2}[config["hidden_dim"]]
        )
        assert config["mlp_dim"] == 4 * config["hidden_dim"]
        assert config["patch_size"] == 32
        if entry["family"] == "mone":
            assert entry["name"].endswith("_mone")
            assert config["num_nested_experts"] == 4
            continue
        # "6x64", "6x64.cifar100": dense; "6x64_e10", "6x64_e20_cifar100":
        # E=10 / E=20 experts in the last 2 blocks.
        experts = re.fullmatch(
            r"\d+x\d+(?:_e(\d+))?(?:[._][a-z0-9_]+)?", entry["name"]
        )
        assert experts, entry["name"]
        num_experts = int(experts.group(1) or 0)
        assert config["num_moe_layers"] == (2 if num_experts else 0)
        assert config["num_experts"] == num_experts


@pytest.mark.parametrize("name", ["6x64", "6x64_e10", "12x64_e10", "6x96_e10"])
def test_small_presets_build_with_the_registered_params(name):
    model = kmm.MobileVMoE.from_preset(name, load_weights=False)
    entry = kmm.MobileVMoE.presets[name]
    assert model.count_params() == entry["params"]
    assert kmm.count_flops(model) == entry["flops"]


def test_tiny_e10_builds_and_counts_618_mflops():
    model = kmm.MobileVMoE.from_preset("tiny_e10", load_weights=False)
    assert model.backbone.num_experts == 10 and model.backbone.top_k == 1
    assert model.backbone.num_moe_layers == 2 and model.num_classes == 1000
    assert abs(kmm.count_flops(model) / 618e6 - 1) < 0.03
    backbone = kmm.MobileVMoEBackbone.from_preset(
        "tiny_e10", load_weights=False
    )
    assert backbone.count_params() == model.backbone.count_params()


def test_from_preset_overrides_backbone_and_head_arguments():
    model = kmm.MobileVMoE.from_preset(
        "6x64_e10",
        load_weights=False,
        num_classes=7,
        image_shape=(64, 64, 3),
        top_k=2,
    )
    assert model.num_classes == 7 and model.backbone.top_k == 2
    assert model.backbone.image_shape == (64, 64, 3)


def test_unknown_preset_lists_close_matches_and_accepted_forms():
    with pytest.raises(
        ValueError, match=r"Did you mean \[.*'tiny_e10'"
    ) as info:
        kmm.MobileVMoE.from_preset("tiny_e1O", load_weights=False)
    assert "hf://" in str(info.value) and "directory" in str(info.value)


def test_preset_without_weights_says_so_and_lists_the_trained_ones():
    with pytest.raises(
        ValueError, match="has no published weights yet"
    ) as info:
        kmm.MobileVMoE.from_preset("tiny_e10")
    assert "'6x64_e10.cifar100'" in str(info.value)
    assert "load_weights=False" in str(info.value)


def test_architecture_name_loads_its_trained_tag():
    # timm's `architecture.tag`: the plain name with weights is the best
    # trained tag; load_weights=False is the untrained architecture.
    model = kmm.MobileVMoE.from_preset("6x64_e10")
    tagged = kmm.MobileVMoE.from_preset("6x64_e10.cifar100")
    old_name = kmm.MobileVMoE.from_preset("6x64_e10_cifar100")
    assert (
        model.num_classes == tagged.num_classes == old_name.num_classes == 100
    )
    for a, b, c in zip(model.weights, tagged.weights, old_name.weights):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b)
        )
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(c)
        )
    assert (
        kmm.MobileVMoE.from_preset("6x64_e10", load_weights=False).num_classes
        == 1000
    )
    backbone = kmm.MobileVMoEBackbone.from_preset("6x64_e10")
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(backbone.weights[0]),
        keras.ops.convert_to_numpy(tagged.backbone.weights[0]),
    )


def test_tags_are_reachable_through_the_architecture_aliases():
    registry = preset_registry.load_registry()
    for name, entry in registry.items():
        architecture, dot, tag = entry["name"].partition(".")
        if not dot:
            continue
        for alias in registry[architecture].get("aliases", []):
            assert registry[f"{alias}.{tag}"] is entry


def test_compile_auto_learning_rate_follows_where_the_weights_came_from():
    def learning_rate(model):
        model.compile()
        return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))

    scratch = kmm.MobileVMoE.from_preset("6x64_e10", load_weights=False)
    pretrained = kmm.MobileVMoE.from_preset("6x64_e10.cifar100")
    new_head = kmm.MobileVMoE.from_preset(
        "6x64_e10.cifar100",
        num_classes=20,
        superclass_ids=[c % 10 for c in range(20)],
    )
    mone = kmm.MoNE.from_preset("6x64_mone", load_weights=False)
    assert learning_rate(scratch) == pytest.approx(3e-4)
    assert learning_rate(pretrained) == pytest.approx(3e-5)
    assert learning_rate(new_head) == pytest.approx(1e-4)
    assert learning_rate(mone) == pytest.approx(3e-4)


def test_compile_auto_metrics_follow_the_label_form_of_the_loss():
    # Dense: the router loss of a Mobile V-MoE reads class ids.
    model = kmm.MobileVMoE.from_preset(
        "6x64", load_weights=False, num_classes=10, image_shape=(32, 32, 3)
    )
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3))
    labels = np.arange(8) % 10
    want = np.mean(np.argmax(model.predict(images, verbose=0), -1) == labels)
    onehot = np.eye(10, dtype="float32")[labels]
    for loss, targets in [
        ("auto", labels),
        (keras.losses.CategoricalCrossentropy(from_logits=True), onehot),
    ]:
        model.compile(loss=loss)
        result = model.evaluate(images, targets, verbose=0, return_dict=True)
        assert result["accuracy"] == pytest.approx(want)
