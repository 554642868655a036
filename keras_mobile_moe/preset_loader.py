"""`from_preset` and `save_to_preset` for every model family.

A preset is named by one of three forms:

- a built-in name from the registry (`keras_mobile_moe.preset_registry`);
  built with random weights for `load_weights=False` (no file is read),
  otherwise loaded from where its registry entry says the weights live;
- a local preset directory in keras-hub's format (`config.json` with a
  `registered_name`, `model.weights.h5`, `metadata.json`; a classifier adds
  `task.json`, `task.weights.h5`, `preprocessor.json`,
  `image_converter.json`), as written by `save_to_preset`;
- a Hugging Face handle `hf://org/repo[/revision]`, fetched into the
  Hugging Face cache by `keras_mobile_moe.hub`.

A directory or handle may also hold a timm ViT checkpoint (`config.json` +
`model.safetensors`) or a keras-hub `ViTBackbone` / `ViTImageClassifier`
preset: `keras_mobile_moe.convert` converts it on load into a dense Mobile
V-MoE computing the same function. Overrides asking for experts
(`num_moe_layers=...`, `num_experts=...`) on a dense checkpoint upcycle it
in the same call (`kmm.upcycle`).

Loading never executes code from a preset: configs are JSON, checked to name
only registered Keras, keras-hub and keras_mobile_moe classes (no lambdas,
no `Lambda` layers, no foreign modules) and deserialized in Keras safe mode;
weights are HDF5 read by h5py (no pickle). Every weights file is checked
before it is loaded: it must open (not truncated), match the sha256 recorded
in `metadata.json` when there is one, and hold exactly the weights, with the
same shapes, as the model built from the config (the file checks live in
`keras_mobile_moe.preset_format`).

This is layer 4 of the preset stack (see `keras_mobile_moe.preset_format`):
it imports the file format, the Hub transport and the registry, never a
model family. The families' base classes (`keras_mobile_moe.models.base`)
call `backbone_from_preset` / `task_from_preset` / `saving_preset` with
their own class, which is how the loader builds them.
"""

import contextlib
import json
import os
import shutil
import tempfile
import threading
import warnings

import keras

from keras_mobile_moe import atomic_io
from keras_mobile_moe import convert
from keras_mobile_moe import families
from keras_mobile_moe import flops
from keras_mobile_moe import hub
from keras_mobile_moe import preset_format
from keras_mobile_moe import preset_registry
from keras_mobile_moe import version
from keras_mobile_moe.preset_format import CONFIG_FILE
from keras_mobile_moe.preset_format import LAYOUT
from keras_mobile_moe.preset_format import METADATA_FILE
from keras_mobile_moe.preset_format import MODEL_CARD_MARKER
from keras_mobile_moe.preset_format import MODEL_WEIGHTS_FILE
from keras_mobile_moe.preset_format import PREPROCESSOR_CONFIG_FILE
from keras_mobile_moe.preset_format import PRESET_FILES
from keras_mobile_moe.preset_format import README_FILE
from keras_mobile_moe.preset_format import SAFE_MODULE_ROOTS  # noqa: F401
from keras_mobile_moe.preset_format import TASK_CONFIG_FILE
from keras_mobile_moe.preset_format import TASK_WEIGHTS_FILE
from keras_mobile_moe.preset_format import UNSAFE_CLASS_NAMES  # noqa: F401
from keras_mobile_moe.preset_format import WEIGHTS_FILES
from keras_mobile_moe.preset_format import check_config_is_safe  # noqa: F401
from keras_mobile_moe.preset_format import corrupt_error
from keras_mobile_moe.preset_format import file_sha256
from keras_mobile_moe.preset_format import listing
from keras_mobile_moe.preset_format import read_config
from keras_mobile_moe.preset_format import read_weights_structure
from keras_mobile_moe.preset_format import recorded_sha256
from keras_mobile_moe.upcycle import upcycle

# --- resolving the preset -------------------------------------------------


def check_load_weights(load_weights):
    if not isinstance(load_weights, bool):
        raise ValueError(
            f"Received: load_weights={load_weights!r}. Expected True or False."
        )


def check_local_directory(preset, argument="preset"):
    """Returns `preset` as a str path after checking it is a directory."""
    if isinstance(preset, os.PathLike):
        preset = os.fspath(preset)
    if not isinstance(preset, str) or not preset:
        raise ValueError(
            f"Received: {argument}={preset!r}. Expected the path of a preset "
            "directory."
        )
    if not os.path.exists(preset):
        raise FileNotFoundError(
            f"Received: {argument}={preset!r}, but no such preset directory "
            f"exists. Accepted: {preset_registry.ACCEPTED_FORMS}."
        )
    if not os.path.isdir(preset):
        raise ValueError(
            f"Received: {argument}={preset!r}, which is a file, not a preset "
            f"directory; {LAYOUT}."
        )
    return preset


def _download(handle, load_weights):
    """Fetches a handle into the Hugging Face cache; a timm checkpoint
    published only as pickle files is refused with a clear error."""
    directory = hub.download_preset(handle, load_weights=load_weights)
    if load_weights:
        convert.check_hub_download(directory, handle)
    return directory


def resolve_path_or_handle(preset, load_weights):
    """Returns `(directory, label)` for a local directory or `hf://` handle."""
    if isinstance(preset, str) and "://" in preset:
        directory = _download(preset, load_weights)
        return directory, f"{preset!r} (cached at {directory})"
    directory = check_local_directory(preset)
    return directory, repr(directory)


def entry_directory(entry, load_weights):
    """Returns `(directory, label)` holding a built-in preset's weights."""
    kind, where = preset_registry.weights_location(entry)
    if kind == "hf":
        directory = _download(where, load_weights)
        return directory, f"{entry['name']!r} ({where}, cached at {directory})"
    if not os.path.isdir(where):
        raise FileNotFoundError(
            f"Preset {entry['name']!r} keeps its weights in the packaged "
            f"folder {where}, which is missing from this installation. "
            "Reinstall keras-mobile-moe, or pass load_weights=False."
        )
    return where, f"{entry['name']!r} ({where})"


# --- configs ----------------------------------------------------------------


def class_of(config, filename, label, expected):
    """The registered class a config names; must subclass `expected`."""
    registered = config.get("registered_name")
    if not registered:
        kind = ""
        if "model_type" in config or "architecture" in config:
            kind = " (it looks like a transformers or timm checkpoint)"
        raise ValueError(
            f"Preset {label}: {filename} has no 'registered_name', so it is "
            f"not a Keras preset{kind}. Expected a {expected.__name__} "
            f"preset; {LAYOUT}."
        )
    cls = keras.saving.get_registered_object(registered)
    if cls is None:
        raise ValueError(
            f"Preset {label}: {filename} holds a {registered!r}, a class "
            "that is not registered with Keras in this process. Expected a "
            f"{expected.__name__} preset."
        )
    if not (isinstance(cls, type) and issubclass(cls, expected)):
        family = getattr(cls, "preset_family", None)
        hint = (
            f" It is a {family!r} preset: load it with "
            f"{cls.__name__}.from_preset."
            if family
            else f" Load it with {getattr(cls, '__name__', cls)}.from_preset."
        )
        raise ValueError(
            f"Preset {label}: {filename} holds a {registered!r}, which is "
            f"not a {expected.__name__}.{hint}"
        )
    return cls


def _deserialize(config):
    return keras.saving.deserialize_keras_object(config, safe_mode=True)


def _with_overrides(config, overrides):
    config = dict(config)
    config["config"] = {**config["config"], **overrides}
    if "dtype" in overrides and overrides["dtype"] is None:
        config["config"].pop("dtype")
    return config


# --- weights ----------------------------------------------------------------


def _expected_structure(target, task):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "expected.weights.h5")
        if task:
            target.save_task_weights(path)
        else:
            target.save_weights(path)
        return read_weights_structure(path, "(expected)")


def _without_optimizer(structure):
    return {
        k: v for k, v in structure.items() if not k.startswith("optimizer/")
    }


def load_weights_checked(target, directory, filename, label, overrides, task):
    """Loads one weights file into `target` after checking it thoroughly."""
    path = os.path.join(directory, filename)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Preset {label} has no {filename}, so its weights cannot be "
            f"loaded. Found: {listing(directory)}. Pass load_weights=False "
            "to build the architecture with random weights."
        )
    # Optimizer state (saved by a compiled task) is not part of the model.
    found = _without_optimizer(read_weights_structure(path, label))
    expected = _without_optimizer(_expected_structure(target, task))
    if found != expected:
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        wrong = sorted(
            k for k in set(found) & set(expected) if found[k] != expected[k]
        )
        details = [
            f"{k}: shape {found[k]} in the file, {expected[k]} in the model"
            for k in wrong[:3]
        ]
        details += [f"{k} missing from the file" for k in missing[:2]]
        details += [f"{k} not in the model" for k in extra[:2]]
        hint = (
            f" The overrides {sorted(overrides)} change the architecture: "
            "drop them, or pass load_weights=False."
            if overrides
            else " The weights and the config come from different models: "
            "re-save the preset."
        )
        raise ValueError(
            f"Preset {label}: the weights in {filename} do not match the "
            f"model built from its config ({len(wrong)} with another shape, "
            f"{len(missing)} missing, {len(extra)} unexpected; "
            f"{'; '.join(details)}).{hint}"
        )
    recorded = recorded_sha256(directory, filename, label)
    if recorded is None:
        # Not an error: presets written by other tools (keras-hub) record
        # none. But a damaged file would load and predict garbage: say so.
        warnings.warn(
            f"Preset {label}: {METADATA_FILE} records no sha256 for "
            f"{filename}, so its integrity cannot be checked (a damaged file "
            "may load and predict wrong results). Re-save it with "
            "save_to_preset, which records one.",
            stacklevel=2,
        )
    else:
        actual = file_sha256(path)
        if actual != recorded:
            raise corrupt_error(
                path,
                label,
                f"its sha256 is {actual} but {METADATA_FILE} records "
                f"{recorded}",
            )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if task:
                target.load_task_weights(path)
            else:
                target.load_weights(path)
        except Exception as error:
            raise ValueError(
                f"Preset {label}: loading {filename} failed: {error}"
            ) from error
    for warning in caught:
        message = str(warning.message)
        if "Skipping variable loading for optimizer" in message:
            # A task saved after compile()/fit() carries its optimizer state;
            # the freshly built task has no optimizer to load it into, and
            # the model's own weights were checked above.
            continue
        if f"{os.sep}saving{os.sep}" in (warning.filename or ""):
            raise ValueError(
                f"Preset {label}: Keras could not load every weight of "
                f"{filename}: {warning.message}"
            )
        warnings.warn_explicit(
            warning.message, warning.category, warning.filename, warning.lineno
        )


# --- building the architecture of a built-in preset ------------------------


def default_preprocessor(task_cls, backbone):
    """The preprocessor presets use: resize to the backbone's image size and
    scale pixels to [-1, 1]."""
    if task_cls.preprocessor_cls is None:
        return None
    converter_cls = task_cls.preprocessor_cls.image_converter_cls
    height, width = backbone.image_shape[:2]
    return task_cls.preprocessor_cls(
        converter_cls(
            image_size=(height, width), scale=1.0 / 127.5, offset=-1.0
        )
    )


def build_backbone(backbone_cls, entry, load_weights, kwargs):
    """Builds the backbone of a built-in preset (random weights)."""
    preset_registry.check_weights(entry, load_weights)
    backbone_kwargs, other = preset_registry.split_kwargs(backbone_cls, kwargs)
    preset_registry.check_unknown_arguments(
        backbone_cls, other, preset_registry.constructor_arguments(backbone_cls)
    )
    config = preset_registry.backbone_config(entry, backbone_kwargs)
    return backbone_cls(**config)


def build_task(task_cls, entry, load_weights, kwargs):
    """Builds the classifier (backbone, preprocessor, head) of a preset with
    random weights."""
    preset_registry.check_weights(entry, load_weights)
    backbone_kwargs, task_kwargs = preset_registry.split_kwargs(
        task_cls.backbone_cls, kwargs
    )
    preset_registry.check_unknown_arguments(
        task_cls,
        task_kwargs,
        (preset_registry.constructor_arguments(task_cls) - {"backbone"})
        | preset_registry.constructor_arguments(task_cls.backbone_cls),
    )
    backbone = task_cls.backbone_cls(
        **preset_registry.backbone_config(entry, backbone_kwargs)
    )
    if "preprocessor" not in task_kwargs:
        task_kwargs["preprocessor"] = default_preprocessor(task_cls, backbone)
    config = {**entry.get("task", {}), **task_kwargs}
    return task_cls(backbone=backbone, **config)


# --- loading ----------------------------------------------------------------


def load_backbone(cls, directory, load_weights, overrides, label):
    """Builds a backbone from a preset directory (and loads its weights)."""
    config = read_config(directory, CONFIG_FILE, label, required=True)
    backbone_cls = class_of(config, CONFIG_FILE, label, cls)
    preset_registry.check_unknown_arguments(
        cls, overrides, preset_registry.constructor_arguments(backbone_cls)
    )
    backbone = _deserialize(_with_overrides(config, overrides))
    if load_weights:
        load_weights_checked(
            backbone,
            directory,
            MODEL_WEIGHTS_FILE,
            label,
            overrides,
            task=False,
        )
    return backbone


def load_task(cls, directory, load_weights, overrides, label):
    """Builds a task (backbone, preprocessor, head) from a preset directory.

    Overriding `num_classes` with a new value rebuilds the head with random
    weights (and drops the saved per-class settings named by the class's
    `per_class_config`); every other weight is loaded.
    """
    backbone_cls = cls.backbone_cls
    backbone_overrides, task_overrides = preset_registry.split_kwargs(
        backbone_cls, overrides
    )
    task_json = read_config(directory, TASK_CONFIG_FILE, label, required=False)
    if task_json is not None:
        task_cls = class_of(task_json, TASK_CONFIG_FILE, label, cls)
    backbone_json = read_config(directory, CONFIG_FILE, label, required=True)
    class_of(backbone_json, CONFIG_FILE, label, backbone_cls)
    if task_json is not None:
        task_config = dict(task_json["config"])
        backbone_config = task_config.pop("backbone", None) or backbone_json
        class_of(backbone_config, TASK_CONFIG_FILE, label, backbone_cls)
        # A task saved without a preprocessor is loaded without one.
        keep_no_preprocessor = task_config.get("preprocessor", {}) is None
        preprocessor_config = task_config.pop("preprocessor", None)
    else:
        task_cls = cls
        task_config = {}
        keep_no_preprocessor = False
        backbone_config = backbone_json
        preprocessor_config = read_config(
            directory, PREPROCESSOR_CONFIG_FILE, label, required=False
        )
        if "num_classes" not in task_overrides:
            raise ValueError(
                f"Preset {label} holds only a backbone (config.json, no "
                "task.json), so it has no classifier head. Pass "
                "num_classes=... to build a new head on it, or load it with "
                f"{backbone_cls.__name__}.from_preset."
            )
    accepted = (
        preset_registry.constructor_arguments(task_cls) - {"backbone"}
    ) | preset_registry.constructor_arguments(backbone_cls)
    preset_registry.check_unknown_arguments(cls, overrides, accepted)
    backbone = _deserialize(
        _with_overrides(backbone_config, backbone_overrides)
    )

    if "preprocessor" in task_overrides:
        preprocessor = task_overrides.pop("preprocessor")
    elif preprocessor_config is not None and task_cls.preprocessor_cls:
        class_of(
            preprocessor_config,
            PREPROCESSOR_CONFIG_FILE,
            label,
            task_cls.preprocessor_cls,
        )
        if "image_shape" in backbone_overrides:
            preprocessor_config = json.loads(json.dumps(preprocessor_config))
            converter = preprocessor_config["config"].get("image_converter")
            if isinstance(converter, dict) and "image_size" in converter.get(
                "config", {}
            ):
                converter["config"]["image_size"] = list(
                    backbone.image_shape[:2]
                )
        preprocessor = _deserialize(preprocessor_config)
    elif keep_no_preprocessor:
        preprocessor = None
    else:
        preprocessor = default_preprocessor(task_cls, backbone)

    new_head = task_json is None or (
        "num_classes" in task_overrides
        and task_overrides["num_classes"] != task_config.get("num_classes")
    )
    if new_head:
        for key in getattr(task_cls, "per_class_config", ()):
            if key not in task_overrides:
                task_config.pop(key, None)
    task = task_cls.from_config(
        {
            **task_config,
            **task_overrides,
            "backbone": backbone,
            "preprocessor": preprocessor,
        }
    )
    if load_weights:
        load_weights_checked(
            backbone,
            directory,
            MODEL_WEIGHTS_FILE,
            label,
            backbone_overrides,
            task=False,
        )
        if not new_head and task.has_task_weights():
            load_weights_checked(
                task,
                directory,
                TASK_WEIGHTS_FILE,
                label,
                task_overrides,
                task=True,
            )
    return task


def load_any(directory, label):
    """Loads whatever a preset directory holds (task if it has task.json)."""
    from keras_hub.models import Backbone
    from keras_hub.models import Task

    task_json = read_config(directory, TASK_CONFIG_FILE, label, required=False)
    if task_json is not None:
        cls = class_of(task_json, TASK_CONFIG_FILE, label, Task)
        return load_task(cls, directory, True, {}, label)
    config = read_config(directory, CONFIG_FILE, label, required=True)
    cls = class_of(config, CONFIG_FILE, label, Backbone)
    return load_backbone(cls, directory, True, {}, label)


def _normalize(value):
    if isinstance(value, (list, tuple)):
        return [_normalize(v) for v in value]
    return value


def check_matches_entry(backbone, entry, overrides, label):
    """Raises if weights published for a registry entry were saved for
    another architecture than the entry describes."""
    expected = preset_registry.backbone_config(entry, overrides)
    actual = backbone.get_config()
    wrong = [
        f"{key}={actual.get(key)!r} (registry: {value!r})"
        for key, value in expected.items()
        if _normalize(actual.get(key)) != _normalize(value)
    ]
    if wrong:
        raise ValueError(
            f"Preset {label}: its weights were saved for another "
            f"architecture than the registry entry describes: "
            f"{', '.join(wrong)}. The registry entry or the published preset "
            "is wrong."
        )


UPCYCLE_ARGUMENTS = (
    "num_experts",
    "num_moe_layers",
    "top_k",
    "normalize_gates",
)


def upcycle_requested(directory, overrides, label):
    """Whether `overrides` ask for experts on a dense preset (one saved with
    `num_moe_layers=0`): then `from_preset` loads it and upcycles it."""
    wanted = overrides.get("num_moe_layers")
    if not isinstance(wanted, int) or isinstance(wanted, bool) or wanted <= 0:
        return False
    config = read_config(directory, CONFIG_FILE, label, required=True)
    return config["config"].get("num_moe_layers") == 0


def _load_upcycled(cls, directory, load_weights, overrides, label):
    """Loads a dense preset and upcycles it (`kmm.upcycle`)."""
    overrides = dict(overrides)
    upcycle_kwargs = {
        k: overrides.pop(k) for k in UPCYCLE_ARGUMENTS if k in overrides
    }
    if hasattr(cls, "backbone_cls"):
        for key in ("superclass_ids", "routing"):
            if key in overrides:
                upcycle_kwargs[key] = overrides.pop(key)
        if "router_pooling" in overrides:
            upcycle_kwargs["router_pooling"] = overrides.pop("router_pooling")
        dense = load_task(cls, directory, load_weights, overrides, label)
    else:
        if "router_pooling" in overrides:
            upcycle_kwargs["router_pooling"] = overrides.pop("router_pooling")
        dense = load_backbone(cls, directory, load_weights, overrides, label)
    return upcycle(dense, **upcycle_kwargs)


def backbone_from_preset(cls, preset, load_weights=True, overrides=None):
    """`Backbone.from_preset` for every family.

    Args:
        cls: the backbone class `from_preset` was called on (its
            `preset_family` selects the built-in presets).
        preset: a built-in name, a local preset directory or
            `hf://org/repo[/revision]`.
        load_weights: bool. Whether to load the preset's weights.
        overrides: dict of backbone arguments replacing the saved ones.

    Returns:
        A backbone (an instance of `cls` or of a subclass).

    Example:

    >>> import keras_mobile_moe as kmm
    >>> backbone = backbone_from_preset(
    ...     kmm.MobileVMoEBackbone, "6x64", load_weights=False)
    >>> backbone.num_layers
    6
    """
    overrides = dict(overrides or {})
    check_load_weights(load_weights)
    entry = preset_registry.find(preset, cls.preset_family)
    if entry is not None:
        entry = preset_registry.trained_entry(entry, load_weights)
        if not load_weights or not entry.get("weights"):
            return build_backbone(cls, entry, load_weights, overrides)
        directory, label = entry_directory(entry, load_weights)
        backbone = load_backbone(cls, directory, True, overrides, label)
        check_matches_entry(backbone, entry, overrides, label)
        return backbone
    directory, label = resolve_path_or_handle(preset, load_weights)
    kind = convert.detect(directory)
    if kind is not None:
        # A timm or keras-hub ViT checkpoint: converted on load.
        return convert.load_backbone(
            cls, directory, kind, load_weights, overrides, label
        )
    if upcycle_requested(directory, overrides, label):
        return _load_upcycled(cls, directory, load_weights, overrides, label)
    return load_backbone(cls, directory, load_weights, overrides, label)


def task_from_preset(cls, preset, load_weights=True, overrides=None):
    """`Task.from_preset` (classifiers) for every family.

    Args:
        cls: the task class `from_preset` was called on.
        preset: a built-in name, a local preset directory or
            `hf://org/repo[/revision]`.
        load_weights: bool. Whether to load the preset's weights.
        overrides: dict of backbone or task arguments replacing the saved
            ones; a new `num_classes` rebuilds the head.

    Returns:
        A task (an instance of `cls` or of a subclass).

    Example:

    >>> import keras_mobile_moe as kmm
    >>> model = task_from_preset(
    ...     kmm.MobileVMoE, "6x64_e10", load_weights=False,
    ...     overrides={"num_classes": 10})
    >>> model.num_classes
    10
    """
    overrides = dict(overrides or {})
    check_load_weights(load_weights)
    if "backbone" in overrides:
        raise ValueError(
            "Received a `backbone` override. from_preset builds the "
            f"backbone from the preset; to use your own, call "
            f"{cls.__name__}(backbone=..., num_classes=...) directly."
        )
    entry = preset_registry.find(preset, cls.preset_family)
    if entry is not None:
        entry = preset_registry.trained_entry(entry, load_weights)
        if not load_weights or not entry.get("weights"):
            return build_task(cls, entry, load_weights, overrides)
        directory, label = entry_directory(entry, load_weights)
        task = load_task(cls, directory, True, overrides, label)
        backbone_overrides, _ = preset_registry.split_kwargs(
            cls.backbone_cls, overrides
        )
        check_matches_entry(task.backbone, entry, backbone_overrides, label)
        return task
    directory, label = resolve_path_or_handle(preset, load_weights)
    kind = convert.detect(directory)
    if kind is not None:
        # A timm or keras-hub ViT checkpoint: converted on load.
        return convert.load_task(
            cls, directory, kind, load_weights, overrides, label
        )
    if upcycle_requested(directory, overrides, label):
        return _load_upcycled(cls, directory, load_weights, overrides, label)
    return load_task(cls, directory, load_weights, overrides, label)


# --- saving -----------------------------------------------------------------
#
# A save never destroys what was there: the preset is written into a staging
# directory next to `preset_dir`, completed (metadata, sha256, model card),
# fsynced, and swapped with `preset_dir` in one step
# (`atomic_io.replace_directory`). A kill or an I/O error at any point leaves
# the previous preset as it was. Files of `preset_dir` that are not part of
# a keras_mobile_moe preset are carried into the new directory (hard links,
# no copy); preset files that keras_mobile_moe did not write are only
# replaced with `overwrite=True`.

_SAVING = threading.local()
# Files a save may produce (keras-hub writes model.weights.json when it
# shards, which saving_preset refuses).
SAVED_FILES = PRESET_FILES + ("model.weights.json",)


def _written_by_us(preset_dir):
    """Whether the preset files in `preset_dir` were written by a
    keras_mobile_moe save (its metadata.json says so)."""
    path = os.path.join(preset_dir, METADATA_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            metadata = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(metadata, dict) and "keras_mobile_moe_version" in metadata


def _is_generated_card(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return MODEL_CARD_MARKER in f.read()
    except OSError:
        return False


def _foreign_preset_files(preset_dir):
    """Preset-named files in `preset_dir` that keras_mobile_moe did not
    write (a user's README.md is never replaced, so it is not listed)."""
    if not os.path.isdir(preset_dir) or _written_by_us(preset_dir):
        return []
    return [
        name
        for name in SAVED_FILES
        if name != README_FILE
        and os.path.lexists(os.path.join(preset_dir, name))
    ]


def _carry_over(preset_dir, staging):
    """Links into `staging` every entry of the old `preset_dir` that the new
    save does not replace and that is not a stale file of an earlier save."""
    ours = _written_by_us(preset_dir)
    written = set(os.listdir(staging))
    for name in os.listdir(preset_dir):
        if name in written:
            continue
        path = os.path.join(preset_dir, name)
        if name == README_FILE:
            if _is_generated_card(path):
                continue  # our card of an earlier save
        elif ours and name in SAVED_FILES:
            continue  # a file of an earlier save that this one does not write
        atomic_io.link_or_copy_tree(path, os.path.join(staging, name))


def _task_names(model):
    """keras-hub's metadata `tasks` for a backbone: the keras-hub task base
    classes (e.g. `ImageClassifier`) of the tasks built on its class."""
    from keras_hub.models import Task

    backbone = getattr(model, "backbone", model)
    names = set()
    stack = list(Task.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if getattr(cls, "backbone_cls", None) is not type(backbone):
            continue
        for base in cls.__mro__[1:]:
            # keras-hub's own task class (ImageClassifier), not our bases.
            if (
                isinstance(base, type)
                and issubclass(base, Task)
                and base.__module__.split(".")[0] == "keras_hub"
            ):
                names.add(base.__name__)
                break
    return sorted(names)


def _finish_preset(model, preset_dir, write_card=True):
    """Completes a saved preset in `preset_dir` (the staging directory):
    metadata (version, family, FLOPs, tasks, sha256 of every weights file)
    and, unless the user has their own README.md, a model card."""
    metadata_path = os.path.join(preset_dir, METADATA_FILE)
    metadata = {}
    if os.path.isfile(metadata_path):
        with open(metadata_path, encoding="utf-8") as f:
            metadata = json.load(f)
    try:
        model_flops = flops.count_flops(model)
    except ValueError:
        model_flops = None
    weights = [
        name
        for name in WEIGHTS_FILES
        if os.path.isfile(os.path.join(preset_dir, name))
    ]
    metadata.update(
        {
            "keras_mobile_moe_version": version.__version__,
            "family": getattr(model, "preset_family", None),
            "class_name": type(model).__name__,
            "flops": model_flops,
            "files_sha256": {
                name: file_sha256(os.path.join(preset_dir, name))
                for name in weights
            },
        }
    )
    if "tasks" in metadata:
        metadata["tasks"] = _task_names(model)
    atomic_io.write_text(metadata_path, json.dumps(metadata, indent=4) + "\n")
    readme = os.path.join(preset_dir, README_FILE)
    if write_card and not os.path.exists(readme):
        atomic_io.write_text(readme, preset_format.model_card(preset_dir))


def check_preset_dir(preset_dir):
    """Returns `preset_dir` as a str after checking it can be saved to."""
    if isinstance(preset_dir, os.PathLike):
        preset_dir = os.fspath(preset_dir)
    if not isinstance(preset_dir, str) or not preset_dir:
        raise ValueError(
            f"Received: preset_dir={preset_dir!r}. Expected a directory path."
        )
    if "://" in preset_dir:
        raise ValueError(
            f"Received: preset_dir={preset_dir!r}. save_to_preset writes a "
            "local directory; save there, then publish it with "
            "kmm.upload_preset('hf://org/repo', preset_dir)."
        )
    if os.path.exists(preset_dir) and not os.path.isdir(preset_dir):
        raise ValueError(
            f"Received: preset_dir={preset_dir!r}, which is a file. Expected "
            "a directory path (it is created if needed)."
        )
    return preset_dir


@contextlib.contextmanager
def saving_preset(model, preset_dir, max_shard_size=None, overwrite=False):
    """Wraps keras-hub's `save_to_preset` to save atomically.

    Yields the directory keras-hub must write into: a staging sibling of
    `preset_dir` for the outermost save (nested saves, e.g. of a task's
    backbone, get the directory they are given). Afterwards it adds our
    metadata (version, family, FLOPs, sha256 of every weights file) and a
    model card, carries over the user's other files, and swaps the staging
    directory with `preset_dir` in one step. On any error the staging
    directory is removed and `preset_dir` is left as it was.

    Args:
        model: the backbone or task being saved.
        preset_dir: str or path-like. The directory to write.
        max_shard_size: must be None: presets keep their weights in one
            `model.weights.h5`.
        overwrite: bool. Whether preset files (`config.json`,
            `metadata.json`, ...) that keras_mobile_moe did not write may be
            replaced. Files of an earlier keras_mobile_moe save are always
            replaced; other files are always kept.

    Returns:
        A context manager yielding the directory to write into.

    Example:

    >>> import tempfile
    >>> import keras_mobile_moe as kmm
    >>> backbone = kmm.MobileVMoEBackbone(
    ...     image_shape=(32, 32, 3), patch_size=8, num_layers=2,
    ...     hidden_dim=16, num_heads=2, mlp_dim=32, num_moe_layers=0)
    >>> folder = tempfile.mkdtemp()
    >>> backbone.save_to_preset(folder)   # uses saving_preset
    >>> sorted(os.listdir(folder))
    ['README.md', 'config.json', 'metadata.json', 'model.weights.h5']
    """
    if max_shard_size is not None:
        raise ValueError(
            f"Received: max_shard_size={max_shard_size!r}. keras_mobile_moe "
            "presets keep their weights in one model.weights.h5; expected "
            "None."
        )
    if not isinstance(overwrite, bool):
        raise ValueError(
            f"Received: overwrite={overwrite!r}. Expected True or False."
        )
    preset_dir = check_preset_dir(preset_dir)
    depth = getattr(_SAVING, "depth", 0)
    if depth > 0:
        _SAVING.depth = depth + 1
        try:
            yield preset_dir
        finally:
            _SAVING.depth = depth
        return
    target = os.path.realpath(preset_dir)
    foreign = _foreign_preset_files(target)
    if foreign and not overwrite:
        raise FileExistsError(
            f"Received: preset_dir={preset_dir!r}, which already holds "
            f"{foreign} not written by keras_mobile_moe (its metadata.json "
            "does not say so). save_to_preset does not replace files it did "
            "not write. Accepted: an empty or new directory, a preset saved "
            "by keras_mobile_moe, or overwrite=True to replace these files "
            "(other files in the directory are always kept)."
        )
    atomic_io.remove_leftovers(target)
    staging = atomic_io.staging_directory(target)
    try:
        _SAVING.depth = 1
        try:
            yield staging
        finally:
            _SAVING.depth = 0
        user_card = os.path.isfile(
            os.path.join(target, README_FILE)
        ) and not _is_generated_card(os.path.join(target, README_FILE))
        _finish_preset(model, staging, write_card=not user_card)
        if os.path.isdir(target):
            _carry_over(target, staging)
        atomic_io.replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# --- publishing -------------------------------------------------------------


def upload_preset(
    uri,
    preset,
    private=None,
    token=None,
    commit_message=None,
    dry_run=False,
):
    """Uploads a preset directory to the Hugging Face Hub.

    The directory is loaded first (configs, classes and weights are checked,
    as `from_preset` would), then `huggingface_hub` creates the repo (if
    needed) and the branch (for `hf://org/repo/branch`) and uploads the
    preset files in one commit, with a model card (`README.md`) written from
    the preset when the directory has none of its own.

    Args:
        uri: str. `hf://org/repo` or `hf://org/repo/branch`.
        preset: path of a preset directory written by `save_to_preset`.
        private: bool or None. Visibility of a newly created repo.
        token: str or None. A Hub token (default: the logged-in one).
        commit_message: str or None.
        dry_run: bool. Check the preset and return the file names that
            would be uploaded, without contacting the Hub.

    Returns:
        The `huggingface_hub` commit info of the upload, or with
        `dry_run=True` the sorted list of file names.

    Example:

    >>> import tempfile
    >>> import keras_mobile_moe as kmm
    >>> folder = tempfile.mkdtemp()
    >>> kmm.MoNEBackbone.from_preset(
    ...     "6x64_mone", load_weights=False, image_shape=(32, 32, 3),
    ...     patch_size=8).save_to_preset(folder)
    >>> kmm.upload_preset("hf://my-org/tiny-mone", folder, dry_run=True)
    ['README.md', 'config.json', 'metadata.json', 'model.weights.h5']
    """
    hub.parse_hf_handle(uri, argument="uri")
    if not isinstance(dry_run, bool):
        raise ValueError(f"Received: dry_run={dry_run!r}. Expected a bool.")
    preset = check_local_directory(preset, argument="preset")
    load_any(preset, label=repr(preset))
    with tempfile.TemporaryDirectory() as staging:
        for name in PRESET_FILES:
            source = os.path.join(preset, name)
            if os.path.isfile(source):
                shutil.copyfile(source, os.path.join(staging, name))
        readme = os.path.join(staging, README_FILE)
        generated = True
        if os.path.exists(readme):
            with open(readme, encoding="utf-8") as f:
                generated = MODEL_CARD_MARKER in f.read()
        if generated:
            with open(readme, "w", encoding="utf-8") as f:
                f.write(preset_format.model_card(staging, handle=uri))
        if dry_run:
            return sorted(os.listdir(staging))
        return hub.upload_folder(
            uri,
            staging,
            private=private,
            token=token,
            commit_message=commit_message,
        )


# --- which family a preset belongs to ----------------------------------------


def family_of_preset(preset):
    """The registered family of a preset, and its backbone arguments.

    For scripts that take any preset (e.g. `training/train.py`): a
    built-in name is looked up in every family's registry; a directory is
    read (its `task.json`, else its `config.json`, checked as `from_preset`
    checks them): the class registered there decides.

    Args:
        preset: a built-in preset name or a local preset directory.

    Returns:
        A tuple `(family, backbone_config)`: a
        `keras_mobile_moe.families.Family` (its `task_cls` builds the
        classifier) and a dict of backbone arguments.

    Example:

    >>> family, config = family_of_preset("6x64_mone")
    >>> family.task_cls.__name__, config["num_layers"]
    ('MoNEImageClassifier', 6)
    """
    registry = preset_registry.load_registry()
    if isinstance(preset, str) and preset in registry:
        entry = registry[preset]
        family = families.get(entry["family"])
        if family is not None:
            return family, preset_registry.backbone_config(entry, {})
    if isinstance(preset, (str, os.PathLike)) and os.path.isdir(preset):
        directory = os.fspath(preset)
        label = repr(directory)
        backbone = read_config(directory, CONFIG_FILE, label, required=True)
        found = (
            read_config(directory, TASK_CONFIG_FILE, label, required=False)
            or backbone
        )
        cls = keras.saving.get_registered_object(found.get("registered_name"))
        family = families.of(cls) if isinstance(cls, type) else None
        if family is not None:
            return family, dict(backbone["config"])
        raise ValueError(
            f"Received: preset={preset!r}, a directory holding a "
            f"{found.get('registered_name')!r}. Accepted: a preset of "
            f"{families.accepted_models()}."
        )
    names = sorted(
        name
        for family in families.all_families()
        for name in preset_registry.presets_of(family.name)
    )
    raise ValueError(
        f"Received: preset={preset!r}. Accepted: a built-in preset name "
        f"({', '.join(names)}) or a preset directory."
    )
