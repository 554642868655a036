"""TFLite / LiteRT export of the model families, with quantization.

Conversion runs on the TensorFlow backend (the TFLite converter reads a TF
SavedModel). A model built on JAX or PyTorch is saved to a `.keras` file and
converted in a subprocess with `KERAS_BACKEND=tensorflow`: the weights are
backend-neutral, so the result is the same model.

The file has batch size 1 and a fixed input shape. By default
(`preprocessing=True`) its input `images` is a raw uint8 RGB image
`[1, height, width, 3]` (what `model.predict` takes), and the model's
preprocessor (resize, scale, offset) runs inside the file with builtin ops;
with `preprocessing=False` the input is float32 in the model's input format
(after its preprocessor). The outputs are `logits` (float32) and, for Mobile
V-MoE with one router per image, `router_logits` (float32) and
`expert_index` (int32, the chosen experts). These names, dtypes and shapes
are stored in the file (see `read_metadata`). The file contains only TFLite
builtin ops, which is checked after conversion.
"""

import os
import pathlib
import subprocess
import sys
import tempfile

import keras
import numpy as np

from keras_mobile_moe import atomic_io

QUANTIZATIONS = ("none", "float16", "dynamic", "int8")
# How `quantization="int8"` quantizes activations: "dynamic" (int8 weights,
# activations quantized per call by the kernels, the routing blocks'
# weights float; the default) or "static" (int8 activations calibrated on
# representative data, float fallback; the default before).
INT8_ACTIVATIONS = ("dynamic", "static")


def _import_tensorflow():
    try:
        import tensorflow as tf
    except ImportError as error:
        raise ImportError(
            "TFLite export needs TensorFlow: "
            "pip install 'keras-mobile-moe[tflite]'"
        ) from error
    return tf


def _import_interpreter():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as error:
        raise ImportError(
            "Running .tflite files needs the LiteRT interpreter: "
            "pip install 'keras-mobile-moe[tflite]' (ai-edge-litert)"
        ) from error
    return Interpreter


def load_interpreter(path_or_bytes, num_threads=1, xnnpack=True):
    """Returns an allocated `ai_edge_litert` interpreter for a model.

    Args:
        path_or_bytes: a `.tflite` path or the model's bytes.
        num_threads: int. CPU threads for the interpreter.
        xnnpack: bool. Use the default XNNPACK delegate (as phones do);
            without it every op of the file stays visible for inspection.

    Returns:
        An `ai_edge_litert.interpreter.Interpreter`.
    """
    interpreter_cls = _import_interpreter()
    from ai_edge_litert.interpreter import OpResolverType

    kwargs = {"num_threads": num_threads}
    if not xnnpack:
        kwargs["experimental_op_resolver_type"] = (
            OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        )
    if isinstance(path_or_bytes, (bytes, bytearray)):
        interpreter = interpreter_cls(
            model_content=bytes(path_or_bytes), **kwargs
        )
    else:
        interpreter = interpreter_cls(model_path=str(path_or_bytes), **kwargs)
    interpreter.allocate_tensors()
    return interpreter


def op_names(interpreter):
    """The names of the ops in a loaded TFLite model."""
    return sorted({op["op_name"] for op in interpreter._get_ops_details()})


def check_builtin_ops(interpreter):
    """Raises `ValueError` if the model uses Flex (Select TF) or custom ops.

    Args:
        interpreter: a loaded interpreter (see `load_interpreter`), best
            without delegates so that every op is visible.

    Returns:
        The sorted list of op names.
    """
    names = op_names(interpreter)
    bad = [
        n for n in names if n.startswith("Flex") or n in ("CUSTOM", "Custom")
    ]
    if bad:
        raise ValueError(
            f"The TFLite model uses non-builtin ops {bad}; phones without the "
            f"Flex delegate cannot run it. Ops: {names}."
        )
    return names


def check_sparse_routing(interpreter, num_experts, expert_kernel_shapes):
    """Checks that stacked expert kernels are only gathered, never multiplied.

    Every tensor shaped like a stacked expert kernel `[E, in, out]` must feed
    only GATHER ops (or DEQUANTIZE, which turns stored float16/int8 weights
    into float once): the graph selects the image's expert before any
    matmul, so no all-expert computation is in the file.

    Args:
        interpreter: a loaded interpreter.
        num_experts: int. E.
        expert_kernel_shapes: the `(in, out)` shapes of the expert kernels.

    Returns:
        The number of stacked expert tensors found (0 for a dense model).
    """
    stacked = {
        t["index"]
        for t in interpreter.get_tensor_details()
        if len(t["shape"]) == 3
        and t["shape"][0] == num_experts
        and tuple(t["shape"][1:]) in expert_kernel_shapes
    }
    for op in interpreter._get_ops_details():
        uses = stacked.intersection(op["inputs"])
        if uses and op["op_name"] not in ("GATHER", "DEQUANTIZE"):
            raise ValueError(
                f"Op {op['op_name']} computes with all {num_experts} stacked "
                "expert kernels; the export lost per-image routing."
            )
    return len(stacked)


def _expert_kernel_shapes(model):
    backbone = model.backbone
    shapes = set()
    for block in getattr(backbone, "encoder_blocks", []):
        if getattr(block, "is_moe", False):
            shapes.add(tuple(block.mlp.kernel_in.shape[1:]))
            shapes.add(tuple(block.mlp.kernel_out.shape[1:]))
    return shapes


def routing_layers(model):
    """Names of the backbone layers that decide which experts run.

    Mobile V-MoE (one router per image): the patch embedding, the dense
    blocks before the router, and the router. MoNE: the patch embedding and
    the token router. Per-token routing: the routers inside the MoE layers
    (all named `"router"`). A dense model has none.

    Args:
        model: a `kmm.MobileVMoE` or `kmm.MoNE` classifier.

    Returns:
        A list of layer names.

    Example:

    >>> import keras_mobile_moe as kmm
    >>> model = kmm.MobileVMoE(kmm.MobileVMoEBackbone(
    ...     image_shape=(32, 32, 3), patch_size=8, num_layers=3, hidden_dim=16,
    ...     num_heads=2, mlp_dim=32, num_experts=4, num_moe_layers=1),
    ...     num_classes=10, routing="learned")
    >>> routing_layers(model)
    ['patch_embedding', 'dense_block_0', 'dense_block_1', 'router']
    """
    # The family knows its routing layers (models/base.py).
    return list(model.backbone.routing_layer_names)


def _layer_pattern(layer_names):
    import re

    # "/dense_block_1_1/" is layer dense_block_1 (Keras adds "_<n>" when the
    # graph is traced), but "/dense_block_10_1/" is not.
    return re.compile(
        "/(" + "|".join(re.escape(n) for n in layer_names) + r")(_\d+)?/"
    )


def _residual_pattern(block_names):
    import re

    # The residual additions are the block's own ops ("<block>_1/add",
    # "<block>_1/add_1"), not those of its sublayers ("<block>_1/mlp_1/...").
    return re.compile(
        "/("
        + "|".join(re.escape(n) for n in block_names)
        + r")(_\d+)?/add(_\d+)?(;|$)"
    )


def _residual_stream(model):
    """The encoder blocks (their residual additions) and the layers that
    write or read the residual stream: the patch embedding (its first value;
    quantized, it alone dropped a trained dense 6x64's top-1 agreement with
    Keras from 91% to 31%), each block's LayerNorms, the final norm, the
    head.

    Returns:
        A tuple `(block_names, layer_names)`.
    """
    backbone = model.backbone
    blocks = list(getattr(backbone, "encoder_blocks", []))
    layers = [
        layer.name
        for layer in backbone.layers
        if layer.name == "patch_embedding"
    ]
    for block in blocks:
        for sublayer in block._flatten_layers(include_self=False):
            if isinstance(sublayer, keras.layers.LayerNormalization):
                layers.append(sublayer.name)
    final_norm = getattr(backbone, "final_norm", None)
    if final_norm is not None:
        layers.append(final_norm.name)
    head = getattr(model, "output_dense", None)
    if head is not None:
        layers.append(head.name)
    return [b.name for b in blocks], list(dict.fromkeys(layers))


def _float_nodes(model_content, layer_names, residual_blocks=()):
    """The output tensors of the ops of a TFLite model to keep in float.

    An op belongs to a layer when one of its output tensors or of its
    constant inputs (its weights) is named after the layer: an op whose
    output is also a model output (the router's dense layer, whose result is
    `router_logits`; the head, whose result is `logits`) takes the output's
    name, and only its weights still carry the layer's name.

    Args:
        model_content: the float (or calibrated) TFLite model's bytes.
        layer_names: Keras layer names (or sublayer names, which match in
            every layer that has them).
        residual_blocks: names of encoder blocks whose residual additions
            (ADD ops of the block itself) stay in float.

    Returns:
        A dict: each layer name (and `"residual"`) -> the sorted list of
        tensor names (the quantizer's node names) it matched.
    """
    patterns = {name: _layer_pattern([name]) for name in layer_names}
    interpreter = load_interpreter(model_content, xnnpack=False)
    details = {t["index"]: t["name"] for t in interpreter.get_tensor_details()}
    ops = interpreter._get_ops_details()
    produced = {i for op in ops for i in op["outputs"]}
    graph_inputs = {t["index"] for t in interpreter.get_input_details()}
    residual = _residual_pattern(residual_blocks) if residual_blocks else None
    found = {name: set() for name in layer_names}
    found["residual"] = set()
    for op in ops:
        constants = [
            i
            for i in op["inputs"]
            if i >= 0 and i not in produced and i not in graph_inputs
        ]
        outputs = [details[i] for i in op["outputs"]]
        names = outputs + [details[i] for i in constants]
        for layer, pattern in patterns.items():
            if any(pattern.search(name) for name in names):
                found[layer].update(outputs)
        if (
            residual
            and op["op_name"] == "ADD"
            and any(residual.search(name) for name in outputs)
        ):
            found["residual"].update(outputs)
    return {name: sorted(nodes) for name, nodes in found.items()}


def _check_arguments(
    model,
    quantization,
    representative_data,
    raw_shape=None,
    int8_activations="static",
):
    if quantization not in QUANTIZATIONS:
        raise ValueError(
            f"Received: quantization={quantization!r}. Expected one of "
            f"{list(QUANTIZATIONS)}."
        )
    if int8_activations not in INT8_ACTIVATIONS:
        raise ValueError(
            f"Received: int8_activations={int8_activations!r}. Expected one "
            f"of {list(INT8_ACTIVATIONS)}."
        )
    if (
        quantization == "int8"
        and int8_activations == "dynamic"
        and representative_data is None
    ):
        return None  # nothing to calibrate
    if not hasattr(model, "backbone"):
        raise ValueError(
            f"to_tflite exports classifier tasks; received a "
            f"{type(model).__name__}. Accepted: kmm.MobileVMoE or kmm.MoNE."
        )
    image_shape = tuple(model.backbone.image_shape)
    if quantization == "int8" and raw_shape is not None:
        return _check_raw_calibration(representative_data, raw_shape)
    if quantization == "int8":
        if representative_data is None:
            raise ValueError(
                "quantization='int8' with int8_activations='static' needs "
                "representative_data: a float32 "
                f"array [n, {', '.join(map(str, image_shape))}] of images in "
                "the model's input format (n >= 1, ~100 is typical)."
            )
        data = np.asarray(representative_data)
        if data.dtype == bool or data.dtype.kind not in "uif":
            raise ValueError(
                f"Received: representative_data of dtype {data.dtype}. "
                "Expected float32 images in the model's input format."
            )
        if (
            data.ndim != 4
            or tuple(data.shape[1:]) != image_shape
            or not len(data)
        ):
            raise ValueError(
                f"Received: representative_data has shape {data.shape}; "
                f"expected [n, {', '.join(map(str, image_shape))}] with "
                "n >= 1."
            )
        data = data.astype("float32")
        check_calibration_values(model, data)
        return data
    return None


def image_converter(model):
    """The model's image converter (resize + scale), or None without one."""
    return getattr(
        getattr(model, "preprocessor", None), "image_converter", None
    )


def raw_input_shape(model, preprocessing=True, input_size=None):
    """The shape `(height, width, 3)` of the raw uint8 images a file with
    the preprocessing inside takes, or None when the file takes the model's
    float32 input format (`preprocessing=False`, or a model without a
    preprocessor: its `predict` already takes that format).

    Args:
        model: a classifier.
        preprocessing: bool, as for `to_tflite`.
        input_size: `(height, width)` of the raw images, or None for the
            image converter's `image_size` (the model's own input size).

    Returns:
        A tuple `(height, width, 3)` or None.
    """
    if not isinstance(preprocessing, bool):
        raise ValueError(
            f"Received: preprocessing={preprocessing!r}. Expected a bool."
        )
    if input_size is not None:
        size = (input_size,) * 2 if isinstance(input_size, int) else input_size
        try:
            size = tuple(size)
            valid = len(size) == 2 and all(
                isinstance(v, (int, np.integer))
                and not isinstance(v, bool)
                and v > 0
                for v in size
            )
        except TypeError:
            valid = False
        if not valid:
            raise ValueError(
                f"Received: input_size={input_size!r}. Expected a positive "
                "int or a (height, width) pair of positive ints, e.g. 32 or "
                "(224, 224)."
            )
        if not preprocessing:
            raise ValueError(
                f"Received: input_size={input_size!r} with "
                "preprocessing=False. input_size sets the raw images the "
                "file resizes, so it needs preprocessing=True."
            )
    converter = image_converter(model)
    if not preprocessing or converter is None:
        return None
    if input_size is None:
        size = converter.image_size
    _check_resize(converter, size)
    return (int(size[0]), int(size[1]), 3)


def _check_raw_calibration(representative_data, raw_shape):
    """Calibration images for a file with the preprocessing inside: raw
    pixels, as the file takes them."""
    expected = f"[n, {', '.join(map(str, raw_shape))}]"
    if representative_data is None:
        raise ValueError(
            "quantization='int8' with int8_activations='static' needs "
            "representative_data: raw uint8 images "
            f"{expected} (n >= 1, ~100 is typical), the file's input."
        )
    data = np.asarray(representative_data)
    if data.dtype == bool or data.dtype.kind not in "uif":
        raise ValueError(
            f"Received: representative_data of dtype {data.dtype}. Expected "
            f"raw uint8 images {expected}."
        )
    if data.ndim != 4 or tuple(data.shape[1:]) != raw_shape or not len(data):
        raise ValueError(
            f"Received: representative_data has shape {data.shape}; expected "
            f"raw images {expected} with n >= 1 (the file's input: "
            "preprocessing=True)."
        )
    finite = np.isfinite(data)
    if not finite.all():
        raise ValueError(
            f"Received: representative_data holding "
            f"{int(data.size - finite.sum())} NaN or inf values. Expected raw "
            "uint8 images."
        )
    lowest, highest = float(data.min()), float(data.max())
    if lowest < 0 or highest > 255 or (data.dtype.kind == "f" and highest <= 1):
        raise ValueError(
            f"Received: representative_data with values in [{lowest:g}, "
            f"{highest:g}]. Expected raw pixels in [0, 255] (the file takes "
            "uint8 images and preprocesses them itself); pass images in the "
            "model's input format with preprocessing=False instead."
        )
    return np.round(data).astype("uint8")


def model_input_range(model):
    """`(low, high)` of the model's inputs (what its preprocessor makes of
    raw images in its converter's `value_range`), or None without one."""
    converter = getattr(
        getattr(model, "preprocessor", None), "image_converter", None
    )
    if converter is None:
        return None
    low, high = getattr(converter, "value_range", (0, 255))
    scale = np.asarray(
        1.0 if converter.scale is None else converter.scale, "float64"
    )
    offset = np.asarray(
        0.0 if converter.offset is None else converter.offset, "float64"
    )
    ends = np.stack([low * scale + offset, high * scale + offset])
    return float(ends.min()), float(ends.max())


def check_calibration_values(model, data, argument="representative_data"):
    """Raises unless calibration images are finite and in the model's input
    range (int8 scales are fitted to them: raw 0-255 pixels for a model that
    takes [-1, 1] wreck the quantization; inf crashes the converter)."""
    finite = np.isfinite(data)
    if not finite.all():
        raise ValueError(
            f"Received: {argument} holding {int(data.size - finite.sum())} "
            "NaN or inf values. Expected finite images in the model's input "
            "format."
        )
    expected = model_input_range(model)
    if expected is None:
        return
    low, high = expected
    margin = 0.1 * (high - low)
    lowest, highest = float(data.min()), float(data.max())
    if lowest < low - margin or highest > high + margin:
        raise ValueError(
            f"Received: {argument} with values in [{lowest:g}, {highest:g}]. "
            f"Expected images in the model's input format, [{low:g}, "
            f"{high:g}] (after its preprocessor). Raw pixels must go through "
            "the preprocessor first: model.preprocessor.image_converter("
            "images)."
        )


def _image_router(model):
    """The per-image router of a Mobile V-MoE classifier, else None."""
    backbone = model.backbone
    if not getattr(backbone, "is_moe", False) or getattr(
        backbone, "is_token_routed", False
    ):
        return None
    return getattr(backbone, "router", None)


def _serving_model(model, raw_shape=None):
    """The classifier as a functional model returning a dict of outputs.

    With `raw_shape` (see `raw_input_shape`) the model takes raw uint8
    images of that shape, named `images`, and runs its image converter
    first (a cast to float32, then the converter's resize and scaling: the
    same ops `model.predict` applies to raw images).

    For Mobile V-MoE with one router per image the dict also holds
    `expert_index`: the int32 indices `[batch, top_k]` of the experts that
    the router chose (its TopK output), so that the routing decision of a
    file can be read as such: an int32 tensor is never re-quantized, while
    an int8 file may re-quantize `router_logits` and turn close logits into
    ties.
    """
    serving = _classifier_outputs(model)
    if raw_shape is None:
        return serving
    raw = keras.Input(shape=raw_shape, dtype="uint8", name="images")
    # The cast comes first, as in `predict`: the converter resizes float
    # pixels (resizing uint8 ones rounds differently).
    pixels = keras.ops.cast(raw, "float32")
    converter = image_converter(model)
    if converter.image_size is not None and (
        converter.interpolation not in BUILTIN_RESIZE
    ):
        pixels = _resize_with_matrices(pixels, raw_shape[:2], converter)
        config = {**converter.get_config(), "image_size": None}
        converter = converter.__class__.from_config(config)
    return keras.Model(raw, serving(converter(pixels)))


# Interpolations TFLite runs as builtin ops (RESIZE_BILINEAR,
# RESIZE_NEAREST_NEIGHBOR); others (bicubic, the default of timm's ViTs,
# lanczos, area) would need Flex ops.
BUILTIN_RESIZE = ("bilinear", "nearest")


def _resize_matrix(size_in, size_out, interpolation, antialias):
    """`[size_out, size_in]` float32: the linear map that resizing one axis
    of length `size_in` to `size_out` applies (the resize of each basis
    vector)."""
    basis = np.eye(size_in, dtype="float32").reshape(size_in, size_in, 1, 1)
    resized = keras.ops.image.resize(
        basis, (size_out, 1), interpolation=interpolation, antialias=antialias
    )
    return (
        np.asarray(keras.ops.convert_to_numpy(resized))
        .reshape(size_in, size_out)
        .T
    )


def _check_resize(converter, raw_size):
    """Refuses raw sizes whose resize the file cannot run with builtin ops:
    a crop or pad to another aspect ratio before a non-builtin
    interpolation."""
    if (
        converter.image_size is None
        or converter.interpolation in BUILTIN_RESIZE
    ):
        return
    height, width = (int(v) for v in raw_size)
    out_height, out_width = (int(v) for v in converter.image_size)
    if (
        getattr(converter, "crop_to_aspect_ratio", False)
        or getattr(converter, "pad_to_aspect_ratio", False)
    ) and height * out_width != width * out_height:
        raise ValueError(
            f"Received: input_size={(height, width)} for a model whose "
            f"preprocessor crops or pads to {out_height}x{out_width} and "
            f"resizes with interpolation={converter.interpolation!r}, which "
            "TFLite has no builtin op for. Expected an input_size with the "
            f"aspect ratio of {out_height}x{out_width}, or preprocessing="
            "False (the file then takes the model's input format)."
        )


def _resize_with_matrices(pixels, raw_size, converter):
    """The converter's resize as two matmuls with constant matrices.

    These interpolations are separable (one kernel per axis), so resizing a
    fixed input size is `A_h @ image @ A_w^T`, which converts to builtin
    ops, where the resize op itself would need TensorFlow's Flex ops.
    """
    height, width = (int(v) for v in raw_size)
    out_height, out_width = (int(v) for v in converter.image_size)
    antialias = bool(getattr(converter, "antialias", False))
    rows = _resize_matrix(
        height, out_height, converter.interpolation, antialias
    )
    cols = _resize_matrix(width, out_width, converter.interpolation, antialias)
    pixels = keras.ops.einsum("oh,bhwc->bowc", rows, pixels)
    return keras.ops.einsum("pw,bowc->bopc", cols, pixels)


def _classifier_outputs(model):
    outputs = model.output
    if not isinstance(outputs, dict):
        outputs = {"logits": outputs}
    router = _image_router(model)
    if router is None:
        return keras.Model(model.input, outputs)
    backbone = model.backbone
    # The backbone with the router's expert indices as one more output (the
    # same layers, so the same weights), and the classifier's head (pooling,
    # dropout, dense) as a model from the backbone's sequence output.
    expert_index = router.output[1]
    extended = keras.Model(
        backbone.input, {**backbone.output, "expert_index": expert_index}
    )
    nodes = backbone._inbound_nodes
    if len(nodes) != 1:
        raise ValueError(
            f"The classifier's backbone is called {len(nodes)} times in its "
            "graph; expected once (a kmm.MobileVMoE classifier)."
        )
    called = keras.tree.pack_sequence_as(backbone.output, nodes[0].outputs)
    head = keras.Model(called["sequence_output"], outputs["logits"])
    images = keras.Input(
        shape=backbone.image_shape, dtype=backbone.input.dtype, name="images"
    )
    features = extended(images)
    return keras.Model(
        images,
        {
            "logits": head(features["sequence_output"]),
            "router_logits": features["router_logits"],
            "expert_index": features["expert_index"],
        },
    )


def convert_functional(
    serving,
    quantization="none",
    representative_data=None,
    float_layers=(),
    float_ops=(),
    residual_blocks=(),
    required_layers=None,
    metadata=None,
    int8_activations="static",
):
    """Converts a functional Keras model to TFLite bytes (TF backend only).

    Every input gets batch size 1 and its fixed shape; the outputs keep
    their names. Only TFLite builtin ops are allowed.

    Args:
        serving: a functional `keras.Model` built on the TensorFlow backend.
        quantization: one of `QUANTIZATIONS`.
        representative_data: for `"int8"`, images for the (single) input.
        float_layers: for `"int8"`, names of layers (as in
            `routing_layers`) whose ops stay in float32.
        float_ops: for `"int8"`, TFLite op types (e.g. `"TOPK_V2"`) that
            stay in float32 wherever they are.
        residual_blocks: for `"int8"`, names of encoder blocks whose
            residual additions stay in float32.
        required_layers: the names of `float_layers` that must match an op
            of the graph (None: all of them).
        metadata: a dict to store in the file (`add_metadata`), completed
            with the signature's `inputs` and `outputs`; None stores none.
        int8_activations: for `"int8"`, `"static"` (calibrated int8
            activations; `float_layers`' ops stay float) or `"dynamic"`
            (the converter's dynamic range quantization, then the weights
            of `float_layers` put back in float32; `float_ops` and
            `residual_blocks` do not apply: activations are float).

    Returns:
        The `.tflite` flatbuffer as bytes.
    """
    flatbuffer = _convert(
        serving,
        quantization,
        representative_data,
        float_layers,
        float_ops,
        residual_blocks,
        required_layers,
        int8_activations,
    )
    if metadata is None:
        return flatbuffer
    inputs, outputs = _signature_io(flatbuffer)
    return add_metadata(
        flatbuffer, {"inputs": inputs, "outputs": outputs, **metadata}
    )


def _convert(
    serving,
    quantization,
    representative_data,
    float_layers,
    float_ops,
    residual_blocks,
    required_layers,
    int8_activations="static",
):
    tf = _import_tensorflow()
    if keras.config.backend() != "tensorflow":
        raise RuntimeError(
            "convert_functional runs on the TensorFlow backend; to_tflite "
            "handles other backends with a subprocess."
        )
    # Named specs name the file's signature inputs (e.g. "images").
    specs = [
        tf.TensorSpec((1, *tensor.shape[1:]), tensor.dtype, name=tensor.name)
        for tensor in serving.inputs
    ]
    with tempfile.TemporaryDirectory() as saved_model:
        archive = keras.export.ExportArchive()
        archive.track(serving)
        archive.add_endpoint(
            "serve",
            lambda *inputs: serving(
                inputs[0] if len(inputs) == 1 else list(inputs), training=False
            ),
            input_signature=specs,
        )
        archive.write_out(saved_model, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if quantization == "int8" and int8_activations == "dynamic":
            float_model = converter.convert()
            converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
            converter.target_spec.supported_ops = [
                tf.lite.OpsSet.TFLITE_BUILTINS
            ]
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            return float_weights(
                converter.convert(),
                float_model,
                float_layers,
                float_layers if required_layers is None else required_layers,
            )
        if quantization == "float16":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_types = [tf.float16]
        elif quantization == "dynamic":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        elif quantization == "int8":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]

            dtype = serving.inputs[0].dtype

            def calibration():
                for image in representative_data:
                    yield [image[None].astype(dtype)]

            converter.representative_dataset = calibration
            # Integer kernels wherever they exist; the rest stays float.
            converter.target_spec.supported_ops = [
                tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
                tf.lite.OpsSet.TFLITE_BUILTINS,
            ]
            if float_layers or float_ops or residual_blocks:
                return _selective_int8(
                    tf,
                    converter,
                    calibration,
                    float_layers,
                    float_ops,
                    residual_blocks,
                    float_layers
                    if required_layers is None
                    else required_layers,
                )
        return converter.convert()


def _check_float_layers_found(found, required_layers):
    """Raises unless every asked-for float layer matched an op."""
    missing = [name for name in required_layers if not found[name]]
    if missing:
        raise ValueError(
            f"Received: float_layers={list(required_layers)}, but {missing} "
            "matched no op of the converted graph. Accepted: names of layers "
            "of the backbone or head (e.g. 'final_norm', 'predictions', "
            "'moe_block_3') or of their sublayers (e.g. 'mlp_norm')."
        )


def float_weights(quantized, float_model, layer_names, required_layers=()):
    """Puts the float32 weights of some layers back into a dynamic range
    file.

    The converter's dynamic range quantization has no deny list; it turns
    every large enough weight into int8, and each op with int8 weights then
    quantizes its float input on the fly (a "hybrid" op). An op given back
    its float32 weights is an ordinary float op. Both files come from the
    same SavedModel, so their tensors have the same names.

    Args:
        quantized: the dynamic range file's bytes.
        float_model: the float32 file's bytes, converted from the same
            SavedModel.
        layer_names: the layers (as in `routing_layers`) whose weights
            stay float32 (see `_float_nodes` for how ops are matched).
        required_layers: the names of `layer_names` that must match an op.

    Returns:
        The file's bytes.
    """
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    found = _float_nodes(quantized, layer_names)
    _check_float_layers_found(found, required_layers)
    outputs = {name for names in found.values() for name in names}
    if not outputs:
        return quantized
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(quantized))
    source = flatbuffer_utils.convert_bytearray_to_object(
        bytearray(float_model)
    )
    float_tensors = {t.name: t for t in source.subgraphs[0].tensors}
    graph = model.subgraphs[0]
    codes = model.operatorCodes
    for op in graph.operators:
        if not any(
            graph.tensors[i].name.decode() in outputs for i in op.outputs
        ):
            continue
        # A DEQUANTIZE (int8 weights turned float once, e.g. before a
        # GATHER) is left as it is: its output is already float.
        code = codes[op.opcodeIndex]
        if max(code.builtinCode, code.deprecatedBuiltinCode) == (
            schema.BuiltinOperator.DEQUANTIZE
        ):
            continue
        for index in op.inputs:
            tensor = graph.tensors[index] if index >= 0 else None
            if (
                tensor is None
                or tensor.type != schema.TensorType.INT8
                or model.buffers[tensor.buffer].data is None
            ):
                continue
            original = float_tensors.get(tensor.name)
            if original is None or list(original.shape) != list(tensor.shape):
                raise RuntimeError(
                    f"The float32 conversion has no weight tensor "
                    f"{tensor.name.decode()!r} shaped {list(tensor.shape)}; "
                    "the two conversions of the model differ."
                )
            tensor.type = original.type
            tensor.quantization = None
            model.buffers[tensor.buffer].data = source.buffers[
                original.buffer
            ].data
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _selective_int8(
    tf,
    converter,
    calibration,
    float_layers,
    float_ops=(),
    residual_blocks=(),
    required_layers=(),
):
    """Full-int8 conversion that keeps some ops in float.

    The converter's own selective quantization (the quantization debugger's
    deny lists): the model is calibrated once, and the ops that belong to
    `float_layers` or are residual additions of `residual_blocks` (see
    `_float_nodes`), or whose type is in `float_ops`, are left unquantized.
    """
    debug_options = tf.lite.experimental.QuantizationDebugOptions
    float_ops = list(float_ops) or None
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter,
        debug_dataset=calibration,
        debug_options=debug_options(denylisted_ops=float_ops),
    )
    found = _float_nodes(
        debugger.calibrated_model, float_layers, residual_blocks
    )
    _check_float_layers_found(found, required_layers)
    nodes = sorted({n for names in found.values() for n in names})
    if nodes:
        debugger.options = debug_options(
            denylisted_nodes=nodes, denylisted_ops=float_ops
        )
    return debugger.get_nondebug_quantized_model()


def to_tflite(
    model,
    path,
    quantization="none",
    representative_data=None,
    float_routing=True,
    float_residual_stream=True,
    float_layers=(),
    preprocessing=True,
    input_size=None,
    int8_activations="dynamic",
):
    """Exports a classifier to a `.tflite` file with builtin ops only.

    Input (signature name `images`, batch 1): with `preprocessing=True`
    (the default) raw uint8 RGB pixels `[1, height, width, 3]`, 0-255, at
    `input_size` (e.g. 32x32 for the CIFAR-100 presets: the CLI picks the
    preset's source size), i.e. what `model.predict` takes; the file casts,
    resizes and scales them like the model's preprocessor, with builtin ops
    (CAST, RESIZE_BILINEAR, MUL, ADD; a bicubic resize, as timm's ViTs use,
    runs as two constant matrices, exact for the fixed input size). With
    `preprocessing=False`, or for a model without a preprocessor, float32
    `[1, *image_shape]` in the model's input format (after its
    preprocessor).

    Outputs: `logits` (float32 `[1, num_classes]`) and, for Mobile V-MoE
    with one router per image, `router_logits` (float32 `[1, E]`) and
    `expert_index` (int32 `[1, top_k]`: the experts the router chose, read
    from its TopK; compare routing with it, since an int8 file may
    re-quantize `router_logits`). The names, dtypes and shapes, the input
    format and the quantization are stored in the file's metadata entry
    `"keras_mobile_moe"` (`read_metadata(path)`).

    `quantization="int8"` (default `int8_activations="dynamic"`): the
    converter's dynamic range quantization (int8 weights; each matmul
    quantizes its float input per call), with the blocks that decide the
    routing given back their float32 weights (`float_routing`). On the
    trained presets (2,000 CIFAR-100 test images, raw 32x32 input;
    benchmarks/results/tflite_quantization.md) it agrees with Keras on
    top-1 / routing for 99.0% / 99.9% (`6x64_e10.cifar100`) and 99.4% /
    99.9% (`12x64_e10.cifar100`) of the images, where `"dynamic"` (every
    weight int8) gets 98.4% / 99.4% and 98.5% / 99.2%, and static int8
    activations (`int8_activations="static"`, calibrated, the default
    before) 96.4% / 99.8% and 97.5% / 99.7%; it is also the int8 variant
    that runs faster than float32 with XNNPACK on x86. Why those blocks:
    with every weight int8, each dense block before the router contributes
    20-36% of the router logits' squared error (attention projections 63%
    in all, MLPs 38%), the patch embedding 2%, so the patch embedding (a
    third of the multiply-adds of a 6x64 at 224 px) stays int8. On the
    small model of the tests (1000 fixture images) the default agrees
    99.2% / 99.9%; static int8 with everything int8 (`float_routing=False,
    float_residual_stream=False`) 92% / 96%, float routing only 96% /
    100%, float routing and residual stream 98% / 100%
    (benchmarks/results/tflite_agreement.md). Measure a model with
    `kmm.export.agreement`.

    Args:
        model: a `kmm.MobileVMoE` (or `kmm.MoNE`) classifier, built on any
            backend.
        path: where to write the `.tflite` file.
        quantization: `"none"` (float32), `"float16"` (float16 weights),
            `"dynamic"` (every large weight int8, float activations) or
            `"int8"` (int8 weights, the routing blocks' float; see
            `int8_activations`).
        representative_data: calibration images for `"int8"` with
            `int8_activations="static"` (checked, and otherwise unused), in
            the file's input format: raw uint8 images `[n, height, width,
            3]` at `input_size` with the preprocessing inside, else float32
            images `[n, *image_shape]` in the model's input format.
        float_routing: bool, for `"int8"` only. Keep the layers that decide
            the routing in float32, so that int8 noise does not change
            which experts run. With dynamic activations: the weights of
            `routing_layers(model)` but the patch embedding (for Mobile
            V-MoE the dense blocks before the router and the router). With
            static activations: all of `routing_layers(model)` (the patch
            embedding too) and the router's softmax and TopK; on the small
            CIFAR-100 model of the tests the file then picks the same
            expert as Keras for every fixture image (96.1% with everything
            int8). The blocks that follow the router, the experts and the
            head stay int8. False quantizes everything that has an int8
            kernel.
        float_residual_stream: bool, for `"int8"` with
            `int8_activations="static"` only (dynamic activations are float
            everywhere). Keep the ops that
            read or write the residual stream in float32: the patch
            embedding, the additions that close each encoder block, the
            LayerNorms in front of attention and MLP, the final LayerNorm
            and the head. Everything inside the
            branches (the attention projections and products, softmax, the
            MLPs and the experts, i.e. nearly all weights and FLOPs) stays
            int8. Quantizing the stream costs most of the int8 top-1
            agreement left once the routing is float.
        float_layers: for `"int8"` only, more layer names to keep in
            float32 (their weights, and with static activations their
            ops): backbone layers (`"final_norm"`, `"moe_block_3"`), the
            head (`"predictions"`) or sublayer names, which match in every
            block (`"attention_norm"`, `"mlp_norm"`).
        preprocessing: bool. True: the file takes raw uint8 images and
            runs the model's image converter itself (parity with
            `model.predict` on raw images); False: it takes preprocessed
            float32 images (for pipelines that preprocess themselves). A
            model without a preprocessor exports as with False.
        input_size: `(height, width)` (or one int) of the raw images the
            file takes, with `preprocessing=True`; None: the converter's
            `image_size` (the backbone's). The file resizes them.
        int8_activations: for `"int8"`: `"dynamic"` (the default; int8
            weights, activations quantized per call by the kernels, no
            calibration) or `"static"` (int8 activations calibrated on
            `representative_data`, ops without an int8 kernel stay float;
            for accelerators that need integer activations; slower than
            float32 on x86 CPUs).

    Returns:
        A dict report: `path`, `bytes`, `quantization`, `preprocessing`,
        `inputs` and `outputs` (as stored in the metadata), `ops` (the builtin
        op names), `stacked_expert_tensors` (per-image routing check),
        `float_layers` (layers kept in float32 by `float_routing` and
        `float_layers`, with the stream's LayerNorms and head),
        `float_residual_stream` (whether the residual additions were kept
        in float32; None with dynamic int8 activations) and, for `"int8"`,
        `int8_activations`.

    Example:

    >>> import tempfile, keras_mobile_moe as kmm
    >>> model = kmm.MobileVMoE(kmm.MobileVMoEBackbone(
    ...     image_shape=(32, 32, 3), patch_size=8, num_layers=2, hidden_dim=16,
    ...     num_heads=2, mlp_dim=32, num_experts=4, num_moe_layers=1),
    ...     num_classes=10, routing="learned")
    >>> report = to_tflite(model, tempfile.mkdtemp() + "/tiny.tflite")
    >>> "GATHER" in report["ops"], report["stacked_expert_tensors"]
    (True, 2)
    """
    raw_shape = raw_input_shape(model, preprocessing, input_size)
    data = _check_arguments(
        model, quantization, representative_data, raw_shape, int8_activations
    )
    dynamic = quantization == "int8" and int8_activations == "dynamic"
    if isinstance(float_layers, str) or not all(
        isinstance(name, str) and name for name in float_layers
    ):
        raise ValueError(
            f"Received: float_layers={float_layers!r}. Expected a list of "
            "layer names, e.g. ['final_norm', 'predictions']."
        )
    if float_layers and quantization != "int8":
        raise ValueError(
            f"Received: float_layers={list(float_layers)} with "
            f"quantization={quantization!r}. float_layers applies to "
            "quantization='int8' only (other modes keep activations float)."
        )
    for name, value in (
        ("float_routing", float_routing),
        ("float_residual_stream", float_residual_stream),
    ):
        if not isinstance(value, bool):
            raise ValueError(f"Received: {name}={value!r}. Expected a bool.")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kept, float_ops, residual_blocks = [], (), []
    if dynamic:
        if float_routing:
            # The blocks before the router keep float32 weights: their
            # int8 weights are what moves the router's input (measured on
            # 6x64_e10.cifar100: each dense block 20-36% of the router
            # logits' squared error, the patch embedding 2%). The patch
            # embedding, a third of the multiply-adds of a 6x64 at 224
            # px, stays int8.
            kept = [n for n in routing_layers(model) if n != "patch_embedding"]
        kept += [name for name in float_layers if name not in kept]
    elif quantization == "int8":
        if float_routing:
            kept = routing_layers(model)
            # The router's TopK picks the experts: in int8 it ranks
            # quantized probabilities, where close ones tie.
            float_ops = ("TOPK_V2",) if kept else ()
        if float_residual_stream:
            residual_blocks, stream = _residual_stream(model)
            kept += [name for name in stream if name not in kept]
        kept += [name for name in float_layers if name not in kept]
    # Written into a temporary sibling and renamed over `path` once it is
    # complete and checked: an error (disk full, a failed conversion, a
    # non-builtin op) or a kill leaves the previous file as it was.
    with atomic_io.atomic_path(path) as temporary:
        temporary = pathlib.Path(temporary)
        if keras.config.backend() == "tensorflow":
            flatbuffer = convert_functional(
                _serving_model(model, raw_shape),
                quantization,
                data,
                kept,
                float_ops,
                residual_blocks,
                required_layers=list(float_layers),
                metadata=_file_metadata(
                    model, quantization, raw_shape, int8_activations
                ),
                int8_activations=int8_activations,
            )
            with open(temporary, "wb") as f:
                f.write(flatbuffer)
        else:
            convert_in_subprocess(
                model,
                [
                    "--out",
                    str(temporary),
                    "--quantization",
                    quantization,
                    f"--float_routing={float_routing}",
                    f"--float_residual_stream={float_residual_stream}",
                    f"--float_layers={','.join(float_layers)}",
                    f"--int8_activations={int8_activations}",
                    f"--preprocessing={raw_shape is not None}",
                    *(
                        ["--input_size", f"{raw_shape[0]},{raw_shape[1]}"]
                        if raw_shape is not None
                        else []
                    ),
                ],
                data,
            )
        report = inspect_tflite(model, temporary, quantization)
    report["path"] = str(path)
    report["preprocessing"] = raw_shape is not None
    report["float_layers"] = list(kept)
    # Dynamic range activations are float everywhere: not applicable.
    report["float_residual_stream"] = None if dynamic else bool(residual_blocks)
    if quantization == "int8":
        report["int8_activations"] = int8_activations
    return report


METADATA_NAME = "keras_mobile_moe"


def _signature_io(flatbuffer):
    """The file's signature inputs and outputs: name, dtype, shape."""
    runner = load_interpreter(flatbuffer, xnnpack=False).get_signature_runner()

    def describe(details):
        return [
            {
                "name": name,
                "dtype": np.dtype(d["dtype"]).name,
                "shape": [int(v) for v in d["shape"]],
            }
            for name, d in sorted(details.items())
        ]

    return describe(runner.get_input_details()), describe(
        runner.get_output_details()
    )


def add_metadata(flatbuffer, info):
    """Returns `flatbuffer` with `info` (a JSON-able dict) stored as the
    model's metadata entry `"keras_mobile_moe"` (a named buffer of the
    TFLite schema's `Model.metadata`, which LiteRT keeps and ignores at run
    time; read it with `read_metadata`)."""
    import json

    tf = _import_tensorflow()
    del tf  # the schema helpers ship with TensorFlow
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(flatbuffer))
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(
        json.dumps(info, sort_keys=True).encode(), np.uint8
    )
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = METADATA_NAME
    entry.buffer = len(model.buffers) - 1
    model.metadata = [
        m
        for m in (model.metadata or [])
        if (m.name.decode() if isinstance(m.name, bytes) else m.name)
        != METADATA_NAME
    ] + [entry]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def read_metadata(path_or_bytes):
    """The input/output description `to_tflite` stores in a `.tflite` file.

    Args:
        path_or_bytes: a `.tflite` path or its bytes.

    Returns:
        A dict: `inputs` and `outputs` (lists of `{"name", "dtype",
        "shape"}`, the signature's tensors), `preprocessing` (bool: the
        file takes raw uint8 images and resizes/scales them itself),
        `input_format` (a sentence), `quantization`, `model` (class name),
        and `keras_mobile_moe_version`; None for a file without it.

    Example:

    >>> import tempfile, keras_mobile_moe as kmm
    >>> model = kmm.MobileVMoE(kmm.MobileVMoEBackbone(
    ...     image_shape=(32, 32, 3), patch_size=8, num_layers=2, hidden_dim=16,
    ...     num_heads=2, mlp_dim=32, num_experts=4, num_moe_layers=1),
    ...     num_classes=10, routing="learned")
    >>> path = to_tflite(model, tempfile.mkdtemp() + "/tiny.tflite")["path"]
    >>> [(t["name"], t["dtype"]) for t in read_metadata(path)["outputs"]]
    [('expert_index', 'int32'), ('logits', 'float32'),
     ('router_logits', 'float32')]
    """
    import json

    tf = _import_tensorflow()
    del tf
    from tensorflow.lite.python import schema_py_generated as schema

    if isinstance(path_or_bytes, (bytes, bytearray)):
        data = bytes(path_or_bytes)
    else:
        data = pathlib.Path(path_or_bytes).read_bytes()
    model = schema.Model.GetRootAs(data, 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name() and entry.Name().decode() == METADATA_NAME:
            buffer = model.Buffers(entry.Buffer())
            return json.loads(buffer.DataAsNumpy().tobytes().decode())
    return None


def _file_metadata(model, quantization, raw_shape, int8_activations=None):
    import keras_mobile_moe

    if raw_shape is not None:
        converter = image_converter(model)
        input_format = (
            f"raw RGB pixels, uint8 0-255, {raw_shape[0]}x{raw_shape[1]}; "
            f"the file resizes them to {converter.image_size[0]}x"
            f"{converter.image_size[1]} ({converter.interpolation}) and "
            f"scales them (x * {converter.scale} + {converter.offset})"
        )
    else:
        input_format = (
            "float32 images in the model's input format (after its "
            "preprocessor)"
        )
    return {
        "preprocessing": raw_shape is not None,
        "input_format": input_format,
        "quantization": quantization,
        **(
            {"int8_activations": int8_activations}
            if quantization == "int8"
            else {}
        ),
        "model": type(model).__name__,
        "keras_mobile_moe_version": getattr(
            keras_mobile_moe, "__version__", None
        ),
    }


def inspect_tflite(model, path, quantization):
    """Loads an exported file and checks its ops and its routing."""
    interpreter = load_interpreter(path, xnnpack=False)
    ops = check_builtin_ops(interpreter)
    backbone = model.backbone
    stacked = 0
    # Per-token routing runs every expert on its capacity slots by design;
    # the check is for per-image routing, where one image runs k experts.
    if getattr(backbone, "is_moe", False) and not getattr(
        backbone, "is_token_routed", False
    ):
        stacked = check_sparse_routing(
            interpreter, backbone.num_experts, _expert_kernel_shapes(model)
        )
    metadata = read_metadata(path) or {}
    return {
        "path": str(path),
        "bytes": path.stat().st_size,
        "quantization": quantization,
        "inputs": metadata.get("inputs"),
        "outputs": metadata.get("outputs"),
        "ops": ops,
        "stacked_expert_tensors": stacked,
    }


def convert_in_subprocess(model, arguments, data=None):
    """Runs the export CLI on the TensorFlow backend for a model built on
    another backend (the weights are backend-neutral)."""
    with tempfile.TemporaryDirectory() as workdir:
        model_file = os.path.join(workdir, "model.keras")
        model.save(model_file)
        command = [
            sys.executable,
            "-m",
            "keras_mobile_moe.export",
            "--model_file",
            model_file,
            *arguments,
        ]
        if data is not None:
            data_file = os.path.join(workdir, "representative.npy")
            np.save(data_file, data)
            command += ["--representative_file", data_file]
        env = {
            **os.environ,
            "KERAS_BACKEND": "tensorflow",
            "KMM_EXPORT_SUBPROCESS": "1",
        }
        result = subprocess.run(
            command, env=env, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(
                "TFLite conversion on the TensorFlow backend failed: "
                + subprocess_error(result.stderr, result.returncode)
            )


_LOG_PREFIXES = (
    "I0000",
    "W0000",
    "E0000",
    "F0000",
    "WARNING: All log",
    "To enable the following",
)


def subprocess_error(stderr, returncode=None):
    """The real error of a failed conversion subprocess, first: the last
    exception line(s) of its traceback, then the end of its log without
    TensorFlow's info lines."""
    lines = stderr.splitlines()
    start = None
    for i, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last):"):
            start = i
    error = []
    if start is not None:
        for line in lines[start + 1 :]:
            if error or (line and not line[0].isspace()):
                if line.startswith(_LOG_PREFIXES):
                    continue
                error.append(line)
    log = [line for line in lines if not line.startswith(_LOG_PREFIXES)]
    if not error:
        code = "" if returncode is None else f" (exit status {returncode})"
        error = [
            f"the converter process failed{code} without a Python "
            "error; its log ends:"
        ]
    tail = "\n".join(log)[-3000:]
    return "\n".join(error).strip() + "\n\nConverter log (end):\n" + tail


# Python arguments named in library errors -> the flags of the export
# command line (`python -m keras_mobile_moe.export`).
CLI_NAMES = (
    ("Pass load_weights=False", "Pass --random_weights"),
    ("pass load_weights=False", "pass --random_weights"),
    ("load_weights=False", "--random_weights"),
    ("representative_data", "--representative_file"),
    ("float_routing=", "--float_routing="),
    ("float_residual_stream=", "--float_residual_stream="),
    ("Received: quantization=", "Received: --quantization="),
    ("Received: float_layers=", "Received: --float_layers="),
    ("Received: int8_activations=", "Received: --int8_activations="),
    ("int8_activations='static'", "--int8_activations=static"),
)


def cli_message(error):
    """A library error as a message for the export command line: it names
    the command's flags instead of Python arguments.

    Example:

    >>> cli_message(ValueError("Pass load_weights=False to build it."))
    'Pass --random_weights to build it.'
    """
    message = str(error)
    for python_name, flag in CLI_NAMES:
        message = message.replace(python_name, flag)
    return message


class TFLiteClassifier:
    """Runs an exported classifier with the LiteRT interpreter.

    Args:
        path_or_bytes: the `.tflite` file or its bytes.
        num_threads: int. Interpreter threads.

    Call arguments:
        image: `[1, height, width, channels]` or `[height, width,
            channels]`, in the file's input format: raw uint8 pixels for a
            file with the preprocessing inside (the default of `to_tflite`),
            else float32 (`input_dtype` says which).

    Returns:
        A dict of numpy outputs: `logits` (and, for Mobile V-MoE with one
        router per image, `router_logits` and the int32 `expert_index`).

    Example:

    >>> import tempfile, numpy as np, keras_mobile_moe as kmm
    >>> model = kmm.MobileVMoE(kmm.MobileVMoEBackbone(
    ...     image_shape=(32, 32, 3), patch_size=8, num_layers=2, hidden_dim=16,
    ...     num_heads=2, mlp_dim=32, num_experts=4, num_moe_layers=1),
    ...     num_classes=10, routing="learned")
    >>> path = to_tflite(model, tempfile.mkdtemp() + "/tiny.tflite")["path"]
    >>> runner = TFLiteClassifier(path)
    >>> sorted(runner(np.zeros((32, 32, 3), "float32")))
    ['expert_index', 'logits', 'router_logits']
    """

    def __init__(self, path_or_bytes, num_threads=1):
        self.interpreter = load_interpreter(path_or_bytes, num_threads)
        self.runner = self.interpreter.get_signature_runner()
        details = self.runner.get_input_details()
        self.input_name = next(iter(details))
        self.input_dtype = np.dtype(details[self.input_name]["dtype"])

    def __call__(self, image):
        image = np.asarray(image)
        if self.input_dtype == np.uint8 and image.dtype != np.uint8:
            if image.size and (image.min() < 0 or image.max() > 255):
                raise ValueError(
                    f"Received: pixels in [{image.min():g}, {image.max():g}]"
                    ". This file takes raw uint8 pixels in [0, 255] (it was "
                    "exported with preprocessing=True)."
                )
            image = np.round(image)
        image = image.astype(self.input_dtype)
        if image.ndim == 3:
            image = image[None]
        return self.run(**{self.input_name: image})

    def run(self, **inputs):
        """Runs the signature with named inputs; returns numpy outputs."""
        outputs = self.runner(**inputs)
        return {name: np.asarray(value) for name, value in outputs.items()}

    def predict(self, images):
        """Runs image by image; returns a dict of stacked outputs."""
        results = [self(image) for image in np.asarray(images)]
        return {k: np.concatenate([r[k] for r in results]) for k in results[0]}
