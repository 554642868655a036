import keras
from keras import ops

from keras_mobile_moe import flops
from keras_mobile_moe.capacity import check_capacity_budget
from keras_mobile_moe.capacity import expert_token_counts
from keras_mobile_moe.convert import common
from keras_mobile_moe.layers.nested_expert_block import NestedExpertBlock
from keras_mobile_moe.layers.nested_expert_block import check_nested_width
from keras_mobile_moe.layers.nested_expert_block import nested_widths
from keras_mobile_moe.layers.nested_expert_router import NestedExpertRouter
from keras_mobile_moe.layers.nested_expert_router import permute_tokens
from keras_mobile_moe.models.base import FamilyBackbone
from keras_mobile_moe.validation import check_int
from keras_mobile_moe.validation import check_model_memory
from keras_mobile_moe.validation import check_rate


@keras.saving.register_keras_serializable(package="keras_mobile_moe")
class MoNEBackbone(FamilyBackbone):
    """Mixture of Nested Experts (MoNE) vision transformer backbone.

    Jain et al., "Mixture of Nested Experts: Adaptive Processing of Visual
    Tokens", NeurIPS 2024 (arXiv 2407.19985). A ViT (by default without a
    class token) with the parameters of the dense model of its scale, whose
    every block holds `num_nested_experts` nested experts of widths D/8,
    D/4, D/2, D (E = 4). One `NestedExpertRouter` on the patch embeddings
    assigns every token to one expert with Expert Preferred Routing; all
    blocks reuse that assignment. The tokens are grouped by expert once,
    after the router, so every `NestedExpertBlock` multiplies each group
    only by its weight slice (attention, which is permutation-equivariant,
    still sees all tokens at full width); the output is put back in patch order.

    `capacity_budget` (e_c, the fraction of the dense model's linear-layer
    compute per token) fixes how many tokens each expert takes
    (`kmm.capacity_distribution`). It is part of the config and can also be
    changed on a built, trained or loaded model for inference without
    retraining: `backbone.capacity_budget = 0.3`.

    With `use_class_token=True` a learned class token is prepended, as in a
    timm or keras-hub ViT: it is not routed, always runs at the full width
    (outside the budget) and comes first in `sequence_output`. That, exact
    GELU (`mlp_activation="gelu"`) and `capacity_budget=1.0` make the
    backbone compute a dense ViT, so a dense checkpoint loads into MoNE
    (`from_preset("hf://timm/...")`, then lower the budget).

    Args:
        num_layers: int. Transformer blocks.
        hidden_dim: int. Token width D; divisible by `num_heads` and by
            2^(num_nested_experts-1).
        num_heads: int. Attention heads.
        mlp_dim: int. Hidden width of the MLPs.
        image_shape: (height, width, channels) of the input images.
        patch_size: int. Side of the square patches.
        num_nested_experts: int >= 1. Nested experts E per block.
        capacity_budget: float in `[1/2^(E-1), 1]`. The compute budget e_c.
        dropout_rate: float in [0, 1). Dropout in MLPs and branch outputs.
        attention_dropout_rate: float in [0, 1). Dropout on attention weights.
        drop_path_rate: float in [0, 1). Stochastic depth of the last block;
            earlier blocks get linearly smaller rates.
        layer_norm_epsilon: float. Epsilon of the layer norms.
        use_class_token: bool. Prepend a learned class token (full width,
            not routed).
        mlp_activation: activation of the MLP hidden layers: the default
            `"keras_mobile_moe>gelu_tanh"` or a Keras name such as `"gelu"`
            (exact, as timm).
        dtype: dtype policy of the model (default: the global policy).
            Under `"mixed_bfloat16"` / `"mixed_float16"` the weights stay
            float32 and every layer computes in the half type, except the
            router, which computes in float32 on purpose (Expert Preferred
            Routing ranks tokens by probability; half precision ties them):
            `router_probs` is float32 under every policy.

    Images are channels-last whatever `keras.config.image_data_format()`
    says; under `"channels_first"` construction raises a `ValueError`.

    Call arguments:
        images: float tensor `[batch, height, width, channels]` (named
            `images`), already scaled; see `MoNEImageClassifierPreprocessor`.

    Returns:
        A dict with `"sequence_output"`: the normalised tokens
        `[batch, num_patches, hidden_dim]` in patch order (after the class
        token, with `use_class_token`);
        `"router_probs"`: float32 `[batch, num_patches, num_nested_experts]`;
        `"expert_index"`: int32 `[batch, num_patches]`, the nested expert
        (0 = smallest) of every patch.

    Example:

    >>> import numpy as np
    >>> backbone = MoNEBackbone(
    ...     image_shape=(32, 32, 3), patch_size=8, num_layers=2,
    ...     hidden_dim=16, num_heads=2, mlp_dim=32, capacity_budget=0.5)
    >>> outputs = backbone(np.zeros((2, 32, 32, 3), "float32"))
    >>> tuple(outputs["sequence_output"].shape)
    (2, 16, 16)
    >>> expert_index = np.asarray(outputs["expert_index"][0])
    >>> np.bincount(expert_index, minlength=4).tolist()
    [5, 3, 4, 4]
    >>> backbone.capacity_budget = 1.0  # e.g. on a trained model
    >>> np.asarray(backbone(np.zeros((1, 32, 32, 3)))["expert_index"]).max()
    np.int32(3)
    """

    preset_family = "mone"
    family_title = "MoNE"
    paper = (
        'Jain et al., "Mixture of Nested Experts: Adaptive Processing of '
        'Visual Tokens", NeurIPS 2024'
    )
    # The nested experts are slices of one dense ViT, so a dense checkpoint
    # (timm, keras-hub) is a valid start (`keras_mobile_moe.convert`).
    converts_dense_vits = True

    @classmethod
    def dense_vit_arguments(cls, spec):
        """The dense ViT `spec` as a MoNE at `capacity_budget=1.0` (every
        token at full width: the checkpoint's own function; lower the
        budget after loading, or pass `capacity_budget=...`)."""
        arguments = {
            key: value
            for key, value in spec.items()
            if key not in ("num_experts", "num_moe_layers")
        }
        arguments["capacity_budget"] = 1.0
        return arguments

    def load_dense_vit(self, weights):
        """Copies a converted dense ViT's weights into this backbone
        (`keras_mobile_moe.convert.common.assign_mone_backbone`): the
        router keeps its initialisation, every `alpha` is 0."""
        common.assign_mone_backbone(self, weights)

    def __init__(
        self,
        num_layers,
        hidden_dim,
        num_heads,
        mlp_dim,
        image_shape=(224, 224, 3),
        patch_size=32,
        num_nested_experts=4,
        capacity_budget=0.5,
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
        drop_path_rate=0.0,
        layer_norm_epsilon=1e-6,
        use_class_token=False,
        mlp_activation="keras_mobile_moe>gelu_tanh",
        dtype=None,
        **kwargs,
    ):
        image_shape = self._check_image_arguments(
            image_shape, patch_size, num_layers
        )
        check_int("hidden_dim", hidden_dim, minimum=1)
        check_int("num_nested_experts", num_nested_experts, minimum=1)
        check_nested_width(hidden_dim, num_nested_experts)
        check_capacity_budget(capacity_budget, num_nested_experts)
        check_rate("drop_path_rate", drop_path_rate)
        if not isinstance(use_class_token, bool):
            raise ValueError(
                f"Received: use_class_token={use_class_token!r}. Expected a "
                "bool."
            )
        if isinstance(mlp_dim, int) and isinstance(num_heads, int):
            check_model_memory(
                type(self).__name__,
                image_shape,
                patch_size,
                num_layers,
                hidden_dim,
                [mlp_dim] * num_layers,
                num_heads,
            )

        # === Layers ===
        self._make_patch_embedding(
            hidden_dim, patch_size, use_class_token, dtype
        )
        self.router = NestedExpertRouter(
            num_nested_experts=num_nested_experts,
            capacity_budget=capacity_budget,
            dtype=dtype,
            name="router",
        )
        self.encoder_blocks = [
            NestedExpertBlock(
                hidden_dim=hidden_dim,
                num_heads=num_heads,
                mlp_dim=mlp_dim,
                num_nested_experts=num_nested_experts,
                capacity_budget=capacity_budget,
                dropout_rate=dropout_rate,
                attention_dropout_rate=attention_dropout_rate,
                drop_path_rate=self._drop_path_rate_of(
                    drop_path_rate, i, num_layers
                ),
                layer_norm_epsilon=layer_norm_epsilon,
                mlp_activation=mlp_activation,
                full_width_tokens=int(use_class_token),
                dtype=dtype,
                name=f"nested_block_{i}",
            )
            for i in range(num_layers)
        ]
        self._make_final_norm(layer_norm_epsilon, dtype)

        # === Functional model ===
        images = keras.Input(shape=image_shape, name="images")
        x = self.patch_embedding(images)
        if use_class_token:
            class_token, x = x[:, :1], x[:, 1:]
        probs, expert_index, order, position, gates = self.router(x)
        x = permute_tokens(x, order)  # grouped by expert, once
        if use_class_token:
            # Last: it joins the full-width group; r = 0 (not routed).
            x = ops.concatenate([x, class_token], axis=1)
            gates = ops.concatenate(
                [gates, ops.zeros_like(gates[:, :1])], axis=1
            )
        for block in self.encoder_blocks:
            x = block(x, gates)
        x = self.final_norm(x)
        if use_class_token:
            x = ops.concatenate(
                [x[:, -1:], permute_tokens(x[:, :-1], position)], axis=1
            )
        else:
            x = permute_tokens(x, position)  # patch order
        outputs = {
            "sequence_output": x,
            "router_probs": probs,
            "expert_index": expert_index,
        }
        super().__init__(inputs=images, outputs=outputs, dtype=dtype, **kwargs)

        # === Config ===
        self._set_shared_config(locals())
        self.num_nested_experts = num_nested_experts
        self._capacity_budget = float(capacity_budget)
        self.use_class_token = use_class_token
        self.mlp_activation = self.encoder_blocks[0].mlp_activation

    @property
    def capacity_budget(self):
        """The compute budget e_c; assign to change it (no retraining)."""
        return self._capacity_budget

    @capacity_budget.setter
    def capacity_budget(self, value):
        check_capacity_budget(value, self.num_nested_experts)
        self._capacity_budget = float(value)
        self.use_budget(value)
        # Compiled predict/evaluate/train steps hold the old group sizes.
        self.train_function = None
        self.test_function = None
        self.predict_function = None

    def use_budget(self, capacity_budget):
        """Sets the budget of the router and blocks only, not the config.

        Used by adaptive training to run one step at a sampled budget; the
        config value `capacity_budget` stays the inference budget.
        """
        self.router.capacity_budget = capacity_budget
        for block in self.encoder_blocks:
            block.capacity_budget = capacity_budget

    @property
    def num_tokens(self):
        """Routed tokens per image N: the patches (a class token is not
        routed)."""
        height, width = self.image_shape[:2]
        return (height // self.patch_size) * (width // self.patch_size)

    @property
    def expert_widths(self):
        """The width d_j of every nested expert, smallest first."""
        return nested_widths(self.hidden_dim, self.num_nested_experts)

    def token_counts(self, capacity_budget=None):
        """Tokens per expert of every image (smallest first) at a budget.

        Args:
            capacity_budget: float or None (the model's `capacity_budget`).

        Returns:
            A tuple of ints summing to `num_tokens`.
        """
        budget = self.capacity_budget
        if capacity_budget is not None:
            budget = check_capacity_budget(
                capacity_budget, self.num_nested_experts
            )
        return expert_token_counts(
            budget, self.num_tokens, self.num_nested_experts
        )

    def flops_breakdown(self, num_classes=0):
        """Per-part forward FLOPs of one image at the current
        `capacity_budget` (`kmm.flops.mone_flops`)."""
        return flops.mone_flops(self, num_classes)

    def unused_params_per_image(self):
        """Parameters that no token of an image touches at the current
        `capacity_budget` (`kmm.flops.mone_unused_params`)."""
        return flops.mone_unused_params(self)

    @property
    def routing_layer_names(self):
        """The layers that decide which expert each token runs: the patch
        embedding and the token router."""
        return ["patch_embedding", "router"]

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_nested_experts": self.num_nested_experts,
                "capacity_budget": self.capacity_budget,
                "use_class_token": self.use_class_token,
                "mlp_activation": self.mlp_activation,
            }
        )
        return config
