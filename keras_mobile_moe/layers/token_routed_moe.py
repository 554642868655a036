import math

import keras
from keras import ops

from keras_mobile_moe.layers.activations import get_activation
from keras_mobile_moe.layers.activations import serialize_activation
from keras_mobile_moe.layers.image_routed_moe import add_stacked_experts
from keras_mobile_moe.validation import check_int
from keras_mobile_moe.validation import check_rate


def router_policy(policy):
    """The dtype policy of a router's sublayers.

    Under a mixed policy (`mixed_float16`, `mixed_bfloat16`: float32
    variables, half compute) it is float32: routers are cheap (one small
    matmul per image or token) and their top-k is a discrete decision that
    half-precision logits flip on near ties. Otherwise it is `policy`
    itself (a pure `float16` model keeps float16 router weights).

    Example:

    >>> router_policy(keras.DTypePolicy("mixed_bfloat16"))
    'float32'
    >>> router_policy(keras.DTypePolicy("float32")).name
    'float32'
    """
    half = keras.backend.standardize_dtype(policy.compute_dtype) in (
        "float16",
        "bfloat16",
    )
    if half and policy.variable_dtype == "float32":
        return "float32"
    return policy


def check_positive_float(name, value):
    """Raises `ValueError` unless `value` is a real number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Received: {name}={value!r}. Expected a float > 0.")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"Received: {name}={value!r}. Expected a float > 0.")
    return float(value)


def check_non_negative_float(name, value):
    """Raises `ValueError` unless `value` is a real number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Received: {name}={value!r}. Expected a float >= 0.")
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"Received: {name}={value!r}. Expected a float >= 0.")
    return float(value)


def expert_capacity(num_tokens, num_experts, top_k=1, capacity_factor=1.0):
    """Slots per expert and per group (image) of V-MoE token routing.

    `C = ceil(capacity_factor * top_k * num_tokens / num_experts)`
    (Riquelme et al. 2021, Sec. 2.2), clipped to `[1, num_tokens]`: a token
    picks an expert at most once, so more than `num_tokens` slots could
    never be filled.

    Args:
        num_tokens: int. Tokens per group (the tokens of one image).
        num_experts: int. Number of experts E.
        top_k: int. Experts per token.
        capacity_factor: float > 0. 1.0 gives exactly enough slots for a
            perfectly balanced assignment.

    Returns:
        int. The capacity C of every expert.

    Example:

    >>> expert_capacity(17, 4), expert_capacity(17, 4, capacity_factor=0.5)
    (5, 3)
    >>> expert_capacity(17, 1, capacity_factor=2.0)
    17
    """
    check_int("num_tokens", num_tokens, minimum=1)
    check_int("num_experts", num_experts, minimum=1)
    check_int("top_k", top_k, minimum=1, maximum=num_experts)
    capacity_factor = check_positive_float("capacity_factor", capacity_factor)
    # The small tolerance keeps e.g. 1.1 * 40 / 4 = 11.000000000000002 at 11.
    slots = math.ceil(capacity_factor * top_k * num_tokens / num_experts - 1e-9)
    return max(1, min(num_tokens, slots))


@keras.saving.register_keras_serializable(package="keras_mobile_moe")
class TokenRoutedMoE(keras.layers.Layer):
    """A V-MoE layer: every token picks its own top-k experts (with capacity).

    Riquelme et al., "Scaling Vision with Sparse Mixture of Experts"
    (V-MoE), NeurIPS 2021, Sec. 2; the per-token routing ablation of
    Daxberger et al., "Mobile V-MoEs", arXiv 2309.04354, Fig. 3e. The layer
    has its own router (a linear layer without bias, as in V-MoE, to E
    logits, softmax in float32) and keeps the `top_k` most probable experts
    of every token; a token's output is `sum_i g_i(x) * e_i(x)` over the
    experts that accepted it.

    Capacity and dropping: each image is one routing group. Every expert
    has `C = expert_capacity(num_tokens, E, top_k, capacity_factor)` slots
    per image (a Python int: static shapes). Slots are filled in V-MoE's
    "vanilla" order: first every token's first choice in token order, then
    every token's second choice, and so on; a choice that finds its expert
    full is dropped (it contributes 0, and the block's residual connection
    carries the token on). The result of an image never depends on the
    rest of the batch.

    Compute is sparse: a gather puts the tokens into the `E * C` slots of
    each image, the stacked expert kernels `[E, ...]` run on their `C`
    slots only (`E * C` expert-MLP token passes per image, not
    `E * num_tokens`), and a gather brings the results back.

    Auxiliary loss: the load-balancing loss of the Switch Transformer
    (Fedus et al., JMLR 2022, Eq. 4), `E * sum_e f_e * P_e`, computed per
    image and averaged, where `f_e` is the fraction of the image's token
    choices (all k, before capacity dropping, divided by k) that go to
    expert e and `P_e` the mean router probability of e. It is 1 for a
    perfectly balanced router. In training it is added with
    `self.add_loss(aux_loss_weight * loss)`, so `fit` minimises it; V-MoE
    uses importance + load losses with weight 0.01 and noisy gating; this
    layer uses no router noise, which the Switch loss does not need.

    Args:
        num_experts: int. Number of experts E.
        intermediate_dim: int. Hidden width of every expert MLP.
        top_k: int in [1, num_experts]. Experts per token.
        capacity_factor: float > 0. Scales the expert capacity C.
        normalize_gates: bool. Rescale the k gates of a token to sum to 1
            (V-MoE does not).
        aux_loss_weight: float >= 0. Coefficient of the load-balancing loss
            (0 disables it).
        activation: activation of the expert hidden layer (tanh-approximate
            GELU by default).
        dropout_rate: float in [0, 1). Dropout after the hidden layer.

    Call arguments:
        inputs: tokens `[batch, num_tokens, hidden_dim]`.
        training: bool. Enables dropout and the auxiliary loss.

    Returns:
        Tokens `[batch, num_tokens, hidden_dim]`.

    Example:

    >>> import numpy as np
    >>> moe = TokenRoutedMoE(num_experts=4, intermediate_dim=32)
    >>> tokens = np.random.default_rng(0).normal(size=(2, 17, 8))
    >>> tuple(moe(tokens.astype("float32")).shape)
    (2, 17, 8)
    >>> moe.capacity(17)
    5
    >>> _ = moe(tokens.astype("float32"), training=True)
    >>> len(moe.losses)
    1
    """

    def __init__(
        self,
        num_experts,
        intermediate_dim,
        top_k=1,
        capacity_factor=1.0,
        normalize_gates=False,
        aux_loss_weight=0.01,
        activation="keras_mobile_moe>gelu_tanh",
        dropout_rate=0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_experts = check_int("num_experts", num_experts, minimum=1)
        self.intermediate_dim = check_int(
            "intermediate_dim", intermediate_dim, minimum=1
        )
        self.top_k = check_int("top_k", top_k, minimum=1, maximum=num_experts)
        self.capacity_factor = check_positive_float(
            "capacity_factor", capacity_factor
        )
        self.normalize_gates = bool(normalize_gates)
        self.aux_loss_weight = check_non_negative_float(
            "aux_loss_weight", aux_loss_weight
        )
        self.activation = get_activation(activation)
        self.dropout_rate = check_rate("dropout_rate", dropout_rate)

    def capacity(self, num_tokens):
        """The expert capacity C for groups of `num_tokens` tokens."""
        return expert_capacity(
            num_tokens, self.num_experts, self.top_k, self.capacity_factor
        )

    def build(self, input_shape):
        if len(input_shape) != 3 or input_shape[1] is None:
            raise ValueError(
                "TokenRoutedMoE expects tokens [batch, num_tokens, hidden_dim]"
                " with a known num_tokens. Received: "
                f"input_shape={tuple(input_shape)}."
            )
        hidden_dim = input_shape[-1]
        # The router computes in float32 under every policy (V-MoE does
        # too): in bfloat16 the logits of near-tied experts round together
        # and top-k flips (seen in tests/test_layers_mixed_precision.py).
        # Its weights are float32 under mixed policies anyway.
        self.router = keras.layers.Dense(
            self.num_experts,
            use_bias=False,
            dtype=router_policy(self.dtype_policy),
            name="router",
        )
        self.router.build(input_shape)
        add_stacked_experts(self, hidden_dim)
        self.built = True

    def route(self, inputs):
        """Routes the tokens of every image; the layer's bookkeeping.

        Args:
            inputs: tokens `[batch, num_tokens, hidden_dim]`.

        Returns:
            A dict of tensors:
            `"router_probs"`: float32 `[batch, num_tokens, E]`;
            `"expert_indices"`: int32 `[batch, num_tokens, top_k]` (most
            probable first); `"expert_gates"`: float32, their probabilities;
            `"positions"`: int32 `[batch, num_tokens, top_k]`, the slot of
            each choice in its expert's buffer; `"kept"`: bool, whether the
            choice got a slot (`positions < C`); `"aux_loss"`: the float32
            load-balancing loss (before `aux_loss_weight`).
        """
        if not self.built:
            self.build(tuple(inputs.shape))
        num_tokens = inputs.shape[1]
        experts, k = self.num_experts, self.top_k
        capacity = self.capacity(num_tokens)
        logits = ops.cast(self.router(inputs), "float32")
        if experts > 1:
            probs = ops.softmax(logits, axis=-1)
        else:  # a softmax over one expert is 1 (and Keras warns about it)
            probs = ops.ones_like(logits)
        gates, indices = ops.top_k(probs, k)
        indices = ops.cast(indices, "int32")

        # Choice-major order: all first choices (in token order), then all
        # second choices, ... (V-MoE's vanilla routing priority).
        choices = ops.reshape(
            ops.transpose(indices, (0, 2, 1)), (-1, k * num_tokens)
        )
        masks = ops.one_hot(choices, experts, dtype="int32")  # [B, kN, E]
        filled_before = ops.cast(ops.cumsum(masks, axis=1), "int32") - masks
        positions = ops.sum(filled_before * masks, axis=-1)  # [B, kN]
        positions = ops.transpose(
            ops.reshape(positions, (-1, k, num_tokens)), (0, 2, 1)
        )

        # Switch Transformer load-balancing loss, per image, then averaged.
        assigned = ops.mean(ops.cast(masks, "float32"), axis=1)  # f_e
        mean_probs = ops.mean(probs, axis=1)  # P_e
        aux_loss = experts * ops.mean(ops.sum(assigned * mean_probs, axis=-1))
        return {
            "router_probs": probs,
            "expert_indices": indices,
            "expert_gates": gates,
            "positions": positions,
            "kept": ops.less(positions, capacity),
            "aux_loss": aux_loss,
        }

    def call(self, inputs, training=None):
        num_tokens, hidden_dim = inputs.shape[1], inputs.shape[2]
        experts, k = self.num_experts, self.top_k
        capacity = self.capacity(num_tokens)
        slots = experts * capacity
        routing = self.route(inputs)
        if training and self.aux_loss_weight > 0:
            self.add_loss(self.aux_loss_weight * routing["aux_loss"])

        # Slot of every (choice, token) in the image's E * C buffer, or the
        # extra slot `slots` (always empty) for dropped choices. [B, kN]
        kept = routing["kept"]
        slot = routing["expert_indices"] * capacity + routing["positions"]
        slot = ops.where(kept, slot, slots)
        slot = ops.reshape(ops.transpose(slot, (0, 2, 1)), (-1, k * num_tokens))

        # Token filling every slot (-1: empty), by comparison and a max,
        # which XLA and TFLite see as element-wise work. [B, E * C]
        token_ids = ops.arange(k * num_tokens, dtype="int32") % num_tokens
        match = ops.equal(
            slot[:, :, None], ops.arange(slots, dtype="int32")[None, None, :]
        )
        slot_token = ops.max(
            ops.where(match, token_ids[None, :, None], -1), axis=1
        )
        # Empty slots read token 0; their results are never gathered back.
        slot_token = ops.maximum(slot_token, 0)

        # Dispatch (gather), the experts on their C slots, combine (gather).
        expert_inputs = ops.take_along_axis(
            inputs, slot_token[:, :, None], axis=1
        )
        expert_inputs = ops.reshape(
            expert_inputs, (-1, experts, capacity, hidden_dim)
        )
        hidden = ops.einsum("becd,edh->bech", expert_inputs, self.kernel_in)
        hidden = self.activation(hidden + self.bias_in[None, :, None, :])
        hidden = self.dropout(hidden, training=training)
        outputs = ops.einsum("bech,ehd->becd", hidden, self.kernel_out)
        outputs = outputs + self.bias_out[None, :, None, :]
        outputs = ops.reshape(outputs, (-1, slots, hidden_dim))
        outputs = ops.concatenate(
            [outputs, ops.zeros_like(outputs[:, :1, :])], axis=1
        )
        picked = ops.take_along_axis(outputs, slot[:, :, None], axis=1)
        picked = ops.reshape(picked, (-1, k, num_tokens, hidden_dim))

        gates = routing["expert_gates"]
        if self.normalize_gates:
            gates = gates / ops.sum(gates, axis=-1, keepdims=True)
        gates = ops.where(kept, gates, 0.0)
        gates = ops.cast(ops.transpose(gates, (0, 2, 1)), picked.dtype)
        if k == 1:
            return picked[:, 0] * gates[:, 0, :, None]
        return ops.sum(picked * gates[..., None], axis=1)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "intermediate_dim": self.intermediate_dim,
                "top_k": self.top_k,
                "capacity_factor": self.capacity_factor,
                "normalize_gates": self.normalize_gates,
                "aux_loss_weight": self.aux_loss_weight,
                "activation": serialize_activation(self.activation),
                "dropout_rate": self.dropout_rate,
            }
        )
        return config
