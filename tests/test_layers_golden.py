"""Today's blocks compute what the pre-issue-17 blocks computed (1e-5).

tests/data/layers_golden.npz holds random weights, inputs and outputs of
the dense, image-routed MoE, token-routed MoE and nested-expert (MoNE)
blocks, the image router and the patch embedding, computed on JAX by
tests/make_layers_golden.py with the code before the blocks moved to fused
`ops.dot_product_attention` and call-free sublayers. Every backend must
reproduce them within 1e-5 (float32).
"""

import pathlib

import numpy as np
import pytest

from conftest import to_numpy
from make_layers_golden import cases

GOLDEN = pathlib.Path(__file__).parent / "data" / "layers_golden.npz"


@pytest.mark.parametrize("name", sorted(cases()))
def test_block_matches_the_old_code(name):
    golden = np.load(GOLDEN)
    make, _ = cases()[name]
    inputs = []
    while f"{name}/input_{len(inputs)}" in golden.files:
        inputs.append(golden[f"{name}/input_{len(inputs)}"])
    layer = make()
    layer(*inputs)  # build
    stored = {k for k in golden.files if k.startswith(f"{name}/weight/")}
    keys = [f"{name}/weight/{v.path}" for v in layer.weights]
    assert set(keys) == stored
    for variable, key in zip(layer.weights, keys):
        variable.assign(golden[key])
    outputs = layer(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    expected = sorted(
        k for k in golden.files if k.startswith(f"{name}/output_")
    )
    assert len(outputs) == len(expected)
    for i, value in enumerate(outputs):
        reference = golden[f"{name}/output_{i}"]
        value = to_numpy(value)
        assert value.dtype == reference.dtype
        np.testing.assert_allclose(value, reference, rtol=0, atol=1e-5)
