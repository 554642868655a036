"""CIFAR-100 with its 20 super-classes (Krizhevsky 2009).

- `load_data(path=None)`: the full dataset, from a `.npz` file (a path, or
  the `KMM_CIFAR100_PATH` environment variable) or, for users with internet,
  the official archive downloaded from the University of Toronto and checked
  against its sha256.
- `load_fixture()`: the 1,000-image cut shipped with the package (8 train and
  2 test images per fine class, taken from the full archive by
  `scripts/make_cifar100_fixture.py`), for tests, docs and demos offline.

Both return the same dict of numpy arrays, and both validate what they read.

The `.npz` format (read with `allow_pickle=False`):

    x_train  uint8 [N, 32, 32, 3]   y_train, y_train_coarse  int [N]
    x_test   uint8 [M, 32, 32, 3]   y_test,  y_test_coarse   int [M]
    class_names  str [100]          coarse_names  str [20]

Fine labels follow the official order (alphabetical: apple=0 ... worm=99),
coarse labels too (aquatic_mammals=0 ... vehicles_2=19).

The official archive holds Python pickles (with numpy arrays inside), which
cannot be read without unpickling. They are read with a restricted unpickler
that accepts exactly the globals needed to rebuild numpy arrays
(`numpy.ndarray`, `numpy.dtype`, `numpy.core.multiarray._reconstruct` and its
numpy 2 name) and refuses every other global, so a tampered archive cannot
run code; the archive's sha256 is checked before anything in it is read.
Members are read in memory, never extracted to disk.
"""

import hashlib
import importlib.resources
import io
import os
import pickle
import tarfile
import zipfile

import numpy as np

FIXTURE = "cifar100_fixture.npz"
ENV_VAR = "KMM_CIFAR100_PATH"
ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
ARCHIVE_NAME = "cifar-100-python.tar.gz"
ARCHIVE_SHA256 = (
    "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7"
)
IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 100
NUM_SUPERCLASSES = 20
KEYS = (
    "x_train",
    "y_train",
    "y_train_coarse",
    "x_test",
    "y_test",
    "y_test_coarse",
    "class_names",
    "coarse_names",
)
FORMAT = (
    "x_train/x_test (uint8 [N, 32, 32, 3]), "
    "y_train/y_test (fine labels in [0, 100)), y_train_coarse/y_test_coarse "
    "(coarse labels in [0, 20)), class_names (100 str) and coarse_names "
    "(20 str)"
)
# The globals a pickled numpy array needs, and nothing else.
_ALLOWED_GLOBALS = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }
)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes, numbers and numpy arrays only."""

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load the global {module}.{name}; only numpy arrays "
            "may be rebuilt"
        )


def load_fixture():
    """Loads the small CIFAR-100 cut that ships with the package.

    Returns:
        A dict of numpy arrays: `x_train` uint8 `[800, 32, 32, 3]`, `y_train`
        and `y_train_coarse` int64 `[800]`, `x_test` `[200, 32, 32, 3]`,
        `y_test`, `y_test_coarse` `[200]`, and `class_names` (100) and
        `coarse_names` (20) as str arrays.

    Example:

    >>> data = load_fixture()
    >>> data["x_train"].shape, int(data["y_train_coarse"].max())
    ((800, 32, 32, 3), 19)
    """
    path = importlib.resources.files("keras_mobile_moe.datasets") / FIXTURE
    with importlib.resources.as_file(path) as file:
        return _read_npz(str(file), "the packaged fixture")


def load_data(path=None, cache_dir=None):
    """Loads the full CIFAR-100 dataset with fine and coarse labels.

    Where the data comes from, in order: `path`; else the file named by the
    environment variable `KMM_CIFAR100_PATH`; else the official archive,
    downloaded once into `cache_dir` (default `~/.keras/datasets`) and
    checked against its sha256. `path` may be a `.npz` in the format of this
    module's docstring or a copy of the official `cifar-100-python.tar.gz`.

    Args:
        path: str, path-like or None. A CIFAR-100 `.npz` or official archive.
        cache_dir: str or None. Where the download is kept.

    Returns:
        A dict of numpy arrays: `x_train` uint8 `[N, 32, 32, 3]`, `y_train`
        and `y_train_coarse` int64 `[N]` (fine labels in [0, 100), coarse in
        [0, 20)), `x_test`, `y_test`, `y_test_coarse` likewise, and
        `class_names` (100) and `coarse_names` (20) as str arrays. The full
        dataset has N = 50,000 and 10,000 test images.

    Example:

    >>> import importlib.resources
    >>> path = importlib.resources.files("keras_mobile_moe.datasets").joinpath(
    ...     "cifar100_fixture.npz")
    >>> data = load_data(path)
    >>> data["x_test"].shape, str(data["class_names"][0])
    ((200, 32, 32, 3), 'apple')
    >>> str(data["coarse_names"][data["y_test_coarse"][-1]])
    'non-insect_invertebrates'
    """
    source = "path"
    if path is None and os.environ.get(ENV_VAR):
        path, source = os.environ[ENV_VAR], ENV_VAR
    if path is None:
        return _read_archive(download_archive(cache_dir), ARCHIVE_URL)
    if not isinstance(path, (str, os.PathLike)):
        path = str(path)  # an importlib.resources path
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Received: {source}={path!r}, but no such file exists. Expected "
            f"a CIFAR-100 .npz (with {FORMAT}) or a copy of the official "
            f"{ARCHIVE_NAME}."
        )
    if tarfile.is_tarfile(path):
        return _read_archive(path, f"{source}={path!r}")
    return _read_npz(path, f"{source}={path!r}")


def load_data_or_fixture(use_fixture=False):
    """The full CIFAR-100 when a local copy is configured, else the fixture.

    What the guides and demos use: the full dataset from the file named by
    `KMM_CIFAR100_PATH` when that file exists (never a download, so it
    works offline), otherwise the small cut shipped with the package.

    Args:
        use_fixture: bool. Always return the fixture (smoke runs).

    Returns:
        `(data, source)`: the dict of `load_data` / `load_fixture`, and a
        sentence saying which data it is, to print. `source` starts with
        `"CIFAR-100 from"` for the full dataset.

    Example:

    >>> data, source = load_data_or_fixture(use_fixture=True)
    >>> data["x_train"].shape
    (800, 32, 32, 3)
    """
    path = os.environ.get(ENV_VAR)
    if path and os.path.isfile(path) and not use_fixture:
        return load_data(path), f"CIFAR-100 from {path}"
    data = load_fixture()
    return data, (
        f"the CIFAR-100 fixture shipped with the package "
        f"({len(data['x_train'])} training and {len(data['x_test'])} test "
        f"images); set {ENV_VAR} to a CIFAR-100 .npz for the full dataset"
    )


def download_archive(cache_dir=None):
    """Downloads the official CIFAR-100 archive (once) and checks its sha256.

    Args:
        cache_dir: str or None. Where to keep it (default `~/.keras`).

    Returns:
        The local path of `cifar-100-python.tar.gz`.

    Example:

    >>> ARCHIVE_URL
    'https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz'
    """
    import keras

    if cache_dir is not None:
        # keras.utils.get_file silently falls back to /tmp/.keras when the
        # folder does not exist yet.
        os.makedirs(cache_dir, exist_ok=True)
    try:
        return keras.utils.get_file(
            fname=ARCHIVE_NAME,
            origin=ARCHIVE_URL,
            file_hash=ARCHIVE_SHA256,
            hash_algorithm="sha256",
            cache_dir=cache_dir,
            cache_subdir="datasets",
        )
    except ValueError as error:
        raise ValueError(
            f"The CIFAR-100 archive downloaded from {ARCHIVE_URL} failed its "
            f"sha256 check (expected {ARCHIVE_SHA256}): {error}"
        ) from error
    except Exception as error:
        raise ConnectionError(
            f"Could not download CIFAR-100 from {ARCHIVE_URL} ({error}). "
            f"Without internet, pass path= or set {ENV_VAR} to a CIFAR-100 "
            f".npz (with {FORMAT}) or to a copy of {ARCHIVE_NAME}."
        ) from error


def _read_npz(path, source):
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"CIFAR-100 file {source} is not a readable .npz (not a zip "
            f"archive: truncated, corrupt or another format); a CIFAR-100 "
            f".npz holds {FORMAT}."
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise ValueError(
                f"CIFAR-100 file {source} holds pickled object arrays, which "
                f"are never loaded (no pickle); a CIFAR-100 .npz holds "
                f"{FORMAT}."
            ) from error
        raise ValueError(
            f"CIFAR-100 file {source} is not a readable .npz ({error}); "
            f"a CIFAR-100 .npz holds {FORMAT}."
        ) from error
    except (OSError, zipfile.BadZipFile, EOFError) as error:
        raise ValueError(
            f"CIFAR-100 file {source} is not a readable .npz (truncated or "
            f"corrupt? {error}); a CIFAR-100 .npz holds {FORMAT}."
        ) from error
    return validate(arrays, source)


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _unpickle(data, member, source):
    try:
        return _ArrayOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"CIFAR-100 archive {source}: member {member!r} cannot be read "
            f"safely ({error})."
        ) from error
    except Exception as error:
        raise ValueError(
            f"CIFAR-100 archive {source}: member {member!r} is corrupt "
            f"({type(error).__name__}: {error})."
        ) from error


def _field(batch, key, member, source):
    if not isinstance(batch, dict) or key not in batch:
        raise ValueError(
            f"CIFAR-100 archive {source}: member {member!r} has no "
            f"{key.decode()!r} entry; it is not the official python version."
        )
    return batch[key]


def _read_archive(path, source):
    actual = _sha256(path)
    if actual != ARCHIVE_SHA256:
        raise ValueError(
            f"CIFAR-100 archive {source} is not the official "
            f"{ARCHIVE_NAME}: its sha256 is {actual}, expected "
            f"{ARCHIVE_SHA256}."
        )
    members = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for part in ("train", "test", "meta"):
                name = f"cifar-100-python/{part}"
                try:
                    info = tar.getmember(name)
                except KeyError:
                    raise ValueError(
                        f"CIFAR-100 archive {source} has no member {name!r}."
                    ) from None
                if not info.isfile():
                    raise ValueError(
                        f"CIFAR-100 archive {source}: {name!r} is not a "
                        "regular file."
                    )
                members[part] = _unpickle(
                    tar.extractfile(info).read(), name, source
                )
    except (tarfile.TarError, OSError, EOFError) as error:
        raise ValueError(
            f"CIFAR-100 archive {source} is truncated or corrupt ({error})."
        ) from error
    result = {}
    for split in ("train", "test"):
        batch, member = members[split], f"cifar-100-python/{split}"
        images = _field(batch, b"data", member, source)
        if (
            not isinstance(images, np.ndarray)
            or images.dtype != np.uint8
            or images.ndim != 2
            or images.shape[1] != 3 * 32 * 32
        ):
            raise ValueError(
                f"CIFAR-100 archive {source}: {member!r} data is "
                f"{getattr(images, 'dtype', type(images))} of shape "
                f"{getattr(images, 'shape', None)}; expected uint8 [N, 3072]."
            )
        result[f"x_{split}"] = np.ascontiguousarray(
            images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        )
        for key, suffix in (
            (b"fine_labels", ""),
            (b"coarse_labels", "_coarse"),
        ):
            labels = _field(batch, key, member, source)
            result[f"y_{split}{suffix}"] = np.asarray(labels)
    meta = members["meta"]
    for key, out in (
        (b"fine_label_names", "class_names"),
        (b"coarse_label_names", "coarse_names"),
    ):
        names = _field(meta, key, "cifar-100-python/meta", source)
        result[out] = np.array(
            [n.decode("utf-8") if isinstance(n, bytes) else n for n in names]
        )
    return validate(result, source)


def validate(data, source="data"):
    """Checks a CIFAR-100 dict (keys, shapes, dtypes, label ranges, names and
    the fine -> coarse mapping) and returns it with int64 labels.

    Args:
        data: dict of numpy arrays, as `load_data` returns.
        source: str. Where the data came from, for error messages.

    Returns:
        The same arrays, labels as int64.

    Example:

    >>> data = load_fixture()
    >>> data["y_train"] = data["y_train"] + 100
    >>> validate(data, "my.npz")
    Traceback (most recent call last):
    ...
    ValueError: CIFAR-100 file my.npz: y_train has labels up to 199
    (min 100); expected fine labels in [0, 100). ...
    """
    missing = [key for key in KEYS if key not in data]
    if missing:
        raise ValueError(
            f"CIFAR-100 file {source} has no {missing}; a CIFAR-100 .npz "
            f"holds {FORMAT}."
        )
    out = {}
    for split in ("train", "test"):
        images = np.asarray(data[f"x_{split}"])
        if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
            raise ValueError(
                f"CIFAR-100 file {source}: x_{split} has shape "
                f"{images.shape}; expected [N, 32, 32, 3]. A CIFAR-100 .npz "
                f"holds {FORMAT}."
            )
        if images.dtype != np.uint8:
            raise ValueError(
                f"CIFAR-100 file {source}: x_{split} has dtype {images.dtype}; "
                "expected uint8 pixels in [0, 255]."
            )
        out[f"x_{split}"] = images
        for suffix, count, kind in (
            ("", NUM_CLASSES, "fine"),
            ("_coarse", NUM_SUPERCLASSES, "coarse"),
        ):
            key = f"y_{split}{suffix}"
            labels = np.asarray(data[key])
            if labels.dtype.kind not in "iu":
                raise ValueError(
                    f"CIFAR-100 file {source}: {key} has dtype {labels.dtype}; "
                    "expected integer labels."
                )
            if labels.shape != (len(images),):
                raise ValueError(
                    f"CIFAR-100 file {source}: {key} has shape "
                    f"{labels.shape}; expected ({len(images)},), one label "
                    f"per image of x_{split}."
                )
            if labels.size and (labels.min() < 0 or labels.max() >= count):
                raise ValueError(
                    f"CIFAR-100 file {source}: {key} has labels up to "
                    f"{labels.max()} (min {labels.min()}); expected {kind} "
                    f"labels in [0, {count}). A CIFAR-100 .npz holds "
                    f"{FORMAT}."
                )
            out[key] = labels.astype(np.int64)
        table = np.full(NUM_CLASSES, -1, np.int64)
        fine, coarse = out[f"y_{split}"], out[f"y_{split}_coarse"]
        table[fine] = coarse
        if not np.array_equal(table[fine], coarse):
            bad = int(fine[table[fine] != coarse][0])
            raise ValueError(
                f"CIFAR-100 file {source}: fine class {bad} appears with "
                f"more than one coarse label in {split}; every fine class "
                "belongs to exactly one super-class."
            )
    for key, count in (
        ("class_names", NUM_CLASSES),
        ("coarse_names", NUM_SUPERCLASSES),
    ):
        names = np.asarray(data[key])
        if names.shape != (count,) or names.dtype.kind != "U":
            raise ValueError(
                f"CIFAR-100 file {source}: {key} is {names.dtype} of shape "
                f"{names.shape}; expected {count} str names."
            )
        out[key] = names
    return out


def fine_to_coarse(fine_labels, coarse_labels, num_classes=100):
    """Builds the class -> super-class table from paired label arrays.

    Args:
        fine_labels: int array of fine labels.
        coarse_labels: int array of the matching coarse labels.
        num_classes: int. Number of fine classes.

    Returns:
        An int array `[num_classes]`: the coarse label of each fine class.

    Example:

    >>> fine_to_coarse([0, 1, 2], [1, 0, 1], num_classes=3).tolist()
    [1, 0, 1]
    """
    fine = np.asarray(fine_labels).reshape(-1)
    coarse = np.asarray(coarse_labels).reshape(-1)
    table = np.full(num_classes, -1, dtype=np.int64)
    table[fine] = coarse
    if (table < 0).any():
        missing = np.flatnonzero(table < 0).tolist()
        raise ValueError(f"No coarse label seen for fine classes {missing}.")
    return table
