"""Every docstring example in the package runs and prints what it says."""

import doctest
import importlib
import pkgutil

import pytest

import keras_mobile_moe

# The examples' printed results do not depend on the backend; the code
# they run is tested on every backend by the unit tests. The export
# modules' examples convert TFLite files: TensorFlow does that in process,
# other backends through a subprocess each.
INDEPENDENT = pytest.mark.backend_independent
CONVERTS = pytest.mark.only_on(
    "tensorflow", why="its examples convert TFLite files"
)
MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(
        keras_mobile_moe.__path__, prefix="keras_mobile_moe."
    )
)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            name,
            marks=CONVERTS
            if name.startswith("keras_mobile_moe.export.")
            else INDEPENDENT,
        )
        for name in MODULES
    ],
)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(
        module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    assert result.failed == 0


@INDEPENDENT
def test_public_api_has_examples():
    import keras_mobile_moe as kmm

    public = [
        kmm.MobileVMoE,
        kmm.MobileVMoEBackbone,
        kmm.count_flops,
        kmm.layers.ImageRoutedMoE,
        kmm.layers.ImageRouter,
        kmm.layers.PatchEmbedding,
        kmm.layers.TransformerEncoderBlock,
        kmm.layers.MLP,
        kmm.layers.DropPath,
        kmm.losses.SuperclassRouterLoss,
        kmm.datasets.cifar100.load_fixture,
        # MoNE
        kmm.MoNE,
        kmm.MoNEBackbone,
        kmm.capacity_distribution,
        kmm.capacity.expert_token_counts,
        kmm.layers.NestedExpertBlock,
        kmm.layers.NestedExpertRouter,
        kmm.layers.expert_preferred_routing,
        kmm.layers.permute_tokens,
        kmm.layers.ClipConstraint,
        kmm.flops.nested_block_flops,
        kmm.MoNE.from_preset,
        kmm.MoNE.save_to_preset,
        kmm.MoNEBackbone.from_preset,
        kmm.models.MoNEImageClassifierPreprocessor,
        kmm.models.MoNEImageConverter,
    ]
    for obj in public:
        assert ">>> " in (obj.__doc__ or ""), obj
