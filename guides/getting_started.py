"""
# Getting started with keras_mobile_moe

**What you will learn:** how to load a pretrained Mobile V-MoE from a
preset, classify real images with it, count what one image costs in FLOPs,
and compare it with a dense vision transformer (ViT) of the same cost.

## The idea in one paragraph

A vision transformer cuts an image into patches, turns each patch into a
vector (a *token*) and sends all tokens through a stack of identical blocks
(attention + a small MLP). A *mixture of experts* (MoE) replaces the MLP of
some blocks with several MLPs, the *experts*, and a small *router* network
decides which expert processes the input. Mobile V-MoE (Daxberger et al.,
2023) makes this cheap enough for phones: the router looks at the whole image
once and picks **one** expert for **all** of its tokens. So an image pays the
FLOPs of a dense ViT, while the model as a whole holds E times as many MLP
parameters, each expert specialising on a group of related classes (a
*super-class*, e.g. "vehicles").

## How to run this guide

```bash
KERAS_BACKEND=jax python guides/getting_started.py     # or tensorflow / torch
```

Every guide in `guides/` reads the same environment variables:

- `KMM_GUIDE_PRESET`: the Mobile V-MoE preset to load (a built-in name, a
  preset directory or `hf://org/repo`); default `6x64_e10.cifar100`, a
  6-layer, width-64 Mobile V-MoE with 10 experts trained on CIFAR-100.
- `KMM_GUIDE_DENSE_PRESET`: its dense twin, default `6x64.cifar100`.
- `KMM_CIFAR100_PATH`: the full CIFAR-100 `.npz`; without it the guides use
  the small CIFAR-100 cut that ships with the package (and say so).
- `KMM_GUIDE_OUTPUT_DIR`: where plots and files go (default: a new
  temporary directory).
- `KMM_GUIDE_SMOKE=1`: a reduced run (fewer images, fewer steps), used by
  the tests.

This guide takes well under a minute on 2 CPU cores.
"""

import json
import os
import time

import guide_helpers
import numpy as np

import keras_mobile_moe as kmm

SMOKE = guide_helpers.smoke_mode()
PRESET = os.environ.get("KMM_GUIDE_PRESET", "6x64_e10.cifar100")
DENSE_PRESET = os.environ.get("KMM_GUIDE_DENSE_PRESET", "6x64.cifar100")
OUTPUT_DIR = guide_helpers.output_dir("kmm_getting_started_")

"""
## Load a pretrained Mobile V-MoE

`kmm.MobileVMoE` is a Keras image classifier (a keras-hub `ImageClassifier`).
`from_preset` builds the architecture stored in the preset and loads its
weights. `kmm.MobileVMoE.presets` lists the built-in names; the same call
accepts a local directory written by `model.save_to_preset(...)` or
`training/train.py`.
"""

model = kmm.MobileVMoE.from_preset(PRESET)
backbone = model.backbone
print(
    f"{PRESET}: {backbone.num_layers} blocks of width {backbone.hidden_dim}, "
    f"{backbone.num_experts} experts in the last {backbone.num_moe_layers} "
    f"blocks, top-{backbone.top_k} routing, input {backbone.image_shape}, "
    f"{model.num_classes} classes"
)

"""
## Predict on real images

We use CIFAR-100 test images. The classifier's preprocessor resizes raw
`uint8` images to the model's input size and scales them, so the 32x32
CIFAR images go in exactly as they come out of the dataset.
"""

data, _ = guide_helpers.load_cifar100(SMOKE)
class_names = [str(name) for name in data["class_names"]]
num_images = 200 if SMOKE else min(2000, len(data["y_test"]))
# An evenly spaced sample of the test set covers every class.
pick = np.linspace(0, len(data["y_test"]) - 1, num_images).astype(int)
images, labels = data["x_test"][pick], data["y_test"][pick]

logits = model.predict(images, batch_size=100, verbose=0)
predictions = np.argmax(logits, axis=-1)
accuracy = float(np.mean(predictions == labels))
print(f"top-1 accuracy on {num_images} test images: {accuracy:.3f}")

"""
Here are the model's three best guesses for a few images, with their
softmax probabilities.
"""


def softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


probabilities = softmax(logits)
for i in range(6):
    top3 = np.argsort(-probabilities[i])[:3]
    guesses = ", ".join(
        f"{class_names[c]} {probabilities[i, c]:.2f}" for c in top3
    )
    print(f"  true {class_names[labels[i]]:>14}: {guesses}")

"""
## Which expert did each image use?

The backbone returns, next to the tokens, the router's logits: one score per
expert. The expert that runs is the one with the highest score. The model
was trained with a table `superclass_ids` that assigns every class to an
expert, and the router was taught to predict it: so images of the same
super-class should mostly go to the same expert.
(`guides/understanding_routing.py` looks at this in depth.)
"""

pixels = model.preprocessor.image_converter(images[:8])
router_logits = np.asarray(
    model.backbone.predict_on_batch(pixels)["router_logits"]
)
experts = np.argmax(router_logits, axis=-1)
for label, expert in zip(labels[:8], experts):
    target = model.superclass_ids[label] if model.superclass_ids else None
    print(
        f"  {class_names[label]:>14} -> expert {expert}"
        + (
            f" (its super-class's expert: {target})"
            if target is not None
            else ""
        )
    )

"""
## Count parameters and FLOPs

`kmm.count_flops` counts one image's forward pass (one multiply-add = 2
FLOPs) and only the experts that actually run, so it is the number that
matters for speed and battery. The parameter count includes all experts:
it is what you store, not what one image computes with.
"""

moe_flops = kmm.count_flops(model)
print(
    f"MoE: {model.count_params() / 1e6:.2f}M parameters, "
    f"{moe_flops / 1e6:.1f}M FLOPs per image"
)
for part, flops in kmm.flops_breakdown(model).items():
    print(f"  {part:>16}: {flops / 1e6:7.2f}M FLOPs")

"""
## Compare with the dense twin

The dense ViT of the same scale has one MLP per block. If a trained dense
preset is available we load it and compare accuracy as well; otherwise we
build its architecture only (random weights) to compare size and FLOPs.
A dense model has `num_moe_layers == 0`.
"""

dense_available = DENSE_PRESET in kmm.MobileVMoE.presets or os.path.isdir(
    DENSE_PRESET
)
if dense_available:
    dense = kmm.MobileVMoE.from_preset(DENSE_PRESET)
else:
    print(
        f"dense preset {DENSE_PRESET!r} is not available: building the dense "
        "architecture of the same size with random weights (no accuracy)"
    )
    dense = kmm.MobileVMoE(
        kmm.models.MobileVMoEBackbone(
            **{**backbone.get_config(), "num_moe_layers": 0, "name": None}
        ),
        num_classes=model.num_classes,
    )
assert dense.backbone.num_moe_layers == 0
dense_flops = kmm.count_flops(dense)
dense_accuracy = None
if dense_available:
    dense_accuracy = float(
        np.mean(
            np.argmax(dense.predict(images, batch_size=100, verbose=0), -1)
            == labels
        )
    )


def time_predict(classifier, repeats=3 if SMOKE else 5):
    """Median seconds of one compiled predict over the image sample."""
    classifier.predict(images[:100], batch_size=100, verbose=0)  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        classifier.predict(images[:100], batch_size=100, verbose=0)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


dense_seconds, moe_seconds = time_predict(dense), time_predict(model)
print(f"\n{'':>6} {'params':>8} {'MFLOPs':>8} {'ms/100 img':>11} {'top-1':>6}")
for name, m, flops, seconds, acc in [
    ("dense", dense, dense_flops, dense_seconds, dense_accuracy),
    ("MoE", model, moe_flops, moe_seconds, accuracy),
]:
    acc_text = f"{acc:.3f}" if acc is not None else "-"
    print(
        f"{name:>6} {m.count_params() / 1e6:7.2f}M {flops / 1e6:8.1f} "
        f"{1000 * seconds:11.1f} {acc_text:>6}"
    )
print(
    f"MoE / dense: {model.count_params() / dense.count_params():.2f}x the "
    f"parameters at {moe_flops / dense_flops:.3f}x the FLOPs"
)

"""
The MoE stores several times the MLP weights of its last blocks but computes
with one expert per image, so its FLOPs stay within a fraction of a percent
of the dense model's (the router is the only extra work). Wall times on a
busy shared CPU are noisy; `benchmarks/moe_overhead.py` measures the
overhead carefully.

## Where next

- `guides/fine_tuning.py`: a new head and a new super-class table on a new
  task.
- `guides/understanding_routing.py`: which classes go to which expert.
- `guides/mone_budgets.py`: MoNE, whose compute you choose at inference.
- `guides/deploying_to_a_phone.py`: TFLite export and quantization.
"""

results = {
    "preset": PRESET,
    "num_images": int(num_images),
    "top1": accuracy,
    "moe_params": int(model.count_params()),
    "moe_flops": int(moe_flops),
    "dense_params": int(dense.count_params()),
    "dense_flops": int(dense_flops),
    "dense_top1": dense_accuracy,
    "dense_trained": bool(dense_available),
}
with open(os.path.join(OUTPUT_DIR, "getting_started.json"), "w") as f:
    json.dump(results, f, indent=2)
print(f"wrote {os.path.join(OUTPUT_DIR, 'getting_started.json')}")
