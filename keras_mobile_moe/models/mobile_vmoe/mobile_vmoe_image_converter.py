import keras
from keras_hub.layers import ImageConverter

from keras_mobile_moe.models.mobile_vmoe.mobile_vmoe_backbone import (
    MobileVMoEBackbone,
)
from keras_mobile_moe.models.task_utils import ValueRangeMixin


@keras.saving.register_keras_serializable(package="keras_mobile_moe")
class MobileVMoEImageConverter(ValueRangeMixin, ImageConverter):
    """Resizes and rescales raw images for `MobileVMoEBackbone`.

    A `keras_hub.layers.ImageConverter`; presets use
    `scale=1/127.5, offset=-1` (pixels in [-1, 1]) at the model's image size.

    Args:
        value_range: `(low, high)`, the range of the raw images it takes
            (default `(0, 255)`: uint8 or float pixels). Images in `[0, 1]`
            need `value_range=(0, 1)` (folded into `scale` and `offset`, so
            the model sees the same inputs); `fit`, `evaluate` and `predict`
            reject images outside the range, and float images in `[0, 1]` or
            `[-1, 1]` under the default, with an error that says how to fix
            it.
        **kwargs: `keras_hub.layers.ImageConverter` arguments (`image_size`,
            `scale`, `offset`, `interpolation`, ...).

    Example:

    >>> import numpy as np
    >>> converter = MobileVMoEImageConverter(
    ...     image_size=(32, 32), scale=1 / 127.5, offset=-1.0)
    >>> tuple(converter(np.full((1, 16, 16, 3), 255, "uint8")).shape)
    (1, 32, 32, 3)
    >>> unit = MobileVMoEImageConverter(
    ...     image_size=(32, 32), scale=1 / 127.5, offset=-1.0,
    ...     value_range=(0, 1))
    >>> float(unit(np.ones((1, 32, 32, 3), "float32"))[0, 0, 0, 0])
    1.0
    """

    backbone_cls = MobileVMoEBackbone
