import keras
import numpy as np
from keras import ops


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

    Args:
        superclass_ids: sequence of ints; entry `c` is the super-class (=
            expert) of fine class `c`.
        from_logits: bool. Whether `y_pred` holds router logits (default) or
            probabilities.
        label_smoothing: float in [0, 1). Smoothing of the super-class
            targets.
        reduction, name, dtype: see `keras.losses.Loss`.

    Call arguments:
        y_true: int tensor `[batch]` of fine class labels.
        y_pred: float tensor `[batch, num_experts]` of router logits.

    Returns:
        The reduced cross-entropy.

    Example:

    >>> import numpy as np
    >>> loss = SuperclassRouterLoss(superclass_ids=[0, 0, 1, 1])
    >>> logits = np.array([[5.0, -5.0], [-5.0, 5.0]], "float32")
    >>> float(loss(np.array([1, 2]), logits)) < 1e-3
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

    def call(self, y_true, y_pred):
        num_experts = y_pred.shape[-1]
        if num_experts is not None and max(self.superclass_ids) >= num_experts:
            raise ValueError(
                f"superclass_ids reaches id {max(self.superclass_ids)} but the "
                f"router has {num_experts} experts. Accepted: ids in "
                f"[0, {num_experts})."
            )
        table = ops.convert_to_tensor(self.superclass_ids, dtype="int32")
        labels = ops.reshape(ops.cast(y_true, "int32"), (-1,))
        superclasses = ops.take(table, labels, axis=0)
        targets = ops.one_hot(superclasses, ops.shape(y_pred)[-1])
        if self.label_smoothing:
            targets = targets * (1.0 - self.label_smoothing) + (
                self.label_smoothing / ops.cast(ops.shape(y_pred)[-1], "float32")
            )
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
