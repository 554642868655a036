"""TFLite / LiteRT export of the model families, with quantization.

Conversion runs on the TensorFlow backend (the TFLite converter reads a TF
SavedModel). A model built on JAX or PyTorch is saved to a `.keras` file and
converted in a subprocess with `KERAS_BACKEND=tensorflow`: the weights are
backend-neutral, so the result is the same model.

The file has batch size 1, a fixed input shape, float32 input (images scaled
like the model's preprocessor does) and the outputs `logits` (and, for Mobile
V-MoE, `router_logits`). It contains only TFLite builtin ops, which is checked
after conversion.
"""

import os
import pathlib
import subprocess
import sys
import tempfile

import keras
import numpy as np

QUANTIZATIONS = ("none", "float16", "dynamic", "int8")


def _import_tensorflow():
    try:
        import tensorflow as tf
    except ImportError as error:
        raise ImportError(
            "TFLite export needs TensorFlow: pip install 'keras-mobile-moe[tflite]'"
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
    backbone = model.backbone
    names = [layer.name for layer in backbone.layers]
    if "router" in names:
        # Everything up to the router feeds its decision.
        return [n for n in names[1 : names.index("router") + 1]
                if not n.startswith(("moe_block", "nested_block"))]
    # Per-token routing: every MoE layer's own router (named "router").
    return ["router"] if any(n.startswith("moe_block") for n in names) else []


def _float_nodes(tensor_names, layer_names):
    """The tensors of a converted model that belong to `layer_names`."""
    import re

    if not layer_names:
        return []
    # "/dense_block_1_1/" is layer dense_block_1 (Keras adds "_<n>" when the
    # graph is traced), but "/dense_block_10_1/" is not.
    pattern = re.compile(
        "/(" + "|".join(re.escape(n) for n in layer_names) + r")(_\d+)?/"
    )
    return [t for t in tensor_names if pattern.search(t)]


def _check_arguments(model, quantization, representative_data):
    if quantization not in QUANTIZATIONS:
        raise ValueError(
            f"Received: quantization={quantization!r}. Expected one of "
            f"{list(QUANTIZATIONS)}."
        )
    if not hasattr(model, "backbone"):
        raise ValueError(
            f"to_tflite exports classifier tasks; received a "
            f"{type(model).__name__}. Accepted: kmm.MobileVMoE or kmm.MoNE."
        )
    image_shape = tuple(model.backbone.image_shape)
    if quantization == "int8":
        if representative_data is None:
            raise ValueError(
                "quantization='int8' needs representative_data: a float32 "
                f"array [n, {', '.join(map(str, image_shape))}] of images in "
                "the model's input format (n >= 1, ~100 is typical)."
            )
        data = np.asarray(representative_data)
        if data.ndim != 4 or tuple(data.shape[1:]) != image_shape:
            raise ValueError(
                f"representative_data has shape {data.shape}; expected "
                f"[n, {', '.join(map(str, image_shape))}]."
            )
        return data.astype("float32")
    return None


def _serving_model(model):
    """The classifier as a functional model returning a dict of outputs."""
    outputs = model.output
    if not isinstance(outputs, dict):
        outputs = {"logits": outputs}
    return keras.Model(model.input, outputs)


def convert_functional(
    serving, quantization="none", representative_data=None, float_layers=()
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

    Returns:
        The `.tflite` flatbuffer as bytes.
    """
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
        if quantization == "float16":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_types = [tf.float16]
        elif quantization == "dynamic":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        elif quantization == "int8":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]

            def calibration():
                for image in representative_data:
                    yield [image[None].astype("float32")]

            converter.representative_dataset = calibration
            # Integer kernels wherever they exist; the rest stays float.
            converter.target_spec.supported_ops = [
                tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
                tf.lite.OpsSet.TFLITE_BUILTINS,
            ]
            if float_layers:
                return _selective_int8(tf, converter, calibration, float_layers)
        return converter.convert()


def _selective_int8(tf, converter, calibration, float_layers):
    """Full-int8 conversion that keeps the ops of `float_layers` in float.

    The converter's own selective quantization (the quantization debugger's
    deny list): the calibrated model is built once, and the ops whose output
    tensors belong to those layers are left unquantized.
    """
    interpreter = load_interpreter(converter.convert(), xnnpack=False)
    names = [t["name"] for t in interpreter.get_tensor_details()]
    nodes = _float_nodes(names, float_layers)
    if not nodes:
        raise ValueError(
            f"None of the layers {list(float_layers)} was found in the "
            "converted graph; cannot keep them in float."
        )
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter,
        debug_dataset=calibration,
        debug_options=tf.lite.experimental.QuantizationDebugOptions(
            denylisted_nodes=nodes
        ),
    )
    return debugger.get_nondebug_quantized_model()


def to_tflite(
    model, path, quantization="none", representative_data=None,
    float_routing=True,
):
    """Exports a classifier to a `.tflite` file with builtin ops only.

    Args:
        model: a `kmm.MobileVMoE` (or `kmm.MoNE`) classifier, built on any
            backend.
        path: where to write the `.tflite` file.
        quantization: `"none"` (float32), `"float16"` (float16 weights),
            `"dynamic"` (int8 weights, float activations) or `"int8"` (int8
            weights and activations, calibrated on `representative_data`;
            ops without an int8 kernel stay float).
        representative_data: float32 images `[n, height, width, channels]`
            in the model's input format (after its preprocessor), needed for
            `"int8"`.
        float_routing: bool, for `"int8"` only. Keep the layers that decide
            the routing (`routing_layers(model)`: for Mobile V-MoE the patch
            embedding, the dense blocks before the router and the router) in
            float32, so that int8 noise does not change which experts run.
            On the small CIFAR-100 model of the tests this lifts routing
            agreement with Keras from 96% to 99% (the blocks that follow the
            router, the experts and the head stay int8). False quantizes
            everything that has an int8 kernel.

    Returns:
        A dict report: `path`, `bytes`, `quantization`, `ops` (the builtin
        op names), `stacked_expert_tensors` (per-image routing check) and
        `float_layers` (layers kept in float32 by `float_routing`).

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
    data = _check_arguments(model, quantization, representative_data)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    float_layers = ()
    if quantization == "int8" and float_routing:
        float_layers = routing_layers(model)
    if keras.config.backend() == "tensorflow":
        flatbuffer = convert_functional(
            _serving_model(model), quantization, data, float_layers
        )
        path.write_bytes(flatbuffer)
    else:
        convert_in_subprocess(
            model,
            ["--out", str(path), "--quantization", quantization,
             f"--float_routing={bool(float_routing)}"],
            data,
        )
    report = inspect_tflite(model, path, quantization)
    report["float_layers"] = list(float_layers)
    return report


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
    return {
        "path": str(path),
        "bytes": path.stat().st_size,
        "quantization": quantization,
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
            sys.executable, "-m", "keras_mobile_moe.export",
            "--model_file", model_file, *arguments,
        ]
        if data is not None:
            data_file = os.path.join(workdir, "representative.npy")
            np.save(data_file, data)
            command += ["--representative_file", data_file]
        env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
        result = subprocess.run(
            command, env=env, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(
                "TFLite conversion on the TensorFlow backend failed:\n"
                + result.stderr[-4000:]
            )


class TFLiteClassifier:
    """Runs an exported classifier with the LiteRT interpreter.

    Args:
        path_or_bytes: the `.tflite` file or its bytes.
        num_threads: int. Interpreter threads.

    Call arguments:
        image: float32 `[1, height, width, channels]` or `[height, width,
            channels]`.

    Returns:
        A dict of numpy outputs: `logits` (and `router_logits` for MoE).

    Example:

    >>> import tempfile, numpy as np, keras_mobile_moe as kmm
    >>> model = kmm.MobileVMoE(kmm.MobileVMoEBackbone(
    ...     image_shape=(32, 32, 3), patch_size=8, num_layers=2, hidden_dim=16,
    ...     num_heads=2, mlp_dim=32, num_experts=4, num_moe_layers=1),
    ...     num_classes=10, routing="learned")
    >>> path = to_tflite(model, tempfile.mkdtemp() + "/tiny.tflite")["path"]
    >>> runner = TFLiteClassifier(path)
    >>> sorted(runner(np.zeros((32, 32, 3), "float32")))
    ['logits', 'router_logits']
    """

    def __init__(self, path_or_bytes, num_threads=1):
        self.interpreter = load_interpreter(path_or_bytes, num_threads)
        self.runner = self.interpreter.get_signature_runner()
        self.input_name = next(iter(self.runner.get_input_details()))

    def __call__(self, image):
        image = np.asarray(image, dtype="float32")
        if image.ndim == 3:
            image = image[None]
        return self.run(**{self.input_name: image})

    def run(self, **inputs):
        """Runs the signature with named inputs; returns numpy outputs."""
        outputs = self.runner(**inputs)
        return {name: np.asarray(value) for name, value in outputs.items()}

    def predict(self, images):
        """Runs image by image; returns a dict of stacked outputs."""
        results = [self(image) for image in np.asarray(images, "float32")]
        return {k: np.concatenate([r[k] for r in results]) for k in results[0]}
