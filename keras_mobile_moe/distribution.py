"""Multi-device training: data parallel and expert parallel (JAX backend).

`make_distribution(kind)` returns a `keras.distribution.Distribution` to pass
to `keras.distribution.set_distribution` before the model is built:

- `"data"`: `keras.distribution.DataParallel`. Every device holds all the
  weights; each global batch is split along its first axis over the devices.
- `"expert"`: `ExpertParallel`, a `keras.distribution.ModelParallel` on a
  2-D device mesh `(batch, model)`. The stacked expert weights of every
  `kmm.layers.ImageRoutedMoE` (`kernel_in [E, D, H]`, `bias_in [E, H]`,
  `kernel_out [E, H, D]`, `bias_out [E, D]`) are split along their expert
  axis E over the mesh's `model` axis, so each device stores E / m experts
  (and their optimizer slots); every other weight is replicated; batches are
  split over the `batch` axis. XLA's SPMD partitioner inserts the
  communication.

Both are plain Keras distributions: the same training code runs on one
device, on several devices of one host, and on several hosts (call
`keras.distribution.initialize()`, which runs `jax.distributed.initialize()`,
first on every host). The batch size given to `fit` is the global one; it
must be divisible by the size of the mesh's batch axis. Keras' distribution
API trains on the JAX backend only, hence the JAX requirement.
"""

import keras
import numpy as np

from keras_mobile_moe.validation import check_choice
from keras_mobile_moe.validation import check_int

KINDS = ("data", "expert")
# The stacked expert weights of `ImageRoutedMoE`, matched against the end of
# `variable.path` (e.g. "moe_block_10/moe/kernel_in"); the expert axis is 0.
EXPERT_WEIGHT_PATTERNS = {
    r"(.*/)?kernel_(in|out)": 3,
    r"(.*/)?bias_(in|out)": 2,
}


def make_distribution(
    kind,
    devices=None,
    batch_dim_name="batch",
    model_dim_name="model",
    num_experts=None,
    model_parallel=None,
):
    """A data-parallel or expert-parallel Keras distribution (JAX backend).

    Daxberger et al., "Mobile V-MoEs", arXiv 2309.04354, train their models
    with data parallelism; expert parallelism (experts split over devices,
    Lepikhin et al., "GShard", 2020) is the usual way to train V-MoEs whose
    experts do not fit one device. See the module docstring for the layouts.

    The expert mesh has shape `(num_devices // m, m)` with axes
    `(batch_dim_name, model_dim_name)`, where `m` is `model_parallel` if
    given, else the largest divisor of the device count that also divides
    `num_experts` if that is given, else the device count. E must be
    divisible by m: `ExpertParallel` raises a `ValueError` naming the
    variable when a model's expert weights do not fit the mesh.

    Args:
        kind: `"data"` or `"expert"`.
        devices: list of Keras device strings (e.g. `["cpu:0", "cpu:1"]`),
            or None for all of `keras.distribution.list_devices()` (on
            several hosts: the devices of every host).
        batch_dim_name: str. Mesh axis that splits the batch.
        model_dim_name: str. Mesh axis that splits the experts (`"expert"`).
        num_experts: int >= 1 or None. Experts E per MoE layer of the model
            to train; used (with `"expert"`) to pick a model axis size that
            divides E.
        model_parallel: int >= 1 or None. Size of the model axis
            (`"expert"`); must divide the device count.

    Returns:
        A `keras.distribution.DataParallel` (`"data"`) or an
        `ExpertParallel` (`"expert"`). Pass it to
        `keras.distribution.set_distribution` (or use its `scope()`) before
        building the model.

    Raises:
        ValueError: for an unknown `kind`, bad `devices` or a model axis
            size that does not divide the device count.
        RuntimeError: when the Keras backend is not JAX.

    Example:

    >>> import keras
    >>> try:
    ...     distribution = make_distribution("expert", num_experts=4)
    ... except RuntimeError as error:  # on the TensorFlow or torch backends
    ...     ok = keras.config.backend() != "jax" and "jax" in str(error)
    ... else:  # JAX: mesh (num_devices // m, m) with m dividing 4
    ...     mesh = distribution.device_mesh
    ...     ok = mesh.axis_names == ["batch", "model"]
    ...     ok = ok and 4 % mesh.shape[1] == 0
    >>> ok
    True
    """
    check_choice("kind", kind, KINDS)
    for name, value in (
        ("batch_dim_name", batch_dim_name),
        ("model_dim_name", model_dim_name),
    ):
        if not isinstance(value, str) or not value:
            raise ValueError(
                f"Received: {name}={value!r}. Expected a non-empty str."
            )
    if batch_dim_name == model_dim_name:
        raise ValueError(
            f"Received: batch_dim_name={batch_dim_name!r} and "
            f"model_dim_name={model_dim_name!r}. Expected two different "
            "mesh axis names."
        )
    if num_experts is not None:
        check_int("num_experts", num_experts, minimum=1)
    if model_parallel is not None:
        check_int("model_parallel", model_parallel, minimum=1)
    backend = keras.config.backend()
    if backend != "jax":
        raise RuntimeError(
            f"make_distribution(kind={kind!r}) needs the JAX backend; the "
            f"Keras backend is {backend!r}. Accepted: KERAS_BACKEND=jax "
            "(Keras' distribution API trains on JAX only); on other "
            "backends train without a distribution."
        )
    devices = _check_devices(devices)
    num_devices = len(devices)

    if kind == "data":
        mesh = keras.distribution.DeviceMesh(
            shape=(num_devices,), axis_names=[batch_dim_name], devices=devices
        )
        return keras.distribution.DataParallel(device_mesh=mesh)

    if model_parallel is None:
        model_parallel = num_devices
        if num_experts is not None:
            model_parallel = int(np.gcd(num_devices, num_experts))
    if num_devices % model_parallel:
        raise ValueError(
            f"Received: model_parallel={model_parallel} with {num_devices} "
            "devices. Expected a divisor of the device count "
            f"({_divisors(num_devices)})."
        )
    if num_experts is not None and num_experts % model_parallel:
        raise ValueError(
            f"Received: model_parallel={model_parallel} with "
            f"num_experts={num_experts}. Expected a divisor of both the "
            f"device count ({num_devices}) and num_experts: one of "
            f"{_divisors(int(np.gcd(num_devices, num_experts)))}."
        )
    mesh = keras.distribution.DeviceMesh(
        shape=(num_devices // model_parallel, model_parallel),
        axis_names=[batch_dim_name, model_dim_name],
        devices=devices,
    )
    layout_map = keras.distribution.LayoutMap(mesh)
    for pattern, rank in EXPERT_WEIGHT_PATTERNS.items():
        layout_map[pattern] = (model_dim_name,) + (None,) * (rank - 1)
    return ExpertParallel(layout_map=layout_map, batch_dim_name=batch_dim_name)


class ExpertParallel(keras.distribution.ModelParallel):
    """`ModelParallel` that splits `ImageRoutedMoE` experts over devices.

    Built by `make_distribution("expert")`. A variable whose path ends in
    `kernel_in`, `kernel_out`, `bias_in` or `bias_out` (the stacked expert
    weights of `kmm.layers.ImageRoutedMoE`) is split along its expert axis 0
    over the mesh's model axis; other variables are replicated. Unlike the
    plain `ModelParallel`, a variable whose expert count does not divide by
    the model axis size raises a `ValueError` naming it, instead of an
    XLA sharding error.

    Args:
        layout_map: `keras.distribution.LayoutMap` on a 2-D mesh.
        batch_dim_name: str. The mesh axis that splits the batch.
        **kwargs: passed to `keras.distribution.ModelParallel`.

    Returns:
        A Keras distribution.

    Example:

    >>> issubclass(ExpertParallel, keras.distribution.ModelParallel)
    True
    """

    def get_variable_layout(self, variable):
        layout = super().get_variable_layout(variable)
        axes = tuple(layout.axes)
        if len(axes) != len(variable.shape):
            raise ValueError(
                f"Variable '{variable.path}' of shape {tuple(variable.shape)}"
                f" matched an expert layout {axes} of rank {len(axes)}. "
                "Expected the stacked expert weights of ImageRoutedMoE "
                "(kernel_in/kernel_out: [E, in, out], bias_in/bias_out: "
                "[E, out]); rename the variable if it is not one."
            )
        mesh = self.device_mesh
        for dim, axis in enumerate(axes):
            if axis is None:
                continue
            size = mesh.shape[mesh.axis_names.index(axis)]
            if variable.shape[dim] % size:
                raise ValueError(
                    f"Variable '{variable.path}' of shape "
                    f"{tuple(variable.shape)} has {variable.shape[dim]} "
                    f"experts, which cannot be split over the {size} devices"
                    f" of the mesh axis '{axis}' (mesh shape "
                    f"{tuple(mesh.shape)}). Accepted: a model axis size "
                    "that divides the number of experts; pass "
                    "make_distribution('expert', num_experts=E) to pick "
                    "one, or model_parallel=m."
                )
        return layout


def _check_devices(devices):
    if devices is None:
        devices = keras.distribution.list_devices()
    if isinstance(devices, (str, bytes)) or not hasattr(devices, "__len__"):
        raise ValueError(
            f"Received: devices={devices!r}. Expected a non-empty list of "
            "device strings such as ['cpu:0', 'cpu:1'], or None for all "
            "devices."
        )
    devices = list(devices)
    if not devices:
        raise ValueError(
            "Received: devices=[]. Expected a non-empty list of device "
            "strings such as ['cpu:0', 'cpu:1'], or None for all devices."
        )
    if len(set(map(str, devices))) != len(devices):
        raise ValueError(
            f"Received: devices={devices!r}. Expected distinct devices."
        )
    return devices


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]
