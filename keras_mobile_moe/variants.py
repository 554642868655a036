"""The one table of model scales, shared by presets, training and FLOPs.

Source: Daxberger et al., "Mobile V-MoEs: Scaling Down Vision Transformers via
Sparse Mixture-of-Experts", arXiv 2309.04354 (2023), Fig. 3a: layers
{12, 9, 6} x width {384, 192, 96, 64}; heads 6, 3, 3, 2 for the four widths;
MLP hidden size 4 x width; 224x224 input cut into 32x32 patches.
"""

IMAGE_SHAPE = (224, 224, 3)
PATCH_SIZE = 32
HEADS_BY_WIDTH = {384: 6, 192: 3, 96: 3, 64: 2}
LAYER_COUNTS = (12, 9, 6)

# Scale name ("{layers}x{width}") -> backbone arguments.
VARIANTS = {
    f"{layers}x{width}": {
        "image_shape": IMAGE_SHAPE,
        "patch_size": PATCH_SIZE,
        "num_layers": layers,
        "hidden_dim": width,
        "num_heads": heads,
        "mlp_dim": 4 * width,
    }
    for width, heads in HEADS_BY_WIDTH.items()
    for layers in LAYER_COUNTS
}

# Friendly names used by DeiT and the paper.
ALIASES = {"tiny": "12x192", "small": "12x384"}


def get_variant(name):
    """Returns the backbone arguments of a scale such as `"12x192"` or `"tiny"`.

    Args:
        name: str. A scale name from `VARIANTS` or an alias from `ALIASES`.

    Returns:
        A new dict of backbone arguments.

    Example:

    >>> get_variant("tiny")["hidden_dim"]
    192
    """
    key = ALIASES.get(name, name)
    if key not in VARIANTS:
        raise ValueError(
            f"Unknown model scale: name={name!r}. Accepted: "
            f"{sorted(VARIANTS) + sorted(ALIASES)}."
        )
    return dict(VARIANTS[key])
