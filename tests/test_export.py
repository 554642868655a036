"""TFLite export: builtin ops only, per-image routing kept, parity with Keras.

The model is the small Mobile V-MoE trained on the CIFAR-100 fixture
(scripts/make_tiny_trained.py), so that classes and routes are learned.
Conversion runs on the TensorFlow backend, in a subprocess when the test runs
on JAX or PyTorch.
"""

import pathlib
import re

import keras
import numpy as np
import pytest

import keras_mobile_moe as kmm
from conftest import fixture
from conftest import scaled_images
from conftest import tiny_backbone
from keras_mobile_moe.export import TFLiteClassifier
from keras_mobile_moe.export import agreement
from keras_mobile_moe.export import fixture_images
from keras_mobile_moe.export import keras_decisions
from keras_mobile_moe.export import load_interpreter
from keras_mobile_moe.export import to_tflite
from keras_mobile_moe.export import to_tflite_expert_split

TRAINED = pathlib.Path(__file__).parent / "data" / "tiny_moe_cifar100.keras"
ROUTING = ["patch_embedding", "dense_block_0", "dense_block_1", "router"]

# Checks of a converted file's contents (ops, weight dtypes, quantized
# agreement, file layouts) run in the TensorFlow session, which converts in
# process. The other sessions convert through a subprocess that loads the
# same weights into TensorFlow, so the file is the same; what depends on
# their backend (parity of its predictions with the file, the subprocess
# path) is tested in every session by the unmarked tests.
FILE_CHECK = pytest.mark.only_on(
    "tensorflow",
    why="checks a file TensorFlow converts from the same weights in every "
    "session; each backend's parity with its file is tested in its session",
)


@pytest.fixture(scope="module")
def trained():
    model = keras.saving.load_model(TRAINED)
    images, labels = fixture_images(model)  # all 1000 fixture images
    reference = keras_decisions(model, images)
    return model, images, labels, reference


@pytest.fixture(scope="module")
def exported_float(trained, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tflite_float")
    return to_tflite(trained[0], folder / "none.tflite", quantization="none")


@pytest.fixture(scope="module")
def exported(trained, exported_float, tmp_path_factory):
    """Every quantization variant's report (only_on tensorflow tests)."""
    model, images, _, _ = trained
    folder = tmp_path_factory.mktemp("tflite")
    calibration = images[:100]
    variants = {
        "float16": dict(quantization="float16"),
        "dynamic": dict(quantization="dynamic"),
        # The default: int8 weights, dynamic activations, the blocks before
        # the router with float32 weights; no calibration.
        "int8": dict(quantization="int8"),
        # Static int8 activations; defaults: routing path and residual
        # stream in float32.
        "int8_static": dict(quantization="int8", int8_activations="static"),
        "int8_routing": dict(
            quantization="int8",
            int8_activations="static",
            float_residual_stream=False,
        ),
        "int8_full": dict(
            quantization="int8",
            int8_activations="static",
            float_routing=False,
            float_residual_stream=False,
        ),
    }
    reports = {"none": exported_float}
    for name, options in variants.items():
        if options.get("int8_activations") == "static":
            options["representative_data"] = calibration
        reports[name] = to_tflite(model, folder / f"{name}.tflite", **options)
    return reports


def test_float32_matches_keras_to_1e_4(trained, exported_float):
    _, images, _, reference = trained
    outputs = TFLiteClassifier(exported_float["path"]).predict(images)
    assert np.abs(outputs["logits"] - reference["logits"]).max() <= 1e-4
    # The chosen expert is an int32 output of the file: the router's TopK.
    assert outputs["expert_index"].dtype == np.int32
    assert outputs["expert_index"].shape == (len(images), 1)
    np.testing.assert_array_equal(
        outputs["expert_index"], reference["expert_index"]
    )
    np.testing.assert_array_equal(
        outputs["router_logits"].argmax(-1), reference["expert_index"][:, 0]
    )
    # The Keras reference is the model's own routing decision.
    router_logits = keras.ops.convert_to_numpy(
        trained[0].backbone.predict(images, verbose=0)["router_logits"]
    )
    np.testing.assert_array_equal(
        reference["expert_index"][:, 0], router_logits.argmax(-1)
    )
    assert len(np.unique(reference["expert_index"])) == 4


@FILE_CHECK
@pytest.mark.parametrize(
    "mode",
    [
        "none",
        "float16",
        "dynamic",
        "int8",
        "int8_static",
        "int8_routing",
        "int8_full",
    ],
)
def test_files_use_builtin_ops_and_keep_per_image_routing(exported, mode):
    report = exported[mode]
    assert not [op for op in report["ops"] if op.startswith("Flex")]
    assert "GATHER" in report["ops"] and "TOPK_V2" in report["ops"]
    # Both expert kernels of both MoE blocks are stored stacked and only
    # gathered (check_sparse_routing raised otherwise).
    assert report["stacked_expert_tensors"] >= 4


def _ops(path):
    """(op name, input dtypes, output names) of a file's ops, in order."""
    interpreter = load_interpreter(path, xnnpack=False)
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    ops = interpreter._get_ops_details()
    return [
        (
            op["op_name"],
            [tensors[i]["dtype"] for i in op["inputs"] if i >= 0],
            [tensors[i]["name"] for i in op["outputs"]],
        )
        for op in ops
    ]


def _weight_dtypes(path, pattern):
    """The dtypes of the constant (weight) inputs of the ops whose output
    name matches `pattern`."""
    interpreter = load_interpreter(path, xnnpack=False)
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    ops = interpreter._get_ops_details()
    produced = {i for op in ops for i in op["outputs"]}
    inputs = {t["index"] for t in interpreter.get_input_details()}
    return {
        tensors[i]["dtype"]
        for op in ops
        if op["op_name"] == "FULLY_CONNECTED"
        and any(re.search(pattern, tensors[o]["name"]) for o in op["outputs"])
        for i in op["inputs"][1:2]
        if i >= 0 and i not in produced and i not in inputs
    }


@FILE_CHECK
def test_int8_default_keeps_the_routing_blocks_weights_float(exported):
    report = exported["int8"]
    assert report["int8_activations"] == "dynamic"
    assert report["float_layers"] == [
        "dense_block_0",
        "dense_block_1",
        "router",
    ]
    assert report["float_residual_stream"] is None
    path = report["path"]
    # The blocks before the router: float32 weights (float ops); the patch
    # embedding and the MoE blocks' attention: int8 weights.
    assert _weight_dtypes(path, r"/dense_block_\d_1/") == {np.float32}
    for pattern in (r"/patch_embedding_1/", r"/moe_block_\d_1/attention/"):
        assert _weight_dtypes(path, pattern) == {np.int8}, pattern
    # The stacked expert kernels are int8, gathered, then dequantized.
    ops = _ops(path)
    gathers = [op for op in ops if op[0] == "GATHER" and op[1][0] == np.int8]
    assert len(gathers) == 4
    assert "DEQUANTIZE" in {op[0] for op in ops}
    assert kmm.export.read_metadata(path)["int8_activations"] == "dynamic"


@FILE_CHECK
def test_int8_routing_path_is_float_up_to_the_topk(exported):
    # Static int8: the router's dense layer, softmax and TopK: float inputs
    # (the converter names the dense layer's output after the model output
    # `router_logits`, so a deny list by layer name alone missed it).
    ops = _ops(exported["int8_static"]["path"])
    topk = [op for op in ops if op[0] == "TOPK_V2"]
    assert len(topk) == 1 and topk[0][1][0] == np.float32
    softmax_index = max(
        i
        for i, op in enumerate(ops)
        if op[0] == "SOFTMAX" and any("router" in n for n in op[2])
    )
    router_dense = ops[softmax_index - 1]
    assert router_dense[0] == "FULLY_CONNECTED"
    assert router_dense[1][0] == np.float32
    # All int8: the TopK ranks int8 probabilities.
    full = _ops(exported["int8_full"]["path"])
    assert [op[1][0] for op in full if op[0] == "TOPK_V2"] == [np.int8]

    # The residual stream of the MoE blocks (their additions and the
    # LayerNorms' first op) is float32 by default, int8 with
    # float_residual_stream=False; the expert matmuls are int8 in both.
    def input_dtypes(path, op_name, pattern):
        return {
            op[1][0]
            for op in _ops(path)
            if op[0] == op_name and any(re.search(pattern, n) for n in op[2])
        }

    residual = r"/moe_block_\d_1/add(_1)?$"
    norm_mean = r"/moe_block_\d_1/(attention|mlp)_norm_1/moments/mean$"
    experts = r"/moe_block_\d_1/moe_1/MatMul"
    for pattern, op_name in ((residual, "ADD"), (norm_mean, "MEAN")):
        assert input_dtypes(
            exported["int8_static"]["path"], op_name, pattern
        ) == {np.float32}
        assert input_dtypes(
            exported["int8_routing"]["path"], op_name, pattern
        ) == {np.int8}
    for mode in ("int8_static", "int8_routing", "int8_full"):
        assert input_dtypes(
            exported[mode]["path"], "BATCH_MATMUL", experts
        ) == {np.int8}


@FILE_CHECK
def test_quantized_files_are_smaller_and_agree_with_keras(trained, exported):
    model, images, labels, _ = trained
    size = {mode: exported[mode]["bytes"] for mode in exported}
    assert size["float16"] < 0.6 * size["none"]
    assert size["dynamic"] < 0.4 * size["none"]
    assert size["int8_full"] < 0.4 * size["none"]
    # The float routing path (patch embedding, 2 dense blocks, router).
    for mode in ("int8", "int8_static", "int8_routing"):
        assert size[mode] < 0.6 * size["none"]
    assert exported["int8_static"]["float_layers"] == ROUTING + [
        "attention_norm",
        "mlp_norm",
        "final_norm",
        "predictions",
    ]
    assert exported["int8_static"]["float_residual_stream"] is True
    assert exported["int8_routing"]["float_layers"] == ROUTING
    assert exported["int8_routing"]["float_residual_stream"] is False
    assert exported["int8_full"]["float_layers"] == []
    result = {
        mode: agreement(model, exported[mode]["path"], images, labels)
        for mode in exported
    }
    print(
        "top-1 / routing agreement:",
        {mode: (r["top1"], r["routing"]) for mode, r in result.items()},
    )
    assert result["none"]["top1"] == result["none"]["routing"] == 1.0
    assert result["float16"]["top1"] >= 0.99
    assert result["float16"]["routing"] >= 0.99
    assert result["dynamic"]["top1"] >= 0.97
    assert result["dynamic"]["routing"] >= 0.98
    # Issue 14's goal for the int8 default: >= 98% top-1 and >= 99.5%
    # routing agreement (measured on this model, 1000 fixture images: 99.2%
    # / 99.9%; "dynamic", all weights int8: 98.2% / 99.1%).
    assert result["int8"]["top1"] >= 0.98
    # Static int8 (issue 6's goal, >= 97% / 99%; 1000 fixture images,
    # calibrated on the first 100): defaults 97.8% / 100%, routing path
    # only float 95.8% / 100%, all int8 91.6% / 96.0%.
    assert result["int8_static"]["top1"] >= 0.97
    for mode in ("int8", "int8_static", "int8_routing"):
        assert result[mode]["routing"] >= 0.995
    assert result["int8_routing"]["top1"] >= 0.93
    assert result["int8_full"]["top1"] >= 0.88
    assert result["int8_full"]["routing"] >= 0.93
    # Quantization costs agreement, not accuracy: within 2 points.
    for mode in exported:
        assert (
            abs(
                result[mode]["tflite_accuracy"] - result[mode]["keras_accuracy"]
            )
            <= 0.02
        )


@FILE_CHECK
def test_agreement_detects_a_different_model_and_old_files(
    trained, exported, tmp_path
):
    model, images, _, _ = trained
    subset = images[::10]
    # A file exported from another model (same shapes, other weights).
    other = kmm.MobileVMoE.from_config(model.get_config())
    other_path = to_tflite(other, tmp_path / "other.tflite")["path"]
    result = agreement(model, other_path, subset)
    assert result["top1"] < 0.5 and result["routing"] < 0.9
    assert len(result["top1_disagreements"]) == round(
        (1 - result["top1"]) * len(subset)
    )
    # A file without the expert_index output (a dense model's) cannot be
    # measured for routing: an error, not a silent fallback to the logits.
    dense_config = {**model.backbone.get_config(), "num_moe_layers": 0}
    dense = kmm.MobileVMoE(
        kmm.MobileVMoEBackbone.from_config(dense_config), num_classes=100
    )
    dense_path = to_tflite(dense, tmp_path / "dense.tflite")["path"]
    with pytest.raises(ValueError, match="no 'expert_index'"):
        agreement(model, dense_path, subset)
    with pytest.raises(ValueError, match=r"images with shape \(4, 16, 16, 3\)"):
        agreement(model, exported["none"]["path"], np.zeros((4, 16, 16, 3)))
    with pytest.raises(ValueError, match="labels with 3 entries"):
        agreement(model, exported["none"]["path"], subset, labels=[1, 2, 3])
    with pytest.raises(ValueError, match="split='val'"):
        fixture_images(model, "val")


def test_dense_model_exports_too(tmp_path):
    model = kmm.MobileVMoE(tiny_backbone(num_moe_layers=0), num_classes=10)
    report = to_tflite(model, tmp_path / "dense.tflite")
    assert report["stacked_expert_tensors"] == 0
    image = np.random.default_rng(0).uniform(-1, 1, (1, 32, 32, 3))
    outputs = TFLiteClassifier(report["path"])(image.astype("float32"))
    want = keras.ops.convert_to_numpy(model(image.astype("float32")))
    assert np.abs(outputs["logits"] - want).max() <= 1e-4


def test_token_routed_model_exports_with_parity(tmp_path):
    # Per-token routing (V-MoE): every expert runs on its capacity slots, so
    # the per-image check does not apply; the file must still match Keras.
    model = kmm.MobileVMoE(
        tiny_backbone(router_type="token"), num_classes=10, routing="learned"
    )
    report = to_tflite(model, tmp_path / "token.tflite")
    assert report["stacked_expert_tensors"] == 0
    assert "TOPK_V2" in report["ops"]
    image = np.random.default_rng(0).uniform(-1, 1, (1, 32, 32, 3))
    outputs = TFLiteClassifier(report["path"])(image.astype("float32"))
    want = keras.ops.convert_to_numpy(model(image.astype("float32")))
    assert np.abs(outputs["logits"] - want).max() <= 1e-4
    with pytest.raises(ValueError, match="router_type='token'"):
        to_tflite_expert_split(model, tmp_path / "split")


def test_bad_arguments_raise(trained, tmp_path):
    model = trained[0]
    with pytest.raises(ValueError, match="quantization='int4'"):
        to_tflite(model, tmp_path / "x.tflite", quantization="int4")
    with pytest.raises(ValueError, match="needs representative_data"):
        to_tflite(
            model,
            tmp_path / "x.tflite",
            quantization="int8",
            int8_activations="static",
        )
    with pytest.raises(ValueError, match="int8_activations='float'"):
        to_tflite(
            model,
            tmp_path / "x.tflite",
            quantization="int8",
            int8_activations="float",
        )
    with pytest.raises(ValueError, match=r"representative_data has shape"):
        to_tflite(
            model,
            tmp_path / "x.tflite",
            quantization="int8",
            representative_data=np.zeros((4, 16, 16, 3), "float32"),
        )
    with pytest.raises(ValueError, match="exports classifier tasks"):
        to_tflite(model.backbone, tmp_path / "x.tflite")
    calibration = trained[1][:4]
    with pytest.raises(ValueError, match="float_layers='final_norm'"):
        to_tflite(
            model,
            tmp_path / "x.tflite",
            quantization="int8",
            representative_data=calibration,
            float_layers="final_norm",
        )
    with pytest.raises(ValueError, match="quantization='float16'"):
        to_tflite(
            model,
            tmp_path / "x.tflite",
            quantization="float16",
            float_layers=["final_norm"],
        )
    with pytest.raises(ValueError, match="float_residual_stream='yes'"):
        to_tflite(
            model,
            tmp_path / "x.tflite",
            quantization="int8",
            representative_data=calibration,
            float_residual_stream="yes",
        )
    with pytest.raises(
        (ValueError, RuntimeError), match=r"\['no_such_layer'\]"
    ):
        to_tflite(
            model,
            tmp_path / "x.tflite",
            quantization="int8",
            representative_data=calibration,
            float_layers=["final_norm", "no_such_layer"],
        )


@FILE_CHECK
def test_expert_split_matches_single_file_with_dense_sized_memory(
    trained, exported, tmp_path
):
    from keras_mobile_moe.export import ExpertSplitRunner

    model, images, _, reference = trained
    routes = reference["expert_index"][:, 0]
    manifest = to_tflite_expert_split(model, tmp_path / "split")
    assert len(manifest["experts"]) == model.backbone.num_experts
    runner = ExpertSplitRunner(tmp_path / "split")
    single = TFLiteClassifier(exported["none"]["path"])
    subset = images[::10]
    for image, want_route in zip(subset, routes[::10]):
        got = runner(image)
        want = single(image)
        assert got["expert"] == want_route
        assert np.abs(got["logits"] - want["logits"]).max() <= 1e-4
    # Resident weights: the trunk and one expert path, vs the dense twin.
    dense_config = {**model.backbone.get_config(), "num_moe_layers": 0}
    dense = kmm.MobileVMoE(
        kmm.MobileVMoEBackbone.from_config(dense_config), num_classes=100
    )
    dense_bytes = to_tflite(dense, tmp_path / "dense.tflite")["bytes"]
    resident = manifest["trunk"]["bytes"] + max(
        e["bytes"] for e in manifest["experts"]
    )
    print(
        f"resident {resident} B, dense {dense_bytes} B, "
        f"single file {exported['none']['bytes']} B"
    )
    assert resident <= 1.1 * dense_bytes
    assert exported["none"]["bytes"] > 1.5 * resident


@pytest.fixture(scope="module")
def preset_model():
    # A shipped trained preset with a preprocessor: 224x224 input, resized
    # from raw 32x32 CIFAR-100 images.
    return kmm.MobileVMoE.from_preset("6x64_e10_cifar100")


def test_file_takes_raw_uint8_and_matches_predict(preset_model, tmp_path):
    model = preset_model
    report = to_tflite(model, tmp_path / "raw.tflite", input_size=(32, 32))
    assert report["preprocessing"] is True
    assert report["inputs"] == [
        {"name": "images", "dtype": "uint8", "shape": [1, 32, 32, 3]}
    ]
    assert {(o["name"], o["dtype"]) for o in report["outputs"]} == {
        ("logits", "float32"),
        ("router_logits", "float32"),
        ("expert_index", "int32"),
    }
    # Resize and scaling inside, with builtin ops.
    assert {"CAST", "RESIZE_BILINEAR"} <= set(report["ops"])
    assert not [op for op in report["ops"] if op.startswith("Flex")]
    metadata = kmm.export.read_metadata(report["path"])
    assert metadata["inputs"] == report["inputs"]
    assert metadata["preprocessing"] is True
    assert "uint8" in metadata["input_format"]
    raw, labels = fixture_images(model, raw=True)  # 1000 uint8 32x32
    want = model.predict(raw, verbose=0)
    want = keras.ops.convert_to_numpy(
        want["logits"] if isinstance(want, dict) else want
    )
    runner = TFLiteClassifier(report["path"])
    assert runner.input_dtype == np.uint8
    got = runner.predict(raw)
    assert np.abs(got["logits"] - want).max() <= 1e-4
    result = agreement(model, report["path"], raw, labels)
    assert result["top1"] == result["routing"] == 1.0
    with pytest.raises(ValueError, match=r"pixels in \[-1, 1\]"):
        runner(np.ones((32, 32, 3), "float32") * np.array([-1, 0, 1]))
    # preprocessing=False keeps the float32 input in the model's format.
    plain = to_tflite(model, tmp_path / "plain.tflite", preprocessing=False)
    assert plain["preprocessing"] is False
    assert plain["inputs"][0]["dtype"] == "float32"
    assert plain["inputs"][0]["shape"] == [1, 224, 224, 3]
    assert "RESIZE_BILINEAR" not in plain["ops"]
    images, _ = fixture_images(model, "test")
    outputs = TFLiteClassifier(plain["path"]).predict(images)
    assert np.abs(outputs["logits"] - want[800:]).max() <= 1e-4


def test_bicubic_preprocessing_resizes_with_builtin_matmuls(tmp_path):
    # timm's ViTs resize bicubically; TFLite has no builtin bicubic resize,
    # so the file applies it as two constant matrices (exact for a fixed
    # input size).
    converter = kmm.models.MobileVMoEImageConverter(
        image_size=(48, 48),
        interpolation="bicubic",
        scale=1 / 127.5,
        offset=-1.0,
    )
    model = kmm.MobileVMoE(
        tiny_backbone(image_shape=(48, 48, 3)),
        num_classes=10,
        preprocessor=kmm.models.MobileVMoEImageClassifierPreprocessor(
            converter
        ),
    )
    report = to_tflite(model, tmp_path / "bicubic.tflite", input_size=32)
    assert not [op for op in report["ops"] if op.startswith("Flex")]
    assert "RESIZE_BILINEAR" not in report["ops"]
    raw = fixture()["x_test"][:16]
    want = keras.ops.convert_to_numpy(model.predict(raw, verbose=0))
    got = TFLiteClassifier(report["path"]).predict(raw)["logits"]
    assert np.abs(got - want).max() <= 1e-4
    # A crop to another aspect ratio is refused, naming the argument.
    with pytest.raises(ValueError, match=r"input_size=\(32, 40\)"):
        to_tflite(model, tmp_path / "crop.tflite", input_size=(32, 40))


def test_preprocessing_arguments_are_checked(preset_model, tmp_path):
    model = preset_model
    path = tmp_path / "x.tflite"
    with pytest.raises(ValueError, match=r"input_size=\(0, 32\)"):
        to_tflite(model, path, input_size=(0, 32))
    with pytest.raises(ValueError, match="needs preprocessing=True"):
        to_tflite(model, path, preprocessing=False, input_size=32)
    with pytest.raises(ValueError, match="preprocessing='yes'"):
        to_tflite(model, path, preprocessing="yes")
    raw, _ = fixture_images(model, "train", raw=True)
    with pytest.raises(
        ValueError,
        match=r"shape \(4, 32, 32, 3\); expected "
        r"raw images \[n, 16, 16, 3\]",
    ):
        to_tflite(model, path, "int8", raw[:4], input_size=(16, 16))
    with pytest.raises(ValueError, match=r"values in \[-1, 1\].*raw pixels"):
        to_tflite(model, path, "int8", raw[:4] / 127.5 - 1, input_size=32)
    assert not path.exists()


# The CLI runs on the TensorFlow backend whatever this session's.
@pytest.mark.backend_independent
def test_cli_help_example_exports_a_trained_preset(tmp_path):
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "m.tflite"
    # The command of the CLI's --help, as written (int8, raw 32x32 input).
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "keras_mobile_moe.export",
            "--preset",
            "6x64_e10_cifar100",
            "--quantization",
            "int8",
            "--out",
            str(out),
        ],
        env={**os.environ, "KERAS_BACKEND": "tensorflow"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["inputs"][0]["dtype"] == "uint8"
    assert report["inputs"][0]["shape"] == [1, 32, 32, 3]
    assert report["agreement"]["num_images"] == 1000
    summary = result.stderr.strip().splitlines()[-1]
    assert summary.startswith(f"wrote {out}") and "top-1 agreement" in summary
    # TensorFlow's and LiteRT's native log lines, those TensorFlow prints
    # while it is imported included, are filtered out: the summary is all.
    for prefix in (
        "fully_quantize",
        "W0000",
        "INFO: Created TensorFlow",
        "oneDNN",
        "cuda",
        "cpu_feature_guard",
        "absl::",
    ):
        assert prefix not in result.stderr
    assert result.stderr.strip().splitlines() == [summary]
    # Issue 14's goals on the fixture (measured: 99.2% top-1, 99.9% routing,
    # accuracy 27.0% vs Keras 27.1%).
    assert report["agreement"]["top1"] >= 0.98
    assert report["agreement"]["routing"] >= 0.995
    assert (
        abs(
            report["agreement"]["tflite_accuracy"]
            - report["agreement"]["keras_accuracy"]
        )
        <= 0.005
    )


# A plain Python subprocess: nothing of the session's backend.
@pytest.mark.backend_independent
def test_native_log_filter_passes_other_lines_even_on_a_crash():
    import subprocess
    import sys

    # The filter drops native log lines and passes the rest, also the lines
    # written just before the process dies without cleaning up.
    # The module alone (the package would import TensorFlow first).
    path = pathlib.Path(kmm.__file__).parent / "native_logs.py"
    code = (
        "import os, importlib.util as u; "
        f"s = u.spec_from_file_location('native_logs', {str(path)!r}); "
        "m = u.module_from_spec(s); s.loader.exec_module(m); "
        "m.hide_native_logs(); "
        "os.write(2, b'I0000 00:00 port.cc:153] oneDNN custom operations\\n'); "
        "os.write(2, b'E0000 00:00 cuda_platform.cc:52] failed call to "
        "cuInit\\n'); "
        "os.write(2, b'E0000 00:00 real.cc:1] a real error\\n'); "
        "os.write(2, b'Traceback: the last line\\n'); os._exit(3)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 3
    assert result.stderr.splitlines() == [
        "E0000 00:00 real.cc:1] a real error",
        "Traceback: the last line",
    ]


# The CLI runs on the TensorFlow backend whatever this session's.
@pytest.mark.backend_independent
def test_cli_exports_a_preset_with_builtin_ops_only(tmp_path):
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "cli.tflite"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "keras_mobile_moe.export",
            "--preset",
            "6x64_e10",
            "--random_weights",
            "--quantization",
            "int8",
            "--num_calibration",
            "8",
            "--out",
            str(out),
        ],
        env={**os.environ, "KERAS_BACKEND": "tensorflow"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert out.exists() and report["bytes"] == out.stat().st_size
    assert report["stacked_expert_tensors"] == 4
    assert not [op for op in report["ops"] if op.startswith("Flex")]


@pytest.mark.parametrize(
    "budget",
    [
        pytest.param(1.0, marks=FILE_CHECK),
        0.5,  # every session: this backend's MoNE against its file
        pytest.param(0.25, marks=FILE_CHECK),
    ],
)
def test_mone_exports_at_fixed_budgets_with_parity(budget, tmp_path):
    backbone = kmm.MoNEBackbone(
        image_shape=(32, 32, 3),
        patch_size=8,
        num_layers=2,
        hidden_dim=32,
        num_heads=2,
        mlp_dim=64,
        num_nested_experts=4,
        capacity_budget=0.5,
    )
    model = kmm.MoNE(backbone, num_classes=10)
    model.backbone.capacity_budget = budget  # a built model, changed for export
    report = to_tflite(model, tmp_path / f"mone_{budget}.tflite")
    assert not [op for op in report["ops"] if op.startswith("Flex")]
    runner = TFLiteClassifier(report["path"])
    images = scaled_images(fixture()["x_test"][:20])
    want = keras.ops.convert_to_numpy(model.predict(images, verbose=0))
    got = runner.predict(images)["logits"]
    assert np.abs(got - want).max() <= 1e-4


@FILE_CHECK
def test_mone_preset_file_takes_raw_images_at_a_fixed_budget(tmp_path):
    # A MoNE preset's architecture (random weights) with its preprocessor:
    # one file per budget, raw uint8 32x32 input, parity with predict.
    model = kmm.MoNE.from_preset("6x64_mone", load_weights=False)
    model.backbone.capacity_budget = 0.5
    report = to_tflite(model, tmp_path / "mone.tflite", input_size=32)
    assert report["inputs"][0]["dtype"] == "uint8"
    assert {"CAST", "RESIZE_BILINEAR"} <= set(report["ops"])
    assert not [op for op in report["ops"] if op.startswith("Flex")]
    raw = fixture()["x_test"][:40]
    want = keras.ops.convert_to_numpy(model.predict(raw, verbose=0))
    got = TFLiteClassifier(report["path"]).predict(raw)["logits"]
    assert np.abs(got - want).max() <= 1e-4
