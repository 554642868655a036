"""The dense ViT that a foreign checkpoint is converted into, and how it is
put into a `MobileVMoEBackbone` / `MobileVMoEImageClassifier`.

A converter (timm, keras-hub) reads its checkpoint into a `DenseViT`: the
architecture (`spec`, `MobileVMoEBackbone` arguments), the head and the
preprocessing, and every tensor in this package's layout (`weights`, numpy
arrays named as below). Everything is checked before any model is built, so
a bad checkpoint loads nothing.

Weight names (D = hidden_dim, H = heads, M = mlp_dim, p = patch, C = channels,
N = tokens):

- `patch_kernel` `[p, p, C, D]`, `patch_bias` `[D]`, `class_token`
  `[1, 1, D]`, `position_embedding` `[1, N, D]` (class token first);
- per block `blocks.{i}.`: `attention_norm.gamma/beta` `[D]`,
  `query/key/value.kernel` `[D, H, D/H]`, `query/key/value.bias`
  `[H, D/H]`, `attention_output.kernel` `[H, D/H, D]`,
  `attention_output.bias` `[D]`, `mlp_norm.gamma/beta` `[D]`,
  `mlp_in.kernel` `[D, M]`, `mlp_in.bias` `[M]`, `mlp_out.kernel` `[M, D]`,
  `mlp_out.bias` `[D]`;
- `final_norm.gamma/beta` `[D]`; `head.kernel` `[D, classes]`, `head.bias`.
"""

import math

import numpy as np

# Backbone arguments that fix the shapes or the function of the converted
# weights; with load_weights=True they cannot be overridden.
ARCHITECTURE_ARGUMENTS = (
    "patch_size",
    "num_layers",
    "hidden_dim",
    "num_heads",
    "mlp_dim",
    "use_class_token",
    "layer_norm_epsilon",
    "mlp_activation",
)
# Arguments that turn the converted dense ViT into a Mobile V-MoE
# (`kmm.upcycle`).
UPCYCLE_ARGUMENTS = (
    "num_experts",
    "num_moe_layers",
    "top_k",
    "normalize_gates",
    "router_pooling",
)


class DenseViT:
    """A converted dense ViT checkpoint.

    Args:
        spec: dict of `MobileVMoEBackbone` arguments (a dense ViT).
        weights: dict of numpy arrays (names in the module docstring), or
            None when only the architecture was read.
        num_classes: int. Classes of the checkpoint's head (0: no head).
        pooling: `"token"` or `"avg"` (classifier pooling).
        preprocessing: dict with `image_size` (height, width), `mean`,
            `std` (per channel, for pixels in [0, 1]) and `interpolation`.
        source: str. What the checkpoint is, for messages.
    """

    def __init__(
        self, spec, weights, num_classes, pooling, preprocessing, source
    ):
        self.spec = spec
        self.weights = weights
        self.num_classes = num_classes
        self.pooling = pooling
        self.preprocessing = preprocessing
        self.source = source


def expected_shapes(spec, num_classes):
    """The shape of every weight of a dense ViT with `spec`."""
    d, h = spec["hidden_dim"], spec["num_heads"]
    p, m = spec["patch_size"], spec["mlp_dim"]
    height, width, channels = spec["image_shape"]
    tokens = (height // p) * (width // p) + int(spec["use_class_token"])
    shapes = {
        "patch_kernel": (p, p, channels, d),
        "patch_bias": (d,),
        "position_embedding": (1, tokens, d),
        "final_norm.gamma": (d,),
        "final_norm.beta": (d,),
    }
    if spec["use_class_token"]:
        shapes["class_token"] = (1, 1, d)
    for i in range(spec["num_layers"]):
        b = f"blocks.{i}."
        for norm in ("attention_norm", "mlp_norm"):
            shapes[b + norm + ".gamma"] = (d,)
            shapes[b + norm + ".beta"] = (d,)
        for name in ("query", "key", "value"):
            shapes[b + name + ".kernel"] = (d, h, d // h)
            shapes[b + name + ".bias"] = (h, d // h)
        shapes[b + "attention_output.kernel"] = (h, d // h, d)
        shapes[b + "attention_output.bias"] = (d,)
        shapes[b + "mlp_in.kernel"] = (d, m)
        shapes[b + "mlp_in.bias"] = (m,)
        shapes[b + "mlp_out.kernel"] = (m, d)
        shapes[b + "mlp_out.bias"] = (d,)
    if num_classes:
        shapes["head.kernel"] = (d, num_classes)
        shapes["head.bias"] = (num_classes,)
    return shapes


def _cubic(x, a=-0.5):
    # The bicubic kernel of PIL and of torch's antialiased interpolation.
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


def _resample_matrix(in_size, out_size):
    """`[out, in]` weights of antialiased bicubic resampling along one axis
    (half-pixel centres), as `torch.nn.functional.interpolate(...,
    mode="bicubic", antialias=True, align_corners=False)` computes them."""
    scale = in_size / out_size
    support_scale = max(scale, 1.0)
    support = 2.0 * support_scale
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        start = max(int(center - support + 0.5), 0)
        stop = min(int(center + support + 0.5), in_size)
        weights = np.array(
            [
                _cubic((j - center + 0.5) / support_scale)
                for j in range(start, stop)
            ]
        )
        total = weights.sum()
        if total != 0.0:
            weights = weights / total
        matrix[i, start:stop] = weights
    return matrix


def resample_position_embedding(position_embedding, old_grid, new_grid, prefix):
    """Resizes a learned position embedding to another patch grid.

    The class token's embedding (the first `prefix` rows) is kept; the
    patch grid is resized with antialiased bicubic interpolation, as timm's
    `resample_abs_pos_embed` does when a checkpoint is used at another
    image size.

    Args:
        position_embedding: `[1, prefix + H * W, D]` array.
        old_grid: (H, W) of the checkpoint.
        new_grid: (H', W') wanted.
        prefix: int. Tokens before the patches (1 with a class token).

    Returns:
        `[1, prefix + H' * W', D]` float32 array.

    Example:

    >>> pe = np.random.rand(1, 1 + 4, 8).astype("float32")
    >>> resample_position_embedding(pe, (2, 2), (3, 3), 1).shape
    (1, 10, 8)
    """
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid == new_grid:
        return position_embedding
    dim = position_embedding.shape[-1]
    head = position_embedding[:, :prefix]
    grid = position_embedding[0, prefix:].astype(np.float64)
    grid = grid.reshape(old_grid[0], old_grid[1], dim)
    rows = _resample_matrix(old_grid[0], new_grid[0])
    cols = _resample_matrix(old_grid[1], new_grid[1])
    grid = np.einsum("ih,hwd->iwd", rows, grid)
    grid = np.einsum("jw,iwd->ijd", cols, grid)
    grid = grid.reshape(1, new_grid[0] * new_grid[1], dim)
    return np.concatenate([head, grid.astype(np.float32)], axis=1)


def check_shapes(found, expected, source):
    """Raises unless `found` (name -> shape) is exactly `expected`."""
    missing = sorted(set(expected) - set(found))
    wrong = sorted(
        k
        for k in set(found) & set(expected)
        if tuple(found[k]) != tuple(expected[k])
    )
    if missing or wrong:
        details = [f"{k} missing" for k in missing[:4]]
        details += [
            f"{k}: shape {tuple(found[k])}, expected {tuple(expected[k])}"
            for k in wrong[:4]
        ]
        raise ValueError(
            f"{source}: the checkpoint does not match the architecture its "
            f"config describes ({len(missing)} tensors missing, {len(wrong)} "
            f"with another shape: {'; '.join(details)}). Nothing was loaded."
        )


def _assign(variable, value, name):
    if tuple(variable.shape) != tuple(value.shape):
        raise ValueError(
            f"Cannot load {name}: shape {tuple(value.shape)} into a variable "
            f"of shape {tuple(variable.shape)}."
        )
    variable.assign(np.asarray(value, dtype="float32"))


def _assign_embedding_and_final_norm(backbone, weights):
    embed = backbone.patch_embedding
    _assign(embed.projection.kernel, weights["patch_kernel"], "patch_kernel")
    _assign(embed.projection.bias, weights["patch_bias"], "patch_bias")
    if backbone.use_class_token:
        _assign(embed.class_token, weights["class_token"], "class_token")
    _assign(
        embed.position_embedding,
        weights["position_embedding"],
        "position_embedding",
    )
    _assign(
        backbone.final_norm.gamma, weights["final_norm.gamma"], "final_norm"
    )
    _assign(backbone.final_norm.beta, weights["final_norm.beta"], "final_norm")


def assign_backbone(backbone, weights):
    """Copies the dense ViT `weights` into a dense `MobileVMoEBackbone`."""
    _assign_embedding_and_final_norm(backbone, weights)
    for i, block in enumerate(backbone.encoder_blocks):
        b = f"blocks.{i}."
        for norm_name in ("attention_norm", "mlp_norm"):
            norm = getattr(block, norm_name)
            _assign(
                norm.gamma, weights[b + norm_name + ".gamma"], b + norm_name
            )
            _assign(norm.beta, weights[b + norm_name + ".beta"], b + norm_name)
        attention = block.attention
        for name, dense in (
            ("query", attention.query_dense),
            ("key", attention.key_dense),
            ("value", attention.value_dense),
            ("attention_output", attention.output_dense),
        ):
            _assign(dense.kernel, weights[b + name + ".kernel"], b + name)
            _assign(dense.bias, weights[b + name + ".bias"], b + name)
        _assign(
            block.mlp.dense_in.kernel,
            weights[b + "mlp_in.kernel"],
            b + "mlp_in",
        )
        _assign(
            block.mlp.dense_in.bias, weights[b + "mlp_in.bias"], b + "mlp_in"
        )
        _assign(
            block.mlp.dense_out.kernel,
            weights[b + "mlp_out.kernel"],
            b + "mlp_out",
        )
        _assign(
            block.mlp.dense_out.bias, weights[b + "mlp_out.bias"], b + "mlp_out"
        )


def assign_mone_backbone(backbone, weights):
    """Copies the dense ViT `weights` into a `MoNEBackbone` (with
    `use_class_token` as the checkpoint). Every nested expert is a slice of
    these weights; the router keeps its initialisation and every block's
    `alpha` is set to 0, so at `capacity_budget=1.0` the backbone computes
    the dense ViT."""
    _assign_embedding_and_final_norm(backbone, weights)
    d = backbone.hidden_dim
    for i, block in enumerate(backbone.encoder_blocks):
        b = f"blocks.{i}."
        # [D, H, D/H] heads are [D, D] columns; [H, D/H, D] rows.
        for name in ("query", "key", "value", "attention_output"):
            kernel = weights[b + name + ".kernel"].reshape(d, d)
            _assign(getattr(block, f"{name}_kernel"), kernel, b + name)
            bias = weights[b + name + ".bias"].reshape(d)
            _assign(getattr(block, f"{name}_bias"), bias, b + name)
        for name, parts in (
            ("attention_norm", ("gamma", "beta")),
            ("mlp_norm", ("gamma", "beta")),
            ("mlp_in", ("kernel", "bias")),
            ("mlp_out", ("kernel", "bias")),
        ):
            for part in parts:
                variable = getattr(block, f"{name}_{part}")
                _assign(variable, weights[f"{b}{name}.{part}"], b + name)
        block.alpha.assign(0.0)


def converter_arguments(preprocessing):
    """`ImageConverter` arguments reproducing a checkpoint's preprocessing:
    resize to its input size with its interpolation, then `(x / 255 - mean)
    / std` per channel (as `x * scale + offset`)."""
    mean, std = preprocessing["mean"], preprocessing["std"]
    return {
        "image_size": tuple(preprocessing["image_size"]),
        "scale": [1.0 / (255.0 * s) for s in std],
        "offset": [-m / s for m, s in zip(mean, std)],
        "interpolation": preprocessing["interpolation"],
    }


def check_positive_int(value, field, source):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"{source}: {field}={value!r}. Expected a non-negative int."
        )
    return value


def grid_of(image_shape, patch_size):
    return (image_shape[0] // patch_size, image_shape[1] // patch_size)


def isclose(a, b):
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
