"""Layers: config round trips, .keras save/load, numerics against numpy."""

import keras
import numpy as np
import pytest

import keras_mobile_moe as kmm
from conftest import gradients
from conftest import to_numpy
from harness import run_layer_test
from harness import run_loss_test
from harness import run_serialization_test
from keras_mobile_moe import layers
from keras_mobile_moe.layers import xla_cpu
from keras_mobile_moe.layers.activations import gelu_tanh

RNG = np.random.default_rng(0)
TOKENS = RNG.normal(size=(3, 5, 16)).astype("float32")
INDICES = np.array([[0], [3], [3]], "int32")
GATES = np.array([[0.5], [0.9], [0.2]], "float32")


def images():
    return RNG.normal(size=(2, 32, 32, 3)).astype("float32")


# name -> (layer factory, example inputs as keras.Input specs + arrays)
CASES = {
    "patch_embedding": (
        lambda: layers.PatchEmbedding(hidden_dim=16, patch_size=8),
        lambda: [images()],
    ),
    "patch_embedding_no_class_token": (
        lambda: layers.PatchEmbedding(16, 8, use_class_token=False),
        lambda: [images()],
    ),
    "mlp": (lambda: layers.MLP(intermediate_dim=32), lambda: [TOKENS]),
    "drop_path": (lambda: layers.DropPath(rate=0.1), lambda: [TOKENS]),
    "router": (
        lambda: layers.ImageRouter(num_experts=4, top_k=2, pooling="mean"),
        lambda: [TOKENS],
    ),
    "moe": (
        lambda: layers.ImageRoutedMoE(num_experts=4, intermediate_dim=32),
        lambda: [TOKENS, INDICES, GATES],
    ),
    "moe_top2": (
        lambda: layers.ImageRoutedMoE(
            num_experts=4, intermediate_dim=32, top_k=2, normalize_gates=True
        ),
        lambda: [
            TOKENS,
            np.array([[0, 1], [3, 2], [1, 3]], "int32"),
            np.array([[0.5, 0.2], [0.6, 0.3], [0.2, 0.1]], "float32"),
        ],
    ),
    "dense_block": (
        lambda: layers.TransformerEncoderBlock(16, 2, 32, drop_path_rate=0.1),
        lambda: [TOKENS],
    ),
    "moe_block": (
        lambda: layers.TransformerEncoderBlock(16, 2, 32, num_experts=4),
        lambda: [TOKENS, INDICES, GATES],
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_layer_harness(name, tmp_path):
    make, arrays = CASES[name]
    run_layer_test(make, arrays(), tmp_path, name=name)


@pytest.mark.parametrize(
    "obj",
    [layers.ClipConstraint(0.0, 0.5), gelu_tanh],
    ids=["clip_constraint", "gelu_tanh"],
)
def test_serialization_harness(obj):
    run_serialization_test(obj)


def numpy_expert(moe, tokens, expert):
    """One expert MLP in numpy (tanh-GELU), from the layer's weights."""
    w_in, b_in = to_numpy(moe.kernel_in)[expert], to_numpy(moe.bias_in)[expert]
    w_out = to_numpy(moe.kernel_out)[expert]
    b_out = to_numpy(moe.bias_out)[expert]
    h = tokens @ w_in + b_in
    h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
    return h @ w_out + b_out


@pytest.mark.parametrize("normalize", [False, True])
def test_moe_is_gate_weighted_sum_of_chosen_experts(normalize):
    moe = layers.ImageRoutedMoE(
        num_experts=4, intermediate_dim=32, top_k=2, normalize_gates=normalize
    )
    indices = np.array([[0, 1], [3, 2], [1, 3]], "int32")
    gates = np.array([[0.5, 0.2], [0.6, 0.3], [0.2, 0.1]], "float32")
    outputs = to_numpy(moe(TOKENS, indices, gates))
    if normalize:
        gates = gates / gates.sum(axis=1, keepdims=True)
    for b in range(3):
        want = sum(
            gates[b, j] * numpy_expert(moe, TOKENS[b], indices[b, j])
            for j in range(2)
        )
        np.testing.assert_allclose(outputs[b], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_large_batches_match_one_image_at_a_time(top_k, platform_path):
    # Above 8 rows XLA:CPU scans the rows and accelerators gather the
    # kernels; both must equal the per-image result and have gradients.
    moe = layers.ImageRoutedMoE(num_experts=4, intermediate_dim=32, top_k=top_k)
    x = RNG.normal(size=(12, 5, 16)).astype("float32")
    # Expert 3 is never chosen: it must get no gradient (sparse backward).
    indices = RNG.integers(0, 3, size=(12, top_k)).astype("int32")
    gates = RNG.uniform(0.1, 1.0, size=(12, top_k)).astype("float32")
    whole = to_numpy(moe(x, indices, gates))
    one_by_one = np.concatenate(
        [
            to_numpy(moe(x[i : i + 1], indices[i : i + 1], gates[i : i + 1]))
            for i in range(12)
        ]
    )
    np.testing.assert_allclose(whole, one_by_one, rtol=1e-5, atol=1e-5)
    grads = gradients(moe, lambda y: keras.ops.sum(y**2), x, indices, gates)
    assert all(g is not None and np.isfinite(g).all() for g in grads)
    paths = [w.path for w in moe.trainable_variables]
    grad_in = grads[
        next(i for i, p in enumerate(paths) if p.endswith("kernel_in"))
    ]
    used = np.unique(indices)
    assert np.all(np.abs(grad_in[used]).sum(axis=(1, 2)) > 0)
    assert np.all(grad_in[3] == 0)


def test_router_probabilities_and_top_k():
    router = layers.ImageRouter(num_experts=4, top_k=2)
    logits, indices, gates = router(TOKENS)
    logits, indices, gates = map(to_numpy, (logits, indices, gates))
    assert logits.dtype == np.float32 and gates.dtype == np.float32
    assert indices.dtype == np.int32
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_array_equal(indices, np.argsort(-probs, axis=-1)[:, :2])
    np.testing.assert_allclose(
        gates, np.take_along_axis(probs, indices, axis=1), rtol=1e-5
    )


def test_router_reads_class_token_or_mean():
    tokens = TOKENS.copy()
    token_router = layers.ImageRouter(num_experts=4, pooling="token")
    mean_router = layers.ImageRouter(num_experts=4, pooling="mean")
    base_token = to_numpy(token_router(tokens)[0])
    base_mean = to_numpy(mean_router(tokens)[0])
    # Change everything but the class token (not by a constant: the router's
    # layer norm would remove that).
    tokens[:, 1:] += RNG.normal(size=tokens[:, 1:].shape).astype("float32")
    np.testing.assert_allclose(to_numpy(token_router(tokens)[0]), base_token)
    assert not np.allclose(to_numpy(mean_router(tokens)[0]), base_mean)


def test_patch_embedding_matches_patch_flattening():
    layer = layers.PatchEmbedding(hidden_dim=16, patch_size=8)
    x = images()
    tokens = to_numpy(layer(x))
    assert tokens.shape == (2, 17, 16)
    kernel = to_numpy(layer.projection.kernel).reshape(-1, 16)
    bias = to_numpy(layer.projection.bias)
    patches = x.reshape(2, 4, 8, 4, 8, 3).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(2, 16, -1)
    pos = to_numpy(layer.position_embedding)[0]
    want = patches @ kernel + bias + pos[1:]
    np.testing.assert_allclose(tokens[:, 1:], want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        tokens[:, 0],
        np.broadcast_to(to_numpy(layer.class_token)[0, 0] + pos[0], (2, 16)),
        atol=1e-6,
    )


@pytest.fixture(params=["xla_cpu", "accelerator"])
def platform_path(request):
    """Runs a test on the XLA:CPU-tuned path and on the accelerator path."""
    xla_cpu.set_xla_cpu_paths("on" if request.param == "xla_cpu" else "off")
    yield request.param
    xla_cpu.set_xla_cpu_paths("auto")


def test_xla_cpu_switch_modes_and_environment(monkeypatch):
    monkeypatch.setattr(xla_cpu, "_mode", None)
    monkeypatch.setenv("KMM_XLA_CPU_PATHS", "off")
    assert xla_cpu.xla_cpu_paths_mode() == "off" and not xla_cpu.on_xla_cpu()
    monkeypatch.setenv("KMM_XLA_CPU_PATHS", "on")
    assert xla_cpu.on_xla_cpu() == (keras.config.backend() == "jax")
    xla_cpu.set_xla_cpu_paths("off")  # the setter wins over the environment
    assert not xla_cpu.on_xla_cpu()
    monkeypatch.setenv("KMM_XLA_CPU_PATHS", "fast")
    monkeypatch.setattr(xla_cpu, "_mode", None)
    with pytest.raises(ValueError, match=r"KMM_XLA_CPU_PATHS='fast'.*'auto'"):
        xla_cpu.on_xla_cpu()
    with pytest.raises(ValueError, match=r"mode='yes'"):
        xla_cpu.set_xla_cpu_paths("yes")


@pytest.mark.parametrize("batch", [12, 13])
def test_patch_embedding_large_batches_match_one_image_at_a_time(
    batch, platform_path
):
    # Batches above 8 take the chunked path on XLA:CPU (13 has no divisor
    # <= 8 and takes the plain one); all must equal the per-image result.
    layer = layers.PatchEmbedding(hidden_dim=16, patch_size=8)
    x = RNG.normal(size=(batch, 32, 32, 3)).astype("float32")
    whole = to_numpy(layer(x))
    one_by_one = np.concatenate(
        [to_numpy(layer(x[i : i + 1])) for i in range(batch)]
    )
    np.testing.assert_allclose(whole, one_by_one, rtol=1e-5, atol=1e-5)
    model = keras.Sequential([keras.Input((32, 32, 3)), layer])
    grads = gradients(model, lambda y: keras.ops.sum(y**2), x)
    assert all(g is not None and np.isfinite(g).all() for g in grads)


def test_drop_path_drops_whole_samples_and_keeps_mean():
    layer = layers.DropPath(rate=0.5, seed=1)
    x = np.ones((2000, 4, 3), "float32")
    y = to_numpy(layer(x, training=True))
    per_sample = y.reshape(2000, -1)
    assert set(np.unique(per_sample)) <= {0.0, 2.0}
    assert np.all(per_sample.min(1) == per_sample.max(1))
    assert abs(y.mean() - 1.0) < 0.1
    np.testing.assert_array_equal(to_numpy(layer(x, training=False)), x)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: layers.ImageRoutedMoE(4, 32, top_k=5), "top_k=5"),
        (lambda: layers.ImageRouter(num_experts=3, top_k=4), "top_k=4"),
        (lambda: layers.ImageRouter(4, pooling="max"), "pooling='max'"),
        (lambda: layers.TransformerEncoderBlock(30, 4, 64), "not divisible"),
        (lambda: layers.MLP(0), "intermediate_dim=0"),
        (lambda: layers.DropPath(1.5), "rate=1.5"),
        (lambda: layers.ImageRoutedMoE(0, 32), "num_experts=0"),
    ],
)
def test_bad_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_inputs_raise():
    moe = layers.ImageRoutedMoE(num_experts=4, intermediate_dim=32, top_k=1)
    with pytest.raises(ValueError, match="expert_indices"):
        moe(TOKENS, np.zeros((3, 2), "int32"), np.ones((3, 2), "float32"))
    with pytest.raises(ValueError, match="not divisible"):
        layers.PatchEmbedding(16, 7)(images())
    with pytest.raises(ValueError, match="rank 4"):
        layers.PatchEmbedding(16, 8)(TOKENS)


def test_superclass_router_loss_values_and_config(tmp_path):
    loss = kmm.losses.SuperclassRouterLoss(superclass_ids=[1, 0, 1])
    logits = np.log(np.array([[0.25, 0.75], [0.6, 0.4]], "float32"))
    value = run_loss_test(loss, np.array([0, 1]), logits, tmp_path)
    np.testing.assert_allclose(
        value, -(np.log(0.75) + np.log(0.6)) / 2, rtol=1e-5
    )
    with pytest.raises(ValueError, match="router has 2 experts"):
        kmm.losses.SuperclassRouterLoss([0, 2])(np.array([1]), logits[:1])
    with pytest.raises(ValueError, match="1-D sequence of ints"):
        kmm.losses.SuperclassRouterLoss([0.5, 1.0])
