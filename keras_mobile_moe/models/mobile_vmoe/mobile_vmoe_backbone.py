import keras

from keras_mobile_moe import flops
from keras_mobile_moe.convert import common
from keras_mobile_moe.layers.image_router import ImageRouter
from keras_mobile_moe.layers.token_routed_moe import check_non_negative_float
from keras_mobile_moe.layers.token_routed_moe import check_positive_float
from keras_mobile_moe.layers.transformer_encoder_block import (
    TransformerEncoderBlock,
)
from keras_mobile_moe.models.base import FamilyBackbone
from keras_mobile_moe.validation import check_choice
from keras_mobile_moe.validation import check_int
from keras_mobile_moe.validation import check_model_memory
from keras_mobile_moe.validation import check_rate


def per_layer_mlp_dims(mlp_dim, num_layers):
    """Expands `mlp_dim` (an int or one int per layer) to a list per layer."""
    dims = list(mlp_dim) if isinstance(mlp_dim, (list, tuple)) else None
    if dims is None:
        check_int("mlp_dim", mlp_dim, minimum=1)
        return [mlp_dim] * num_layers
    if len(dims) != num_layers:
        raise ValueError(
            f"Received: mlp_dim={mlp_dim!r} ({len(dims)} entries) for "
            f"num_layers={num_layers}. Expected an int or one int per layer."
        )
    for i, dim in enumerate(dims):
        check_int(f"mlp_dim[{i}]", dim, minimum=1)
    return dims


@keras.saving.register_keras_serializable(package="keras_mobile_moe")
class MobileVMoEBackbone(FamilyBackbone):
    """Mobile V-MoE vision transformer backbone (dense ViT when no MoE layer).

    Daxberger et al., "Mobile V-MoEs: Scaling Down Vision Transformers via
    Sparse Mixture-of-Experts", arXiv 2309.04354 (2023), Fig. 2c. A ViT whose
    last `num_moe_layers` blocks replace the MLP by `num_experts` expert MLPs.
    One `ImageRouter`, placed after the first `num_layers - num_moe_layers`
    dense blocks, chooses `top_k` experts per image for all MoE blocks.
    `num_moe_layers=0` is the dense ViT baseline. The dense baseline of paper
    Fig. 3d, whose MLP hidden size is scaled by k to match the inference
    FLOPs of a top-k MoE, widens the MLPs of the last L blocks:
    `mlp_dim=[4 * D] * (num_layers - L) + [k * 4 * D] * L` with
    `num_moe_layers=0`.

    `router_type="token"` is the per-token routing ablation of paper
    Fig. 3e (V-MoE style, Riquelme et al. 2021): there is no `ImageRouter`;
    every MoE block has its own `TokenRoutedMoE` router that sends each
    token to its `top_k` experts, with an expert capacity set by
    `capacity_factor` per image, and adds a load-balancing loss
    (`aux_loss_weight`) in training. Its per-image compute is bounded by
    the capacity and it activates far more parameters per image.

    Args:
        image_shape: (height, width, channels) of the input images.
        patch_size: int. Side of the square patches.
        num_layers: int. Transformer blocks in total.
        hidden_dim: int. Token width; divisible by `num_heads`.
        num_heads: int. Attention heads.
        mlp_dim: int, or a list of one int per layer. Hidden width of the
            MLP (of every expert in MoE blocks).
        num_experts: int. Experts E per MoE block (0 allowed only when
            `num_moe_layers=0`).
        top_k: int in [1, num_experts]. Experts per image.
        num_moe_layers: int in [0, num_layers]. MoE blocks at the end (L).
        use_class_token: bool. Prepend a learned class token.
        router_pooling: `"token"` (class token) or `"mean"`: the image
            representation the router reads (not fixed by the paper).
        normalize_gates: bool. Rescale the k gates to sum to 1.
        router_type: `"image"` (the paper's per-image router, default) or
            `"token"` (a per-token router in every MoE block).
        capacity_factor: float > 0. Expert capacity factor of token
            routing: `C = ceil(capacity_factor * top_k * num_tokens / E)`
            slots per expert and image (unused with `"image"`).
        aux_loss_weight: float >= 0. Coefficient of the load-balancing loss
            of token routing (unused with `"image"`).
        dropout_rate: float in [0, 1). Dropout in MLPs and after attention.
        attention_dropout_rate: float in [0, 1). Dropout on attention weights.
        drop_path_rate: float in [0, 1). Stochastic depth of the last block;
            earlier blocks get linearly smaller rates (DeiT).
        layer_norm_epsilon: float. Epsilon of the layer norms.
        mlp_activation: activation of the MLP and expert hidden layers:
            `"keras_mobile_moe>gelu_tanh"` (default, as the paper's JAX
            ViTs) or `"gelu"` (exact GELU, as timm and keras-hub ViTs;
            set when converting their checkpoints).
        dtype: dtype policy of the model (default: the global policy).
            Under `"mixed_bfloat16"` / `"mixed_float16"` the weights stay
            float32 and every layer computes in the half type, except the
            routers, which compute in float32 on purpose (a half-precision
            softmax over experts ties or flips the top-k choice):
            `router_logits` is float32 under every policy.

    Images are channels-last whatever `keras.config.image_data_format()`
    says; under `"channels_first"` construction raises a `ValueError`.

    Call arguments:
        images: float tensor `[batch, height, width, channels]` (named
            `images`), already scaled; see
            `MobileVMoEImageClassifierPreprocessor`.

    Returns:
        A dict with `"sequence_output"`: the normalised tokens
        `[batch, num_tokens, hidden_dim]`, and, for MoE models with
        `router_type="image"`, `"router_logits"`: float32
        `[batch, num_experts]`.

    Example:

    >>> import numpy as np
    >>> backbone = MobileVMoEBackbone(
    ...     image_shape=(32, 32, 3), patch_size=8, num_layers=3,
    ...     hidden_dim=16, num_heads=2, mlp_dim=32, num_experts=4,
    ...     num_moe_layers=1)
    >>> outputs = backbone(np.zeros((2, 32, 32, 3), "float32"))
    >>> tuple(outputs["sequence_output"].shape)
    (2, 17, 16)
    >>> tuple(outputs["router_logits"].shape)
    (2, 4)
    >>> token_routed = MobileVMoEBackbone(
    ...     image_shape=(32, 32, 3), patch_size=8, num_layers=3,
    ...     hidden_dim=16, num_heads=2, mlp_dim=32, num_experts=4,
    ...     num_moe_layers=1, router_type="token", capacity_factor=1.5)
    >>> sorted(token_routed(np.zeros((2, 32, 32, 3), "float32")))
    ['sequence_output']
    """

    preset_family = "mobile_vmoe"
    family_title = "Mobile V-MoE"
    paper = (
        'Daxberger et al., "Mobile V-MoEs: Scaling Down Vision Transformers '
        'via Sparse Mixture-of-Experts", arXiv 2309.04354 (2023)'
    )
    # Its dense members load timm / keras-hub ViT checkpoints
    # (`keras_mobile_moe.convert`) and upcycle into MoE (`kmm.upcycle`).
    converts_dense_vits = True
    supports_upcycling = True

    @classmethod
    def dense_vit_arguments(cls, spec):
        """A dense ViT is a Mobile V-MoE with `num_moe_layers=0`: the
        checkpoint's arguments as they are."""
        return dict(spec)

    def load_dense_vit(self, weights):
        """Copies a converted dense ViT's weights into this (dense)
        backbone (`keras_mobile_moe.convert.common.assign_backbone`)."""
        common.assign_backbone(self, weights)

    def __init__(
        self,
        num_layers,
        hidden_dim,
        num_heads,
        mlp_dim,
        image_shape=(224, 224, 3),
        patch_size=32,
        num_experts=10,
        top_k=1,
        num_moe_layers=2,
        use_class_token=True,
        router_pooling="token",
        normalize_gates=False,
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
        drop_path_rate=0.0,
        layer_norm_epsilon=1e-6,
        router_type="image",
        capacity_factor=1.0,
        aux_loss_weight=0.01,
        mlp_activation="keras_mobile_moe>gelu_tanh",
        dtype=None,
        **kwargs,
    ):
        image_shape = self._check_image_arguments(
            image_shape, patch_size, num_layers
        )
        check_int("num_moe_layers", num_moe_layers, minimum=0)
        if num_moe_layers > num_layers:
            raise ValueError(
                f"num_moe_layers={num_moe_layers} is larger than "
                f"num_layers={num_layers}. Accepted: 0 <= num_moe_layers <= "
                "num_layers."
            )
        check_int("num_experts", num_experts, minimum=int(num_moe_layers > 0))
        if num_moe_layers:
            check_int("top_k", top_k, minimum=1, maximum=num_experts)
        check_choice("router_pooling", router_pooling, ("token", "mean"))
        check_choice("router_type", router_type, ("image", "token"))
        check_positive_float("capacity_factor", capacity_factor)
        check_non_negative_float("aux_loss_weight", aux_loss_weight)
        image_routed = bool(num_moe_layers) and router_type == "image"
        if (
            router_type == "image"
            and router_pooling == "token"
            and not use_class_token
        ):
            raise ValueError(
                "router_pooling='token' reads the class token, but "
                "use_class_token=False. Accepted: router_pooling='mean', or "
                "use_class_token=True."
            )
        check_rate("drop_path_rate", drop_path_rate)
        mlp_dims = per_layer_mlp_dims(mlp_dim, num_layers)
        check_int("hidden_dim", hidden_dim, minimum=1)
        check_model_memory(
            type(self).__name__,
            image_shape,
            patch_size,
            num_layers,
            hidden_dim,
            mlp_dims,
            num_heads if isinstance(num_heads, int) else 1,
            [1] * (num_layers - num_moe_layers)
            + [num_experts] * num_moe_layers,
        )

        # === Layers ===
        num_dense = num_layers - num_moe_layers
        self._make_patch_embedding(
            hidden_dim, patch_size, use_class_token, dtype
        )
        self.encoder_blocks = []
        for i in range(num_layers):
            is_moe = i >= num_dense
            self.encoder_blocks.append(
                TransformerEncoderBlock(
                    hidden_dim=hidden_dim,
                    num_heads=num_heads,
                    mlp_dim=mlp_dims[i],
                    num_experts=num_experts if is_moe else 0,
                    top_k=top_k if is_moe else 1,
                    normalize_gates=normalize_gates,
                    dropout_rate=dropout_rate,
                    attention_dropout_rate=attention_dropout_rate,
                    drop_path_rate=self._drop_path_rate_of(
                        drop_path_rate, i, num_layers
                    ),
                    layer_norm_epsilon=layer_norm_epsilon,
                    router_type=router_type,
                    capacity_factor=capacity_factor,
                    aux_loss_weight=aux_loss_weight,
                    mlp_activation=mlp_activation,
                    dtype=dtype,
                    name=f"{'moe' if is_moe else 'dense'}_block_{i}",
                )
            )
        self.router = None
        if image_routed:
            self.router = ImageRouter(
                num_experts=num_experts,
                top_k=top_k,
                pooling=router_pooling,
                dtype=dtype,
                name="router",
            )
        self._make_final_norm(layer_norm_epsilon, dtype)

        # === Functional model ===
        images = keras.Input(shape=image_shape, name="images")
        x = self.patch_embedding(images)
        routing = ()
        for i, block in enumerate(self.encoder_blocks):
            if i == num_dense and image_routed:
                router_logits, expert_indices, expert_gates = self.router(x)
                routing = (expert_indices, expert_gates)
            x = block(x, *routing)
        outputs = {"sequence_output": self.final_norm(x)}
        if image_routed:
            outputs["router_logits"] = router_logits
        super().__init__(inputs=images, outputs=outputs, dtype=dtype, **kwargs)

        # === Config ===
        self._set_shared_config(locals())
        self.num_experts = num_experts
        self.top_k = top_k
        self.num_moe_layers = num_moe_layers
        self.use_class_token = use_class_token
        self.router_pooling = router_pooling
        self.normalize_gates = normalize_gates
        self.router_type = router_type
        self.capacity_factor = capacity_factor
        self.aux_loss_weight = aux_loss_weight
        self.mlp_activation = self.encoder_blocks[0].mlp_activation

    @property
    def mlp_dims(self):
        """The MLP hidden width of every block, as a list."""
        return per_layer_mlp_dims(self.mlp_dim, self.num_layers)

    @property
    def is_moe(self):
        """Whether the backbone has MoE blocks (and so a router)."""
        return self.num_moe_layers > 0

    @property
    def is_token_routed(self):
        """Whether the MoE blocks route per token (`router_type="token"`)."""
        return self.is_moe and self.router_type == "token"

    def flops_breakdown(self, num_classes=0):
        """Per-part forward FLOPs of one image
        (`kmm.flops.mobile_vmoe_flops`)."""
        return flops.mobile_vmoe_flops(self, num_classes)

    def unused_params_per_image(self):
        """Parameters of the experts one image cannot reach
        (`kmm.flops.mobile_vmoe_unused_params`)."""
        return flops.mobile_vmoe_unused_params(self)

    @property
    def routing_layer_names(self):
        """The layers that decide which experts run: per-image routing, the
        patch embedding, the dense blocks before the router and the router;
        per-token routing, the routers inside the MoE layers (all named
        `"router"`); a dense model, none."""
        if self.router is not None:
            num_dense = self.num_layers - self.num_moe_layers
            dense = [f"dense_block_{i}" for i in range(num_dense)]
            return ["patch_embedding", *dense, "router"]
        return ["router"] if self.is_moe else []

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "top_k": self.top_k,
                "num_moe_layers": self.num_moe_layers,
                "use_class_token": self.use_class_token,
                "router_pooling": self.router_pooling,
                "normalize_gates": self.normalize_gates,
                "router_type": self.router_type,
                "capacity_factor": self.capacity_factor,
                "aux_loss_weight": self.aux_loss_weight,
                "mlp_activation": self.mlp_activation,
            }
        )
        return config
