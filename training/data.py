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
        raise ValueError(
            f"Received: val_fraction={fraction!r}. Expected [0, 1)."
        )
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


def _data_layers(layers, seen=None):
    """Every layer (nested ones included) with its own random generator."""
    seen = set() if seen is None else seen
    found = []
    for layer in layers:
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        if isinstance(
            getattr(layer, "generator", None), keras.random.SeedGenerator
        ):
            found.append(layer)
        found.extend(
            _data_layers(
                [
                    v
                    for v in vars(layer).values()
                    if isinstance(v, keras.layers.Layer)
                ],
                seen,
            )
        )
    return found


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
        compile_augmentation: bool. Run the recipe's Keras layers as one
            `tf.function` (default) or eagerly (for comparison; slow).
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
        compile_augmentation=True,
    ):
        super().__init__(workers=1, use_multiprocessing=False, max_queue_size=4)
        self.images = images
        self.labels = np.asarray(labels, dtype="int64")
        self.batch_size = int(batch_size)
        self.num_classes = int(num_classes)
        self.recipe = recipe
        self.seed = int(seed)
        self.max_steps = max_steps
        self.compile_augmentation = bool(compile_augmentation)
        self.epoch = 0
        self._perm_epoch = None
        self._perm = None
        self.layers = []
        self._compiled = None
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
            self.mixup = keras.layers.MixUp(
                alpha=recipe.mixup_alpha, seed=self.seed
            )
            self.layers.append(self.mixup)
        if recipe.cutmix_alpha:
            self.cutmix = keras.layers.CutMix(
                factor=recipe.cutmix_alpha, seed=self.seed
            )
            self.layers.append(self.cutmix)
        if recipe.random_erasing:
            self.random_erasing = keras.layers.RandomErasing(
                factor=recipe.random_erasing,
                value_range=(0, 255),
                seed=self.seed,
            )
            self.layers.append(self.random_erasing)
        self._generators = [
            g for layer in self.layers for g in _seed_generators(layer)
        ]
        self._compiled = None

    @property
    def training(self):
        return self.recipe is not None

    def __len__(self):
        n = len(self.labels)
        steps = (
            n // self.batch_size
            if self.training
            else math.ceil(n / self.batch_size)
        )
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
        ids = self._order()[
            index * self.batch_size : (index + 1) * self.batch_size
        ]
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
            x = padded[
                np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]
            ]
        if recipe.horizontal_flip:
            flip = rng.random(n) < 0.5
            x = np.where(flip[:, None, None, None], x[:, :, ::-1], x)
        if not self.layers:
            return x, y
        mix = None
        if recipe.mixup_alpha or recipe.cutmix_alpha:
            use_mixup = recipe.mixup_alpha and (
                not recipe.cutmix_alpha or rng.random() < 0.5
            )
            mix = "mixup" if use_mixup else "cutmix"
        if self._compiled is None:
            self._compiled = self._compile_layers()
        seeds = [int(rng.integers(0, 2**30)) for _ in self._compiled[1]]
        x, y = self._augment_layers(x.astype("float32"), y, mix, seeds)
        return np.clip(np.asarray(x, "float32"), 0, 255), np.asarray(
            y, "float32"
        )

    def warm_up(self):
        """Traces the compiled augmentation for every mix kind now (once per
        batch shape; otherwise the first batch of each kind pays it, ~3 s).
        Draws nothing from the batch randomness: batches stay the same."""
        if not self.layers:
            return
        if self._compiled is None:
            self._compiled = self._compile_layers()
        recipe = self.recipe
        kinds = [None]
        if recipe.mixup_alpha or recipe.cutmix_alpha:
            kinds = [
                k
                for k, a in (
                    ("mixup", recipe.mixup_alpha),
                    ("cutmix", recipe.cutmix_alpha),
                )
                if a
            ]
        n = min(self.batch_size, len(self.labels))
        x = np.zeros((n, *self.images.shape[1:]), "float32")
        y = np.zeros((n, self.num_classes), "float32")
        for mix in kinds:
            self._augment_layers(x, y, mix, [0] * len(self._compiled[1]))

    def _apply_layers(self, x, y, mix):
        """The recipe's Keras layers on one batch (backend tensors)."""
        if self.recipe.rand_augment_ops:
            x = self.rand_augment(x, training=True)
        if mix is not None:
            out = getattr(self, mix)({"images": x, "labels": y})
            x, y = out["images"], out["labels"]
        if self.recipe.random_erasing:
            x = self.random_erasing(x, training=True)
        return x, y

    def _augment_layers(self, x, y, mix, seeds):
        """Runs `_apply_layers` on a batch, seeded by `seeds` (one per
        random generator of the layers); returns numpy arrays.

        Eager, the layers cost ~1-3 s per batch of 128 on a CPU core
        (RandAugment computes all 14 of its operations for each of its 2
        picks; Equalization loops over 256 bins in Python: ~13,000 op
        dispatches). As a `tf.function` (on every backend: Keras data layers
        switch to TensorFlow ops inside a TF graph, as in `tf.data`) a batch
        takes ~0.1 s, traced once per batch shape and mix kind. `jax.jit`
        of the same layers compiled for ~100 s and ran at ~1 s per batch.
        Without TensorFlow the layers run eagerly.
        """
        function, generators = self._compiled
        for generator, seed in zip(generators, seeds):
            state = generator.state
            if function is None:
                value = keras.ops.convert_to_tensor(
                    [seed, 0], dtype=state.dtype
                )
            else:
                import tensorflow as tf

                value = tf.constant([seed, 0], dtype=state.dtype)
            state.assign(value)
        if function is None:
            x, y = self._apply_layers(
                keras.ops.convert_to_tensor(x),
                keras.ops.convert_to_tensor(y),
                mix,
            )
            return keras.ops.convert_to_numpy(x), keras.ops.convert_to_numpy(y)
        x, y = function(x, y, mix)
        return x.numpy(), y.numpy()

    def _compile_layers(self):
        """(tf.function or None, the seed generators it draws from)."""
        if not self.compile_augmentation:
            return None, self._generators
        try:
            import tensorflow as tf
        except ImportError:
            return None, self._generators
        # The TensorFlow-side generator of every data layer, made before
        # tracing (a tf.function may create variables on its first trace
        # only). On the TensorFlow backend these are the layers' own.
        generators = []
        for layer in _data_layers(self.layers):
            layer.backend.set_backend("tensorflow")
            try:
                generator = layer._get_seed_generator("tensorflow")
            finally:
                layer.backend.reset()
            if all(generator is not g for g in generators):
                generators.append(generator)
        return tf.function(self._apply_layers), generators

    def on_epoch_end(self):
        self.epoch += 1
