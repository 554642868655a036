"""
# From an ImageNet ViT on the Hub to a Mobile V-MoE on a phone

**What you will learn:** how to load an ImageNet-trained ViT from the
Hugging Face Hub in timm's format, find super-classes for a new task from
the dense model's confusion matrix, turn the dense ViT into a Mobile V-MoE
by *sparse upcycling* (`kmm.upcycle`), fine-tune it on CIFAR-100 with
`model.fit`, and export it to an int8 `.tflite` file.

## Background

Training a Mobile V-MoE from scratch needs a lot of data and compute.
The Hub already holds thousands of trained ViTs, and
`kmm.MobileVMoE.from_preset("hf://timm/<model>")` converts a timm ViT
checkpoint on load (it reads `config.json` and `model.safetensors`, never a
pickle) into a dense member of the Mobile V-MoE family computing the same
function as timm's model.

*Sparse upcycling* (Komatsuzaki et al., "Sparse Upcycling: Training
Mixture-of-Experts from Dense Checkpoints", ICLR 2023) starts a mixture of
experts from such a dense model: every expert of the last blocks starts as a
copy of that block's MLP, and the router starts fresh. With normalised
gates (the default), the upcycled model is exactly the dense model at the
start; fine-tuning then lets the experts specialise. The Mobile V-MoE
router (Daxberger et al. 2023) learns from a super-class table: which
expert each class goes to. For a new task we build that table as the paper
does, from the classes a dense model confuses with each other.

The steps:

1. Load the dense ViT from the Hub with a new 100-class head, at a lower
   input resolution than ImageNet's 224 (CIFAR-100 images are 32x32: 96x96
   keeps most of the pretrained features at a fifth of the FLOPs).
2. Train a linear probe on its frozen features; its confusion matrix on
   held-out images gives the super-classes
   (`kmm.superclasses_from_confusion`).
3. Put the probe into the head and upcycle: 10 experts in the last 2 blocks.
4. Fine-tune with `model.fit`.
5. Export an int8 `.tflite` file and check it against Keras.

**This guide needs internet** in its default mode: it downloads
`timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k` (12 layers x 192, 5.7M
parameters, about 23 MB) from the Hugging Face Hub on first use (it is
cached afterwards, and loads offline with `HF_HUB_OFFLINE=1`). Run it with
`KERAS_BACKEND=jax python guides/upcycling_a_hub_vit.py` (any backend;
the export needs TensorFlow and `ai-edge-litert`:
`pip install 'keras-mobile-moe[hub,tflite]'`). With the full CIFAR-100
(`KMM_CIFAR100_PATH`) it took about an hour on a 2-core CPU shared with
other jobs (each fine-tuning epoch 29 minutes; measured with a checkpoint of
the same architecture from an offline cache); a GPU makes it minutes.

Environment variables (besides those in `guides/getting_started.py`:
`KMM_CIFAR100_PATH`, `KMM_GUIDE_OUTPUT_DIR`, `KMM_GUIDE_SMOKE`):

- `KMM_GUIDE_HUB_HANDLE`: the checkpoint to start from (any `hf://` handle,
  or a local folder, holding a timm or keras-hub ViT).
- `KMM_GUIDE_IMAGE_SIZE`: the fine-tuning resolution (default 96).

The smoke run of the tests points `KMM_GUIDE_HUB_HANDLE` at a small
checkpoint written by timm into an offline Hugging Face cache.
"""

import json
import os

import guide_helpers
import keras
import numpy as np

import keras_mobile_moe as kmm

SMOKE = guide_helpers.smoke_mode()
HANDLE = os.environ.get(
    "KMM_GUIDE_HUB_HANDLE",
    "hf://timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k",
)
IMAGE_SIZE = int(os.environ.get("KMM_GUIDE_IMAGE_SIZE", "96"))
NUM_EXPERTS, NUM_MOE_LAYERS = 10, 2
EPOCHS = 1 if SMOKE else 2
OUTPUT_DIR = guide_helpers.output_dir("kmm_upcycling_")
keras.utils.set_random_seed(0)

"""
## The data

Training images, a held-out split for the confusion matrix (never the test
set, which would otherwise choose the table), and test images, the same
number from every class.
"""

data, full = guide_helpers.load_cifar100(SMOKE)
per_class = (100, 20, 20) if full else (6, 2, 2)
train_idx, val_idx = guide_helpers.per_class_sample(
    data["y_train"], per_class[:2]
)
(test_idx,) = guide_helpers.per_class_sample(data["y_test"], per_class[2:])
x_train, y_train = data["x_train"][train_idx], data["y_train"][train_idx]
x_val, y_val = data["x_train"][val_idx], data["y_train"][val_idx]
x_test, y_test = data["x_test"][test_idx], data["y_test"][test_idx]
num_classes = len(data["class_names"])
print(
    f"{num_classes} classes; {len(x_train)} train, {len(x_val)} held-out, "
    f"{len(x_test)} test images"
)

"""
## Step 1: the dense ViT from the Hub

`from_preset` with `num_classes=100` keeps every pretrained weight except
the ImageNet head, and `image_shape` resamples the position embedding to
the new grid the way timm does. The preprocessor comes from the
checkpoint's own config (mean/std, interpolation) at the new size: the
model takes raw 0-255 images.
"""

print(f"loading {HANDLE}")
try:
    dense = kmm.MobileVMoE.from_preset(
        HANDLE,
        num_classes=num_classes,
        image_shape=(IMAGE_SIZE, IMAGE_SIZE, 3),
    )
except FileNotFoundError as error:
    raise SystemExit(
        f"{error}\n\nThis guide downloads {HANDLE} from the Hugging Face Hub "
        "on its first run: it needs internet (or a cache that holds the "
        "checkpoint, with HF_HUB_OFFLINE=1)."
    ) from error
backbone = dense.backbone
print(
    f"dense ViT: {backbone.num_layers} layers x {backbone.hidden_dim}, patch "
    f"{backbone.patch_size} at {IMAGE_SIZE}x{IMAGE_SIZE}, "
    f"{dense.count_params() / 1e6:.2f}M parameters, "
    f"{kmm.count_flops(dense) / 1e6:.1f} MFLOPs per image"
)

"""
## Step 2: a linear probe, its confusion matrix and the super-classes

The head reads the class token of the last block. We compute it once for
the training and held-out images and fit a single `Dense` layer on it.
"""

assert dense.pooling == "token", dense.pooling  # timm ViTs pool the class token
f_train = guide_helpers.pooled_features(dense, x_train)
f_val = guide_helpers.pooled_features(dense, x_val)
probe, probe_accuracy, confusion = guide_helpers.linear_probe(
    f_train,
    y_train,
    f_val,
    y_val,
    num_classes,
    learning_rate=1e-3,
    epochs=5 if SMOKE else 60,
)
print(
    "linear probe on the dense features: held-out accuracy "
    f"{probe_accuracy:.3f}"
)

"""
`kmm.superclasses_from_confusion` cuts the graph of mistakes between
classes into `NUM_EXPERTS` balanced groups of classes that the dense model
confuses with each other: the router then separates groups that differ a
lot, and each expert specialises on the fine distinctions inside its group.
"""

superclass_ids = kmm.superclasses_from_confusion(confusion, NUM_EXPERTS)
names = [str(n) for n in data["class_names"]]
for group in range(min(3, NUM_EXPERTS)):
    members = [names[c] for c in np.flatnonzero(superclass_ids == group)]
    print(f"  expert {group}: {', '.join(members)}")

"""
## Step 3: upcycle

The probe becomes the dense model's head; `kmm.upcycle` then copies every
weight into a Mobile V-MoE whose last `NUM_MOE_LAYERS` blocks hold
`NUM_EXPERTS` copies of their MLP, with a fresh router per block. With
normalised gates the upcycled model computes exactly the dense function, so
fine-tuning starts from the probe's accuracy, not from a broken model.
(`kmm.MobileVMoE.from_preset(HANDLE, num_experts=..., num_moe_layers=...)`
does the loading and the upcycling in one call.)
"""

dense.output_dense.set_weights(probe.layers[-1].get_weights())
moe = kmm.upcycle(
    dense,
    num_experts=NUM_EXPERTS,
    num_moe_layers=NUM_MOE_LAYERS,
    superclass_ids=superclass_ids.tolist(),
)
upcycle_difference = float(
    np.max(
        np.abs(
            moe.predict(x_test[:32], verbose=0)
            - dense.predict(x_test[:32], verbose=0)
        )
    )
)
print(
    f"upcycled: {moe.count_params() / 1e6:.2f}M parameters, "
    f"{kmm.count_flops(moe) / 1e6:.1f} MFLOPs per image; max |logit "
    f"difference| to the dense model {upcycle_difference:.1e}"
)

"""
## Step 4: fine-tune

`compile()` with its defaults adds the router loss (the cross-entropy of
the router against each label's super-class) to the classification loss and
picks AdamW at the fine-tuning rate for a pretrained model with a new head
(1e-4; `kmm.upcycle` keeps the dense model's `weights_source`). At first the
router is random, so each image goes to an arbitrary expert, which is
harmless because all experts are equal; the router loss teaches it the
table while the experts drift apart.
"""

moe.compile()

before, router_before = guide_helpers.test_scores(moe, x_test, y_test)
print(
    f"before fine-tuning: test accuracy {before:.3f}, router "
    f"accuracy {router_before:.3f} (chance {1 / NUM_EXPERTS:.2f})"
)
history = moe.fit(
    x_train,
    y_train,
    validation_data=(x_val, y_val),
    epochs=EPOCHS,
    batch_size=64,
    verbose=2,
)
after, router_after = guide_helpers.test_scores(moe, x_test, y_test)
print(
    f"after {EPOCHS} epoch(s): test accuracy {after:.3f}, "
    f"router accuracy {router_after:.3f}"
)

"""
## Step 5: int8 for the phone

`kmm.export.to_tflite` converts the fine-tuned model (from any backend) to
a builtin-only `.tflite` file. The file takes what `model.predict` takes:
raw uint8 RGB images, here at CIFAR's 32x32 (`input_size`), and resizes and
scales them inside the graph. `"int8"` stores int8 weights, quantizes
activations per call (no calibration images needed) and keeps the blocks
that decide the routing in float, so that rounding does not send images to
other experts. `kmm.export.agreement` then runs the
file with the LiteRT interpreter and compares it with Keras: same top-1
class, same expert, and the test accuracy of both.
"""

tflite_path = os.path.join(OUTPUT_DIR, "upcycled_int8.tflite")
report = kmm.export.to_tflite(
    moe,
    tflite_path,
    quantization="int8",
    input_size=x_train.shape[1:3],
)
check = slice(0, 100 if SMOKE else 1000)
parity = kmm.export.agreement(
    moe, tflite_path, x_test[check], labels=y_test[check]
)
print(
    f"int8 file: {report['bytes'] / 1e6:.2f} MB, input "
    f"{report['inputs']}; on {parity['num_images']} test images top-1 "
    f"agreement {parity['top1']:.3f}, routing agreement "
    f"{parity['routing']:.3f}, accuracy {parity['tflite_accuracy']:.3f} "
    f"(Keras {parity['keras_accuracy']:.3f})"
)

"""
## Going further

- More epochs, more images and augmentation (`training/train.py` has a full
  recipe) raise the accuracy well beyond this short run; fine-tune the dense
  model for the same steps to see what the experts add.
- Start from a larger checkpoint (`timm/vit_small_patch32_224...`, the
  paper's `small` scale) or at a higher resolution; the README lists the Hub
  checkpoints known to convert.
- `moe.save_to_preset(folder)` and `kmm.upload_preset("hf://you/model",
  folder)` publish the result.
"""

results = {
    "handle": HANDLE,
    "image_size": IMAGE_SIZE,
    "train_images": int(len(x_train)),
    "epochs": EPOCHS,
    "probe_accuracy": probe_accuracy,
    "superclass_ids": superclass_ids.tolist(),
    "dense_flops": int(kmm.count_flops(dense)),
    "moe_flops": int(kmm.count_flops(moe)),
    "upcycle_max_abs_difference": upcycle_difference,
    "test_accuracy_before": before,
    "test_accuracy_after": after,
    "router_accuracy_before": router_before,
    "router_accuracy_after": router_after,
    "train_loss": [float(v) for v in history.history["loss"]],
    "tflite": {
        "path": tflite_path,
        "bytes": int(report["bytes"]),
        "top1_agreement": parity["top1"],
        "routing_agreement": parity["routing"],
        "keras_accuracy": parity["keras_accuracy"],
        "tflite_accuracy": parity["tflite_accuracy"],
    },
}
with open(os.path.join(OUTPUT_DIR, "upcycling_a_hub_vit.json"), "w") as f:
    json.dump(results, f, indent=2)
print(f"wrote {os.path.join(OUTPUT_DIR, 'upcycling_a_hub_vit.json')}")
