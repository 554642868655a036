import keras
import numpy as np
from keras import ops

from keras_mobile_moe import validation


def check_superclass_ids(superclass_ids, num_classes=None, num_experts=None):
    """Validates a class -> super-class table and returns it as a list.

    Args:
        superclass_ids: sequence of ints, entry `c` the super-class of class
            `c`.
        num_classes: int or None. The required table length.
        num_experts: int or None. Super-class ids must be below this.

    Returns:
        The table as a list of Python ints.
    """
    table = np.asarray(superclass_ids)
    if table.ndim != 1 or table.size == 0 or table.dtype.kind not in "iu":
        raise ValueError(
            "superclass_ids must be a non-empty 1-D sequence of ints, one "
            f"super-class id per class. Received: {superclass_ids!r}."
        )
    if num_classes is not None and table.size != num_classes:
        raise ValueError(
            f"superclass_ids has {table.size} entries but the model has "
            f"num_classes={num_classes}. Accepted: one super-class id per "
            "class."
        )
    if table.min() < 0:
        raise ValueError(
            f"superclass_ids contains the negative id {int(table.min())}. "
            "Accepted: ids in [0, num_experts)."
        )
    if num_experts is not None and table.max() >= num_experts:
        raise ValueError(
            f"superclass_ids contains id {int(table.max())} but there are "
            f"num_experts={num_experts} experts. Accepted: ids in "
            f"[0, {num_experts}); each expert specialises on one super-class."
        )
    return [int(i) for i in table]


@keras.saving.register_keras_serializable(package="keras_mobile_moe")
class SuperclassRouterLoss(keras.losses.Loss):
    """Cross-entropy between the router and the super-class of the label.

    Daxberger et al., "Mobile V-MoEs", arXiv 2309.04354, Sec. 2: the router is
    trained to send each image to the expert of its super-class, so
    `L = L_cls + lambda * L_router` with this loss as `L_router` (lambda = 0.3
    in the paper). The class -> super-class table is part of the config.

    The labels are integer class ids or soft targets: one-hot rows, or the
    label distributions Mixup / CutMix make (rows that sum to 1). A soft
    label's super-class target is its distribution summed per super-class,
    `y_true @ one_hot(superclass_ids)` (see `superclass_targets`): an image
    mixed 70/30 from two classes of different super-classes asks the router
    for 0.7 / 0.3 on their two experts, and a one-hot row gives exactly the
    loss of its integer label.

    Args:
        superclass_ids: sequence of ints; entry `c` is the super-class (=
            expert) of fine class `c`.
        from_logits: bool. Whether `y_pred` holds router logits (default) or
            probabilities.
        label_smoothing: float in [0, 1). Smoothing of the super-class
            targets.
        reduction, name, dtype: see `keras.losses.Loss`.

    Call arguments:
        y_true: fine class labels: integer ids `[batch]` (or `[batch, 1]`),
            or one-hot / soft targets `[batch, num_classes]` whose rows sum
            to 1 (`num_classes = len(superclass_ids)`).
        y_pred: float tensor `[batch, num_experts]` of router logits.

    Returns:
        The reduced cross-entropy.

    Example:

    >>> import numpy as np
    >>> loss = SuperclassRouterLoss(superclass_ids=[0, 0, 1, 1])
    >>> logits = np.array([[5.0, -5.0], [-5.0, 5.0]], "float32")
    >>> float(loss(np.array([1, 2]), logits)) < 1e-3
    True
    >>> mixed = np.array([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.3, 0.7]])
    >>> float(loss(mixed, logits)) < 1e-3  # both rows stay in one super-class
    True
    """

    def __init__(
        self,
        superclass_ids,
        from_logits=True,
        label_smoothing=0.0,
        reduction="sum_over_batch_size",
        name="superclass_router_loss",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.superclass_ids = check_superclass_ids(superclass_ids)
        self.from_logits = bool(from_logits)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(
                f"Received: label_smoothing={label_smoothing!r}. Expected a "
                "float in [0, 1)."
            )
        self.label_smoothing = float(label_smoothing)

    def __call__(self, y_true, y_pred, sample_weight=None):
        # Values can only be checked on concrete labels; tensors inside a
        # compiled step are checked by shape (`superclass_targets`), and a
        # task's `fit` checks every batch in numpy before Keras sees it.
        if isinstance(y_true, (np.ndarray, list, tuple)):
            validation.check_labels(
                np.asarray(y_true),
                len(self.superclass_ids),
                sparse=None,
                num_images=_static_batch(y_pred),
                name="y_true",
            )
        return super().__call__(y_true, y_pred, sample_weight=sample_weight)

    def superclass_targets(self, y_true, num_experts):
        """The router's target distribution for a batch of labels.

        Args:
            y_true: integer class ids `[batch]` / `[batch, 1]`, or one-hot /
                soft targets `[batch, num_classes]`.
            num_experts: int. The router's number of experts.

        Returns:
            Float32 `[batch, num_experts]`: the one-hot super-class of each
            integer label; for soft targets, the label distribution summed
            per super-class (`y_true @ one_hot(superclass_ids)`).

        Example:

        >>> loss = SuperclassRouterLoss(superclass_ids=[0, 1, 1])
        >>> import numpy as np
        >>> targets = loss.superclass_targets(
        ...     np.array([[0.2, 0.5, 0.3]], "float32"), 2)
        >>> [round(float(v), 3) for v in np.asarray(targets)[0]]
        [0.2, 0.8]
        """
        if num_experts is not None and max(self.superclass_ids) >= num_experts:
            raise ValueError(
                f"superclass_ids reaches id {max(self.superclass_ids)} but the "
                f"router has {num_experts} experts. Accepted: ids in "
                f"[0, {num_experts})."
            )
        num_classes = len(self.superclass_ids)
        shape = tuple(ops.shape(y_true)) if hasattr(y_true, "shape") else ()
        rank = len(shape)
        width = shape[-1] if rank == 2 else None
        is_soft = rank == 2 and width not in (None, 1)
        if rank not in (1, 2) or (is_soft and width != num_classes):
            raise ValueError(
                f"Received: y_true of shape {_shape_str(shape)}. Expected "
                f"integer class ids [batch] (or [batch, 1]) in "
                f"[0, {num_classes}), or one-hot / soft targets "
                f"[batch, {num_classes}] whose rows sum to 1 (num_classes = "
                "len(superclass_ids))."
            )
        if is_soft:
            table = ops.one_hot(
                ops.convert_to_tensor(self.superclass_ids, dtype="int32"),
                num_experts,
                dtype="float32",
            )
            return ops.matmul(ops.cast(y_true, "float32"), table)
        table = ops.convert_to_tensor(self.superclass_ids, dtype="int32")
        labels = ops.reshape(ops.cast(y_true, "int32"), (-1,))
        superclasses = ops.take(table, labels, axis=0)
        return ops.one_hot(superclasses, num_experts, dtype="float32")

    def call(self, y_true, y_pred):
        num_experts = y_pred.shape[-1]
        targets = self.superclass_targets(y_true, num_experts)
        if self.label_smoothing:
            targets = targets * (1.0 - self.label_smoothing) + (
                self.label_smoothing / float(num_experts)
            )
        # In float32 whatever the model's dtype policy (router softmax rule).
        return keras.losses.categorical_crossentropy(
            targets, ops.cast(y_pred, "float32"), from_logits=self.from_logits
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "superclass_ids": self.superclass_ids,
                "from_logits": self.from_logits,
                "label_smoothing": self.label_smoothing,
            }
        )
        return config


def _static_batch(y_pred):
    shape = getattr(y_pred, "shape", None)
    if shape is None or not len(shape) or shape[0] is None:
        return None
    return int(shape[0])


def _shape_str(shape):
    dims = ", ".join("None" if d is None else str(int(d)) for d in shape)
    return f"({dims},)" if len(shape) == 1 else f"({dims})"
