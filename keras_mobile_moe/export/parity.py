"""Agreement of an exported `.tflite` classifier with its Keras model.

Quantization is judged by how often the file makes the same decisions as the
Keras model: the same top-1 class and, for Mobile V-MoE, the same experts.
The routing decision is read from the file's `expert_index` output (the
router's TopK indices, int32, never re-quantized), not from its
`router_logits`, which an int8 file may re-quantize so that close logits
become ties.
"""

import keras
import numpy as np

from keras_mobile_moe.export.tflite import TFLiteClassifier
from keras_mobile_moe.export.tflite import _image_router
from keras_mobile_moe.export.tflite import _serving_model


def _check_images(model, images, name="images"):
    image_shape = tuple(model.backbone.image_shape)
    array = np.asarray(images)
    if (
        array.ndim != 4
        or tuple(array.shape[1:]) != image_shape
        or not len(array)
    ):
        raise ValueError(
            f"Received: {name} with shape {array.shape}. Expected float "
            f"images [n, {', '.join(map(str, image_shape))}] with n >= 1, in "
            "the model's input format (after its preprocessor)."
        )
    return array.astype("float32")


def _check_raw_images(images, name="images"):
    array = np.asarray(images)
    if array.ndim != 4 or array.shape[-1] != 3 or not len(array):
        raise ValueError(
            f"Received: {name} with shape {array.shape}. Expected raw RGB "
            "images [n, height, width, 3] with n >= 1."
        )
    if array.dtype != np.uint8:
        if array.min() < 0 or array.max() > 255:
            raise ValueError(
                f"Received: {name} with values in [{array.min():g}, "
                f"{array.max():g}]. Expected raw pixels in [0, 255]."
            )
        array = np.round(array).astype("uint8")
    return array


def keras_decisions(model, images, batch_size=64, preprocessing=False):
    """The Keras model's logits and routing decisions, as the file exports them.

    Args:
        model: a `kmm.MobileVMoE` or `kmm.MoNE` classifier (any backend).
        images: float32 `[n, height, width, channels]` in the input format,
            or, with `preprocessing=True`, raw uint8 pixels `[n, height,
            width, 3]` (any size; the model's preprocessor resizes them).
        batch_size: int. Prediction batch size.
        preprocessing: bool. Whether `images` are raw pixels that go
            through the model's image converter first (as in a file
            exported with `preprocessing=True`).

    Returns:
        A dict of numpy arrays: `logits` `[n, num_classes]` and, for a
        Mobile V-MoE with one router per image, `expert_index` `[n, top_k]`
        (int32, the experts the router chose) and `router_logits`.
    """
    raw_shape = None
    if preprocessing and getattr(model, "preprocessor", None) is not None:
        images = _check_raw_images(images)
        raw_shape = tuple(images.shape[1:])
    else:
        images = _check_images(model, images)
    outputs = _serving_model(model, raw_shape).predict(
        images, batch_size=batch_size, verbose=0
    )
    return {k: keras.ops.convert_to_numpy(v) for k, v in outputs.items()}


def _same_experts(a, b):
    # With top_k > 1 the set of experts decides what runs; order is the
    # gate ranking, which int8 may swap between two chosen experts.
    return np.all(np.sort(a, axis=-1) == np.sort(b, axis=-1), axis=-1)


def agreement(
    model, tflite_path, images, labels=None, num_threads=1, batch_size=64
):
    """Compares an exported `.tflite` classifier with its Keras model.

    Args:
        model: the `kmm.MobileVMoE` or `kmm.MoNE` classifier the file was
            exported from (any backend).
        tflite_path: the `.tflite` file (or its bytes) written by
            `to_tflite` for this model.
        images: the file's input format: raw uint8 pixels `[n, height,
            width, 3]` for a file that preprocesses itself (the default of
            `to_tflite`; e.g. `fixture_images(model, raw=True)`), else
            float32 `[n, height, width, channels]` in the model's input
            format (e.g. `fixture_images(model)`). The Keras side gets the
            same images (raw ones through the model's preprocessor).
        labels: optional int class labels `[n]`; adds both accuracies.
        num_threads: int. LiteRT interpreter threads.
        batch_size: int. Keras prediction batch size.

    Returns:
        A dict: `num_images`; `top1` (fraction of images with the same
        top-1 class); `routing` (fraction with the same chosen experts, from
        the file's `expert_index` output; None for models without a
        per-image router); `top1_disagreements` and `routing_disagreements`
        (image indices); `max_abs_logit_error`; `keras_margin_median` (median
        gap between the Keras model's two largest logits: small gaps make
        top-1 agreement a harsh test); and, with `labels`,
        `keras_accuracy` and `tflite_accuracy`.

    Example:

    >>> import tempfile, numpy as np, keras_mobile_moe as kmm
    >>> from keras_mobile_moe.export import to_tflite
    >>> model = kmm.MobileVMoE(kmm.MobileVMoEBackbone(
    ...     image_shape=(32, 32, 3), patch_size=8, num_layers=2, hidden_dim=16,
    ...     num_heads=2, mlp_dim=32, num_experts=4, num_moe_layers=1),
    ...     num_classes=10, routing="learned")
    >>> path = to_tflite(model, tempfile.mkdtemp() + "/tiny.tflite")["path"]
    >>> images = np.random.default_rng(0).uniform(-1, 1, (8, 32, 32, 3))
    >>> result = agreement(model, path, images)
    >>> result["top1"], result["routing"]
    (1.0, 1.0)
    """
    runner = TFLiteClassifier(tflite_path, num_threads=num_threads)
    raw = runner.input_dtype == np.uint8
    if raw:
        images = _check_raw_images(images)
        expected = tuple(
            runner.runner.get_input_details()[runner.input_name]["shape"][1:]
        )
        if tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"Received: images with shape {images.shape}. The file "
                f"takes raw uint8 images [n, {', '.join(map(str, expected))}]."
            )
    else:
        images = _check_images(model, images)
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != len(images):
            raise ValueError(
                f"Received: labels with {len(labels)} entries for "
                f"{len(images)} images. Expected one int label per image."
            )
    want = keras_decisions(model, images, batch_size, preprocessing=raw)
    got = runner.predict(images)
    if got["logits"].shape != want["logits"].shape:
        raise ValueError(
            f"The file's logits have shape {got['logits'].shape}; the model's "
            f"have {want['logits'].shape}. Was {tflite_path!r} exported from "
            "this model?"
        )
    same_class = got["logits"].argmax(-1) == want["logits"].argmax(-1)
    top2 = np.sort(want["logits"], axis=-1)[:, -2:]
    result = {
        "num_images": int(len(images)),
        "top1": float(np.mean(same_class)),
        "routing": None,
        "top1_disagreements": np.flatnonzero(~same_class).tolist(),
        "routing_disagreements": [],
        "max_abs_logit_error": float(
            np.abs(got["logits"] - want["logits"]).max()
        ),
        "keras_margin_median": float(np.median(top2[:, 1] - top2[:, 0]))
        if top2.shape[1] == 2
        else None,
    }
    if _image_router(model) is not None:
        if "expert_index" not in got:
            raise ValueError(
                f"The file {tflite_path!r} has the outputs {sorted(got)} but "
                "no 'expert_index' (the router's chosen experts, int32). "
                "Re-export it with kmm.export.to_tflite, which adds it; "
                "routing is not measured from re-quantized router logits."
            )
        same_route = _same_experts(got["expert_index"], want["expert_index"])
        result["routing"] = float(np.mean(same_route))
        result["routing_disagreements"] = np.flatnonzero(~same_route).tolist()
    if labels is not None:
        result["keras_accuracy"] = float(
            np.mean(want["logits"].argmax(-1) == labels)
        )
        result["tflite_accuracy"] = float(
            np.mean(got["logits"].argmax(-1) == labels)
        )
    return result


def fixture_images(model, split="all", raw=False):
    """CIFAR-100 fixture images in a model's input format, with labels.

    The images go through the model's preprocessor (resizing and scaling as
    its preset does); a model without one gets `x / 127.5 - 1` (the tests'
    and training programs' scaling).

    Args:
        model: a classifier (its `preprocessor` may be None).
        split: `"train"` (800 images), `"test"` (200) or `"all"` (1000,
            train then test).
        raw: bool. Return the raw uint8 32x32 pixels instead (what a file
            exported with `preprocessing=True` from a CIFAR-100 preset
            takes).

    Returns:
        A tuple `(images, labels)`: float32 `[n, *image_shape]` (uint8
        `[n, 32, 32, 3]` with `raw=True`), int `[n]`.
    """
    from keras_mobile_moe.datasets import cifar100

    splits = {"train": ("train",), "test": ("test",), "all": ("train", "test")}
    if split not in splits:
        raise ValueError(
            f"Received: split={split!r}. Expected one of {list(splits)}."
        )
    data = cifar100.load_fixture()
    pixels = np.concatenate([data[f"x_{s}"] for s in splits[split]])
    labels = np.concatenate([data[f"y_{s}"] for s in splits[split]])
    if raw:
        return pixels, labels
    if getattr(model, "preprocessor", None) is None:
        images = pixels.astype("float32") / 127.5 - 1.0
    else:
        # Float pixels, as `predict` resizes them (resizing uint8 rounds
        # differently: up to 0.004 apart after scaling).
        converted = model.preprocessor.image_converter(pixels.astype("float32"))
        images = np.asarray(keras.ops.convert_to_numpy(converted), "float32")
    return _check_images(model, images, "the fixture images"), labels
