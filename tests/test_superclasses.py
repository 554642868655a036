"""Super-class discovery from confusion matrices, and the clustering scores.

Pure numpy: the results are the same on every backend.
"""

import itertools

import numpy as np
import pytest

import keras_mobile_moe as kmm
from keras_mobile_moe.superclasses import adjusted_rand_index
from keras_mobile_moe.superclasses import balanced_assignment
from keras_mobile_moe.superclasses import purity
from keras_mobile_moe.superclasses import superclasses_from_confusion

# Pure numpy (see above): the same on every backend.
pytestmark = pytest.mark.backend_independent


def planted_confusion(groups, within=20.0, noise=1.0, diagonal=100.0, seed=0):
    """A confusion matrix whose mistakes stay mostly inside `groups`."""
    rng = np.random.default_rng(seed)
    groups = np.asarray(groups)
    same = groups[:, None] == groups[None, :]
    confusion = rng.uniform(0.0, noise, same.shape) + within * same
    return confusion + diagonal * np.eye(len(groups))


def sampled_confusion(
    groups, images_per_class=100, accuracy=0.6, within_share=0.7, seed=0
):
    """Counts from a simulated classifier: of its mistakes on a class,
    `within_share` go to the other classes of its group, the rest anywhere."""
    rng = np.random.default_rng(seed)
    groups = np.asarray(groups)
    n = len(groups)
    confusion = np.zeros((n, n), np.int64)
    for i in range(n):
        mates = (groups == groups[i]) & (np.arange(n) != i)
        others = np.arange(n) != i
        p = (1 - accuracy) * (
            within_share * mates / mates.sum()
            + (1 - within_share) * others / others.sum()
        )
        p[i] = accuracy
        confusion[i] = rng.multinomial(images_per_class, p / p.sum())
    return confusion


def test_recovers_planted_blocks_exactly():
    rng = np.random.default_rng(3)
    truth = rng.permutation(np.repeat(np.arange(4), 5))  # 20 classes
    labels = superclasses_from_confusion(planted_confusion(truth), 4)
    assert labels.dtype == np.int64 and labels.shape == (20,)
    assert adjusted_rand_index(labels, truth) == 1.0
    # Canonical numbering: group ids appear in order of first occurrence.
    first = [int(np.argmax(labels == g)) for g in range(4)]
    assert first == sorted(first) and labels[0] == 0


@pytest.mark.parametrize(
    "num_classes,k",
    [(20, 4), (23, 4), (10, 3), (7, 7), (9, 1), (100, 20), (100, 10)],
)
def test_balanced_and_no_empty_group(num_classes, k):
    rng = np.random.default_rng(num_classes + k)
    confusion = rng.uniform(0.0, 1.0, (num_classes, num_classes))
    labels = superclasses_from_confusion(confusion, k)
    sizes = np.bincount(labels, minlength=k)
    assert labels.min() == 0 and labels.max() == k - 1
    assert sizes.min() == num_classes // k
    assert sizes.max() == -(-num_classes // k)


def test_unbalanced_never_empty():
    # Identical rows collapse in the embedding: k-means must still fill
    # every group.
    for confusion in (np.zeros((10, 10)), np.eye(10), np.ones((6, 6))):
        labels = superclasses_from_confusion(confusion, 3, balanced=False)
        assert sorted(set(labels.tolist())) == [0, 1, 2]


def test_unbalanced_follows_unequal_blocks():
    truth = np.array([0] * 8 + [1] * 3 + [2] * 5)
    labels = superclasses_from_confusion(
        planted_confusion(truth), 3, balanced=False
    )
    assert adjusted_rand_index(labels, truth) == 1.0
    balanced = superclasses_from_confusion(planted_confusion(truth), 3)
    assert sorted(np.bincount(balanced).tolist()) == [5, 5, 6]


def test_deterministic_and_relabelling_invariant():
    truth = np.repeat(np.arange(5), 4)
    confusion = sampled_confusion(truth, seed=1)
    first = superclasses_from_confusion(confusion, 5)
    for _ in range(3):
        np.testing.assert_array_equal(
            superclasses_from_confusion(confusion.copy(), 5), first
        )
    # Permuting the classes permutes the answer (same partition).
    perm = np.random.default_rng(0).permutation(20)
    permuted = superclasses_from_confusion(confusion[perm][:, perm], 5)
    assert adjusted_rand_index(permuted, first[perm]) == 1.0


def test_only_mistakes_matter():
    truth = np.repeat(np.arange(3), 4)
    confusion = planted_confusion(truth)
    scaled = confusion * 7.0 + np.diag(np.arange(12) * 50.0)
    np.testing.assert_array_equal(
        superclasses_from_confusion(confusion, 3),
        superclasses_from_confusion(scaled, 3),
    )


def test_cifar100_coarse_labels_recovered():
    """Real label structure: CIFAR-100's 100 classes in 20 super-classes
    (from the committed fixture), with a simulated classifier's confusion."""
    data = kmm.datasets.cifar100.load_fixture()
    coarse = kmm.datasets.cifar100.fine_to_coarse(
        data["y_train"], data["y_train_coarse"]
    )
    assert coarse.shape == (100,)
    confusion = sampled_confusion(
        coarse, images_per_class=100, accuracy=0.5, within_share=0.3, seed=0
    )
    labels = kmm.superclasses_from_confusion(confusion, 20)
    assert np.all(np.bincount(labels) == 5)
    assert adjusted_rand_index(labels, coarse) > 0.9
    assert purity(labels, coarse) > 0.9


@pytest.mark.parametrize(
    "confusion,match",
    [
        (np.ones((3, 4)), "square"),
        (np.ones(5), "square"),
        (np.ones((2, 2, 2)), "square"),
        (np.zeros((0, 0)), "square"),
        (np.array([[1.0, -1.0], [0.0, 1.0]]), "negative"),
        (np.array([[1.0, np.nan], [0.0, 1.0]]), "finite"),
        (np.array([[1.0, np.inf], [0.0, 1.0]]), "finite"),
        ([["a", "b"], ["c", "d"]], "confusion="),
    ],
)
def test_bad_confusion(confusion, match):
    with pytest.raises(ValueError, match=match):
        superclasses_from_confusion(confusion, 1)


@pytest.mark.parametrize("k", [0, 6, -1, 2.0, True, "2", None])
def test_bad_num_superclasses(k):
    with pytest.raises(ValueError, match=r"num_superclasses=.*Expected an int"):
        superclasses_from_confusion(np.ones((5, 5)), k)


def test_bad_balanced_and_seed():
    with pytest.raises(ValueError, match="balanced='yes'"):
        superclasses_from_confusion(np.ones((5, 5)), 2, balanced="yes")
    with pytest.raises(ValueError, match="seed=-1"):
        superclasses_from_confusion(np.ones((5, 5)), 2, seed=-1)


def test_adjusted_rand_index_known_values():
    assert adjusted_rand_index([0, 1, 1, 2], [0, 1, 1, 2]) == 1.0
    assert adjusted_rand_index([0, 0, 1, 1], [1, 1, 0, 0]) == 1.0
    # By hand: contingency [[2, 1, 0], [0, 1, 2]]; sum C(n_ij, 2) = 2,
    # rows C(3,2) + C(3,2) = 6, columns 3 * C(2,2) = 3, C(6,2) = 15:
    # expected 6 * 3 / 15 = 1.2, max (6 + 3) / 2 = 4.5,
    # ARI = (2 - 1.2) / (4.5 - 1.2) = 8 / 33.
    assert adjusted_rand_index(
        [0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]
    ) == pytest.approx(8 / 33, abs=1e-12)
    # Worse than chance: contingency [[1, 1], [1, 1]]; sum C = 0, rows 2,
    # columns 2, C(4,2) = 6: expected 2/3, max 2, ARI = -(2/3) / (4/3).
    assert adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(
        -0.5, abs=1e-12
    )
    # Trivial partitions that agree.
    assert adjusted_rand_index([3, 3, 3], [1, 1, 1]) == 1.0
    assert adjusted_rand_index([0, 1, 2], [2, 0, 1]) == 1.0
    # Symmetric.
    a, b = [0, 0, 1, 2, 2, 2, 1], [1, 0, 1, 2, 2, 0, 1]
    assert adjusted_rand_index(a, b) == pytest.approx(adjusted_rand_index(b, a))


def test_purity_known_values():
    assert purity([0, 0, 1, 1], [5, 5, 6, 6]) == 1.0
    assert purity([0, 0, 0, 0], [1, 1, 2, 3]) == 0.5
    assert purity([0, 1, 2, 3], [1, 1, 2, 3]) == 1.0


@pytest.mark.parametrize(
    "a,b,match",
    [
        ([0, 1], [0, 1, 2], "same length"),
        ([], [], "non-empty"),
        ([[0, 1]], [[0, 1]], "1-D"),
        ([0.5, 1.0], [0, 1], "int labels"),
    ],
)
def test_bad_labels(a, b, match):
    with pytest.raises(ValueError, match=match):
        adjusted_rand_index(a, b)
    with pytest.raises(ValueError, match=match):
        purity(a, b)


def test_balanced_assignment_is_optimal():
    rng = np.random.default_rng(0)
    for n, k in [(5, 2), (6, 3), (7, 3), (4, 4)]:
        cost = rng.normal(size=(n, k))
        groups = balanced_assignment(cost)
        low = n // k
        best = min(
            cost[np.arange(n), list(choice)].sum()
            for choice in itertools.product(range(k), repeat=n)
            if np.bincount(choice, minlength=k).min() >= low
            and np.bincount(choice, minlength=k).max() <= -(-n // k)
        )
        assert np.bincount(groups, minlength=k).min() == low
        assert cost[np.arange(n), groups].sum() == pytest.approx(best)
    with pytest.raises(ValueError, match="num_groups <= num_items"):
        balanced_assignment(np.zeros((2, 3)))
