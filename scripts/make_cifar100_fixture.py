"""Cut the small CIFAR-100 fixture that tests and the demo use.

The fixture holds 8 training and 2 test images of every fine class (1,000
images), chosen with a fixed seed from the full CIFAR-100 archive described in
`../shared/datasets/README.md`, with fine labels, coarse (super-class) labels
and class names.

Usage:
    python scripts/make_cifar100_fixture.py [--source PATH] [--out PATH]
"""

import argparse
import pathlib

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "datasets" / "cifar100.npz"
DEFAULT_OUT = ROOT / "keras_mobile_moe" / "datasets" / "cifar100_fixture.npz"


def take_per_class(labels, per_class, rng):
    picked = []
    for label in range(100):
        candidates = np.flatnonzero(labels == label)
        picked.append(rng.choice(candidates, per_class, replace=False))
    return np.sort(np.concatenate(picked))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", default=str(DEFAULT_SOURCE))
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args()

    data = np.load(args.source, allow_pickle=False)
    rng = np.random.default_rng(0)
    train = take_per_class(data["y_train"], 8, rng)
    test = take_per_class(data["y_test"], 2, rng)
    np.savez_compressed(
        args.out,
        x_train=data["x_train"][train],
        y_train=data["y_train"][train],
        y_train_coarse=data["y_train_coarse"][train],
        x_test=data["x_test"][test],
        y_test=data["y_test"][test],
        y_test_coarse=data["y_test_coarse"][test],
        class_names=data["class_names"],
        coarse_names=data["coarse_names"],
    )
    print(f"wrote {args.out}: {len(train)} train, {len(test)} test images")


if __name__ == "__main__":
    main()
