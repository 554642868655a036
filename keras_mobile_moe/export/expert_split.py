"""Expert-split deployment of Mobile V-MoE: a trunk file and one file per
expert, so that a phone keeps only the trunk and ONE expert in memory.

A Mobile V-MoE holds E experts but each image uses one of them (k = 1); a
single-file model must keep all E in memory. Here the trunk (patch
embedding, dense blocks, router) and each expert path (the MoE blocks with
that expert's MLP, the final norm and the head) are separate `.tflite` files,
and `ExpertSplitRunner` runs the trunk, then only the chosen expert's file:
resident weights are about those of the dense ViT, outputs equal the
single-file model's.
"""

import json
import os
import pathlib
import shutil

import keras
from keras import ops

from keras_mobile_moe import atomic_io
from keras_mobile_moe.export.tflite import TFLiteClassifier
from keras_mobile_moe.export.tflite import check_builtin_ops
from keras_mobile_moe.export.tflite import convert_functional
from keras_mobile_moe.export.tflite import convert_in_subprocess
from keras_mobile_moe.export.tflite import load_interpreter
from keras_mobile_moe.layers.transformer_encoder_block import (
    TransformerEncoderBlock,
)

MANIFEST = "expert_split.json"


def _trunk(model):
    backbone = model.backbone
    images = keras.Input(shape=backbone.image_shape, name="images")
    x = backbone.patch_embedding(images)
    num_dense = backbone.num_layers - backbone.num_moe_layers
    for block in backbone.encoder_blocks[:num_dense]:
        x = block(x)
    router_logits, expert_indices, expert_gates = backbone.router(x)
    return keras.Model(
        images,
        {
            "tokens": x,
            "router_logits": router_logits,
            "expert_index": expert_indices,
            "expert_gate": expert_gates,
        },
        name="trunk",
    )


def _expert_path(model, expert):
    """The MoE blocks with only `expert`'s MLP, the final norm and the head."""
    backbone = model.backbone
    num_dense = backbone.num_layers - backbone.num_moe_layers
    num_tokens = backbone.patch_embedding.compute_output_shape(
        (1, *backbone.image_shape)
    )[1]
    tokens = keras.Input(shape=(num_tokens, backbone.hidden_dim), name="tokens")
    gate = keras.Input(shape=(1,), name="expert_gate")
    index = ops.zeros_like(ops.cast(gate, "int32"))
    x = tokens
    for block in backbone.encoder_blocks[num_dense:]:
        single = TransformerEncoderBlock(
            **{
                **block.get_config(),
                "num_experts": 1,
                "top_k": 1,
                "name": block.name,
            }
        )
        single.build((None, num_tokens, backbone.hidden_dim))
        for name in ("attention_norm", "attention", "mlp_norm"):
            getattr(single, name).set_weights(
                getattr(block, name).get_weights()
            )
        for name in ("kernel_in", "bias_in", "kernel_out", "bias_out"):
            stacked = ops.convert_to_numpy(getattr(block.mlp, name))
            getattr(single.mlp, name).assign(stacked[expert : expert + 1])
        x = single(x, index, gate)
    x = backbone.final_norm(x)
    if model.pooling == "token":
        x = x[:, 0, :]
    else:
        x = ops.mean(x[:, int(backbone.use_class_token) :, :], axis=1)
    logits = model.output_dense(x)
    return keras.Model(
        [tokens, gate], {"logits": logits}, name=f"expert_{expert}"
    )


def to_tflite_expert_split(model, directory, quantization="none"):
    """Exports a Mobile V-MoE as a trunk file and one file per expert.

    Args:
        model: a `kmm.MobileVMoE` with `top_k=1`.
        directory: output folder; gets `trunk.tflite`, `expert_{e}.tflite`
            and `expert_split.json`.
        quantization: `"none"`, `"float16"` or `"dynamic"` (weight-only
            modes; they need no calibration data).

    Returns:
        The manifest dict (file names and sizes in bytes).

    Example:

    >>> import tempfile, numpy as np, keras_mobile_moe as kmm
    >>> model = kmm.MobileVMoE(kmm.MobileVMoEBackbone(
    ...     image_shape=(32, 32, 3), patch_size=8, num_layers=2, hidden_dim=16,
    ...     num_heads=2, mlp_dim=32, num_experts=3, num_moe_layers=1),
    ...     num_classes=10, routing="learned")
    >>> manifest = to_tflite_expert_split(model, tempfile.mkdtemp())
    >>> len(manifest["experts"])
    3
    """
    backbone = getattr(model, "backbone", None)
    if backbone is None or not getattr(backbone, "is_moe", False):
        raise ValueError(
            "to_tflite_expert_split needs a Mobile V-MoE classifier with MoE "
            f"layers; received {type(model).__name__}."
        )
    if getattr(backbone, "is_token_routed", False):
        raise ValueError(
            "Expert-split export needs one router per image (router_type="
            "'image'); this model routes every token (router_type='token'), "
            "so all experts can run for one image. Export it as one file "
            "with kmm.export.to_tflite."
        )
    if backbone.top_k != 1:
        raise ValueError(
            f"Expert-split export needs top_k=1 (one expert per image); the "
            f"model has top_k={backbone.top_k}."
        )
    if quantization not in ("none", "float16", "dynamic"):
        raise ValueError(
            f"Received: quantization={quantization!r}. Expected one of "
            "['none', 'float16', 'dynamic'] for expert-split export."
        )
    # The files only work together: they are written into a staging
    # directory and swapped in at once (other files in `directory` are
    # kept), so an error or a kill leaves the previous export as it was.
    target = pathlib.Path(directory)
    atomic_io.remove_leftovers(target)
    staging = pathlib.Path(atomic_io.staging_directory(target))
    try:
        manifest = _write_expert_split(model, staging, quantization)
        if target.is_dir():
            for entry in os.listdir(target):
                if _is_export_file(entry) or (staging / entry).exists():
                    continue
                atomic_io.link_or_copy_tree(target / entry, staging / entry)
        atomic_io.replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _is_export_file(name):
    return name in ("trunk.tflite", MANIFEST) or (
        name.startswith("expert_") and name.endswith(".tflite")
    )


def _write_expert_split(model, directory, quantization):
    backbone = model.backbone
    if keras.config.backend() != "tensorflow":
        convert_in_subprocess(
            model,
            [
                "--expert_split_dir",
                str(directory),
                "--quantization",
                quantization,
            ],
        )
        return json.loads((directory / MANIFEST).read_text())
    parts = {"trunk.tflite": _trunk(model)}
    for expert in range(backbone.num_experts):
        parts[f"expert_{expert}.tflite"] = _expert_path(model, expert)
    files = {}
    for name, part in parts.items():
        path = directory / name
        atomic_io.write_bytes(path, convert_functional(part, quantization))
        check_builtin_ops(load_interpreter(path, xnnpack=False))
        files[name] = {"file": name, "bytes": path.stat().st_size}
    manifest = {
        "trunk": files.pop("trunk.tflite"),
        "experts": list(files.values()),
        "quantization": quantization,
    }
    atomic_io.write_json(directory / MANIFEST, manifest)
    return manifest


class ExpertSplitRunner:
    """Runs an expert-split export: the trunk, then only the chosen expert.

    At most one expert file is loaded at a time, so resident weights are the
    trunk's plus one expert path's.

    Args:
        directory: a folder written by `to_tflite_expert_split`.
        num_threads: int. Interpreter threads.

    Call arguments:
        image: float32 `[1, height, width, channels]` or `[height, width,
            channels]`, in the model's input format.

    Returns:
        A dict with `logits`, `router_logits` and `expert` (the int index).
    """

    def __init__(self, directory, num_threads=1):
        self.directory = pathlib.Path(directory)
        self.manifest = json.loads((self.directory / MANIFEST).read_text())
        self.num_threads = num_threads
        self.trunk = TFLiteClassifier(
            self.directory / self.manifest["trunk"]["file"], num_threads
        )
        self.loaded_expert = None
        self.expert_model = None

    def __call__(self, image):
        trunk = self.trunk(image)
        expert = int(trunk["expert_index"].reshape(-1)[0])
        if expert != self.loaded_expert:
            self.expert_model = None  # release the previous expert first
            file = self.manifest["experts"][expert]["file"]
            self.expert_model = TFLiteClassifier(
                self.directory / file, self.num_threads
            )
            self.loaded_expert = expert
        outputs = self.expert_model.run(
            tokens=trunk["tokens"],
            expert_gate=trunk["expert_gate"].reshape(1, 1).astype("float32"),
        )
        return {
            "logits": outputs["logits"],
            "router_logits": trunk["router_logits"],
            "expert": expert,
        }
