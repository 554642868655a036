"""Behaviour shared by the classifier tasks of every family."""

import keras
import numpy as np

# AdamW learning rates of `compile(optimizer="auto")`, by where the weights
# came from. Fine-tuning a trained preset at the from-scratch rate lost 4.5
# points of test top-1 in one epoch; 3e-5 kept it, and a new head (random)
# learned fastest at 1e-4 (benchmarks/results/finetune_defaults.md).
AUTO_LEARNING_RATES = {"scratch": 3e-4, "new_head": 1e-4, "pretrained": 3e-5}


def weights_source(load_weights, overrides):
    """How `from_preset` initialised a task: `"scratch"` (random weights),
    `"new_head"` (loaded weights, a rebuilt head for a new `num_classes`) or
    `"pretrained"` (every weight loaded)."""
    if not load_weights:
        return "scratch"
    return "new_head" if "num_classes" in overrides else "pretrained"


def auto_optimizer(task):
    """The optimizer of `compile(optimizer="auto")`: AdamW with weight decay
    0.05 at the learning rate of `AUTO_LEARNING_RATES` for the task's
    `weights_source` (`"scratch"` for a task built directly)."""
    source = getattr(task, "weights_source", "scratch")
    return keras.optimizers.AdamW(
        AUTO_LEARNING_RATES[source], weight_decay=0.05
    )


def _is_array(x):
    return isinstance(x, np.ndarray) or (
        hasattr(x, "shape") and hasattr(x, "dtype") and not hasattr(x, "element_spec")
    )


class ShuffledFitMixin:
    """Makes `fit(..., shuffle=True)` shuffle in-memory arrays every epoch.

    keras-hub's `Task.fit` turns arrays into a `tf.data` pipeline without
    shuffling and ignores `shuffle=True` (Keras' default). On data sorted by
    class, like the CIFAR-100 archive and fixture, every batch then holds a
    single class and training fails. Here arrays are shuffled each epoch
    (deterministic under `keras.utils.set_random_seed`); datasets and
    generators pass through untouched.
    """

    def fit(
        self,
        x=None,
        y=None,
        batch_size=None,
        shuffle=True,
        sample_weight=None,
        validation_split=None,
        validation_data=None,
        **kwargs,
    ):
        if shuffle and _is_array(x):
            if validation_split and validation_data is None:
                # Like Keras: the last fraction, before shuffling.
                cut = int(len(x) * (1.0 - validation_split))
                validation_data = (x[cut:], y[cut:]) if y is not None else x[cut:]
                if sample_weight is not None:
                    validation_data += (sample_weight[cut:],)
                    sample_weight = sample_weight[:cut]
                x, y = x[:cut], (y[:cut] if y is not None else None)
                validation_split = None
            x = self._shuffled_batches(x, y, sample_weight, batch_size or 32)
            y = sample_weight = batch_size = None
            shuffle = False  # done above; Keras warns if asked for a dataset
        return super().fit(
            x,
            y,
            batch_size=batch_size,
            shuffle=shuffle,
            sample_weight=sample_weight,
            validation_split=validation_split,
            validation_data=validation_data,
            **kwargs,
        )

    @staticmethod
    def _shuffled_batches(x, y, sample_weight, batch_size):
        import tensorflow as tf

        arrays = tuple(
            np.asarray(a) for a in (x, y, sample_weight) if a is not None
        )
        dataset = tf.data.Dataset.from_tensor_slices(arrays)
        dataset = dataset.shuffle(len(arrays[0]), reshuffle_each_iteration=True)
        return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)
