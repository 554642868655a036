"""Reads timm `VisionTransformer` checkpoints (as timm publishes them on the
Hugging Face Hub: `config.json` + `model.safetensors`).

timm's `config.json` names the architecture (`vit_small_patch32_224`, ...)
and, for checkpoints saved from a model built with other arguments, the
arguments (`model_args`); its `pretrained_cfg` holds the preprocessing
(input size, mean, std, interpolation). The tensors are read with the
`safetensors` library as numpy arrays; a pickle file (`pytorch_model.bin`)
is never opened.

timm's ViT is matched exactly: exact GELU, LayerNorm epsilon 1e-6, the
class token read by the head after the final norm (`global_pool="token"`),
biases on q, k, v; the fused `qkv` projection is split into Keras' query,
key and value kernels. Variants this package cannot express (register
tokens, layer scale, q/k norm, attention pooling, average pooling with
`fc_norm`, pre-norm, distillation tokens, ...) raise an error naming the
field.
"""

import json
import os

import numpy as np

from keras_mobile_moe.convert import common

SAFETENSORS_FILE = "model.safetensors"
PICKLE_FILES = ("pytorch_model.bin", "model.pth", "pytorch_model.pth")

# timm's registered architectures that are plain ViTs (model_args of their
# timm entry functions): patch_size, embed_dim, depth, num_heads, img_size.
ARCHITECTURES = {
    "vit_tiny_patch16_224": (16, 192, 12, 3, 224),
    "vit_tiny_patch16_384": (16, 192, 12, 3, 384),
    "vit_small_patch32_224": (32, 384, 12, 6, 224),
    "vit_small_patch32_384": (32, 384, 12, 6, 384),
    "vit_small_patch16_224": (16, 384, 12, 6, 224),
    "vit_small_patch16_384": (16, 384, 12, 6, 384),
    "vit_base_patch32_224": (32, 768, 12, 12, 224),
    "vit_base_patch32_384": (32, 768, 12, 12, 384),
    "vit_base_patch16_224": (16, 768, 12, 12, 224),
    "vit_base_patch16_384": (16, 768, 12, 12, 384),
    "vit_large_patch16_224": (16, 1024, 24, 16, 224),
    "vit_large_patch16_384": (16, 1024, 24, 16, 384),
    "deit_tiny_patch16_224": (16, 192, 12, 3, 224),
    "deit_small_patch16_224": (16, 384, 12, 6, 224),
    "deit_base_patch16_224": (16, 768, 12, 12, 224),
    "deit_base_patch16_384": (16, 768, 12, 12, 384),
}

# `model_args` fields and the values this package reproduces exactly
# (timm's VisionTransformer defaults); any other value is refused.
DEFAULT_ARGS = {
    "in_chans": None,  # any int
    "global_pool": "token",
    "class_token": True,
    "qkv_bias": True,
    "qk_norm": False,
    "proj_bias": True,
    "init_values": None,
    "no_embed_class": False,
    "reg_tokens": 0,
    "pre_norm": False,
    "final_norm": True,
    "fc_norm": None,
    "dynamic_img_size": False,
    "dynamic_img_pad": False,
    "act_layer": None,
    "norm_layer": None,
    "embed_layer": None,
    "block_fn": None,
    "mlp_layer": None,
    "pos_embed": "learn",
    "patch_bias": None,
    "scale_attn_norm": False,
    "scale_mlp_norm": False,
    "attn_layer": None,
    "attn_type": None,
}
# Accepted with any value: regularisation, initialisation, output size.
FREE_ARGS = (
    "num_classes",
    "drop_rate",
    "pos_drop_rate",
    "patch_drop_rate",
    "proj_drop_rate",
    "attn_drop_rate",
    "drop_path_rate",
    "weight_init",
    "fix_init",
)
SHAPE_ARGS = (
    "img_size",
    "patch_size",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
)

# State-dict names that mark variants without an equivalent here.
UNSUPPORTED_TENSORS = (
    ("reg_token", "register tokens (reg_tokens)"),
    ("dist_token", "a distillation token (DeiT distilled)"),
    ("head_dist", "a distillation head (DeiT distilled)"),
    ("attn_pool", "attention pooling (global_pool='map')"),
    ("fc_norm", "a norm after pooling (fc_norm)"),
    ("norm_pre", "a pre-norm (pre_norm=True)"),
    (".ls1.", "layer scale (init_values)"),
    (".ls2.", "layer scale (init_values)"),
    (".q_norm.", "q/k normalisation (qk_norm)"),
    (".k_norm.", "q/k normalisation (qk_norm)"),
    (
        ".norm.",
        "a norm inside attention or MLP (scale_attn_norm / scale_mlp_norm)",
    ),
    ("head.fc.", "a head MLP"),
)


def is_timm_config(config):
    """Whether a parsed `config.json` is a timm checkpoint's."""
    return (
        isinstance(config, dict)
        and isinstance(config.get("architecture"), str)
        and "registered_name" not in config
    )


def _error(source, message):
    return ValueError(f"{source}: {message} Nothing was loaded.")


def _as_pair(value, field, source):
    if isinstance(value, (list, tuple)) and len(value) == 2:
        value = tuple(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    else:
        raise _error(source, f"{field}={value!r} is not an int or a pair.")
    if not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value
    ):
        raise _error(source, f"{field}={value!r}. Expected positive ints.")
    return value


def architecture_spec(config, source):
    """`MobileVMoEBackbone` arguments, classes and preprocessing of a timm
    `config.json` (no tensor is read).

    Args:
        config: the parsed `config.json`.
        source: str naming the checkpoint in messages.

    Returns:
        `(spec, num_classes, preprocessing, model_args)`.

    Example:

    >>> spec, classes, prep, _ = architecture_spec(
    ...     {"architecture": "vit_small_patch32_224", "num_classes": 1000,
    ...      "pretrained_cfg": {"input_size": [3, 224, 224],
    ...                         "mean": [0.5] * 3, "std": [0.5] * 3,
    ...                         "interpolation": "bicubic"}}, "example")
    >>> spec["num_layers"], spec["hidden_dim"], spec["patch_size"], classes
    (12, 384, 32, 1000)
    """
    architecture = config["architecture"]
    model_args = config.get("model_args") or {}
    if not isinstance(model_args, dict):
        raise _error(source, f"model_args={model_args!r} is not a JSON object.")
    if architecture not in ARCHITECTURES:
        raise _error(
            source,
            f"architecture={architecture!r} is not a timm architecture that "
            "converts to a Mobile V-MoE. Accepted: "
            f"{sorted(ARCHITECTURES)} (with any model_args of "
            f"{sorted(SHAPE_ARGS)}).",
        )
    for field, value in model_args.items():
        if field in SHAPE_ARGS or field in FREE_ARGS:
            continue
        if field not in DEFAULT_ARGS:
            raise _error(
                source,
                f"model_args field {field!r}={value!r} is not supported; a "
                "timm ViT converts when its model_args only set "
                f"{sorted(SHAPE_ARGS + FREE_ARGS)} or keep timm's defaults "
                f"for {sorted(DEFAULT_ARGS)}.",
            )
        default = DEFAULT_ARGS[field]
        if field == "in_chans":
            common.check_positive_int(value, "model_args.in_chans", source)
        elif field == "global_pool" and value == "token":
            pass
        elif value != default and not (default is None and value in ("", None)):
            raise _error(
                source,
                f"model_args field {field!r}={value!r} is not supported "
                f"(only timm's default {default!r} converts exactly).",
            )
    global_pool = config.get(
        "global_pool", model_args.get("global_pool", "token")
    )
    if global_pool != "token":
        raise _error(
            source,
            f"global_pool={global_pool!r} is not supported: the Mobile V-MoE "
            "head reads the class token after the final norm "
            "(global_pool='token'); timm's 'avg' pooling applies its norm "
            "after pooling (fc_norm).",
        )
    patch, dim, depth, heads, size = ARCHITECTURES[architecture]
    patch = _as_pair(model_args.get("patch_size", patch), "patch_size", source)
    if patch[0] != patch[1]:
        raise _error(source, f"patch_size={patch} is not square.")
    image_size = _as_pair(model_args.get("img_size", size), "img_size", source)
    dim = model_args.get("embed_dim", dim)
    depth = model_args.get("depth", depth)
    heads = model_args.get("num_heads", heads)
    for field, value in (
        ("embed_dim", dim),
        ("depth", depth),
        ("num_heads", heads),
    ):
        if common.check_positive_int(value, field, source) == 0:
            raise _error(source, f"{field}=0. Expected a positive int.")
    mlp_ratio = model_args.get("mlp_ratio", 4.0)
    mlp_dim = int(dim * mlp_ratio)
    channels = model_args.get("in_chans", 3)
    num_classes = common.check_positive_int(
        config.get("num_classes", model_args.get("num_classes", 1000)),
        "num_classes",
        source,
    )
    spec = {
        "image_shape": (image_size[0], image_size[1], channels),
        "patch_size": patch[0],
        "num_layers": depth,
        "hidden_dim": dim,
        "num_heads": heads,
        "mlp_dim": mlp_dim,
        "num_experts": 0,
        "num_moe_layers": 0,
        "use_class_token": True,
        "layer_norm_epsilon": 1e-6,
        "mlp_activation": "gelu",
        "drop_path_rate": float(model_args.get("drop_path_rate", 0.0) or 0.0),
    }
    if image_size[0] % patch[0] or image_size[1] % patch[0]:
        raise _error(
            source,
            f"img_size={image_size} is not divisible by patch_size={patch[0]}.",
        )
    pretrained = config.get("pretrained_cfg") or {}
    input_size = pretrained.get("input_size", [channels, *image_size])
    interpolation = pretrained.get("interpolation", "bicubic")
    if interpolation not in ("bicubic", "bilinear", "nearest"):
        raise _error(
            source,
            f"pretrained_cfg.interpolation={interpolation!r} is not supported. "
            "Accepted: 'bicubic', 'bilinear', 'nearest'.",
        )
    preprocessing = {
        "image_size": tuple(input_size[1:3]),
        "mean": [
            float(v) for v in pretrained.get("mean", (0.485, 0.456, 0.406))
        ],
        "std": [float(v) for v in pretrained.get("std", (0.229, 0.224, 0.225))],
        "interpolation": interpolation,
        "crop_pct": pretrained.get("crop_pct"),
    }
    if (
        len(preprocessing["mean"]) != channels
        or len(preprocessing["std"]) != channels
    ):
        raise _error(
            source,
            f"pretrained_cfg mean/std have {len(preprocessing['mean'])}/"
            f"{len(preprocessing['std'])} entries for {channels} channels.",
        )
    return spec, num_classes, preprocessing, model_args


def _tensor_shapes(path, source):
    """name -> shape of a safetensors file, from its header (no data read)."""
    try:
        with open(path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            if header_size <= 0 or header_size > os.path.getsize(path):
                raise ValueError("bad header size")
            header = json.loads(f.read(header_size))
    except (OSError, ValueError) as error:
        raise _error(
            source,
            f"{SAFETENSORS_FILE} is not a safetensors file ({error}); it is "
            "truncated or corrupt.",
        ) from error
    return {
        name: tuple(info["shape"])
        for name, info in header.items()
        if name != "__metadata__"
    }


def expected_timm_shapes(spec, num_classes):
    """name -> shape of every tensor of timm's ViT with `spec`."""
    d, m, p = spec["hidden_dim"], spec["mlp_dim"], spec["patch_size"]
    height, width, channels = spec["image_shape"]
    tokens = (height // p) * (width // p) + 1
    shapes = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, tokens, d),
        "patch_embed.proj.weight": (d, channels, p, p),
        "patch_embed.proj.bias": (d,),
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    for i in range(spec["num_layers"]):
        b = f"blocks.{i}."
        shapes.update(
            {
                b + "norm1.weight": (d,),
                b + "norm1.bias": (d,),
                b + "attn.qkv.weight": (3 * d, d),
                b + "attn.qkv.bias": (3 * d,),
                b + "attn.proj.weight": (d, d),
                b + "attn.proj.bias": (d,),
                b + "norm2.weight": (d,),
                b + "norm2.bias": (d,),
                b + "mlp.fc1.weight": (m, d),
                b + "mlp.fc1.bias": (m,),
                b + "mlp.fc2.weight": (d, m),
                b + "mlp.fc2.bias": (d,),
            }
        )
    if num_classes:
        shapes["head.weight"] = (num_classes, d)
        shapes["head.bias"] = (num_classes,)
    return shapes


def pickle_only_error(source, pickles):
    """The error for a checkpoint published only as pickle files."""
    return _error(
        source,
        f"the checkpoint has only {pickles}, pickle files, which can execute "
        "code when loaded and are never opened here. Expected "
        f"{SAFETENSORS_FILE} (timm writes it with save_for_hf(..., "
        "safe_serialization=True)).",
    )


def find_weights_file(directory, source):
    """The path of `model.safetensors`, or a clear error (pickle refused)."""
    path = os.path.join(directory, SAFETENSORS_FILE)
    if os.path.isfile(path):
        return path
    pickles = [
        name
        for name in PICKLE_FILES
        if os.path.isfile(os.path.join(directory, name))
    ]
    if pickles:
        raise pickle_only_error(source, pickles)
    if os.path.isfile(
        os.path.join(directory, SAFETENSORS_FILE + ".index.json")
    ):
        raise _error(
            source,
            "the checkpoint is sharded (model.safetensors.index.json); "
            f"expected one {SAFETENSORS_FILE}.",
        )
    raise FileNotFoundError(
        f"{source}: no {SAFETENSORS_FILE} next to config.json (found: "
        f"{sorted(os.listdir(directory))}). Pass load_weights=False for the "
        "architecture only. Nothing was loaded."
    )


def read_checkpoint(directory, config, load_weights, source):
    """Reads a timm ViT checkpoint directory into a `DenseViT`.

    Args:
        directory: folder with timm's `config.json` (and `model.safetensors`
            when `load_weights`).
        config: the parsed `config.json`.
        load_weights: bool. Whether to read the tensors.
        source: str naming the checkpoint in messages.

    Returns:
        A `keras_mobile_moe.convert.common.DenseViT`.
    """
    spec, num_classes, preprocessing, _ = architecture_spec(config, source)
    weights = None
    if load_weights:
        path = find_weights_file(directory, source)
        found = _tensor_shapes(path, source)
        expected = expected_timm_shapes(spec, num_classes)
        extra = sorted(set(found) - set(expected))
        for name in extra:
            for marker, what in UNSUPPORTED_TENSORS:
                if marker in name or name.startswith(marker):
                    raise _error(
                        source,
                        f"tensor {name!r} belongs to {what}, which has no "
                        "equivalent in a Mobile V-MoE.",
                    )
        if extra:
            raise _error(
                source,
                f"unexpected tensors {extra[:4]} (a timm ViT of "
                f"{config['architecture']!r} with these model_args has none).",
            )
        common.check_shapes(found, expected, source)
        try:
            from safetensors.numpy import load_file
        except ImportError as error:
            raise ImportError(
                "Converting a timm checkpoint needs the `safetensors` package. "
                "Install it with `pip install safetensors` (or "
                "`pip install keras-mobile-moe[hub]`)."
            ) from error
        tensors = load_file(path)
        weights = _to_kmm(tensors, spec, num_classes)
    return common.DenseViT(
        spec=spec,
        weights=weights,
        num_classes=num_classes,
        pooling="token",
        preprocessing=preprocessing,
        source=source,
    )


def _to_kmm(t, spec, num_classes):
    d, h = spec["hidden_dim"], spec["num_heads"]
    hd = d // h

    def f32(x):
        return np.asarray(x, dtype=np.float32)

    w = {
        # torch conv [D, C, p, p] -> Keras [p, p, C, D]
        "patch_kernel": f32(t["patch_embed.proj.weight"]).transpose(2, 3, 1, 0),
        "patch_bias": f32(t["patch_embed.proj.bias"]),
        "class_token": f32(t["cls_token"]),
        "position_embedding": f32(t["pos_embed"]),
        "final_norm.gamma": f32(t["norm.weight"]),
        "final_norm.beta": f32(t["norm.bias"]),
    }
    for i in range(spec["num_layers"]):
        src, b = f"blocks.{i}.", f"blocks.{i}."
        qkv_w = f32(t[src + "attn.qkv.weight"])  # [3D, D]: q, k, v rows
        qkv_b = f32(t[src + "attn.qkv.bias"])
        for j, name in enumerate(("query", "key", "value")):
            rows = qkv_w[j * d : (j + 1) * d]  # [D_out, D_in]
            w[b + name + ".kernel"] = rows.T.reshape(d, h, hd)
            w[b + name + ".bias"] = qkv_b[j * d : (j + 1) * d].reshape(h, hd)
        w[b + "attention_output.kernel"] = f32(
            t[src + "attn.proj.weight"]
        ).T.reshape(h, hd, d)
        w[b + "attention_output.bias"] = f32(t[src + "attn.proj.bias"])
        w[b + "attention_norm.gamma"] = f32(t[src + "norm1.weight"])
        w[b + "attention_norm.beta"] = f32(t[src + "norm1.bias"])
        w[b + "mlp_norm.gamma"] = f32(t[src + "norm2.weight"])
        w[b + "mlp_norm.beta"] = f32(t[src + "norm2.bias"])
        w[b + "mlp_in.kernel"] = f32(t[src + "mlp.fc1.weight"]).T
        w[b + "mlp_in.bias"] = f32(t[src + "mlp.fc1.bias"])
        w[b + "mlp_out.kernel"] = f32(t[src + "mlp.fc2.weight"]).T
        w[b + "mlp_out.bias"] = f32(t[src + "mlp.fc2.bias"])
    if num_classes:
        w["head.kernel"] = f32(t["head.weight"]).T
        w["head.bias"] = f32(t["head.bias"])
    return w
