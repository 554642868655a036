"""keras_mobile_moe: mobile vision transformers with mixtures of experts.

Implements Mobile V-MoE (Daxberger et al. 2023) and their dense ViT
baselines in Keras 3, on the JAX, TensorFlow and PyTorch backends.
"""
# ruff: noqa: E402 (the log filter is set up before the imports)

# First, before TensorFlow is imported: `python -m keras_mobile_moe.export`
# imports this package before its __main__ runs, and TensorFlow prints its
# start-up log lines at import.
from keras_mobile_moe import native_logs

native_logs.quiet_export_cli()

from keras_mobile_moe import capacity
from keras_mobile_moe import convert
from keras_mobile_moe import datasets
from keras_mobile_moe import distribution
from keras_mobile_moe import export
from keras_mobile_moe import flops
from keras_mobile_moe import hub
from keras_mobile_moe import layers
from keras_mobile_moe import losses
from keras_mobile_moe import models
from keras_mobile_moe import preset_loader
from keras_mobile_moe import superclasses
from keras_mobile_moe import variants
from keras_mobile_moe.capacity import capacity_distribution
from keras_mobile_moe.flops import count_flops
from keras_mobile_moe.flops import flops_breakdown
from keras_mobile_moe.models import MobileVMoE
from keras_mobile_moe.models import MobileVMoEBackbone
from keras_mobile_moe.models import MobileVMoEImageClassifier
from keras_mobile_moe.models import MoNE
from keras_mobile_moe.models import MoNEBackbone
from keras_mobile_moe.models import MoNEImageClassifier
from keras_mobile_moe.preset_loader import upload_preset
from keras_mobile_moe.superclasses import superclasses_from_confusion
from keras_mobile_moe.upcycle import upcycle
from keras_mobile_moe.version import __version__
