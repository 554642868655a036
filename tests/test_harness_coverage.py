"""Every class or function registered under the package's serialization
namespace (`register_keras_serializable(package="keras_mobile_moe")`) has a
case in the shared harness (tests/harness.py), named below; a new
registered class without one fails here."""

import ast
import importlib
import pathlib
import pkgutil

import keras
import pytest

import keras_mobile_moe

# Which classes are registered, and where their cases are: no backend.
pytestmark = pytest.mark.backend_independent

HERE = pathlib.Path(__file__).resolve().parent
PACKAGE = "keras_mobile_moe"

# Registered name -> the harness tests that run it ("file::test").
HARNESS_CASES = {
    "ClipConstraint": "test_layers.py::test_serialization_harness",
    "gelu_tanh": "test_layers.py::test_serialization_harness",
    "DropPath": "test_layers.py::test_layer_harness",
    "ImageRoutedMoE": "test_layers.py::test_layer_harness",
    "ImageRouter": "test_layers.py::test_layer_harness",
    "MLP": "test_layers.py::test_layer_harness",
    "PatchEmbedding": "test_layers.py::test_layer_harness",
    "TransformerEncoderBlock": "test_layers.py::test_layer_harness",
    "TokenRoutedMoE": "test_token_routing.py::test_layer_harness",
    "NestedExpertBlock": "test_mone.py::test_layer_harness",
    "NestedExpertRouter": "test_mone.py::test_layer_harness",
    "SuperclassRouterLoss": (
        "test_layers.py::test_superclass_router_loss_values_and_config"
    ),
    "MobileVMoEBackbone": "test_mobile_vmoe.py::test_backbone_harness",
    "MobileVMoEImageClassifier": "test_mobile_vmoe.py::test_classifier_harness",
    "MobileVMoEImageConverter": (
        "test_mobile_vmoe.py::test_preprocessing_harness"
    ),
    "MobileVMoEImageClassifierPreprocessor": (
        "test_mobile_vmoe.py::test_preprocessing_harness"
    ),
    "MoNEBackbone": "test_mone.py::test_backbone_and_classifier_harness",
    "MoNEImageClassifier": (
        "test_mone.py::test_classifier_keras_save_load_keeps_budget_and_outputs"
    ),
    "MoNEImageConverter": "test_mone.py::test_preprocessing_harness",
    "MoNEImageClassifierPreprocessor": (
        "test_mone.py::test_preprocessing_harness"
    ),
}

HARNESS_FUNCTIONS = {
    "run_layer_test",
    "run_backbone_test",
    "run_task_test",
    "run_serialization_test",
    "run_preprocessing_test",
    "run_loss_test",
}


def registered_names():
    # Importing every module registers everything the package defines.
    for info in pkgutil.walk_packages(
        keras_mobile_moe.__path__, prefix=f"{PACKAGE}."
    ):
        importlib.import_module(info.name)
    prefix = f"{PACKAGE}>"
    return sorted(
        name[len(prefix) :]
        for name in keras.saving.get_custom_objects()
        if name.startswith(prefix)
    )


def test_every_registered_class_has_a_harness_case():
    names = registered_names()
    assert "MobileVMoEBackbone" in names and "MoNEBackbone" in names
    missing = [name for name in names if name not in HARNESS_CASES]
    assert not missing, (
        f"registered under '{PACKAGE}>' without a harness case: {missing}; "
        "test it with a tests/harness.py function and name the test in "
        "HARNESS_CASES"
    )
    stale = sorted(set(HARNESS_CASES) - set(names))
    assert not stale, f"HARNESS_CASES names unregistered objects: {stale}"


@pytest.mark.parametrize("name", sorted(HARNESS_CASES))
def test_each_case_exists_and_calls_the_harness(name):
    """The named test exists and calls a harness function, in a file that
    builds the object."""
    file, test = HARNESS_CASES[name].split("::")
    text = (HERE / file).read_text(encoding="utf-8")
    assert name in text, f"{file} never names {name}"
    tree = ast.parse(text)
    (function,) = [
        node
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and node.name == test
    ]
    called = {
        node.func.id
        for node in ast.walk(function)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
    assert called & HARNESS_FUNCTIONS, (name, HARNESS_CASES[name], called)
