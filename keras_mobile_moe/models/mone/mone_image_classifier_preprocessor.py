import keras
from keras_hub.models import ImageClassifierPreprocessor

from keras_mobile_moe.models.mone.mone_backbone import MoNEBackbone
from keras_mobile_moe.models.mone.mone_image_converter import MoNEImageConverter


@keras.saving.register_keras_serializable(package="keras_mobile_moe")
class MoNEImageClassifierPreprocessor(ImageClassifierPreprocessor):
    """Preprocessor of `MoNEImageClassifier`: raw images in, model inputs
    out (a `keras_hub.models.ImageClassifierPreprocessor`).

    Args:
        image_converter: a `MoNEImageConverter`.

    Example:

    >>> import numpy as np
    >>> preprocessor = MoNEImageClassifierPreprocessor(
    ...     MoNEImageConverter(image_size=(32, 32), scale=1 / 255))
    >>> tuple(preprocessor(np.zeros((2, 32, 32, 3), "uint8")).shape)
    (2, 32, 32, 3)
    """

    backbone_cls = MoNEBackbone
    image_converter_cls = MoNEImageConverter
