"""CIFAR-100 with its 20 super-classes (Krizhevsky 2009).

`load_fixture()` returns the 1,000-image cut shipped with the package (8 train
and 2 test images per fine class, taken from the full archive by
`scripts/make_cifar100_fixture.py`), for tests, docs and demos offline.
"""

import importlib.resources

import numpy as np

FIXTURE = "cifar100_fixture.npz"


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
        with np.load(file, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}


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
