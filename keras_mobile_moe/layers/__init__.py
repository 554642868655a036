"""Layers of the Mobile V-MoE and MoNE families.

Mixed precision: every layer honours its `dtype_policy`. Under
`mixed_float16` / `mixed_bfloat16` the weights stay float32 and the layers
compute and return the half compute dtype, with one exception on purpose:
the routers (`ImageRouter`, `NestedExpertRouter` and the router inside
`TokenRoutedMoE`) compute in float32 and return float32 logits,
probabilities and gates (their top-k is a discrete choice that half
precision flips on near ties), and the load-balancing loss is float32.
tests/test_layers_mixed_precision.py checks both.
"""

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
