"""Layers of the Mobile V-MoE and MoNE families."""

from keras_mobile_moe.layers.drop_path import DropPath
from keras_mobile_moe.layers.image_routed_moe import ImageRoutedMoE
from keras_mobile_moe.layers.image_router import ImageRouter
from keras_mobile_moe.layers.mlp import MLP
from keras_mobile_moe.layers.nested_expert_block import ClipConstraint
from keras_mobile_moe.layers.nested_expert_block import NestedExpertBlock
from keras_mobile_moe.layers.nested_expert_router import NestedExpertRouter
from keras_mobile_moe.layers.nested_expert_router import (
    expert_preferred_routing,
)
from keras_mobile_moe.layers.nested_expert_router import permute_tokens
from keras_mobile_moe.layers.patch_embedding import PatchEmbedding
from keras_mobile_moe.layers.token_routed_moe import TokenRoutedMoE
from keras_mobile_moe.layers.token_routed_moe import expert_capacity
from keras_mobile_moe.layers.transformer_encoder_block import (
    TransformerEncoderBlock,
)
from keras_mobile_moe.layers.xla_cpu import set_xla_cpu_paths
