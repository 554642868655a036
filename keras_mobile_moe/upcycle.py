"""Sparse upcycling: a dense ViT becomes a Mobile V-MoE.

Komatsuzaki et al., "Sparse Upcycling: Training Mixture-of-Experts from
Dense Checkpoints", ICLR 2023.
"""

import keras
import numpy as np

from keras_mobile_moe.validation import check_int


def _copy(target, source):
    target.assign(keras.ops.convert_to_numpy(source))


def _copy_layer(target, source):
    for t, s in zip(target.weights, source.weights):
        if tuple(t.shape) != tuple(s.shape):
            raise ValueError(
                f"upcycle: cannot copy {s.path} {tuple(s.shape)} into "
                f"{t.path} {tuple(t.shape)}."
            )
        _copy(t, s)


def upcycle(
    model,
    num_experts=10,
    num_moe_layers=2,
    top_k=1,
    superclass_ids=None,
    normalize_gates=True,
    router_pooling="token",
    routing=None,
):
    """Turns a dense ViT into a Mobile V-MoE whose experts start as copies of
    the dense MLPs (sparse upcycling).

    Komatsuzaki et al., "Sparse Upcycling: Training Mixture-of-Experts from
    Dense Checkpoints", ICLR 2023; the MoE is Mobile V-MoE's (Daxberger et
    al., arXiv 2309.04354): the MLPs of the last `num_moe_layers` blocks
    become `num_experts` experts, every one a copy of that block's dense
    MLP, and one per-image `ImageRouter` (freshly initialised, as in the
    paper) picks `top_k` of them. Every other weight (patch embedding,
    attention, norms, the earlier MLPs, the head) is copied unchanged.

    Output at initialisation: each MoE block computes
    `x + (sum_i g_i / Z) * MLP(LN(x))` with the chosen gates `g_i`, where
    `Z = sum_i g_i` when `normalize_gates=True` and `Z = 1` otherwise,
    because every expert equals the dense `MLP`. Hence:

    - `normalize_gates=True` (default): the upcycled model computes exactly
      the dense model's function, whatever the router says (same logits up
      to float rounding). With `top_k=1` the single gate is then always 1,
      so the router learns only from the super-class router loss: pass
      `superclass_ids` (the paper's recipe), or use `top_k > 1`.
    - `normalize_gates=False`: each MoE block's MLP branch is the dense one
      scaled by the image's summed top-k router probability (`1/E`-ish for
      a fresh router at `top_k=1`), so the outputs differ from the dense
      model's from the first MoE block on; the router then also learns end
      to end through the gates.

    Args:
        model: a dense `MobileVMoEBackbone` or `MobileVMoEImageClassifier`
            (`num_moe_layers=0`).
        num_experts: int >= 1. Experts E per MoE block.
        num_moe_layers: int in [1, num_layers]. MoE blocks at the end.
        top_k: int in [1, num_experts]. Experts per image.
        superclass_ids: classifier only: `num_classes` ints in
            [0, num_experts), the super-class (= expert) of every class,
            or None.
        normalize_gates: bool. See above.
        router_pooling: `"token"` or `"mean"`: what the router reads.
        routing: classifier only: `"superclass"` or `"learned"`; None keeps
            the dense classifier's.

    Returns:
        A new `MobileVMoEBackbone` or `MobileVMoEImageClassifier` (the
        same kind as `model`); `model` is unchanged. A classifier keeps the
        dense one's `weights_source`, so `compile(optimizer="auto")` picks
        the same fine-tuning learning rate for both.

    Example:

    >>> import numpy as np
    >>> import keras_mobile_moe as kmm
    >>> dense = kmm.MobileVMoE(
    ...     kmm.MobileVMoEBackbone(
    ...         image_shape=(32, 32, 3), patch_size=8, num_layers=3,
    ...         hidden_dim=16, num_heads=2, mlp_dim=32, num_moe_layers=0),
    ...     num_classes=4)
    >>> moe = kmm.upcycle(dense, num_experts=4, num_moe_layers=2,
    ...                   superclass_ids=[0, 1, 2, 3])
    >>> images = np.random.rand(2, 32, 32, 3).astype("float32")
    >>> moe.backbone.num_experts, moe.backbone.num_moe_layers
    (4, 2)
    >>> bool(np.allclose(moe.predict(images, verbose=0),
    ...                  dense.predict(images, verbose=0), atol=1e-5))
    True
    """
    # The family says whether its dense members upcycle (Mobile V-MoE);
    # asked of the classes, so this module imports no model.
    is_task = hasattr(model, "backbone") and hasattr(model, "num_classes")
    backbone = model.backbone if is_task else model
    if not getattr(type(backbone), "supports_upcycling", False):
        raise ValueError(
            f"upcycle expects a dense MobileVMoEBackbone or MobileVMoE "
            f"classifier. Received: {type(model).__name__}."
        )
    if backbone.num_moe_layers:
        raise ValueError(
            f"upcycle expects a dense model (num_moe_layers=0). Received a "
            f"backbone with num_moe_layers={backbone.num_moe_layers}."
        )
    check_int("num_experts", num_experts, minimum=1)
    check_int(
        "num_moe_layers", num_moe_layers, minimum=1, maximum=backbone.num_layers
    )
    check_int("top_k", top_k, minimum=1, maximum=num_experts)
    if not isinstance(normalize_gates, bool):
        raise ValueError(
            f"Received: normalize_gates={normalize_gates!r}. Expected a bool."
        )
    if not is_task and (superclass_ids is not None or routing is not None):
        raise ValueError(
            "superclass_ids and routing configure a classifier; upcycle "
            "received a backbone. Pass the classifier, or leave them None."
        )

    config = backbone.get_config()
    config.update(
        {
            "num_experts": num_experts,
            "num_moe_layers": num_moe_layers,
            "top_k": top_k,
            "normalize_gates": normalize_gates,
            "router_pooling": router_pooling,
            "router_type": "image",
        }
    )
    config.pop("name", None)
    new_backbone = type(backbone).from_config(config)

    _copy_layer(new_backbone.patch_embedding, backbone.patch_embedding)
    _copy_layer(new_backbone.final_norm, backbone.final_norm)
    for old, new in zip(backbone.encoder_blocks, new_backbone.encoder_blocks):
        _copy_layer(new.attention_norm, old.attention_norm)
        _copy_layer(new.attention, old.attention)
        _copy_layer(new.mlp_norm, old.mlp_norm)
        if not new.is_moe:
            _copy_layer(new.mlp, old.mlp)
            continue
        # Every expert is a copy of the dense MLP.
        for stacked, dense in (
            (new.mlp.kernel_in, old.mlp.dense_in.kernel),
            (new.mlp.bias_in, old.mlp.dense_in.bias),
            (new.mlp.kernel_out, old.mlp.dense_out.kernel),
            (new.mlp.bias_out, old.mlp.dense_out.bias),
        ):
            value = keras.ops.convert_to_numpy(dense)
            stacked.assign(
                np.broadcast_to(value, (num_experts,) + value.shape).copy()
            )
    if not is_task:
        return new_backbone

    preprocessor = model.preprocessor
    if preprocessor is not None:
        preprocessor = preprocessor.__class__.from_config(
            preprocessor.get_config()
        )
    task = model.__class__(
        backbone=new_backbone,
        num_classes=model.num_classes,
        preprocessor=preprocessor,
        pooling=model.pooling,
        dropout=model.dropout,
        activation=model.activation,
        superclass_ids=superclass_ids,
        routing=routing or model.routing,
        router_loss_weight=model.router_loss_weight,
    )
    _copy_layer(task.output_dense, model.output_dense)
    # The experts and the rest are the dense model's weights, so
    # compile(optimizer="auto") fine-tunes at the dense model's rate.
    task.weights_source = getattr(model, "weights_source", "scratch")
    return task
