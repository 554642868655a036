"""
# Understanding routing: which expert does each class go to?

**What you will learn:** how to read the router of a trained Mobile V-MoE:
how often it sends an image to the expert it was trained to pick (*router
accuracy*), how the work is spread over the experts (*load*), which classes
each expert serves, and what a wrong routing decision costs. You will save a
heat-map of classes x experts.

## Background

In a Mobile V-MoE the router reads an image's tokens after the dense blocks
and outputs one score (logit) per expert; the image's tokens then go through
the expert with the highest score in every MoE block. During training the
router is *supervised*: a table `model.superclass_ids` assigns each class to
a super-class, one super-class per expert, and an extra loss (weight 0.3)
teaches the router to predict the super-class of the image's label. So a
well-trained router sends all images of a class to the same expert, and that
expert only needs to be good at its few classes.

Run it with `KERAS_BACKEND=jax python guides/understanding_routing.py`
(any backend works). It reads the environment variables described in
`guides/getting_started.py` (`KMM_GUIDE_PRESET`, `KMM_CIFAR100_PATH`,
`KMM_GUIDE_OUTPUT_DIR`, `KMM_GUIDE_SMOKE`) and takes about a minute on 2 CPU
cores with the full CIFAR-100 test set (10,000 images).
"""

import json
import os

import matplotlib

matplotlib.use("Agg")  # write files, no window
import guide_helpers  # noqa: E402
import keras  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import keras_mobile_moe as kmm  # noqa: E402

SMOKE = guide_helpers.smoke_mode()
PRESET = os.environ.get("KMM_GUIDE_PRESET", "6x64_e10.cifar100")
OUTPUT_DIR = guide_helpers.output_dir("kmm_routing_")

"""
## Load the model and the test images
"""

model = kmm.MobileVMoE.from_preset(PRESET)
num_experts = model.backbone.num_experts
if not model.superclass_ids:
    raise SystemExit(
        f"{PRESET} has no superclass_ids (it was trained with "
        "routing='learned'), so there is no target expert to compare with."
    )
superclass_ids = np.asarray(model.superclass_ids)

data, _ = guide_helpers.load_cifar100(SMOKE)
images, labels = data["x_test"], data["y_test"]
if SMOKE:
    images, labels = images[:100], labels[:100]
class_names = [str(n) for n in data["class_names"]]
print(f"{PRESET}: {num_experts} experts; {len(labels)} test images")

"""
## Run the model once, keeping the router's output

`model.predict` returns only the class logits. To see the routing we call
the backbone ourselves: the preprocessor's image converter resizes and
scales the images, and the backbone returns `router_logits` next to the
tokens. The classifier's head (`model.output_dense`) turns the pooled tokens
into class logits, so one pass gives both.
"""


def route_and_classify(images, batch_size=250):
    router, logits = [], []
    converter = model.preprocessor.image_converter
    for start in range(0, len(images), batch_size):
        pixels = converter(images[start : start + batch_size])
        outputs = model.backbone.predict_on_batch(pixels)
        tokens = np.asarray(outputs["sequence_output"])
        if model.pooling == "token":
            pooled = tokens[:, 0]  # the class token
        else:
            pooled = tokens[:, int(model.backbone.use_class_token) :].mean(1)
        router.append(np.asarray(outputs["router_logits"]))
        logits.append(keras.ops.convert_to_numpy(model.output_dense(pooled)))
    return np.concatenate(router), np.concatenate(logits)


router_logits, logits = route_and_classify(images)
chosen = np.argmax(router_logits, axis=-1)  # the expert that ran
target = superclass_ids[labels]  # the expert it was trained to pick
correct = np.argmax(logits, axis=-1) == labels

"""
## Router accuracy and classification accuracy

The router is *right* when it picks the expert of the image's super-class.
When it is wrong, the image goes to an expert that was trained on other
classes, which usually costs the classification too.
"""

router_right = chosen == target
router_accuracy = float(router_right.mean())
top1 = float(correct.mean())
print(f"top-1 accuracy:  {top1:.3f}")
print(f"router accuracy: {router_accuracy:.3f} (chance: {1 / num_experts:.3f})")
for name, mask in [("right", router_right), ("wrong", ~router_right)]:
    if mask.any():
        print(
            f"  top-1 when the router is {name}: {correct[mask].mean():.3f} "
            f"({mask.sum()} images)"
        )

"""
## Load per expert

*Load* is the share of images each expert processes. A balanced load keeps
every expert useful (and, on a server, every device busy). The super-class
table decides what a perfect router would do: the share of test images whose
class belongs to each expert.
"""

load = np.bincount(chosen, minlength=num_experts) / len(chosen)
expected = np.bincount(target, minlength=num_experts) / len(target)
print("\nexpert  load   target share  router accuracy on its images")
for e in range(num_experts):
    mine = target == e
    acc = f"{router_right[mine].mean():.3f}" if mine.any() else "-"
    print(f"{e:6d}  {load[e]:.3f}  {expected[e]:.3f}         {acc}")

"""
## Which classes does each expert serve?

For each class we measure the fraction of its images that go to every
expert: a `[num_classes, num_experts]` table. Its rows, sorted by
super-class, make the heat-map below: a perfect router gives a block of
bright cells on a staircase, one block per expert.
"""

num_classes = model.num_classes
routing_table = np.zeros((num_classes, num_experts))
np.add.at(routing_table, (labels, chosen), 1)
counts = routing_table.sum(axis=1, keepdims=True)
present = counts[:, 0] > 0
routing_table = routing_table / np.maximum(counts, 1)

for e in range(num_experts):
    served = np.argsort(-routing_table[:, e])[:5]
    served = [c for c in served if routing_table[c, e] > 0]
    names = ", ".join(
        f"{class_names[c]} ({routing_table[c, e]:.0%})" for c in served
    )
    print(f"expert {e}: {names or 'no images'}")

order = np.lexsort((np.arange(num_classes), superclass_ids))
order = order[present[order]]
figure, (heat, bars) = plt.subplots(
    1,
    2,
    figsize=(12, max(6, len(order) * 0.12)),
    gridspec_kw={"width_ratios": [2, 1]},
)
image = heat.imshow(
    routing_table[order], aspect="auto", cmap="viridis", vmin=0, vmax=1
)
heat.set_xlabel("expert")
heat.set_ylabel("class (sorted by super-class)")
heat.set_xticks(range(num_experts))
if len(order) <= 100:
    heat.set_yticks(range(len(order)))
    heat.set_yticklabels([class_names[c] for c in order], fontsize=5)
# Outline the target expert of every class.
heat.scatter(
    superclass_ids[order],
    np.arange(len(order)),
    s=6,
    marker="s",
    facecolors="none",
    edgecolors="red",
    linewidths=0.5,
    label="target expert",
)
heat.legend(loc="upper right", fontsize=7)
heat.set_title(
    f"Share of each class's images per expert ({PRESET})", fontsize=9
)
figure.colorbar(image, ax=heat, fraction=0.04)
positions = np.arange(num_experts)
bars.barh(positions - 0.2, load, height=0.4, label="routed")
bars.barh(positions + 0.2, expected, height=0.4, label="target")
bars.set_yticks(positions)
bars.set_ylabel("expert")
bars.set_xlabel("share of images")
bars.invert_yaxis()
bars.legend(fontsize=7)
bars.set_title(
    f"Load per expert (router accuracy {router_accuracy:.1%})", fontsize=9
)
figure.tight_layout()
heatmap_path = os.path.join(OUTPUT_DIR, "routing_heatmap.png")
figure.savefig(heatmap_path, dpi=120)
plt.close(figure)
print(f"\nwrote {heatmap_path}")

"""
## How sure is the router?

The router's softmax probability of its chosen expert is its confidence.
Confident decisions are usually right; the uncertain ones are where images
of look-alike classes from different super-classes (a whale vs a shark...)
end up at the wrong expert.
"""

probs = np.exp(router_logits - router_logits.max(-1, keepdims=True))
probs /= probs.sum(-1, keepdims=True)
confidence = probs.max(-1)
quartiles = np.quantile(confidence, [0.25, 0.5, 0.75])
bins = np.digitize(confidence, quartiles)
for q in range(4):
    mask = bins == q
    if mask.any():
        print(
            f"confidence quartile {q + 1}: mean confidence "
            f"{confidence[mask].mean():.2f}, router accuracy "
            f"{router_right[mask].mean():.3f}"
        )

"""
## Take-aways

- Router accuracy well above chance means the super-classes are learnable
  from the early layers' features; the paper reports it as a key quality of
  a Mobile V-MoE.
- The load follows the super-class table; a balanced table (as built by
  `kmm.superclasses_from_confusion`, see `guides/fine_tuning.py`) keeps all
  experts busy.
- Classification accuracy drops on misrouted images: better routing (e.g.
  super-classes that are easier to tell apart) directly helps accuracy.
"""

results = {
    "preset": PRESET,
    "num_images": int(len(labels)),
    "num_experts": int(num_experts),
    "top1": top1,
    "router_accuracy": router_accuracy,
    "load": load.tolist(),
    "target_share": expected.tolist(),
    "heatmap": heatmap_path,
}
with open(os.path.join(OUTPUT_DIR, "understanding_routing.json"), "w") as f:
    json.dump(results, f, indent=2)
print(f"wrote {os.path.join(OUTPUT_DIR, 'understanding_routing.json')}")
