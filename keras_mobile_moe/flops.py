"""Analytic forward FLOPs of the model families, one image, sparse-aware.

Convention (Daxberger et al. 2023, Fig. 3a): the forward pass of ONE image,
one multiply-add = 2 FLOPs, and an MoE layer counts only the `top_k` experts
that the image runs. Element-wise work (bias adds, layer norms, GELU, softmax,
residual adds) is counted per element at the rates of XLA's cost model: the
paper's numbers are those of XLA's cost analysis of a ViT with tanh-GELU
(12x192 = 618M, 6x64 = 54M), which this count reproduces to 0.5%.
"""

import numpy as np

from keras_mobile_moe import families

# FLOPs per element of the element-wise operations (XLA's cost model).
LAYER_NORM = 6
GELU_TANH = 8
SOFTMAX = 4
# Per (choice, slot) pair: the compare, select and max that find the token
# of every expert slot in `TokenRoutedMoE` (measured against XLA).
ROUTING_BOOKKEEPING = 3


def transformer_block_flops(
    num_tokens, hidden_dim, num_heads, mlp_dim, mlp_copies=1
):
    """FLOPs of one pre-norm transformer block for one image.

    Args:
        num_tokens: int. Tokens per image.
        hidden_dim: int. Token width.
        num_heads: int. Attention heads.
        mlp_dim: int. MLP hidden width.
        mlp_copies: int. MLPs each token runs (top_k in an MoE block).

    Returns:
        A dict with `"attention"` and `"mlp"` FLOPs (norms and residual adds
        included in their branch).
    """
    n, d, h = num_tokens, hidden_dim, mlp_dim
    attention = (
        LAYER_NORM * n * d
        + 4 * (2 * n * d * d + n * d)  # q, k, v, output projections + bias
        + n * d  # query scaling
        + 2 * (2 * n * n * d)  # q @ k^T and attention @ v
        + SOFTMAX * num_heads * n * n
        + n * d  # residual
    )
    one_mlp = n * expert_mlp_flops_per_token(d, h)
    mlp = LAYER_NORM * n * d + mlp_copies * one_mlp + n * d  # + residual
    return {"attention": attention, "mlp": mlp}


def expert_mlp_flops_per_token(hidden_dim, mlp_dim):
    """FLOPs of one MLP (or expert) pass for one token (or expert slot).

    Args:
        hidden_dim: int. Token width D.
        mlp_dim: int. MLP hidden width H.

    Returns:
        int. `2DH + H` (in-projection, bias) `+ 8H` (tanh-GELU)
        `+ 2HD + D` (out-projection, bias).

    Example:

    >>> expert_mlp_flops_per_token(32, 64)
    8800
    """
    d, h = hidden_dim, mlp_dim
    return 2 * d * h + h + GELU_TANH * h + 2 * h * d + d


def token_routed_moe_flops(
    num_tokens, hidden_dim, mlp_dim, num_experts, top_k=1, capacity_factor=1.0
):
    """FLOPs of one `TokenRoutedMoE` layer for one image (one group).

    The router (a linear layer without bias to E logits, the softmax and
    the top-k, counted per element), the experts at the realised capacity
    (`E * C` slots, each one expert-MLP pass, filled or not: that is what
    runs) and the gate-weighted combination of a token's k results. The
    dispatch and combine are gathers (0 FLOPs); the slot bookkeeping
    (positions by cumulative sum, the slot-to-token table) is integer work
    of size `k * N * E * C` that XLA counts as well.

    Args:
        num_tokens: int. Tokens per image N.
        hidden_dim: int. Token width D.
        mlp_dim: int. Hidden width of every expert H.
        num_experts: int. Experts E.
        top_k: int. Experts per token k.
        capacity_factor: float. See `TokenRoutedMoE`.

    Returns:
        A dict with `"router"` (router and slot bookkeeping) and
        `"experts"` (expert MLPs and combine) FLOPs.

    Example:

    >>> parts = token_routed_moe_flops(17, 32, 64, 4)  # C = 5
    >>> parts["experts"] == 4 * 5 * 8800 + 17 * 32
    True
    """
    from keras_mobile_moe.layers.token_routed_moe import expert_capacity

    n, d, e, k = num_tokens, hidden_dim, num_experts, top_k
    capacity = expert_capacity(n, e, k, capacity_factor)
    router = (
        2 * n * d * e  # logits
        + SOFTMAX * n * e  # float32 softmax
        + n * e * k  # top-k selection
        + ROUTING_BOOKKEEPING * k * n * e * capacity  # slot of each token
    )
    experts = (
        e * capacity * expert_mlp_flops_per_token(d, mlp_dim)
        + (2 * k - 1) * n * d  # gate scaling and the sum over the k experts
    )
    return {"router": router, "experts": experts}


def mobile_vmoe_flops(backbone, num_classes=0):
    """Per-part FLOPs of a `MobileVMoEBackbone` (plus a linear head).

    Args:
        backbone: a `MobileVMoEBackbone`.
        num_classes: int. Width of the linear head (0 for the backbone alone).

    With `router_type="token"`, `router` is the sum of the per-token
    routers of all MoE blocks and `mlp` counts their experts at the
    realised capacity (see `token_routed_moe_flops`).

    Returns:
        A dict of FLOPs per part: `patch_embedding`, `attention`, `mlp`,
        `router`, `head`.
    """
    height, width, channels = backbone.image_shape
    patch = backbone.patch_size
    num_patches = (height // patch) * (width // patch)
    num_tokens = num_patches + int(backbone.use_class_token)
    d = backbone.hidden_dim
    experts = backbone.num_experts
    token_routed = backbone.is_moe and backbone.router_type == "token"
    router = 0
    if backbone.is_moe and not token_routed:
        pooling = num_tokens * d if backbone.router_pooling == "mean" else 0
        router = (
            pooling
            + LAYER_NORM * d
            + 2 * d * experts
            + experts
            + SOFTMAX * experts
        )
    parts = {
        "patch_embedding": 2 * num_patches * patch * patch * channels * d
        + num_patches * d  # bias
        + num_tokens * d,  # position embedding
        "attention": 0,
        "mlp": 0,
        "router": router,
        "head": LAYER_NORM * num_tokens * d  # final norm
        + (2 * d * num_classes + num_classes if num_classes else 0),
    }
    num_dense = backbone.num_layers - backbone.num_moe_layers
    for i in range(backbone.num_layers):
        is_moe = i >= num_dense
        if is_moe and token_routed:
            block = transformer_block_flops(
                num_tokens,
                d,
                backbone.num_heads,
                backbone.mlp_dims[i],
                mlp_copies=0,
            )
            moe = token_routed_moe_flops(
                num_tokens,
                d,
                backbone.mlp_dims[i],
                experts,
                backbone.top_k,
                backbone.capacity_factor,
            )
            parts["attention"] += block["attention"]
            parts["mlp"] += block["mlp"] + moe["experts"]
            parts["router"] += moe["router"]
            continue
        block = transformer_block_flops(
            num_tokens,
            d,
            backbone.num_heads,
            backbone.mlp_dims[i],
            mlp_copies=backbone.top_k if is_moe else 1,
        )
        parts["attention"] += block["attention"]
        parts["mlp"] += block["mlp"]
        if is_moe:  # gate scaling and the sum over the k experts
            parts["mlp"] += (2 * backbone.top_k - 1) * num_tokens * d
    return parts


def nested_block_flops(token_counts, widths, num_heads, mlp_dim):
    """FLOPs of one `NestedExpertBlock` (MoNE) for one image.

    Linear layers scale with the width d_j of each token's nested expert
    (Q, K, V read d_j features and write the full width; the attention and
    MLP out-projections write d_j; the MLP in-projection reads d_j and
    writes the full hidden width); layer norms run over d_j features; the
    N^2 attention stays full width. Residual adds and the MLP scaling
    `(alpha * r + 1)` are full width (the updates are zero-padded).

    Args:
        token_counts: tokens per nested expert, smallest first.
        widths: width d_j of every nested expert, smallest first (the last
            one is the full width D).
        num_heads: int. Attention heads.
        mlp_dim: int. MLP hidden width.

    Returns:
        A dict with `"attention"` and `"mlp"` FLOPs.

    Example:

    >>> full = nested_block_flops([0, 0, 0, 10], [4, 8, 16, 32], 2, 64)
    >>> dense = transformer_block_flops(10, 32, 2, 64)
    >>> full["attention"] == dense["attention"]
    True
    """
    n, d, h = sum(token_counts), widths[-1], mlp_dim
    # sum over tokens of their width: what every sliced matmul scales with
    nd = sum(count * width for count, width in zip(token_counts, widths))
    attention = (
        LAYER_NORM * nd
        + 3 * (2 * nd * d + n * d)  # q, k, v in-projections + bias
        + 2 * nd * d
        + nd  # output out-projection + bias
        + n * d  # query scaling
        + 2 * (2 * n * n * d)  # q @ k^T and attention @ v
        + SOFTMAX * num_heads * n * n
        + n * d  # residual
    )
    mlp = (
        LAYER_NORM * nd
        + 2 * nd * h
        + n * h  # in-projection + bias
        + GELU_TANH * n * h
        + 2 * nd * h
        + nd  # out-projection + bias
        + 2 * n
        + n * d  # (alpha * r + 1) and its product
        + n * d  # residual
    )
    return {"attention": attention, "mlp": mlp}


def mone_flops(backbone, num_classes=0, capacity_budget=None):
    """Per-part FLOPs of a `MoNEBackbone` (plus its pooling and a linear
    head) at its capacity budget or at `capacity_budget`.

    A class token (`use_class_token=True`) runs every block at the full
    width; the head then reads it (no mean).

    Args:
        backbone: a `MoNEBackbone`.
        num_classes: int. Width of the linear head (0 for the backbone alone).
        capacity_budget: float or None (the backbone's budget).

    Returns:
        A dict of FLOPs per part: `patch_embedding`, `router`, `attention`,
        `mlp`, `head`.
    """
    height, width, channels = backbone.image_shape
    patch = backbone.patch_size
    n = backbone.num_tokens  # routed patches
    class_tokens = int(backbone.use_class_token)
    tokens = n + class_tokens
    d = backbone.hidden_dim
    experts = backbone.num_nested_experts
    counts = list(backbone.token_counts(capacity_budget))
    counts[-1] += class_tokens
    block = nested_block_flops(
        counts, backbone.expert_widths, backbone.num_heads, backbone.mlp_dim
    )
    head = LAYER_NORM * tokens * d  # final norm
    if num_classes:
        pooling = 0 if class_tokens else n * d  # the class token, or a mean
        head += pooling + 2 * d * num_classes + num_classes
    return {
        "patch_embedding": 2 * n * patch * patch * channels * d
        + n * d  # bias
        + tokens * d,  # position embedding
        "router": 2 * n * d * experts + n * experts + SOFTMAX * n * experts,
        "attention": backbone.num_layers * block["attention"],
        "mlp": backbone.num_layers * block["mlp"],
        "head": head,
    }


def flops_breakdown(model):
    """Per-part forward FLOPs of one image for a model or backbone.

    Args:
        model: a `MobileVMoEImageClassifier`, `MobileVMoEBackbone`,
            `MoNEImageClassifier` or `MoNEBackbone`.

    Returns:
        A dict of FLOPs per part of the model.

    Example:

    >>> import keras_mobile_moe as kmm
    >>> model = kmm.MobileVMoE.from_preset("6x64", load_weights=False)
    >>> sorted(flops_breakdown(model))
    ['attention', 'head', 'mlp', 'patch_embedding', 'router']
    """
    backbone = getattr(model, "backbone", None) or model
    num_classes = (
        getattr(model, "num_classes", 0) if model is not backbone else 0
    )
    if families.of(backbone) is not None:
        # Each family declares its own count (`flops_breakdown`).
        return backbone.flops_breakdown(num_classes)
    raise ValueError(
        f"count_flops does not know models of type {type(model).__name__}. "
        f"Accepted: {families.accepted_models()}."
    )


def count_flops(model):
    """Forward FLOPs of one image, counting only the experts that run.

    One multiply-add = 2 FLOPs (the paper's convention). For a Mobile V-MoE
    with k = 1 this equals the dense ViT of the same scale plus the router.

    For a Mobile V-MoE with `router_type="token"` (per-token routing,
    paper Fig. 3e), each MoE layer counts its router (`2 N D E` plus the
    softmax, top-k and slot bookkeeping per element) and its experts at
    the realised capacity: `E * C` expert-MLP slot passes, with
    `C = ceil(capacity_factor * top_k * N / E)` (see
    `token_routed_moe_flops`).

    For MoNE, at the model's current `capacity_budget`: linear layers
    count each token at the width of its nested expert.

    Args:
        model: a `MobileVMoEImageClassifier`, `MobileVMoEBackbone`,
            `MoNEImageClassifier` or `MoNEBackbone`.

    Returns:
        int. FLOPs of one forward pass for one image.

    Example:

    >>> import keras_mobile_moe as kmm
    >>> model = kmm.MobileVMoE.from_preset("tiny_e10", load_weights=False)
    >>> round(count_flops(model) / 1e6)
    619
    """
    return int(sum(flops_breakdown(model).values()))


def activated_params(model):
    """Parameters that one image can use (the paper's "activated
    parameters per image", Daxberger et al. 2023, Fig. 3e).

    Definition. A dense model: all parameters. Per-image routing
    (`router_type="image"`): all parameters except the `E - top_k` experts
    per MoE block that the image does not run. Per-token routing
    (`router_type="token"`): all parameters except the experts that no
    token of the image can reach; as every expert has at least one slot
    and an image makes `top_k * N` expert choices, `min(E, top_k * N)`
    experts per MoE block can receive its tokens (all E at any practical
    size), so the count is all parameters. Routers, attention, embeddings
    and the head (of a classifier) always count. On DeiT-Ti/16 (12x192,
    patch 16, E=10, L=2, 1000 classes) this gives the paper's 11.05M for
    per-token routing, and its 6.31M for per-image routing with two
    experts per image.

    MoNE (`MoNEImageClassifier`, `MoNEBackbone`; Jain et al. 2024): the
    parameters that the tokens of one image touch at the model's current
    `capacity_budget`. A token of a nested expert of width w reads the
    first w rows of the Q, K, V and MLP in-projection kernels and writes
    the first w columns (and bias entries) of the attention and MLP
    out-projections, over the first w features of both layer norms; so
    a block's unused parameters are `(D - W) * (4 D + 2 mlp_dim + 6)`,
    where W is the widest expert that receives at least one token. That
    is the full model whenever the largest expert gets a token (any
    budget above the smallest one, at practical sizes).

    Args:
        model: a `MobileVMoEImageClassifier`, `MobileVMoEBackbone`,
            `MoNEImageClassifier` or `MoNEBackbone`.

    Returns:
        int. Activated parameters per image.

    Example:

    >>> import keras_mobile_moe as kmm
    >>> image = kmm.MobileVMoEBackbone.from_preset(
    ...     "tiny_e10", load_weights=False)
    >>> token = kmm.MobileVMoEBackbone.from_preset(
    ...     "tiny_e10", load_weights=False, router_type="token")
    >>> round(activated_params(image) / 1e6, 2), round(
    ...     activated_params(token) / 1e6, 2)
    (5.94, 11.27)
    >>> mone = kmm.MoNE.from_preset("6x64_mone", load_weights=False)
    >>> activated_params(mone) == mone.count_params()  # budget 0.5
    True
    >>> mone.capacity_budget = 0.125  # every token on the D/8 expert
    >>> # 6 blocks x (64 - 8) x (4 * 64 + 2 * 256 + 6) parameters unused:
    >>> mone.count_params() - activated_params(mone)
    260064
    """
    backbone = getattr(model, "backbone", None) or model
    if families.of(backbone) is None:
        raise ValueError(
            "activated_params does not know models of type "
            f"{type(model).__name__}. Accepted: {families.accepted_models()}."
        )
    # Each family declares what one image leaves unused.
    return int(model.count_params() - backbone.unused_params_per_image())


def mone_unused_params(backbone):
    """Parameters of a `MoNEBackbone` that no token of an image touches at
    its current `capacity_budget`: `(D - W) * (4 D + 2 mlp_dim + 6)` per
    block, W the widest expert that receives a token (see
    `activated_params`)."""
    if backbone.use_class_token:
        return 0  # the class token runs at the full width
    widest = max(
        width
        for count, width in zip(backbone.token_counts(), backbone.expert_widths)
        if count > 0
    )
    d, h = backbone.hidden_dim, backbone.mlp_dim
    return backbone.num_layers * (d - widest) * (4 * d + 2 * h + 6)


def mobile_vmoe_unused_params(backbone):
    """Parameters of a `MobileVMoEBackbone` in the experts one image cannot
    reach: `E - top_k` per MoE block with per-image routing, `E - min(E,
    top_k * N)` with per-token routing, none for a dense model (see
    `activated_params`)."""
    if not backbone.is_moe:
        return 0
    height, width, _ = backbone.image_shape
    patch = backbone.patch_size
    num_tokens = (height // patch) * (width // patch) + int(
        backbone.use_class_token
    )
    experts, top_k = backbone.num_experts, backbone.top_k
    if backbone.router_type == "token":
        reachable = min(experts, top_k * num_tokens)
    else:
        reachable = top_k
    unused = 0
    for block in backbone.encoder_blocks:
        if block.is_moe:
            moe = block.mlp
            per_expert = sum(
                int(np.prod(w.shape[1:]))
                for w in (
                    moe.kernel_in,
                    moe.bias_in,
                    moe.kernel_out,
                    moe.bias_out,
                )
            )
            unused += (experts - reachable) * per_expert
    return unused
