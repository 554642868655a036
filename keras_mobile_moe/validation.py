"""Argument checks shared by the public layers and models.

Every message names the argument, the value received and what is accepted.
"""

import os

import keras
import numpy as np


def check_int(name, value, minimum=None, maximum=None):
    """Raises `ValueError` unless `value` is an int in [minimum, maximum]."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    too_small = is_int and minimum is not None and value < minimum
    too_big = is_int and maximum is not None and value > maximum
    if not is_int or too_small or too_big:
        bounds = []
        if minimum is not None:
            bounds.append(f">= {minimum}")
        if maximum is not None:
            bounds.append(f"<= {maximum}")
        accepted = "an int" + (" " + " and ".join(bounds) if bounds else "")
        raise ValueError(f"Received: {name}={value!r}. Expected {accepted}.")
    return value


def check_rate(name, value):
    """Raises `ValueError` unless `value` is a float in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"Received: {name}={value!r}. Expected a float in [0, 1)."
        )
    if not 0.0 <= value < 1.0:
        raise ValueError(
            f"Received: {name}={value!r}. Expected a float in [0, 1)."
        )
    return float(value)


def check_choice(name, value, choices):
    """Raises `ValueError` unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(
            f"Received: {name}={value!r}. Expected one of {list(choices)}."
        )
    return value


# --- data at the task boundary -------------------------------------------
#
# Checked in numpy before Keras is entered: a bad batch raises a clear
# `ValueError` naming what the user passed (shape and dtype before any
# preprocessing), and never reaches a compiled step (on JAX, Keras 3.15.1
# leaves a model unusable after one failed `predict`).

DEFAULT_VALUE_RANGE = (0, 255)


def check_channels_last(owner):
    """Raises a clear `ValueError` unless Keras' image data format is
    `"channels_last"`.

    The models take `image_shape=(height, width, channels)` and images
    `[batch, height, width, channels]`; under
    `keras.config.image_data_format() == "channels_first"` (keras-hub's
    models then take `[batch, channels, height, width]`) they are refused
    at construction instead of failing later on a transposed shape.

    Args:
        owner: str. The class being built, named in the error.
    """
    data_format = keras.config.image_data_format()
    if data_format != "channels_last":
        raise ValueError(
            f"{owner} takes channels-last images: image_shape=(height, "
            "width, channels) and inputs [batch, height, width, channels]. "
            "Received: keras.config.image_data_format()="
            f"{data_format!r}. Accepted: 'channels_last'. Call "
            "keras.config.set_image_data_format('channels_last') before "
            "building the model and transpose channels-first images with "
            "keras.ops.transpose(images, (0, 2, 3, 1))."
        )


def check_image_shape(image_shape, patch_size):
    """Validates `image_shape` against `patch_size`; returns it as a tuple."""
    shape = tuple(image_shape) if isinstance(image_shape, (list, tuple)) else ()
    if len(shape) != 3 or not all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape
    ):
        raise ValueError(
            f"Received: image_shape={image_shape!r}. Expected (height, width, "
            "channels) of positive ints."
        )
    if shape[0] % patch_size or shape[1] % patch_size:
        hint = ""
        if shape[0] <= 4 < shape[2]:
            hint = (
                f" image_shape={shape} looks channels-first; these models "
                "take (height, width, channels)."
            )
        raise ValueError(
            f"Image size {shape[0]}x{shape[1]} is not divisible by "
            f"patch_size={patch_size}. Accepted: a patch_size that divides "
            f"both the image height and width.{hint}"
        )
    return shape


def check_images(images, image_shape):
    """A clear `ValueError` unless `images` is `[batch, *image_shape]`."""
    shape = tuple(getattr(images, "shape", ()))
    if len(shape) != 4 or tuple(shape[1:]) != tuple(image_shape):
        expected = ", ".join(str(d) for d in image_shape)
        raise ValueError(
            f"Expected images of shape [batch, {expected}] (batch, height, "
            f"width, channels). Received: images of shape {shape}."
        )


def check_value_range(value_range):
    """Returns `value_range` as a `(low, high)` tuple of floats, low < high."""
    ok = (
        isinstance(value_range, (list, tuple))
        and len(value_range) == 2
        and all(
            isinstance(v, (int, float))
            and not isinstance(v, bool)
            and np.isfinite(v)
            for v in value_range
        )
        and value_range[0] < value_range[1]
    )
    if not ok:
        raise ValueError(
            f"Received: value_range={value_range!r}. Expected (low, high) "
            "with finite numbers low < high, e.g. (0, 255) for pixels, "
            "(0, 1) or (-1, 1) for scaled images."
        )
    return (value_range[0], value_range[1])


def check_image_batch(images, image_shape, value_range, exact_size=False):
    """Checks a batch of raw images as the user passed it.

    Args:
        images: numpy array (or anything `np.asarray` takes).
        image_shape: `(height, width, channels)` of the model.
        value_range: `(low, high)` the preprocessor expects, or None when the
            model has no preprocessor (inputs in the model's input format;
            only finiteness is checked).
        exact_size: bool. Whether height and width must equal the model's
            (no preprocessor resizes them).
    """
    images = np.asarray(images)
    shape, dtype = tuple(images.shape), images.dtype
    channels = image_shape[-1]
    accepted = (
        f"[batch, height, width, {channels}]"
        if not exact_size
        else f"[batch, {', '.join(str(d) for d in image_shape)}]"
    )
    received = f"Received: images of shape {shape} and dtype {dtype}."
    if dtype.kind == "b":
        raise ValueError(
            f"{received} Boolean images are not accepted. Expected numeric "
            f"images {accepted}: uint8 pixels or floats in value_range "
            f"{value_range}."
        )
    if dtype.kind not in "uif":
        raise ValueError(
            f"{received} Expected numeric images {accepted} (uint8 or float)."
        )
    if len(shape) == 3 and shape[-1] == channels:
        raise ValueError(
            f"{received} That is a single image; expected a batch "
            f"{accepted}. Add a batch axis: images[None] (or "
            "np.expand_dims(images, 0))."
        )
    if len(shape) != 4:
        raise ValueError(f"{received} Expected a batch of images {accepted}.")
    if shape[-1] != channels:
        hint = (
            " For grayscale images repeat the channel: "
            "np.repeat(images, 3, axis=-1)."
            if shape[-1] == 1 and channels == 3
            else ""
        )
        raise ValueError(
            f"{received} The model expects {channels} channels; expected "
            f"{accepted}.{hint}"
        )
    if exact_size and tuple(shape[1:]) != tuple(image_shape):
        raise ValueError(
            f"{received} This model has no preprocessor to resize images; "
            f"expected {accepted}."
        )
    if shape[0] == 0:
        raise ValueError(
            f"{received} The batch is empty; expected at least one image "
            f"{accepted}."
        )
    if dtype.kind == "f":
        finite = np.isfinite(images)
        if not finite.all():
            bad = int(images.size - np.count_nonzero(finite))
            raise ValueError(
                f"{received} It holds {bad} NaN or inf values; expected "
                "finite pixel values. Fix or drop these images."
            )
    if value_range is None:
        return
    low, high = value_range
    lowest, highest = float(images.min()), float(images.max())
    tolerance = 1e-3 * (high - low)
    if (
        dtype.kind == "f"
        and tuple(value_range) == DEFAULT_VALUE_RANGE
        and highest <= 1.0
        and lowest >= -1.0
        and (highest > 0 or lowest < 0)
    ):
        found = "[-1, 1]" if lowest < 0 else "[0, 1]"
        raise ValueError(
            f"{received} Its values span [{lowest:g}, {highest:g}]: they "
            f"look scaled to {found}, but the converter expects pixels in "
            f"value_range {DEFAULT_VALUE_RANGE}. Pass pixels in 0-255 "
            "(e.g. images * 255), or set the converter's value_range: "
            "model.preprocessor.image_converter.value_range = "
            f"{(-1, 1) if lowest < 0 else (0, 1)}."
        )
    if lowest < low - tolerance or highest > high + tolerance:
        raise ValueError(
            f"{received} Its values span [{lowest:g}, {highest:g}], outside "
            f"the converter's value_range {tuple(value_range)}. Rescale the "
            "images into that range, or set the converter's value_range to "
            "the range your images use, e.g. "
            "model.preprocessor.image_converter.value_range = (0, 1)."
        )


def check_labels(labels, num_classes, sparse=True, num_images=None, name="y"):
    """Checks class labels as the user passed them.

    Args:
        labels: integer class ids `[batch]` / `[batch, 1]` in
            `[0, num_classes)` (for sparse losses), or one-hot / soft targets
            `[batch, num_classes]` (for categorical losses).
        num_classes: int. The classifier's number of classes.
        sparse: True (sparse loss: ids), False (categorical: targets) or
            None (a custom loss: either form, checked as given).
        num_images: the batch size of the images, if known.
        name: str. The argument's name in the error messages.
    """
    labels = np.asarray(labels)
    shape, dtype = tuple(labels.shape), labels.dtype
    received = f"Received: {name} of shape {shape} and dtype {dtype}"
    ids = f"integer class ids [batch] in [0, {num_classes})"
    targets = f"one-hot or soft targets [batch, {num_classes}]"
    if dtype.kind not in "uif":
        raise ValueError(
            f"{received}. Expected {ids if sparse is not False else targets}."
        )
    if num_images is not None and (not shape or shape[0] != num_images):
        raise ValueError(
            f"{received} for {num_images} images. Expected one label per image."
        )
    looks_dense = len(shape) == 2 and shape[1] > 1
    if looks_dense or sparse is False:
        if sparse is True:
            raise ValueError(
                f"{received}. The loss is sparse (SparseCategorical"
                f"Crossentropy), which expects {ids}. Pass labels.argmax(-1), "
                "or compile with loss=keras.losses.CategoricalCrossentropy("
                "from_logits=True) for one-hot or soft targets."
            )
        if len(shape) != 2 or shape[1] != num_classes:
            raise ValueError(f"{received}. Expected {targets}.")
        values = labels.astype("float64")
        if (
            not np.isfinite(values).all()
            or values.min() < 0
            or values.max() > 1
        ):
            raise ValueError(
                f"{received} with values in [{np.nanmin(values):g}, "
                f"{np.nanmax(values):g}]. Expected {targets} with finite "
                "values in [0, 1]."
            )
        sums = values.sum(axis=1)
        if shape[0] and not np.allclose(sums, 1.0, atol=1e-3):
            raise ValueError(
                f"{received} whose rows sum to {sums.min():g}..{sums.max():g}."
                f" Expected {targets} whose rows sum to 1."
            )
        return
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise ValueError(f"{received}. Expected {ids}.")
    if dtype.kind == "f":
        if not np.isfinite(labels).all() or not np.all(
            labels == np.round(labels)
        ):
            raise ValueError(
                f"{received} holding non-integer values (e.g. "
                f"{labels[labels != np.round(labels)].ravel()[:3].tolist()}"
                f"). Expected {ids}; float labels would be truncated."
            )
    if labels.size:
        lowest, highest = labels.min(), labels.max()
        if lowest < 0 or highest >= num_classes:
            raise ValueError(
                f"{received} with values in [{lowest:g}, {highest:g}]. "
                f"Expected {ids} (this model has num_classes={num_classes})."
            )


# --- model size ---------------------------------------------------------------


def machine_memory_bytes():
    """Physical memory of this machine in bytes (None where unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_model_memory(
    name,
    image_shape,
    patch_size,
    num_layers,
    hidden_dim,
    mlp_dims,
    num_heads=1,
    experts_per_layer=None,
    bytes_per_value=4,
    available=None,
):
    """Refuses a configuration whose weights and one image's activations
    cannot fit in this machine's memory, before anything is allocated.

    Args:
        name: the model class, for the message.
        image_shape: `(height, width, channels)`.
        patch_size: int.
        num_layers, hidden_dim, num_heads: ints.
        mlp_dims: one MLP width per layer.
        experts_per_layer: one expert count per layer (1 for dense layers),
            or None (all dense).
        bytes_per_value: 4 (float32).
        available: bytes of memory (default: the machine's physical memory).

    Returns:
        `(parameters, bytes)`: the estimate.
    """
    height, width, channels = image_shape
    tokens = (height // patch_size) * (width // patch_size) + 1
    experts = experts_per_layer or [1] * num_layers
    parameters = patch_size * patch_size * channels * hidden_dim
    parameters += (tokens + 1) * hidden_dim
    for mlp, count in zip(mlp_dims, experts):
        parameters += 4 * hidden_dim * hidden_dim + 4 * hidden_dim
        parameters += count * (2 * hidden_dim * mlp + mlp + hidden_dim)
    activations = tokens * max(max(mlp_dims), 3 * hidden_dim) * 4
    activations += num_heads * tokens * tokens * 2
    needed = (parameters + activations) * bytes_per_value
    available = machine_memory_bytes() if available is None else available
    if available is not None and needed > available:
        raise ValueError(
            f"Received: a {name} with hidden_dim={hidden_dim}, "
            f"num_layers={num_layers}, mlp_dim={max(mlp_dims)}"
            + (
                f", {max(experts)} experts per MoE layer"
                if max(experts) > 1
                else ""
            )
            + f": about "
            f"{parameters:.3g} parameters and {needed / 2**30:.3g} GiB for "
            "its weights and one image's activations, more than this "
            f"machine's {available / 2**30:.3g} GiB of memory. Expected a "
            "configuration that fits (the paper's largest, 12x384, needs "
            "about 0.1 GiB); check hidden_dim and mlp_dim."
        )
    return parameters, needed
