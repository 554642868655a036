"""Every bad input of issue 16 gets a clear error (or works), on every backend.

One table row per case a new or careless user runs into: labels, image
values, shapes, input types, model size, export calibration data and CLI
messages. Each row is checked before Keras is entered, so the model keeps
working after the error (on JAX, Keras 3.15.1 breaks a model after one
failed `predict`).
"""

import os
import warnings

import keras
import numpy as np
import pytest

import keras_mobile_moe as kmm
from keras_mobile_moe.export import tflite
from keras_mobile_moe.models.mobile_vmoe.mobile_vmoe_image_classifier_preprocessor import (  # noqa: E501
    MobileVMoEImageClassifierPreprocessor,
)
from keras_mobile_moe.models.mobile_vmoe.mobile_vmoe_image_converter import (
    MobileVMoEImageConverter,
)
from keras_mobile_moe.models.task_utils import _NonFiniteLoss

NUM_CLASSES = 4
SMALL = dict(
    image_shape=(32, 32, 3),
    patch_size=8,
    num_layers=2,
    hidden_dim=16,
    num_heads=2,
    mlp_dim=32,
    num_experts=4,
)


def classifier(num_moe_layers=1, value_range=(0, 255), **kwargs):
    converter = MobileVMoEImageConverter(
        image_size=(32, 32),
        scale=1 / 127.5,
        offset=-1.0,
        value_range=value_range,
    )
    backbone = kmm.MobileVMoEBackbone(**SMALL, num_moe_layers=num_moe_layers)
    if num_moe_layers:
        kwargs.setdefault("superclass_ids", [0, 1, 2, 3])
    return kmm.MobileVMoE(
        backbone,
        num_classes=NUM_CLASSES,
        preprocessor=MobileVMoEImageClassifierPreprocessor(converter),
        **kwargs,
    )


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    return classifier()


RNG = np.random.default_rng(0)
PIXELS = RNG.integers(0, 256, (8, 32, 32, 3)).astype("uint8")
LABELS = np.arange(8) % NUM_CLASSES


def with_nan(images):
    images = images.astype("float32")
    images[3, 5, 7, 1] = np.nan
    return images


# name, images, labels, message the error must match
BAD_FIT_ROWS = [
    (
        "label == num_classes",
        PIXELS,
        LABELS + 100,
        r"y of shape \(8,\).*values in \[100, 103\].*\[0, 4\)",
    ),
    ("label -1", PIXELS, LABELS - 1, r"values in \[-1, 2\].*\[0, 4\)"),
    ("float labels", PIXELS, LABELS + 0.5, r"non-integer values.*truncated"),
    ("bool labels", PIXELS, LABELS > 1, r"dtype bool.*integer class ids"),
    (
        "one-hot labels with the sparse loss",
        PIXELS,
        np.eye(4)[LABELS],
        r"loss is sparse.*argmax.*CategoricalCrossentropy",
    ),
    ("labels of another length", PIXELS, LABELS[:5], r"for 8 images"),
    (
        "images in [0, 1]",
        PIXELS / 255.0,
        LABELS,
        r"images of shape \(8, 32, 32, 3\).*scaled to \[0, 1\].*value_range",
    ),
    (
        "images in [-1, 1]",
        PIXELS / 127.5 - 1,
        LABELS,
        r"scaled to \[-1, 1\].*value_range = \(-1, 1\)",
    ),
    ("bool images", PIXELS > 127, LABELS, r"dtype bool.*not accepted"),
    ("NaN pixel", with_nan(PIXELS), LABELS, r"1 NaN or inf values"),
    (
        "inf pixel",
        np.where(PIXELS > 254, np.inf, PIXELS).astype("float32"),
        LABELS,
        r"NaN or inf",
    ),
    (
        "pixels above 255",
        PIXELS.astype("float32") * 2,
        LABELS,
        r"outside the converter's value_range \(0, 255\)",
    ),
    (
        "single image",
        PIXELS[0],
        LABELS[:1],
        r"images of shape \(32, 32, 3\).*single image.*images\[None\]",
    ),
    (
        "grayscale batch",
        PIXELS[..., :1],
        LABELS,
        r"shape \(8, 32, 32, 1\).*3 channels.*np.repeat",
    ),
    ("empty batch", PIXELS[:0], LABELS[:0], r"shape \(0, 32, 32, 3\).*empty"),
    ("string images", PIXELS.astype(str), LABELS, r"numeric images"),
]


@pytest.mark.parametrize(
    "images,labels,message",
    [r[1:] for r in BAD_FIT_ROWS],
    ids=[r[0] for r in BAD_FIT_ROWS],
)
def test_fit_rejects_bad_rows_before_keras(model, images, labels, message):
    with pytest.raises(ValueError, match=message):
        model.fit(images, labels, epochs=1, verbose=0)


@pytest.mark.parametrize(
    "images,message",
    [r[1:4:2] for r in BAD_FIT_ROWS if "label" not in r[0]],
    ids=[r[0] for r in BAD_FIT_ROWS if "label" not in r[0]],
)
def test_predict_rejects_bad_images_and_the_model_keeps_working(
    model, images, message
):
    before = model.predict(PIXELS, verbose=0)
    with pytest.raises(ValueError, match=message):
        model.predict(images, verbose=0)
    # On JAX a failed predict inside Keras 3.15.1 breaks every later call.
    np.testing.assert_allclose(
        model.predict(PIXELS, verbose=0), before, atol=1e-6
    )


def test_evaluate_checks_labels(model):
    with pytest.raises(ValueError, match=r"values in \[100, 103\]"):
        model.evaluate(PIXELS, LABELS + 100, verbose=0)


def test_value_range_contract():
    model = classifier(value_range=(0, 1))
    unit = model.predict(PIXELS / 255.0, verbose=0)
    model.preprocessor.image_converter.value_range = (0, 255)
    np.testing.assert_allclose(
        unit, model.predict(PIXELS, verbose=0), atol=1e-4
    )
    model.preprocessor.image_converter.value_range = (-1, 1)
    np.testing.assert_allclose(
        unit, model.predict(PIXELS / 127.5 - 1, verbose=0), atol=1e-4
    )
    with pytest.raises(
        ValueError,
        match=r"outside the converter's "
        r"value_range \(-1, 1\)",
    ):
        model.predict(PIXELS.astype("float32"), verbose=0)
    config = model.preprocessor.image_converter.get_config()
    assert config["value_range"] == [-1, 1]
    assert config["scale"] == pytest.approx(1 / 127.5)  # as given
    restored = MobileVMoEImageConverter.from_config(config)
    assert restored.value_range == (-1, 1)
    with pytest.raises(ValueError, match=r"value_range=\(1, 0\)"):
        MobileVMoEImageConverter(image_size=(32, 32), value_range=(1, 0))


def test_one_hot_and_soft_targets_with_a_categorical_loss():
    model = classifier(num_moe_layers=0)
    model.compile(
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.CategoricalAccuracy()],
    )
    model.fit(PIXELS, np.eye(4)[LABELS], epochs=1, verbose=0)
    soft = np.full((8, 4), 0.25)
    model.fit(PIXELS, soft, epochs=1, verbose=0)
    with pytest.raises(
        ValueError, match=r"one-hot or soft targets \[batch, 4\]"
    ):
        model.fit(PIXELS, np.eye(5)[LABELS], epochs=1, verbose=0)
    with pytest.raises(ValueError, match="rows sum to 1"):
        model.fit(PIXELS, soft * 2, epochs=1, verbose=0)


# --- every input kind Keras accepts --------------------------------------


class Batches(keras.utils.PyDataset):
    def __init__(self, images, labels=None, **kwargs):
        super().__init__(**kwargs)
        self.images, self.labels = images, labels

    def __len__(self):
        return 2

    def __getitem__(self, i):
        part = slice(4 * i, 4 * i + 4)
        if self.labels is None:
            return self.images[part]
        return self.images[part], self.labels[part]


def generator(images, labels=None):
    for i in range(2):
        part = slice(4 * i, 4 * i + 4)
        yield images[part] if labels is None else (images[part], labels[part])


def tf_dataset(images, labels=None):
    import tensorflow as tf

    data = images if labels is None else (images, labels)
    return tf.data.Dataset.from_tensor_slices(data).batch(4)


SOURCES = {"PyDataset": Batches, "generator": generator, "tf.data": tf_dataset}


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_every_input_kind_fits_evaluates_and_predicts(model, kind):
    make = SOURCES[kind]
    expected = model.predict(PIXELS, verbose=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(make(PIXELS, LABELS), epochs=1, verbose=0)
        model.evaluate(make(PIXELS, LABELS), verbose=0)
        model.predict(make(PIXELS), verbose=0)
    assert np.isfinite(history.history["loss"][0])
    ours = [
        str(w.message)
        for w in caught
        if "shuffle" in str(w.message) or "ran out of data" in str(w.message)
    ]
    assert not ours, ours
    # Trained one step: predictions changed, and the shape is right.
    predicted = model.predict(make(PIXELS), verbose=0)
    assert predicted.shape == expected.shape


@pytest.mark.parametrize("family", ["dense", "moe", "mone"])
def test_every_layer_is_built_so_fit_never_rebuilds(family):
    # An unbuilt sublayer (one that `call` skips outside training) makes
    # Keras re-build the model at each `fit`, which consumes a batch of a
    # one-pass generator: the epoch then ran no step.
    if family == "mone":
        model = kmm.MoNE.from_preset("6x64_mone", load_weights=False)
    else:
        model = classifier(num_moe_layers=0 if family == "dense" else 1)
    # The preprocessor builds on its first call, outside the model graph.
    model.predict(
        np.zeros((1,) + tuple(model.backbone.image_shape), "float32"), verbose=0
    )
    unbuilt = [
        f"{layer.name} ({type(layer).__name__})"
        for layer in model._flatten_layers()
        if not layer.built
    ]
    assert not unbuilt, unbuilt


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_a_bad_batch_inside_a_pipeline_raises_its_own_error(model, kind):
    make = SOURCES[kind]
    with pytest.raises(ValueError, match=r"values in \[100, 103\]"):
        model.fit(make(PIXELS, LABELS + 100), epochs=1, verbose=0)
    with pytest.raises(ValueError, match="scaled to"):
        model.predict(make(PIXELS / 255.0), verbose=0)
    assert model.predict(PIXELS, verbose=0).shape == (8, NUM_CLASSES)


def test_an_empty_generator_is_a_clear_error(model):
    with pytest.raises(ValueError, match="empty dataset or generator"):
        model.fit(iter(()), verbose=0)


def test_arrays_without_labels_in_fit(model):
    with pytest.raises(ValueError, match=r"y=None with array images"):
        model.fit(PIXELS, epochs=1, verbose=0)


# --- training that diverges stops before a checkpoint ------------------------


def test_non_finite_loss_stops_training_before_the_checkpoint(tmp_path):
    model = classifier(num_moe_layers=0)

    def nan_loss(y_true, y_pred):
        return keras.ops.mean(y_pred) * np.nan

    model.compile(loss=nan_loss)
    checkpoint = tmp_path / "last.weights.h5"
    with pytest.raises(FloatingPointError, match="loss is nan.*batch 1"):
        model.fit(
            PIXELS,
            LABELS,
            epochs=1,
            batch_size=4,
            verbose=0,
            callbacks=[
                keras.callbacks.ModelCheckpoint(
                    str(checkpoint), save_weights_only=True, save_freq=1
                )
            ],
        )
    assert not checkpoint.exists()
    with pytest.raises(FloatingPointError, match="loss is inf"):
        _NonFiniteLoss().on_train_batch_end(0, {"loss": np.inf})


# --- model size --------------------------------------------------------------


@pytest.mark.parametrize("cls", ["MobileVMoEBackbone", "MoNEBackbone"])
def test_absurd_config_is_refused_before_allocating(cls):
    backbone_cls = getattr(kmm.models, cls)
    with pytest.raises(
        ValueError,
        match=r"hidden_dim=1000000.*GiB.*more "
        "than this machine's",
    ):
        backbone_cls(
            image_shape=(32, 32, 3),
            patch_size=8,
            num_layers=12,
            hidden_dim=1000000,
            num_heads=2,
            mlp_dim=64,
        )
    parameters, _ = kmm.validation.check_model_memory(
        cls, (32, 32, 3), 8, 2, 16, [32, 32], 2, [1, 4], available=2**40
    )
    assert parameters > 0


# --- export inputs and CLI messages -------------------------------------------


def test_calibration_data_is_checked(model, tmp_path):
    path = tmp_path / "model.tflite"
    inputs = PIXELS / 127.5 - 1
    # preprocessing=False: the file takes the model's input format, so
    # calibration images must be preprocessed.
    with pytest.raises(
        ValueError,
        match=r"values in \[0, 255\].*"
        r"\[-1, 1\].*image_converter",
    ):
        tflite.to_tflite(
            model, path, "int8", PIXELS.astype("float32"), preprocessing=False
        )
    bad = inputs.copy()
    bad[0, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="1 NaN or inf values"):
        tflite.to_tflite(model, path, "int8", bad, preprocessing=False)
    with pytest.raises(ValueError, match=r"shape \(0, 32, 32, 3\)"):
        tflite.to_tflite(model, path, "int8", inputs[:0], preprocessing=False)
    # The default file preprocesses itself: it calibrates on raw pixels.
    with pytest.raises(ValueError, match=r"values in \[-1, 1\].*raw pixels"):
        tflite.to_tflite(model, path, "int8", inputs)
    assert not path.exists()
    assert tflite.model_input_range(model) == pytest.approx((-1.0, 1.0))


def test_conversion_errors_come_first():
    stderr = "\n".join(
        ["I0000 00:00 port.cc:153] oneDNN custom operations are on."] * 200
        + [
            "Traceback (most recent call last):",
            '  File "x.py", line 1, in <module>',
            "    convert()",
            "ValueError: float_layers ['nope'] match no op of the graph.",
            "W0000 00:00 some trailing log line",
        ]
    )
    message = tflite.subprocess_error(stderr, 1)
    assert message.startswith("ValueError: float_layers ['nope'] match no op")
    assert "oneDNN" not in message
    assert "exit status 1" in tflite.subprocess_error("I0000 only logs", 1)


def test_cli_messages_name_cli_flags():
    with pytest.raises(ValueError) as caught:
        kmm.MobileVMoE.from_preset("12x384_e10")
    assert "load_weights=False" in str(caught.value)
    message = tflite.cli_message(caught.value)
    assert "--random_weights" in message
    assert "load_weights" not in message
    assert "--representative_file" in tflite.cli_message(
        ValueError("Received: representative_data of shape (0,)")
    )


def test_the_cli_prints_the_flag_in_its_error(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "keras_mobile_moe.export",
            "--preset",
            "12x384_e10",
            "--out",
            str(tmp_path / "x.tflite"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "KMM_EXPORT_SUBPROCESS": ""},
    )
    assert result.returncode == 1
    assert "--random_weights" in result.stderr
    assert "load_weights=False" not in result.stderr


def test_on_batch_calls_are_checked_too(model):
    with pytest.raises(ValueError, match=r"values in \[100, 103\]"):
        model.train_on_batch(PIXELS, LABELS + 100)
    with pytest.raises(ValueError, match="scaled to"):
        model.test_on_batch(PIXELS / 255.0, LABELS)
    with pytest.raises(ValueError, match="single image"):
        model.predict_on_batch(PIXELS[0])
    assert model.predict_on_batch(PIXELS).shape == (8, NUM_CLASSES)
