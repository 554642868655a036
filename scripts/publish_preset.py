"""Publishes a trained preset directory as a built-in preset with its weights.

Copies a preset written by `training/train.py` (`<workdir>/preset`) into
`presets/<name>/`, stores its weights compactly (float16 arrays in
gzip-compressed HDF5, about 1.5x smaller than float32; they load into the
float32 model), checks that the compact copy predicts like the original, and
writes the registry entry `presets/<name>.json` (architecture, parameters and
FLOPs measured on the built model, training data, accuracy, weights folder).

Usage:
  KERAS_BACKEND=jax python scripts/publish_preset.py \
      --preset_dir runs/6x64_e10/preset --name 6x64_e10_cifar100 \
      --results runs/6x64_e10/results.json
"""

import argparse
import json
import pathlib
import shutil

import h5py
import numpy as np

import keras_mobile_moe as kmm
from keras_mobile_moe import atomic_io
from keras_mobile_moe import preset_loader

PRESETS = pathlib.Path(__file__).resolve().parents[1] / "presets"
WEIGHTS = "model.weights.h5"
WEIGHT_FILES = ("model.weights.h5", "task.weights.h5")


def compact_weights(source, target):
    """Copies an HDF5 weights file with float32 arrays stored as float16."""

    def copy(src, dst):
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        for name, item in src.items():
            if isinstance(item, h5py.Group):
                copy(item, dst.create_group(name))
                continue
            data = item[()]
            if isinstance(data, np.ndarray) and data.dtype == np.float32:
                data = data.astype(np.float16)
            if isinstance(data, np.ndarray) and data.size > 16:
                dst.create_dataset(
                    name,
                    data=data,
                    compression="gzip",
                    compression_opts=9,
                    shuffle=True,
                )
            else:
                dst.create_dataset(name, data=data)
            for key, value in item.attrs.items():
                dst[name].attrs[key] = value

    with h5py.File(source, "r") as src, h5py.File(target, "w") as dst:
        copy(src, dst)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset_dir", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--results", help="results.json of the run (accuracy).")
    parser.add_argument(
        "--presets_dir", default=str(PRESETS), help="The registry folder."
    )
    parser.add_argument(
        "--training_note",
        default="",
        help="Appended to the training_data field.",
    )
    return parser.parse_args()


def main():
    args = parse_args()
    source = pathlib.Path(args.preset_dir)
    presets = pathlib.Path(args.presets_dir)
    target = presets / args.name
    original = kmm.MobileVMoE.from_preset(str(source))
    # Everything is written into a staging folder next to the target and
    # swapped in at the end (the registry entry last): an error or a kill
    # leaves the previously published preset as it was.
    presets.mkdir(parents=True, exist_ok=True)
    atomic_io.remove_leftovers(target)
    staging = pathlib.Path(atomic_io.staging_directory(target))
    try:
        entry = publish_into(args, source, staging, original)
        atomic_io.replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    atomic_io.write_text(
        presets / f"{args.name}.json", json.dumps(entry, indent=2) + "\n"
    )
    size = (target / WEIGHTS).stat().st_size
    print(
        f"wrote {presets / args.name}.json and {target}/ "
        f"({size / 1e6:.2f} MB of weights, float32 original "
        f"{(source / WEIGHTS).stat().st_size / 1e6:.2f} MB)"
    )


def copy_compact(source, target):
    """Copies the preset folder with compact weights; returns its metadata
    (with the new weights' hashes)."""
    for path in source.iterdir():
        if path.name not in WEIGHT_FILES and path.is_file():
            shutil.copy(path, target / path.name)
    metadata = json.loads((target / "metadata.json").read_text())
    for name in WEIGHT_FILES:
        if (source / name).is_file():
            compact_weights(source / name, target / name)
            # The loader checks every weights file against these hashes.
            metadata["files_sha256"][name] = preset_loader.file_sha256(
                str(target / name)
            )
    metadata["weights_storage"] = "float16 arrays, gzip-compressed HDF5"
    return metadata


def check_compact(original, target):
    """Exits unless the compact copy predicts like the original."""
    compact = kmm.MobileVMoE.from_preset(str(target))
    images = kmm.datasets.cifar100.load_fixture()["x_test"]
    a = original.predict(images, verbose=0)
    b = compact.predict(images, verbose=0)
    agreement = float(np.mean(a.argmax(-1) == b.argmax(-1)))
    max_diff = float(np.abs(a - b).max())
    print(
        f"float16 storage: top-1 agreement {agreement:.4f}, max |logit diff| "
        f"{max_diff:.2e} on {len(images)} fixture images"
    )
    if agreement < 0.99:
        raise SystemExit(
            "The compact weights change predictions; not published."
        )


def registry_entry(args, original, training, results):
    """The preset's registry entry: architecture, data, accuracy, FLOPs."""
    test_top1 = results.get("test_top1", training.get("test_top1"))
    router = results.get(
        "test_router_accuracy", training.get("test_router_accuracy")
    )
    backbone = original.backbone
    scale = f"{backbone.num_layers}x{backbone.hidden_dim}"
    moe = bool(backbone.is_moe)
    entry_backbone = {
        "num_experts": backbone.num_experts if moe else 0,
        "top_k": backbone.top_k,
        "num_moe_layers": backbone.num_moe_layers if moe else 0,
    }
    task = {"num_classes": original.num_classes}
    if moe and original.superclass_ids:
        task["routing"] = original.routing
        task["superclass_ids"] = [int(i) for i in original.superclass_ids]
    kind = (
        f"Mobile V-MoE (E={backbone.num_experts}, k={backbone.top_k}, last "
        f"{backbone.num_moe_layers} blocks MoE)"
        if moe
        else "dense ViT"
    )
    routing = training.get("routing", {}) or {}
    groups = routing.get("superclasses")
    source_of_groups = ""
    if groups == "coarse":
        source_of_groups = ", router trained on CIFAR-100's 20 coarse classes"
    elif groups:
        source_of_groups = (
            ", router trained on super-classes discovered from the dense model"
        )
    epochs = training.get("epochs")
    return {
        "name": args.name,
        "aliases": [],
        "family": "mobile_vmoe",
        "class": "MobileVMoEImageClassifier",
        "description": (
            f"{kind}, {backbone.num_layers} layers x width "
            f"{backbone.hidden_dim}, patch {backbone.patch_size} at "
            f"{backbone.image_shape[0]}x{backbone.image_shape[1]}, trained on "
            f"CIFAR-100 for {epochs} epochs{source_of_groups}; test top-1 "
            f"{100 * test_top1:.2f}%. Takes raw 32x32 CIFAR images."
        ),
        "variant": scale,
        "backbone": entry_backbone,
        "task": task,
        "training_data": (
            f"CIFAR-100 ({training.get('train_images')} training images, "
            f"{training.get('val_images')} held out), {epochs} epochs, "
            f"recipe {training.get('recipe', {}).get('name')}, seed "
            f"{training.get('seed')}"
            + (f"; {args.training_note}" if args.training_note else "")
        ),
        "accuracy": {
            "dataset": "cifar100",
            "split": "test",
            "top1": round(float(test_top1), 4),
            **(
                {"router_accuracy": round(float(router), 4)}
                if router is not None
                else {}
            ),
        },
        "weights": args.name,
        "params": int(original.count_params()),
        "flops": int(kmm.count_flops(original)),
    }


def record_publication(args, target, metadata, entry, evaluation):
    """The model card and metadata say what the published numbers are."""
    published = {
        "name": args.name,
        "test_top1": entry["accuracy"]["top1"],
        "test_router_accuracy": entry["accuracy"].get("router_accuracy"),
        "test_evaluation": evaluation or "train.py, at the end of training",
        "weights_storage": metadata["weights_storage"],
        "note": args.training_note or None,
    }
    metadata["published"] = published
    (target / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    lines = [
        "",
        f"## Published as `{args.name}`",
        "",
        f"- test top-1: {published['test_top1']:.4f} on CIFAR-100's 10,000 "
        "test images"
        + (
            f" (re-evaluated with `{evaluation['command']}`)"
            if evaluation
            else ""
        ),
    ]
    if published["test_router_accuracy"] is not None:
        lines.append(
            f"- test router accuracy: {published['test_router_accuracy']:.4f}"
        )
    lines.append(f"- weights: {published['weights_storage']}")
    if args.training_note:
        lines.append(f"- note: {args.training_note}")
    with open(target / "README.md", "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def publish_into(args, source, target, original):
    """Writes the published preset folder into `target` (a staging folder);
    returns its registry entry."""
    metadata = copy_compact(source, target)
    (target / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    check_compact(original, target)
    results = (
        json.loads(pathlib.Path(args.results).read_text())
        if args.results
        else {}
    )
    entry = registry_entry(
        args, original, metadata.get("training", {}), results
    )
    record_publication(
        args, target, metadata, entry, results.get("test_evaluation")
    )
    return entry


if __name__ == "__main__":
    main()
