"""
# MoNE: choose the compute budget at inference time

**What you will learn:** what a Mixture of Nested Experts (MoNE) is, how to
train one so that it works at many compute budgets, and how to trade
accuracy for FLOPs on a trained model with one line:
`model.capacity_budget = 0.3`. You will save a plot of accuracy against
FLOPs.

## Background

MoNE (Jain et al., NeurIPS 2024) starts from an ordinary ViT and observes
that not every image patch deserves the same amount of work: a patch of
blue sky needs less than the patch with the bird's eye. Every block's
weights are used as 4 *nested experts*: the first D/8, D/4, D/2 or all D
dimensions of each token. A small router looks at the patch embeddings and,
under a *capacity budget* `e_c` (the fraction of the full model's compute
per token), sends each token to one of these experts: the most important
tokens to the full width, the rest to the cheaper slices. The budget fixes
how many tokens each expert takes (`kmm.capacity_distribution`), so the
cost is known in advance, and because all experts share one set of weights,
the budget can change after training.

Trained at one budget, a model is best at that budget. Trained with
`training_budgets="adaptive"`, every training step draws a budget from
0.15, 0.25, ..., 0.95, and the one model then works across the range.

## What this guide trains

No pretrained MoNE preset is published yet, so this guide trains a small
MoNE itself (6 blocks, width 64, CIFAR-100 at its native 32x32 resolution,
patch 4, so 64 tokens per image), adaptively, for 3 epochs over 12,000
CIFAR-100 training images
(set `KMM_CIFAR100_PATH`; without it, on the small fixture that ships with
the package, where accuracy stays near chance and the plot shows only the
FLOPs side). A short run like this reaches a modest accuracy; the point is
the *shape* of the trade-off. To study a trained model instead, set
`KMM_GUIDE_MONE_PRESET` to a MoNE preset directory (e.g. one written by
`training/train.py --preset 6x64_mone`).

Run it with `KERAS_BACKEND=jax python guides/mone_budgets.py` (any backend
works; JAX is the fastest on CPU). It also reads `KMM_GUIDE_OUTPUT_DIR` and
`KMM_GUIDE_SMOKE` (see `guides/getting_started.py`). About 5-8 minutes on 2
CPU cores with JAX at the defaults, depending on the machine's load.
"""

import json
import os
import time

import matplotlib

matplotlib.use("Agg")  # write files, no window
import guide_helpers  # noqa: E402
import keras  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import keras_mobile_moe as kmm  # noqa: E402

SMOKE = guide_helpers.smoke_mode()
MONE_PRESET = os.environ.get("KMM_GUIDE_MONE_PRESET")
OUTPUT_DIR = guide_helpers.output_dir("kmm_mone_")
keras.utils.set_random_seed(0)

"""
## Capacities: how a budget becomes token counts

`kmm.capacity_distribution(e_c)` returns the share of tokens that each
nested expert (smallest first) takes at budget `e_c`. It solves the paper's
small optimisation problem: spend exactly the budget, preferring to give
the largest expert as many tokens as possible while keeping some spread.
"""

for budget in (1.0, 0.6, 0.4, 0.3, 0.2):
    shares = kmm.capacity_distribution(budget)
    print(
        f"budget {budget:.2f}: token shares (D/8, D/4, D/2, D) = "
        + ", ".join(f"{s:.2f}" for s in shares)
    )

"""
## Data
"""

data, full = guide_helpers.load_cifar100(SMOKE)
num_train, num_test, epochs = (
    (12000, 2000, 3) if full else (800, 200, 1 if SMOKE else 10)
)
rng = np.random.default_rng(0)
train_pick = rng.permutation(len(data["y_train"]))[:num_train]
test_pick = rng.permutation(len(data["y_test"]))[:num_test]
x_train, y_train = data["x_train"][train_pick], data["y_train"][train_pick]
x_test, y_test = data["x_test"][test_pick], data["y_test"][test_pick]

"""
## Build and train an adaptive MoNE

`kmm.MoNE.from_preset("6x64_mone", load_weights=False, ...)` builds the
architecture of a named scale; the overrides set CIFAR's 32x32 input, patch
4 and 100 classes. `training_budgets="adaptive"` makes every training step
run at a randomly drawn budget. Keras compiles one train step per budget,
so the first epoch is slower than the others.
"""

if MONE_PRESET:
    model = kmm.MoNE.from_preset(MONE_PRESET)
    print(f"loaded {MONE_PRESET}; skipping training")
    trained_here = False
else:
    overrides = dict(image_shape=(32, 32, 3), patch_size=4)
    budgets = "adaptive"
    if SMOKE:  # a tiny model and two budgets: seconds instead of minutes
        overrides.update(
            patch_size=8, num_layers=2, hidden_dim=16, num_heads=2, mlp_dim=32
        )
        budgets = [0.5, 1.0]
    model = kmm.MoNE.from_preset(
        "6x64_mone",
        load_weights=False,
        num_classes=100,
        training_budgets=budgets,
        **overrides,
    )
    model.compile(optimizer=keras.optimizers.AdamW(1e-3, weight_decay=0.05))
    start = time.perf_counter()
    model.fit(x_train, y_train, epochs=epochs, batch_size=128, verbose=2)
    print(f"trained {epochs} epoch(s) in {time.perf_counter() - start:.0f} s")
    trained_here = True
print(
    f"MoNE: {model.backbone.num_layers} blocks, width "
    f"{model.backbone.hidden_dim}, {model.backbone.num_tokens} tokens per "
    f"image, nested widths {model.backbone.expert_widths}"
)

"""
## Sweep the budget at inference

Setting `model.capacity_budget` changes how many tokens each nested expert
takes; nothing is retrained. `kmm.count_flops(model)` follows the current
budget (each token is counted at its expert's width). For every budget we
measure test accuracy, FLOPs and the wall time of a compiled `predict`.
"""

# The adaptive model was trained at budgets 0.15, 0.25, ..., 0.95, so we
# sweep those; a budget it never saw (e.g. 1.0) can be worse than a smaller
# one it was trained at.
sweep = [0.95, 0.75, 0.55, 0.45, 0.35, 0.25, 0.15]
if SMOKE:
    sweep = [1.0, 0.5, 0.25]
rows = []
for budget in sweep:
    model.capacity_budget = budget
    flops = kmm.count_flops(model)
    counts = model.backbone.token_counts()
    logits = model.predict(x_test, batch_size=100, verbose=0)  # compiles
    accuracy = float(np.mean(np.argmax(logits, -1) == y_test))
    times = []
    for _ in range(2 if SMOKE else 3):
        start = time.perf_counter()
        model.predict(x_test, batch_size=100, verbose=0)
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    rows.append(
        {
            "budget": budget,
            "flops": int(flops),
            "token_counts": list(counts),
            "top1": accuracy,
            "predict_seconds": seconds,
        }
    )
    print(
        f"budget {budget:.2f}: tokens per expert {counts}, "
        f"{flops / 1e6:6.2f}M FLOPs, top-1 {accuracy:.3f}, "
        f"predict {1000 * seconds / len(x_test):.2f} ms/image"
    )

full = rows[0]
for row in rows:
    row["flops_ratio"] = row["flops"] / full["flops"]
    row["time_ratio"] = row["predict_seconds"] / full["predict_seconds"]

"""
## Plot the trade-off
"""

figure, axis = plt.subplots(figsize=(6, 4))
axis.plot(
    [r["flops"] / 1e6 for r in rows], [100 * r["top1"] for r in rows], "o-"
)
for r in rows:
    axis.annotate(
        f"{r['budget']:g}",
        (r["flops"] / 1e6, 100 * r["top1"]),
        textcoords="offset points",
        xytext=(4, 4),
        fontsize=8,
    )
axis.set_xlabel("MFLOPs per image")
axis.set_ylabel("top-1 accuracy (%)")
axis.set_title(
    "MoNE: one set of weights at several capacity budgets", fontsize=10
)
axis.grid(alpha=0.3)
figure.tight_layout()
plot_path = os.path.join(OUTPUT_DIR, "mone_budgets.png")
figure.savefig(plot_path, dpi=120)
plt.close(figure)
print(f"wrote {plot_path}")

"""
## Which patches get the full width?

The backbone returns `expert_index`, the nested expert of every patch. At a
low budget only a few patches run at full width: those the router rates
most important.
"""

model.capacity_budget = 0.3 if not SMOKE else 0.25
pixels = model.preprocessor.image_converter(x_test[:4])
expert_index = np.asarray(
    model.backbone.predict_on_batch(pixels)["expert_index"]
)
side = model.backbone.image_shape[0] // model.backbone.patch_size
for i in range(len(expert_index)):
    grid = expert_index[i].reshape(side, side)
    print(f"image {i} ({data['class_names'][y_test[i]]}): expert of each patch")
    for line in grid:
        print("   " + "".join(".:+#"[e] for e in line))
print("(legend: . = D/8, : = D/4, + = D/2, # = full width D)")

"""
## Reading the results

- FLOPs fall with the budget, though not to zero: the patch embedding and
  attention over all tokens are paid at every budget.
- An adaptively trained model loses accuracy gracefully as the budget
  shrinks, so one deployment can serve a fast and a precise mode.
- The measured speed-up is smaller than the FLOPs reduction for small
  images with few tokens; `benchmarks/mone_speedup.py` measures it
  carefully on ViT-Ti/16 (196 tokens).
"""

results = {
    "trained_here": trained_here,
    "preset": MONE_PRESET,
    "train_images": int(len(x_train)) if trained_here else None,
    "test_images": int(len(x_test)),
    "rows": rows,
    "plot": plot_path,
}
with open(os.path.join(OUTPUT_DIR, "mone_budgets.json"), "w") as f:
    json.dump(results, f, indent=2)
print(f"wrote {os.path.join(OUTPUT_DIR, 'mone_budgets.json')}")
