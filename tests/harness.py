"""The shared test harness: the checks every layer, loss and model gets.

- `run_layer_test`: get_config/from_config round trip and a `.keras`
  save/load of the layer inside a functional model, outputs equal.
- `run_backbone_test`: the same for a backbone (config, parameter count,
  `.keras` reload with every named output equal).
- `run_task_test`: the same for a task (config, `.keras` reload, `predict`
  equal).
- `assert_finite_nonzero_gradients`: every trainable weight gets a finite,
  non-zero gradient (house rule 13).
- `assert_batch_independent`: an image's output does not depend on the rest
  of the batch.
- `xla_flops`: XLA's cost analysis of a compiled one-image forward (JAX),
  to check `kmm.count_flops` against.

- `run_serialization_test`: a registered object (constraint, function,
  preprocessing layer) survives `serialize_keras_object` and
  `deserialize_keras_object`.
- `run_preprocessing_test`: that, and the clone preprocesses the same.
- `run_loss_test`: config round trip of a loss, same value, and a compiled
  model's `.keras` reload keeps it.

tests/test_harness_coverage.py fails when a class registered under the
package's serialization namespace has no harness case.
"""

import json

import keras
import numpy as np

from conftest import gradients
from conftest import to_numpy


def assert_config_round_trip(obj):
    """`from_config(get_config())` gives the same config; returns the
    clone."""
    config = obj.get_config()
    clone = type(obj).from_config(config)
    assert clone.get_config() == config
    return clone


def _assert_outputs_close(got, want, atol):
    got, want = keras.tree.flatten(got), keras.tree.flatten(want)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(to_numpy(g), to_numpy(w), atol=atol)


def _reload(model, tmp_path, name):
    path = str(tmp_path / f"{name}.keras")
    model.save(path)
    return keras.saving.load_model(path)


def run_layer_test(make_layer, arrays, tmp_path, name="layer", atol=1e-6):
    """Config round trip of a fresh layer, then `.keras` save/load of the
    layer in a functional model on `arrays` (its call inputs, batch first):
    the reloaded model's outputs equal the original's to `atol`."""
    assert_config_round_trip(make_layer())
    inputs = [
        keras.Input(shape=a.shape[1:], dtype=str(a.dtype)) for a in arrays
    ]
    model = keras.Model(inputs, make_layer()(*inputs))
    expected = model(arrays)
    _assert_outputs_close(
        _reload(model, tmp_path, name)(arrays), expected, atol
    )


def run_backbone_test(backbone, images, tmp_path, output_keys, atol=1e-5):
    """Config round trip (same parameter count), then `.keras` save/load:
    every output in `output_keys` equal to `atol`. Returns the outputs."""
    clone = assert_config_round_trip(backbone)
    assert clone.count_params() == backbone.count_params()
    expected = backbone(images)
    got = _reload(backbone, tmp_path, "backbone")(images)
    for key in output_keys:
        np.testing.assert_allclose(
            to_numpy(got[key]), to_numpy(expected[key]), atol=atol
        )
    return expected


def run_task_test(model, images, tmp_path, cls, atol=1e-5, predict=True):
    """Config round trip, then `.keras` save/load: the reloaded model is a
    `cls` and gives the same outputs to `atol` (through `predict`, or a
    direct call with `predict=False`). Returns the reloaded model."""

    def outputs(m):
        return to_numpy(m.predict(images, verbose=0) if predict else m(images))

    assert_config_round_trip(model)
    expected = outputs(model)
    loaded = _reload(model, tmp_path, "task")
    assert isinstance(loaded, cls)
    np.testing.assert_allclose(outputs(loaded), expected, atol=atol)
    return loaded


def assert_finite_nonzero_gradients(layer, loss_fn, *args):
    """Every trainable weight of `layer` gets a gradient of
    `loss_fn(layer(*args, training=True))` that exists, is finite and is
    not all zero. Returns {variable path: gradient}."""
    grads = gradients(layer, loss_fn, *args)
    assert len(grads) == len(layer.trainable_variables)
    out = {}
    for variable, grad in zip(layer.trainable_variables, grads):
        assert grad is not None, variable.path
        assert np.all(np.isfinite(grad)), variable.path
        assert np.abs(grad).sum() > 0, variable.path
        out[variable.path] = grad
    return out


def assert_batch_independent(model, images, others, index=5, atol=1e-5):
    """Image `index` of `images` gets the same output alone, in its batch
    and among `others` (whose row `index` is replaced by it)."""
    together = to_numpy(model(images))
    others = others.copy()
    others[index] = images[index]
    mixed = to_numpy(model(others))
    alone = to_numpy(model(images[index : index + 1]))
    np.testing.assert_allclose(alone[0], together[index], atol=atol)
    np.testing.assert_allclose(mixed[index], together[index], atol=atol)


def xla_flops(model, image_shape):
    """FLOPs of `model` on one zero image of `image_shape`, from XLA's cost
    analysis of the jitted stateless forward (JAX backend only)."""
    import jax

    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    forward = jax.jit(
        lambda x: model.stateless_call(trainable, non_trainable, x)[0]
    )
    image = np.zeros((1, *image_shape), "float32")
    cost = forward.lower(image).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost["flops"]


def _as_json(obj):
    # Serialized as a `.keras` file writes it: nested layers (keras-hub
    # preprocessors keep theirs as objects in get_config) become configs.
    return json.dumps(
        keras.saving.serialize_keras_object(obj),
        default=keras.saving.serialize_keras_object,
        sort_keys=True,
    )


def run_serialization_test(obj):
    """`deserialize_keras_object(serialize_keras_object(obj))` serializes
    as `obj` does (a function comes back as itself). Returns the clone."""
    config = keras.saving.serialize_keras_object(obj)
    clone = keras.saving.deserialize_keras_object(config)
    assert _as_json(clone) == _as_json(obj)
    if not hasattr(obj, "get_config"):
        assert clone is obj
    return clone


def run_preprocessing_test(converter_cls, preprocessor_cls, images):
    """A family's image converter (resizing to 16x16, scaling to [-1, 1])
    and its classifier preprocessor around it: serialization round trip,
    and each clone preprocesses `images` (raw pixels) the same."""
    converter = converter_cls(image_size=(16, 16), scale=1 / 127.5, offset=-1.0)
    for layer in (converter, preprocessor_cls(converter)):
        clone = run_serialization_test(layer)
        _assert_outputs_close(clone(images), layer(images), atol=0.0)


def run_loss_test(loss, y_true, y_pred, tmp_path, rtol=1e-6):
    """Config round trip with the same value on (y_true, y_pred), and a
    model compiled with `loss` reloads from `.keras` with the same loss
    config. Returns the loss value."""
    clone = assert_config_round_trip(loss)
    value = float(to_numpy(loss(y_true, y_pred)))
    np.testing.assert_allclose(
        float(to_numpy(clone(y_true, y_pred))), value, rtol=rtol
    )
    model = keras.Sequential(
        [keras.Input(y_pred.shape[1:]), keras.layers.Dense(y_pred.shape[-1])]
    )
    model.compile(loss=loss)
    loaded = _reload(model, tmp_path, "with_loss")
    assert loaded.loss.get_config() == model.loss.get_config()
    return value
