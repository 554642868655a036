import keras
from keras import ops

from keras_mobile_moe.capacity import check_capacity_budget
from keras_mobile_moe.capacity import expert_token_counts
from keras_mobile_moe.layers.token_routed_moe import router_policy
from keras_mobile_moe.validation import check_int


def check_token_counts(token_counts, num_tokens, num_experts=None):
    """Validates per-expert token counts (static ints summing to N)."""
    counts = (
        tuple(token_counts) if isinstance(token_counts, (list, tuple)) else None
    )
    valid = counts is not None and all(
        isinstance(c, int) and not isinstance(c, bool) and c >= 0
        for c in counts
    )
    if (
        not valid
        or sum(counts) != num_tokens
        or (num_experts is not None and len(counts) != num_experts)
    ):
        experts = (
            "one per expert"
            if num_experts is None
            else (f"{num_experts} of them")
        )
        raise ValueError(
            f"Received: token_counts={token_counts!r} for {num_tokens} "
            f"tokens. Expected a tuple of ints >= 0 ({experts}, smallest "
            f"expert first) that sums to the number of tokens {num_tokens}; "
            "see kmm.capacity.expert_token_counts."
        )
    return counts


def permute_tokens(tokens, order):
    """Reorders the tokens of every image: `out[b, p] = tokens[b, order[b, p]]`.

    A gather of whole token rows from the flattened batch (one index per
    token, not per feature), which XLA:CPU runs as a cheap row copy.

    Args:
        tokens: tensor `[batch, num_tokens, ...]`.
        order: int tensor `[batch, num_tokens]`, a permutation per image.

    Returns:
        The permuted tokens, same shape as `tokens`.

    Example:

    >>> import numpy as np
    >>> tokens = np.arange(6, dtype="float32").reshape(1, 3, 2)
    >>> order = np.array([[2, 0, 1]], "int32")
    >>> np.asarray(permute_tokens(tokens, order)).tolist()
    [[[4.0, 5.0], [0.0, 1.0], [2.0, 3.0]]]
    """
    num_tokens = tokens.shape[1]
    feature_shape = tuple(tokens.shape[2:])
    order = ops.cast(order, "int32")
    # Row offset b * num_tokens of every token, without the (possibly
    # symbolic) batch size, at the full [batch, num_tokens] shape and
    # subtracted as its negative. On TensorFlow, keras.ops.add turns an add
    # whose second operand squeezes to a vector of the first one's last
    # length into a BiasAdd: a [batch, 1] operand then mixed up the images'
    # tokens when batch == num_tokens, and a [1, num_tokens] one (batch 1)
    # is an int BiasAdd, which TFLite does not have.
    ones = ops.ones_like(order)
    negative_offsets = (ones - ops.cumsum(ones, axis=0)) * num_tokens
    rows = ops.reshape(order - negative_offsets, (-1,))
    flat = ops.reshape(tokens, (-1, *feature_shape))
    return ops.reshape(
        ops.take(flat, rows, axis=0), (-1, num_tokens, *feature_shape)
    )


def expert_preferred_routing(router_probs, token_counts):
    """Expert Preferred Routing (EPR) of MoNE, static shapes, per image.

    Jain et al., "Mixture of Nested Experts", NeurIPS 2024, Alg. 1. Experts
    choose tokens, biggest first: expert E takes the `token_counts[E-1]`
    tokens with the highest router probability for it, then expert E-1 takes
    its count among the tokens left, and so on; the tokens left at the end go
    to the smallest expert. Every token gets exactly one expert and every
    expert exactly its count. Ties are broken deterministically: among equal
    probabilities the token with the lower index is taken first (a stable
    sort on every backend).

    Args:
        router_probs: float tensor `[batch, num_tokens, num_experts]`.
        token_counts: tuple of `num_experts` Python ints summing to
            `num_tokens`, smallest expert first (see
            `kmm.capacity.expert_token_counts`).

    Returns:
        A tuple `(expert_index, token_order, token_position)` of int32
        tensors `[batch, num_tokens]`:
        `expert_index[b, i]` is the expert (0 = smallest) of token i;
        `token_order[b, p]` is the token at position p when the tokens are
        grouped by expert (expert 0's group first, each group in its
        expert's preference order); `token_position` is its inverse
        (the position of every token in that grouping).

    Example:

    >>> import numpy as np
    >>> probs = np.array([[[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5]]])
    >>> expert, order, position = expert_preferred_routing(probs, (2, 2))
    >>> np.asarray(expert).tolist(), np.asarray(order).tolist()
    ([[0, 1, 0, 1]], [[0, 2, 1, 3]])
    """
    probs = ops.cast(ops.convert_to_tensor(router_probs), "float32")
    if len(probs.shape) != 3:
        raise ValueError(
            "expert_preferred_routing expects router probabilities "
            "[batch, num_tokens, num_experts]. Received: shape "
            f"{tuple(probs.shape)}."
        )
    num_tokens, num_experts = probs.shape[1], probs.shape[2]
    counts = check_token_counts(token_counts, num_tokens, num_experts)
    chosen = [None] * num_experts
    taken = None  # bool [batch, num_tokens]: already has a bigger expert
    left = num_tokens
    for j in reversed(range(num_experts)):  # E static experts, biggest first
        if counts[j] == 0:
            continue
        key = -probs[:, :, j]
        if taken is not None:
            key = ops.where(taken, 2.0, key)  # taken tokens sort last
        order = ops.cast(ops.argsort(key, axis=-1), "int32")
        chosen[j] = order[:, : counts[j]]
        left -= counts[j]
        if left and j > 0:
            rank = ops.argsort(order, axis=-1)  # distinct keys: any sort
            newly = rank < counts[j]
            taken = newly if taken is None else ops.logical_or(taken, newly)
    token_order = ops.concatenate([c for c in chosen if c is not None], axis=1)
    token_position = ops.cast(ops.argsort(token_order, axis=-1), "int32")
    expert_index = ops.zeros_like(token_position)
    start = 0
    for j in range(1, num_experts):
        start += counts[j - 1]
        if start < num_tokens:
            expert_index = expert_index + ops.cast(
                token_position >= start, "int32"
            )
    return expert_index, token_order, token_position


@keras.saving.register_keras_serializable(package="keras_mobile_moe")
class NestedExpertRouter(keras.layers.Layer):
    """The token router of MoNE with Expert Preferred Routing.

    Jain et al., "Mixture of Nested Experts: Adaptive Processing of Visual
    Tokens", NeurIPS 2024, Sec. 3.2. One linear layer on the patch embeddings
    gives each token a float32 softmax over the `num_nested_experts` nested
    experts; `expert_preferred_routing` then assigns every token to exactly
    one expert, with the per-expert token counts that the capacity budget
    fixes (`kmm.capacity_distribution`). All blocks of a MoNE model reuse
    this assignment.

    Args:
        num_nested_experts: int >= 1. Number of nested experts E.
        capacity_budget: float in `[1/2^(E-1), 1]`. The compute budget e_c;
            may be changed after the layer is built (`layer.capacity_budget
            = 0.4`): it only changes the static token counts.

    Call arguments:
        inputs: tokens `[batch, num_tokens, hidden_dim]`.

    Returns:
        A tuple `(router_probs, expert_index, token_order, token_position,
        expert_gates)`: float32 probabilities `[batch, num_tokens, E]`;
        int32 `[batch, num_tokens]` expert of every token, grouping
        permutation and its inverse (see `expert_preferred_routing`); and
        float32 `[batch, num_tokens]` probability of each token's own expert,
        in grouped order (the `r` that scales each block's MLP branch).

    Example:

    >>> import numpy as np
    >>> router = NestedExpertRouter(num_nested_experts=4, capacity_budget=0.5)
    >>> probs, expert, order, position, gates = router(np.ones((2, 16, 8)))
    >>> tuple(probs.shape), tuple(expert.shape), tuple(gates.shape)
    ((2, 16, 4), (2, 16), (2, 16))
    >>> np.bincount(np.asarray(expert[0]), minlength=4).tolist()
    [5, 3, 4, 4]
    """

    def __init__(self, num_nested_experts=4, capacity_budget=1.0, **kwargs):
        super().__init__(**kwargs)
        self.num_nested_experts = check_int(
            "num_nested_experts", num_nested_experts, minimum=1
        )
        self.capacity_budget = capacity_budget

    @property
    def capacity_budget(self):
        return self._capacity_budget

    @capacity_budget.setter
    def capacity_budget(self, value):
        check_capacity_budget(value, self.num_nested_experts)
        self._capacity_budget = float(value)

    def token_counts(self, num_tokens):
        """Tokens per expert (smallest first) for images of `num_tokens`."""
        return expert_token_counts(
            self.capacity_budget, num_tokens, self.num_nested_experts
        )

    def build(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(
                "NestedExpertRouter expects tokens [batch, num_tokens, "
                f"hidden_dim]. Received: input_shape={tuple(input_shape)}."
            )
        # float32 compute under mixed policies (see `router_policy`).
        self.dense = keras.layers.Dense(
            self.num_nested_experts,
            dtype=router_policy(self.dtype_policy),
            name="dense",
        )
        self.dense.build(input_shape)
        self.built = True

    def call(self, inputs):
        logits = ops.cast(self.dense(inputs), "float32")
        if self.num_nested_experts == 1:  # one expert: nothing to choose
            probs = ops.ones_like(logits)
        else:
            probs = ops.softmax(logits, axis=-1)
        counts = self.token_counts(inputs.shape[1])
        expert_index, token_order, token_position = expert_preferred_routing(
            probs, counts
        )
        grouped = permute_tokens(probs, token_order)
        gates, start = [], 0
        for j, count in enumerate(counts):  # static slices, E experts
            if count:
                gates.append(grouped[:, start : start + count, j])
                start += count
        expert_gates = ops.concatenate(gates, axis=1)
        return probs, expert_index, token_order, token_position, expert_gates

    def compute_output_spec(self, inputs):
        batch, num_tokens = inputs.shape[0], inputs.shape[1]
        tokens = (batch, num_tokens)
        return (
            keras.KerasTensor(tokens + (self.num_nested_experts,), "float32"),
            keras.KerasTensor(tokens, dtype="int32"),
            keras.KerasTensor(tokens, dtype="int32"),
            keras.KerasTensor(tokens, dtype="int32"),
            keras.KerasTensor(tokens, dtype="float32"),
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_nested_experts": self.num_nested_experts,
                "capacity_budget": self.capacity_budget,
            }
        )
        return config
