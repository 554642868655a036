import keras
from keras_hub.layers import ImageConverter

from keras_mobile_moe.models.mone.mone_backbone import MoNEBackbone


@keras.saving.register_keras_serializable(package="keras_mobile_moe")
class MoNEImageConverter(ImageConverter):
    """Resizes and rescales raw images for `MoNEBackbone`.

    A `keras_hub.layers.ImageConverter`; presets use
    `scale=1/127.5, offset=-1` (pixels in [-1, 1]) at the model's image size.

    Example:

    >>> import numpy as np
    >>> converter = MoNEImageConverter(
    ...     image_size=(32, 32), scale=1 / 127.5, offset=-1.0)
    >>> tuple(converter(np.full((1, 16, 16, 3), 255, "uint8")).shape)
    (1, 32, 32, 3)
    """

    backbone_cls = MoNEBackbone
