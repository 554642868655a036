"""What several guides share: their settings, the data, a per-class split,
pooled features, a linear probe and the router's accuracy.

Not a guide itself: the guides import it (`import guide_helpers`), which
works when they run as scripts (`python guides/<name>.py` puts `guides/`
on the import path).
"""

import os
import tempfile

import keras
import numpy as np

import keras_mobile_moe as kmm


def smoke_mode():
    """Whether `KMM_GUIDE_SMOKE=1` asks for a quick run (the tests)."""
    return os.environ.get("KMM_GUIDE_SMOKE", "0") == "1"


def output_dir(prefix):
    """`KMM_GUIDE_OUTPUT_DIR`, or a new temporary folder; created."""
    folder = os.environ.get("KMM_GUIDE_OUTPUT_DIR") or tempfile.mkdtemp(
        prefix=prefix
    )
    os.makedirs(folder, exist_ok=True)
    return folder


def load_cifar100(smoke):
    """CIFAR-100 from `KMM_CIFAR100_PATH`, else (and in smoke runs) the
    fixture shipped with the package; prints which.

    Returns:
        `(data, full)`: the dataset dict and whether it is the full
        CIFAR-100.
    """
    data, source = kmm.datasets.cifar100.load_data_or_fixture(use_fixture=smoke)
    print(f"data: {source}")
    return data, source.startswith("CIFAR-100 from")


def per_class_sample(labels, counts, seed=0):
    """Disjoint index sets with counts[i] images of every class each."""
    rng = np.random.default_rng(seed)
    splits = [[] for _ in counts]
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for split, count in zip(splits, counts):
            split.extend(members[start : start + count])
            start += count
    return [rng.permutation(np.asarray(s)) for s in splits]


def pooled_features(model, images, batch_size=200):
    """The vectors a classifier's head reads (the class token, or the mean
    of the patch tokens for `pooling="avg"`), for raw images."""
    converter = model.preprocessor.image_converter
    first_patch = int(model.backbone.use_class_token)
    pooled = []
    for start in range(0, len(images), batch_size):
        pixels = converter(images[start : start + batch_size])
        tokens = np.asarray(
            model.backbone.predict_on_batch(pixels)["sequence_output"]
        )
        if model.pooling == "token":
            pooled.append(tokens[:, 0])
        else:
            pooled.append(tokens[:, first_patch:].mean(1))
    return np.concatenate(pooled)


def linear_probe(
    features,
    labels,
    val_features,
    val_labels,
    num_classes,
    learning_rate,
    epochs,
):
    """A `Dense` layer fitted on frozen features.

    Returns:
        `(probe, accuracy, confusion)`: the probe, its held-out accuracy and
        its held-out confusion matrix (rows: true class, columns: predicted
        class), which `kmm.superclasses_from_confusion` cuts into groups.
    """
    probe = keras.Sequential(
        [keras.Input((features.shape[-1],)), keras.layers.Dense(num_classes)]
    )
    probe.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    probe.fit(features, labels, epochs=epochs, batch_size=256, verbose=0)
    predictions = np.argmax(probe.predict(val_features, verbose=0), axis=-1)
    accuracy = float(np.mean(predictions == val_labels))
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (val_labels, predictions), 1)
    return probe, accuracy, confusion


def router_accuracy(model, images, labels, batch_size=200):
    """The share of images a Mobile V-MoE routes to the expert of their
    label's super-class (`model.superclass_ids`)."""
    converter = model.preprocessor.image_converter
    table = np.asarray(model.superclass_ids)
    hits = 0
    for start in range(0, len(images), batch_size):
        logits = model.backbone.predict_on_batch(
            converter(images[start : start + batch_size])
        )["router_logits"]
        chosen = np.argmax(np.asarray(logits), axis=-1)
        hits += int(np.sum(chosen == table[labels[start : start + batch_size]]))
    return hits / len(images)


def test_scores(model, images, labels):
    """`(top-1 accuracy, router accuracy)` of a Mobile V-MoE classifier."""
    results = model.evaluate(
        images, labels, batch_size=100, verbose=0, return_dict=True
    )
    return float(results["accuracy"]), router_accuracy(model, images, labels)
