"""Base classes of every model family: a backbone and a classifier (task).

As keras-hub's `Backbone` and `Task`, these hold what every family shares,
written once: `from_preset`, `save_to_preset`, `presets`, `from_config`,
the image checks, the classifier head, and `compile` /
`compile_from_config` with the fine-tuning defaults. A family subclasses
them and declares only what differs: its layers, and its identity on the
backbone class:

- `preset_family`: its key in the preset registry (`"mobile_vmoe"`);
- `family_title` and `paper`: its name and the paper it implements (model
  cards);
- `flops_breakdown(num_classes)`: its analytic FLOPs (`kmm.count_flops`);
- `unused_params_per_image()`: the parameters one image does not use
  (`kmm.flops.activated_params`);
- `routing_layer_names`: the layers that decide which experts run;
- `converts_dense_vits`, `dense_vit_arguments(spec)` and
  `load_dense_vit(weights)`: whether and how a dense ViT checkpoint (timm,
  keras-hub; `keras_mobile_moe.convert`) becomes a member of the family;
  `supports_upcycling`: whether `kmm.upcycle` turns its dense members into
  a mixture of experts.

The classifier module registers the family (`keras_mobile_moe.families`),
which is how `kmm.flops`, the model card and the training scripts find it.
"""

import keras
from keras_hub.models import Backbone
from keras_hub.models import ImageClassifier
from keras_hub.models import Task

from keras_mobile_moe import preset_loader
from keras_mobile_moe import preset_registry
from keras_mobile_moe.layers.patch_embedding import PatchEmbedding
from keras_mobile_moe.models import task_utils
from keras_mobile_moe.models.task_utils import ShuffledFitMixin
from keras_mobile_moe.validation import check_channels_last
from keras_mobile_moe.validation import check_choice
from keras_mobile_moe.validation import check_image_shape
from keras_mobile_moe.validation import check_images
from keras_mobile_moe.validation import check_int
from keras_mobile_moe.validation import check_rate

# Constructor arguments every family's backbone has, in config order.
SHARED_BACKBONE_CONFIG = (
    "image_shape",
    "patch_size",
    "num_layers",
    "hidden_dim",
    "num_heads",
    "mlp_dim",
    "dropout_rate",
    "attention_dropout_rate",
    "drop_path_rate",
    "layer_norm_epsilon",
)


def symbolic_images(images):
    """`images` as a `keras.KerasTensor` of the same shape and dtype.

    `compute_output_spec` runs the layers' `compute_output_shape` on the
    shapes of the tensor arguments; a numpy array is not one on every
    backend, so the patch embedding got `input_shape=None` (`TypeError:
    'NoneType' object is not subscriptable`, seen in keras-hub's harness).
    """
    if isinstance(images, keras.KerasTensor) or not hasattr(images, "shape"):
        return images
    dtype = keras.backend.standardize_dtype(images.dtype)
    return keras.KerasTensor(tuple(images.shape), dtype=dtype)


class PresetMixin:
    """`presets` and the atomic `save_to_preset` of the backbones and the
    classifiers (keras-hub's save, wrapped by
    `keras_mobile_moe.preset_loader.saving_preset`)."""

    @preset_registry.classproperty
    def presets(cls):
        """Built-in presets: name -> registry entry (aliases included)."""
        return preset_registry.presets_of(cls.preset_family)

    def _save_preset(self, preset_dir, max_shard_size, overwrite):
        with preset_loader.saving_preset(
            self, preset_dir, max_shard_size, overwrite=overwrite
        ) as target:
            super().save_to_preset(target, max_shard_size=None)


def quantization_modes(dtype):
    """The Keras weight-quantization modes (`"int8"`, `"float8"`, ...) a
    dtype policy, name or `DTypePolicyMap` asks for (empty if none)."""
    if dtype is None:
        return set()
    policy = keras.dtype_policies.get(dtype)
    policies = [policy]
    if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
        policies = [policy.default_policy, *policy.values()]
    return {
        p.quantization_mode
        for p in policies
        if getattr(p, "quantization_mode", None)
    }


def _quantization_error(name, value, owner):
    return ValueError(
        f"Received: {name}={value!r}. {owner} does not support Keras weight "
        "quantization (`model.quantize` or quantized dtype policies): its "
        "blocks multiply by the layers' kernels directly, so quantized "
        "kernels would give wrong outputs without an error. Quantize for "
        "deployment with kmm.export.to_tflite(model, path, "
        "quantization='int8'), or use a float policy such as "
        "'mixed_bfloat16'."
    )


class NoKerasQuantizationMixin:
    """Refuses `quantize()` (see `quantization_modes`)."""

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        """Not supported: raises `ValueError` (quantize the exported TFLite
        file instead, `kmm.export.to_tflite(..., quantization="int8")`)."""
        raise _quantization_error("mode", mode, type(self).__name__)


class FamilyBackbone(NoKerasQuantizationMixin, PresetMixin, Backbone):
    """Base of the backbones: a functional ViT-style model on `images`.

    Subclasses build their layers and functional graph in `__init__` (with
    the helpers below), set `preset_family`, `family_title` and `paper`,
    and implement `flops_breakdown`, `unused_params_per_image` and
    `routing_layer_names`. They are not used directly.

    Example:

    >>> import keras_mobile_moe as kmm
    >>> issubclass(kmm.MoNEBackbone, FamilyBackbone)
    True
    >>> kmm.MoNEBackbone.preset_family, kmm.MobileVMoEBackbone.family_title
    ('mone', 'Mobile V-MoE')
    """

    preset_family = None
    family_title = None
    paper = None
    converts_dense_vits = False
    supports_upcycling = False

    @classmethod
    def dense_vit_arguments(cls, spec):
        """Constructor arguments of a member of the family computing the
        dense ViT `spec` (`MobileVMoEBackbone` arguments read from a
        checkpoint; `keras_mobile_moe.convert.common.DenseViT`)."""
        raise NotImplementedError(
            f"{cls.__name__} does not convert dense ViT checkpoints."
        )

    def load_dense_vit(self, weights):
        """Copies a converted dense ViT's weights (named as in
        `keras_mobile_moe.convert.common`) into this backbone."""
        raise NotImplementedError(
            f"{type(self).__name__} does not convert dense ViT checkpoints."
        )

    # --- construction helpers --------------------------------------------

    def _check_image_arguments(self, image_shape, patch_size, num_layers):
        """Checks the arguments every family has; returns `image_shape` as
        a tuple."""
        check_channels_last(type(self).__name__)
        check_int("patch_size", patch_size, minimum=1)
        image_shape = check_image_shape(image_shape, patch_size)
        check_int("num_layers", num_layers, minimum=1)
        return image_shape

    def _make_patch_embedding(
        self, hidden_dim, patch_size, use_class_token, dtype
    ):
        """Creates `self.patch_embedding` (before the blocks, so that the
        layers keep the order of the saved weights)."""
        self.patch_embedding = PatchEmbedding(
            hidden_dim=hidden_dim,
            patch_size=patch_size,
            use_class_token=use_class_token,
            dtype=dtype,
            name="patch_embedding",
        )

    def _make_final_norm(self, layer_norm_epsilon, dtype):
        """Creates `self.final_norm` (after the blocks)."""
        self.final_norm = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, dtype=dtype, name="final_norm"
        )

    @staticmethod
    def _drop_path_rate_of(drop_path_rate, index, num_layers):
        # Linearly increasing stochastic depth, as DeiT.
        return drop_path_rate * index / max(num_layers - 1, 1)

    def _set_shared_config(self, arguments):
        """Stores the shared constructor arguments (`SHARED_BACKBONE_CONFIG`)
        from the dict of the subclass's arguments."""
        for name in SHARED_BACKBONE_CONFIG:
            setattr(self, name, arguments[name])

    # --- behaviour ----------------------------------------------------------

    def __init__(self, *args, dtype=None, **kwargs):
        if quantization_modes(dtype):
            raise _quantization_error("dtype", dtype, type(self).__name__)
        super().__init__(*args, dtype=dtype, **kwargs)

    def call(self, inputs, training=None, mask=None):
        check_images(inputs, self.image_shape)
        return super().call(inputs, training=training, mask=mask)

    def compute_output_spec(self, inputs, training=None, mask=None):
        return super().compute_output_spec(
            symbolic_images(inputs), training=training, mask=mask
        )

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """Builds a backbone from a preset name, directory or `hf://` handle.

        Args:
            preset: a built-in name (see `presets`), a local preset
                directory, or `hf://org/repo[/revision]` (through the
                Hugging Face cache; works offline once cached).
            load_weights: bool. Whether to load the preset's weights.
            **kwargs: overrides of backbone arguments, e.g.
                `capacity_budget=0.3` for MoNE.

        Returns:
            A backbone of this class.

        Example:

        >>> import keras_mobile_moe as kmm
        >>> backbone = kmm.MobileVMoEBackbone.from_preset(
        ...     "6x64", load_weights=False)
        >>> backbone.num_layers, backbone.hidden_dim, backbone.is_moe
        (6, 64, False)
        >>> mone = kmm.MoNEBackbone.from_preset("6x64_mone", load_weights=False)
        >>> mone.num_layers, mone.hidden_dim, mone.num_nested_experts
        (6, 64, 4)
        """
        return preset_loader.backbone_from_preset(
            cls, preset, load_weights, kwargs
        )

    def save_to_preset(self, preset_dir, max_shard_size=None, overwrite=False):
        """Saves the backbone as a keras-hub preset directory.

        Writes `config.json`, `model.weights.h5`, `metadata.json` (versions,
        parameter count, FLOPs, sha256 of the weights) and a `README.md`
        model card; loadable with `from_preset(preset_dir)` and with
        `keras_hub.models.Backbone.from_preset(preset_dir)`.

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
        >>> import keras_mobile_moe as kmm
        >>> folder = tempfile.mkdtemp()
        >>> kmm.MoNEBackbone(
        ...     image_shape=(32, 32, 3), patch_size=8, num_layers=2,
        ...     hidden_dim=16, num_heads=2, mlp_dim=32,
        ...     capacity_budget=0.4).save_to_preset(folder)
        >>> loaded = kmm.MoNEBackbone.from_preset(folder, capacity_budget=0.7)
        >>> loaded.capacity_budget
        0.7
        """
        self._save_preset(preset_dir, max_shard_size, overwrite)

    # --- what each family declares ---------------------------------------

    def flops_breakdown(self, num_classes=0):
        """Per-part forward FLOPs of one image (see `kmm.count_flops`),
        plus a linear head of `num_classes` outputs."""
        raise NotImplementedError(
            f"{type(self).__name__} does not define flops_breakdown."
        )

    def unused_params_per_image(self):
        """Parameters that one image never uses (experts it cannot reach);
        0 unless the family says otherwise."""
        return 0

    @property
    def routing_layer_names(self):
        """Names of the layers that decide which experts run (none here)."""
        return []

    def get_config(self):
        config = super().get_config()
        config.update(
            {name: getattr(self, name) for name in SHARED_BACKBONE_CONFIG}
        )
        config["image_shape"] = list(self.image_shape)
        if isinstance(self.mlp_dim, (list, tuple)):
            config["mlp_dim"] = list(self.mlp_dim)
        return config


class FamilyImageClassifier(
    NoKerasQuantizationMixin, PresetMixin, ShuffledFitMixin, ImageClassifier
):
    """Base of the classifiers: a family's backbone, pooling and a linear
    head, with checked `fit` / `evaluate` / `predict` inputs.

    Subclasses set `backbone_cls` and `preprocessor_cls` (and, if some saved
    settings describe the classes, `per_class_config`), check their own
    arguments, and build their graph with `_make_head` and
    `_finish_functional`. The family comes from `backbone_cls`.

    Example:

    >>> import keras_mobile_moe as kmm
    >>> issubclass(kmm.MobileVMoE, FamilyImageClassifier)
    True
    >>> kmm.MoNE.preset_family
    'mone'
    """

    backbone_cls = None
    preprocessor_cls = None
    # Saved settings that describe the classes; dropped by from_preset when
    # num_classes is overridden with a new value.
    per_class_config = ()

    @preset_registry.classproperty
    def preset_family(cls):
        """The family's key in the preset registry (from `backbone_cls`)."""
        return getattr(cls.backbone_cls, "preset_family", None)

    # --- construction helpers --------------------------------------------

    def _check_head_arguments(
        self, backbone, num_classes, pooling, poolings, dropout
    ):
        """Checks the arguments every classifier has."""
        if not isinstance(backbone, self.backbone_cls):
            raise ValueError(
                f"Received: backbone of type {type(backbone).__name__}. "
                f"Expected a {self.backbone_cls.__name__}."
            )
        check_int("num_classes", num_classes, minimum=1)
        check_choice("pooling", pooling, poolings)
        check_rate("dropout", dropout)

    def _make_head(
        self,
        backbone,
        preprocessor,
        num_classes,
        dropout,
        activation,
        head_dtype,
    ):
        """Sets the backbone and preprocessor and creates the head layers
        (`output_dropout`, `output_dense`)."""
        head_dtype = head_dtype or backbone.dtype_policy
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

    def _finish_functional(
        self, outputs, num_classes, pooling, dropout, activation, **kwargs
    ):
        """Builds the functional model on the backbone's input and stores
        the shared config."""
        # Skip ImageClassifier.__init__, which builds its own head.
        Task.__init__(
            self, inputs=self.backbone.input, outputs=outputs, **kwargs
        )
        self.num_classes = num_classes
        self.pooling = pooling
        self.dropout = dropout
        self.activation = activation

    # --- behaviour ----------------------------------------------------------

    def call(self, inputs, training=None, mask=None):
        check_images(inputs, self.backbone.image_shape)
        return super().call(inputs, training=training, mask=mask)

    def compute_output_spec(self, inputs, training=None, mask=None):
        return super().compute_output_spec(
            symbolic_images(inputs), training=training, mask=mask
        )

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
                or a Keras loss for the class labels, e.g.
                `keras.losses.CategoricalCrossentropy(from_logits=True)` for
                one-hot or Mixup/CutMix soft targets. A family with a router
                loss (Mobile V-MoE) adds it on top, with its
                `router_loss_weight`, reading the same labels.
            metrics: `"auto"` (top-1 accuracy on class ids, or on one-hot /
                soft targets with a categorical loss) or Keras metrics.
            **kwargs: passed to `keras.Model.compile`.

        Example:

        >>> import keras_mobile_moe as kmm
        >>> model = kmm.MoNE.from_preset(
        ...     "6x64_mone", load_weights=False, num_classes=10)
        >>> model.compile()
        >>> round(float(model.optimizer.learning_rate), 6)
        0.0003
        """
        if optimizer == "auto":
            optimizer = task_utils.auto_optimizer(self)
        if metrics == "auto":
            metrics = task_utils.auto_metrics(loss)
        super().compile(
            optimizer=optimizer, loss=loss, metrics=metrics, **kwargs
        )

    def compile_from_config(self, config):
        # Restores the saved optimizer, loss and metrics on `load_model`.
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built:
            self.optimizer.build(self.trainable_variables)

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """Builds a classifier from a preset name, directory or `hf://` handle.

        Args:
            preset: as for `FamilyBackbone.from_preset`; a preset that
                holds only a backbone needs `num_classes`.
            load_weights: bool. Whether to load the preset's weights.
            **kwargs: overrides of backbone or classifier arguments, e.g.
                `num_classes=10` (a new head with random weights; every
                other weight is loaded), `image_shape=(32, 32, 3)` or, for
                MoNE, `capacity_budget=0.3`.

        Returns:
            A classifier of this class.

        Example:

        >>> import keras_mobile_moe as kmm
        >>> model = kmm.MobileVMoE.from_preset(
        ...     "6x64_e10", load_weights=False, num_classes=10)
        >>> model.backbone.num_experts
        10
        >>> mone = kmm.MoNE.from_preset(
        ...     "6x64_mone", load_weights=False, num_classes=10,
        ...     capacity_budget=0.3)
        >>> mone.capacity_budget, mone.backbone.token_counts()
        (0.3, (22, 15, 9, 3))
        """
        task = preset_loader.task_from_preset(cls, preset, load_weights, kwargs)
        task.weights_source = task_utils.weights_source(load_weights, kwargs)
        return task

    def save_to_preset(self, preset_dir, max_shard_size=None, overwrite=False):
        """Saves the classifier as a keras-hub preset directory.

        Writes the backbone files (`config.json`, `model.weights.h5`), the
        head (`task.json`, `task.weights.h5`), the preprocessor
        (`preprocessor.json`, `image_converter.json`), `metadata.json`
        (versions, parameter count, FLOPs, sha256 of the weights) and a
        `README.md` model card. Loadable with `from_preset(preset_dir)` and
        `keras_hub.models.ImageClassifier.from_preset(preset_dir)`.

        Args:
            preset_dir: str or path-like. The directory (created if needed).
            max_shard_size: None (weights are kept in one file).
            overwrite: bool. As for `FamilyBackbone.save_to_preset`: the
                save is atomic, keeps the folder's other files, and replaces
                preset files that keras_mobile_moe did not write only when
                True.

        Returns:
            None.

        Example:

        >>> import os, tempfile
        >>> import keras_mobile_moe as kmm
        >>> model = kmm.MobileVMoE.from_preset(
        ...     "6x64_e10", load_weights=False, num_classes=10,
        ...     image_shape=(32, 32, 3), patch_size=8)
        >>> folder = tempfile.mkdtemp()
        >>> model.save_to_preset(folder)
        >>> sorted(os.listdir(folder))  # doctest: +NORMALIZE_WHITESPACE
        ['README.md', 'config.json', 'image_converter.json', 'metadata.json',
         'model.weights.h5', 'preprocessor.json', 'task.json',
         'task.weights.h5']
        >>> kmm.MobileVMoE.from_preset(folder).num_classes
        10
        """
        self._save_preset(preset_dir, max_shard_size, overwrite)

    @property
    def loss_metrics(self):
        """The metrics that `compute_loss` updates besides the loss (e.g.
        Mobile V-MoE's router loss and accuracy), so that a model which
        trains this task's graph with its `compute_loss` reports them too;
        none here."""
        return []

    @classmethod
    def from_config(cls, config):
        # keras-hub's Task.from_config replaces entries of the dict it gets.
        return super().from_config(dict(config))
