import keras


@keras.saving.register_keras_serializable(package="keras_mobile_moe")
def gelu_tanh(x):
    """GELU with the tanh approximation (Hendrycks & Gimpel 2016).

    The default of JAX/Flax ViTs (big_vision), which the Mobile V-MoE FLOPs
    numbers come from; it also maps to one TFLite builtin.

    Example:

    >>> round(float(gelu_tanh(1.0)), 4)
    0.8412
    """
    return keras.activations.gelu(x, approximate=True)


def get_activation(identifier):
    """Like `keras.activations.get`, also resolving registered names such as
    `"keras_mobile_moe>gelu_tanh"`."""
    if isinstance(identifier, str):
        registered = keras.saving.get_registered_object(identifier)
        if registered is not None:
            return registered
    return keras.activations.get(identifier)


def serialize_activation(activation):
    """The config value of an activation: its registered or Keras name."""
    name = keras.saving.get_registered_name(activation)
    if name.startswith("keras_mobile_moe>"):
        return name
    return keras.activations.serialize(activation)
