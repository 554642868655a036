import contextlib
import math

import keras

from keras_mobile_moe.layers.activations import get_activation
from keras_mobile_moe.layers.activations import serialize_activation
from keras_mobile_moe.layers.attention import attend
from keras_mobile_moe.layers.drop_path import DropPath
from keras_mobile_moe.layers.fast_ops import fused_linear
from keras_mobile_moe.layers.fast_ops import layer_norm
from keras_mobile_moe.layers.fast_ops import linear
from keras_mobile_moe.layers.fast_ops import reshape
from keras_mobile_moe.layers.image_routed_moe import ImageRoutedMoE
from keras_mobile_moe.layers.mlp import MLP
from keras_mobile_moe.layers.token_routed_moe import TokenRoutedMoE
from keras_mobile_moe.layers.token_routed_moe import check_non_negative_float
from keras_mobile_moe.layers.token_routed_moe import check_positive_float
from keras_mobile_moe.validation import check_choice
from keras_mobile_moe.validation import check_int
from keras_mobile_moe.validation import check_rate


def _scope(layer, tf_names):
    """The name scope a call of `layer` would open, on TensorFlow only
    (the attention's ops keep the `attention/` prefix in exported files);
    other backends do not name ops: no context, no per-call work."""
    if tf_names:
        return keras.name_scope(layer.name, caller=layer)
    return contextlib.nullcontext()


@keras.saving.register_keras_serializable(package="keras_mobile_moe")
class TransformerEncoderBlock(keras.layers.Layer):
    """A pre-norm ViT encoder block whose MLP may be a mixture of experts.

    `x = x + DropPath(MHSA(LN(x)))`, then `x = x + DropPath(MLP(LN(x)))`
    (Dosovitskiy et al., ICLR 2021). With `num_experts > 0` the MLP is an
    `ImageRoutedMoE` and the block is a Mobile V-MoE block (Daxberger et al.
    2023, Fig. 2c): attention stays dense and shared. With
    `router_type="token"` the MLP is a `TokenRoutedMoE` instead, with its
    own per-token router (V-MoE, Riquelme et al. 2021; the per-token
    ablation of Mobile V-MoE, Fig. 3e).

    Args:
        hidden_dim: int. Token width; must be divisible by `num_heads`.
        num_heads: int. Attention heads.
        mlp_dim: int. Hidden width of the MLP (of every expert).
        num_experts: int. 0 for a dense block, else the number of experts.
        top_k: int. Experts per image, or per token with
            `router_type="token"` (MoE blocks only).
        normalize_gates: bool. See `ImageRoutedMoE`.
        router_type: `"image"` (experts chosen per image by an outside
            `ImageRouter`, passed in the call) or `"token"` (the block's
            `TokenRoutedMoE` routes every token itself).
        capacity_factor: float > 0. Expert capacity factor of token routing
            (see `TokenRoutedMoE`); unused with `router_type="image"`.
        aux_loss_weight: float >= 0. Load-balancing loss coefficient of
            token routing; unused with `router_type="image"`.
        dropout_rate: float in [0, 1). Dropout in the MLP and after attention.
        attention_dropout_rate: float in [0, 1). Dropout on attention weights.
        drop_path_rate: float in [0, 1). Stochastic depth of both branches.
        layer_norm_epsilon: float. Epsilon of the layer norms.
        mlp_activation: activation of the MLP (and expert) hidden layer:
            `"keras_mobile_moe>gelu_tanh"` (default, the paper's JAX ViTs)
            or `"gelu"` (exact GELU, as in timm and keras-hub ViTs).

    Call arguments:
        inputs: tokens `[batch, num_tokens, hidden_dim]`.
        expert_indices: int tensor `[batch, top_k]` (image-routed MoE
            blocks only).
        expert_gates: float tensor `[batch, top_k]` (image-routed MoE
            blocks only).
        training: bool.

    Returns:
        Tokens `[batch, num_tokens, hidden_dim]`.

    Example:

    >>> import numpy as np
    >>> block = TransformerEncoderBlock(hidden_dim=16, num_heads=2, mlp_dim=32)
    >>> tuple(block(np.ones((2, 5, 16), "float32")).shape)
    (2, 5, 16)
    >>> token_block = TransformerEncoderBlock(
    ...     hidden_dim=16, num_heads=2, mlp_dim=32, num_experts=4,
    ...     router_type="token")
    >>> tuple(token_block(np.ones((2, 5, 16), "float32")).shape)
    (2, 5, 16)
    """

    def __init__(
        self,
        hidden_dim,
        num_heads,
        mlp_dim,
        num_experts=0,
        top_k=1,
        normalize_gates=False,
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
        drop_path_rate=0.0,
        layer_norm_epsilon=1e-6,
        router_type="image",
        capacity_factor=1.0,
        aux_loss_weight=0.01,
        mlp_activation="keras_mobile_moe>gelu_tanh",
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
        self.num_experts = check_int("num_experts", num_experts, minimum=0)
        self.top_k = check_int(
            "top_k", top_k, minimum=1, maximum=max(num_experts, 1)
        )
        self.normalize_gates = bool(normalize_gates)
        self.dropout_rate = check_rate("dropout_rate", dropout_rate)
        self.attention_dropout_rate = check_rate(
            "attention_dropout_rate", attention_dropout_rate
        )
        self.drop_path_rate = check_rate("drop_path_rate", drop_path_rate)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.router_type = check_choice(
            "router_type", router_type, ("image", "token")
        )
        self.capacity_factor = check_positive_float(
            "capacity_factor", capacity_factor
        )
        self.aux_loss_weight = check_non_negative_float(
            "aux_loss_weight", aux_loss_weight
        )
        self.mlp_activation = serialize_activation(
            get_activation(mlp_activation)
        )

    @property
    def is_moe(self):
        return self.num_experts > 0

    def build(
        self, inputs_shape, expert_indices_shape=None, expert_gates_shape=None
    ):
        input_shape = inputs_shape
        if input_shape[-1] != self.hidden_dim:
            raise ValueError(
                f"TransformerEncoderBlock(hidden_dim={self.hidden_dim}) "
                f"received tokens of shape {tuple(input_shape)}."
            )
        policy = self.dtype_policy
        eps = self.layer_norm_epsilon
        self.attention_norm = keras.layers.LayerNormalization(
            epsilon=eps, dtype=policy, name="attention_norm"
        )
        self.attention_norm.build(input_shape)
        self.attention = keras.layers.MultiHeadAttention(
            num_heads=self.num_heads,
            key_dim=self.hidden_dim // self.num_heads,
            dropout=self.attention_dropout_rate,
            dtype=policy,
            name="attention",
        )
        self.attention.build(input_shape, input_shape)
        self._scale = 1.0 / math.sqrt(self.hidden_dim // self.num_heads)
        self.attention_dropout = keras.layers.Dropout(
            self.dropout_rate, dtype=policy, name="attention_output_dropout"
        )
        self.mlp_norm = keras.layers.LayerNormalization(
            epsilon=eps, dtype=policy, name="mlp_norm"
        )
        self.mlp_norm.build(input_shape)
        if self.is_moe and self.router_type == "token":
            self.mlp = TokenRoutedMoE(
                num_experts=self.num_experts,
                intermediate_dim=self.mlp_dim,
                top_k=self.top_k,
                capacity_factor=self.capacity_factor,
                normalize_gates=self.normalize_gates,
                aux_loss_weight=self.aux_loss_weight,
                activation=self.mlp_activation,
                dropout_rate=self.dropout_rate,
                dtype=policy,
                name="moe",
            )
        elif self.is_moe:
            self.mlp = ImageRoutedMoE(
                num_experts=self.num_experts,
                intermediate_dim=self.mlp_dim,
                top_k=self.top_k,
                normalize_gates=self.normalize_gates,
                activation=self.mlp_activation,
                dropout_rate=self.dropout_rate,
                dtype=policy,
                name="moe",
            )
        else:
            self.mlp = MLP(
                intermediate_dim=self.mlp_dim,
                activation=self.mlp_activation,
                dropout_rate=self.dropout_rate,
                dtype=policy,
                name="mlp",
            )
        self.mlp.build(input_shape)
        self.mlp_dropout = keras.layers.Dropout(
            self.dropout_rate, dtype=policy, name="mlp_output_dropout"
        )
        self.drop_path = DropPath(
            self.drop_path_rate, dtype=policy, name="drop_path"
        )
        # `call` runs it only in training; built now, or Keras would see an
        # unbuilt layer and re-build the model on every `fit` (consuming a
        # batch of a one-pass generator).
        self.drop_path.build(input_shape)
        self.built = True

    def call(
        self, inputs, expert_indices=None, expert_gates=None, training=None
    ):
        # The sublayers hold the weights (their variable paths are the
        # checkpoint format); the block computes with those weights itself.
        # A Keras layer call costs ~0.1 ms of Python on PyTorch eager and a
        # ViT block made ~17 of them, which was most of the gap to timm at
        # batch 1; a few backend ops per step do the same math. Variables
        # are read through `.value`, which the layer's autocast scope casts
        # to the compute dtype under a mixed policy.
        #
        # On TensorFlow the norms and the MLP / MoE stay layer calls: the
        # TFLite export finds their ops by the TF names those calls give
        # (it keeps the LayerNorms and the residual additions in float32 in
        # int8 files) and TensorFlow runs traced, where a layer call costs
        # nothing per step.
        tf_names = keras.config.backend() == "tensorflow"
        dropping = bool(training) and self.dropout_rate > 0.0
        x = self._norm(self.attention_norm, inputs, tf_names)
        with _scope(self.attention, tf_names):
            x = self._self_attention(x, training)
        if dropping:
            x = self.attention_dropout(x, training=training)
        x = inputs + self._drop_path(x, training)

        y = self._norm(self.mlp_norm, x, tf_names)
        if self.is_moe and self.router_type == "image":
            if expert_indices is None or expert_gates is None:
                raise ValueError(
                    "An MoE TransformerEncoderBlock needs `expert_indices` "
                    "and `expert_gates` from an ImageRouter. Received None."
                )
            if tf_names:
                y = self.mlp(y, expert_indices, expert_gates, training=training)
            else:
                y = self.mlp.call(
                    y, expert_indices, expert_gates, training=training
                )
        elif self.is_moe or tf_names:
            # Token-routed MoE: a layer call, so that its `add_loss`
            # (training only) registers.
            y = self.mlp(y, training=training)
        else:
            y = self._dense_mlp(y, training)
        if dropping:
            y = self.mlp_dropout(y, training=training)
        return x + self._drop_path(y, training)

    def _norm(self, layer, x, tf_names):
        if tf_names:
            return layer(x)
        return layer_norm(
            x, layer.gamma.value, layer.beta.value, self.layer_norm_epsilon
        )

    def _self_attention(self, x, training):
        """Keras `MultiHeadAttention(x, x)` with its own weights: Q, K, V
        projections as plain matmuls, `attend` (fused attention), the
        output projection."""
        attention, width = self.attention, self.hidden_dim
        # Kernels [D, H, D/H] as [D, D] matrices: a matmul instead of an
        # einsum (the PyTorch backend ran those as bmm + copies).
        dense_layers = (
            attention.query_dense,
            attention.key_dense,
            attention.value_dense,
        )
        projected = fused_linear(
            x,
            [reshape(d.kernel.value, (width, width)) for d in dense_layers],
            [reshape(d.bias.value, (width,)) for d in dense_layers],
        )
        out = attend(
            *projected,
            self.num_heads,
            self._scale,
            dropout=attention._dropout_layer,
            training=training,
        )
        output = attention.output_dense
        out_kernel = reshape(output.kernel.value, (width, width))
        return linear(out, out_kernel, output.bias.value)

    def _dense_mlp(self, y, training):
        """`MLP.call` with its weights: Dense -> activation -> Dense."""
        mlp = self.mlp
        y = linear(y, mlp.dense_in.kernel.value, mlp.dense_in.bias.value)
        y = mlp.activation(y)
        if training and mlp.dropout_rate > 0.0:
            y = mlp.dropout(y, training=training)
        return linear(y, mlp.dense_out.kernel.value, mlp.dense_out.bias.value)

    def _drop_path(self, x, training):
        if training and self.drop_path_rate > 0.0:
            return self.drop_path(x, training=training)
        return x

    def compute_output_shape(
        self, inputs_shape, expert_indices_shape=None, expert_gates_shape=None
    ):
        return inputs_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "num_heads": self.num_heads,
                "mlp_dim": self.mlp_dim,
                "num_experts": self.num_experts,
                "top_k": self.top_k,
                "normalize_gates": self.normalize_gates,
                "dropout_rate": self.dropout_rate,
                "attention_dropout_rate": self.attention_dropout_rate,
                "drop_path_rate": self.drop_path_rate,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "router_type": self.router_type,
                "capacity_factor": self.capacity_factor,
                "aux_loss_weight": self.aux_loss_weight,
                "mlp_activation": self.mlp_activation,
            }
        )
        return config
