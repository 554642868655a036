"""Presets end to end: save, load from a directory, from the registry and from
`hf://` through a real Hugging Face cache (offline), upload, overrides, and
every error case. Runs on the backend in KERAS_BACKEND."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import h5py
import keras
import keras_hub
import numpy as np
import pytest

import keras_mobile_moe as kmm
from conftest import BACKEND
from conftest import TINY
from conftest import fixture
from conftest import to_numpy
from hub_helpers import FakeHfApi
from hub_helpers import write_snapshot
from keras_mobile_moe import preset_loader
from keras_mobile_moe import preset_registry

REPO = "kmm-test/tiny-moe"


def tiny_classifier(seed=0, **overrides):
    keras.utils.set_random_seed(seed)
    backbone = kmm.MobileVMoEBackbone(**{**TINY, **overrides})
    preprocessor = preset_loader.default_preprocessor(kmm.MobileVMoE, backbone)
    return kmm.MobileVMoE(
        backbone,
        num_classes=6,
        preprocessor=preprocessor,
        superclass_ids=[0, 0, 1, 2, 3, 3],
    )


def images():
    return fixture()["x_test"][:4]


def logits(model):
    # Raw pixels: predict runs the preprocessor (and rejects images that
    # were already scaled to [-1, 1]).
    return to_numpy(model.predict(images(), verbose=0))


def weights(model):
    return [to_numpy(w) for w in model.weights]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny trained-looking classifier saved once for the module."""
    model = tiny_classifier()
    folder = str(tmp_path_factory.mktemp("preset") / "tiny")
    model.save_to_preset(folder)
    return model, folder


@pytest.fixture
def copy_of(saved, tmp_path):
    count = []

    def make():
        count.append(1)
        target = str(tmp_path / f"copy{len(count)}")
        shutil.copytree(saved[1], target)
        return target

    return make


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache in a temp dir, offline, as a user with
    HF_HUB_OFFLINE=1 and HF_HUB_CACHE=<dir> has it."""
    from huggingface_hub import constants

    cache = str(tmp_path / "hf_cache")
    os.makedirs(cache)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


# --- format -----------------------------------------------------------------


def test_save_writes_the_keras_hub_preset_format(saved):
    model, folder = saved
    assert sorted(os.listdir(folder)) == [
        "README.md",
        "config.json",
        "image_converter.json",
        "metadata.json",
        "model.weights.h5",
        "preprocessor.json",
        "task.json",
        "task.weights.h5",
    ]
    config = json.load(open(os.path.join(folder, "config.json")))
    assert config["registered_name"] == "keras_mobile_moe>MobileVMoEBackbone"
    task = json.load(open(os.path.join(folder, "task.json")))
    assert task["registered_name"] == (
        "keras_mobile_moe>MobileVMoEImageClassifier"
    )
    metadata = json.load(open(os.path.join(folder, "metadata.json")))
    assert metadata["keras_version"] == keras.version()
    assert metadata["keras_hub_version"] == keras_hub.__version__
    assert metadata["keras_mobile_moe_version"] == kmm.__version__
    assert metadata["parameter_count"] == model.backbone.count_params()
    assert metadata["flops"] == kmm.count_flops(model)
    assert metadata["family"] == "mobile_vmoe"
    for name in ("model.weights.h5", "task.weights.h5"):
        assert metadata["files_sha256"][name] == kmm.preset_loader.file_sha256(
            os.path.join(folder, name)
        )
    card = open(os.path.join(folder, "README.md")).read()
    assert card.startswith("---\nlibrary_name: keras-hub\n")
    assert "MobileVMoEImageClassifier" in card and "| classes | 6 |" in card


def test_directory_round_trip_gives_identical_outputs(saved):
    model, folder = saved
    loaded = kmm.MobileVMoE.from_preset(folder)
    np.testing.assert_array_equal(logits(loaded), logits(model))
    assert loaded.superclass_ids == model.superclass_ids
    backbone = kmm.MobileVMoEBackbone.from_preset(folder)
    for a, b in zip(weights(backbone), weights(model.backbone)):
        np.testing.assert_array_equal(a, b)


def test_keras_hub_loads_our_presets(saved):
    model, folder = saved
    backbone = keras_hub.models.Backbone.from_preset(folder)
    assert isinstance(backbone, kmm.MobileVMoEBackbone)
    classifier = keras_hub.models.ImageClassifier.from_preset(folder)
    assert isinstance(classifier, kmm.MobileVMoE)
    np.testing.assert_array_equal(logits(classifier), logits(model))


def test_saving_again_replaces_the_previous_preset(saved, copy_of):
    folder = copy_of()
    kmm.MobileVMoEBackbone(**{**TINY, "num_moe_layers": 0}).save_to_preset(
        folder
    )
    # The task files of the earlier save are gone: this is a backbone now.
    assert sorted(os.listdir(folder)) == [
        "README.md",
        "config.json",
        "metadata.json",
        "model.weights.h5",
    ]
    assert not kmm.MobileVMoEBackbone.from_preset(folder).is_moe


def test_save_keeps_a_hand_written_model_card(tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "README.md").write_text("# my card\n")
    kmm.MobileVMoEBackbone(**TINY).save_to_preset(folder)
    assert (folder / "README.md").read_text() == "# my card\n"


def test_save_rejects_sharding_and_files(tmp_path):
    backbone = kmm.MobileVMoEBackbone(**TINY)
    with pytest.raises(ValueError, match="max_shard_size=1.*expected None"):
        backbone.save_to_preset(str(tmp_path / "a"), max_shard_size=1)
    with pytest.raises(ValueError, match="writes a local directory"):
        backbone.save_to_preset("hf://org/repo")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="which is a file"):
        backbone.save_to_preset(str(tmp_path / "file"))


# --- overrides --------------------------------------------------------------


def test_num_classes_override_rebuilds_the_head_and_keeps_the_rest(saved):
    model, folder = saved
    tuned = kmm.MobileVMoE.from_preset(folder, num_classes=3)
    assert tuned.num_classes == 3
    assert tuple(tuned.output_dense.kernel.shape) == (TINY["hidden_dim"], 3)
    # superclass_ids described the 6 old classes: dropped, not reused.
    assert tuned.superclass_ids is None
    for a, b in zip(weights(tuned.backbone), weights(model.backbone)):
        np.testing.assert_array_equal(a, b)
    assert tuned.preprocessor.image_converter.scale == pytest.approx(1 / 127.5)
    same = kmm.MobileVMoE.from_preset(
        folder, num_classes=3, superclass_ids=[0, 1, 1]
    )
    assert same.superclass_ids == [0, 1, 1]


def test_other_overrides_keep_every_weight(saved):
    model, folder = saved
    loaded = kmm.MobileVMoE.from_preset(
        folder, dropout=0.1, drop_path_rate=0.1, router_loss_weight=0.5
    )
    assert loaded.backbone.drop_path_rate == 0.1 and loaded.dropout == 0.1
    for a, b in zip(weights(loaded), weights(model)):
        np.testing.assert_array_equal(a, b)


def test_task_saved_without_preprocessor_loads_without_one(tmp_path):
    model = kmm.MobileVMoE(kmm.MobileVMoEBackbone(**TINY), num_classes=3)
    model.save_to_preset(str(tmp_path))
    loaded = kmm.MobileVMoE.from_preset(str(tmp_path), compile=False)
    assert loaded.preprocessor is None and not loaded.compiled
    x = fixture()["x_test"][:2].astype("float32") / 127.5 - 1
    np.testing.assert_array_equal(
        to_numpy(loaded.predict(x, verbose=0)),
        to_numpy(model.predict(x, verbose=0)),
    )


def test_preset_saved_after_fit_loads(tmp_path):
    # save_to_preset after compile()/fit() also writes the optimizer state;
    # loading keeps the model's weights and leaves the optimizer out.
    model = tiny_classifier()
    model.compile(optimizer="adam")
    data = fixture()
    model.fit(data["x_train"][:8], data["y_train"][:8] % 6, epochs=1, verbose=0)
    model.save_to_preset(str(tmp_path))
    loaded = kmm.MobileVMoE.from_preset(str(tmp_path))
    np.testing.assert_allclose(logits(loaded), logits(model), atol=1e-5)


def test_backbone_only_preset_gets_a_new_head(tmp_path):
    backbone = kmm.MobileVMoEBackbone(**TINY)
    backbone.save_to_preset(str(tmp_path))
    with pytest.raises(ValueError, match="holds only a backbone.*num_classes"):
        kmm.MobileVMoE.from_preset(str(tmp_path))
    model = kmm.MobileVMoE.from_preset(str(tmp_path), num_classes=4)
    assert model.num_classes == 4 and model.preprocessor is not None
    for a, b in zip(weights(model.backbone), weights(backbone)):
        np.testing.assert_array_equal(a, b)


def test_architecture_overrides_with_weights_fail_clearly(saved):
    _, folder = saved
    with pytest.raises(ValueError, match=r"overrides \['image_shape'\] change"):
        kmm.MobileVMoE.from_preset(folder, image_shape=(64, 64, 3))
    model = kmm.MobileVMoE.from_preset(
        folder, load_weights=False, image_shape=(64, 64, 3)
    )
    assert model.preprocessor.image_converter.image_size == (64, 64)


def test_unknown_overrides_and_bad_load_weights(saved):
    _, folder = saved
    with pytest.raises(
        ValueError, match=r"Unknown argument\(s\).*'num_clases'"
    ):
        kmm.MobileVMoE.from_preset(folder, num_clases=3)
    with pytest.raises(
        ValueError, match=r"Unknown argument\(s\).*'num_classes'"
    ):
        kmm.MobileVMoEBackbone.from_preset(folder, num_classes=3)
    with pytest.raises(ValueError, match="load_weights='yes'"):
        kmm.MobileVMoE.from_preset(folder, load_weights="yes")
    with pytest.raises(ValueError, match="backbone` override"):
        kmm.MobileVMoE.from_preset(folder, backbone=None)


# --- built-in presets with weights -------------------------------------------


def registry_with(tmp_path, monkeypatch, weights, name="tiny_trained", **extra):
    """A registry folder with one trained preset whose weights are at
    `weights` (a folder under the registry, or an hf:// handle)."""
    registry = tmp_path / "registry"
    registry.mkdir(exist_ok=True)
    entry = {
        "name": name,
        "aliases": [],
        "family": "mobile_vmoe",
        "class": "MobileVMoEImageClassifier",
        "description": "tiny test preset",
        "variant": "6x64",
        "backbone": {**TINY, "image_shape": list(TINY["image_shape"])},
        "task": {"num_classes": 6},
        "params": 1,
        "flops": 1,
        "training_data": "cifar100 fixture",
        "accuracy": {"top1": 0.5},
        "weights": weights,
        **extra,
    }
    (registry / f"{name}.json").write_text(json.dumps(entry))
    monkeypatch.setattr(preset_registry, "presets_dir", lambda: registry)
    return registry


def test_builtin_preset_with_packaged_weights(saved, tmp_path, monkeypatch):
    model, folder = saved
    registry = registry_with(tmp_path, monkeypatch, "tiny_trained")
    shutil.copytree(folder, registry / "tiny_trained")
    assert "tiny_trained" in kmm.MobileVMoE.presets
    loaded = kmm.MobileVMoE.from_preset("tiny_trained")
    np.testing.assert_array_equal(logits(loaded), logits(model))
    # Architecture only: no file is read.
    shutil.rmtree(registry / "tiny_trained")
    assert (
        kmm.MobileVMoE.from_preset(
            "tiny_trained", load_weights=False
        ).num_classes
        == 6
    )
    with pytest.raises(FileNotFoundError, match="packaged folder .* missing"):
        kmm.MobileVMoE.from_preset("tiny_trained")
    table = preset_registry.markdown_table()
    assert "| `tiny_trained` |" in table and "50.0%" in table


def test_builtin_preset_with_hub_weights(
    saved, tmp_path, monkeypatch, hf_cache
):
    model, folder = saved
    write_snapshot(hf_cache, REPO, folder, "v2")
    registry_with(tmp_path, monkeypatch, f"hf://{REPO}/v2")
    loaded = kmm.MobileVMoE.from_preset("tiny_trained")
    np.testing.assert_array_equal(logits(loaded), logits(model))
    backbone = kmm.MobileVMoEBackbone.from_preset("tiny_trained")
    assert backbone.count_params() == model.backbone.count_params()


def test_registry_entry_must_match_its_weights(saved, tmp_path, monkeypatch):
    _, folder = saved
    registry = registry_with(
        tmp_path,
        monkeypatch,
        "w",
        backbone={**TINY, "image_shape": [32, 32, 3], "top_k": 2},
    )
    shutil.copytree(folder, registry / "w")
    with pytest.raises(ValueError, match="top_k=1 \\(registry: 2\\)"):
        kmm.MobileVMoE.from_preset("tiny_trained")


@pytest.mark.parametrize(
    "weights", ["../escape", "/etc", "a/../../b", "hf://org/../x", "a\\b"]
)
def test_registry_rejects_path_tricks_in_weights(
    weights, tmp_path, monkeypatch
):
    registry_with(tmp_path, monkeypatch, weights)
    with pytest.raises(ValueError, match="weights"):
        kmm.MobileVMoE.presets


def test_registry_entries_are_validated(tmp_path, monkeypatch):
    registry_with(tmp_path, monkeypatch, None, params="many")
    with pytest.raises(
        ValueError, match="field 'params' is 'many'; expected int"
    ):
        kmm.MobileVMoE.presets


def test_presets_of_another_family_name_the_right_class(tmp_path, monkeypatch):
    registry_with(
        tmp_path,
        monkeypatch,
        None,
        name="other",
        family="mone",
        **{"class": "MoNEImageClassifier"},
    )
    with pytest.raises(ValueError, match="'mone' preset .*MoNEImageClassifier"):
        kmm.MobileVMoE.from_preset("other", load_weights=False)


# --- hf:// ------------------------------------------------------------------


def test_hf_cache_written_by_the_helper_is_a_valid_cache(saved, tmp_path):
    import huggingface_hub

    cache = str(tmp_path / "cache")
    commit = write_snapshot(cache, REPO, saved[1], "main")
    info = huggingface_hub.scan_cache_dir(cache)
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == REPO
    (revision,) = repo.revisions
    assert revision.commit_hash == commit and revision.refs == {"main"}
    assert {f.file_name for f in revision.files} == set(os.listdir(saved[1]))


def test_hf_handle_loads_from_the_cache_offline(saved, hf_cache, tmp_path):
    model, folder = saved
    write_snapshot(hf_cache, REPO, folder, "main")
    other = tiny_classifier(seed=1)
    other.save_to_preset(str(tmp_path / "v1"))
    write_snapshot(hf_cache, REPO, str(tmp_path / "v1"), "v1")
    loaded = kmm.MobileVMoE.from_preset(f"hf://{REPO}")
    np.testing.assert_array_equal(logits(loaded), logits(model))
    at_v1 = kmm.MobileVMoE.from_preset(f"hf://{REPO}/v1")
    np.testing.assert_array_equal(logits(at_v1), logits(other))
    assert not np.array_equal(logits(at_v1), logits(model))
    # keras-hub's own hf:// loader reads the same cache.
    assert isinstance(
        keras_hub.models.Backbone.from_preset(f"hf://{REPO}"),
        kmm.MobileVMoEBackbone,
    )


def test_hf_offline_without_cache_fails_clearly(hf_cache):
    with pytest.raises(FileNotFoundError, match="offline mode is on") as info:
        kmm.MobileVMoE.from_preset(f"hf://{REPO}")
    assert "HF_HUB_OFFLINE" in str(info.value) and hf_cache in str(info.value)
    with pytest.raises(FileNotFoundError, match="revision 'v9'"):
        kmm.MobileVMoE.from_preset(f"hf://{REPO}/v9")


def test_upload_then_load_round_trip(saved, hf_cache, monkeypatch):
    import huggingface_hub

    model, folder = saved
    FakeHfApi.calls = []
    FakeHfApi.cache_dir = hf_cache
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    before = sorted(os.listdir(folder))
    kmm.upload_preset(f"hf://{REPO}", folder, private=True, token="tok")
    kmm.upload_preset(f"hf://{REPO}/release", folder)
    assert sorted(os.listdir(folder)) == before  # the folder is not touched
    names = [name for name, _ in FakeHfApi.calls]
    assert names == [
        "HfApi",
        "create_repo",
        "upload_folder",
        "HfApi",
        "create_repo",
        "create_branch",
        "upload_folder",
    ]
    assert FakeHfApi.calls[0][1]["token"] == "tok"
    assert FakeHfApi.calls[1][1] == {
        "repo_id": REPO,
        "repo_type": "model",
        "private": True,
        "exist_ok": True,
    }
    upload = FakeHfApi.calls[2][1]
    assert upload["files"] == before and upload["revision"] is None
    assert f'from_preset("hf://{REPO}")' in upload["readme"]
    assert FakeHfApi.calls[5][1]["branch"] == "release"
    assert FakeHfApi.calls[6][1]["revision"] == "release"
    for handle in (f"hf://{REPO}", f"hf://{REPO}/release"):
        loaded = kmm.MobileVMoE.from_preset(handle)
        np.testing.assert_array_equal(logits(loaded), logits(model))


def test_upload_checks_the_preset_before_contacting_the_hub(
    copy_of, tmp_path, monkeypatch
):
    import huggingface_hub

    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    with pytest.raises(ValueError, match="not a valid Hugging Face handle"):
        kmm.upload_preset("hf://org/../repo", copy_of())
    with pytest.raises(FileNotFoundError, match="no such preset directory"):
        kmm.upload_preset("hf://org/repo", str(tmp_path / "missing"))
    folder = copy_of()
    with open(os.path.join(folder, "model.weights.h5"), "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        kmm.upload_preset("hf://org/repo", folder)
    assert FakeHfApi.calls == []


def hub_error(name):
    from huggingface_hub import errors

    cls = getattr(errors, name)
    error = cls.__new__(cls)
    Exception.__init__(error, "from the hub")
    return error


@pytest.mark.parametrize(
    "name, kind, message",
    [
        ("RepositoryNotFoundError", FileNotFoundError, "no repo 'org/repo'"),
        ("GatedRepoError", PermissionError, "gated"),
        ("RevisionNotFoundError", FileNotFoundError, "no revision 'v1'"),
    ],
)
def test_hub_errors_are_explained(name, kind, message, monkeypatch):
    import huggingface_hub

    def fail(**kwargs):
        raise hub_error(name)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(kind, match=message):
        kmm.MobileVMoE.from_preset("hf://org/repo/v1")


@pytest.mark.parametrize(
    "handle, reason",
    [
        ("hf://org/../etc", "'..' or '.' path segment"),
        ("hf://org/repo/../../x", "'..' or '.' path segment"),
        ("hf:///etc/passwd", "absolute path"),
        ("hf://C:/x/y", "absolute path"),
        ("hf://org\\repo", "backslash"),
        ("hf://org//repo", "empty path segment"),
        ("hf://repo", "without its organisation"),
        ("hf://org/re po", "not a valid organisation or repo name"),
        ("hf://org/repo/%2e%2e", "not a valid revision segment"),
        ("hf://org/repo/a..b", "not a valid revision segment"),
    ],
)
def test_handles_with_path_tricks_are_rejected(handle, reason):
    with pytest.raises(
        ValueError, match="not a valid Hugging Face handle"
    ) as info:
        kmm.MobileVMoE.from_preset(handle)
    assert reason in str(info.value)


def test_other_schemes_are_rejected():
    with pytest.raises(ValueError, match="scheme 'kaggle://' is not supported"):
        kmm.MobileVMoE.from_preset("kaggle://keras/x/keras/y")


# --- errors -----------------------------------------------------------------


def test_missing_directory_and_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such preset directory"):
        kmm.MobileVMoE.from_preset(str(tmp_path / "nope"))
    (tmp_path / "model.weights.h5").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="has no config.json") as info:
        kmm.MobileVMoE.from_preset(str(tmp_path))
    assert "model.weights.h5" in str(info.value)  # says what it found
    with pytest.raises(ValueError, match="which is a file"):
        kmm.MobileVMoE.from_preset(str(tmp_path / "model.weights.h5"))


def test_config_of_another_class(tmp_path):
    vit = keras_hub.models.ViTBackbone(
        image_shape=(32, 32, 3),
        patch_size=8,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
    )
    vit.save_to_preset(str(tmp_path))
    # A keras-hub ViT converts into a dense Mobile V-MoE and into MoNE
    # (tests/test_timm_convert.py checks the logits).
    assert kmm.MobileVMoEBackbone.from_preset(str(tmp_path)).hidden_dim == 16
    mone = kmm.MoNEBackbone.from_preset(str(tmp_path))
    assert mone.use_class_token and mone.capacity_budget == 1.0
    config_path = tmp_path / "config.json"
    config = json.load(open(config_path))
    config["registered_name"] = "keras_hub>ResNetBackbone"
    json.dump(config, open(config_path, "w"))
    with pytest.raises(
        ValueError,
        match="'keras_hub>ResNetBackbone', which is not a MobileVMoEBackbone",
    ):
        kmm.MobileVMoEBackbone.from_preset(str(tmp_path))
    with pytest.raises(ValueError, match="not a MobileVMoEBackbone"):
        kmm.MobileVMoE.from_preset(str(tmp_path), num_classes=3)


def test_config_of_an_unregistered_class_or_broken_json(copy_of):
    folder = copy_of()
    path = os.path.join(folder, "config.json")
    config = json.load(open(path))
    config["registered_name"] = "somebody>Backbone"
    json.dump(config, open(path, "w"))
    with pytest.raises(ValueError, match="not registered with Keras"):
        kmm.MobileVMoEBackbone.from_preset(folder)
    open(path, "w").write("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        kmm.MobileVMoEBackbone.from_preset(folder)
    json.dump({"model_type": "vit", "config": {}}, open(path, "w"))
    with pytest.raises(ValueError, match="transformers or timm"):
        kmm.MobileVMoEBackbone.from_preset(folder)


@pytest.mark.parametrize(
    "mutation, message",
    [
        (
            lambda c: c["config"].update(
                activation={
                    "class_name": "__lambda__",
                    "config": {"value": "x"},
                }
            ),
            "'__lambda__' object",
        ),
        (
            lambda c: c["config"].update(
                layer={"module": "os", "class_name": "system", "config": {}}
            ),
            "module 'os'",
        ),
        (
            lambda c: c["config"].update(
                layer={
                    "module": "keras.layers",
                    "class_name": "Lambda",
                    "config": {},
                }
            ),
            "'Lambda' object",
        ),
    ],
    ids=["lambda", "foreign_module", "lambda_layer"],
)
def test_configs_that_carry_code_are_refused(copy_of, mutation, message):
    folder = copy_of()
    path = os.path.join(folder, "task.json")
    config = json.load(open(path))
    mutation(config)
    json.dump(config, open(path, "w"))
    with pytest.raises(ValueError, match=message) as info:
        kmm.MobileVMoE.from_preset(folder)
    assert "never" in str(info.value)


def test_truncated_weights(copy_of):
    folder = copy_of()
    path = os.path.join(folder, "model.weights.h5")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(
        ValueError,
        match="model.weights.h5 is truncated or "
        "corrupt \\(h5py: .*truncated file",
    ):
        kmm.MobileVMoE.from_preset(folder)


def test_corrupt_weights_are_caught_by_the_recorded_sha256(copy_of):
    folder = copy_of()
    path = os.path.join(folder, "task.weights.h5")
    with h5py.File(path, "r+") as f:  # same layout, other numbers
        name = [n for n in _datasets(f)][0]
        f[name][...] = f[name][...] + 1
    with pytest.raises(
        ValueError,
        match="task.weights.h5 is truncated or corrupt \\(its sha256 is",
    ):
        kmm.MobileVMoE.from_preset(folder)


def _datasets(f):
    names = []
    f.visititems(
        lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None
    )
    return names


def test_garbage_weights_file(copy_of):
    folder = copy_of()
    with open(os.path.join(folder, "model.weights.h5"), "wb") as f:
        f.write(b"not an hdf5 file" * 100)
    with pytest.raises(ValueError, match="file signature not found"):
        kmm.MobileVMoE.from_preset(folder)


def test_weights_whose_shapes_do_not_match_the_config(copy_of, tmp_path):
    folder = copy_of()
    other = str(tmp_path / "wide")
    kmm.MobileVMoEBackbone(**{**TINY, "hidden_dim": 16}).save_to_preset(other)
    shutil.copyfile(
        os.path.join(other, "model.weights.h5"),
        os.path.join(folder, "model.weights.h5"),
    )
    with pytest.raises(
        ValueError, match="do not match the model built from its config"
    ) as info:
        kmm.MobileVMoE.from_preset(folder)
    assert "(16,) in the file, (32,) in the model" in str(info.value)
    assert "different models" in str(info.value)
    # Fewer layers in the file than in the config.
    shallow = str(tmp_path / "shallow")
    kmm.MobileVMoEBackbone(**{**TINY, "num_layers": 2}).save_to_preset(shallow)
    shutil.copyfile(
        os.path.join(shallow, "model.weights.h5"),
        os.path.join(folder, "model.weights.h5"),
    )
    with pytest.raises(ValueError, match="missing from the file"):
        kmm.MobileVMoE.from_preset(folder)


def test_missing_weights_file(copy_of):
    folder = copy_of()
    os.remove(os.path.join(folder, "task.weights.h5"))
    with pytest.raises(FileNotFoundError, match="has no task.weights.h5"):
        kmm.MobileVMoE.from_preset(folder)
    # Without weights nothing is read but the configs.
    assert (
        kmm.MobileVMoE.from_preset(folder, load_weights=False).num_classes == 6
    )


def test_weights_linking_to_other_files_are_refused(copy_of, tmp_path):
    folder = copy_of()
    path = os.path.join(folder, "model.weights.h5")
    with h5py.File(path, "r+") as f:
        f["outside"] = h5py.ExternalLink(str(tmp_path / "x.h5"), "/data")
    with pytest.raises(ValueError, match="holds links"):
        kmm.MobileVMoE.from_preset(folder)


def test_unknown_name_path_and_no_weights():
    with pytest.raises(ValueError, match=r"Did you mean \[.*'tiny_e10'"):
        kmm.MobileVMoE.from_preset("tiny_e1O")
    with pytest.raises(ValueError, match="has no published weights yet"):
        kmm.MobileVMoE.from_preset("tiny_e10")
    with pytest.raises(ValueError, match="has no published weights yet"):
        kmm.MobileVMoEBackbone.from_preset("tiny_e10")
    with pytest.raises(FileNotFoundError, match="no such preset directory"):
        kmm.MobileVMoE.from_preset("./tiny_e10")


# --- offline, the way a user runs it ------------------------------------------

OFFLINE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from huggingface_hub import constants
    import keras_hub
    import keras_mobile_moe as kmm

    assert constants.HF_HUB_OFFLINE
    images = np.load(sys.argv[1])
    out = {}
    model = kmm.MobileVMoE.from_preset("hf://%(repo)s")
    out["main"] = model.predict(images, verbose=0).tolist()
    model = kmm.MobileVMoE.from_preset("hf://%(repo)s/v1", num_classes=2)
    out["v1_head"] = list(model.output_dense.kernel.shape)
    backbone = keras_hub.models.Backbone.from_preset("hf://%(repo)s")
    out["keras_hub"] = type(backbone).__name__
    try:
        kmm.MobileVMoE.from_preset("hf://kmm-test/never-downloaded")
    except FileNotFoundError as error:
        out["missing"] = str(error)
    print("RESULT " + json.dumps(out))
    """
) % {"repo": REPO}


def test_offline_loading_in_a_fresh_process(saved, tmp_path):
    """HF_HUB_OFFLINE=1 and HF_HUB_CACHE set before anything is imported,
    as a user does; the loading code is the one that runs online."""
    model, folder = saved
    cache = str(tmp_path / "hf_home" / "hub")
    write_snapshot(cache, REPO, folder, "main")
    write_snapshot(cache, REPO, folder, "v1")
    np.save(tmp_path / "images.npy", images())
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf_home"),
        KERAS_BACKEND=BACKEND,
        PYTHONPATH=os.pathsep.join(sys.path),
    )
    result = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT, str(tmp_path / "images.npy")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [l for l in result.stdout.splitlines() if l.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    out = json.loads(lines[0][len("RESULT ") :])
    np.testing.assert_allclose(
        np.array(out["main"]), logits(model), rtol=0, atol=1e-6
    )
    assert out["v1_head"] == [TINY["hidden_dim"], 2]
    assert out["keras_hub"] == "MobileVMoEBackbone"
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in out["missing"]
    assert cache in out["missing"]


# --- every family plugs in the same way ---------------------------------------


def test_mone_family_uses_the_same_preset_machinery(saved, tmp_path):
    backbone = kmm.MoNEBackbone(
        image_shape=(32, 32, 3),
        patch_size=8,
        num_layers=2,
        hidden_dim=32,
        num_heads=2,
        mlp_dim=64,
    )
    model = kmm.MoNE(
        backbone,
        num_classes=4,
        preprocessor=preset_loader.default_preprocessor(kmm.MoNE, backbone),
    )
    folder = str(tmp_path / "mone")
    model.save_to_preset(folder)
    metadata = json.load(open(os.path.join(folder, "metadata.json")))
    assert metadata["family"] == "mone"
    assert metadata["flops"] == kmm.count_flops(model)
    loaded = kmm.MoNE.from_preset(folder)
    np.testing.assert_array_equal(logits(loaded), logits(model))
    assert kmm.MoNE.from_preset(folder, num_classes=2).num_classes == 2
    with pytest.raises(
        ValueError,
        match="not a MobileVMoEImageClassifier. It "
        "is a 'mone' preset: load it with MoNEImageClassifier",
    ):
        kmm.MobileVMoE.from_preset(folder)
    with pytest.raises(ValueError, match="It is a 'mobile_vmoe' preset"):
        kmm.MoNE.from_preset(saved[1])
    with pytest.raises(ValueError, match="is a 'mobile_vmoe' preset"):
        kmm.MoNE.from_preset("tiny_e10", load_weights=False)
