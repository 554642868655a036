"""The registry of built-in presets, read from the top-level `presets/` folder.

Each preset is one JSON file (shipped in the wheel as the package
`keras_mobile_moe._presets`). Its fields:

- `name`, `aliases`: the names it is loaded by (`"12x192_e10"`,
  `["tiny_e10"]`).
- `family`: the model family (`"mobile_vmoe"`, `"mone"`, ...); a family's
  backbone class sets `preset_family` to it (`keras_mobile_moe.families`).
- `class`: the task class the preset builds (`"MobileVMoEImageClassifier"`).
- `description`, `variant` (a scale of `keras_mobile_moe.variants`),
  `backbone` and `task` (arguments on top of the scale), `params` and `flops`
  (measured on the built model by `scripts/make_presets.py`).
- `training_data` and `accuracy`: `null` until the preset is trained;
  then a string and a dict such as `{"dataset": "cifar100", "top1": 0.71}`.
- `weights`: where the trained weights live: `null` (architecture only), a
  folder under `presets/` holding a keras-hub preset directory (shipped in
  the wheel), or a Hugging Face handle `"hf://org/repo[/revision]"`.

Aliases point at the same entry. `from_preset` reads the registry through
`keras_mobile_moe.preset_loader`. The registry is data only (layer 3 of the
preset stack, see `keras_mobile_moe.preset_format`): it builds no model;
the loader builds a preset's architecture from its entry.

Names follow timm's `architecture.tag`: `"6x64_e10"` is an architecture,
`"6x64_e10.cifar100"` the same architecture trained on CIFAR-100 (its entry
may change the input size or the head). A tag is also loadable through every
alias of its architecture (`"tiny_e10.cifar100"` = `"12x192_e10.cifar100"`).
Loading an architecture name with weights picks its best trained tag
(`trained_entry`); `load_weights=False` builds the architecture untrained.
"""

import difflib
import functools
import importlib.resources
import inspect
import json
import os
import pathlib
import re

from keras_mobile_moe import hub
from keras_mobile_moe import variants

ACCEPTED_FORMS = (
    "a built-in preset name, a local preset directory (a folder with "
    "config.json, as written by save_to_preset), or a Hugging Face handle "
    "'hf://org/repo' or 'hf://org/repo/revision'"
)

# field -> (accepted types, required)
ENTRY_FIELDS = {
    "name": ((str,), True),
    "aliases": ((list,), False),
    "family": ((str,), True),
    "class": ((str,), True),
    "description": ((str,), True),
    "variant": ((str,), True),
    "backbone": ((dict,), True),
    "task": ((dict,), True),
    "params": ((int,), True),
    "flops": ((int,), True),
    "training_data": ((str, type(None)), False),
    "accuracy": ((dict, type(None)), False),
    "weights": ((str, type(None)), True),
}

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


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


def validate_entry(entry, source):
    """Raises `ValueError` unless `entry` is a well-formed registry entry.

    Args:
        entry: dict read from a preset JSON file.
        source: where it was read from, for the error message.

    Returns:
        The entry.

    Example:

    >>> entry = load_registry()["tiny_e10"]
    >>> validate_entry(entry, "tiny_e10")["variant"]
    '12x192'
    """
    if not isinstance(entry, dict):
        raise ValueError(
            f"Preset file {source} holds {type(entry).__name__}, expected a "
            "JSON object."
        )
    for field, (types, required) in ENTRY_FIELDS.items():
        if field not in entry:
            if required:
                raise ValueError(
                    f"Preset file {source} has no {field!r} field. Required "
                    "fields: "
                    f"{sorted(f for f, (_, r) in ENTRY_FIELDS.items() if r)}."
                )
            continue
        value = entry[field]
        if isinstance(value, bool) or not isinstance(value, types):
            accepted = " or ".join(
                "null" if t is type(None) else t.__name__ for t in types
            )
            raise ValueError(
                f"Preset file {source}: field {field!r} is {value!r}; "
                f"expected {accepted}."
            )
    for name in [entry["name"], *entry.get("aliases", [])]:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(
                f"Preset file {source}: name {name!r} is not a valid preset "
                "name (letters, digits, '_', '.', '-'; no '/')."
            )
    if entry["weights"] is not None:
        weights_location(entry)
    return entry


@functools.lru_cache(maxsize=None)
def _read_registry(directory):
    registry = {}
    for path in sorted(pathlib.Path(directory).glob("*.json")):
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as error:
            raise ValueError(
                f"Preset file {path} is not valid JSON: {error}"
            ) from error
        validate_entry(entry, path)
        if path.stem != entry["name"]:
            raise ValueError(
                f"Preset file {path} is named {path.stem!r} but holds the "
                f"preset {entry['name']!r}; the file name must be the name."
            )
        for name in [entry["name"], *entry.get("aliases", [])]:
            if name in registry:
                raise ValueError(f"Duplicate preset name {name!r} in {path}.")
            registry[name] = entry
    for entry in {id(e): e for e in registry.values()}.values():
        architecture, dot, tag = entry["name"].partition(".")
        if not dot:
            continue
        base = registry.get(architecture)
        if base is None or base["family"] != entry["family"]:
            raise ValueError(
                f"Preset {entry['name']!r}: the name is 'architecture.tag' "
                f"but {architecture!r} is not a built-in "
                f"{entry['family']!r} preset."
            )
        for alias in base.get("aliases", []):
            name = f"{alias}.{tag}"
            if registry.setdefault(name, entry) is not entry:
                raise ValueError(f"Duplicate preset name {name!r}.")
    return registry


def load_registry():
    """Returns {name or alias: entry} for every preset JSON file.

    Returns:
        A dict mapping each preset name and alias to its registry entry.

    Example:

    >>> registry = load_registry()
    >>> registry["tiny_e10"] is registry["12x192_e10"]
    True
    """
    return _read_registry(str(presets_dir()))


def presets_of(family):
    """Returns {name or alias: entry} of one model family.

    Args:
        family: str, e.g. `"mobile_vmoe"`.

    Returns:
        A dict of the family's presets, aliases included.

    Example:

    >>> "tiny_e10" in presets_of("mobile_vmoe")
    True
    """
    return {
        name: entry
        for name, entry in load_registry().items()
        if entry["family"] == family
    }


def is_handle_or_path(preset):
    """Whether `preset` names a directory or a remote handle, not a name."""
    return (
        "://" in preset
        or os.sep in preset
        or "/" in preset
        or (os.path.exists(preset))
    )


def find(preset, family):
    """Returns the registry entry of a built-in name, or None for a handle or
    a local directory. Raises a helpful error for an unknown name.

    Built-in names win over a same-named folder in the working directory;
    write `"./name"` for the folder.

    Args:
        preset: str or path-like. What the user passed to `from_preset`.
        family: str. The family of the class `from_preset` was called on.

    Returns:
        The registry entry, or None when `preset` is a handle or a path.

    Example:

    >>> find("tiny_e10", "mobile_vmoe")["name"]
    '12x192_e10'
    >>> find("hf://org/repo", "mobile_vmoe") is None
    True
    """
    if isinstance(preset, os.PathLike):
        return None
    if not isinstance(preset, str) or not preset:
        raise ValueError(
            f"Received: preset={preset!r}. Expected {ACCEPTED_FORMS}."
        )
    known = presets_of(family)
    if preset in known:
        return known[preset]
    if is_handle_or_path(preset):
        return None
    registry = load_registry()
    if preset in registry:
        other = registry[preset]
        raise ValueError(
            f"Preset {preset!r} is a {other['family']!r} preset (class "
            f"{other['class']}), not a {family!r} one. Load it with "
            f"{other['class']}.from_preset, or pick one of {sorted(known)}."
        )
    close = difflib.get_close_matches(preset, list(known), n=5, cutoff=0.5)
    hint = f" Did you mean {close}?" if close else ""
    raise ValueError(
        f"Unknown preset {preset!r} (no built-in preset of that name and no "
        f"such directory).{hint} Accepted: {ACCEPTED_FORMS}. Built-in names: "
        f"{sorted(known)}."
    )


def weights_location(entry):
    """Where a registry entry's weights live.

    Args:
        entry: a registry entry.

    Returns:
        None (architecture only), `("hf", handle)`, or `("dir", path)` for
        a preset directory shipped under `presets/`.

    Example:

    >>> weights_location({"name": "x", "weights": None}) is None
    True
    >>> weights_location({"name": "x", "weights": "hf://org/repo/v1"})
    ('hf', 'hf://org/repo/v1')
    """
    weights = entry.get("weights")
    if weights is None:
        return None
    if not isinstance(weights, str) or not weights:
        raise ValueError(
            f"Preset {entry.get('name')!r}: weights={weights!r}. Expected "
            "null, a folder under presets/, or 'hf://org/repo[/revision]'."
        )
    if "://" in weights:
        hub.parse_hf_handle(weights, argument="weights")
        return ("hf", weights)
    parts = pathlib.PurePosixPath(weights).parts
    if (
        os.path.isabs(weights)
        or weights.startswith(("/", "\\"))
        or "\\" in weights
        or not parts
        or any(
            part in ("..", ".") or not _NAME.fullmatch(part) for part in parts
        )
    ):
        raise ValueError(
            f"Preset {entry.get('name')!r}: weights={weights!r} is not a "
            "plain folder name inside presets/ (no '..', no absolute path). "
            "Expected null, a folder under presets/, or "
            "'hf://org/repo[/revision]'."
        )
    return ("dir", str(presets_dir().joinpath(*parts)))


def constructor_arguments(cls):
    """The keyword arguments `cls.__init__` accepts (without `kwargs`)."""
    return set(inspect.signature(cls.__init__).parameters) - {
        "self",
        "kwargs",
        "args",
    }


def split_kwargs(backbone_cls, kwargs):
    """Splits overrides into backbone arguments and the rest."""
    names = constructor_arguments(backbone_cls)
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
    """Raises if `load_weights` asks for weights a preset does not have."""
    if load_weights and not entry.get("weights"):
        raise ValueError(
            f"Preset {entry['name']!r} has no published weights yet "
            "(its registry entry has weights=null). Pass load_weights=False "
            "to build the architecture with random weights."
        )


def trained_presets(family):
    """The canonical names of a family's presets that have weights.

    Example:

    >>> "6x64_e10.cifar100" in trained_presets("mobile_vmoe")
    True
    """
    return sorted(
        {e["name"] for e in presets_of(family).values() if e.get("weights")}
    )


def trained_entry(entry, load_weights):
    """The entry `from_preset` loads for `entry` (timm's default tag).

    An architecture name without weights asked for with `load_weights=True`
    resolves to its trained tag (`"6x64_e10"` -> `"6x64_e10.cifar100"`), the
    one with the best recorded test top-1; an entry with weights, or
    `load_weights=False`, stays as it is.

    Args:
        entry: a registry entry.
        load_weights: bool.

    Returns:
        A registry entry.

    Raises:
        ValueError: weights asked for and the architecture has no trained
            tag; the message lists the trained presets.

    Example:

    >>> entry = load_registry()["6x64_e10"]
    >>> trained_entry(entry, True)["name"]
    '6x64_e10.cifar100'
    >>> trained_entry(entry, False)["name"]
    '6x64_e10'
    """
    if not load_weights or entry.get("weights"):
        return entry
    tags = [
        e
        for e in {
            id(e): e for e in presets_of(entry["family"]).values()
        }.values()
        if e["name"].partition(".")[0] == entry["name"] and e.get("weights")
    ]
    if not tags:
        raise ValueError(
            f"Preset {entry['name']!r} has no published weights yet "
            "(its registry entry has weights=null and no trained tag "
            f"'{entry['name']}.<tag>' exists). Pass load_weights=False to "
            "build the architecture with random weights, or load a trained "
            f"preset: {trained_presets(entry['family'])}."
        )
    return max(tags, key=lambda e: (e.get("accuracy") or {}).get("top1") or 0)


def check_unknown_arguments(cls, kwargs, accepted):
    """Raises a clear error for overrides that no constructor accepts.

    Besides `accepted`, Keras's `name` and `dtype` are accepted, and
    keras-hub's `compile` for tasks.
    """
    accepted = set(accepted) | {"name", "dtype"}
    if hasattr(cls, "backbone_cls"):
        accepted.add("compile")
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(
            f"Unknown argument(s) for {cls.__name__}.from_preset: {unknown}. "
            f"Accepted overrides: {sorted(accepted)}."
        )


def markdown_table(family=None):
    """The README table of built-in presets, generated from the registry.

    Args:
        family: str or None. Only this family's presets (None: all).

    Returns:
        A markdown table, one row per preset (aliases in their row).

    Example:

    >>> print(markdown_table("mobile_vmoe").splitlines()[0])
    | preset | aliases | family | scale | params | MFLOPs | weights |
    trained on | top-1 | description |
    """
    rows = [
        "| preset | aliases | family | scale | params | MFLOPs | weights "
        "| trained on | top-1 | description |",
        "|---|---|---|---|---:|---:|---|---|---:|---|",
    ]
    entries = {id(e): e for e in load_registry().values()}.values()
    entries = [e for e in entries if family in (None, e["family"])]

    def order(entry):
        scale = re.fullmatch(r"(\d+)x(\d+)", entry["variant"])
        layers, width = map(int, scale.groups()) if scale else (0, 0)
        return (entry["family"], -width, -layers, entry["name"])

    for entry in sorted(entries, key=order):
        accuracy = entry.get("accuracy") or {}
        top1 = accuracy.get("top1")
        rows.append(
            "| `{name}` | {aliases} | {family} | {variant} | {params:.2f}M | "
            "{flops:.1f} | {weights} | {data} | {top1} | "
            "{description} |".format(
                name=entry["name"],
                aliases=", ".join(f"`{a}`" for a in entry.get("aliases", []))
                or "",
                family=entry["family"],
                variant=entry["variant"],
                params=entry["params"] / 1e6,
                flops=entry["flops"] / 1e6,
                weights=f"`{entry['weights']}`" if entry["weights"] else "none",
                data=entry.get("training_data") or "",
                top1="" if top1 is None else f"{100 * top1:.1f}%",
                description=entry["description"].replace("|", "/"),
            )
        )
    return "\n".join(rows)
