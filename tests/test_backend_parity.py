"""The same weights give the same outputs on JAX, TensorFlow and PyTorch.

The reference outputs in tests/data/mobile_vmoe_golden.npz were computed on
JAX by scripts/make_golden.py; every backend must match them to 1e-4.
"""

import pathlib

import numpy as np
import pytest

import keras_mobile_moe as kmm
from conftest import TINY
from conftest import to_numpy

GOLDEN = pathlib.Path(__file__).parent / "data" / "mobile_vmoe_golden.npz"
CASES = {
    "top1_token": {},
    "top2_mean_normalized": {
        "top_k": 2,
        "router_pooling": "mean",
        "normalize_gates": True,
    },
}


def build(name):
    backbone = kmm.MobileVMoEBackbone(
        **{**TINY, **CASES[name]}, name="backbone"
    )
    return kmm.MobileVMoE(
        backbone, num_classes=10, routing="learned", name="classifier"
    )


def weight_key(name, variable):
    # Paths, not get_weights() order: the tracking order differs by backend.
    return f"{name}/weight/{variable.path}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_outputs_match_the_reference_backend(name):
    golden = np.load(GOLDEN)
    model = build(name)
    stored = {k for k in golden.files if k.startswith(f"{name}/weight/")}
    keys = [weight_key(name, v) for v in model.weights]
    assert set(keys) == stored
    for variable, key in zip(model.weights, keys):
        variable.assign(golden[key])
    images = golden["images"]
    assert len(set(np.argmax(golden[f"{name}/router_logits"], -1))) > 1
    np.testing.assert_allclose(
        to_numpy(model.backbone(images)["router_logits"]),
        golden[f"{name}/router_logits"],
        atol=1e-4,
    )
    np.testing.assert_allclose(
        to_numpy(model(images)), golden[f"{name}/logits"], atol=1e-4
    )
