"""Nothing lost: injected I/O errors and kills during saves and exports.

Every point below fails a `save_to_preset`, `to_tflite` or expert-split
export over a good previous result, and checks that the previous preset
still loads and predicts as before (or the previous file keeps its bytes),
that the user's own files survive, and that no temporary file is left.
In-process I/O errors: `SAVE_FAULTS` (9 points) + `EXPORT_FAULTS` (4) + 1
expert-split fault = 14 points; kills (tests/fault_saver.py, SIGKILL of a
forked child): 8 points inside a save, 4 timed kills, 2 inside an export =
14 points. 28 points in all.
"""

import errno
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras_hub.src.utils import preset_utils

import keras_mobile_moe as kmm
from keras_mobile_moe import atomic_io
from keras_mobile_moe import preset_format
from keras_mobile_moe import preset_loader
from keras_mobile_moe.export import expert_split
from keras_mobile_moe.export import tflite

# Faults in file I/O (atomic_io, the preset saver, the export's file
# handling); the kill points run on the numpy backend in a child process.
# Saving, loading and predicting on each backend are tested by
# test_presets_hub.py and the model tests.
pytestmark = pytest.mark.backend_independent

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGES = (
    np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)) / 127.5 - 1
).astype("float32")


def build(seed, num_moe_layers):
    keras.utils.set_random_seed(seed)
    backbone = kmm.MobileVMoEBackbone(
        image_shape=(32, 32, 3),
        patch_size=8,
        num_layers=2,
        hidden_dim=16,
        num_heads=2,
        mlp_dim=32,
        num_experts=4,
        num_moe_layers=num_moe_layers,
    )
    return kmm.MobileVMoE(
        backbone,
        num_classes=4,
        superclass_ids=[0, 1, 2, 3] if num_moe_layers else None,
    )


@pytest.fixture(scope="module")
def models():
    return build(0, 1), build(1, 0)


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device (injected)")


def half_then_disk_full(original):
    """Wraps a writer taking a path: writes, truncates the file to half,
    then fails like a full disk."""

    def wrapped(self, path, *args, **kwargs):
        original(self, path, *args, **kwargs)
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(size // 2)
        disk_full()

    return wrapped


# (owner, attribute, replacement factory) in the order a save reaches them.
SAVE_FAULTS = {
    "writing the first config": (
        preset_utils.KerasPresetSaver,
        "_save_serialized_object",
        lambda original: disk_full,
    ),
    "writing the task weights (half written)": (
        kmm.MobileVMoE,
        "save_task_weights",
        half_then_disk_full,
    ),
    "writing the backbone weights (half written)": (
        kmm.MobileVMoEBackbone,
        "save_weights",
        half_then_disk_full,
    ),
    "hashing the weights": (
        preset_loader,
        "file_sha256",
        lambda original: disk_full,
    ),
    "writing the model card": (
        preset_format,
        "model_card",
        lambda original: disk_full,
    ),
    "carrying over the user's files": (
        preset_loader,
        "_carry_over",
        lambda original: disk_full,
    ),
    "fsyncing the staging directory": (
        atomic_io,
        "fsync_tree",
        lambda original: disk_full,
    ),
    "swapping the directories": (
        atomic_io,
        "_exchange",
        lambda original: disk_full,
    ),
    "renaming (no renameat2: fallback)": (
        atomic_io,
        "_exchange",
        lambda original: lambda a, b: False,
    ),
}


@pytest.mark.parametrize("point", list(SAVE_FAULTS))
def test_a_failed_save_leaves_the_previous_preset(
    models, tmp_path, monkeypatch, point
):
    old, new = models
    folder = tmp_path / "preset"
    old.save_to_preset(folder)
    (folder / "notes.txt").write_text("mine")
    before = sorted(os.listdir(folder))
    expected = old.predict(IMAGES, verbose=0)
    owner, name, make = SAVE_FAULTS[point]
    monkeypatch.setattr(owner, name, make(getattr(owner, name)))
    if point.startswith("renaming"):
        # The fallback path: fail the rename that puts the new folder in.
        real_rename = os.rename
        calls = []

        def rename(source, target):
            calls.append(target)
            if len(calls) == 2:
                disk_full()
            return real_rename(source, target)

        monkeypatch.setattr(atomic_io.os, "rename", rename)
    with pytest.raises(OSError, match="No space left"):
        new.save_to_preset(folder)
    monkeypatch.undo()
    assert sorted(os.listdir(folder)) == before
    assert (folder / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["preset"]  # no staging left
    loaded = kmm.MobileVMoE.from_preset(str(folder))
    np.testing.assert_allclose(
        loaded.predict(IMAGES, verbose=0), expected, atol=1e-5
    )


def test_the_two_rename_fallback_saves(models, tmp_path, monkeypatch):
    old, new = models
    folder = tmp_path / "preset"
    old.save_to_preset(folder)
    monkeypatch.setattr(atomic_io, "_exchange", lambda a, b: False)
    new.save_to_preset(folder)
    assert not kmm.MobileVMoE.from_preset(str(folder)).backbone.is_moe
    assert sorted(os.listdir(tmp_path)) == ["preset"]


def test_kills_during_save_and_export_leave_the_previous_result(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(HERE, "fault_saver.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    points = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(points) == 14, sorted(points)
    failed = {k: v for k, v in points.items() if not v["ok"]}
    assert not failed, failed
    print(f"{len(points)} kill points tried: {sorted(points)}")


# --- what save_to_preset may overwrite ---------------------------------------


def test_save_refuses_files_it_did_not_write(models, tmp_path):
    old, _ = models
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.json").write_text('{"my": "config"}')
    (folder / "metadata.json").write_text('{"my": "metadata"}')
    (folder / "README.md").write_text("# my notes\n")
    (folder / "data").mkdir()
    (folder / "data" / "x.npy").write_bytes(b"123")
    with pytest.raises(
        FileExistsError,
        match=r"\['config.json', "
        r"'metadata.json'\].*overwrite=True",
    ):
        old.save_to_preset(folder)
    assert (folder / "config.json").read_text() == '{"my": "config"}'
    old.save_to_preset(folder, overwrite=True)
    kmm.MobileVMoE.from_preset(str(folder))
    # Never deletes a user's file: the README and the data folder stay.
    assert (folder / "README.md").read_text() == "# my notes\n"
    assert (folder / "data" / "x.npy").read_bytes() == b"123"
    with pytest.raises(ValueError, match="overwrite='yes'"):
        old.save_to_preset(folder, overwrite="yes")


def test_saves_record_and_loading_verifies_every_sha256(models, tmp_path):
    old, _ = models
    folder = tmp_path / "preset"
    old.save_to_preset(folder)
    metadata = json.loads((folder / "metadata.json").read_text())
    assert sorted(metadata["files_sha256"]) == [
        "model.weights.h5",
        "task.weights.h5",
    ]
    assert metadata["tasks"] == ["ImageClassifier"]
    weights = folder / "task.weights.h5"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01  # one flipped bit in the last dataset's bytes
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        kmm.MobileVMoE.from_preset(str(folder))
    # Without a recorded sha256 the flipped bit cannot be found: not silent.
    del metadata["files_sha256"]["task.weights.h5"]
    (folder / "metadata.json").write_text(json.dumps(metadata))
    with pytest.warns(UserWarning, match="records no sha256 for task.weights"):
        kmm.MobileVMoE.from_preset(str(folder))


def test_saved_files_get_ordinary_permissions(models, tmp_path):
    old, _ = models
    folder = tmp_path / "preset"
    old.save_to_preset(folder)
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(folder).st_mode & 0o777 == 0o777 & ~umask
    path = tmp_path / "x.json"
    atomic_io.write_json(path, {"a": 1})
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


# --- export ------------------------------------------------------------------


def good_tflite():
    """A small valid .tflite (no model conversion needed)."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec((1, 4), tf.float32)])
    def double(x):
        return {"y": x * 2.0}

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [double.get_concrete_function()], double
    )
    return converter.convert()


def fail_while_writing(monkeypatch, good):
    """Makes the conversion's output write fail half way (disk full)."""

    class HalfWriter:
        def __init__(self, path):
            self.file = open(path, "wb")

        def write(self, data):
            self.file.write(data[: len(data) // 2])
            self.file.flush()
            disk_full()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    def convert_in_subprocess(model, arguments, data=None):
        out = arguments[arguments.index("--out") + 1]
        with HalfWriter(out) as f:
            f.write(good)

    monkeypatch.setattr(
        tflite, "convert_functional", lambda *args, **kwargs: good
    )
    monkeypatch.setattr(tflite, "convert_in_subprocess", convert_in_subprocess)
    monkeypatch.setattr(
        tflite, "open", lambda path, mode="r": HalfWriter(path), raising=False
    )


def converter_raises(monkeypatch, good):
    def fail(*args, **kwargs):
        raise RuntimeError("TFLite conversion failed (injected)")

    monkeypatch.setattr(tflite, "convert_functional", fail)
    monkeypatch.setattr(tflite, "convert_in_subprocess", fail)


def check_fails(monkeypatch, good):
    converter_output(monkeypatch, good)

    def fail(*args, **kwargs):
        raise ValueError("the file holds Flex ops (injected)")

    monkeypatch.setattr(tflite, "inspect_tflite", fail)


def converter_output(monkeypatch, good):
    def convert_in_subprocess(model, arguments, data=None):
        with open(arguments[arguments.index("--out") + 1], "wb") as f:
            f.write(good[:100])

    monkeypatch.setattr(
        tflite, "convert_functional", lambda *args, **kwargs: good[:100]
    )
    monkeypatch.setattr(tflite, "convert_in_subprocess", convert_in_subprocess)


def rename_fails(monkeypatch, good):
    converter_output(monkeypatch, good)
    monkeypatch.setattr(tflite, "inspect_tflite", lambda *args: {})
    monkeypatch.setattr(atomic_io.os, "replace", disk_full)


EXPORT_FAULTS = {
    "disk full while writing": fail_while_writing,
    "conversion error": converter_raises,
    "op check fails": check_fails,
    "rename fails": rename_fails,
}


@pytest.mark.parametrize("point", list(EXPORT_FAULTS))
def test_a_failed_export_leaves_the_previous_file(
    models, tmp_path, monkeypatch, point
):
    old, _ = models
    good = good_tflite()
    path = tmp_path / "model.tflite"
    atomic_io.write_bytes(path, good)
    EXPORT_FAULTS[point](monkeypatch, good)
    with pytest.raises((OSError, RuntimeError, ValueError), match="injected"):
        tflite.to_tflite(old, path)
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["model.tflite"]
    runner = tflite.load_interpreter(str(path), xnnpack=False)
    runner.allocate_tensors()


def test_a_failed_expert_split_leaves_the_previous_files(
    models, tmp_path, monkeypatch
):
    old, _ = models
    good = good_tflite()
    folder = tmp_path / "split"
    folder.mkdir()
    previous = {
        "trunk.tflite": good,
        "expert_0.tflite": good,
        "expert_split.json": b'{"old": true}\n',
        "notes.txt": b"mine",
    }
    for name, data in previous.items():
        (folder / name).write_bytes(data)
    calls = []

    def convert(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            disk_full()
        return good

    def convert_in_subprocess(model, arguments, data=None):
        out = arguments[arguments.index("--expert_split_dir") + 1]
        with open(os.path.join(out, "trunk.tflite"), "wb") as f:
            f.write(good)
        disk_full()

    monkeypatch.setattr(expert_split, "convert_functional", convert)
    monkeypatch.setattr(expert_split, "check_builtin_ops", lambda i: [])
    monkeypatch.setattr(
        expert_split, "convert_in_subprocess", convert_in_subprocess
    )
    with pytest.raises(OSError, match="injected"):
        expert_split.to_tflite_expert_split(old, folder)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == previous
    assert sorted(os.listdir(tmp_path)) == ["split"]


def test_saving_into_the_working_directory_keeps_it_usable(
    models, tmp_path, monkeypatch
):
    old, new = models
    folder = tmp_path / "here"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    monkeypatch.chdir(folder)
    old.save_to_preset(".")
    new.save_to_preset(".")  # replaces the preset, not the folder we are in
    assert os.path.samefile(os.getcwd(), folder)
    assert sorted(os.listdir(".")) == [
        "README.md",
        "config.json",
        "metadata.json",
        "model.weights.h5",
        "notes.txt",
        "task.json",
        "task.weights.h5",
    ]
    assert not kmm.MobileVMoE.from_preset(".").backbone.is_moe
    assert sorted(os.listdir(tmp_path)) == ["here"]
