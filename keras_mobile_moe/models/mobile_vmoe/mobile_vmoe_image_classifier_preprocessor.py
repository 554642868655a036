import keras
from keras_hub.models import ImageClassifierPreprocessor

from keras_mobile_moe.models.mobile_vmoe.mobile_vmoe_backbone import (
    MobileVMoEBackbone,
)
from keras_mobile_moe.models.mobile_vmoe.mobile_vmoe_image_converter import (
    MobileVMoEImageConverter,
)


@keras.saving.register_keras_serializable(package="keras_mobile_moe")
class MobileVMoEImageClassifierPreprocessor(ImageClassifierPreprocessor):
    """Preprocessor of `MobileVMoEImageClassifier`: raw images in, model
    inputs out (a `keras_hub.models.ImageClassifierPreprocessor`).

    Args:
        image_converter: a `MobileVMoEImageConverter`.

    Example:

    >>> import numpy as np
    >>> preprocessor = MobileVMoEImageClassifierPreprocessor(
    ...     MobileVMoEImageConverter(image_size=(32, 32), scale=1 / 255))
    >>> tuple(preprocessor(np.zeros((2, 32, 32, 3), "uint8")).shape)
    (2, 32, 32, 3)
    """

    backbone_cls = MobileVMoEBackbone
    image_converter_cls = MobileVMoEImageConverter
