"""The registry of built-in presets, read from the top-level `presets/` folder.

Each preset is one JSON file: its family, the model scale (a key of
`keras_mobile_moe.variants.VARIANTS`), backbone and classifier arguments on top
of the scale, documentation fields, and where its weights live (`null` while a
preset is architecture-only). Aliases point at the same entry.
"""

import difflib
import functools
import importlib.resources
import json
import os
import pathlib

from keras_mobile_moe import variants


class classproperty(property):
    """A read-only property of the class (like keras-hub's `presets`)."""

    def __get__(self, _, owner_cls):
        return self.fget(owner_cls)


def presets_dir():
    """The folder holding the preset JSON files (source tree or wheel)."""
    packaged = importlib.resources.files("keras_mobile_moe") / "_presets"
    if packaged.is_dir():
        return pathlib.Path(str(packaged))
    return pathlib.Path(__file__).resolve().parents[1] / "presets"


@functools.lru_cache(maxsize=None)
def load_registry():
    """Returns {name or alias: entry} for every preset JSON file."""
    registry = {}
    for path in sorted(presets_dir().glob("*.json")):
        entry = json.loads(path.read_text())
        for name in [entry["name"], *entry.get("aliases", [])]:
            if name in registry:
                raise ValueError(f"Duplicate preset name {name!r} in {path}.")
            registry[name] = entry
    return registry


def presets_of(family):
    """Returns {name or alias: entry} of one model family."""
    return {
        name: entry
        for name, entry in load_registry().items()
        if entry["family"] == family
    }


def is_handle_or_path(preset):
    """Whether `preset` names a directory or a remote handle, not a name."""
    return "://" in preset or os.sep in preset or "/" in preset or (
        os.path.exists(preset)
    )


def find(preset, family):
    """Returns the registry entry of a built-in name, or None for a handle or
    a local directory. Raises a helpful error for an unknown name."""
    if not isinstance(preset, str) or not preset:
        raise ValueError(
            f"Received: preset={preset!r}. Expected a built-in preset name, a "
            "local preset directory or an 'hf://org/repo' handle."
        )
    if is_handle_or_path(preset):
        return None
    known = presets_of(family)
    if preset not in known:
        close = difflib.get_close_matches(preset, list(known), n=5, cutoff=0.5)
        hint = f" Did you mean {close}?" if close else ""
        raise ValueError(
            f"Unknown preset {preset!r}.{hint} Accepted: a built-in name "
            f"({sorted(known)}), a local preset directory, or "
            "'hf://org/repo[/revision]'."
        )
    return known[preset]


def split_kwargs(backbone_cls, kwargs):
    """Splits overrides into backbone arguments and the rest."""
    import inspect

    names = set(inspect.signature(backbone_cls.__init__).parameters) - {
        "self",
        "kwargs",
    }
    backbone_kwargs = {k: v for k, v in kwargs.items() if k in names}
    other = {k: v for k, v in kwargs.items() if k not in names}
    return backbone_kwargs, other


def backbone_config(entry, overrides):
    """The backbone arguments of a registry entry with `overrides` applied."""
    config = variants.get_variant(entry["variant"])
    config.update(entry.get("backbone", {}))
    config.update(overrides)
    return config


def check_weights(entry, load_weights):
    if load_weights and not entry.get("weights"):
        raise ValueError(
            f"Preset {entry['name']!r} has no published weights yet. Pass "
            "load_weights=False to build the architecture with random "
            "weights."
        )


def build_backbone(backbone_cls, entry, load_weights, kwargs):
    """Builds the backbone of a built-in preset."""
    check_weights(entry, load_weights)
    backbone_kwargs, other = split_kwargs(backbone_cls, kwargs)
    if other:
        raise ValueError(
            f"Unknown arguments for {backbone_cls.__name__}: {sorted(other)}."
        )
    return backbone_cls(**backbone_config(entry, backbone_kwargs))


def build_task(task_cls, entry, load_weights, kwargs):
    """Builds the classifier (backbone, preprocessor, head) of a preset."""
    check_weights(entry, load_weights)
    backbone_kwargs, task_kwargs = split_kwargs(task_cls.backbone_cls, kwargs)
    backbone = task_cls.backbone_cls(**backbone_config(entry, backbone_kwargs))
    if "preprocessor" not in task_kwargs:
        converter_cls = task_cls.preprocessor_cls.image_converter_cls
        height, width = backbone.image_shape[:2]
        task_kwargs["preprocessor"] = task_cls.preprocessor_cls(
            converter_cls(
                image_size=(height, width), scale=1.0 / 127.5, offset=-1.0
            )
        )
    config = {**entry.get("task", {}), **task_kwargs}
    return task_cls(backbone=backbone, **config)
