import keras

from keras_mobile_moe.layers.activations import get_activation
from keras_mobile_moe.layers.activations import serialize_activation
from keras_mobile_moe.validation import check_int
from keras_mobile_moe.validation import check_rate


@keras.saving.register_keras_serializable(package="keras_mobile_moe")
class MLP(keras.layers.Layer):
    """The transformer feed-forward block: Dense -> activation -> Dense.

    Vaswani et al., "Attention Is All You Need", NeurIPS 2017; ViT uses GELU.

    Args:
        intermediate_dim: int. Hidden width (4 x width in ViT).
        activation: activation of the hidden layer (tanh-approximate GELU
            by default, as in the paper's JAX ViTs).
        dropout_rate: float in [0, 1). Dropout after the hidden layer.

    Call arguments:
        inputs: tensor `[..., hidden_dim]`.
        training: bool. Enables dropout.

    Returns:
        A tensor of the same shape as `inputs`.

    Example:

    >>> import numpy as np
    >>> tuple(MLP(intermediate_dim=32)(np.ones((2, 5, 8))).shape)
    (2, 5, 8)
    """

    def __init__(
        self,
        intermediate_dim,
        activation="keras_mobile_moe>gelu_tanh",
        dropout_rate=0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.intermediate_dim = check_int(
            "intermediate_dim", intermediate_dim, minimum=1
        )
        self.activation = get_activation(activation)
        self.dropout_rate = check_rate("dropout_rate", dropout_rate)

    def build(self, input_shape):
        self.dense_in = keras.layers.Dense(
            self.intermediate_dim,
            activation=self.activation,
            dtype=self.dtype_policy,
            name="dense_in",
        )
        self.dense_in.build(input_shape)
        self.dropout = keras.layers.Dropout(
            self.dropout_rate, dtype=self.dtype_policy, name="dropout"
        )
        self.dense_out = keras.layers.Dense(
            input_shape[-1], dtype=self.dtype_policy, name="dense_out"
        )
        self.dense_out.build(tuple(input_shape[:-1]) + (self.intermediate_dim,))
        self.built = True

    def call(self, inputs, training=None):
        hidden = self.dropout(self.dense_in(inputs), training=training)
        return self.dense_out(hidden)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "intermediate_dim": self.intermediate_dim,
                "activation": serialize_activation(self.activation),
                "dropout_rate": self.dropout_rate,
            }
        )
        return config
