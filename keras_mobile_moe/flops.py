"""Analytic forward FLOPs of the model families, one image, sparse-aware.

Convention (Daxberger et al. 2023, Fig. 3a): forward pass of ONE image, one
multiply-add = 2 FLOPs, counting the matrix products (patch embedding,
attention projections, attention scores and weighted sum, MLPs, router,
head), of which an MoE layer runs only the `top_k` experts of the image.
Element-wise work (norms, activations, softmax, residual adds) is left out;
it is under 3% of the total for the paper's scales.
"""


def transformer_block_flops(num_tokens, hidden_dim, mlp_dim, mlp_copies=1):
    """FLOPs of one pre-norm transformer block for one image.

    Args:
        num_tokens: int. Tokens per image.
        hidden_dim: int. Token width.
        mlp_dim: int. MLP hidden width.
        mlp_copies: int. MLPs each token runs (top_k in an MoE block).

    Returns:
        A dict with `"attention"` and `"mlp"` FLOPs.
    """
    n, d = num_tokens, hidden_dim
    projections = 4 * 2 * n * d * d  # query, key, value, output
    scores_and_mix = 2 * 2 * n * n * d  # q @ k^T and attention @ v
    mlp = mlp_copies * 2 * 2 * n * d * mlp_dim
    return {"attention": projections + scores_and_mix, "mlp": mlp}


def mobile_vmoe_flops(backbone, num_classes=0):
    """Per-part FLOPs of a `MobileVMoEBackbone` (plus a linear head).

    Args:
        backbone: a `MobileVMoEBackbone`.
        num_classes: int. Width of the linear head (0 for the backbone alone).

    Returns:
        A dict of FLOPs per part: `patch_embedding`, `attention`, `mlp`,
        `router`, `head`.
    """
    height, width, channels = backbone.image_shape
    patch = backbone.patch_size
    num_patches = (height // patch) * (width // patch)
    num_tokens = num_patches + int(backbone.use_class_token)
    d = backbone.hidden_dim
    parts = {
        "patch_embedding": 2 * num_patches * patch * patch * channels * d,
        "attention": 0,
        "mlp": 0,
        "router": 2 * d * backbone.num_experts if backbone.is_moe else 0,
        "head": 2 * d * num_classes,
    }
    num_dense = backbone.num_layers - backbone.num_moe_layers
    for i in range(backbone.num_layers):
        copies = backbone.top_k if i >= num_dense else 1
        block = transformer_block_flops(num_tokens, d, backbone.mlp_dim, copies)
        parts["attention"] += block["attention"]
        parts["mlp"] += block["mlp"]
    return parts


def flops_breakdown(model):
    """Per-part forward FLOPs of one image for a model or backbone.

    Args:
        model: a `MobileVMoEImageClassifier` or `MobileVMoEBackbone`.

    Returns:
        A dict of FLOPs per part of the model.

    Example:

    >>> import keras_mobile_moe as kmm
    >>> model = kmm.MobileVMoE.from_preset("6x64", load_weights=False)
    >>> sorted(flops_breakdown(model))
    ['attention', 'head', 'mlp', 'patch_embedding', 'router']
    """
    from keras_mobile_moe.models.mobile_vmoe.mobile_vmoe_backbone import (
        MobileVMoEBackbone,
    )

    backbone = getattr(model, "backbone", None) or model
    if isinstance(backbone, MobileVMoEBackbone):
        num_classes = getattr(model, "num_classes", 0) if model is not backbone else 0
        return mobile_vmoe_flops(backbone, num_classes)
    raise ValueError(
        f"count_flops does not know models of type {type(model).__name__}. "
        "Accepted: MobileVMoEImageClassifier, MobileVMoEBackbone."
    )


def count_flops(model):
    """Forward FLOPs of one image, counting only the experts that run.

    One multiply-add = 2 FLOPs (the paper's convention). For a Mobile V-MoE
    with k = 1 this equals the dense ViT of the same scale plus the router.

    Args:
        model: a `MobileVMoEImageClassifier` or `MobileVMoEBackbone`.

    Returns:
        int. FLOPs of one forward pass for one image.

    Example:

    >>> import keras_mobile_moe as kmm
    >>> model = kmm.MobileVMoE.from_preset("tiny_e10", load_weights=False)
    >>> round(count_flops(model) / 1e6)
    612
    """
    return int(sum(flops_breakdown(model).values()))
