"""Behaviour shared by the classifier tasks of every family.

`fit`, `evaluate` and `predict` accept what Keras accepts on every backend
(numpy / backend arrays, `tf.data.Dataset`, `keras.utils.PyDataset`, Python
generators) and check every batch in numpy before Keras is entered: images
(the user's own shape and dtype, before preprocessing; the converter's
`value_range`; no bool, NaN or inf) and labels (integer ids in range, or
one-hot / soft targets of width `num_classes`). Training stops with a clear
error if the loss becomes NaN or inf, before any later callback (e.g. a
checkpoint) runs.
"""

import itertools
import types
import warnings

import keras
import numpy as np

from keras_mobile_moe import validation

# AdamW learning rates of `compile(optimizer="auto")`, by where the weights
# came from. Fine-tuning a trained preset at the from-scratch rate lost 4.5
# points of test top-1 in one epoch; 3e-5 kept it, and a new (random) head
# ended highest at 1e-4 (benchmarks/results/finetune_defaults.md).
AUTO_LEARNING_RATES = {"scratch": 3e-4, "new_head": 1e-4, "pretrained": 3e-5}


def weights_source(load_weights, overrides):
    """How `from_preset` initialised a task: `"scratch"` (random weights),
    `"new_head"` (loaded weights, a rebuilt head for a new `num_classes`) or
    `"pretrained"` (every weight loaded)."""
    if not load_weights:
        return "scratch"
    return "new_head" if "num_classes" in overrides else "pretrained"


def auto_metrics(loss):
    """The metrics of `compile(metrics="auto")`: top-1 accuracy on the label
    form the loss reads (one-hot or soft targets for a categorical
    cross-entropy, class ids otherwise)."""
    categorical = isinstance(loss, keras.losses.CategoricalCrossentropy) or (
        loss
        in ("categorical_crossentropy", keras.losses.categorical_crossentropy)
    )
    if categorical:
        return [keras.metrics.CategoricalAccuracy("accuracy")]
    return [keras.metrics.SparseCategoricalAccuracy("accuracy")]


def auto_optimizer(task):
    """The optimizer of `compile(optimizer="auto")`: AdamW with weight decay
    0.05 at the learning rate of `AUTO_LEARNING_RATES` for the task's
    `weights_source` (`"scratch"` for a task built directly)."""
    source = getattr(task, "weights_source", "scratch")
    return keras.optimizers.AdamW(
        AUTO_LEARNING_RATES[source], weight_decay=0.05
    )


_UNSET = object()


def _is_array(x):
    return isinstance(x, np.ndarray) or (
        hasattr(x, "shape")
        and hasattr(x, "dtype")
        and not hasattr(x, "element_spec")
    )


def _is_tf_dataset(x):
    return hasattr(x, "element_spec") and hasattr(x, "map")


def _is_grain_dataset(x):
    return type(x).__module__.split(".")[0] == "grain"


def _is_generator(x):
    return isinstance(x, types.GeneratorType) or (
        hasattr(x, "__next__") and hasattr(x, "__iter__") and not _is_array(x)
    )


def _to_numpy(x):
    if x is None or isinstance(x, np.ndarray):
        return x
    if isinstance(x, (list, tuple)) and not hasattr(x, "shape"):
        return np.asarray(x)
    return np.asarray(keras.ops.convert_to_numpy(x))


def _images_of(x):
    if isinstance(x, dict) and "images" in x:
        return x["images"]
    return x


class ValueRangeMixin:
    """Mixin for the image converters: a `value_range` contract.

    `value_range=(low, high)` (default `(0, 255)`) is the range of the raw
    images the converter takes; it is folded into `scale` and `offset`, so
    images in `(0, 1)` with `value_range=(0, 1)` give the model exactly the
    inputs 0-255 pixels give with the default.
    """

    def __init__(
        self, *args, value_range=validation.DEFAULT_VALUE_RANGE, **kwargs
    ):
        value_range = validation.check_value_range(value_range)
        super().__init__(*args, **kwargs)
        self._given_scale, self._given_offset = self.scale, self.offset
        self.value_range = value_range

    @property
    def value_range(self):
        """`(low, high)` of the raw images; settable (rescales at once)."""
        return self._value_range

    @value_range.setter
    def value_range(self, value_range):
        low, high = validation.check_value_range(value_range)
        self._value_range = (low, high)
        scale, offset = self._given_scale, self._given_offset
        if (low, high) != validation.DEFAULT_VALUE_RANGE:
            # x in [low, high] -> pixels p = (x - low) * 255 / (high - low).
            factor = 255.0 / (high - low)
            given = np.asarray(1.0 if scale is None else scale, "float64")
            shift = np.asarray(0.0 if offset is None else offset, "float64")
            new_scale, new_offset = given * factor, shift - low * factor * given
            scale = (
                float(new_scale) if new_scale.ndim == 0 else new_scale.tolist()
            )
            offset = (
                float(new_offset)
                if new_offset.ndim == 0
                else new_offset.tolist()
            )
        self.scale, self.offset = scale, offset

    def _call_python(self, inputs):
        # Integer images are resized as float32. keras-hub's converter runs
        # eagerly (a direct call, and `predict`/`fit` on arrays when `grain`
        # is installed) or in tf.data; eagerly, Keras' `Resizing` rounds a
        # resized integer image back to integers (up to 0.5/255 off), in
        # tf.data it does not, and neither does the exported TFLite file.
        images = _images_of(inputs)
        dtype = getattr(images, "dtype", None)
        if dtype is not None and "int" in keras.backend.standardize_dtype(
            dtype
        ):
            images = self._convert_types(images, images, "float32")[0]
            if isinstance(inputs, dict):
                inputs = {**inputs, "images": images}
            else:
                inputs = images
        return super()._call_python(inputs)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "scale": self._given_scale,
                "offset": self._given_offset,
                "value_range": list(self.value_range),
            }
        )
        return config


class _NonFiniteLoss(keras.callbacks.Callback):
    """Stops `fit` with a clear error when the loss becomes NaN or inf."""

    def __init__(self):
        super().__init__()
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None:
            return
        value = float(np.asarray(keras.ops.convert_to_numpy(loss)))
        if not np.isfinite(value):
            raise FloatingPointError(
                f"Training stopped: the loss is {value} at epoch "
                f"{self.epoch + 1}, batch {batch + 1}. The inputs were "
                "checked (finite images in range, valid labels), so the "
                "training diverged: lower the learning rate or add gradient "
                "clipping (compile(optimizer=keras.optimizers.AdamW(..., "
                "clipnorm=1.0))). No callback ran after this batch, so no "
                "checkpoint holds the non-finite weights."
            )


def _model_variables(model):
    variables = list(model.trainable_variables) + list(
        model.non_trainable_variables
    )
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and getattr(optimizer, "built", False):
        variables += list(optimizer.variables)
    variables += list(getattr(model, "metrics_variables", []))
    return variables


def _jax_snapshot(model):
    if keras.config.backend() != "jax":
        return None
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and not getattr(optimizer, "built", True):
        # Built here rather than inside fit, so that its variables are in
        # the snapshot (fit builds it the same way).
        optimizer.build(model.trainable_variables)
    return (
        getattr(model, "_jax_state", None),
        [(v, v._value) for v in _model_variables(model)],
    )


def _jax_restore(model, snapshot):
    """Re-attaches variable values that a failed JAX `fit` / `evaluate` /
    `predict` purged: the latest trained state when that call produced one,
    else the values from before the call."""
    if snapshot is None:
        return
    state_before, values = snapshot
    state = getattr(model, "_jax_state", None)
    if state is not None and state is not state_before:
        try:
            model.jax_state_sync()
        except Exception:  # fall back to the values from before the call
            pass
    for variable, value in values:
        if getattr(variable, "_value", None) is None and value is not None:
            variable._value = value
    metrics = {id(v) for v in getattr(model, "metrics_variables", [])}
    for variable in _model_variables(model):
        if getattr(variable, "_value", 0) is None and id(variable) in metrics:
            # Created inside the failed call; metrics start at zero.
            variable._value = keras.ops.zeros(variable.shape, variable.dtype)
        if getattr(variable, "_value", 0) is None:
            raise RuntimeError(
                f"Variable {variable.path} lost its value in a failed call "
                "and could not be restored; rebuild the model."
            )
    model._jax_state_synced = True


class ShuffledFitMixin:
    """Checked inputs for `fit` / `evaluate` / `predict`, and shuffling.

    keras-hub's `Task.fit` turns arrays into a `tf.data` pipeline without
    shuffling and ignores `shuffle=True` (Keras' default). On data sorted by
    class, like the CIFAR-100 archive and fixture, every batch then holds a
    single class and training fails. Here arrays are shuffled each epoch
    (deterministic under `keras.utils.set_random_seed`). Every input kind
    Keras accepts is checked batch by batch (see the module docstring);
    `PyDataset` and generators are fed through `tf.data` so that they work
    on every backend.
    """

    # --- checks -------------------------------------------------------------

    def _sparse_labels(self):
        loss = getattr(self, "loss", None)
        if loss is None or loss == "auto":
            return True
        name = loss if isinstance(loss, str) else type(loss).__name__
        name = name.lower().replace("_", "")
        if "sparse" in name:
            return True
        if "categorical" in name:
            return False
        return None

    def _check_batch(self, x, y=None):
        """Checks one batch (numpy-convertible) of images and labels."""
        image_shape = tuple(self.backbone.image_shape)
        converter = getattr(self.preprocessor, "image_converter", None)
        images = _to_numpy(_images_of(x))
        if self.preprocessor is None:
            validation.check_image_batch(images, image_shape, None, True)
        else:
            value_range = getattr(
                converter, "value_range", validation.DEFAULT_VALUE_RANGE
            )
            validation.check_image_batch(images, image_shape, value_range)
        if y is not None:
            # The router loss reads both label forms, as the class loss does.
            validation.check_labels(
                _to_numpy(y),
                self.num_classes,
                self._sparse_labels(),
                num_images=len(images),
            )

    def _checked_element(self, element, errors):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(element)
        try:
            self._check_batch(x, y)
        except ValueError as error:
            errors.append(error)
            raise

    def _checked_tf_dataset(self, dataset, errors):
        import tensorflow as tf

        spec = dataset.element_spec

        def run(*flat):
            element = tf.nest.pack_sequence_as(spec, list(flat))
            try:
                self._checked_element(element, errors)
            except ValueError:
                return np.bool_(False)  # the error is in `errors`
            return np.bool_(True)

        def check(*element):
            structure = element[0] if len(element) == 1 else element
            flat = tf.nest.flatten(structure)
            ok = tf.numpy_function(run, flat, Tout=tf.bool, stateful=True)
            assertion = tf.debugging.Assert(
                ok, ["keras_mobile_moe: a batch failed the input checks"]
            )
            with tf.control_dependencies([assertion]):
                flat = [tf.identity(t) for t in flat]
            return tf.nest.pack_sequence_as(structure, flat)

        return dataset.map(check)

    def _generator_dataset(self, batches, length, errors):
        """A `tf.data.Dataset` over Python batches (PyDataset / generator)."""
        import tensorflow as tf

        iterator = iter(batches())
        try:
            first = next(iterator)
        except StopIteration:
            raise ValueError(
                "Received: an empty dataset or generator (no batch). Expected "
                "at least one batch of images."
            ) from None
        first = keras.utils.unpack_x_y_sample_weight(first)
        first = tuple(_to_numpy(a) if a is not None else None for a in first)
        while first and first[-1] is None:
            first = first[:-1]
        if any(a is None for a in first):
            raise ValueError(
                "Received: a batch with sample_weight but no y. Expected "
                "(images,), (images, y) or (images, y, sample_weight)."
            )
        signature = tuple(
            tf.TensorSpec((None,) + a.shape[1:], tf.as_dtype(a.dtype))
            for a in first
        )
        state = {"pending": first, "iterator": iterator}

        def generate():
            pending = state.pop("pending", None)
            source = (
                itertools.chain([pending], state["iterator"])
                if pending is not None
                else iter(batches())
            )
            for element in source:
                element = keras.utils.unpack_x_y_sample_weight(element)
                element = tuple(_to_numpy(a) for a in element[: len(signature)])
                self._checked_element(element, errors)
                yield element if len(element) > 1 else element[0]

        output = signature if len(signature) > 1 else signature[0]
        dataset = tf.data.Dataset.from_generator(
            generate, output_signature=output
        )
        if length:
            dataset = dataset.apply(
                tf.data.experimental.assert_cardinality(length)
            )
        return dataset

    def _checked_input(self, x, y, errors, labels=True):
        """Returns `(x, y)` with every batch checked before Keras sees it."""
        if isinstance(x, keras.utils.PyDataset):
            if y is not None:
                raise ValueError(
                    "Received: y with a PyDataset x. Expected the labels "
                    "inside the PyDataset's batches."
                )
            dataset = x

            def batches():
                for i in range(len(dataset)):
                    yield dataset[i]
                dataset.on_epoch_end()

            return self._generator_dataset(batches, len(dataset), errors), None
        if _is_tf_dataset(x):
            return self._checked_tf_dataset(x, errors), y
        if _is_grain_dataset(x):
            # keras-hub feeds grain datasets itself; each batched element
            # is checked as grain produces it.
            def check(element):
                self._checked_element(element, errors)
                return element

            return x.map(check), y
        if _is_generator(x):
            if y is not None:
                raise ValueError(
                    "Received: y with a generator x. Expected the generator "
                    "to yield (images, labels) batches."
                )
            generator = x
            return self._generator_dataset(
                lambda: generator, None, errors
            ), None
        if x is None:
            raise ValueError("Received: x=None. Expected a batch of images.")
        images = _images_of(x)
        if isinstance(images, (list, tuple)):
            images = np.asarray(images)
            x = images
        self._check_batch(images, y if labels else None)
        return x, y

    def _run_checked(self, method, errors, *args, **kwargs):
        """Runs a Keras entry point; a batch that failed the checks inside a
        pipeline raises its own `ValueError`. On JAX, a failure inside
        `fit`/`evaluate`/`predict` leaves the variables purged (Keras
        3.15.1): they are put back, so the model stays usable."""
        snapshot = _jax_snapshot(self)
        try:
            return method(*args, **kwargs)
        except Exception as error:
            _jax_restore(self, snapshot)
            if errors:
                raise errors[0] from None
            raise error

    # --- Keras entry points ---------------------------------------------------

    def fit(
        self,
        x=None,
        y=None,
        batch_size=None,
        shuffle=_UNSET,
        sample_weight=None,
        validation_split=None,
        validation_data=None,
        callbacks=None,
        **kwargs,
    ):
        errors = []
        user_shuffle = shuffle is not _UNSET
        # A generator's length is unknown: Keras 3.15.1 runs its first epoch
        # dry and then warns "Your input ran out of data" although nothing
        # was cut short. Only that warning, only for one epoch, is hidden.
        one_pass = (
            _is_generator(x)
            and kwargs.get("epochs", 1) == 1
            and kwargs.get("steps_per_epoch") is None
        )
        if _is_array(x) or isinstance(x, (list, tuple, dict)):
            if y is None:
                raise ValueError(
                    "Received: y=None with array images. Expected labels y "
                    f"(integer class ids in [0, {self.num_classes}))."
                )
        x, y = self._checked_input(x, y, errors)
        if validation_data is not None:
            if isinstance(validation_data, tuple) and not _is_tf_dataset(
                validation_data
            ):
                vx, vy, vsw = keras.utils.unpack_x_y_sample_weight(
                    validation_data
                )
                vx, vy = self._checked_input(vx, vy, errors)
                validation_data = keras.utils.pack_x_y_sample_weight(
                    vx, vy, vsw
                )
            else:
                validation_data, _ = self._checked_input(
                    validation_data, None, errors
                )
        if shuffle is _UNSET:
            shuffle = True if _is_array(x) else None
        if shuffle and _is_array(x):
            if validation_split and validation_data is None:
                # Like Keras: the last fraction, before shuffling.
                cut = int(len(x) * (1.0 - validation_split))
                validation_data = (
                    (x[cut:], y[cut:]) if y is not None else x[cut:]
                )
                if sample_weight is not None:
                    validation_data += (sample_weight[cut:],)
                    sample_weight = sample_weight[:cut]
                x, y = x[:cut], (y[:cut] if y is not None else None)
                validation_split = None
            x = self._batches(
                x, y, sample_weight, batch_size or 32, shuffle=True
            )
            y = sample_weight = batch_size = None
            shuffle = None  # done above; Keras warns if asked for a dataset
        # Datasets are fed as they are; passing Keras' default shuffle=True
        # with them only makes Keras warn about a setting nobody chose.
        kwargs["shuffle"] = (
            bool(shuffle) if _is_array(x) or user_shuffle else False
        )
        callbacks = [_NonFiniteLoss()] + list(callbacks or [])
        with warnings.catch_warnings():
            if one_pass:
                warnings.filterwarnings(
                    "ignore", message="Your input ran out of data"
                )
            return self._run_checked(
                super().fit,
                errors,
                x,
                y,
                batch_size=batch_size,
                sample_weight=sample_weight,
                validation_split=validation_split,
                validation_data=validation_data,
                callbacks=callbacks,
                **kwargs,
            )

    def evaluate(self, x=None, y=None, *args, **kwargs):
        errors = []
        one_pass = _is_generator(x) and kwargs.get("steps") is None
        x, y = self._checked_input(x, y, errors)
        if _is_array(x) and not args:
            x = self._batches(
                x,
                y,
                kwargs.pop("sample_weight", None),
                kwargs.pop("batch_size", None) or 32,
                shuffle=False,
            )
            y = None
        with warnings.catch_warnings():
            if one_pass:  # see fit
                warnings.filterwarnings(
                    "ignore", message="Your input ran out of data"
                )
            return self._run_checked(
                super().evaluate, errors, x, y, *args, **kwargs
            )

    def predict(self, x, *args, **kwargs):
        errors = []
        one_pass = _is_generator(x) and kwargs.get("steps") is None
        x, _ = self._checked_input(x, None, errors, labels=False)
        if _is_array(x) and not args:
            x = self._batches(
                x,
                None,
                None,
                kwargs.pop("batch_size", None) or 32,
                shuffle=False,
            )
        with warnings.catch_warnings():
            if one_pass:  # see fit
                warnings.filterwarnings(
                    "ignore", message="Your input ran out of data"
                )
            return self._run_checked(
                super().predict, errors, x, *args, **kwargs
            )

    def train_on_batch(self, x, y=None, *args, **kwargs):
        self._check_batch(_images_of(x), y)
        return self._run_checked(
            super().train_on_batch, [], x, y, *args, **kwargs
        )

    def test_on_batch(self, x, y=None, *args, **kwargs):
        self._check_batch(_images_of(x), y)
        return self._run_checked(
            super().test_on_batch, [], x, y, *args, **kwargs
        )

    def predict_on_batch(self, x):
        self._check_batch(_images_of(x))
        return self._run_checked(super().predict_on_batch, [], x)

    @staticmethod
    def _batches(x, y, sample_weight, batch_size, shuffle):
        """A batched `tf.data.Dataset` of arrays: `fit`, `evaluate` and
        `predict` preprocess arrays in tf.data on every backend. (keras-hub
        would use grain when it is installed, which runs the converter with
        the backend's own resize: PyTorch's bicubic kernel is not TF's and
        PIL's, so results would depend on the backend and on grain.)"""
        import tensorflow as tf

        arrays = tuple(
            np.asarray(a) for a in (x, y, sample_weight) if a is not None
        )
        dataset = tf.data.Dataset.from_tensor_slices(arrays)
        if shuffle:
            dataset = dataset.shuffle(
                len(arrays[0]), reshuffle_each_iteration=True
            )
        return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)
