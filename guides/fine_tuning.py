"""
# Fine-tuning a Mobile V-MoE on a new task

**What you will learn:** how to take a pretrained Mobile V-MoE, give it a
new classification head for a new set of classes, find a super-class table
for the new classes from a confusion matrix
(`kmm.superclasses_from_confusion`), fine-tune the whole model with
`model.fit`, and save the result as a preset.

## Background

A Mobile V-MoE routes every image to one expert. During training the router
learns from a table, `superclass_ids`, that assigns every class to an
expert: classes sharing an expert form a *super-class*. A new task has new
classes, so it needs a new table. When no natural grouping exists, the
paper's recipe (Daxberger et al. 2023, Sec. 3) is to look at which classes
a model *confuses* with each other and put those in the same group: the
router then has an easy job (telling apart groups that differ a lot) and
each expert specialises on the fine distinctions inside its group.

## The new task

We turn the pretrained CIFAR-100 model into a classifier of CIFAR-100's 20
*coarse* labels ("vehicles 1", "large carnivores", "flowers", ...). It is a
new head on a new label space, although on the same kind of images as the
pretraining data, so it learns quickly; the same steps work for any image
dataset given as `uint8` arrays (or a `tf.data.Dataset`).

The steps:

1. Load the pretrained model and compute its image features.
2. Train a linear classifier for the new classes on those features (a
   *linear probe*, seconds on a CPU) and compute its confusion matrix on
   held-out images.
3. Cluster the confusion matrix into one group per expert.
4. Load the pretrained model again with `num_classes=20` (a new head) and
   the new `superclass_ids`, start its head from the probe, and fine-tune.

Run it with `KERAS_BACKEND=jax python guides/fine_tuning.py` (any backend
works). It reads the environment variables described in
`guides/getting_started.py` (`KMM_GUIDE_PRESET`, `KMM_CIFAR100_PATH`,
`KMM_GUIDE_OUTPUT_DIR`, `KMM_GUIDE_SMOKE`). With the full CIFAR-100 it uses
6,000 training images, 2,000 held-out images and 2,000 test images; without
it, the 1,000-image fixture that ships with the package (the numbers are
then much noisier). About 5 minutes on 2 CPU cores at the defaults.
"""

import json
import os

import guide_helpers
import keras
import numpy as np

import keras_mobile_moe as kmm

SMOKE = guide_helpers.smoke_mode()
PRESET = os.environ.get("KMM_GUIDE_PRESET", "6x64_e10.cifar100")
OUTPUT_DIR = guide_helpers.output_dir("kmm_fine_tuning_")
EPOCHS = 1 if SMOKE else 3
keras.utils.set_random_seed(0)

"""
## The data

Training images, a held-out split for the confusion matrix (never the test
set: the table would otherwise be fitted to the test images), and test
images. We sample the same number of images from every class
(`guide_helpers.per_class_sample`).
"""

data, full = guide_helpers.load_cifar100(SMOKE)
per_class_train, per_class_val, per_class_test = (
    (60, 20, 20) if full else (6, 2, 2)
)
train_idx, val_idx = guide_helpers.per_class_sample(
    data["y_train"], [per_class_train, per_class_val]
)
(test_idx,) = guide_helpers.per_class_sample(data["y_test"], [per_class_test])
# The new task: the 20 coarse labels.
x_train, y_train = data["x_train"][train_idx], data["y_train_coarse"][train_idx]
x_val, y_val = data["x_train"][val_idx], data["y_train_coarse"][val_idx]
x_test, y_test = data["x_test"][test_idx], data["y_test_coarse"][test_idx]
new_names = [str(n) for n in data["coarse_names"]]
num_new_classes = len(new_names)
print(
    f"new task: {num_new_classes} classes; {len(x_train)} train, "
    f"{len(x_val)} held-out, {len(x_test)} test images"
)

"""
## Step 1: features of the pretrained model

We run the pretrained backbone once over the images and keep the vector its
head would read (the class token, or the mean token for `pooling="avg"`).
"""

pretrained = kmm.MobileVMoE.from_preset(PRESET)
num_experts = pretrained.backbone.num_experts
print(
    f"{PRESET}: {pretrained.count_params() / 1e6:.2f}M parameters, "
    f"{num_experts} experts, pretrained on {pretrained.num_classes} classes"
)

f_train = guide_helpers.pooled_features(pretrained, x_train)
f_val = guide_helpers.pooled_features(pretrained, x_val)

"""
## Step 2: a linear probe and its confusion matrix

A single `Dense` layer on the frozen features, trained with plain Keras.
Its confusion matrix on the held-out images tells us which new classes look
alike to the pretrained model.
"""

probe, probe_accuracy, confusion = guide_helpers.linear_probe(
    f_train,
    y_train,
    f_val,
    y_val,
    num_new_classes,
    learning_rate=1e-2,
    epochs=10 if SMOKE else 60,
)
print(f"linear probe: held-out accuracy {probe_accuracy:.3f}")

"""
## Step 3: super-classes from the confusion matrix

`kmm.superclasses_from_confusion(confusion, num_superclasses)` builds a
graph whose edges are the mistakes between classes, cuts it into
`num_superclasses` balanced groups of mutually confused classes (spectral
clustering) and returns one group id per class. We ask for one group per
expert of the pretrained model, so the architecture stays as it is.
"""

superclass_ids = kmm.superclasses_from_confusion(confusion, num_experts)
for group in range(num_experts):
    members = [new_names[c] for c in np.flatnonzero(superclass_ids == group)]
    print(f"  expert {group}: {', '.join(members)}")

"""
## Step 4: a new head and fine-tuning

`from_preset` with a different `num_classes` loads every pretrained weight
except the head, which it rebuilds for the new classes; `superclass_ids`
is the new table. We copy the probe's weights into the new head, so that
fine-tuning starts from a sensible classifier instead of a random one (this
keeps the large random-head gradients from disturbing the pretrained
features).

A plain `compile()` adds the router loss (`router_loss_weight=0.3` times
the cross-entropy of the router against each label's super-class) to the
classification loss; `fit` reports `router_accuracy`. We use a small
learning rate, as usual when fine-tuning.
"""

model = kmm.MobileVMoE.from_preset(
    PRESET, num_classes=num_new_classes, superclass_ids=superclass_ids.tolist()
)
model.output_dense.set_weights(probe.layers[-1].get_weights())
model.compile(optimizer=keras.optimizers.AdamW(1e-4, weight_decay=0.05))

before, router_before = guide_helpers.test_scores(model, x_test, y_test)
print(
    f"before fine-tuning: test accuracy {before:.3f}, router "
    f"accuracy {router_before:.3f} (chance {1 / num_experts:.3f})"
)
history = model.fit(
    x_train,
    y_train,
    validation_data=(x_val, y_val),
    epochs=EPOCHS,
    batch_size=64,
    verbose=2,
)
after, router_after = guide_helpers.test_scores(model, x_test, y_test)
print(
    f"after {EPOCHS} epoch(s): test accuracy {after:.3f}, router "
    f"accuracy {router_after:.3f}"
)

"""
Before fine-tuning, the router still makes the choices it learned for the
old table, which agree with the new groups only where the two tables happen
to overlap. Fine-tuning teaches it the new groups (the router loss) while
the classification loss adapts the experts and the head to the new classes.
Router accuracy rises quickly. Top-1 need not: while the router re-learns
its table, images move between experts, and with 6,000 images and 3 epochs
(our run on CIFAR-100: router accuracy 14% -> 27%, top-1 37.7% -> 36.9%)
the fine-tuned model is about where the linear probe left it. More images,
epochs and augmentation are what raise it.

## Save and reload

`save_to_preset` writes a keras-hub preset directory (config, weights,
preprocessor, model card) that `from_preset` (or
`keras_hub.models.ImageClassifier.from_preset`) loads back, new table
included.
"""

preset_dir = os.path.join(OUTPUT_DIR, "fine_tuned_preset")
# The optimizer state is saved too; from_preset loads the model without it.
model.save_to_preset(preset_dir)
reloaded = kmm.MobileVMoE.from_preset(preset_dir)
difference = float(
    np.max(
        np.abs(
            reloaded.predict(x_test[:16], verbose=0)
            - model.predict(x_test[:16], verbose=0)
        )
    )
)
assert reloaded.superclass_ids == model.superclass_ids
print(f"reloaded {preset_dir}: max |logit difference| {difference:.2e}")

"""
## Going further

- More epochs and data augmentation (`keras.layers.RandAugment`,
  `RandomFlip`, `MixUp`) help on a real new dataset; `training/train.py`
  has a full recipe.
- With several hundred images per class, you can instead compute the
  confusion matrix of a dense model trained on the new task, as the paper
  does: `training/discover_superclasses.py` does exactly that.
- A table with a different number of groups needs a different number of
  experts: pass `num_experts=...` to `from_preset` too (the expert weights
  are then new, not pretrained).
"""

results = {
    "preset": PRESET,
    "train_images": int(len(x_train)),
    "epochs": EPOCHS,
    "probe_accuracy": probe_accuracy,
    "superclass_ids": superclass_ids.tolist(),
    "test_accuracy_before": before,
    "test_accuracy_after": after,
    "router_accuracy_before": router_before,
    "router_accuracy_after": router_after,
    "train_loss": [float(v) for v in history.history["loss"]],
    "reload_max_abs_difference": difference,
    "preset_dir": preset_dir,
}
with open(os.path.join(OUTPUT_DIR, "fine_tuning.json"), "w") as f:
    json.dump(results, f, indent=2)
print(f"wrote {os.path.join(OUTPUT_DIR, 'fine_tuning.json')}")
