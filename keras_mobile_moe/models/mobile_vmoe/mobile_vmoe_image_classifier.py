import keras
from keras import ops

from keras_mobile_moe import families
from keras_mobile_moe.losses.superclass_router_loss import SuperclassRouterLoss
from keras_mobile_moe.losses.superclass_router_loss import check_superclass_ids
from keras_mobile_moe.models.base import FamilyImageClassifier
from keras_mobile_moe.models.mobile_vmoe.mobile_vmoe_backbone import (
    MobileVMoEBackbone,
)
from keras_mobile_moe.models.mobile_vmoe.mobile_vmoe_image_classifier_preprocessor import (  # noqa: E501
    MobileVMoEImageClassifierPreprocessor,
)
from keras_mobile_moe.validation import check_choice


@keras.saving.register_keras_serializable(package="keras_mobile_moe")
class MobileVMoEImageClassifier(FamilyImageClassifier):
    """Mobile V-MoE image classifier (`kmm.MobileVMoE`).

    Daxberger et al., "Mobile V-MoEs", arXiv 2309.04354 (2023). A
    `MobileVMoEBackbone`, pooling (class token or mean of the patch tokens)
    and a linear head. In training the model also returns the router logits,
    and `fit` adds `router_loss_weight * SuperclassRouterLoss` (lambda = 0.3
    in the paper) to the classification loss, so a plain `compile()` trains
    the router on the super-classes given by `superclass_ids`. The labels
    are integer class ids (the default sparse loss) or, compiled with a
    categorical loss, one-hot or Mixup/CutMix soft targets; the router's
    target for a soft label is its distribution summed per super-class.

    Routing modes:
        - `"superclass"` (default): the router is supervised with the
          super-class of each label (`superclass_ids` needed for training).
        - `"learned"`: no router loss; the router learns end to end through
          the gates that scale the expert outputs. The only choice for a
          backbone with `router_type="token"` (paper Fig. 3e), whose
          routers have no image-level logits; their load-balancing losses
          reach `fit` through `add_loss` (they are in `model.losses`).

    Args:
        backbone: a `MobileVMoEBackbone`.
        num_classes: int. Number of classes.
        preprocessor: a `MobileVMoEImageClassifierPreprocessor` or None.
        pooling: `"token"` (class token) or `"avg"` (mean of patch tokens).
        dropout: float in [0, 1). Dropout before the head.
        activation: activation of the head (None: logits).
        superclass_ids: sequence of `num_classes` ints in [0, num_experts),
            the super-class (= expert) of every class, or None.
        routing: `"superclass"` or `"learned"`.
        router_loss_weight: float >= 0, lambda of the router loss.
        head_dtype: dtype policy of the head (default: the backbone's).

    Mixed precision: the classifier takes the backbone's dtype policy. The
    logits come out in its compute dtype, the router logits in float32, and
    both losses (the classification loss and `SuperclassRouterLoss`) are
    computed in float32 on purpose. Under `"mixed_float16"`, `compile`
    wraps the optimizer in `keras.optimizers.LossScaleOptimizer` (Keras'
    `auto_scale_loss`), so float16 gradients do not underflow;
    `"mixed_bfloat16"` needs no loss scaling.

    Call arguments:
        images: images `[batch, height, width, channels]`.
        training: bool. In training, MoE models with per-image routing
            return `{"logits", "router_logits"}`; otherwise the logits.

    Returns:
        Logits `[batch, num_classes]`.

    Example:

    >>> import numpy as np
    >>> backbone = MobileVMoEBackbone(
    ...     image_shape=(32, 32, 3), patch_size=8, num_layers=2,
    ...     hidden_dim=16, num_heads=2, mlp_dim=32, num_experts=2,
    ...     num_moe_layers=1)
    >>> model = MobileVMoEImageClassifier(
    ...     backbone, num_classes=4, superclass_ids=[0, 0, 1, 1])
    >>> images = np.random.rand(8, 32, 32, 3).astype("float32")
    >>> history = model.fit(images, np.arange(8) % 4, epochs=1, verbose=0)
    >>> tuple(model.predict(images, verbose=0).shape)
    (8, 4)

    Per-token routing (V-MoE style, paper Fig. 3e) trains with
    `routing="learned"`:

    >>> token_backbone = MobileVMoEBackbone(
    ...     image_shape=(32, 32, 3), patch_size=8, num_layers=2,
    ...     hidden_dim=16, num_heads=2, mlp_dim=32, num_experts=2,
    ...     num_moe_layers=1, router_type="token")
    >>> token_model = MobileVMoEImageClassifier(
    ...     token_backbone, num_classes=4, routing="learned")
    >>> history = token_model.fit(
    ...     images, np.arange(8) % 4, epochs=1, verbose=0)
    >>> tuple(token_model.predict(images, verbose=0).shape)
    (8, 4)
    """

    backbone_cls = MobileVMoEBackbone
    preprocessor_cls = MobileVMoEImageClassifierPreprocessor
    per_class_config = ("superclass_ids",)

    def __init__(
        self,
        backbone,
        num_classes,
        preprocessor=None,
        pooling="token",
        dropout=0.0,
        activation=None,
        superclass_ids=None,
        routing="superclass",
        router_loss_weight=0.3,
        head_dtype=None,
        **kwargs,
    ):
        self._check_head_arguments(
            backbone, num_classes, pooling, ("token", "avg"), dropout
        )
        if pooling == "token" and not backbone.use_class_token:
            raise ValueError(
                "pooling='token' needs a class token but the backbone has "
                "use_class_token=False. Accepted: pooling='avg'."
            )
        check_choice("routing", routing, ("superclass", "learned"))
        token_routed = backbone.is_moe and backbone.router_type == "token"
        if token_routed and routing != "learned":
            raise ValueError(
                f"Received: routing={routing!r} with a backbone of "
                "router_type='token'. Super-class routing supervises the "
                "per-image router, which a token-routed backbone does not "
                "have. Accepted: routing='learned' (the per-token routers "
                "train end to end, with their load-balancing losses)."
            )
        if isinstance(router_loss_weight, bool) or not (
            isinstance(router_loss_weight, (int, float))
            and router_loss_weight >= 0
        ):
            raise ValueError(
                f"Received: router_loss_weight={router_loss_weight!r}. "
                "Expected a float >= 0."
            )
        if superclass_ids is not None:
            superclass_ids = check_superclass_ids(
                superclass_ids,
                num_classes=num_classes,
                num_experts=backbone.num_experts if backbone.is_moe else None,
            )
        if (
            backbone.is_moe
            and routing == "learned"
            and backbone.top_k == 1
            and backbone.normalize_gates
        ):
            raise ValueError(
                "routing='learned' with top_k=1 needs normalize_gates=False: "
                "a renormalised single gate is always 1 and the router would "
                "get no gradient."
            )

        # === Layers ===
        self._make_head(
            backbone,
            preprocessor,
            num_classes,
            dropout,
            activation,
            head_dtype,
        )

        # === Functional model ===
        images = backbone.input
        backbone_outputs = backbone(images)
        tokens = backbone_outputs["sequence_output"]
        if pooling == "token":
            x = tokens[:, 0, :]
        else:
            first_patch = int(backbone.use_class_token)
            x = ops.mean(tokens[:, first_patch:, :], axis=1)
        x = self.output_dropout(x)
        logits = self.output_dense(x)
        outputs = logits
        if backbone.is_moe and not token_routed:
            outputs = {
                "logits": logits,
                "router_logits": backbone_outputs["router_logits"],
            }
        self._finish_functional(
            outputs, num_classes, pooling, dropout, activation, **kwargs
        )

        # === Config ===
        self.superclass_ids = superclass_ids
        self.routing = routing
        self.router_loss_weight = float(router_loss_weight)

        # Router loss and its metrics: only for MoE models trained with it.
        self.router_loss = None
        if backbone.is_moe and routing == "superclass" and superclass_ids:
            self.router_loss = SuperclassRouterLoss(superclass_ids)
            self.router_loss_tracker = keras.metrics.Mean(name="router_loss")
            self.router_accuracy = keras.metrics.CategoricalAccuracy(
                name="router_accuracy"
            )

    def call(self, inputs, training=None, mask=None):
        outputs = super().call(inputs, training=training, mask=mask)
        if isinstance(outputs, dict) and not training:
            return outputs["logits"]
        return outputs

    def compute_output_spec(self, inputs, training=None, mask=None):
        spec = super().compute_output_spec(inputs, training=training, mask=mask)
        if isinstance(spec, dict) and not training:
            return spec["logits"]
        return spec

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        if not isinstance(y_pred, dict):
            return super().compute_loss(
                x, y, y_pred, sample_weight, training=training
            )
        loss = super().compute_loss(
            x, y, y_pred["logits"], sample_weight, training=training
        )
        if self.routing == "learned" or y is None:
            return loss
        if self.router_loss is None:
            raise ValueError(
                "This MobileVMoE model uses routing='superclass' but has no "
                "superclass_ids, so its router cannot be trained. Pass "
                "superclass_ids=[one expert id per class] (e.g. CIFAR-100's "
                "coarse labels) or routing='learned'."
            )
        router_logits = y_pred["router_logits"]
        router_loss = self.router_loss(y, router_logits)
        self.router_loss_tracker.update_state(router_loss)
        # The super-class distribution of each label (one-hot for an integer
        # or one-hot label; a Mixup/CutMix mixture's argmax otherwise).
        self.router_accuracy.update_state(
            self.router_loss.superclass_targets(y, router_logits.shape[-1]),
            router_logits,
        )
        return loss + ops.cast(self.router_loss_weight, loss.dtype) * ops.cast(
            router_loss, loss.dtype
        )

    @property
    def loss_metrics(self):
        """The metrics `compute_loss` updates (router loss and accuracy);
        empty without a router loss."""
        if self.router_loss is None:
            return []
        return [self.router_loss_tracker, self.router_accuracy]

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if isinstance(y_pred, dict):
            return super().compute_metrics(
                x, y, y_pred["logits"], sample_weight
            )
        # Outside training the model returns no router logits, so the router
        # metrics were not updated: leave them out instead of reporting 0.
        results = super().compute_metrics(x, y, y_pred, sample_weight)
        return {
            name: value
            for name, value in results.items()
            if name not in ("router_loss", "router_accuracy")
        }

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "superclass_ids": self.superclass_ids,
                "routing": self.routing,
                "router_loss_weight": self.router_loss_weight,
            }
        )
        return config


families.register(MobileVMoEImageClassifier)
MobileVMoE = MobileVMoEImageClassifier
