"""Mixed precision in every layer (issue 17, item 3).

Under `mixed_float16` / `mixed_bfloat16` every layer keeps float32 weights
and returns its compute dtype, except on purpose: the routers' logits,
probabilities and gates stay float32 (a softmax over experts in half
precision can tie or flip the top-k choice, house rule 8), and so does the
token-routed MoE's load-balancing loss. Outputs stay finite and close to
the float32 layer with the same weights, and every weight gets a finite
gradient.
"""

import keras
import numpy as np
import pytest

from conftest import gradients
from conftest import to_numpy
from keras_mobile_moe import layers

RNG = np.random.default_rng(7)
TOKENS = RNG.normal(size=(2, 17, 32)).astype("float32")
IMAGES = RNG.uniform(-1, 1, size=(2, 32, 32, 3)).astype("float32")
INDICES = np.array([[0, 3], [2, 1]], "int32")
GATES = np.array([[0.6, 0.3], [0.5, 0.4]], "float32")
NESTED_GATES = RNG.uniform(0, 1, size=(2, 17)).astype("float32")

# name -> (factory(dtype), inputs, indices of outputs kept in float32)
CASES = {
    "dense_block": (
        lambda d: layers.TransformerEncoderBlock(32, 2, 64, dtype=d),
        [TOKENS],
        (),
    ),
    "image_moe_block": (
        lambda d: layers.TransformerEncoderBlock(
            32, 2, 64, num_experts=4, top_k=2, dtype=d
        ),
        [TOKENS, INDICES, GATES],
        (),
    ),
    "token_moe_block": (
        lambda d: layers.TransformerEncoderBlock(
            32, 2, 64, num_experts=4, top_k=2, router_type="token", dtype=d
        ),
        [TOKENS],
        (),
    ),
    "nested_block": (
        lambda d: layers.NestedExpertBlock(
            32, 2, 64, capacity_budget=0.5, dtype=d
        ),
        [TOKENS, NESTED_GATES],
        (),
    ),
    "image_routed_moe": (
        lambda d: layers.ImageRoutedMoE(4, 64, top_k=2, dtype=d),
        [TOKENS, INDICES, GATES],
        (),
    ),
    "token_routed_moe": (
        lambda d: layers.TokenRoutedMoE(4, 64, top_k=2, dtype=d),
        [TOKENS],
        (),
    ),
    "mlp": (lambda d: layers.MLP(64, dtype=d), [TOKENS], ()),
    "patch_embedding": (
        lambda d: layers.PatchEmbedding(32, 8, dtype=d),
        [IMAGES],
        (),
    ),
    # Routers: logits / probabilities / gates in float32 on purpose; the
    # indices (and MoNE's permutations) are int32.
    "image_router": (
        lambda d: layers.ImageRouter(4, 2, dtype=d),
        [TOKENS],
        (0, 1, 2),
    ),
    "nested_router": (
        lambda d: layers.NestedExpertRouter(4, 0.5, dtype=d),
        [TOKENS],
        (0, 1, 2, 3, 4),
    ),
}
POLICIES = {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}


def _outputs(layer, inputs, **kwargs):
    out = layer(*inputs, **kwargs)
    return out if isinstance(out, tuple) else (out,)


def _dtype(x):
    return keras.backend.standardize_dtype(x.dtype)


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("name", sorted(CASES))
def test_layer_computes_in_the_policy_dtype(name, policy):
    make, inputs, kept_float32 = CASES[name]
    reference = make("float32")
    reference_out = _outputs(reference, inputs)
    layer = make(policy)
    outputs = _outputs(layer, inputs)
    assert all(w.dtype == "float32" for w in layer.weights)
    layer.set_weights(reference.get_weights())
    outputs = _outputs(layer, inputs)
    # bfloat16 keeps 8 bits of mantissa: ~1e-2 relative per op.
    atol = {"mixed_float16": 2e-2, "mixed_bfloat16": 1.5e-1}[policy]
    for i, (value, expected) in enumerate(zip(outputs, reference_out)):
        if i in kept_float32 or "int" in _dtype(expected):
            assert _dtype(value) == _dtype(expected)
        else:
            assert _dtype(value) == POLICIES[policy]
        if "float" in _dtype(value):
            value = to_numpy(value).astype("float32")
            assert np.isfinite(value).all()
            expected = to_numpy(expected)
            if name.startswith("token"):
                # A fresh token router is near uniform: a token whose top-2
                # experts are near-tied can pick another expert from its
                # half-precision input (the router itself computes in
                # float32). Such tokens may differ; at most 1 in 10.
                close = np.isclose(value, expected, atol=atol, rtol=atol)
                assert close.all(axis=-1).mean() >= 0.9
            elif not name.endswith("router") or i == 0:
                np.testing.assert_allclose(
                    value, expected, atol=atol, rtol=atol
                )


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_token_moe_loss_stays_float32(policy):
    layer = layers.TokenRoutedMoE(4, 64, top_k=2, dtype=policy)
    layer(TOKENS, training=True)
    assert [_dtype(loss) for loss in layer.losses] == ["float32"]
    assert _dtype(layer.route(TOKENS)["router_probs"]) == "float32"


@pytest.mark.parametrize(
    "name",
    ["dense_block", "image_moe_block", "token_moe_block", "nested_block"],
)
def test_blocks_get_finite_gradients_in_bfloat16(name):
    make, inputs, _ = CASES[name]
    layer = make("mixed_bfloat16")
    layer(*inputs)
    grads = gradients(
        layer,
        lambda out: keras.ops.sum(keras.ops.cast(out, "float32") ** 2),
        *inputs,
    )
    assert len(grads) == len(layer.trainable_weights)
    for variable, grad in zip(layer.trainable_weights, grads):
        assert grad is not None, variable.path
        assert np.isfinite(np.asarray(grad, "float32")).all(), variable.path
