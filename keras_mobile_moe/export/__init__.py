"""Export to TFLite / LiteRT for phones (`kmm.export.to_tflite`)."""

from keras_mobile_moe.export.expert_split import ExpertSplitRunner
from keras_mobile_moe.export.expert_split import to_tflite_expert_split
from keras_mobile_moe.export.parity import agreement
from keras_mobile_moe.export.parity import fixture_images
from keras_mobile_moe.export.parity import keras_decisions
from keras_mobile_moe.export.tflite import QUANTIZATIONS
from keras_mobile_moe.export.tflite import TFLiteClassifier
from keras_mobile_moe.export.tflite import check_builtin_ops
from keras_mobile_moe.export.tflite import check_sparse_routing
from keras_mobile_moe.export.tflite import load_interpreter
from keras_mobile_moe.export.tflite import raw_input_shape
from keras_mobile_moe.export.tflite import read_metadata
from keras_mobile_moe.export.tflite import routing_layers
from keras_mobile_moe.export.tflite import to_tflite
