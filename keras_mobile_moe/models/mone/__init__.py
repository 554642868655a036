"""MoNE: Mixture of Nested Experts (Jain et al., NeurIPS 2024)."""

from keras_mobile_moe.models.mone.mone_backbone import MoNEBackbone
from keras_mobile_moe.models.mone.mone_image_classifier import ADAPTIVE_BUDGETS
from keras_mobile_moe.models.mone.mone_image_classifier import MoNE
from keras_mobile_moe.models.mone.mone_image_classifier import (
    MoNEImageClassifier,
)
from keras_mobile_moe.models.mone.mone_image_classifier_preprocessor import (
    MoNEImageClassifierPreprocessor,
)
from keras_mobile_moe.models.mone.mone_image_converter import MoNEImageConverter
