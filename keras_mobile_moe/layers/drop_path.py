import keras
from keras import ops

from keras_mobile_moe.validation import check_rate


@keras.saving.register_keras_serializable(package="keras_mobile_moe")
class DropPath(keras.layers.Layer):
    """Stochastic depth: drops a whole residual branch per sample in training.

    Huang et al., "Deep Networks with Stochastic Depth", ECCV 2016, as used by
    the DeiT recipe. Survivors are scaled by `1 / (1 - rate)` so the expected
    output is unchanged; at inference the layer is the identity.

    Args:
        rate: float in [0, 1). Probability of dropping the branch.

    Call arguments:
        inputs: tensor `[batch, ...]`, the residual branch.
        training: bool. Drops only when `True`.

    Returns:
        A tensor of the same shape as `inputs`.

    Example:

    >>> import numpy as np
    >>> layer = DropPath(rate=0.5)
    >>> tuple(layer(np.ones((2, 3, 4))).shape)
    (2, 3, 4)
    """

    def __init__(self, rate=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.rate = check_rate("rate", rate)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=None):
        if not training or self.rate == 0.0:
            return inputs
        keep = 1.0 - self.rate
        shape = (ops.shape(inputs)[0],) + (1,) * (len(inputs.shape) - 1)
        mask = keras.random.uniform(shape, seed=self.seed_generator) < keep
        return inputs * ops.cast(mask, inputs.dtype) / keep

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"rate": self.rate, "seed": self.seed})
        return config
