import keras
import numpy as np
from keras import ops
from keras_hub.models import ImageClassifier
from keras_hub.models import Task

from keras_mobile_moe import preset_loader
from keras_mobile_moe import preset_registry
from keras_mobile_moe.capacity import check_capacity_budget
from keras_mobile_moe.models.mobile_vmoe.mobile_vmoe_backbone import (
    check_images,
)
from keras_mobile_moe.models.mone.mone_backbone import MoNEBackbone
from keras_mobile_moe.models.mone.mone_image_classifier_preprocessor import (
    MoNEImageClassifierPreprocessor,
)
from keras_mobile_moe.models import task_utils
from keras_mobile_moe.models.task_utils import ShuffledFitMixin
from keras_mobile_moe.validation import check_choice
from keras_mobile_moe.validation import check_int
from keras_mobile_moe.validation import check_rate

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


@keras.saving.register_keras_serializable(package="keras_mobile_moe")
class MoNEImageClassifier(ShuffledFitMixin, ImageClassifier):
    """MoNE image classifier (`kmm.MoNE`): nested experts + mean pooling +
    linear head.

    Jain et al., "Mixture of Nested Experts: Adaptive Processing of Visual
    Tokens", NeurIPS 2024. A `MoNEBackbone`, the mean of its tokens and a
    linear layer. There is no auxiliary loss: the router learns through the
    `(alpha * r + 1)` scaling of every block's MLP branch.

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
        pooling: `"avg"`, the mean of the tokens (the only choice; MoNE has
            no class token).
        dropout: float in [0, 1). Dropout before the head.
        activation: activation of the head (None: logits).
        training_budgets: None (train at the backbone's `capacity_budget`),
            `"adaptive"`, or a list of budgets to draw one from per training
            step (per execution with `steps_per_execution > 1`).
        head_dtype: dtype policy of the head.

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
        pooling="avg",
        dropout=0.0,
        activation=None,
        training_budgets=None,
        head_dtype=None,
        **kwargs,
    ):
        if not isinstance(backbone, MoNEBackbone):
            raise ValueError(
                f"Received: backbone of type {type(backbone).__name__}. "
                "Expected a MoNEBackbone."
            )
        check_int("num_classes", num_classes, minimum=1)
        check_choice("pooling", pooling, ("avg",))
        check_rate("dropout", dropout)
        budgets = resolve_training_budgets(
            training_budgets, backbone.num_nested_experts
        )
        head_dtype = head_dtype or backbone.dtype_policy

        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.output_dropout = keras.layers.Dropout(
            dropout, dtype=head_dtype, name="output_dropout"
        )
        self.output_dense = keras.layers.Dense(
            num_classes,
            activation=activation,
            dtype=head_dtype,
            name="predictions",
        )

        # === Functional model ===
        images = backbone.input
        tokens = backbone(images)["sequence_output"]
        x = self.output_dropout(ops.mean(tokens, axis=1))
        logits = self.output_dense(x)
        # Skip ImageClassifier.__init__, which builds its own head.
        Task.__init__(self, inputs=images, outputs=logits, **kwargs)

        # === Config ===
        self.num_classes = num_classes
        self.pooling = pooling
        self.dropout = dropout
        self.activation = activation
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

    def call(self, inputs, training=None, mask=None):
        check_images(inputs, self.backbone.image_shape)
        return super().call(inputs, training=training, mask=mask)

    def make_train_function(self, force=False):
        """The train step; with `training_budgets`, one compiled step per
        budget and a dispatcher that draws the budget of every step."""
        if not self._budgets:
            return super().make_train_function(force=force)
        if self.train_function is not None and not force:
            return self.train_function
        steps = {}
        for budget in dict.fromkeys(self._budgets):
            # Each call builds a new (lazily traced) step function; it is
            # traced at its first call, with the budget set below.
            super().make_train_function(force=True)
            steps[budget] = self.train_function
        # Seeded from numpy's global generator (keras.utils.set_random_seed).
        rng = np.random.default_rng(np.random.randint(2**31 - 1))
        budgets = self._budgets
        backbone = self.backbone

        def train_function(*args, **kwargs):
            budget = budgets[int(rng.integers(len(budgets)))]
            backbone.use_budget(budget)
            try:
                return steps[budget](*args, **kwargs)
            finally:
                backbone.use_budget(backbone.capacity_budget)

        self.train_function = train_function
        return train_function

    def compile(
        self, optimizer="auto", loss="auto", *, metrics="auto", **kwargs
    ):
        """Configures training; `"auto"` picks defaults for how the model
        got its weights.

        Args:
            optimizer: `"auto"` or a Keras optimizer. `"auto"` is AdamW with
                weight decay 0.05 at learning rate 3e-4 from scratch, 1e-4
                for a preset loaded with a new head (`num_classes=...`) and
                3e-5 for fine-tuning a fully loaded preset (a higher rate
                lowered a trained preset's accuracy: see
                `benchmarks/results/finetune_defaults.md`).
            loss: `"auto"` (sparse categorical cross-entropy on the logits)
                or a Keras loss.
            metrics: `"auto"` (top-1 accuracy on class ids, or on one-hot /
                soft targets with a categorical loss) or Keras metrics.
            **kwargs: passed to `keras.Model.compile`.
        """
        if optimizer == "auto":
            optimizer = task_utils.auto_optimizer(self)
        if metrics == "auto":
            metrics = task_utils.auto_metrics(loss)
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)

    def compile_from_config(self, config):
        # Restores the saved optimizer, loss and metrics on `load_model`.
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built:
            self.optimizer.build(self.trainable_variables)

    preset_family = "mone"

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """Builds a classifier from a preset name, directory or `hf://` handle.

        Args:
            preset: a built-in name (see `MoNEImageClassifier.presets`), a
                local preset directory, or `hf://org/repo[/revision]`.
            load_weights: bool. Whether to load the preset's weights.
            **kwargs: overrides of backbone or classifier arguments, e.g.
                `num_classes=10`, `capacity_budget=0.3` or
                `image_shape=(32, 32, 3)`.

        Returns:
            A `MoNEImageClassifier`.

        Example:

        >>> model = MoNEImageClassifier.from_preset(
        ...     "6x64_mone", load_weights=False, num_classes=10,
        ...     capacity_budget=0.3)
        >>> model.capacity_budget, model.backbone.token_counts()
        (0.3, (22, 15, 9, 3))
        """
        task = preset_loader.task_from_preset(cls, preset, load_weights, kwargs)
        task.weights_source = task_utils.weights_source(load_weights, kwargs)
        return task

    def save_to_preset(self, preset_dir, max_shard_size=None, overwrite=False):
        """Saves the classifier as a keras-hub preset directory.

        Writes the backbone files (`config.json`, `model.weights.h5`), the
        head (`task.json`, `task.weights.h5`), the preprocessor files,
        `metadata.json` and a `README.md` model card; loadable with
        `from_preset(preset_dir)`.

        Args:
            preset_dir: str or path-like. The directory (created if needed).
            max_shard_size: None (weights are kept in one file).
            overwrite: bool. Whether to replace preset files (`config.json`,
                `metadata.json`, ...) in `preset_dir` that keras_mobile_moe
                did not write; without it such a folder raises
                `FileExistsError`. The save is atomic: the preset is written
                next to `preset_dir` and swapped in at once, so an error or a
                kill leaves the previous preset loadable; other files in the
                folder are kept.

        Returns:
            None.

        Example:

        >>> import tempfile
        >>> model = MoNEImageClassifier.from_preset(
        ...     "6x64_mone", load_weights=False, num_classes=10,
        ...     image_shape=(32, 32, 3), patch_size=8)
        >>> folder = tempfile.mkdtemp()
        >>> model.save_to_preset(folder)
        >>> MoNEImageClassifier.from_preset(folder).num_classes
        10
        """
        with preset_loader.saving_preset(
            self, preset_dir, max_shard_size, overwrite=overwrite
        ) as target:
            super().save_to_preset(target, max_shard_size=None)

    @preset_registry.classproperty
    def presets(cls):
        """Built-in presets: name -> registry entry (aliases included)."""
        return preset_registry.presets_of(cls.preset_family)

    @classmethod
    def from_config(cls, config):
        # keras-hub's Task.from_config replaces entries of the dict it gets.
        return super().from_config(dict(config))

    def get_config(self):
        config = super().get_config()
        config.update({"training_budgets": self.training_budgets})
        return config


MoNE = MoNEImageClassifier
