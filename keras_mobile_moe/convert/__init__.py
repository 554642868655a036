"""Loading checkpoints of other libraries into the model families.

`from_preset` of the Mobile V-MoE and MoNE families (`kmm.MobileVMoE`,
`kmm.MoNE` and their backbones) accepts, besides this package's presets, a
folder or `hf://` handle holding

- a timm ViT checkpoint (`config.json` with an `architecture`, and
  `model.safetensors`), e.g. `hf://timm/vit_small_patch32_224.augreg_in21k_ft_in1k`;
- a keras-hub `ViTBackbone` / `ViTImageClassifier` preset.

Into the Mobile V-MoE family the checkpoint becomes a dense ViT
(`num_moe_layers=0`) computing the same function as in its own library;
passing `num_experts=...` / `num_moe_layers=...` to `from_preset` upcycles it
into a Mobile V-MoE in the same call (`kmm.upcycle`). Into MoNE it becomes a
`MoNEBackbone` with a class token at `capacity_budget=1.0`, which computes
the same function (every token at full width); pass `capacity_budget=...`
(or set it later) for nested-expert compute. The family decides how
(`dense_vit_arguments`, `load_dense_vit`). The classifier's preprocessor is
built from the checkpoint's own config (input size, interpolation, mean and
std).
"""

import json
import os

from keras_mobile_moe import hub
from keras_mobile_moe import preset_registry
from keras_mobile_moe.convert import common
from keras_mobile_moe.convert import keras_hub_vit
from keras_mobile_moe.convert import timm
from keras_mobile_moe.upcycle import upcycle

TIMM = "timm"
KERAS_HUB_VIT = "keras_hub_vit"


def detect(directory):
    """`"timm"`, `"keras_hub_vit"` or None (this package's format, or
    unknown) for a checkpoint folder."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError):
        return None
    if timm.is_timm_config(config):
        return TIMM
    if keras_hub_vit.is_keras_hub_vit_config(config):
        return KERAS_HUB_VIT
    return None


def check_hub_download(directory, handle):
    """For a timm checkpoint fetched without `model.safetensors`: a clear
    error if the repo only has pickle weights (asked on the Hub when
    online; pickle files are never fetched)."""
    if os.path.isfile(os.path.join(directory, timm.SAFETENSORS_FILE)):
        return
    try:
        path = os.path.join(directory, "config.json")
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return
    if not timm.is_timm_config(config):
        return
    files = hub.list_repo_files(handle)
    if files is None:  # offline: the Hub cannot be asked
        return
    pickles = [name for name in timm.PICKLE_FILES if name in files]
    if pickles:
        raise timm.pickle_only_error(f"Checkpoint {handle!r}", pickles)


def _read(directory, kind, load_weights, task, label):
    source = f"Checkpoint {label}"
    if kind == TIMM:
        with open(
            os.path.join(directory, "config.json"), encoding="utf-8"
        ) as f:
            config = json.load(f)
        return timm.read_checkpoint(directory, config, load_weights, source)
    return keras_hub_vit.read_preset(directory, load_weights, task, source)


def _check_family(cls, vit):
    # The family says whether dense ViTs convert into it.
    backbone_cls = getattr(cls, "backbone_cls", cls)
    if not getattr(backbone_cls, "converts_dense_vits", False):
        raise ValueError(
            f"{vit.source} is a dense ViT checkpoint; it converts into the "
            "Mobile V-MoE and MoNE families (kmm.MobileVMoE, kmm.MoNE and "
            f"their backbones), not into {cls.__name__}."
        )


def _dense_backbone(backbone_cls, vit, overrides, load_weights):
    """Builds the dense backbone (and loads the converted weights)."""
    overrides = dict(overrides)
    spec = backbone_cls.dense_vit_arguments(vit.spec)
    if overrides.get("router_type", "image") != "image":
        raise ValueError(
            f"{vit.source}: router_type={overrides['router_type']!r} is not "
            "available when converting a dense checkpoint; upcycling builds "
            "the per-image router (router_type='image')."
        )
    overrides.pop("router_type", None)
    if load_weights:
        for field in common.ARCHITECTURE_ARGUMENTS:
            if field in overrides and overrides[field] != spec[field]:
                raise ValueError(
                    f"{vit.source}: the override {field}="
                    f"{overrides[field]!r} changes the architecture of the "
                    f"checkpoint ({field}={spec[field]!r}), so its weights "
                    "cannot be loaded. Drop it, or pass load_weights=False."
                )
    preset_registry.check_unknown_arguments(
        backbone_cls,
        overrides,
        preset_registry.constructor_arguments(backbone_cls),
    )
    weights = dict(vit.weights) if load_weights else None
    if "image_shape" in overrides:
        new_shape = tuple(overrides["image_shape"])
        old_shape = tuple(spec["image_shape"])
        if len(new_shape) != 3 or new_shape[2] != old_shape[2]:
            raise ValueError(
                f"{vit.source}: image_shape={overrides['image_shape']!r}; the "
                f"checkpoint takes {old_shape[2]}-channel images. Expected "
                f"(height, width, {old_shape[2]})."
            )
        patch = overrides.get("patch_size", spec["patch_size"])
        if new_shape[0] % patch or new_shape[1] % patch:
            raise ValueError(
                f"{vit.source}: image_shape={new_shape} is not divisible by "
                f"patch_size={patch}."
            )
        if weights is not None and new_shape != old_shape:
            weights["position_embedding"] = common.resample_position_embedding(
                weights["position_embedding"],
                common.grid_of(old_shape, patch),
                common.grid_of(new_shape, patch),
                prefix=int(spec["use_class_token"]),
            )
    spec.update(overrides)
    backbone = backbone_cls(**spec)
    if weights is not None:
        backbone.load_dense_vit(weights)
    return backbone


def _split_upcycle(backbone_cls, overrides, source):
    upcycle_kwargs = {
        k: overrides.pop(k) for k in common.UPCYCLE_ARGUMENTS if k in overrides
    }
    if upcycle_kwargs and not backbone_cls.supports_upcycling:
        raise ValueError(
            f"{source}: {upcycle_kwargs} upcycle a dense ViT into a Mobile "
            f"V-MoE, which {backbone_cls.__name__} is not. Its experts come "
            "from the checkpoint's own weights: pass capacity_budget=... or "
            "num_nested_experts=... instead, or load the checkpoint with "
            "kmm.MobileVMoE. Nothing was loaded."
        )
    wants_moe = (
        bool(upcycle_kwargs) and upcycle_kwargs.get("num_moe_layers", 2) > 0
    )
    if not wants_moe:
        # num_moe_layers=0 (or nothing asked): the dense model.
        for key in (
            "num_experts",
            "top_k",
            "normalize_gates",
            "router_pooling",
        ):
            if key in upcycle_kwargs:
                overrides[key] = upcycle_kwargs[key]
        overrides.pop("num_moe_layers", None)
        upcycle_kwargs = {}
    return upcycle_kwargs


def load_backbone(cls, directory, kind, load_weights, overrides, label):
    """A backbone's `from_preset` for a timm / keras-hub checkpoint.

    Args:
        cls: the backbone class (of a family that `converts_dense_vits`).
        directory: the checkpoint folder (e.g. the Hub cache snapshot).
        kind: `detect(directory)`.
        load_weights: bool.
        overrides: dict of backbone arguments; `num_experts`,
            `num_moe_layers`, `top_k`, `normalize_gates`, `router_pooling`
            upcycle the converted dense ViT (`kmm.upcycle`).
        label: str naming the checkpoint in messages.

    Returns:
        A backbone of class `cls`.
    """
    overrides = dict(overrides)
    vit = _read(directory, kind, load_weights, task=False, label=label)
    _check_family(cls, vit)
    upcycle_kwargs = _split_upcycle(cls, overrides, vit.source)
    backbone = _dense_backbone(cls, vit, overrides, load_weights)
    if upcycle_kwargs:
        backbone = upcycle(backbone, **upcycle_kwargs)
    return backbone


def load_task(cls, directory, kind, load_weights, overrides, label):
    """A classifier's `from_preset` (`kmm.MobileVMoE`, `kmm.MoNE`) for a
    timm / keras-hub checkpoint.

    The head is the checkpoint's (a new random one when `num_classes`
    differs); `superclass_ids` and `routing` go to `kmm.upcycle` when the
    overrides ask for experts.
    """
    overrides = dict(overrides)
    vit = _read(directory, kind, load_weights, task=True, label=label)
    _check_family(cls, vit)
    backbone_cls = cls.backbone_cls
    upcycle_kwargs = _split_upcycle(backbone_cls, overrides, vit.source)
    backbone_overrides, task_overrides = preset_registry.split_kwargs(
        backbone_cls, overrides
    )
    accepted = preset_registry.constructor_arguments(cls) - {"backbone"}
    preset_registry.check_unknown_arguments(cls, task_overrides, accepted)
    num_classes = task_overrides.pop("num_classes", vit.num_classes)
    if not num_classes:
        raise ValueError(
            f"{vit.source} has no classifier head (num_classes=0). Pass "
            "num_classes=... to build a new head, or load it with "
            f"{backbone_cls.__name__}.from_preset."
        )
    if task_overrides.get("pooling", vit.pooling) != vit.pooling:
        raise ValueError(
            f"{vit.source}: pooling={task_overrides['pooling']!r}; the "
            f"checkpoint's head reads pooling={vit.pooling!r}."
        )
    task_overrides.pop("pooling", None)
    if upcycle_kwargs:
        for key in ("superclass_ids", "routing"):
            if key in task_overrides:
                upcycle_kwargs[key] = task_overrides.pop(key)
    backbone = _dense_backbone(
        backbone_cls, vit, backbone_overrides, load_weights
    )
    if "preprocessor" in task_overrides:
        preprocessor = task_overrides.pop("preprocessor")
    elif cls.preprocessor_cls is not None:
        arguments = common.converter_arguments(vit.preprocessing)
        arguments["image_size"] = tuple(backbone.image_shape[:2])
        converter_cls = cls.preprocessor_cls.image_converter_cls
        preprocessor = cls.preprocessor_cls(converter_cls(**arguments))
    else:
        preprocessor = None
    task = cls(
        backbone=backbone,
        num_classes=num_classes,
        preprocessor=preprocessor,
        pooling=vit.pooling,
        **task_overrides,
    )
    if load_weights and num_classes == vit.num_classes:
        task.output_dense.kernel.assign(vit.weights["head.kernel"])
        task.output_dense.bias.assign(vit.weights["head.bias"])
    if upcycle_kwargs:
        task = upcycle(task, **upcycle_kwargs)
    return task
