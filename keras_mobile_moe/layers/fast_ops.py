"""`matmul` and `reshape` without Keras' per-op dispatch on PyTorch eager.

Every `keras.ops` function first asks whether any argument is symbolic
(`any_symbolic_tensors`, a pytree flatten of the arguments) and then
converts and dtype-checks them: measured ~30 us per `ops.reshape` and
~35 us extra per `ops.matmul` on the 2-core Xeon here, against ~2 us for
the tensor's own method. A ViT-tiny forward at batch 1 makes ~90 such calls
in its blocks, several milliseconds of Python on a ~10 ms forward, which is
where the gap to timm at batch 1 came from. The blocks' hot paths call these
two helpers instead: on the PyTorch backend, with a concrete tensor, they
use the tensor's own `@` / `.reshape` (the same kernels `keras.ops` ends
in); everywhere else (JAX, TensorFlow, symbolic tensors) they are
`keras.ops.matmul` / `keras.ops.reshape`, so JAX and TensorFlow traces and
the TFLite export see exactly the ops they saw before. The callers pass
operands of one dtype (the layer's compute dtype), so skipping Keras' dtype
promotion changes nothing.
"""

import keras
from keras import ops


def _native(x):
    return keras.config.backend() == "torch" and not isinstance(
        x, keras.KerasTensor
    )


def matmul(x, y):
    """`keras.ops.matmul(x, y)`; `x @ y` for concrete PyTorch tensors.

    Example:

    >>> import numpy as np
    >>> x = keras.ops.ones((2, 3, 4))
    >>> tuple(matmul(x, keras.ops.ones((4, 5))).shape)
    (2, 3, 5)
    """
    if _native(x):
        return x @ y
    return ops.matmul(x, y)


def reshape(x, shape):
    """`keras.ops.reshape(x, shape)`; `x.reshape(shape)` for concrete
    PyTorch tensors.

    Example:

    >>> tuple(reshape(keras.ops.ones((2, 6)), (3, 4)).shape)
    (3, 4)
    """
    if _native(x):
        return x.reshape(shape)
    return ops.reshape(x, shape)


def linear(x, kernel, bias):
    """`x @ kernel + bias` over the last axis of `x` (a Dense layer's math).

    On concrete PyTorch tensors it is one `addmm` (the product and the bias
    in one kernel, as `torch.nn.functional.linear` and timm do), through the
    bias tensor's own method: a separate bias add is one more pass over the
    output, ~10% of a ViT-tiny forward at batch 64 on this CPU. Elsewhere it
    is `keras.ops.matmul(x, kernel) + bias`.

    Args:
        x: tensor `[..., fan_in]`.
        kernel: tensor `[fan_in, fan_out]`.
        bias: tensor `[fan_out]`.

    Returns:
        A tensor `[..., fan_out]`.

    Example:

    >>> x = keras.ops.ones((2, 3, 4))
    >>> y = linear(x, keras.ops.ones((4, 5)), keras.ops.ones((5,)))
    >>> tuple(y.shape), float(y[0, 0, 0])
    ((2, 3, 5), 5.0)
    """
    if _native(x):
        rows = x.reshape(-1, x.shape[-1])
        return bias.addmm(rows, kernel).reshape(*x.shape[:-1], kernel.shape[-1])
    return ops.matmul(x, kernel) + bias
