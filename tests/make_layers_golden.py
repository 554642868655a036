"""Writes tests/data/layers_golden.npz: block outputs computed the old way.

Run once, on JAX, at commit 5127087 (before issue 17 replaced the blocks'
hand-written attention, Keras `MultiHeadAttention` calls and per-call work
with fused `ops.dot_product_attention` and precomputed constants):

    KERAS_BACKEND=jax python tests/make_layers_golden.py

The file holds, for every case of `CASES`, random weights (keyed by
variable path), the inputs and the float32 outputs of that code.
tests/test_layers_golden.py rebuilds the same layers from today's code,
loads the weights and requires the outputs to match within 1e-5 on every
backend. Do not re-run it on newer code: that would compare the new code
with itself.
"""

import pathlib

import keras
import numpy as np

from keras_mobile_moe import layers

OUT = pathlib.Path(__file__).parent / "data" / "layers_golden.npz"


def _tokens(rng, batch, num_tokens, width):
    return rng.normal(size=(batch, num_tokens, width)).astype("float32")


def cases():
    """name -> (layer factory, inputs factory(rng) -> list of arrays)."""
    return {
        "dense_block": (
            lambda: layers.TransformerEncoderBlock(
                hidden_dim=32, num_heads=4, mlp_dim=64, name="dense_block"
            ),
            lambda rng: [_tokens(rng, 3, 17, 32)],
        ),
        "dense_block_exact_gelu": (
            lambda: layers.TransformerEncoderBlock(
                hidden_dim=48,
                num_heads=3,
                mlp_dim=96,
                mlp_activation="gelu",
                layer_norm_epsilon=1e-5,
                name="dense_block_exact_gelu",
            ),
            lambda rng: [_tokens(rng, 2, 10, 48)],
        ),
        "image_moe_block_top2": (
            lambda: layers.TransformerEncoderBlock(
                hidden_dim=32,
                num_heads=2,
                mlp_dim=64,
                num_experts=4,
                top_k=2,
                normalize_gates=True,
                name="image_moe_block_top2",
            ),
            lambda rng: [
                _tokens(rng, 3, 17, 32),
                np.array([[0, 3], [3, 1], [2, 0]], "int32"),
                rng.uniform(0.1, 0.9, size=(3, 2)).astype("float32"),
            ],
        ),
        "image_moe_block_top1": (
            lambda: layers.TransformerEncoderBlock(
                hidden_dim=32,
                num_heads=2,
                mlp_dim=64,
                num_experts=4,
                top_k=1,
                name="image_moe_block_top1",
            ),
            lambda rng: [
                _tokens(rng, 12, 17, 32),  # > 8 rows: JAX's XLA:CPU scan path
                rng.integers(0, 4, size=(12, 1)).astype("int32"),
                rng.uniform(0.1, 0.9, size=(12, 1)).astype("float32"),
            ],
        ),
        "token_moe_block_top2": (
            lambda: layers.TransformerEncoderBlock(
                hidden_dim=32,
                num_heads=2,
                mlp_dim=64,
                num_experts=4,
                top_k=2,
                router_type="token",
                capacity_factor=1.0,
                name="token_moe_block_top2",
            ),
            lambda rng: [_tokens(rng, 3, 17, 32)],
        ),
        "nested_block_budget_half": (
            lambda: layers.NestedExpertBlock(
                hidden_dim=32,
                num_heads=4,
                mlp_dim=64,
                num_nested_experts=4,
                capacity_budget=0.5,
                name="nested_block_budget_half",
            ),
            lambda rng: [
                _tokens(rng, 3, 17, 32),
                rng.uniform(0.0, 1.0, size=(3, 17)).astype("float32"),
            ],
        ),
        "nested_block_full_no_gates": (
            lambda: layers.NestedExpertBlock(
                hidden_dim=32,
                num_heads=2,
                mlp_dim=64,
                num_nested_experts=4,
                capacity_budget=1.0,
                name="nested_block_full_no_gates",
            ),
            lambda rng: [_tokens(rng, 2, 17, 32)],
        ),
        "image_router": (
            lambda: layers.ImageRouter(
                num_experts=4, top_k=2, pooling="mean", name="image_router"
            ),
            lambda rng: [_tokens(rng, 3, 17, 32)],
        ),
        "patch_embedding": (
            lambda: layers.PatchEmbedding(
                hidden_dim=32, patch_size=8, name="patch_embedding"
            ),
            lambda rng: [
                rng.uniform(-1, 1, size=(10, 32, 32, 3)).astype("float32")
            ],
        ),
    }


def random_weights(layer, rng):
    """Random values for every weight (biases too: zeros would hide bugs)."""
    values = {}
    for variable in layer.weights:
        shape = tuple(variable.shape)
        if variable.path.endswith("alpha"):
            value = np.array(0.6, "float32")
        else:
            # ~unit-scale activations whatever the fan-in, so that 1e-5 is
            # a tight bound and not float32 rounding of large values.
            fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
            scale = min(0.3, 1.5 / np.sqrt(fan_in))
            value = rng.normal(scale=scale, size=shape).astype("float32")
        values[variable.path] = value
        variable.assign(value)
    return values


def main():
    assert keras.config.backend() == "jax", "generate on the JAX backend"
    payload = {}
    for index, (name, (make, make_inputs)) in enumerate(cases().items()):
        rng = np.random.default_rng(100 + index)
        layer = make()
        inputs = make_inputs(rng)
        layer(*inputs)  # build
        for path, value in random_weights(layer, rng).items():
            payload[f"{name}/weight/{path}"] = value
        for i, value in enumerate(inputs):
            payload[f"{name}/input_{i}"] = value
        outputs = layer(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        for i, value in enumerate(outputs):
            payload[f"{name}/output_{i}"] = np.asarray(value)
    np.savez_compressed(OUT, **payload)
    print(f"wrote {OUT} ({len(payload)} arrays)")


if __name__ == "__main__":
    main()
