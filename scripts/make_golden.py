"""Writes tests/data/mobile_vmoe_golden.npz: weights, inputs and outputs of
two tiny Mobile V-MoE classifiers computed on one backend (JAX by default),
which every backend must reproduce (tests/test_backend_parity.py).

Usage:
    KERAS_BACKEND=jax python scripts/make_golden.py
"""

import pathlib
import sys

import keras
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

from test_backend_parity import CASES  # noqa: E402
from test_backend_parity import build  # noqa: E402
from test_backend_parity import weight_key  # noqa: E402

OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data"


def main():
    keras.utils.set_random_seed(0)
    images = np.random.default_rng(0).uniform(-1, 1, (6, 32, 32, 3))
    arrays = {"images": images.astype("float32")}
    for name in CASES:
        model = build(name)
        # Spread the router so the images use several experts.
        dense = model.backbone.router.dense
        kernel = keras.ops.convert_to_numpy(dense.kernel)
        dense.kernel.assign(20.0 * kernel)
        outputs = model.backbone(arrays["images"])
        arrays[f"{name}/logits"] = keras.ops.convert_to_numpy(
            model(arrays["images"])
        )
        arrays[f"{name}/router_logits"] = keras.ops.convert_to_numpy(
            outputs["router_logits"]
        )
        for variable in model.weights:
            arrays[weight_key(name, variable)] = keras.ops.convert_to_numpy(
                variable
            )
        chosen = np.argmax(arrays[f"{name}/router_logits"], -1)
        print(f"{name}: experts chosen {chosen.tolist()}")
    OUT.mkdir(exist_ok=True)
    np.savez_compressed(OUT / "mobile_vmoe_golden.npz", **arrays)
    print(f"wrote {OUT / 'mobile_vmoe_golden.npz'} on {keras.config.backend()}")


if __name__ == "__main__":
    main()
