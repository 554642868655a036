"""Command line: export a preset or a saved model to TFLite.

    python -m keras_mobile_moe.export --preset 6x64_e10 --quantization int8 \
        --out 6x64_e10_int8.tflite

int8 calibrates on the CIFAR-100 fixture shipped with the package unless
`--representative_file` (a .npy of input-format images) is given. A preset
without published weights needs `--random_weights` (architecture only).
"""

import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

PRESET = flags.DEFINE_string("preset", None, "Preset name, directory or hf://.")
MODEL_FILE = flags.DEFINE_string("model_file", None, "A saved .keras model.")
QUANTIZATION = flags.DEFINE_enum(
    "quantization", "none", ["none", "float16", "dynamic", "int8"],
    "Post-training quantization.",
)
OUT = flags.DEFINE_string("out", None, "Output .tflite path.")
EXPERT_SPLIT_DIR = flags.DEFINE_string(
    "expert_split_dir", None,
    "Instead of one file, write a trunk and one file per expert here.",
)
REPRESENTATIVE = flags.DEFINE_string(
    "representative_file", None, ".npy of calibration images (input format)."
)
NUM_CALIBRATION = flags.DEFINE_integer(
    "num_calibration", 200, "Fixture images used to calibrate int8."
)
RANDOM_WEIGHTS = flags.DEFINE_bool(
    "random_weights", False, "Export a preset's architecture with random weights."
)
FLOAT_ROUTING = flags.DEFINE_bool(
    "float_routing", True,
    "int8 only: keep the layers that decide the routing in float32.",
)
FLOAT_RESIDUAL_STREAM = flags.DEFINE_bool(
    "float_residual_stream", True,
    "int8 only: keep the residual stream (block additions) in float32.",
)
FLOAT_LAYERS = flags.DEFINE_list(
    "float_layers", [],
    "int8 only: more layer names to keep in float32 (e.g. final_norm).",
)
flags.mark_flags_as_mutual_exclusive(["preset", "model_file"], required=True)
flags.mark_flags_as_mutual_exclusive(["out", "expert_split_dir"], required=True)


def calibration_images(model, count):
    """Fixture images through the model's preprocessor (input format)."""
    import keras
    import numpy as np

    from keras_mobile_moe.datasets import cifar100

    images = cifar100.load_fixture()["x_train"][:count]
    if model.preprocessor is None:
        return images.astype("float32") / 127.5 - 1.0
    converted = model.preprocessor.image_converter(images)
    return np.asarray(keras.ops.convert_to_numpy(converted), "float32")


def main(argv):
    try:
        run(argv)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as error:
        if os.environ.get("KMM_EXPORT_SUBPROCESS"):
            raise  # to_tflite reads the traceback and reports the error
        from keras_mobile_moe.export.tflite import cli_message

        print(f"error: {cli_message(error)}", file=sys.stderr)
        sys.exit(1)


def run(argv):
    del argv
    import keras
    import numpy as np

    import keras_mobile_moe as kmm
    from keras_mobile_moe.export.expert_split import to_tflite_expert_split
    from keras_mobile_moe.export.tflite import to_tflite

    if MODEL_FILE.value:
        model = keras.saving.load_model(MODEL_FILE.value, compile=False)
    else:
        model = kmm.MobileVMoE.from_preset(
            PRESET.value, load_weights=not RANDOM_WEIGHTS.value
        )
    if EXPERT_SPLIT_DIR.value:
        manifest = to_tflite_expert_split(
            model, EXPERT_SPLIT_DIR.value, QUANTIZATION.value
        )
        print(json.dumps(manifest))
        return
    data = None
    if QUANTIZATION.value == "int8":
        if REPRESENTATIVE.value:
            data = np.load(REPRESENTATIVE.value, allow_pickle=False)
        else:
            data = calibration_images(model, NUM_CALIBRATION.value)
    report = to_tflite(
        model, OUT.value, QUANTIZATION.value, data,
        float_routing=FLOAT_ROUTING.value,
        float_residual_stream=FLOAT_RESIDUAL_STREAM.value,
        float_layers=FLOAT_LAYERS.value,
    )
    print(
        f"wrote {report['path']}: {report['bytes'] / 1e6:.2f} MB, "
        f"quantization {report['quantization']}, builtin ops only: "
        f"{', '.join(report['ops'])}",
        file=sys.stderr,
    )
    print(json.dumps(report))


if __name__ == "__main__":
    app.run(main)
