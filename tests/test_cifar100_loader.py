"""kmm.datasets.cifar100.load_data: npz from a path or the environment, the
official archive (read without unsafe unpickling), the download with its
hash check, and a clear error for every kind of bad file."""

import hashlib
import io
import os
import pathlib
import pickle
import tarfile

import numpy as np
import pytest

from keras_mobile_moe.datasets import cifar100

# Files and numpy arrays only: the same on every backend.
pytestmark = pytest.mark.backend_independent

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "datasets"
SHARED_SHA256 = (
    "3cb937a02bbe098d5d485f471b19453a753f1bee1a98706ede51bc0b40098ae0"
)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(cifar100.ENV_VAR, raising=False)


def save_npz(path, **changes):
    data = dict(cifar100.load_fixture())
    for key, value in changes.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    np.savez(path, **data)
    return str(path)


def test_load_data_from_a_path_and_from_the_environment(tmp_path, monkeypatch):
    fixture = cifar100.load_fixture()
    path = save_npz(tmp_path / "c.npz")
    for data in (
        cifar100.load_data(path),
        cifar100.load_data(pathlib.Path(path)),
    ):
        assert sorted(data) == sorted(cifar100.KEYS)
        for key in cifar100.KEYS:
            np.testing.assert_array_equal(data[key], fixture[key])
    monkeypatch.setenv(cifar100.ENV_VAR, path)
    assert cifar100.load_data()["x_train"].shape == (800, 32, 32, 3)
    # An explicit path wins over the environment.
    monkeypatch.setenv(cifar100.ENV_VAR, str(tmp_path / "missing.npz"))
    assert cifar100.load_data(path)["y_test"].shape == (200,)
    with pytest.raises(FileNotFoundError, match="KMM_CIFAR100_PATH=.*missing"):
        cifar100.load_data()


@pytest.mark.skipif(
    not (SHARED / "cifar100.npz").exists(),
    reason="the full CIFAR-100 file ../shared/datasets/cifar100.npz is absent",
)
def test_full_dataset_from_shared():
    path = SHARED / "cifar100.npz"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == SHARED_SHA256
    data = cifar100.load_data(path)
    assert data["x_train"].shape == (50000, 32, 32, 3)
    assert data["x_test"].shape == (10000, 32, 32, 3)
    assert np.bincount(data["y_train"]).tolist() == [500] * 100
    assert np.bincount(data["y_test_coarse"]).tolist() == [500] * 20
    assert (
        data["class_names"][0] == "apple" and data["class_names"][99] == "worm"
    )
    table = cifar100.fine_to_coarse(data["y_train"], data["y_train_coarse"])
    assert data["coarse_names"][table[0]] == "fruit_and_vegetables"


# --- the official archive ---------------------------------------------------


def official_archive(path, train_labels=(0, 1, 99, 0), extra=None):
    """A small archive in the official python format: pickled dicts with
    bytes keys, a uint8 [N, 3072] numpy array and label lists. (The official
    pickles come from Python 2, whose strings load as bytes; protocol 4 is
    the Python 3 way to write the same objects with the same globals.)"""
    rng = np.random.default_rng(0)

    def batch(labels):
        labels = list(labels)
        return {
            b"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8),
            b"fine_labels": labels,
            b"coarse_labels": [{0: 4, 1: 1, 99: 13}[l] for l in labels],
            b"filenames": [b"x.png"] * len(labels),
            b"batch_label": b"training batch 1 of 1",
        }

    fixture = cifar100.load_fixture()
    members = {
        "train": batch(train_labels),
        "test": batch([99, 1]),
        "meta": {
            b"fine_label_names": [n.encode() for n in fixture["class_names"]],
            b"coarse_label_names": [
                n.encode() for n in fixture["coarse_names"]
            ],
        },
    }
    members.update(extra or {})
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in members.items():
            data = obj if isinstance(obj, bytes) else pickle.dumps(obj, 4)
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return members, hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def test_official_archive_is_read_without_unsafe_unpickling(
    tmp_path, monkeypatch
):
    path = tmp_path / "cifar-100-python.tar.gz"
    members, digest = official_archive(path)
    monkeypatch.setattr(cifar100, "ARCHIVE_SHA256", digest)
    data = cifar100.load_data(path)
    raw = members["train"][b"data"]
    assert data["x_train"].shape == (4, 32, 32, 3)
    # Channel-first rows of 3072 become channels-last images.
    assert data["x_train"][1, 2, 3, 0] == raw[1, 0 * 1024 + 2 * 32 + 3]
    assert data["x_train"][1, 2, 3, 2] == raw[1, 2 * 1024 + 2 * 32 + 3]
    assert data["y_train"].tolist() == [0, 1, 99, 0]
    assert data["y_train_coarse"].tolist() == [4, 1, 13, 4]
    assert data["y_train"].dtype == np.int64
    assert data["class_names"][99] == "worm"


def test_download_checks_the_hash_and_caches(tmp_path, monkeypatch):
    source = tmp_path / "served.tar.gz"
    _, digest = official_archive(source)
    monkeypatch.setattr(cifar100, "ARCHIVE_URL", source.as_uri())
    monkeypatch.setattr(cifar100, "ARCHIVE_SHA256", digest)
    cache = tmp_path / "cache"
    data = cifar100.load_data(cache_dir=str(cache))
    assert data["x_test"].shape == (2, 32, 32, 3)
    assert (cache / "datasets" / cifar100.ARCHIVE_NAME).exists()
    source.unlink()  # the second call reads the cached, checked copy
    assert cifar100.load_data(cache_dir=str(cache))["y_test"].tolist() == [
        99,
        1,
    ]


def test_download_with_a_wrong_hash_fails(tmp_path, monkeypatch):
    source = tmp_path / "served.tar.gz"
    official_archive(source)
    monkeypatch.setattr(cifar100, "ARCHIVE_URL", source.as_uri())
    with pytest.raises(ValueError, match="failed its sha256 check"):
        cifar100.load_data(cache_dir=str(tmp_path / "cache"))


def test_download_without_network_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(
        cifar100, "ARCHIVE_URL", (tmp_path / "unreachable.tar.gz").as_uri()
    )
    with pytest.raises(
        ConnectionError, match="Could not download CIFAR-100"
    ) as info:
        cifar100.load_data(cache_dir=str(tmp_path / "cache"))
    assert "KMM_CIFAR100_PATH" in str(info.value) and "path=" in str(info.value)


def test_archive_that_is_not_the_official_one(tmp_path):
    path = tmp_path / "cifar-100-python.tar.gz"
    official_archive(path)
    with pytest.raises(ValueError, match="is not the official .*sha256 is"):
        cifar100.load_data(path)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_archive_with_code_in_its_pickles_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    path = tmp_path / "cifar-100-python.tar.gz"
    _, digest = official_archive(
        path, extra={"meta": pickle.dumps({b"x": _Exploit(marker)}, 4)}
    )
    monkeypatch.setattr(cifar100, "ARCHIVE_SHA256", digest)
    with pytest.raises(
        ValueError,
        match="cannot be read safely .*refusing to load the global .*system",
    ):
        cifar100.load_data(path)
    assert not marker.exists()


def test_truncated_archive(tmp_path, monkeypatch):
    path = tmp_path / "cifar-100-python.tar.gz"
    official_archive(path)
    data = path.read_bytes()[:-200]
    path.write_bytes(data)
    monkeypatch.setattr(
        cifar100, "ARCHIVE_SHA256", hashlib.sha256(data).hexdigest()
    )
    with pytest.raises(ValueError, match="truncated or corrupt|is corrupt"):
        cifar100.load_data(path)


# --- bad npz files ------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"y_test_coarse": None}, r"has no \['y_test_coarse'\]"),
        (
            {"x_train": np.zeros((8, 32, 32), np.uint8)},
            r"x_train has shape \(8, 32, 32\); expected \[N, 32, 32, 3\]",
        ),
        (
            {"x_test": np.zeros((200, 32, 32, 3), np.float32)},
            "x_test has dtype float32; expected uint8",
        ),
        (
            {"y_train": np.full(800, 100)},
            r"y_train has labels up to 100 "
            r".*expected fine labels in \[0, 100\)",
        ),
        (
            {"y_test_coarse": np.full(200, -1)},
            r"expected coarse labels in \[0, 20\)",
        ),
        (
            {"y_test": np.zeros(199, np.int64)},
            r"y_test has shape \(199,\); expected \(200,\)",
        ),
        (
            {"y_train": np.zeros(800, np.float32)},
            "y_train has dtype float32; expected integer labels",
        ),
        (
            {"class_names": np.array(["a"] * 99)},
            "class_names is <U1 of shape \\(99,\\); expected 100 str names",
        ),
        ({"y_train_coarse": np.arange(800) % 20}, "more than one coarse label"),
    ],
    ids=[
        "missing_key",
        "image_shape",
        "image_dtype",
        "fine_range",
        "coarse_range",
        "label_count",
        "label_dtype",
        "names",
        "inconsistent_coarse",
    ],
)
def test_bad_npz_files_say_what_is_wrong(tmp_path, changes, message):
    path = save_npz(tmp_path / "bad.npz", **changes)
    with pytest.raises(ValueError, match=message):
        cifar100.load_data(path)


def test_npz_with_pickled_objects_is_never_unpickled(tmp_path):
    path = save_npz(
        tmp_path / "obj.npz", class_names=np.array([object()] * 100, object)
    )
    with pytest.raises(
        ValueError, match="pickled object arrays, which are never loaded"
    ):
        cifar100.load_data(path)


def test_truncated_and_garbage_npz(tmp_path):
    path = save_npz(tmp_path / "c.npz")
    data = pathlib.Path(path).read_bytes()
    pathlib.Path(path).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable .npz"):
        cifar100.load_data(path)
    garbage = tmp_path / "g.npz"
    garbage.write_bytes(b"hello" * 100)
    with pytest.raises(ValueError, match="not a readable .npz"):
        cifar100.load_data(garbage)
