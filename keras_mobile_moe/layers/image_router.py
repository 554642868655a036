import keras
from keras import ops

from keras_mobile_moe.layers.token_routed_moe import router_policy
from keras_mobile_moe.validation import check_choice
from keras_mobile_moe.validation import check_int


@keras.saving.register_keras_serializable(package="keras_mobile_moe")
class ImageRouter(keras.layers.Layer):
    """Per-image router of Mobile V-MoE: one expert choice for a whole image.

    Daxberger et al., "Mobile V-MoEs", arXiv 2309.04354, Sec. 2. The image
    representation (the class token, or the mean of the tokens: the paper
    does not say which, so it is the `pooling` option) is layer-normalised and
    goes through a linear layer to `num_experts` logits; the softmax runs in
    float32 and the top `top_k` experts are kept. The layer norm is our
    choice (the paper only says "linear"): the residual stream the router
    reads is not normalised, and without it the initial router logits are
    large and overconfident, as V-MoE avoids by routing after the MLP norm.
    All MoE layers after the router reuse its choice. Under a mixed dtype
    policy the router computes in float32 (its weights are float32 anyway):
    a top-k in half precision flips on near ties.

    Args:
        num_experts: int. Number of experts E to choose from.
        top_k: int in [1, num_experts]. Experts per image.
        pooling: `"token"` (the first token, i.e. the class token) or
            `"mean"` (the mean of all tokens).

    Call arguments:
        inputs: tokens `[batch, num_tokens, hidden_dim]`.

    Returns:
        A tuple `(router_logits, expert_indices, expert_gates)`:
        float32 logits `[batch, num_experts]`, int32 indices of the chosen
        experts `[batch, top_k]` (most probable first) and their float32
        softmax probabilities `[batch, top_k]`.

    Example:

    >>> import numpy as np
    >>> router = ImageRouter(num_experts=4, top_k=2)
    >>> logits, indices, gates = router(np.ones((3, 5, 8)))
    >>> tuple(logits.shape), tuple(indices.shape), tuple(gates.shape)
    ((3, 4), (3, 2), (3, 2))
    """

    def __init__(self, num_experts, top_k=1, pooling="token", **kwargs):
        super().__init__(**kwargs)
        self.num_experts = check_int("num_experts", num_experts, minimum=1)
        self.top_k = check_int("top_k", top_k, minimum=1, maximum=num_experts)
        self.pooling = check_choice("pooling", pooling, ("token", "mean"))

    def build(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(
                "ImageRouter expects tokens [batch, num_tokens, hidden_dim]. "
                f"Received: input_shape={tuple(input_shape)}."
            )
        # float32 compute under mixed policies (see `router_policy`).
        policy = router_policy(self.dtype_policy)
        self.norm = keras.layers.LayerNormalization(
            epsilon=1e-6, dtype=policy, name="norm"
        )
        self.norm.build((input_shape[0], input_shape[-1]))
        self.dense = keras.layers.Dense(
            self.num_experts, dtype=policy, name="dense"
        )
        self.dense.build((input_shape[0], input_shape[-1]))
        self.built = True

    def call(self, inputs):
        if self.pooling == "token":
            representation = inputs[:, 0, :]
        else:
            representation = ops.mean(inputs, axis=1)
        representation = self.norm(representation)
        router_logits = ops.cast(self.dense(representation), "float32")
        probabilities = ops.softmax(router_logits, axis=-1)
        expert_gates, expert_indices = ops.top_k(probabilities, self.top_k)
        return router_logits, ops.cast(expert_indices, "int32"), expert_gates

    def compute_output_spec(self, inputs):
        batch = inputs.shape[0]
        return (
            keras.KerasTensor((batch, self.num_experts), dtype="float32"),
            keras.KerasTensor((batch, self.top_k), dtype="int32"),
            keras.KerasTensor((batch, self.top_k), dtype="float32"),
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "top_k": self.top_k,
                "pooling": self.pooling,
            }
        )
        return config
