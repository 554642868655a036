from keras_mobile_moe.models.mobile_vmoe.mobile_vmoe_backbone import (
    MobileVMoEBackbone,
)
from keras_mobile_moe.models.mobile_vmoe.mobile_vmoe_image_classifier import (
    MobileVMoE,
)
from keras_mobile_moe.models.mobile_vmoe.mobile_vmoe_image_classifier import (
    MobileVMoEImageClassifier,
)
from keras_mobile_moe.models.mobile_vmoe.mobile_vmoe_image_classifier_preprocessor import (  # noqa: E501
    MobileVMoEImageClassifierPreprocessor,
)
from keras_mobile_moe.models.mobile_vmoe.mobile_vmoe_image_converter import (
    MobileVMoEImageConverter,
)
