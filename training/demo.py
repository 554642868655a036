"""The keras_mobile_moe demo: the model family, then a short real training.

1. The Mobile V-MoE family at the paper's scales (224x224, patch 32): for each
   scale, dense ViT next to its MoE twin (E=10, k=1, last 2 blocks), with
   parameters, activated parameters per image, FLOPs and measured latency
   (batch 1, compiled, median).
2. The trained presets `6x64_e10.cifar100` and its dense twin
   `6x64.cifar100` (weights shipped in the package): their CIFAR-100 test
   top-1 (all 10,000 test images, from the preset's registry entry), and,
   measured here, top-1 and router accuracy on the 200 test images of the
   fixture.
3. Fine-tuning the trained `6x64_e10.cifar100` to a new task, CIFAR-100's 20
   coarse classes (a new head), on real images (the fixture shipped with the
   package, 800 train / 200 test images, no download) with the `compile()`
   defaults: held-out accuracy after every epoch.

Usage:
    KERAS_BACKEND=jax python training/demo.py [--epochs 5] [--scales 6x64 ...]
"""

import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import keras_mobile_moe as kmm  # noqa: E402

sys.path.insert(
    0,
    os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"
    ),
)
from common import compiled_forward  # noqa: E402
from common import convert_images  # noqa: E402
from common import machine  # noqa: E402
from common import median_ms  # noqa: E402
from common import random_images  # noqa: E402
from common import time_interleaved  # noqa: E402

FLAGS = flags.DEFINE_multi_string(
    "scales", list(kmm.variants.VARIANTS), "Scales for the family table."
)
EPOCHS = flags.DEFINE_integer("epochs", 5, "Epochs of the fine-tuning.")
REPEATS = flags.DEFINE_integer("repeats", 20, "Timed calls per model.")
SEED = flags.DEFINE_integer("seed", 0, "Random seed.")


def family_table(scales, repeats):
    print(
        f"\n== The Mobile V-MoE family ({keras.config.backend()}, {machine()})"
    )
    print("latency: one 224x224 image, compiled, median of", repeats, "calls\n")
    header = (
        f"{'scale':>7} | {'params dense/MoE':>17} | {'active/img MoE':>14} |"
        f" {'MFLOPs dense/MoE':>17} | {'ms dense/MoE':>13} | ratio"
    )
    print(header)
    print("-" * len(header))
    for scale in scales:
        dense = kmm.MobileVMoE.from_preset(scale, load_weights=False)
        moe = kmm.MobileVMoE.from_preset(f"{scale}_e10", load_weights=False)
        image = convert_images(random_images(1, dense.backbone.image_shape))
        times = time_interleaved(
            {"dense": compiled_forward(dense), "moe": compiled_forward(moe)},
            image,
            repeats,
        )
        dense_ms, moe_ms = median_ms(times["dense"]), median_ms(times["moe"])
        print(
            f"{scale:>7} | {dense.count_params() / 1e6:6.2f}M / "
            f"{moe.count_params() / 1e6:6.2f}M | "
            f"{kmm.flops.activated_params(moe) / 1e6:12.2f}M | "
            f"{kmm.count_flops(dense) / 1e6:7.1f} / "
            f"{kmm.count_flops(moe) / 1e6:7.1f} | "
            f"{dense_ms:5.2f} / {moe_ms:5.2f} | {moe_ms / dense_ms:.2f}",
            flush=True,
        )


def trained_presets(names=("6x64.cifar100", "6x64_e10.cifar100")):
    data = kmm.datasets.cifar100.load_fixture()
    print("\n== Trained presets (CIFAR-100, weights in the package)")
    for name in names:
        model = kmm.MobileVMoE.from_preset(name)
        entry = kmm.MobileVMoE.presets[name]
        logits = model.predict(data["x_test"], verbose=0)  # raw 32x32 images
        top1 = float(np.mean(np.argmax(logits, -1) == data["y_test"]))
        line = (
            f"{name:>18}: {kmm.count_flops(model) / 1e6:.1f}M FLOPs, "
            f"{model.count_params() / 1e6:.2f}M params; test top-1 "
            f"{100 * entry['accuracy']['top1']:.2f}% on the 10,000 CIFAR-100 "
            f"test images, {100 * top1:.1f}% here on the fixture's 200"
        )
        if model.backbone.is_moe:
            images = model.preprocessor(data["x_test"])
            route = np.argmax(
                model.backbone.predict(images, verbose=0)["router_logits"], -1
            )
            table = np.asarray(model.superclass_ids)
            routed = float(np.mean(route == table[data["y_test"]]))
            line += f"; router picks the class's expert for {100 * routed:.1f}%"
        print(line, flush=True)


def fine_tune(preset, epochs, seed):
    """Fine-tunes a trained preset to CIFAR-100's 20 coarse classes."""
    data = kmm.datasets.cifar100.load_fixture()
    experts = np.asarray(
        kmm.MobileVMoE.presets[preset]["task"]["superclass_ids"]
    )
    coarse_of = kmm.datasets.cifar100.fine_to_coarse(
        data["y_train"], data["y_train_coarse"]
    )
    # Each coarse class goes to the expert most of its fine classes use.
    table = [
        int(np.bincount(experts[coarse_of == c]).argmax()) for c in range(20)
    ]
    keras.utils.set_random_seed(seed)
    model = kmm.MobileVMoE.from_preset(
        preset, num_classes=20, superclass_ids=table
    )
    model.compile()  # a loaded preset with a new head: AdamW at 1e-4
    print(
        f"\n== fine-tuning {preset} to a new task: CIFAR-100's 20 coarse "
        f"classes (a new head), {len(data['x_train'])} fixture training "
        f"images, {epochs} epochs; held-out accuracy on the fixture's "
        f"{len(data['x_test'])} test images (chance 5%)"
    )
    print(
        "   (the backbone saw the training images with their fine labels "
        "during pretraining; the test images it never saw)"
    )

    def held_out():
        return model.evaluate(
            data["x_test"], data["y_test_coarse"], verbose=0, return_dict=True
        )["accuracy"]

    start = time.perf_counter()
    print(f"epoch 0: held-out top-1 {held_out():.3f}")
    for epoch in range(epochs):
        logs = model.fit(
            data["x_train"],
            data["y_train_coarse"],
            batch_size=32,
            epochs=1,
            verbose=0,
        ).history
        print(
            f"epoch {epoch + 1}: held-out top-1 {held_out():.3f} (train loss "
            f"{logs['loss'][0]:.3f}, router accuracy "
            f"{logs['router_accuracy'][0]:.3f})",
            flush=True,
        )
    print(f"fine-tuning took {time.perf_counter() - start:.0f} s")


def main(argv):
    del argv
    family_table(FLAGS.value, REPEATS.value)
    trained_presets()
    fine_tune("6x64_e10.cifar100", EPOCHS.value, SEED.value)


if __name__ == "__main__":
    app.run(main)
