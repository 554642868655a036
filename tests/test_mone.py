"""MoNE: capacities, Expert Preferred Routing, nested expert blocks, the
backbone and classifier (budget changes, adaptive training, saving), FLOPs
and presets."""

import json

import keras
import numpy as np
import pytest

import keras_mobile_moe as kmm
from conftest import BACKEND
from conftest import fixture
from conftest import gradients
from conftest import scaled_images
from conftest import to_numpy
from harness import assert_batch_independent
from harness import assert_config_round_trip
from harness import assert_finite_nonzero_gradients
from harness import run_backbone_test
from harness import run_layer_test
from harness import run_preprocessing_test
from harness import run_task_test
from harness import xla_flops
from keras_mobile_moe.capacity import expert_cost_fractions
from keras_mobile_moe.capacity import expert_token_counts
from keras_mobile_moe.layers import NestedExpertBlock
from keras_mobile_moe.layers import NestedExpertRouter
from keras_mobile_moe.layers import expert_preferred_routing
from keras_mobile_moe.layers import permute_tokens

# House rule 12: 32x32 images, patch 8 (16 tokens), width 32, 4 experts.
TINY_MONE = dict(
    image_shape=(32, 32, 3),
    patch_size=8,
    num_layers=2,
    hidden_dim=32,
    num_heads=2,
    mlp_dim=64,
    num_nested_experts=4,
    capacity_budget=0.5,
)
# Budgets from all on the smallest expert to all on the full one.
BUDGETS = [0.125, 0.13, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99, 1.0]


def tiny_mone_backbone(**overrides):
    return kmm.MoNEBackbone(**{**TINY_MONE, **overrides})


def tiny_mone(num_classes=100, training_budgets=None, **overrides):
    return kmm.MoNE(
        tiny_mone_backbone(**overrides),
        num_classes=num_classes,
        training_budgets=training_budgets,
    )


def images(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, size=(n, 32, 32, 3)).astype("float32")


def objective(c, beta=10.0, delta=2.0):
    c = np.asarray(c, "float64")
    entropy = np.sum(np.where(c > 0, c * np.log(np.where(c > 0, c, 1.0)), 0.0))
    return float(c @ delta ** np.arange(len(c)) - beta * entropy)


# --- capacity distribution ----------------------------------------------------

# The capacities and token counts are numpy: the same on every backend.
numpy_only = pytest.mark.backend_independent


@numpy_only
@pytest.mark.parametrize("budget", BUDGETS)
def test_capacities_meet_the_constraints(budget):
    c = kmm.capacity_distribution(budget)
    assert c.shape == (4,) and c.dtype == np.float64
    assert np.all(c >= 0) and np.all(c <= 1)
    assert abs(c.sum() - 1) < 1e-12
    assert abs(c @ expert_cost_fractions(4) - budget) < 1e-12


@numpy_only
def test_capacities_at_half_budget():
    c = kmm.capacity_distribution(0.5)
    assert abs(c.sum() - 1) < 1e-6
    assert abs(c @ np.array([1 / 8, 1 / 4, 1 / 2, 1]) - 0.5) < 1e-6
    # The paper's problem, solved independently (SLSQP) to 1e-9.
    np.testing.assert_allclose(
        c, [0.2268379, 0.23464322, 0.25106883, 0.28745004], atol=1e-6
    )


@numpy_only
@pytest.mark.parametrize("budget", [0.14, 0.25, 0.4, 0.5, 0.75, 0.95])
@pytest.mark.parametrize("beta, delta", [(10.0, 2.0), (1.0, 2.0), (10.0, 5.0)])
def test_capacities_are_optimal(budget, beta, delta):
    """No feasible move improves the objective: the KKT point is the
    maximum (the problem is strictly concave)."""
    c = kmm.capacity_distribution(budget, beta=beta, delta=delta)
    w = expert_cost_fractions(4)
    # Directions that keep both equality constraints.
    constraints = np.stack([np.ones(4), w])
    null_space = np.linalg.svd(constraints)[2][2:]
    rng = np.random.default_rng(0)
    best = objective(c, beta, delta)
    for _ in range(200):
        direction = rng.normal(size=2) @ null_space
        for step in (1e-2, 1e-3, 1e-4):
            moved = c + step * direction
            if np.all(moved >= 0):
                assert objective(moved, beta, delta) <= best + 1e-12


@numpy_only
@pytest.mark.parametrize("budget", [0.13, 0.2, 0.35, 0.5, 0.65, 0.8, 0.97])
def test_capacities_match_scipy_slsqp(budget):
    optimize = pytest.importorskip("scipy.optimize")
    w = expert_cost_fractions(4)
    result = optimize.minimize(
        lambda c: -objective(np.maximum(c, 0)),
        np.full(4, 0.25),
        method="SLSQP",
        bounds=[(0, 1)] * 4,
        constraints=[
            {"type": "eq", "fun": lambda c: c.sum() - 1},
            {"type": "eq", "fun": lambda c: c @ w - budget},
        ],
        options={"ftol": 1e-14, "maxiter": 1000},
    )
    c = kmm.capacity_distribution(budget)
    np.testing.assert_allclose(c, result.x, atol=1e-3)
    assert objective(c) >= -result.fun - 1e-9


@numpy_only
def test_capacities_shift_to_bigger_experts_as_the_budget_grows():
    table = np.stack([kmm.capacity_distribution(b) for b in BUDGETS])
    # First-order stochastic dominance: every "top-k experts" share grows.
    top_shares = np.cumsum(table[:, ::-1], axis=1)
    assert np.all(np.diff(top_shares, axis=0) >= -1e-12)
    assert np.all(np.diff(table[:, -1]) > 0)  # the full expert
    assert np.all(np.diff(table[:, 0]) < 0)  # the smallest expert
    np.testing.assert_array_equal(table[0], [1, 0, 0, 0])
    np.testing.assert_array_equal(table[-1], [0, 0, 0, 1])


@numpy_only
@pytest.mark.parametrize("num_experts", [1, 2, 3, 5])
def test_capacities_for_other_expert_counts(num_experts):
    lowest = 1 / 2 ** (num_experts - 1)
    for budget in np.linspace(lowest, 1.0, 7):
        c = kmm.capacity_distribution(float(budget), num_experts=num_experts)
        assert abs(c.sum() - 1) < 1e-12
        assert abs(c @ expert_cost_fractions(num_experts) - budget) < 1e-12


@numpy_only
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"capacity_budget": 0.1}, r"capacity_budget=0.1 .*\[0.125, 1.0\]"),
        ({"capacity_budget": 1.01}, r"capacity_budget=1.01"),
        ({"capacity_budget": "0.5"}, r"capacity_budget='0.5'"),
        ({"capacity_budget": None}, r"capacity_budget=None"),
        ({"capacity_budget": 0.2, "num_experts": 2}, r"\[0.5, 1.0\]"),
        ({"capacity_budget": 0.5, "num_experts": 0}, r"num_experts=0"),
        ({"capacity_budget": 0.5, "beta": 0.0}, r"beta=0.0"),
        ({"capacity_budget": 0.5, "delta": -1.0}, r"delta=-1.0"),
    ],
)
def test_infeasible_capacity_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kmm.capacity_distribution(**kwargs)


@numpy_only
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("num_tokens", [16, 49, 196])
def test_token_counts_follow_the_capacities(budget, num_tokens):
    counts = expert_token_counts(budget, num_tokens)
    c = kmm.capacity_distribution(budget)
    assert sum(counts) == num_tokens and min(counts) >= 0
    assert all(isinstance(n, int) for n in counts)
    for j in range(1, 4):  # floor(c_j N) for every expert but the smallest
        assert counts[j] == int(np.floor(c[j] * num_tokens + 1e-9))
    realised = np.dot(counts, expert_cost_fractions(4)) / num_tokens
    assert realised <= budget + 1e-9


# --- Expert Preferred Routing ----------------------------------------------


def reference_routing(probs, counts):
    """Alg. 1 of the paper, one token at a time, in numpy."""
    batch, num_tokens, num_experts = probs.shape
    experts = np.zeros((batch, num_tokens), "int64")
    for b in range(batch):
        free = list(range(num_tokens))
        for j in reversed(range(1, num_experts)):
            free.sort(key=lambda i: (-probs[b, i, j], i))
            for i in free[: counts[j]]:
                experts[b, i] = j
            free = free[counts[j] :]
    return experts


@pytest.mark.parametrize("budget", [0.15, 0.3, 0.5, 0.8, 1.0])
def test_epr_counts_are_exact_and_follow_preferences(budget):
    rng = np.random.default_rng(int(budget * 100))
    logits = rng.normal(size=(5, 49, 4)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    probs = probs.astype("float32")
    counts = expert_token_counts(budget, 49)
    expert, order, position = (
        to_numpy(t) for t in expert_preferred_routing(probs, counts)
    )
    assert expert.dtype == order.dtype == position.dtype == np.int32
    np.testing.assert_array_equal(expert, reference_routing(probs, counts))
    for b in range(5):
        np.testing.assert_array_equal(
            np.bincount(expert[b], minlength=4), counts
        )
        np.testing.assert_array_equal(np.sort(order[b]), np.arange(49))
        np.testing.assert_array_equal(order[b][position[b]], np.arange(49))
        # Grouped by expert, smallest first.
        np.testing.assert_array_equal(
            expert[b][order[b]], np.repeat(np.arange(4), counts)
        )
        # The biggest expert took the tokens that prefer it most.
        if 0 < counts[3] < 49:
            mine = probs[b, expert[b] == 3, 3]
            assert mine.min() >= probs[b, expert[b] != 3, 3].max()


def test_epr_breaks_ties_by_token_index_on_every_backend():
    probs = np.full((2, 10, 4), 0.25, "float32")
    expert, order, _ = expert_preferred_routing(probs, (1, 2, 3, 4))
    np.testing.assert_array_equal(
        to_numpy(expert), [[3, 3, 3, 3, 2, 2, 2, 1, 1, 0]] * 2
    )
    np.testing.assert_array_equal(
        to_numpy(order), [[9, 7, 8, 4, 5, 6, 0, 1, 2, 3]] * 2
    )


def test_epr_is_static_shape_under_jit():
    if BACKEND == "jax":
        import jax

        routed = jax.jit(lambda p: expert_preferred_routing(p, (3, 4, 4, 5)))
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        routed = tf.function(
            lambda p: expert_preferred_routing(p, (3, 4, 4, 5)),
            jit_compile=True,
        )
    else:
        pytest.skip("torch runs eagerly; shapes are Python ints anyway")
    probs = np.random.default_rng(0).dirichlet(np.ones(4), (3, 16))
    got = routed(probs.astype("float32"))
    want = expert_preferred_routing(probs.astype("float32"), (3, 4, 4, 5))
    for g, w in zip(got, want):
        assert tuple(g.shape) == (3, 16)
        np.testing.assert_array_equal(to_numpy(g), to_numpy(w))


@pytest.mark.parametrize(
    "counts", [(4, 4, 4), (4, 4, 4, 5), (16, 0, 0, -0.5), [8, 8, 0, 1]]
)
def test_epr_rejects_bad_token_counts(counts):
    with pytest.raises(ValueError, match="token_counts="):
        expert_preferred_routing(np.ones((1, 16, 4), "float32") / 4, counts)


def test_permute_tokens_reorders_each_image():
    tokens = np.arange(2 * 3 * 2, dtype="float32").reshape(2, 3, 2)
    order = np.array([[2, 0, 1], [1, 2, 0]], "int32")
    got = to_numpy(permute_tokens(tokens, order))
    np.testing.assert_array_equal(
        got, np.take_along_axis(tokens, order[..., None], 1)
    )


@pytest.mark.parametrize("batch", [3, 4])
def test_permute_tokens_in_a_functional_model_when_batch_equals_tokens(batch):
    """Regression: on TensorFlow, Keras adds a [batch, 1] tensor to a
    [batch, tokens] one as a bias over the last axis when batch == tokens,
    which mixed up the images' tokens inside functional models (MoNE's
    `predict` with batch 16 on 16 patches) and nowhere else."""
    tokens = keras.Input((4, 2))
    order = keras.Input((4,), dtype="int32")
    model = keras.Model([tokens, order], permute_tokens(tokens, order))
    x = np.arange(batch * 4 * 2, dtype="float32").reshape(batch, 4, 2)
    o = np.stack([np.roll(np.arange(4), b) for b in range(batch)]).astype(
        "int32"
    )
    got = to_numpy(model([x, o]))
    np.testing.assert_array_equal(got, np.take_along_axis(x, o[..., None], 1))


def test_router_gates_are_each_tokens_own_expert_probability():
    router = NestedExpertRouter(num_nested_experts=4, capacity_budget=0.4)
    tokens = np.random.default_rng(3).normal(size=(3, 16, 8)).astype("float32")
    probs, expert, order, position, gates = (
        to_numpy(t) for t in router(tokens)
    )
    assert probs.dtype == np.float32 and gates.dtype == np.float32
    np.testing.assert_allclose(probs.sum(-1), 1, atol=1e-6)
    own = np.take_along_axis(probs, expert[..., None], -1)[..., 0]
    np.testing.assert_allclose(gates, np.take_along_axis(own, order, 1))
    np.testing.assert_array_equal(
        expert, reference_routing(probs, router.token_counts(16))
    )


# --- NestedExpertBlock --------------------------------------------------------


def copy_dense_weights(dense, nested):
    """Copies a TransformerEncoderBlock's weights into a NestedExpertBlock."""
    attention = dense.attention
    pairs = {
        "attention_norm_gamma": dense.attention_norm.gamma,
        "attention_norm_beta": dense.attention_norm.beta,
        "query_kernel": attention.query_dense.kernel,
        "query_bias": attention.query_dense.bias,
        "key_kernel": attention.key_dense.kernel,
        "key_bias": attention.key_dense.bias,
        "value_kernel": attention.value_dense.kernel,
        "value_bias": attention.value_dense.bias,
        "attention_output_kernel": attention.output_dense.kernel,
        "attention_output_bias": attention.output_dense.bias,
        "mlp_norm_gamma": dense.mlp_norm.gamma,
        "mlp_norm_beta": dense.mlp_norm.beta,
        "mlp_in_kernel": dense.mlp.dense_in.kernel,
        "mlp_in_bias": dense.mlp.dense_in.bias,
        "mlp_out_kernel": dense.mlp.dense_out.kernel,
        "mlp_out_bias": dense.mlp.dense_out.bias,
    }
    for name, source in pairs.items():
        target = getattr(nested, name)
        target.assign(np.reshape(to_numpy(source), target.shape))


def test_full_budget_block_is_the_dense_block_of_the_same_weights():
    tokens = np.random.default_rng(0).normal(size=(3, 16, 32)).astype("float32")
    gates = np.random.default_rng(1).uniform(size=(3, 16)).astype("float32")
    dense = kmm.layers.TransformerEncoderBlock(
        hidden_dim=32, num_heads=2, mlp_dim=64
    )
    nested = NestedExpertBlock(
        hidden_dim=32, num_heads=2, mlp_dim=64, capacity_budget=1.0
    )
    want = to_numpy(dense(tokens))
    nested(tokens, gates)
    assert float(to_numpy(nested.alpha)) == 0.0  # initialised to 0
    copy_dense_weights(dense, nested)
    np.testing.assert_allclose(to_numpy(nested(tokens, gates)), want, atol=1e-5)
    np.testing.assert_allclose(to_numpy(nested(tokens)), want, atol=1e-5)


def test_block_scales_the_mlp_branch_by_alpha_r_plus_one():
    tokens = np.random.default_rng(0).normal(size=(2, 16, 32)).astype("float32")
    gates = np.random.default_rng(1).uniform(size=(2, 16)).astype("float32")
    block = NestedExpertBlock(
        hidden_dim=32, num_heads=2, mlp_dim=64, capacity_budget=0.5
    )
    base = to_numpy(block(tokens, gates))
    # alpha = 0: the gates do not matter.
    np.testing.assert_allclose(
        to_numpy(block(tokens, 0 * gates)), base, atol=1e-6
    )
    block.alpha.assign(0.5)
    scaled = to_numpy(block(tokens, gates))
    no_router = to_numpy(block(tokens, 0 * gates))
    np.testing.assert_allclose(no_router, base, atol=1e-6)
    # x' = z + (0.5 r + 1) FFN(z): the FFN part grows by 0.5 r.
    block.alpha.assign(0.0)
    ffn = scaled - base
    block.alpha.assign(1.0 - 2.0**-24)
    doubled = to_numpy(block(tokens, gates)) - base
    np.testing.assert_allclose(doubled, 2 * ffn, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("budget", [0.125, 0.3, 0.6])
def test_block_touches_only_each_tokens_own_width(budget):
    """A token of expert j reads and writes only its first d_j features:
    changing its other features changes nothing else, anywhere."""
    block = NestedExpertBlock(
        hidden_dim=32, num_heads=2, mlp_dim=64, capacity_budget=budget
    )
    block.build((None, 16, 32))
    block.alpha.assign(0.7)
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(2, 16, 32)).astype("float32")
    gates = rng.uniform(size=(2, 16)).astype("float32")
    before = to_numpy(block(tokens, gates))
    start = 0
    for count, width in zip(block.token_counts(16), block.expert_widths):
        for i in range(start, start + count):
            # Passed through unchanged beyond the expert's width...
            np.testing.assert_array_equal(
                before[:, i, width:], tokens[:, i, width:]
            )
            if width < 32:
                # ...and never read.
                changed = tokens.copy()
                changed[:, i, width:] += rng.normal(size=(2, 32 - width))
                after = to_numpy(block(changed, gates))
                delta = after - before
                np.testing.assert_allclose(
                    delta[:, i, width:],
                    changed[:, i, width:] - tokens[:, i, width:],
                    atol=1e-6,
                )
                delta[:, i, width:] = 0
                np.testing.assert_allclose(delta, 0, atol=1e-6)
        start += count


def test_block_budget_changes_after_building():
    block = NestedExpertBlock(hidden_dim=32, num_heads=2, mlp_dim=64)
    tokens = np.random.default_rng(0).normal(size=(1, 16, 32)).astype("float32")
    full = to_numpy(block(tokens))
    block.capacity_budget = 0.2
    assert block.token_counts(16) == expert_token_counts(0.2, 16)
    assert not np.allclose(to_numpy(block(tokens)), full)
    with pytest.raises(ValueError, match="capacity_budget=0.05"):
        block.capacity_budget = 0.05


def test_alpha_stays_in_unit_interval_under_training():
    block = NestedExpertBlock(hidden_dim=32, num_heads=2, mlp_dim=64)
    block.build((None, 16, 32))
    constraint = block.alpha.constraint
    for value, want in [(-3.0, 0.0), (0.25, 0.25), (7.0, 1.0 - 2.0**-24)]:
        assert float(to_numpy(constraint(np.float32(value)))) == want
    optimizer = keras.optimizers.SGD(learning_rate=100.0)
    grad = keras.ops.convert_to_tensor(np.float32(-1.0))
    optimizer.apply([grad], [block.alpha])
    assert 0.0 <= float(to_numpy(block.alpha)) < 1.0
    optimizer.apply([-grad], [block.alpha])
    assert float(to_numpy(block.alpha)) == 0.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"hidden_dim": 36}, "divisible by 2\\^\\(num_nested_experts-1\\)=8"),
        ({"num_heads": 3}, "not divisible by num_heads=3"),
        ({"capacity_budget": 0.1}, "capacity_budget=0.1"),
        ({"num_nested_experts": 0}, "num_nested_experts=0"),
        ({"dropout_rate": 1.0}, "dropout_rate=1.0"),
    ],
)
def test_bad_block_arguments_raise(kwargs, match):
    kwargs = {"hidden_dim": 32, "num_heads": 2, "mlp_dim": 64, **kwargs}
    with pytest.raises(ValueError, match=match):
        NestedExpertBlock(**kwargs)


def test_block_rejects_tokens_of_the_wrong_width():
    block = NestedExpertBlock(hidden_dim=32, num_heads=2, mlp_dim=64)
    with pytest.raises(ValueError, match=r"hidden_dim=32.*\(2, 16, 24\)"):
        block(np.zeros((2, 16, 24), "float32"))


# --- config and saving --------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: NestedExpertBlock(
            hidden_dim=32,
            num_heads=2,
            mlp_dim=64,
            capacity_budget=0.3,
            dropout_rate=0.1,
            attention_dropout_rate=0.1,
            drop_path_rate=0.2,
        ),
        lambda: NestedExpertRouter(num_nested_experts=3, capacity_budget=0.4),
    ],
    ids=["block", "router"],
)
def test_layer_harness(make, tmp_path):
    tokens = np.random.default_rng(0).normal(size=(2, 16, 32))
    run_layer_test(make, [tokens.astype("float32")], tmp_path)


def test_backbone_and_classifier_harness(tmp_path):
    backbone = tiny_mone_backbone(capacity_budget=0.3, drop_path_rate=0.1)
    assert backbone.get_config()["capacity_budget"] == 0.3
    run_backbone_test(
        backbone,
        images(),
        tmp_path,
        ("sequence_output", "router_probs", "expert_index"),
    )
    model = kmm.MoNE(backbone, num_classes=10, training_budgets=[0.2, 0.6])
    assert assert_config_round_trip(model).training_budgets == [0.2, 0.6]
    # A budget changed on the model is what its config now says.
    backbone.capacity_budget = 0.7
    assert model.get_config()["backbone"]["config"]["capacity_budget"] == 0.7


def test_mone_has_the_parameters_of_the_dense_vit():
    dense = kmm.MobileVMoEBackbone(
        image_shape=(32, 32, 3),
        patch_size=8,
        num_layers=2,
        hidden_dim=32,
        num_heads=2,
        mlp_dim=64,
        num_moe_layers=0,
        num_experts=0,
        use_class_token=False,
        router_pooling="mean",
    )
    mone = tiny_mone_backbone()
    # The same weights, plus the router (D x E + E) and one alpha per block.
    assert mone.count_params() == dense.count_params() + 32 * 4 + 4 + 2


def test_classifier_keras_save_load_keeps_budget_and_outputs(tmp_path):
    model = tiny_mone(num_classes=10, capacity_budget=0.3)
    x = images()
    loaded = run_task_test(
        model, x, tmp_path, kmm.MoNEImageClassifier, predict=False
    )
    assert loaded.capacity_budget == 0.3
    # Change the budget of the loaded model: as if built at that budget.
    loaded.capacity_budget = 0.8
    fresh = tiny_mone(num_classes=10, capacity_budget=0.8)
    fresh.set_weights(model.get_weights())
    np.testing.assert_allclose(
        to_numpy(loaded(x)), to_numpy(fresh(x)), atol=1e-5
    )


def test_preprocessing_harness():
    run_preprocessing_test(
        kmm.models.MoNEImageConverter,
        kmm.models.MoNEImageClassifierPreprocessor,
        fixture()["x_test"][:2].astype("float32"),
    )


# --- the model ----------------------------------------------------------------


def test_backbone_outputs_in_patch_order():
    backbone = tiny_mone_backbone(capacity_budget=0.4)
    outputs = backbone(images(3))
    assert tuple(outputs["sequence_output"].shape) == (3, 16, 32)
    assert tuple(outputs["router_probs"].shape) == (3, 16, 4)
    expert = to_numpy(outputs["expert_index"])
    probs = to_numpy(outputs["router_probs"])
    counts = backbone.token_counts()
    assert counts == expert_token_counts(0.4, 16)
    for b in range(3):
        np.testing.assert_array_equal(
            np.bincount(expert[b], minlength=4), counts
        )
    np.testing.assert_array_equal(expert, reference_routing(probs, counts))


def test_full_budget_backbone_is_the_dense_vit_of_the_same_weights():
    """At budget 1.0 (alpha = 0) MoNE computes the dense ViT exactly."""
    backbone = tiny_mone_backbone(capacity_budget=1.0)
    dense = kmm.MobileVMoEBackbone(
        image_shape=(32, 32, 3),
        patch_size=8,
        num_layers=2,
        hidden_dim=32,
        num_heads=2,
        mlp_dim=64,
        num_moe_layers=0,
        num_experts=0,
        use_class_token=False,
        router_pooling="mean",
    )
    for name in ("projection", "position_embedding"):
        source = getattr(dense.patch_embedding, name)
        target = getattr(backbone.patch_embedding, name)
        for s, t in zip(
            getattr(source, "weights", [source]),
            getattr(target, "weights", [target]),
        ):
            t.assign(to_numpy(s))
    for source, target in zip(dense.encoder_blocks, backbone.encoder_blocks):
        copy_dense_weights(source, target)
    for s, t in zip(dense.final_norm.weights, backbone.final_norm.weights):
        t.assign(to_numpy(s))
    x = images(3)
    np.testing.assert_allclose(
        to_numpy(backbone(x)["sequence_output"]),
        to_numpy(dense(x)["sequence_output"]),
        atol=1e-5,
    )


def test_changing_the_budget_of_a_built_model_recompiles_predict():
    model = tiny_mone(num_classes=10, capacity_budget=0.6)
    x = images(4)
    at_06 = to_numpy(model.predict(x, verbose=0))
    model.capacity_budget = 0.2
    assert model.backbone.capacity_budget == 0.2
    assert model.backbone.token_counts() == expert_token_counts(0.2, 16)
    at_02 = to_numpy(model.predict(x, verbose=0))
    fresh = tiny_mone(num_classes=10, capacity_budget=0.2)
    fresh.set_weights(model.get_weights())
    np.testing.assert_allclose(
        at_02, to_numpy(fresh.predict(x, verbose=0)), atol=1e-5
    )
    assert not np.allclose(at_02, at_06, atol=1e-4)
    expert = to_numpy(model.backbone(x)["expert_index"])
    np.testing.assert_array_equal(
        np.bincount(expert[0], minlength=4), expert_token_counts(0.2, 16)
    )
    with pytest.raises(ValueError, match="capacity_budget=1.5"):
        model.capacity_budget = 1.5
    assert model.capacity_budget == 0.2


def test_results_do_not_depend_on_the_rest_of_the_batch():
    model = tiny_mone(num_classes=10)
    assert_batch_independent(model, images(8, seed=3), images(8, seed=4))


def test_every_trainable_weight_gets_a_finite_nonzero_gradient():
    model = tiny_mone(num_classes=10, capacity_budget=0.5, drop_path_rate=0.1)
    for block in model.backbone.encoder_blocks:
        block.alpha.assign(0.5)  # at alpha = 0 the router has no gradient
    x = images(8)
    y = np.arange(8) % 10
    counts = model.backbone.token_counts()
    assert min(counts) > 0  # the batch reaches every expert

    def loss(logits):
        return model.compute_loss(x, y, logits, training=True)

    names = list(assert_finite_nonzero_gradients(model, loss, x))
    assert any("alpha" in n for n in names) and any(
        "router" in n for n in names
    )


def test_alpha_gets_a_gradient_at_initialisation():
    block = NestedExpertBlock(
        hidden_dim=32, num_heads=2, mlp_dim=64, capacity_budget=0.5
    )
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(2, 16, 32)).astype("float32")
    gates = rng.uniform(size=(2, 16)).astype("float32")
    block(tokens, gates)
    grads = gradients(block, lambda out: keras.ops.sum(out**3), tokens, gates)
    names = [v.path for v in block.trainable_variables]
    grad = grads[[i for i, n in enumerate(names) if "alpha" in n][0]]
    assert float(to_numpy(block.alpha)) == 0.0
    assert np.isfinite(grad) and grad != 0


def fixture_batch(n=256):
    data = fixture()
    return scaled_images(data["x_train"][:n]), data["y_train"][:n]


def test_fit_reduces_the_loss_on_cifar100_fixture():
    model = tiny_mone(capacity_budget=0.5)
    model.compile(optimizer=keras.optimizers.Adam(2e-3))
    x, y = fixture_batch(256)
    history = model.fit(x, y, batch_size=64, epochs=6, verbose=0, shuffle=False)
    loss = history.history["loss"]
    assert np.all(np.isfinite(loss))
    assert loss[-1] < loss[0] - 0.2, loss
    alphas = [float(to_numpy(b.alpha)) for b in model.backbone.encoder_blocks]
    assert all(0.0 <= a < 1.0 for a in alphas), alphas


def test_adaptive_training_samples_a_budget_per_step():
    model = tiny_mone(training_budgets=[0.2, 0.7], capacity_budget=0.5)
    model.compile(optimizer=keras.optimizers.Adam(2e-3))
    backbone = model.backbone
    used = []
    use_budget = backbone.use_budget

    def spy(budget):
        used.append(budget)
        use_budget(budget)

    backbone.use_budget = spy
    x, y = fixture_batch(128)
    history = model.fit(x, y, batch_size=16, epochs=3, verbose=0, shuffle=False)
    # One draw per step, each followed by the restore of the budget 0.5.
    steps = 3 * 128 // 16
    draws = used[0::2]
    assert len(draws) == steps and set(used[1::2]) == {0.5}
    assert set(draws) == {0.2, 0.7}
    assert backbone.router.capacity_budget == 0.5
    assert all(b.capacity_budget == 0.5 for b in backbone.encoder_blocks)
    loss = history.history["loss"]
    assert loss[-1] < loss[0], loss
    # Evaluation and prediction run at the inference budget.
    expert = to_numpy(backbone(x[:2])["expert_index"])
    np.testing.assert_array_equal(
        np.bincount(expert[0], minlength=4), expert_token_counts(0.5, 16)
    )


def test_adaptive_option_uses_the_papers_budgets():
    model = tiny_mone(num_classes=10, training_budgets="adaptive")
    assert model.training_budgets == "adaptive"
    assert kmm.models.mone.ADAPTIVE_BUDGETS == (
        0.15,
        0.25,
        0.35,
        0.45,
        0.55,
        0.65,
        0.75,
        0.85,
        0.95,
    )
    assert model._budgets == kmm.models.mone.ADAPTIVE_BUDGETS


# --- argument checks ---------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"hidden_dim": 36, "num_heads": 2}, r"hidden_dim=36 .*=8"),
        ({"capacity_budget": 0.1}, r"capacity_budget=0.1"),
        ({"num_nested_experts": 0}, r"num_nested_experts=0"),
        ({"image_shape": (30, 30, 3)}, r"not divisible by patch_size=8"),
        ({"drop_path_rate": 1.0}, r"drop_path_rate=1.0"),
    ],
)
def test_bad_backbone_arguments_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_mone_backbone(**overrides)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"pooling": "token"}, r"pooling='token'"),
        ({"training_budgets": [0.05, 0.5]}, r"capacity_budget=0.05"),
        ({"training_budgets": "paper"}, r"training_budgets='paper'"),
        ({"training_budgets": []}, r"training_budgets=\[\]"),
        ({"num_classes": 0}, r"num_classes=0"),
    ],
)
def test_bad_classifier_arguments_raise(kwargs, match):
    kwargs = {"num_classes": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        kmm.MoNE(tiny_mone_backbone(), **kwargs)


def test_classifier_rejects_other_backbones():
    with pytest.raises(ValueError, match="Expected a MoNEBackbone"):
        kmm.MoNE(
            kmm.MobileVMoEBackbone(
                image_shape=(32, 32, 3),
                patch_size=8,
                num_layers=2,
                hidden_dim=32,
                num_heads=2,
                mlp_dim=64,
            ),
            num_classes=10,
        )


def test_wrong_images_raise():
    model = tiny_mone(num_classes=10)
    with pytest.raises(ValueError, match=r"images[\s\S]*32, 32, 3"):
        model(np.zeros((2, 16, 16, 3), "float32"))


# --- FLOPs -------------------------------------------------------------------


def test_flops_follow_the_budget():
    model = tiny_mone(num_classes=10)
    flops = {}
    for budget in BUDGETS:
        model.capacity_budget = budget
        flops[budget] = kmm.count_flops(model)
    values = [flops[b] for b in BUDGETS]
    assert values == sorted(values)
    dense = kmm.MobileVMoE(
        kmm.MobileVMoEBackbone(
            image_shape=(32, 32, 3),
            patch_size=8,
            num_layers=2,
            hidden_dim=32,
            num_heads=2,
            mlp_dim=64,
            num_moe_layers=0,
            num_experts=0,
            use_class_token=False,
            router_pooling="mean",
        ),
        num_classes=10,
        pooling="avg",
        compile=False,
    )
    parts = kmm.flops_breakdown(dense)
    model.capacity_budget = 1.0
    mone = kmm.flops_breakdown(model)
    # At budget 1.0 the blocks cost the dense blocks plus (alpha r + 1).
    assert mone["attention"] == parts["attention"]
    assert mone["mlp"] == parts["mlp"] + 2 * (2 * 16 + 16 * 32)
    # Linear layers scale with the realised widths.
    block = kmm.flops.nested_block_flops
    full = block((0, 0, 0, 16), (4, 8, 16, 32), 2, 64)
    eighth = block((16, 0, 0, 0), (4, 8, 16, 32), 2, 64)
    # Full width whatever the expert: the N^2 attention, the Q/K/V biases,
    # the query scaling and the residual; the MLP bias, GELU, gate, residual.
    fixed = {
        "attention": 4 * 16 * 16 * 32 + 4 * 2 * 16 * 16 + 5 * 16 * 32,
        "mlp": 9 * 16 * 64 + 2 * 16 + 2 * 16 * 32,
    }
    for part in ("attention", "mlp"):
        assert full[part] - fixed[part] == 8 * (eighth[part] - fixed[part])


@pytest.mark.skipif(BACKEND != "jax", reason="XLA cost analysis is JAX's")
@pytest.mark.parametrize(
    "budget, use_class_token",
    [(1.0, False), (0.6, False), (0.3, False), (0.125, False), (0.3, True)],
)
def test_flops_match_xla_cost_analysis(budget, use_class_token):
    model = tiny_mone(
        num_classes=10, capacity_budget=budget, use_class_token=use_class_token
    )
    xla = xla_flops(model, (32, 32, 3))
    ours = kmm.count_flops(model)
    assert abs(ours / xla - 1) < 0.05, (ours, xla)


@pytest.mark.skipif(BACKEND != "jax", reason="XLA cost analysis is JAX's")
def test_compiled_compute_shrinks_with_the_budget():
    """Compute follows the assignment: XLA's own count of a compiled
    196-token forward (6x64 at 224, patch 16) falls with the budget as ours
    does."""
    model = kmm.MoNE.from_preset("6x64_mone", load_weights=False, patch_size=16)
    costs, ours = {}, {}
    for budget in (1.0, 0.4):
        model.capacity_budget = budget
        costs[budget] = xla_flops(model, (224, 224, 3))
        ours[budget] = kmm.count_flops(model)
        assert abs(ours[budget] / costs[budget] - 1) < 0.05
    # At 196 tokens and width 64 the full-width N^2 attention is a third of
    # the compute, so the whole model shrinks to ~0.65 at budget 0.4.
    ratio = costs[0.4] / costs[1.0]
    assert ratio < 0.7
    assert abs(ratio / (ours[0.4] / ours[1.0]) - 1) < 0.02


# --- presets ------------------------------------------------------------------


def test_every_paper_scale_has_a_mone_preset_and_aliases():
    names = set(kmm.MoNE.presets)
    for layers in (12, 9, 6):
        for width in (384, 192, 96, 64):
            assert f"{layers}x{width}_mone" in names
    assert {"tiny_mone", "small_mone"} <= names
    assert kmm.MoNE.presets["tiny_mone"]["variant"] == "12x192"
    assert kmm.MoNE.presets["small_mone"]["variant"] == "12x384"
    assert kmm.MoNEBackbone.presets.keys() == kmm.MoNE.presets.keys()
    assert not names & set(kmm.MobileVMoE.presets)


@pytest.mark.parametrize("name", ["6x64_mone", "12x64_mone"])
def test_small_mone_presets_build_with_the_registered_params(name):
    model = kmm.MoNE.from_preset(name, load_weights=False)
    entry = kmm.MoNE.presets[name]
    assert model.count_params() == entry["params"]
    assert kmm.count_flops(model) == entry["flops"]
    assert model.backbone.num_nested_experts == 4


def test_mone_preset_overrides_and_dense_counterpart():
    model = kmm.MoNE.from_preset(
        "tiny_mone", load_weights=False, capacity_budget=0.3, num_classes=7
    )
    assert model.capacity_budget == 0.3 and model.num_classes == 7
    dense = kmm.MobileVMoE.presets["tiny"]
    entry = kmm.MoNE.presets["tiny_mone"]
    assert entry["params"] == pytest.approx(dense["params"], rel=0.01)
    assert entry["flops"] < 0.6 * dense["flops"]  # budget 0.5
    assert json.loads(json.dumps(entry)) == entry


def test_mone_save_to_preset_round_trip(tmp_path):
    model = tiny_mone(num_classes=10, capacity_budget=0.3)
    x = images(2)
    expected = to_numpy(model.predict(x, verbose=0))
    model.save_to_preset(str(tmp_path / "preset"))
    # No preprocessor was saved; without this override, from_preset attaches
    # the presets' default one (raw pixels in [0, 255]).
    loaded = kmm.MoNE.from_preset(str(tmp_path / "preset"), preprocessor=None)
    assert loaded.capacity_budget == 0.3
    np.testing.assert_allclose(
        to_numpy(loaded.predict(x, verbose=0)), expected, atol=1e-5
    )
    cheaper = kmm.MoNE.from_preset(
        str(tmp_path / "preset"), capacity_budget=0.2
    )
    assert cheaper.backbone.token_counts() == expert_token_counts(0.2, 16)


def test_public_mone_names():
    # Their examples are checked in test_docstrings.py.
    assert kmm.MoNE is kmm.MoNEImageClassifier
    assert kmm.models.MoNEBackbone is kmm.MoNEBackbone


# --- a class token (dense ViT checkpoints: timm, keras-hub) -----------------


def test_class_token_is_first_full_width_and_not_routed():
    backbone = tiny_mone_backbone(
        capacity_budget=0.125, use_class_token=True, mlp_activation="gelu"
    )
    outputs = backbone(images(2))
    # 16 routed patches (all on the D/8 expert at this budget) + the token.
    assert tuple(outputs["sequence_output"].shape) == (2, 17, 32)
    assert tuple(outputs["expert_index"].shape) == (2, 16)
    assert backbone.token_counts() == (16, 0, 0, 0)
    block = backbone.encoder_blocks[0]
    assert block.full_width_tokens == 1
    assert block.token_counts(17) == (16, 0, 0, 1)
    assert block.groups(17)[-1] == (16, 1, 32)
    # Every weight column is used (by the class token): nothing unused.
    model = kmm.MoNE(backbone, num_classes=5)
    assert model.pooling == "token"
    assert kmm.flops.activated_params(model) == model.count_params()
    with pytest.raises(ValueError, match="pooling='avg'.*use_class_token=True"):
        kmm.MoNE(backbone, num_classes=5, pooling="avg")
    with pytest.raises(ValueError, match="use_class_token"):
        tiny_mone_backbone(use_class_token=1)


def test_class_token_mone_harness(tmp_path):
    model = tiny_mone(
        num_classes=5,
        capacity_budget=0.4,
        use_class_token=True,
        mlp_activation="gelu",
    )
    config = model.get_config()["backbone"]["config"]
    assert config["use_class_token"] is True
    assert config["mlp_activation"] == "gelu"
    run_task_test(model, images(), tmp_path, kmm.MoNEImageClassifier)
