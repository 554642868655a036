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


def native_torch(x):
    """Whether `x` is a concrete PyTorch tensor (eager, not symbolic)."""
    if keras.config.backend() != "torch":
        return False
    import torch

    return isinstance(x, torch.Tensor)


def matmul(x, y):
    """`keras.ops.matmul(x, y)`; `x @ y` for concrete PyTorch tensors.

    Example:

    >>> import numpy as np
    >>> x = keras.ops.ones((2, 3, 4))
    >>> tuple(matmul(x, keras.ops.ones((4, 5))).shape)
    (2, 3, 5)
    """
    if native_torch(x):
        return x @ y
    return ops.matmul(x, y)


def reshape(x, shape):
    """`keras.ops.reshape(x, shape)`; `x.reshape(shape)` for concrete
    PyTorch tensors.

    Example:

    >>> tuple(reshape(keras.ops.ones((2, 6)), (3, 4)).shape)
    (3, 4)
    """
    if native_torch(x):
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
    if native_torch(x):
        rows = x.reshape(-1, x.shape[-1])
        return bias.addmm(rows, kernel).reshape(*x.shape[:-1], kernel.shape[-1])
    return ops.matmul(x, kernel) + bias


def fused_linear(x, kernels, biases):
    """`[linear(x, k, b) for k, b in zip(kernels, biases)]`.

    On concrete PyTorch tensors it is one `addmm` with the kernels side by
    side (timm's fused QKV projection): one larger GEMM instead of three,
    and one bias pass over the output instead of three. The results are
    views of that one output. Elsewhere it is one `linear` per kernel, the
    ops the TensorFlow and JAX traces and the TFLite export expect.

    Args:
        x: tensor `[..., fan_in]`.
        kernels: tensors `[fan_in, fan_out_i]`.
        biases: tensors `[fan_out_i]`.

    Returns:
        A list of tensors `[..., fan_out_i]`.

    Example:

    >>> x = keras.ops.ones((2, 3, 4))
    >>> k, b = keras.ops.ones((4, 5)), keras.ops.zeros((5,))
    >>> [tuple(y.shape) for y in fused_linear(x, [k, k], [b, b])]
    [(2, 3, 5), (2, 3, 5)]
    """
    if not native_torch(x):
        return [linear(x, k, b) for k, b in zip(kernels, biases)]
    import torch

    sizes = [k.shape[-1] for k in kernels]
    out = linear(x, torch.cat(kernels, dim=-1), torch.cat(biases, dim=-1))
    return list(out.split(sizes, dim=-1))


def concatenate(xs, axis):
    """`keras.ops.concatenate(xs, axis)`; `torch.cat` for concrete PyTorch
    tensors.

    Example:

    >>> tuple(concatenate([keras.ops.ones((2, 3))] * 2, axis=1).shape)
    (2, 6)
    """
    if native_torch(xs[0]):
        import torch

        return torch.cat(xs, dim=axis)
    return ops.concatenate(xs, axis=axis)


def pad_last(x, width):
    """Zero-pads the last axis of `x` at its end to `width` features.

    `keras.ops.pad` builds an `Operation` on every eager call (it inspects
    its own signature: ~0.3 ms on PyTorch); concrete PyTorch tensors go to
    `torch.nn.functional.pad`.

    Example:

    >>> keras.ops.convert_to_numpy(pad_last(keras.ops.ones((1, 2)), 3))
    array([[1., 1., 0.]], dtype=float32)
    """
    missing = width - x.shape[-1]
    if native_torch(x):
        import torch

        return torch.nn.functional.pad(x, (0, missing))
    return ops.pad(x, [(0, 0)] * (len(x.shape) - 1) + [(0, missing)])


def layer_norm(x, gamma, beta, epsilon):
    """`keras.ops.layer_normalization` over the last axis of `x`;
    `torch.nn.functional.layer_norm` (the kernel it ends in) for concrete
    PyTorch tensors.

    Example:

    >>> x = keras.ops.convert_to_tensor([[1.0, 3.0]])
    >>> y = layer_norm(x, keras.ops.ones((2,)), keras.ops.zeros((2,)), 1e-6)
    >>> [round(float(v), 3) for v in keras.ops.convert_to_numpy(y)[0]]
    [-1.0, 1.0]
    """
    if native_torch(x):
        import torch

        # Half precision normalises in float32, as keras.ops does.
        dtype = x.dtype
        compute = torch.float32 if dtype.itemsize < 4 else dtype
        y = torch.nn.functional.layer_norm(
            x.to(compute),
            (x.shape[-1],),
            gamma.to(compute),
            beta.to(compute),
            epsilon,
        )
        return y.to(dtype)
    return ops.layer_normalization(x, gamma, beta, epsilon=epsilon)
