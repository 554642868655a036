"""The model `train.py` fits: the classifier's graph on 32x32 batches.

Kept apart from `train.py` (which defines absl flags) so that tests and
other programs (`evaluate.py`, `benchmarks/train_throughput.py`) can
import it.
"""

import keras
import numpy as np


class Trainer(keras.Model):
    """A classifier's graph behind an in-graph resize, fitted with the
    classifier's own loss.

    What differs from `classifier.fit`: the input. The loader moves 32x32
    batches in [0, 255] and this model resizes and scales them in its graph,
    as the preset's image converter does at inference, so that the
    accelerator does the upsampling (keras-hub's `Task.fit` would run the
    preprocessor in the input pipeline). Everything else is the classifier's:
    `compute_loss` (with Mobile V-MoE's router loss, on one-hot or
    Mixup/CutMix soft targets), the metrics it updates
    (`router_loss`, `router_accuracy`), and a MoNE classifier's
    budget-sampled train step (`training_budgets`; `budget_steps` counts the
    steps run at each budget). The classifier is what gets saved.

    The layers are `[images, resizing, rescaling, classifier graph]`: the
    `BackupAndRestore` checkpoints in `training/checkpoints/` hold exactly
    these (the classifier itself is not a tracked layer here).

    Args:
        classifier: a `kmm.MobileVMoE` or `kmm.MoNE` (its `preprocessor` is
            not used: set it to None while training).
        source_size: (height, width) of the loader's images.
    """

    def __init__(self, classifier, source_size=(32, 32)):
        height, width = classifier.backbone.image_shape[:2]
        images = keras.Input((*source_size, 3), name="images")
        x = keras.layers.Resizing(height, width, interpolation="bilinear")(
            images
        )
        x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0)(x)
        graph = keras.Model(
            classifier.input, classifier.output, name="classifier"
        )
        super().__init__(inputs=images, outputs=graph(x), name="trainer")
        # Reached through a function: Keras saves every attribute that is a
        # Keras object (`dir()`), and the checkpoints must hold exactly this
        # model's layers and optimizer, not the classifier's optimizer too.
        self._task = lambda: classifier

    def compile(self, optimizer, loss, metrics=None, **kwargs):
        """Compiles the classifier with `loss` (its `compute_loss` reads
        it) and this model with `optimizer` and `metrics`."""
        # The classifier keeps its own (unused) optimizer: its saved preset
        # holds no training state, as before.
        task = self._task()
        task.compile(
            optimizer=getattr(task, "optimizer", None) or "auto",
            loss=loss,
            metrics=[],
        )
        super().compile(optimizer=optimizer, metrics=metrics, **kwargs)

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        task = self._task()
        # On JAX the losses that layers add in a step (token routers' load
        # balancing) are held by the model being fit: lend them to the task.
        held = task._losses_override
        task._losses_override = list(self.losses)
        try:
            return task.compute_loss(
                x, y, y_pred, sample_weight, training=training
            )
        finally:
            task._losses_override = held

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        # The graph returns the router logits outside training too.
        logits = y_pred["logits"] if isinstance(y_pred, dict) else y_pred
        return super().compute_metrics(x, y, logits, sample_weight)

    @property
    def metrics(self):
        task = getattr(self, "_task", None)  # unset while __init__ runs
        return super().metrics + (list(task().loss_metrics) if task else [])

    def make_train_function(self, force=False):
        if not getattr(self._task(), "training_budgets", None):
            return super().make_train_function(force=force)
        if self.train_function is not None and not force:
            return self.train_function
        from keras_mobile_moe.models.mone.mone_image_classifier import (
            budget_sampling_train_function,
        )

        def make_step():
            super(Trainer, self).make_train_function(force=True)
            return self.train_function

        self.train_function = budget_sampling_train_function(
            self._task(), make_step
        )
        return self.train_function

    @property
    def budget_steps(self):
        """{budget: steps run at it} of the current train function."""
        return dict(getattr(self.train_function, "budget_steps", {}))


def evaluate(predict, batches, superclass_ids):
    """(top-1, router accuracy or None) over all batches, one forward pass.

    Args:
        predict: batch of images -> logits, or a dict with `logits` and
            `router_logits`.
        batches: a `data.CifarBatches` (one-hot labels).
        superclass_ids: the class -> expert table, or None (no router score).
    """
    correct = routed = total = 0
    table = None if superclass_ids is None else np.asarray(superclass_ids)
    for i in range(len(batches)):
        x, y = batches[i]
        out = predict(x)
        labels = np.argmax(y, axis=-1)
        if isinstance(out, dict):
            logits = out["logits"]
            if table is not None:
                route = np.argmax(np.asarray(out["router_logits"]), axis=-1)
                routed += int(np.sum(route == table[labels]))
        else:
            logits = out
        correct += int(np.sum(np.argmax(np.asarray(logits), axis=-1) == labels))
        total += len(labels)
    router = routed / total if table is not None else None
    return correct / total, router
