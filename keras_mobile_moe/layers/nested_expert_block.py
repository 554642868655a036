import math

import keras
from keras import ops

from keras_mobile_moe.capacity import check_capacity_budget
from keras_mobile_moe.capacity import expert_token_counts
from keras_mobile_moe.layers.activations import get_activation
from keras_mobile_moe.layers.activations import serialize_activation
from keras_mobile_moe.layers.attention import attend
from keras_mobile_moe.layers.drop_path import DropPath
from keras_mobile_moe.layers.fast_ops import concatenate
from keras_mobile_moe.layers.fast_ops import fused_linear
from keras_mobile_moe.layers.fast_ops import layer_norm
from keras_mobile_moe.layers.fast_ops import linear
from keras_mobile_moe.layers.fast_ops import pad_last
from keras_mobile_moe.validation import check_int
from keras_mobile_moe.validation import check_rate


@keras.saving.register_keras_serializable(package="keras_mobile_moe")
class ClipConstraint(keras.constraints.Constraint):
    """Clips a weight into `[min_value, max_value]` after every update.

    Args:
        min_value: float. Lower bound.
        max_value: float. Upper bound.

    Example:

    >>> import numpy as np
    >>> clipped = ClipConstraint(0.0, 0.5)(np.array([-1.0, 0.25, 3.0]))
    >>> np.asarray(clipped).tolist()
    [0.0, 0.25, 0.5]
    """

    def __init__(self, min_value, max_value):
        self.min_value = float(min_value)
        self.max_value = float(max_value)

    def __call__(self, w):
        w = ops.convert_to_tensor(w)
        return ops.clip(w, self.min_value, self.max_value)

    def get_config(self):
        return {"min_value": self.min_value, "max_value": self.max_value}


# alpha is kept in [0, 1): the largest float32 below 1.
ALPHA_MAX = 1.0 - 2.0**-24


def nested_widths(hidden_dim, num_nested_experts):
    """Widths d_j = D / 2^(E-j) of the nested experts, smallest first.

    Example:

    >>> nested_widths(192, 4)
    (24, 48, 96, 192)
    """
    return tuple(
        hidden_dim // 2 ** (num_nested_experts - 1 - j)
        for j in range(num_nested_experts)
    )


def check_nested_width(hidden_dim, num_nested_experts):
    """Raises `ValueError` unless D / 2^(E-1) is a whole number."""
    step = 2 ** (num_nested_experts - 1)
    if hidden_dim % step:
        raise ValueError(
            f"hidden_dim={hidden_dim} is not divisible by "
            f"2^(num_nested_experts-1)={step} (num_nested_experts="
            f"{num_nested_experts}). Accepted: a hidden_dim divisible by "
            f"{step}, so that every nested expert width D/2^(E-j) is an int."
        )


@keras.saving.register_keras_serializable(package="keras_mobile_moe")
class NestedExpertBlock(keras.layers.Layer):
    """A transformer block of nested experts (MoNE), compute per expert group.

    Jain et al., "Mixture of Nested Experts: Adaptive Processing of Visual
    Tokens", NeurIPS 2024, Sec. 3.1 and App. A.1. One set of weights (those
    of a pre-norm ViT block) holds E nested experts; expert j uses only the
    first d_j = D / 2^(E-j) features. A token of expert j:

    - is layer-normalised over its first d_j features;
    - attention: Q, K and V are in-projections from those d_j features to the
      full width D (so all tokens attend to each other at full width); the
      attention output projection is an out-projection to d_j features,
      zero-padded back to D before the residual add;
    - MLP: in-projection d_j -> mlp_dim, GELU, out-projection to d_j,
      zero-padded;
    - `z = x + SA_j(x)`, `x' = z + (alpha * r + 1) * FFN_j(z)`, where r is the
      router probability of the token's expert and alpha a learnable scalar
      initialised to 0 and kept in [0, 1).

    Compute follows the assignment: the tokens come grouped by expert (as
    `NestedExpertRouter` / `expert_preferred_routing` order them), in groups
    whose sizes are static ints fixed by `capacity_budget` and the number of
    tokens, and each group is multiplied only by its slice of the weights.
    No token runs at a width it was not assigned.

    A class token (`full_width_tokens=1`) is not routed: it comes last, after
    the routed groups, always runs at the full width, and its MLP branch is
    not scaled (r = 0). With `capacity_budget=1.0` every token runs at full
    width and the block computes a pre-norm ViT block (alpha starts at 0),
    which is how a dense checkpoint becomes a MoNE.

    Args:
        hidden_dim: int. Token width D; divisible by `num_heads` and by
            2^(num_nested_experts-1).
        num_heads: int. Attention heads.
        mlp_dim: int. Hidden width of the MLP (full for every expert).
        num_nested_experts: int >= 1. Number of nested experts E.
        capacity_budget: float in `[1/2^(E-1), 1]`. Fixes the group sizes
            (`kmm.capacity.expert_token_counts`); may be changed after
            building (`block.capacity_budget = 0.4`).
        dropout_rate: float in [0, 1). Dropout in the MLP and on both
            branch outputs.
        attention_dropout_rate: float in [0, 1). Dropout on attention weights.
        drop_path_rate: float in [0, 1). Stochastic depth of both branches.
        layer_norm_epsilon: float. Epsilon of the layer norms.
        mlp_activation: activation of the MLP hidden layer: a Keras name
            (`"gelu"` is the exact GELU of timm and PyTorch) or the default
            `"keras_mobile_moe>gelu_tanh"` (big_vision's tanh approximation).
        full_width_tokens: int >= 0. Tokens at the end of the sequence that
            always run at the full width, outside the budget (1 for a class
            token).

    Call arguments:
        inputs: tokens `[batch, num_tokens, hidden_dim]` grouped by expert:
            the first `counts[0]` tokens of every image belong to the
            smallest expert, the next `counts[1]` to the next, and so on,
            with `counts = block.token_counts(num_tokens)` (the last group
            includes the `full_width_tokens`).
        expert_gates: float tensor `[batch, num_tokens]`, the router
            probability of each token's own expert (same order; 0 for the
            full-width tokens), or None for r = 0 (no router).
        training: bool.

    Returns:
        Tokens `[batch, num_tokens, hidden_dim]`, in the same order.

    Example:

    >>> import numpy as np
    >>> block = NestedExpertBlock(
    ...     hidden_dim=16, num_heads=2, mlp_dim=32, capacity_budget=0.5)
    >>> block.token_counts(8), block.expert_widths
    ((3, 1, 2, 2), (2, 4, 8, 16))
    >>> tokens = np.random.rand(2, 8, 16).astype("float32")
    >>> tuple(block(tokens, np.full((2, 8), 0.3, "float32")).shape)
    (2, 8, 16)
    """

    def __init__(
        self,
        hidden_dim,
        num_heads,
        mlp_dim,
        num_nested_experts=4,
        capacity_budget=1.0,
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
        drop_path_rate=0.0,
        layer_norm_epsilon=1e-6,
        mlp_activation="keras_mobile_moe>gelu_tanh",
        full_width_tokens=0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.hidden_dim = check_int("hidden_dim", hidden_dim, minimum=1)
        self.num_heads = check_int("num_heads", num_heads, minimum=1)
        if hidden_dim % num_heads:
            raise ValueError(
                f"hidden_dim={hidden_dim} is not divisible by "
                f"num_heads={num_heads}. Accepted: a num_heads that divides "
                "hidden_dim."
            )
        self.mlp_dim = check_int("mlp_dim", mlp_dim, minimum=1)
        self.num_nested_experts = check_int(
            "num_nested_experts", num_nested_experts, minimum=1
        )
        check_nested_width(hidden_dim, num_nested_experts)
        self.capacity_budget = capacity_budget
        self.dropout_rate = check_rate("dropout_rate", dropout_rate)
        self.attention_dropout_rate = check_rate(
            "attention_dropout_rate", attention_dropout_rate
        )
        self.drop_path_rate = check_rate("drop_path_rate", drop_path_rate)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.mlp_activation = serialize_activation(
            get_activation(mlp_activation)
        )
        self._activation = get_activation(self.mlp_activation)
        self.full_width_tokens = check_int(
            "full_width_tokens", full_width_tokens, minimum=0
        )

    @property
    def capacity_budget(self):
        return self._capacity_budget

    @capacity_budget.setter
    def capacity_budget(self, value):
        check_capacity_budget(value, self.num_nested_experts)
        self._capacity_budget = float(value)

    @property
    def expert_widths(self):
        """The width d_j of every nested expert, smallest first."""
        return nested_widths(self.hidden_dim, self.num_nested_experts)

    def token_counts(self, num_tokens):
        """Tokens per expert (smallest first) for images of `num_tokens`
        (the full-width tokens included, in the last expert)."""
        routed = num_tokens - self.full_width_tokens
        if routed < 1:
            raise ValueError(
                f"NestedExpertBlock(full_width_tokens="
                f"{self.full_width_tokens}) needs at least one routed token. "
                f"Received: num_tokens={num_tokens}."
            )
        counts = expert_token_counts(
            self.capacity_budget, routed, self.num_nested_experts
        )
        return (*counts[:-1], counts[-1] + self.full_width_tokens)

    def build(self, inputs_shape, expert_gates_shape=None):
        if len(inputs_shape) != 3 or inputs_shape[-1] != self.hidden_dim:
            raise ValueError(
                f"NestedExpertBlock(hidden_dim={self.hidden_dim}) expects "
                "tokens [batch, num_tokens, hidden_dim]. Received: "
                f"inputs_shape={tuple(inputs_shape)}."
            )
        d, h = self.hidden_dim, self.mlp_dim

        def weight(name, shape, initializer, **kwargs):
            return self.add_weight(
                shape=shape, initializer=initializer, name=name, **kwargs
            )

        self.attention_norm_gamma = weight("attention_norm_gamma", (d,), "ones")
        self.attention_norm_beta = weight("attention_norm_beta", (d,), "zeros")
        for name in ("query", "key", "value", "attention_output"):
            setattr(
                self,
                f"{name}_kernel",
                weight(f"{name}_kernel", (d, d), "glorot_uniform"),
            )
            setattr(self, f"{name}_bias", weight(f"{name}_bias", (d,), "zeros"))
        self.mlp_norm_gamma = weight("mlp_norm_gamma", (d,), "ones")
        self.mlp_norm_beta = weight("mlp_norm_beta", (d,), "zeros")
        self.mlp_in_kernel = weight("mlp_in_kernel", (d, h), "glorot_uniform")
        self.mlp_in_bias = weight("mlp_in_bias", (h,), "zeros")
        self.mlp_out_kernel = weight("mlp_out_kernel", (h, d), "glorot_uniform")
        self.mlp_out_bias = weight("mlp_out_bias", (d,), "zeros")
        self.alpha = weight(
            "alpha", (), "zeros", constraint=ClipConstraint(0.0, ALPHA_MAX)
        )
        policy = self.dtype_policy
        self.attention_weights_dropout = keras.layers.Dropout(
            self.attention_dropout_rate, dtype=policy, name="attention_dropout"
        )
        self.attention_dropout = keras.layers.Dropout(
            self.dropout_rate, dtype=policy, name="attention_output_dropout"
        )
        self.mlp_hidden_dropout = keras.layers.Dropout(
            self.dropout_rate, dtype=policy, name="mlp_hidden_dropout"
        )
        self.mlp_dropout = keras.layers.Dropout(
            self.dropout_rate, dtype=policy, name="mlp_output_dropout"
        )
        self.drop_path = DropPath(
            self.drop_path_rate, dtype=policy, name="drop_path"
        )
        self.drop_path.build(inputs_shape)  # see TransformerEncoderBlock.build
        self._scale = 1.0 / math.sqrt(self.hidden_dim // self.num_heads)
        self.built = True

    def groups(self, num_tokens):
        """`(start, size, width)` of every non-empty expert group."""
        # Cached per (budget, tokens): the budget may change between calls,
        # the groups of a given pair never do (no per-call Python work).
        cache = self.__dict__.setdefault("_groups_cache", {})
        key = (self.capacity_budget, num_tokens)
        if key not in cache:
            groups, start = [], 0
            for count, width in zip(
                self.token_counts(num_tokens), self.expert_widths
            ):
                if count:
                    groups.append((start, count, width))
                    start += count
            cache[key] = tuple(groups)
        return list(cache[key])

    def _norm(self, x, gamma, beta, width):
        # LayerNorm over the first `width` features, with those features'
        # scale and offset.
        return layer_norm(
            x, gamma[:width], beta[:width], self.layer_norm_epsilon
        )

    def _pad(self, x, width):
        if width == self.hidden_dim:
            return x
        return pad_last(x, self.hidden_dim)

    def call(self, inputs, expert_gates=None, training=None):
        if inputs.shape[1] is None:
            raise ValueError(
                "NestedExpertBlock needs a static number of tokens (the "
                "expert group sizes are Python ints). Received: tokens of "
                f"shape {tuple(inputs.shape)}."
            )
        groups = self.groups(inputs.shape[1])
        dropping = bool(training) and self.dropout_rate > 0.0
        # Variables read once per call (`.value` is autocast to the compute
        # dtype under a mixed policy); slices of them are views.
        norm_gamma = self.attention_norm_gamma.value
        norm_beta = self.attention_norm_beta.value
        projections = [
            (self.query_kernel.value, self.query_bias.value),
            (self.key_kernel.value, self.key_bias.value),
            (self.value_kernel.value, self.value_bias.value),
        ]

        # Self-attention: in-projections from each group's d_j features to
        # full-width Q, K, V; full attention over all tokens.
        qkv = [[], [], []]
        for start, size, width in groups:
            x = self._norm(
                inputs[:, start : start + size, :width],
                norm_gamma,
                norm_beta,
                width,
            )
            projected = fused_linear(
                x,
                [kernel[:width] for kernel, _ in projections],
                [bias for _, bias in projections],
            )
            for parts, part in zip(qkv, projected):
                parts.append(part)
        query, key, value = (
            parts[0] if len(parts) == 1 else concatenate(parts, axis=1)
            for parts in qkv
        )
        attended = attend(
            query,
            key,
            value,
            self.num_heads,
            self._scale,
            dropout=self.attention_weights_dropout,
            training=training,
        )
        # Out-projection of each group to its d_j features, zero-padded.
        out_kernel = self.attention_output_kernel.value
        out_bias = self.attention_output_bias.value
        updates = []
        for start, size, width in groups:
            y = linear(
                attended[:, start : start + size],
                out_kernel[:, :width],
                out_bias[:width],
            )
            updates.append(self._pad(y, width))
        update = (
            updates[0] if len(updates) == 1 else concatenate(updates, axis=1)
        )
        if dropping:
            update = self.attention_dropout(update, training=training)
        x = inputs + self._drop_path(update, training)

        # MLP: in-projection from d_j features, out-projection to d_j.
        norm_gamma = self.mlp_norm_gamma.value
        norm_beta = self.mlp_norm_beta.value
        in_kernel, in_bias = self.mlp_in_kernel.value, self.mlp_in_bias.value
        out_kernel, out_bias = (
            self.mlp_out_kernel.value,
            self.mlp_out_bias.value,
        )
        updates = []
        for start, size, width in groups:
            y = self._norm(
                x[:, start : start + size, :width], norm_gamma, norm_beta, width
            )
            y = self._activation(linear(y, in_kernel[:width], in_bias))
            if dropping:
                y = self.mlp_hidden_dropout(y, training=training)
            y = linear(y, out_kernel[:, :width], out_bias[:width])
            updates.append(self._pad(y, width))
        update = (
            updates[0] if len(updates) == 1 else concatenate(updates, axis=1)
        )
        if expert_gates is not None:
            gates = ops.cast(expert_gates, update.dtype)
            scale = self.alpha.value * gates + 1.0
            update = update * ops.expand_dims(scale, -1)
        if dropping:
            update = self.mlp_dropout(update, training=training)
        return x + self._drop_path(update, training)

    def _drop_path(self, x, training):
        if training and self.drop_path_rate > 0.0:
            return self.drop_path(x, training=training)
        return x

    def compute_output_shape(self, inputs_shape, expert_gates_shape=None):
        return inputs_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "num_heads": self.num_heads,
                "mlp_dim": self.mlp_dim,
                "num_nested_experts": self.num_nested_experts,
                "capacity_budget": self.capacity_budget,
                "dropout_rate": self.dropout_rate,
                "attention_dropout_rate": self.attention_dropout_rate,
                "drop_path_rate": self.drop_path_rate,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "mlp_activation": self.mlp_activation,
                "full_width_tokens": self.full_width_tokens,
            }
        )
        return config
