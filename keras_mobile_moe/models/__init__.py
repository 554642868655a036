"""Model families: backbones, classifiers and their preprocessors."""

from keras_mobile_moe.models.mobile_vmoe import MobileVMoE
from keras_mobile_moe.models.mobile_vmoe import MobileVMoEBackbone
from keras_mobile_moe.models.mobile_vmoe import MobileVMoEImageClassifier
from keras_mobile_moe.models.mobile_vmoe import (
    MobileVMoEImageClassifierPreprocessor,
)
from keras_mobile_moe.models.mobile_vmoe import MobileVMoEImageConverter
from keras_mobile_moe.models.mone import MoNE
from keras_mobile_moe.models.mone import MoNEBackbone
from keras_mobile_moe.models.mone import MoNEImageClassifier
from keras_mobile_moe.models.mone import MoNEImageClassifierPreprocessor
from keras_mobile_moe.models.mone import MoNEImageConverter
