"""
# Getting started with keras_mobile_moe

A Mobile V-MoE is a vision transformer whose last blocks hold several expert
MLPs; for every image a single router picks one of them, so the image pays
the FLOPs of a dense ViT while the model holds more parameters. This guide
builds a dense ViT and its MoE twin from presets, counts their FLOPs, runs
them on real CIFAR-100 images and looks at the router's choices.

Run it with `KERAS_BACKEND=jax python guides/getting_started.py` (any
backend works). It takes under a minute on 2 CPU cores.
"""

import numpy as np

import keras_mobile_moe as kmm

"""
## Build a dense ViT and its MoE twin

Presets name the paper's scales: `{layers}x{width}` for the dense ViT and
`{layers}x{width}_e10` for the MoE with 10 experts in its last 2 blocks.
Trained weights are not published yet, so we build the architectures with
random weights.
"""

dense = kmm.MobileVMoE.from_preset("6x64", load_weights=False, num_classes=100)
moe = kmm.MobileVMoE.from_preset("6x64_e10", load_weights=False, num_classes=100)

"""
## Count parameters and FLOPs

`count_flops` counts one image's forward pass and only the experts that run:
the MoE holds about twice the parameters at the same FLOPs.
"""

for name, model in [("dense 6x64", dense), ("MoE 6x64_e10", moe)]:
    print(
        f"{name:>13}: {model.count_params() / 1e6:.2f}M parameters, "
        f"{kmm.count_flops(model) / 1e6:.1f}M FLOPs per image"
    )

"""
## Predict on real images

The classifier's preprocessor resizes raw uint8 images to 224x224 and scales
them, so CIFAR-100's 32x32 images go in as they are.
"""

data = kmm.datasets.cifar100.load_fixture()
images = data["x_test"][:8]
logits = moe.predict(images, verbose=0)
print("logits:", logits.shape)

"""
## Which expert did each image use?

The backbone also returns the router's logits; the chosen expert is their
argmax. With random weights the choice is arbitrary; training with
`superclass_ids` (see the README) teaches the router to send each
super-class to its own expert.
"""

pixels = moe.preprocessor.image_converter(images)
router_logits = moe.backbone.predict(pixels, verbose=0)["router_logits"]
experts = np.argmax(router_logits, axis=-1)
for name, expert in zip(data["class_names"][data["y_test"][:8]], experts):
    print(f"{name:>15} -> expert {expert}")
