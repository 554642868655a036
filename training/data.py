"""CIFAR-100 input pipeline for `training/train.py`.

A `keras.utils.PyDataset` that feeds `fit`/`evaluate` on every backend
(JAX, TensorFlow, PyTorch) from the uint8 arrays in memory:

- a seeded stratified train/validation split (`stratified_split`);
- per epoch a seeded permutation (every batch holds many classes; the data
  on disk is sorted by class);
- augmentation at 32x32 (cheap: the cores stay on the model): random crop
  with zero padding and horizontal flip in numpy, then, by recipe, the core
  Keras layers `RandAugment`, `MixUp` / `CutMix` (one of the two per batch)
  and `RandomErasing`;
- float32 images in [0, 255] at 32x32 and float one-hot (soft after
  Mixup/CutMix) targets. The resize to the model's input size (224 for the
  paper's models) and the scaling to [-1, 1] happen inside the trained graph
  (`trainer.Trainer`), on the accelerator: 32x32 batches are 49x smaller to
  move than 224x224 ones.

All randomness of batch `i` in epoch `e` comes from `(seed, e, i)`, so a run is
reproducible for a seed and a run resumed at epoch `e` sees the same data as an
uninterrupted one. Set `.epoch` before `fit` when resuming.
"""

import math

import keras
import numpy as np


def stratified_split(labels, fraction, seed):
    """Returns (train_indices, val_indices): `fraction` of each class held out.

    Args:
        labels: int array [N].
        fraction: float in [0, 1).
        seed: int.

    Returns:
        Two sorted int arrays.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"Received: val_fraction={fraction!r}. Expected [0, 1).")
    rng = np.random.default_rng([seed, 7919])
    labels = np.asarray(labels)
    val = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_val = int(round(len(idx) * fraction))
        val.append(rng.permutation(idx)[:n_val])
    val = np.sort(np.concatenate(val)) if val else np.zeros(0, int)
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train, val


def _seed_generators(layer, seen=None):
    """Every `SeedGenerator` a (composite) augmentation layer draws from."""
    seen = set() if seen is None else seen
    found = []
    for value in vars(layer).values():
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, keras.random.SeedGenerator):
            found.append(value)
        elif isinstance(value, keras.layers.Layer):
            found.extend(_seed_generators(value, seen))
    return found


def _reseed(generators, rng):
    for generator in generators:
        state = generator.state
        generator.state.assign(
            keras.ops.convert_to_tensor(
                [int(rng.integers(0, 2**30)), 0], dtype=state.dtype
            )
        )


class CifarBatches(keras.utils.PyDataset):
    """Batches of 32x32 CIFAR images with a recipe's augmentation.

    Args:
        images: uint8 array [N, 32, 32, 3].
        labels: int array [N] (fine classes).
        batch_size: int.
        num_classes: int (one-hot width).
        recipe: a `training.recipes.Recipe` for training, None for evaluation
            (no shuffling, no augmentation, the last partial batch kept).
        seed: int.
        max_steps: int or None, a cap on the batches per epoch (smoke runs).
    """

    def __init__(
        self,
        images,
        labels,
        batch_size,
        num_classes,
        recipe=None,
        seed=0,
        max_steps=None,
    ):
        super().__init__(workers=1, use_multiprocessing=False, max_queue_size=4)
        self.images = images
        self.labels = np.asarray(labels, dtype="int64")
        self.batch_size = int(batch_size)
        self.num_classes = int(num_classes)
        self.recipe = recipe
        self.seed = int(seed)
        self.max_steps = max_steps
        self.epoch = 0
        self._perm_epoch = None
        self._perm = None
        self.layers = []
        if recipe is not None:
            self._build_layers(recipe)

    def _build_layers(self, recipe):
        if recipe.rand_augment_ops:
            self.rand_augment = keras.layers.RandAugment(
                value_range=(0, 255),
                num_ops=recipe.rand_augment_ops,
                factor=recipe.rand_augment_factor,
                seed=self.seed,
            )
            self.layers.append(self.rand_augment)
        if recipe.mixup_alpha:
            self.mixup = keras.layers.MixUp(alpha=recipe.mixup_alpha, seed=self.seed)
            self.layers.append(self.mixup)
        if recipe.cutmix_alpha:
            self.cutmix = keras.layers.CutMix(
                factor=recipe.cutmix_alpha, seed=self.seed
            )
            self.layers.append(self.cutmix)
        if recipe.random_erasing:
            self.random_erasing = keras.layers.RandomErasing(
                factor=recipe.random_erasing, value_range=(0, 255), seed=self.seed
            )
            self.layers.append(self.random_erasing)
        self._generators = [g for layer in self.layers for g in _seed_generators(layer)]

    @property
    def training(self):
        return self.recipe is not None

    def __len__(self):
        n = len(self.labels)
        steps = n // self.batch_size if self.training else math.ceil(n / self.batch_size)
        steps = max(steps, 1)
        if self.max_steps:
            steps = min(steps, int(self.max_steps))
        return steps

    def _order(self):
        if not self.training:
            return np.arange(len(self.labels))
        if self._perm_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch, 1])
            self._perm = rng.permutation(len(self.labels))
            self._perm_epoch = self.epoch
        return self._perm

    def __getitem__(self, index):
        if index >= len(self):
            raise IndexError(index)
        ids = self._order()[index * self.batch_size : (index + 1) * self.batch_size]
        x = self.images[ids]
        y = np.eye(self.num_classes, dtype="float32")[self.labels[ids]]
        if self.training:
            rng = np.random.default_rng([self.seed, self.epoch, 2, index])
            x, y = self.augment(x, y, rng)
        return np.asarray(x, "float32"), y

    def augment(self, x, y, rng):
        """Random crop + flip (numpy), then the recipe's Keras layers."""
        recipe = self.recipe
        n, h, w, _ = x.shape
        pad = recipe.random_crop_padding
        if pad:
            padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
            dy = rng.integers(0, 2 * pad + 1, n)
            dx = rng.integers(0, 2 * pad + 1, n)
            rows = dy[:, None] + np.arange(h)[None, :]
            cols = dx[:, None] + np.arange(w)[None, :]
            x = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
        if recipe.horizontal_flip:
            flip = rng.random(n) < 0.5
            x = np.where(flip[:, None, None, None], x[:, :, ::-1], x)
        if not self.layers:
            return x, y
        _reseed(self._generators, rng)
        x = keras.ops.convert_to_tensor(x.astype("float32"))
        if recipe.rand_augment_ops:
            x = self.rand_augment(x, training=True)
        if recipe.mixup_alpha or recipe.cutmix_alpha:
            use_mixup = recipe.mixup_alpha and (
                not recipe.cutmix_alpha or rng.random() < 0.5
            )
            layer = self.mixup if use_mixup else self.cutmix
            out = layer({"images": x, "labels": keras.ops.convert_to_tensor(y)})
            x, y = out["images"], keras.ops.convert_to_numpy(out["labels"])
        if recipe.random_erasing:
            x = self.random_erasing(x, training=True)
        return np.clip(keras.ops.convert_to_numpy(x), 0, 255), y.astype("float32")

    def on_epoch_end(self):
        self.epoch += 1
