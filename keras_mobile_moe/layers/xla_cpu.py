"""The switch for the layers' XLA:CPU paths (like timm's `set_fused_attn`).

Two layers take a cache-friendly path on XLA:CPU: `ImageRoutedMoE` scans the
batch row by row instead of gathering a kernel per image, and
`PatchEmbedding` scans chunks of the batch. Both are measured faster on
XLA:CPU and both serialise the batch on an accelerator (an H100 trained a
6x64 Mobile V-MoE ~6x slower than its dense twin with them), where the plain
batched ops are the fast ones. The paths exist on the JAX backend only.

Which path runs:
- `"auto"` (the default): the XLA:CPU paths when JAX computes on the CPU;
- `"on"` / `"off"`: forced (on other backends than JAX, always off).

Set it with `set_xla_cpu_paths("on" | "off" | "auto")` or the environment
variable `KMM_XLA_CPU_PATHS` (read when the value is first needed; the
setter wins). The choice is made when a layer's `call` is traced, so set it
before building or compiling the models it should affect. The two paths
compute the same function (tests run both).
"""

import os

import keras

MODES = ("auto", "on", "off")
ENV_VAR = "KMM_XLA_CPU_PATHS"
_mode = None  # None: not set by `set_xla_cpu_paths`; read the environment


def _check_mode(mode, argument):
    if mode not in MODES:
        raise ValueError(
            f"Received: {argument}={mode!r}. Expected one of {list(MODES)}."
        )
    return mode


def set_xla_cpu_paths(mode="auto"):
    """Chooses whether the layers take their XLA:CPU paths.

    Args:
        mode: `"auto"` (when JAX computes on the CPU), `"on"` or `"off"`.

    Example:

    >>> set_xla_cpu_paths("off")
    >>> on_xla_cpu()
    False
    >>> set_xla_cpu_paths("auto")
    """
    global _mode
    _mode = _check_mode(mode, "mode")


def xla_cpu_paths_mode():
    """The mode in force: the setter's, else `$KMM_XLA_CPU_PATHS`, else
    `"auto"`."""
    if _mode is not None:
        return _mode
    return _check_mode(os.environ.get(ENV_VAR, "auto").lower(), ENV_VAR)


def on_xla_cpu():
    """Whether the layers take their XLA:CPU paths now.

    Returns:
        bool. Always False on the TensorFlow and PyTorch backends.

    Example:

    >>> isinstance(on_xla_cpu(), bool)
    True
    """
    mode = xla_cpu_paths_mode()
    if keras.config.backend() != "jax":
        return False
    if mode != "auto":
        return mode == "on"
    import jax

    return jax.default_backend() == "cpu"
