"""keras-hub's own model tests on every backbone and classifier here.

`keras_hub.src.tests.test_case.TestCase` (shipped in the keras-hub wheel) is
what keras-hub runs on each of its models. Subclassing it, every family here
gets the same checks (issue 17, item 4):

- `run_backbone_test`: `get_config` / `from_config` / serialisation round
  trips, an eager call with the output shapes, `predict` on an array and on
  a batched `tf.data.Dataset`, the name mapping to the class, the
  `mixed_float16` / `mixed_bfloat16` / `bfloat16` policies
  (`run_precision_test`, `assertDTypeEqual` on outputs, weights and
  sublayers);
- `run_model_saving_test`: `.keras` save and `load_model`, same outputs;
- `run_task_test` on the classifiers: the preprocessor's output structure,
  `predict` and `fit` on arrays, datasets and split preprocessing, and the
  error of `fit` without `compile`;
- `run_preprocessing_layer_test` on the image converters (direct call,
  `tf.data` and Grain give the same images).

Where a check cannot apply as written, the reason is in the test:

- the routers compute and return float32 under every policy on purpose (a
  half-precision softmax over experts ties or flips the top-k choice,
  house rule 8). For routed models the precision check is the harness's,
  with that one exception (`_run_precision_test_with_float32_routers`);
- `data_format="channels_first"` is refused at construction with an error
  naming `keras.config.image_data_format()` (the models take
  `[batch, height, width, channels]`); the harness's channels-first pass is
  replaced by a test of that error;
- variable input sizes: the harness varies only sequence lengths of token
  models (`token_embedding`); our models have static shapes (learned
  position embeddings for one patch grid, house rule 6), so other image
  sizes go through the preprocessor, which resizes them (tested);
- Keras weight quantization (the harness's int8 / float8 `DTypePolicyMap`
  check, `run_quantization_test`) is refused with an error: the blocks
  multiply by the layers' kernels directly, so quantized kernels would give
  wrong outputs silently (the harness checks only dtypes and shapes, so it
  passed). The check is replaced by a test of that error; phones get int8
  through the TFLite export;
- the harness itself skips precision checks on PyTorch without CUDA
  (`tests/test_models_mixed_precision.py` covers mixed precision on every
  backend).

Tiny configs (2 blocks, width 16, 32x32 images): the module runs in CI on
jax, tensorflow and torch.
"""

import keras
import numpy as np
import pytest
from keras import ops
from keras import tree

# keras-hub's harness imports grain: keras-hub[grain], in the dev extra.
from keras_hub.src.tests import test_case

import keras_mobile_moe as kmm
from keras_mobile_moe.models import mobile_vmoe
from keras_mobile_moe.models import mone

BASE = dict(
    image_shape=(32, 32, 3),
    patch_size=8,
    num_layers=2,
    hidden_dim=16,
    num_heads=2,
    mlp_dim=32,
)
# name -> (backbone class, arguments, output shapes at batch 2,
#          float32 router outputs)
BACKBONES = {
    "dense": (
        kmm.MobileVMoEBackbone,
        dict(BASE, num_moe_layers=0),
        {"sequence_output": (2, 17, 16)},
        (),
    ),
    "moe": (
        kmm.MobileVMoEBackbone,
        dict(BASE, num_experts=4, num_moe_layers=1),
        {"sequence_output": (2, 17, 16), "router_logits": (2, 4)},
        ("router_logits",),
    ),
    "token_moe": (
        kmm.MobileVMoEBackbone,
        dict(BASE, num_experts=4, num_moe_layers=1, router_type="token"),
        {"sequence_output": (2, 17, 16)},
        (),
    ),
    "mone": (
        kmm.MoNEBackbone,
        dict(BASE),
        {
            "sequence_output": (2, 16, 16),
            "router_probs": (2, 16, 4),
            "expert_index": (2, 16),
        },
        ("router_probs",),
    ),
}


def _float32_router_layers(model):
    """The layers that compute in float32 under mixed policies on purpose:
    the routers' own sublayers (`keras_mobile_moe.layers.token_routed_moe.
    router_policy`)."""
    exempt = set()
    for layer in model._flatten_layers():
        if isinstance(
            layer, (kmm.layers.ImageRouter, kmm.layers.NestedExpertRouter)
        ):
            exempt.update(
                id(sub) for sub in layer._flatten_layers(include_self=False)
            )
        if isinstance(layer, kmm.layers.TokenRoutedMoE):
            exempt.add(id(layer.router))
    return exempt


# Backend tensors, as keras-hub's own tests pass.
IMAGES = ops.convert_to_tensor(
    np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)), "float32"
)
RAW_IMAGES = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3))
RAW_IMAGES = RAW_IMAGES.astype("float32")
LABELS = np.array([0, 1, 2, 3])


def _converter(family):
    converter_cls = (
        mone.MoNEImageConverter
        if family == "mone"
        else mobile_vmoe.MobileVMoEImageConverter
    )
    return converter_cls(image_size=(32, 32), scale=1 / 127.5, offset=-1.0)


def _task(name, preprocessor=True):
    """(classifier class, arguments) of a tiny classifier on `name`."""
    backbone_cls, arguments, _, _ = BACKBONES[name]
    kwargs = dict(backbone=backbone_cls(**arguments), num_classes=4)
    if name == "mone":
        preprocessor_cls = mone.MoNEImageClassifierPreprocessor
        task_cls = kmm.MoNE
    else:
        preprocessor_cls = mobile_vmoe.MobileVMoEImageClassifierPreprocessor
        task_cls = kmm.MobileVMoE
        if name == "moe":
            kwargs["superclass_ids"] = [0, 1, 2, 3]
        if name == "token_moe":
            kwargs["routing"] = "learned"
    if preprocessor:
        kwargs["preprocessor"] = preprocessor_cls(_converter(name))
    return task_cls, kwargs


class HarnessTestCase(test_case.TestCase):
    def setUp(self):
        super().setUp()
        keras.utils.set_random_seed(0)
        keras.config.set_image_data_format("channels_last")

    def tearDown(self):
        # A failed channels-first check would leak the global setting into
        # every later test (seen: 18 unrelated failures).
        keras.config.set_image_data_format("channels_last")
        keras.config.set_dtype_policy("float32")
        super().tearDown()

    def _run_precision_test_with_float32_routers(
        self, cls, init_kwargs, input_data, router_outputs
    ):
        """`TestCase.run_precision_test`, except that the router outputs
        and the routers' layers stay float32 (the documented exception);
        the router outputs must be float32 under every policy."""
        if keras.config.backend() == "torch":
            import torch

            if not torch.cuda.is_available():
                pytest.skip("keras-hub skips precision checks on torch CPU")
        for policy in ["mixed_float16", "mixed_bfloat16", "bfloat16"]:
            policy = keras.DTypePolicy(policy)
            model = cls(**{**init_kwargs, "dtype": policy})
            output_data = model(input_data)
            output_spec = model.compute_output_spec(input_data)
            for outputs in (output_data, output_spec):
                for key, tensor in outputs.items():
                    dtype = keras.backend.standardize_dtype(tensor.dtype)
                    if key in router_outputs:
                        self.assertEqual(dtype, "float32", msg=key)
                    elif "float" in dtype:
                        self.assertDTypeEqual(tensor, policy.compute_dtype)
            for weight in model.weights:
                if "float" in keras.backend.standardize_dtype(weight.dtype):
                    self.assertDTypeEqual(weight, policy.variable_dtype)
            float32_layers = _float32_router_layers(model)
            if policy.variable_dtype == "float32":
                self.assertTrue(float32_layers)
            for sublayer in model._flatten_layers():
                if isinstance(sublayer, keras.layers.InputLayer):
                    continue
                expected = policy.compute_dtype
                if id(sublayer) in float32_layers:
                    # Mixed policies only: under "bfloat16" the weights are
                    # bfloat16 and so is the router.
                    if policy.variable_dtype == "float32":
                        expected = "float32"
                self.assertEqual(
                    expected, sublayer.compute_dtype, msg=sublayer.name
                )
                self.assertEqual(policy.variable_dtype, sublayer.variable_dtype)


class BackboneHarnessTest(HarnessTestCase):
    def _check_backbone(self, name):
        cls, arguments, shapes, router_outputs = BACKBONES[name]
        self.run_backbone_test(
            cls=cls,
            init_kwargs=dict(arguments),
            input_data=IMAGES,
            expected_output_shape=shapes,
            # Only the dense model has no router.
            run_mixed_precision_check=name == "dense",
            # Refused (module docstring); see the test below.
            run_quantization_check=False,
        )
        if name != "dense":
            self._run_precision_test_with_float32_routers(
                cls, dict(arguments), IMAGES, router_outputs
            )
        self.run_model_saving_test(
            cls=cls, init_kwargs=dict(arguments), input_data=IMAGES
        )

    def test_dense_backbone(self):
        self._check_backbone("dense")

    def test_moe_backbone(self):
        self._check_backbone("moe")

    def test_token_routed_moe_backbone(self):
        self._check_backbone("token_moe")

    def test_mone_backbone(self):
        self._check_backbone("mone")

    def test_channels_first_is_refused_at_construction(self):
        # Instead of the harness's channels-first pass
        # (`run_vision_backbone_test(run_data_format_check=True)`), which
        # builds with image_shape=(3, 32, 32) under the global setting.
        for cls, arguments, _, _ in BACKBONES.values():
            keras.config.set_image_data_format("channels_first")
            with self.assertRaisesRegex(
                ValueError, r"image_data_format\(\)='channels_first'"
            ):
                cls(**{**arguments, "image_shape": (3, 32, 32)})
            keras.config.set_image_data_format("channels_last")
            with self.assertRaisesRegex(ValueError, "looks channels-first"):
                cls(**{**arguments, "image_shape": (3, 32, 32)})

    def test_keras_quantization_is_refused(self):
        # Instead of the harness's `run_quantization_test`.
        policy_map = keras.dtype_policies.DTypePolicyMap("float32")
        policy_map["patch_embedding"] = keras.dtype_policies.get(
            "int8_from_float32"
        )
        for cls, arguments, _, _ in BACKBONES.values():
            for dtype in ("int8_from_float32", policy_map):
                with self.assertRaisesRegex(ValueError, "quantization"):
                    cls(**{**arguments, "dtype": dtype})
            backbone = cls(**arguments)
            with self.assertRaisesRegex(ValueError, "to_tflite"):
                backbone.quantize("int8")
        cls, kwargs = _task("moe")
        with self.assertRaisesRegex(ValueError, "mode='float8'"):
            cls(**kwargs).quantize("float8")


class TaskHarnessTest(HarnessTestCase):
    def _check_task(self, name):
        cls, kwargs = _task(name)
        self.run_task_test(
            cls=cls,
            init_kwargs=kwargs,
            train_data=(RAW_IMAGES, LABELS),
            expected_output_shape=(4, 4),
        )
        cls, kwargs = _task(name, preprocessor=False)
        self.run_model_saving_test(
            cls=cls, init_kwargs=kwargs, input_data=IMAGES
        )
        # Variable image sizes: the backbone's are static; the preprocessor
        # resizes other sizes to them.
        cls, kwargs = _task(name)
        task = cls(**kwargs)
        logits = task.predict(RAW_IMAGES[:2, :24, :20], verbose=0)
        self.assertEqual(tuple(logits.shape), (2, 4))

    # One tiny classifier per class (the dense Mobile V-MoE is the same
    # class as the MoE one); the backbones' variants are all above.
    def test_moe_classifier(self):
        self._check_task("moe")

    def test_mone_classifier(self):
        self._check_task("mone")

    def test_image_converters(self):
        for family in ("mobile_vmoe", "mone"):
            converter = _converter(family)
            # (`expected_output` is tested with `if expected_output:`,
            # which an array cannot answer: compared here instead.)
            output = self.run_preprocessing_layer_test(
                cls=type(converter),
                init_kwargs=converter.get_config(),
                input_data=RAW_IMAGES,
                return_output=True,
            )
            self.assertAllClose(output, RAW_IMAGES / 127.5 - 1.0, atol=1e-5)


def test_harness_output_shapes_cover_every_output():
    # The shapes above are the whole output dict: a new backbone output
    # must be added here (and, if float32 on purpose, to router outputs).
    for cls, arguments, shapes, _ in BACKBONES.values():
        outputs = cls(**arguments)(IMAGES)
        assert tree.map_structure(lambda x: tuple(x.shape), outputs) == shapes
