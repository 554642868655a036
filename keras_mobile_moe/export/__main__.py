"""Command line: export a preset or a saved model to TFLite.

    python -m keras_mobile_moe.export --preset 6x64_e10_cifar100 \\
        --quantization int8 --out 6x64_e10_int8.tflite

The presets with trained weights are listed by
`kmm.preset_registry.trained_presets("mobile_vmoe")` (e.g.
`6x64_e10.cifar100`, alias `6x64_e10_cifar100`); any other preset needs
`--random_weights` (architecture only). By default the file takes raw uint8
RGB images at the preset's source size (32x32 for the CIFAR-100 presets, the
model's own size otherwise; `--input_size` overrides it) and resizes and
scales them itself; `--nopreprocessing` writes a file that takes float32
images in the model's input format. int8 calibrates on the CIFAR-100 fixture
shipped with the package unless `--representative_file` (a .npy of images in
the file's input format) is given; only `--int8_activations=static` (int8
activations) calibrates, the default `dynamic` (int8 weights, activations
quantized per call, the blocks that decide the routing in float32) needs no
data. The last line on stderr is a one-line
summary (file, size, builtin ops, agreement with Keras on the fixture); the
full report is printed as JSON on stdout.
"""

import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# TensorFlow's C++ info/warning lines (oneDNN, CUDA probing) are printed at
# import; the level has to be set before TensorFlow is first imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from keras_mobile_moe.native_logs import hide_native_logs  # noqa: E402

PRESET = flags.DEFINE_string(
    "preset",
    None,
    "Preset name (e.g. 6x64_e10_cifar100), directory or hf:// handle.",
)
MODEL_FILE = flags.DEFINE_string("model_file", None, "A saved .keras model.")
QUANTIZATION = flags.DEFINE_enum(
    "quantization",
    "none",
    ["none", "float16", "dynamic", "int8"],
    "Post-training quantization.",
)
OUT = flags.DEFINE_string("out", None, "Output .tflite path.")
EXPERT_SPLIT_DIR = flags.DEFINE_string(
    "expert_split_dir",
    None,
    "Instead of one file, write a trunk and one file per expert here.",
)
REPRESENTATIVE = flags.DEFINE_string(
    "representative_file",
    None,
    ".npy of calibration images in the file's input format (raw uint8 with "
    "--preprocessing, else preprocessed float32).",
)
NUM_CALIBRATION = flags.DEFINE_integer(
    "num_calibration", 200, "Fixture images used to calibrate int8."
)
RANDOM_WEIGHTS = flags.DEFINE_bool(
    "random_weights",
    False,
    "Export a preset's architecture with random weights.",
)
PREPROCESSING = flags.DEFINE_bool(
    "preprocessing",
    True,
    "The file takes raw uint8 images and resizes/scales them itself "
    "(--nopreprocessing: float32 images in the model's input format).",
)
INPUT_SIZE = flags.DEFINE_list(
    "input_size",
    None,
    "Raw image size 'height,width' with --preprocessing (default: the "
    "preset's source size, e.g. 32,32 for CIFAR-100 presets).",
)
FLOAT_ROUTING = flags.DEFINE_bool(
    "float_routing",
    True,
    "int8 only: keep the layers that decide the routing in float32.",
)
FLOAT_RESIDUAL_STREAM = flags.DEFINE_bool(
    "float_residual_stream",
    True,
    "int8 with --int8_activations=static only: keep the residual stream "
    "(block additions) in float32.",
)
INT8_ACTIVATIONS = flags.DEFINE_enum(
    "int8_activations",
    "dynamic",
    ["dynamic", "static"],
    "int8 only: 'dynamic' (int8 weights, activations quantized per call; "
    "the blocks that decide the routing keep float32 weights) or 'static' "
    "(int8 activations calibrated on the fixture, float fallback).",
)
FLOAT_LAYERS = flags.DEFINE_list(
    "float_layers",
    [],
    "int8 only: more layer names to keep in float32 (e.g. final_norm).",
)
CHECK = flags.DEFINE_bool(
    "check",
    True,
    "Measure the file's agreement with Keras on the CIFAR-100 fixture "
    "(1000 images) for the summary line.",
)
flags.mark_flags_as_mutual_exclusive(["preset", "model_file"], required=True)
flags.mark_flags_as_mutual_exclusive(["out", "expert_split_dir"], required=True)

TF_LOGS = flags.DEFINE_bool(
    "tf_logs",
    False,
    "Show TensorFlow's and LiteRT's native log lines (hidden by default).",
)

# Native log lines of TensorFlow, the converter and LiteRT (C++ writes them
# to fd 2 directly; TF 2.21's absl logging ignores TF_CPP_MIN_LOG_LEVEL).
# The package's __init__ starts the filter (native_logs) before TensorFlow is
# imported; main() starts it for other entry points.


# Raw image size of the datasets presets are trained on.
DATASET_IMAGE_SIZES = {"cifar100": (32, 32)}


def source_image_size(preset):
    """The raw image size `(height, width)` a preset's weights were trained
    on (its dataset's), or None when unknown (random weights, paper
    presets): the file then takes images at the model's own size.

    Args:
        preset: a built-in preset name or alias, or a preset directory.

    Returns:
        A `(height, width)` tuple or None.
    """
    from keras_mobile_moe import preset_registry

    dataset = None
    entry = preset_registry.load_registry().get(str(preset))
    if entry is not None:
        if entry.get("weights"):
            dataset = (entry.get("accuracy") or {}).get("dataset")
    elif os.path.isfile(os.path.join(str(preset), "metadata.json")):
        with open(os.path.join(str(preset), "metadata.json")) as f:
            dataset = (json.load(f).get("training") or {}).get("dataset")
    return DATASET_IMAGE_SIZES.get(dataset)


def load_preset(preset, load_weights):
    """A classifier of whichever family the preset belongs to."""
    import keras_mobile_moe as kmm
    from keras_mobile_moe import preset_registry

    entry = preset_registry.load_registry().get(str(preset))
    family = entry["family"] if entry else "mobile_vmoe"
    cls = kmm.MoNE if family == "mone" else kmm.MobileVMoE
    return cls.from_preset(preset, load_weights=load_weights)


def raw_fixture(split, shape):
    """Fixture images as raw uint8 pixels at `shape` (resized if needed)."""
    import keras
    import numpy as np

    from keras_mobile_moe.datasets import cifar100

    data = cifar100.load_fixture()
    splits = ("train",) if split == "train" else ("train", "test")
    images = np.concatenate([data[f"x_{s}"] for s in splits])
    labels = np.concatenate([data[f"y_{s}"] for s in splits])
    if tuple(images.shape[1:3]) != tuple(shape[:2]):
        resized = keras.ops.image.resize(
            images.astype("float32"), tuple(shape[:2]), interpolation="bilinear"
        )
        images = np.clip(
            np.round(keras.ops.convert_to_numpy(resized)), 0, 255
        ).astype("uint8")
    return images, labels


def calibration_images(model, count, raw_shape=None):
    """Fixture images in the file's input format: raw uint8 at `raw_shape`,
    or through the model's preprocessor."""
    import keras
    import numpy as np

    from keras_mobile_moe.datasets import cifar100

    if raw_shape is not None:
        return raw_fixture("train", raw_shape)[0][:count]
    images = cifar100.load_fixture()["x_train"][:count]
    if model.preprocessor is None:
        return images.astype("float32") / 127.5 - 1.0
    converted = model.preprocessor.image_converter(images.astype("float32"))
    return np.asarray(keras.ops.convert_to_numpy(converted), "float32")


def main(argv):
    import warnings

    # absl's own INFO lines (and TensorFlow's Python warnings routed to it).
    logging.set_verbosity(logging.ERROR)
    restore = None
    if not TF_LOGS.value and not os.environ.get("KMM_EXPORT_SUBPROCESS"):
        warnings.filterwarnings(
            "ignore", message=r"(?s).*tf\.lite\.Interpreter is deprecated"
        )
        restore = hide_native_logs()
    try:
        run(argv)
    except (
        ValueError,
        FileNotFoundError,
        FileExistsError,
        RuntimeError,
    ) as error:
        if os.environ.get("KMM_EXPORT_SUBPROCESS"):
            raise  # to_tflite reads the traceback and reports the error
        from keras_mobile_moe.export.tflite import cli_message

        print(f"error: {cli_message(error)}", file=sys.stderr)
        sys.exit(1)
    finally:
        if restore is not None:
            restore()


def _input_size():
    if INPUT_SIZE.value is None:
        return None
    try:
        size = tuple(int(v) for v in INPUT_SIZE.value)
    except ValueError:
        size = ()
    if len(size) == 1:
        size = size * 2
    if len(size) != 2:
        raise ValueError(
            f"Received: --input_size={','.join(INPUT_SIZE.value)}. Expected "
            "'height,width' (or one int), e.g. --input_size=32,32."
        )
    return size


def run(argv):
    del argv
    import keras
    import numpy as np

    from keras_mobile_moe.export.expert_split import to_tflite_expert_split
    from keras_mobile_moe.export.tflite import raw_input_shape
    from keras_mobile_moe.export.tflite import to_tflite

    if MODEL_FILE.value:
        model = keras.saving.load_model(MODEL_FILE.value, compile=False)
    else:
        model = load_preset(PRESET.value, not RANDOM_WEIGHTS.value)
    if EXPERT_SPLIT_DIR.value:
        manifest = to_tflite_expert_split(
            model, EXPERT_SPLIT_DIR.value, QUANTIZATION.value
        )
        print(json.dumps(manifest))
        return
    input_size = _input_size()
    if (
        input_size is None
        and PRESET.value
        and PREPROCESSING.value
        and not RANDOM_WEIGHTS.value
    ):
        input_size = source_image_size(PRESET.value)
    raw_shape = raw_input_shape(model, PREPROCESSING.value, input_size)
    data = None
    if REPRESENTATIVE.value:
        data = np.load(REPRESENTATIVE.value, allow_pickle=False)
    elif QUANTIZATION.value == "int8" and INT8_ACTIVATIONS.value == "static":
        data = calibration_images(model, NUM_CALIBRATION.value, raw_shape)
    report = to_tflite(
        model,
        OUT.value,
        QUANTIZATION.value,
        data,
        float_routing=FLOAT_ROUTING.value,
        float_residual_stream=FLOAT_RESIDUAL_STREAM.value,
        float_layers=FLOAT_LAYERS.value,
        preprocessing=PREPROCESSING.value,
        input_size=input_size,
        int8_activations=INT8_ACTIVATIONS.value,
    )
    summary = _summary(report)
    if CHECK.value and not os.environ.get("KMM_EXPORT_SUBPROCESS"):
        report["agreement"] = _fixture_agreement(model, report, raw_shape)
        summary += _agreement_text(report["agreement"])
    print(json.dumps(report))
    print(summary, file=sys.stderr)


def _summary(report):
    images = report["inputs"][0] if report.get("inputs") else None
    shape = "x".join(map(str, images["shape"][1:])) if images else "?"
    dtype = images["dtype"] if images else "?"
    return (
        f"wrote {report['path']}: {report['bytes'] / 1e6:.2f} MB, "
        f"{report['quantization']}, input {dtype} {shape}, builtin ops only "
        f"({len(report['ops'])} op types)"
    )


def _fixture_agreement(model, report, raw_shape):
    from keras_mobile_moe.export.parity import agreement
    from keras_mobile_moe.export.parity import fixture_images

    if raw_shape is not None:
        images, labels = raw_fixture("all", raw_shape)
    else:
        images, labels = fixture_images(model)
    result = agreement(model, report["path"], images, labels)
    return {k: v for k, v in result.items() if not k.endswith("disagreements")}


def _agreement_text(result):
    text = (
        f", fixture ({result['num_images']} images): top-1 agreement "
        f"{100 * result['top1']:.1f}%"
    )
    if result.get("routing") is not None:
        text += f", routing {100 * result['routing']:.1f}%"
    return text + f", max |logit diff| {result['max_abs_logit_error']:.2g}"


if __name__ == "__main__":
    app.run(main)
