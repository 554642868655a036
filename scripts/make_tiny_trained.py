"""Trains the small Mobile V-MoE that export tests measure quantization on.

A 4-layer, width-48 MoE (E=4 experts = CIFAR-100's 20 super-classes folded
in groups of 5, k=1, last 2 blocks) on 32x32 CIFAR-100 images, so that its
classes and routing decisions are learned, not random. It trains on the full
training split when the archive is available (`--data`, default
../shared/datasets/cifar100.npz), else on the fixture. Writes
tests/data/tiny_moe_cifar100.keras.

Usage:
    KERAS_BACKEND=jax python scripts/make_tiny_trained.py [--epochs 15]
"""

import argparse
import pathlib

import keras

import keras_mobile_moe as kmm

OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data"


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--data",
        default=str(
            OUT.parents[1].parent / "shared" / "datasets" / "cifar100.npz"
        ),
    )
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    keras.utils.set_random_seed(0)
    if pathlib.Path(args.data).exists():
        data = kmm.datasets.cifar100.load_data(args.data)
        print(f"training on the full training split of {args.data}")
    else:
        data = kmm.datasets.cifar100.load_fixture()
        print("training on the fixture (full archive not found)")
    table = (
        kmm.datasets.cifar100.fine_to_coarse(
            data["y_train"], data["y_train_coarse"]
        )
        // 5
    )
    backbone = kmm.MobileVMoEBackbone(
        image_shape=(32, 32, 3),
        patch_size=8,
        num_layers=4,
        hidden_dim=48,
        num_heads=2,
        mlp_dim=192,
        num_experts=4,
        num_moe_layers=2,
    )
    model = kmm.MobileVMoE(backbone, num_classes=100, superclass_ids=table)
    model.compile(optimizer=keras.optimizers.AdamW(2e-3, weight_decay=0.05))
    x = data["x_train"].astype("float32") / 127.5 - 1.0
    model.fit(x, data["y_train"], batch_size=128, epochs=args.epochs, verbose=2)
    # Save a copy without optimizer state: the file stays small.
    inference = kmm.MobileVMoE.from_config(model.get_config())
    inference.set_weights(model.get_weights())
    OUT.mkdir(exist_ok=True)
    inference.save(OUT / "tiny_moe_cifar100.keras")
    print(f"wrote {OUT / 'tiny_moe_cifar100.keras'}")


if __name__ == "__main__":
    main()
