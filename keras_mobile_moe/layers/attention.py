"""Multi-head self-attention on `[batch, tokens, width]` tensors.

`attend` is the one attention kernel of the blocks (`TransformerEncoderBlock`
and `NestedExpertBlock`): Q, K and V come in already projected, the heads
are split, and `keras.ops.dot_product_attention` does the rest, which maps
to each backend's fused kernel (`torch.nn.functional.
scaled_dot_product_attention` on PyTorch, `jax.nn.dot_product_attention` on
JAX, one XLA softmax(QK^T)V on TensorFlow). All shapes and the scale are
Python values fixed before the call, so tracing (jit, XLA, TFLite) sees
static shapes and a constant scale.
"""

import functools

import keras
from keras import ops

from keras_mobile_moe.layers.fast_ops import native_torch
from keras_mobile_moe.layers.fast_ops import reshape

# PyTorch's `scaled_dot_product_attention` picks its fastest kernel (flash
# on CPU and GPU) by itself. Keras' `flash_attention=None` would first ask
# `torch.backends.cuda` whether flash is possible, on every call (Python
# work per call and per block) only to force the kernel SDPA would pick
# anyway; `False` skips the question. On JAX, `None` keeps cuDNN/TPU
# kernels available on accelerators.
_FLASH = {"torch": False}


@functools.cache
def _jax_on_cpu():
    import jax

    return jax.default_backend() == "cpu"


def _fused_kernel_runs(query):
    """False where the backend's fused kernel cannot take `query`'s dtype:
    `jax.nn.dot_product_attention` multiplies float16 inputs into float32,
    a dot XLA:CPU does not have ("The precision 'F16_F16_F32' is not
    supported by dot_general on CPU", in every jitted `mixed_float16`
    step)."""
    return not (
        keras.config.backend() == "jax"
        and keras.backend.standardize_dtype(query.dtype) == "float16"
        and _jax_on_cpu()
    )


def _torch_attend(query, key, value, num_heads, scale):
    """`attend` on concrete PyTorch tensors, as timm's `Attention` does it.

    The heads are strided views (`[B, N, D]` -> `[B, H, N, d]`, no copy)
    that `scaled_dot_product_attention` reads as they are, and its output
    comes back in `[B, N, H, d]` memory order, so the final reshape is a
    view too. `keras.ops.dot_product_attention` made each of Q, K, V
    contiguous first and copied the output back: four copies of the
    activations per block, ~10% of a ViT-tiny forward at batch 64.
    """
    import torch

    batch, num_tokens, width = query.shape
    head_dim = width // num_heads

    def heads(x):
        return x.unflatten(-1, (num_heads, head_dim)).transpose(1, 2)

    out = torch.nn.functional.scaled_dot_product_attention(
        heads(query), heads(key), heads(value), scale=scale
    )
    return out.transpose(1, 2).reshape(batch, num_tokens, width)


def attend(query, key, value, num_heads, scale, dropout=None, training=None):
    """Full multi-head attention of all tokens: `softmax(QK^T * scale) V`.

    Args:
        query, key, value: tensors `[batch, num_tokens, width]` (projected).
        num_heads: int. Heads; must divide `width`.
        scale: Python float, `1 / sqrt(width / num_heads)` for standard
            attention.
        dropout: a `keras.layers.Dropout` for the attention weights, or None.
            It is applied only when `training` is true and its rate is > 0;
            that path normalises the weights explicitly (dropout needs them),
            as float16 on JAX's CPU backend does (`_fused_kernel_runs`);
            every other call runs the fused kernel.
        training: bool.

    Returns:
        A tensor `[batch, num_tokens, width]`: the heads' outputs,
        concatenated (before the output projection).

    Example:

    >>> import numpy as np
    >>> x = np.random.rand(2, 5, 8).astype("float32")
    >>> tuple(attend(x, x, x, num_heads=2, scale=0.5).shape)
    (2, 5, 8)
    """
    num_tokens, width = query.shape[1], query.shape[2]
    head_dim = width // num_heads
    split = (-1, num_tokens, num_heads, head_dim)
    dropping = training and dropout is not None and dropout.rate > 0.0
    if not dropping and native_torch(query):
        return _torch_attend(query, key, value, num_heads, scale)
    if dropping or not _fused_kernel_runs(query):
        # [B, H, N, d] so that both products are plain batched matmuls.
        query = ops.transpose(ops.reshape(query, split), (0, 2, 1, 3))
        key = ops.transpose(ops.reshape(key, split), (0, 2, 3, 1))
        value = ops.transpose(ops.reshape(value, split), (0, 2, 1, 3))
        scores = ops.matmul(query, key) * ops.cast(scale, query.dtype)
        weights = ops.cast(
            ops.softmax(ops.cast(scores, "float32"), axis=-1), value.dtype
        )
        if dropping:
            weights = dropout(weights, training=training)
        out = ops.transpose(ops.matmul(weights, value), (0, 2, 1, 3))
    else:
        out = ops.dot_product_attention(
            reshape(query, split),
            reshape(key, split),
            reshape(value, split),
            scale=scale,
            flash_attention=_FLASH.get(keras.config.backend()),
        )
    return reshape(out, (-1, num_tokens, width))
