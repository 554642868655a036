"""Whether layers run on XLA:CPU, where some layouts are tuned differently."""

import keras


def on_xla_cpu():
    """True on the JAX backend when JAX computes on the CPU.

    A few layers take a cache-friendly path there (a scan over small pieces
    of the batch) that is measured faster on XLA:CPU but serialises the batch
    on an accelerator, where the plain batched op is the fast one.

    Returns:
        bool.

    Example:

    >>> isinstance(on_xla_cpu(), bool)
    True
    """
    if keras.config.backend() != "jax":
        return False
    import jax

    return jax.default_backend() == "cpu"
