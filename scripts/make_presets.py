"""Writes the architecture presets of every paper scale into `presets/`.

One JSON file per preset: dense `{L}x{D}` and MoE `{L}x{D}_e10` (E=10, k=1,
L=2) of the Mobile V-MoE family, and MoNE `{L}x{D}_mone` (E=4 nested experts,
capacity budget 0.5) for the 12 scales of `keras_mobile_moe.variants`, with the
aliases `tiny`/`small` (+ `_e10`, `_mone`), parameter counts and FLOPs
measured on the built model. Entries that already name weights keep them.

Usage:
    KERAS_BACKEND=jax python scripts/make_presets.py
"""

import json
import pathlib

import keras_mobile_moe as kmm
from keras_mobile_moe import variants

PRESETS = pathlib.Path(__file__).resolve().parents[1] / "presets"
ALIAS_OF = {scale: alias for alias, scale in variants.ALIASES.items()}
MOE = {"num_experts": 10, "top_k": 1, "num_moe_layers": 2}
DENSE = {"num_experts": 0, "top_k": 1, "num_moe_layers": 0}
MONE = {"num_nested_experts": 4, "capacity_budget": 0.5}


def entry_for(scale, moe):
    suffix = "_e10" if moe else ""
    layers, width = scale.split("x")
    kind = "Mobile V-MoE (E=10, k=1, last 2 blocks MoE)" if moe else "dense ViT"
    entry = {
        "name": scale + suffix,
        "aliases": [ALIAS_OF[scale] + suffix] if scale in ALIAS_OF else [],
        "family": "mobile_vmoe",
        "class": "MobileVMoEImageClassifier",
        "description": (
            f"{kind}, {layers} layers x width {width}, patch 32 at 224x224, "
            "1000-class head. Architecture only (random weights)."
        ),
        "variant": scale,
        "backbone": MOE if moe else DENSE,
        "task": {"num_classes": 1000},
        "training_data": None,
        "accuracy": None,
        "weights": None,
    }
    return entry


def mone_entry_for(scale):
    layers, width = scale.split("x")
    return {
        "name": scale + "_mone",
        "aliases": [ALIAS_OF[scale] + "_mone"] if scale in ALIAS_OF else [],
        "family": "mone",
        "class": "MoNEImageClassifier",
        "description": (
            "MoNE (4 nested experts, Expert Preferred Routing, capacity "
            f"budget 0.5), {layers} layers x width {width}, patch 32 at "
            "224x224, mean pooling, 1000-class head. Architecture only "
            "(random weights)."
        ),
        "variant": scale,
        "backbone": MONE,
        "task": {"num_classes": 1000},
        "training_data": None,
        "accuracy": None,
        "weights": None,
    }


def main():
    for scale in variants.VARIANTS:
        for moe in (False, True, "mone"):
            if moe == "mone":
                entry = mone_entry_for(scale)
            else:
                entry = entry_for(scale, moe)
            path = PRESETS / f"{entry['name']}.json"
            if path.exists():
                old = json.loads(path.read_text())
                entry["weights"] = old.get("weights")
                entry["training_data"] = old.get("training_data")
                entry["accuracy"] = old.get("accuracy")
            # Measure on the real model so the numbers cannot drift.
            family = kmm.MoNE if moe == "mone" else kmm.MobileVMoE
            backbone = family.backbone_cls(
                **variants.get_variant(scale), **entry["backbone"]
            )
            model = family(backbone, num_classes=1000)
            entry["params"] = int(model.count_params())
            entry["flops"] = kmm.count_flops(model)
            path.write_text(json.dumps(entry, indent=2) + "\n")
            print(
                f"{entry['name']:>10}: {entry['params'] / 1e6:6.2f}M params, "
                f"{entry['flops'] / 1e6:7.1f}M FLOPs"
            )


if __name__ == "__main__":
    main()
