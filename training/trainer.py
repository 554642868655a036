"""The model `train.py` fits: the classifier's graph on 32x32 batches.

Kept apart from `train.py` (which defines absl flags) so that tests and
other programs (`evaluate.py`) can import it.
"""

import collections

import keras
import numpy as np


class Trainer(keras.Model):
    """The classifier's graph (shared weights) trained on float targets.

    keras-hub's `Task.fit` only takes arrays, `tf.data` or grain datasets and
    the classifier's `compute_loss` reads integer labels for the router loss.
    This functional model shares every layer of `classifier`, always returns
    `{"logits", "router_logits"}` for MoE models and computes the loss on
    float (one-hot or Mixup/CutMix soft) targets `y` [B, C]; the router's
    target is the matching super-class mixture `y @ onehot(superclass_ids)`
    [B, E], its cross-entropy (float32) added with `router_loss_weight`.
    Its input is the loader's 32x32 images in [0, 255]. The classifier
    itself is what gets saved.

    A MoNE classifier's `training_budgets` (e.g. `"adaptive"`) are honoured
    as `MoNEImageClassifier.make_train_function` does: one compiled step per
    budget, and every step runs at a budget drawn uniformly (from numpy's
    global generator, seeded by `keras.utils.set_random_seed`);
    evaluation and prediction run at the classifier's `capacity_budget`.
    `budget_steps` counts the steps run at each budget.
    """

    def __init__(self, classifier, source_size=(32, 32)):
        # Resizing and scaling in the graph, as the preset's image converter
        # does at inference: the loader moves 32x32 batches, the accelerator
        # does the upsampling.
        height, width = classifier.backbone.image_shape[:2]
        images = keras.Input((*source_size, 3), name="images")
        x = keras.layers.Resizing(height, width, interpolation="bilinear")(images)
        x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0)(x)
        graph = keras.Model(classifier.input, classifier.output, name="classifier")
        super().__init__(inputs=images, outputs=graph(x), name="trainer")
        self.training_budgets = None
        budgets = getattr(classifier, "training_budgets", None)
        if budgets is not None:
            from keras_mobile_moe.models.mone.mone_image_classifier import (
                resolve_training_budgets,
            )

            backbone = classifier.backbone
            self.training_budgets = resolve_training_budgets(
                budgets, backbone.num_nested_experts
            )
            # Bound methods: not tracked as layers (the checkpoint's
            # variables stay those of the graph).
            self._use_budget = backbone.use_budget
            self._inference_budget = lambda: backbone.capacity_budget
        self.superclass_ids = None
        if getattr(classifier, "router_loss", None) is not None:
            self.superclass_ids = list(classifier.superclass_ids)
            self.router_loss_weight = float(classifier.router_loss_weight)
            self.router_loss_tracker = keras.metrics.Mean(name="router_loss")
            self.router_accuracy = keras.metrics.CategoricalAccuracy(
                name="router_accuracy"
            )

    def make_train_function(self, force=False):
        """The train step; with `training_budgets`, one compiled step per
        budget and a dispatcher that draws the budget of every step."""
        if not self.training_budgets:
            return super().make_train_function(force=force)
        if self.train_function is not None and not force:
            return self.train_function
        steps = {}
        for budget in dict.fromkeys(self.training_budgets):
            # A new, lazily traced step; traced at its first call, while the
            # dispatcher below has set its budget.
            super().make_train_function(force=True)
            steps[budget] = self.train_function
        rng = np.random.default_rng(np.random.randint(2**31 - 1))
        budgets = tuple(self.training_budgets)
        counts = collections.Counter()
        use_budget, inference_budget = self._use_budget, self._inference_budget

        def train_function(*args, **kwargs):
            budget = budgets[int(rng.integers(len(budgets)))]
            counts[budget] += 1
            use_budget(budget)
            try:
                return steps[budget](*args, **kwargs)
            finally:
                use_budget(inference_budget())

        train_function.budget_steps = counts
        self.train_function = train_function
        return train_function

    @property
    def budget_steps(self):
        """{budget: steps run at it} of the current train function."""
        return dict(getattr(self.train_function, "budget_steps", {}))

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        logits = y_pred["logits"] if isinstance(y_pred, dict) else y_pred
        loss = super().compute_loss(x, y, logits, sample_weight, training=training)
        if self.superclass_ids is None or not isinstance(y_pred, dict):
            return loss
        router_logits = keras.ops.cast(y_pred["router_logits"], "float32")
        table = keras.ops.one_hot(
            keras.ops.convert_to_tensor(self.superclass_ids, dtype="int32"),
            router_logits.shape[-1],
        )
        targets = keras.ops.matmul(keras.ops.cast(y, "float32"), table)
        router_loss = keras.ops.mean(
            keras.losses.categorical_crossentropy(
                targets, router_logits, from_logits=True
            )
        )
        self.router_loss_tracker.update_state(router_loss)
        self.router_accuracy.update_state(targets, router_logits)
        return loss + keras.ops.cast(self.router_loss_weight, loss.dtype) * (
            keras.ops.cast(router_loss, loss.dtype)
        )

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        logits = y_pred["logits"] if isinstance(y_pred, dict) else y_pred
        return super().compute_metrics(x, y, logits, sample_weight)


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
