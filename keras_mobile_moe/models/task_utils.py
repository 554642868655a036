"""Behaviour shared by the classifier tasks of every family."""

import numpy as np


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
