import collections

import keras
import numpy as np
from keras import ops

from keras_mobile_moe import families
from keras_mobile_moe.capacity import check_capacity_budget
from keras_mobile_moe.models.base import FamilyImageClassifier
from keras_mobile_moe.models.mone.mone_backbone import MoNEBackbone
from keras_mobile_moe.models.mone.mone_image_classifier_preprocessor import (
    MoNEImageClassifierPreprocessor,
)
from keras_mobile_moe.validation import check_choice

# The budgets the paper's adaptive model samples from, one per step.
ADAPTIVE_BUDGETS = (0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95)


def resolve_training_budgets(training_budgets, num_nested_experts):
    """The budgets to sample in training (None: the inference budget)."""
    if training_budgets is None:
        return None
    if isinstance(training_budgets, str):
        check_choice("training_budgets", training_budgets, ("adaptive",))
        budgets = ADAPTIVE_BUDGETS
    elif isinstance(training_budgets, (list, tuple)) and training_budgets:
        budgets = tuple(training_budgets)
    else:
        raise ValueError(
            f"Received: training_budgets={training_budgets!r}. Expected None, "
            "'adaptive' (the paper's 0.15, 0.25, ..., 0.95) or a non-empty "
            "list of capacity budgets."
        )
    return tuple(check_capacity_budget(b, num_nested_experts) for b in budgets)


def budget_sampling_train_function(task, make_step):
    """A train function that runs each step at a budget drawn uniformly from
    a MoNE classifier's `training_budgets`.

    One step function per budget (each traced at its first call, while its
    budget is set); the draws come from a generator seeded from numpy's
    global one (`keras.utils.set_random_seed`). After every step the
    backbone is back at its `capacity_budget`. Used by
    `MoNEImageClassifier.make_train_function` and by models that train a
    MoNE classifier's graph (`training/trainer.py`).

    Args:
        task: a `MoNEImageClassifier` with `training_budgets`.
        make_step: callable returning a new, not yet traced, train step of
            the model being fit.

    Returns:
        The train function; its `budget_steps` attribute counts the steps
        run at each budget.
    """
    budgets, backbone = task._budgets, task.backbone
    steps = {budget: make_step() for budget in dict.fromkeys(budgets)}
    rng = np.random.default_rng(np.random.randint(2**31 - 1))
    counts = collections.Counter()

    def train_function(*args, **kwargs):
        budget = budgets[int(rng.integers(len(budgets)))]
        counts[budget] += 1
        backbone.use_budget(budget)
        try:
            return steps[budget](*args, **kwargs)
        finally:
            backbone.use_budget(backbone.capacity_budget)

    train_function.budget_steps = counts
    return train_function


@keras.saving.register_keras_serializable(package="keras_mobile_moe")
class MoNEImageClassifier(FamilyImageClassifier):
    """MoNE image classifier (`kmm.MoNE`): nested experts + pooling + linear
    head.

    Jain et al., "Mixture of Nested Experts: Adaptive Processing of Visual
    Tokens", NeurIPS 2024. A `MoNEBackbone`, the mean of its tokens (or its
    class token, for a backbone with `use_class_token=True`, e.g. one
    converted from a timm ViT) and a linear layer. There is no auxiliary
    loss: the router learns through the `(alpha * r + 1)` scaling of every
    block's MLP branch.

    The compute budget can be changed at any time, e.g. on a trained or
    loaded model, without retraining: `model.capacity_budget = 0.3` (the
    next `predict`/`evaluate`/`fit` compiles for the new token groups).
    With `training_budgets="adaptive"` every training step runs at a budget
    drawn uniformly from 0.15, 0.25, ..., 0.95 (the paper's adaptive model,
    which can then be used at any of them); evaluation and prediction use
    `capacity_budget`.

    Args:
        backbone: a `MoNEBackbone`.
        num_classes: int. Number of classes.
        preprocessor: a `MoNEImageClassifierPreprocessor` or None.
        pooling: `"avg"` (the mean of the tokens; for a backbone without a
            class token) or `"token"` (the class token; for a backbone with
            `use_class_token=True`). None: the one the backbone has.
        dropout: float in [0, 1). Dropout before the head.
        activation: activation of the head (None: logits).
        training_budgets: None (train at the backbone's `capacity_budget`),
            `"adaptive"`, or a list of budgets to draw one from per training
            step (per execution with `steps_per_execution > 1`).
        head_dtype: dtype policy of the head (default: the backbone's).

    Mixed precision: the classifier takes the backbone's dtype policy; the
    logits come out in its compute dtype and the loss is computed in
    float32. Under `"mixed_float16"`, `compile` wraps the optimizer in
    `keras.optimizers.LossScaleOptimizer` (Keras' `auto_scale_loss`).

    Call arguments:
        images: images `[batch, height, width, channels]`.
        training: bool.

    Returns:
        Logits `[batch, num_classes]`.

    Example:

    >>> import numpy as np
    >>> backbone = MoNEBackbone(
    ...     image_shape=(32, 32, 3), patch_size=8, num_layers=2,
    ...     hidden_dim=16, num_heads=2, mlp_dim=32, capacity_budget=0.6)
    >>> model = MoNEImageClassifier(backbone, num_classes=4)
    >>> images = np.random.rand(8, 32, 32, 3).astype("float32")
    >>> tuple(model.predict(images, verbose=0).shape)
    (8, 4)
    >>> model.capacity_budget = 0.3  # cheaper inference, same weights
    >>> model.backbone.token_counts()
    (7, 5, 3, 1)
    """

    backbone_cls = MoNEBackbone
    preprocessor_cls = MoNEImageClassifierPreprocessor

    def __init__(
        self,
        backbone,
        num_classes,
        preprocessor=None,
        pooling=None,
        dropout=0.0,
        activation=None,
        training_budgets=None,
        head_dtype=None,
        **kwargs,
    ):
        self._check_head_arguments(
            backbone, num_classes, pooling, ("avg", "token", None), dropout
        )
        # With a class token the head reads it (the one full-width token);
        # without, the mean of the routed tokens.
        natural = "token" if backbone.use_class_token else "avg"
        pooling = natural if pooling is None else pooling
        if pooling != natural:
            raise ValueError(
                f"Received: pooling={pooling!r} for a backbone with "
                f"use_class_token={backbone.use_class_token}. Accepted: "
                f"pooling={natural!r} (or None)."
            )
        budgets = resolve_training_budgets(
            training_budgets, backbone.num_nested_experts
        )

        # === Layers ===
        self._make_head(
            backbone,
            preprocessor,
            num_classes,
            dropout,
            activation,
            head_dtype,
        )

        # === Functional model ===
        images = backbone.input
        tokens = backbone(images)["sequence_output"]
        if pooling == "token":
            x = tokens[:, 0, :]
        else:
            x = ops.mean(tokens, axis=1)
        x = self.output_dropout(x)
        logits = self.output_dense(x)
        self._finish_functional(
            logits, num_classes, pooling, dropout, activation, **kwargs
        )

        # === Config ===
        self.training_budgets = (
            list(training_budgets)
            if isinstance(training_budgets, (list, tuple))
            else training_budgets
        )
        self._budgets = budgets

    @property
    def capacity_budget(self):
        """The inference compute budget e_c of the backbone; assignable."""
        return self.backbone.capacity_budget

    @capacity_budget.setter
    def capacity_budget(self, value):
        self.backbone.capacity_budget = value
        self.train_function = None
        self.test_function = None
        self.predict_function = None

    def make_train_function(self, force=False):
        """The train step; with `training_budgets`, one compiled step per
        budget and a dispatcher that draws the budget of every step."""
        if not self._budgets:
            return super().make_train_function(force=force)
        if self.train_function is not None and not force:
            return self.train_function

        def make_step():
            super(MoNEImageClassifier, self).make_train_function(force=True)
            return self.train_function

        self.train_function = budget_sampling_train_function(self, make_step)
        return self.train_function

    def get_config(self):
        config = super().get_config()
        config.update({"training_budgets": self.training_budgets})
        return config


families.register(MoNEImageClassifier)
MoNE = MoNEImageClassifier
