"""Reads keras-hub `ViTBackbone` / `ViTImageClassifier` presets.

The preset is loaded by keras-hub itself (`keras_hub.models.Backbone.
from_preset`, which reads its JSON configs in safe mode and its `.weights.h5`
with h5py), then every weight is copied into this package's layout. The
architecture is the same function: keras-hub's ViT uses exact GELU, its
`layer_norm_epsilon`, the class token, a final LayerNorm and Keras'
`MultiHeadAttention`. Variants without an equivalent (no MLP / attention /
patch bias, channels-first images, a `pre_logits` layer in the classifier)
raise an error naming the field.
"""

import json
import os

import numpy as np

from keras_mobile_moe.convert import common

BACKBONE_NAMES = ("keras_hub>ViTBackbone",)
TASK_NAMES = ("keras_hub>ViTImageClassifier",)


def is_keras_hub_vit_config(config):
    return (
        isinstance(config, dict)
        and config.get("registered_name") in BACKBONE_NAMES
    )


def _error(source, message):
    return ValueError(f"{source}: {message} Nothing was loaded.")


def architecture_spec(config, source):
    """`MobileVMoEBackbone` arguments of a keras-hub `ViTBackbone` config."""
    c = config.get("config", {})
    requirements = {
        "use_mha_bias": True,
        "use_mlp_bias": True,
        "use_patch_bias": True,
        "use_class_token": True,
    }
    for field, value in requirements.items():
        if c.get(field, value) != value:
            raise _error(
                source,
                f"ViTBackbone {field}={c.get(field)!r} is not supported "
                f"(only {value!r} converts).",
            )
    if c.get("data_format") not in (None, "channels_last"):
        raise _error(
            source,
            f"ViTBackbone data_format={c.get('data_format')!r} is not "
            "supported. Accepted: 'channels_last'.",
        )
    patch = c["patch_size"]
    if isinstance(patch, (list, tuple)):
        if len(set(patch)) != 1:
            raise _error(
                source, f"ViTBackbone patch_size={patch} is not square."
            )
        patch = patch[0]
    image_shape = tuple(c["image_shape"])
    return {
        "image_shape": image_shape,
        "patch_size": int(patch),
        "num_layers": int(c["num_layers"]),
        "hidden_dim": int(c["hidden_dim"]),
        "num_heads": int(c["num_heads"]),
        "mlp_dim": int(c["mlp_dim"]),
        "num_experts": 0,
        "num_moe_layers": 0,
        "use_class_token": True,
        "layer_norm_epsilon": float(c.get("layer_norm_epsilon", 1e-6)),
        "mlp_activation": "gelu",
    }


def _read_json(directory, name):
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _preprocessing(directory, spec):
    """The keras-hub preset's image converter settings (mean/std form)."""
    converter = _read_json(directory, "image_converter.json")
    c = (converter or {}).get("config", {})
    size = tuple(c.get("image_size") or spec["image_shape"][:2])
    channels = spec["image_shape"][2]
    scale = c.get("scale", 1.0 / 255.0)
    offset = c.get("offset", 0.0)
    scale = (
        list(scale) if isinstance(scale, (list, tuple)) else [scale] * channels
    )
    offset = (
        list(offset)
        if isinstance(offset, (list, tuple))
        else [offset] * channels
    )
    # x * scale + offset == (x / 255 - mean) / std
    std = [1.0 / (255.0 * s) for s in scale]
    mean = [-o * s for o, s in zip(offset, std)]
    return {
        "image_size": size,
        "mean": mean,
        "std": std,
        "interpolation": c.get("interpolation", "bilinear"),
        "crop_pct": None,
    }


def read_preset(directory, load_weights, task, source):
    """Reads a keras-hub ViT preset directory into a `DenseViT`.

    Args:
        directory: the preset folder.
        load_weights: bool.
        task: bool. Whether the head (task.json) is wanted.
        source: str naming the checkpoint in messages.
    """
    import keras_hub

    config = _read_json(directory, "config.json")
    spec = common_spec = architecture_spec(config, source)
    task_json = _read_json(directory, "task.json") if task else None
    num_classes, pooling = 0, "token"
    if task_json is not None:
        if task_json.get("registered_name") not in TASK_NAMES:
            raise _error(
                source,
                f"task.json holds {task_json.get('registered_name')!r}; "
                f"expected one of {TASK_NAMES}.",
            )
        t = task_json["config"]
        if t.get("intermediate_dim") is not None:
            raise _error(
                source,
                f"ViTImageClassifier intermediate_dim={t['intermediate_dim']} "
                "(a tanh pre-logits layer) is not supported.",
            )
        if t.get("activation") not in (None, "linear"):
            raise _error(
                source,
                f"ViTImageClassifier activation={t['activation']!r} is not "
                "supported (logits only).",
            )
        pool = t.get("pooling", "token")
        if pool not in ("token",):
            raise _error(
                source,
                f"ViTImageClassifier pooling={pool!r} is not supported: "
                "keras-hub's 'gap' averages the class token too. Accepted: "
                "'token'.",
            )
        num_classes = int(t["num_classes"])
    weights = None
    if load_weights:
        if task_json is not None:
            model = keras_hub.models.ImageClassifier.from_preset(directory)
            backbone = model.backbone
        else:
            model = None
            backbone = keras_hub.models.Backbone.from_preset(directory)
        weights = _to_kmm(backbone, common_spec)
        if model is not None:
            weights["head.kernel"] = np.asarray(model.output_dense.kernel)
            weights["head.bias"] = np.asarray(model.output_dense.bias)
        found = {k: v.shape for k, v in weights.items()}
        common.check_shapes(
            found, common.expected_shapes(spec, num_classes), source
        )
    return common.DenseViT(
        spec=spec,
        weights=weights,
        num_classes=num_classes,
        pooling=pooling,
        preprocessing=_preprocessing(directory, spec),
        source=source,
    )


def _np(variable):
    from keras import ops

    return np.asarray(ops.convert_to_numpy(variable), dtype=np.float32)


def _to_kmm(backbone, spec):
    embedding = backbone.get_layer("vit_patching_and_embedding")
    encoder = backbone.get_layer("vit_encoder")
    d = spec["hidden_dim"]
    w = {
        "patch_kernel": _np(embedding.patch_embedding.kernel),
        "patch_bias": _np(embedding.patch_embedding.bias),
        "class_token": _np(embedding.class_token).reshape(1, 1, d),
        "position_embedding": _np(
            embedding.position_embedding.embeddings
        ).reshape(1, -1, d),
        "final_norm.gamma": _np(encoder.layer_norm.gamma),
        "final_norm.beta": _np(encoder.layer_norm.beta),
    }
    for i, block in enumerate(encoder.encoder_layers):
        b = f"blocks.{i}."
        w[b + "attention_norm.gamma"] = _np(block.layer_norm_1.gamma)
        w[b + "attention_norm.beta"] = _np(block.layer_norm_1.beta)
        w[b + "mlp_norm.gamma"] = _np(block.layer_norm_2.gamma)
        w[b + "mlp_norm.beta"] = _np(block.layer_norm_2.beta)
        mha = block.mha
        for name, dense in (
            ("query", mha.query_dense),
            ("key", mha.key_dense),
            ("value", mha.value_dense),
            ("attention_output", mha.output_dense),
        ):
            w[b + name + ".kernel"] = _np(dense.kernel)
            w[b + name + ".bias"] = _np(dense.bias)
        w[b + "mlp_in.kernel"] = _np(block.mlp.dense_1.kernel)
        w[b + "mlp_in.bias"] = _np(block.mlp.dense_1.bias)
        w[b + "mlp_out.kernel"] = _np(block.mlp.dense_2.kernel)
        w[b + "mlp_out.bias"] = _np(block.mlp.dense_2.bias)
    return w
