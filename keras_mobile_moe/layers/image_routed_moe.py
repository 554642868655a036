import math

import keras
from keras import ops

from keras_mobile_moe.layers.activations import get_activation
from keras_mobile_moe.layers.activations import serialize_activation
from keras_mobile_moe.layers.xla_cpu import on_xla_cpu
from keras_mobile_moe.validation import check_int
from keras_mobile_moe.validation import check_rate


def add_stacked_experts(layer, hidden_dim):
    """Creates the stacked expert MLP weights of an MoE layer and its dropout.

    Sets `kernel_in` `[E, D, H]`, `bias_in` `[E, H]`, `kernel_out`
    `[E, H, D]`, `bias_out` `[E, D]` and `dropout` on `layer`, from its
    `num_experts`, `intermediate_dim` and `dropout_rate`. Shared by
    `ImageRoutedMoE` and `TokenRoutedMoE`.
    """
    experts, width = layer.num_experts, layer.intermediate_dim

    # Glorot-uniform per expert, i.e. what a Dense MLP of the same shape
    # gets; Keras' own glorot would fold the expert axis into the fan-in.
    def glorot(fan_in, fan_out):
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        return keras.initializers.RandomUniform(-limit, limit)

    layer.kernel_in = layer.add_weight(
        shape=(experts, hidden_dim, width),
        initializer=glorot(hidden_dim, width),
        name="kernel_in",
    )
    layer.bias_in = layer.add_weight(
        shape=(experts, width), initializer="zeros", name="bias_in"
    )
    layer.kernel_out = layer.add_weight(
        shape=(experts, width, hidden_dim),
        initializer=glorot(width, hidden_dim),
        name="kernel_out",
    )
    layer.bias_out = layer.add_weight(
        shape=(experts, hidden_dim), initializer="zeros", name="bias_out"
    )
    layer.dropout = keras.layers.Dropout(
        layer.dropout_rate, dtype=layer.dtype_policy, name="dropout"
    )


@keras.saving.register_keras_serializable(package="keras_mobile_moe")
class ImageRoutedMoE(keras.layers.Layer):
    """A mixture of expert MLPs in which each image uses only its k experts.

    Daxberger et al., "Mobile V-MoEs", arXiv 2309.04354, Sec. 2. Every token
    of an image goes through the same `top_k` experts, chosen once per image
    by `ImageRouter`; the output is the gate-weighted sum of those experts:
    `MoE(x) = sum_i g_i * e_i(x)`.

    The compute is sparse: the expert kernels are stacked `[E, ...]`, each
    image gathers the kernels of its own experts and runs a batched matmul
    with them. An image pays for `top_k` expert MLPs only, experts that no
    image chose do no work and get zero gradient, no image is dropped for
    capacity, and an image's output never depends on the rest of the batch.

    Args:
        num_experts: int. Number of experts E.
        intermediate_dim: int. Hidden width of every expert MLP.
        top_k: int in [1, num_experts]. Experts per image.
        normalize_gates: bool. Whether to rescale the k gates to sum to 1.
            The paper leaves this open for k > 1; with k = 1 it would make
            every gate 1 and cut the router off from the task gradient.
        activation: activation of the expert hidden layer (tanh-approximate
            GELU by default, as in the paper's JAX ViTs).
        dropout_rate: float in [0, 1). Dropout after the hidden layer.

    Call arguments:
        inputs: tokens `[batch, num_tokens, hidden_dim]`.
        expert_indices: int tensor `[batch, top_k]`, the chosen experts.
        expert_gates: float tensor `[batch, top_k]`, their router
            probabilities.
        training: bool. Enables dropout.

    Returns:
        Tokens `[batch, num_tokens, hidden_dim]`.

    Example:

    >>> import numpy as np
    >>> moe = ImageRoutedMoE(num_experts=4, intermediate_dim=32)
    >>> tokens = np.ones((2, 5, 8), "float32")
    >>> indices = np.array([[0], [3]], "int32")
    >>> gates = np.ones((2, 1), "float32")
    >>> tuple(moe(tokens, indices, gates).shape)
    (2, 5, 8)
    """

    def __init__(
        self,
        num_experts,
        intermediate_dim,
        top_k=1,
        normalize_gates=False,
        activation="keras_mobile_moe>gelu_tanh",
        dropout_rate=0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_experts = check_int("num_experts", num_experts, minimum=1)
        self.intermediate_dim = check_int(
            "intermediate_dim", intermediate_dim, minimum=1
        )
        self.top_k = check_int("top_k", top_k, minimum=1, maximum=num_experts)
        self.normalize_gates = bool(normalize_gates)
        self.activation = get_activation(activation)
        self.dropout_rate = check_rate("dropout_rate", dropout_rate)

    def build(
        self, inputs_shape, expert_indices_shape=None, expert_gates_shape=None
    ):
        input_shape = inputs_shape
        if len(input_shape) != 3:
            raise ValueError(
                "ImageRoutedMoE expects tokens [batch, num_tokens, hidden_dim]."
                f" Received: input_shape={tuple(input_shape)}."
            )
        # Checked once here, not on every call (no per-call Python work).
        for name, shape in (
            ("expert_indices", expert_indices_shape),
            ("expert_gates", expert_gates_shape),
        ):
            if shape is not None and (
                len(shape) != 2 or shape[-1] != self.top_k
            ):
                raise ValueError(
                    f"ImageRoutedMoE(top_k={self.top_k}) received {name} "
                    f"of shape {tuple(shape)}. Expected [batch, {self.top_k}]."
                )
        hidden_dim = input_shape[-1]
        add_stacked_experts(self, hidden_dim)
        self.built = True

    def call(self, inputs, expert_indices, expert_gates, training=None):
        num_tokens, hidden_dim = inputs.shape[1], inputs.shape[2]
        k = self.top_k
        # One row per (image, chosen expert): [batch * k].
        if keras.backend.standardize_dtype(expert_indices.dtype) != "int32":
            expert_indices = ops.cast(expert_indices, "int32")
        flat_indices = ops.reshape(expert_indices, (-1,))
        tokens = ops.repeat(inputs, k, axis=0) if k > 1 else inputs

        hidden = self.activation(
            self._expert_linear(
                tokens, flat_indices, self.kernel_in, self.bias_in
            )
        )
        if training and self.dropout_rate > 0.0:
            hidden = self.dropout(hidden, training=training)
        outputs = self._expert_linear(
            hidden, flat_indices, self.kernel_out, self.bias_out
        )

        gates = expert_gates
        dtype = keras.backend.standardize_dtype(outputs.dtype)
        if keras.backend.standardize_dtype(gates.dtype) != dtype:
            gates = ops.cast(gates, dtype)
        if self.normalize_gates:
            gates = gates / ops.sum(gates, axis=-1, keepdims=True)
        if k == 1:  # no sum over one expert
            return outputs * gates[:, :, None]
        outputs = ops.reshape(outputs, (-1, k, num_tokens, hidden_dim))
        return ops.sum(outputs * gates[:, :, None, None], axis=1)

    def _expert_linear(self, tokens, indices, kernels, biases):
        """`tokens[b] @ kernels[indices[b]] + biases[indices[b]]` for every b.

        Only the selected expert's kernel is touched for each row, so the
        FLOPs are those of one dense layer per row.
        """
        rows = tokens.shape[0]
        if on_xla_cpu() and (rows is None or rows > 8):
            # XLA:CPU copies gathered [rows, in, out] kernels slowly; a scan
            # that slices each row's kernel in place is ~3x faster at batch
            # 64 and does the same FLOPs. Few rows keep the gather, which XLA
            # (and its cost analysis) sees through. On a GPU the scan runs
            # the rows one after another (with it, an H100 trained a 6x64
            # MoE ~6x slower per epoch than its dense twin), so accelerators
            # always gather.
            _, fan_in, fan_out = kernels.shape
            kernels = ops.convert_to_tensor(kernels)
            biases = ops.convert_to_tensor(biases)

            def one_row(row):
                x, index = row
                kernel = ops.slice(kernels, (index, 0, 0), (1, fan_in, fan_out))
                bias = ops.slice(biases, (index, 0), (1, fan_out))
                return ops.matmul(x, kernel[0]) + bias

            return ops.map(one_row, (tokens, indices))
        kernel = ops.take(kernels.value, indices, axis=0)
        bias = ops.take(biases.value, indices, axis=0)
        return ops.matmul(tokens, kernel) + bias[:, None, :]

    def compute_output_shape(
        self, inputs_shape, expert_indices_shape=None, expert_gates_shape=None
    ):
        return inputs_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "intermediate_dim": self.intermediate_dim,
                "top_k": self.top_k,
                "normalize_gates": self.normalize_gates,
                "activation": serialize_activation(self.activation),
                "dropout_rate": self.dropout_rate,
            }
        )
        return config
