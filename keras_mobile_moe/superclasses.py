"""Super-classes discovered from a confusion matrix (numpy only).

Daxberger et al., "Mobile V-MoEs", arXiv 2309.04354, Sec. 3: when a dataset
has no semantic super-classes, the router's targets are found by clustering
the classes that a trained dense model confuses with one another, in the
spirit of Jin et al., "Confusion Graph: Detecting Confusion Communities in
Large Scale Image Classification", IJCAI 2017. The steps here:

1. Confusion graph: drop the diagonal, normalise every row to sum 1 (the
   distribution of the mistakes made on that class) and symmetrise,
   `A = (P + P^T) / 2`. A tiny uniform affinity keeps the graph connected.
2. Spectral embedding (Ng, Jordan and Weiss 2001): the eigenvectors of the
   `num_superclasses` smallest eigenvalues of the normalised Laplacian
   `I - D^-1/2 A D^-1/2`, each row scaled to unit length.
3. k-means in the embedding (k-means++ starts from `seed`, best of several),
   then, with `balanced=True`, balanced k-means: every assignment step is an
   exact min-cost assignment (Hungarian algorithm) of the classes to
   `num_superclasses` groups of `floor` or `ceil(num_classes /
   num_superclasses)` classes, so that every expert gets the same share of
   classes, and so roughly of images.

No group is ever empty, the result depends only on the input and `seed`,
and groups are numbered in the order of their smallest class id.

`adjusted_rand_index` and `purity` compare a clustering with a reference
(e.g. CIFAR-100's 20 coarse labels).
"""

import numpy as np

from keras_mobile_moe.validation import check_int

_KMEANS_RESTARTS = 10
_KMEANS_ITERATIONS = 100


def superclasses_from_confusion(
    confusion, num_superclasses, balanced=True, seed=0
):
    """Groups classes into super-classes of mutually confused classes.

    Daxberger et al., "Mobile V-MoEs", arXiv 2309.04354, Sec. 3 (spectral
    clustering of the confusion graph, after Jin et al. 2017). See the module
    docstring for the steps.

    Args:
        confusion: array-like `[num_classes, num_classes]` of finite,
            non-negative numbers: `confusion[i, j]` counts (or weighs) the
            images of class `i` predicted as class `j`, e.g. on a validation
            set. Only the off-diagonal entries matter; a row without
            mistakes is fine.
        num_superclasses: int in [1, num_classes]. Number of groups (the
            number of experts in Mobile V-MoE).
        balanced: bool. If True, every group gets `floor` or
            `ceil(num_classes / num_superclasses)` classes; if False, groups
            are plain k-means clusters (never empty).
        seed: int >= 0. Seed of the k-means++ starts.

    Returns:
        int64 numpy array `[num_classes]`: the super-class of every class, in
        `[0, num_superclasses)`, groups numbered by their smallest class id.

    Example:

    >>> import numpy as np
    >>> confusion = np.array([
    ...     [50, 9, 1, 0],
    ...     [8, 50, 0, 1],
    ...     [0, 1, 50, 7],
    ...     [1, 0, 9, 50]])
    >>> superclasses_from_confusion(confusion, 2).tolist()
    [0, 0, 1, 1]
    """
    confusion = _check_confusion(confusion)
    num_classes = confusion.shape[0]
    check_int(
        "num_superclasses", num_superclasses, minimum=1, maximum=num_classes
    )
    if not isinstance(balanced, (bool, np.bool_)):
        raise ValueError(
            f"Received: balanced={balanced!r}. Expected True or False."
        )
    check_int("seed", seed, minimum=0)
    k = num_superclasses
    if k == 1:
        return np.zeros(num_classes, np.int64)
    if k == num_classes:
        return np.arange(num_classes, dtype=np.int64)

    embedding = spectral_embedding(confusion, k)
    rng = np.random.default_rng(seed)
    labels, centroids = _kmeans(embedding, k, rng)
    if balanced:
        labels = _balanced_kmeans(embedding, centroids)
    return _canonical(labels)


def spectral_embedding(confusion, num_components):
    """The Ng-Jordan-Weiss spectral embedding of the confusion graph.

    Args:
        confusion: array-like `[num_classes, num_classes]`, finite and
            non-negative (see `superclasses_from_confusion`).
        num_components: int in [1, num_classes]. Eigenvectors kept.

    Returns:
        float64 array `[num_classes, num_components]` with unit rows.

    Example:

    >>> import numpy as np
    >>> embedding = spectral_embedding(np.ones((5, 5)), 2)
    >>> embedding.shape, bool(np.allclose(np.linalg.norm(embedding, axis=1), 1))
    ((5, 2), True)
    """
    confusion = _check_confusion(confusion)
    n = confusion.shape[0]
    check_int("num_components", num_components, minimum=1, maximum=n)
    affinity = confusion_affinity(confusion)
    degree = affinity.sum(axis=1)
    scale = 1.0 / np.sqrt(degree)
    laplacian = np.eye(n) - scale[:, None] * affinity * scale[None, :]
    laplacian = (laplacian + laplacian.T) / 2.0
    _, vectors = np.linalg.eigh(laplacian)  # ascending eigenvalues
    embedding = vectors[:, :num_components]
    norms = np.linalg.norm(embedding, axis=1, keepdims=True)
    return embedding / np.maximum(norms, 1e-12)


def confusion_affinity(confusion):
    """The symmetric affinity `(P + P^T) / 2` of the confusion graph.

    `P` is the confusion matrix without its diagonal, each row normalised to
    sum 1 (rows without mistakes stay 0). A uniform affinity of `1e-6` times
    the mean off-diagonal affinity (or `1e-6` when there is none) is added
    off the diagonal so that the graph is connected and every degree > 0.

    Args:
        confusion: array-like `[num_classes, num_classes]`, finite and
            non-negative.

    Returns:
        float64 symmetric array `[num_classes, num_classes]`, zero diagonal.

    Example:

    >>> import numpy as np
    >>> confusion_affinity([[9, 1, 0], [0, 9, 0], [2, 2, 9]]).round(3).tolist()
    [[0.0, 0.5, 0.25], [0.5, 0.0, 0.25], [0.25, 0.25, 0.0]]
    """
    confusion = _check_confusion(confusion)
    n = confusion.shape[0]
    off_diagonal = confusion * (1.0 - np.eye(n))
    totals = off_diagonal.sum(axis=1, keepdims=True)
    rows = np.divide(
        off_diagonal, totals, out=np.zeros_like(off_diagonal), where=totals > 0
    )
    affinity = (rows + rows.T) / 2.0
    if n > 1:
        mean = affinity.sum() / (n * (n - 1))
        floor = 1e-6 * (mean if mean > 0 else 1.0)
        affinity = affinity + floor * (1.0 - np.eye(n))
    return affinity


def adjusted_rand_index(labels_a, labels_b):
    """Adjusted Rand index of two clusterings (Hubert and Arabie 1985).

    1 for identical partitions (whatever the label names), about 0 for
    independent ones, negative when worse than chance. When both partitions
    are trivial in the same way (everything together, or everything apart)
    the index is 1.

    Args:
        labels_a: 1-D array-like of ints, a cluster id per item.
        labels_b: 1-D array-like of ints, same length.

    Returns:
        float.

    Example:

    >>> adjusted_rand_index([0, 0, 1, 1], [5, 5, 3, 3])
    1.0
    >>> round(adjusted_rand_index([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]), 6)
    0.242424
    """
    labels_a, labels_b = _check_label_pair(
        "labels_a", labels_a, "labels_b", labels_b
    )
    table = _contingency(labels_a, labels_b)
    n = labels_a.size

    def pairs(counts):
        counts = counts.astype(np.float64)
        return float(np.sum(counts * (counts - 1.0) / 2.0))

    together = pairs(table)
    pairs_a = pairs(table.sum(axis=1))
    pairs_b = pairs(table.sum(axis=0))
    total = n * (n - 1) / 2.0
    expected = pairs_a * pairs_b / total if total > 0 else 0.0
    maximum = (pairs_a + pairs_b) / 2.0
    if maximum == expected:
        return 1.0
    return float((together - expected) / (maximum - expected))


def purity(predicted, truth):
    """Share of items whose cluster's majority reference label is theirs.

    Args:
        predicted: 1-D array-like of ints, a cluster id per item.
        truth: 1-D array-like of ints, the reference label per item.

    Returns:
        float in (0, 1]; 1 when every cluster holds a single reference label.

    Example:

    >>> purity([0, 0, 0, 1, 1], [7, 7, 8, 8, 8])
    0.8
    """
    predicted, truth = _check_label_pair("predicted", predicted, "truth", truth)
    table = _contingency(predicted, truth)
    return float(table.max(axis=1).sum() / predicted.size)


def _check_confusion(confusion):
    try:
        array = np.asarray(confusion, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(
            f"Received: confusion={confusion!r}. Expected a square 2-D "
            "array of finite, non-negative numbers."
        ) from None
    if array.ndim != 2 or array.shape[0] != array.shape[1] or array.size == 0:
        raise ValueError(
            f"Received: confusion of shape {array.shape}. Expected a square "
            "2-D array [num_classes, num_classes] with num_classes >= 1."
        )
    if not np.all(np.isfinite(array)):
        raise ValueError(
            "Received: confusion with NaN or infinite entries. Expected "
            "finite, non-negative numbers."
        )
    if np.any(array < 0):
        raise ValueError(
            f"Received: confusion with a negative entry ({array.min()}). "
            "Expected finite, non-negative numbers (counts or weights)."
        )
    return array


def _check_labels(name, labels):
    array = np.asarray(labels)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(
            f"Received: {name} of shape {array.shape}. Expected a non-empty "
            "1-D array of int labels."
        )
    if not np.issubdtype(array.dtype, np.integer):
        if not (
            np.issubdtype(array.dtype, np.floating)
            and np.all(np.isfinite(array))
            and np.all(array == np.round(array))
        ):
            raise ValueError(
                f"Received: {name} of dtype {array.dtype}. Expected int labels."
            )
    return array.astype(np.int64)


def _check_label_pair(name_a, labels_a, name_b, labels_b):
    labels_a = _check_labels(name_a, labels_a)
    labels_b = _check_labels(name_b, labels_b)
    if labels_a.size != labels_b.size:
        raise ValueError(
            f"Received: {name_a} of length {labels_a.size} and {name_b} of "
            f"length {labels_b.size}. Expected the same length."
        )
    return labels_a, labels_b


def _contingency(labels_a, labels_b):
    _, rows = np.unique(labels_a, return_inverse=True)
    _, cols = np.unique(labels_b, return_inverse=True)
    table = np.zeros((rows.max() + 1, cols.max() + 1), np.int64)
    np.add.at(table, (rows, cols), 1)
    return table


def _canonical(labels):
    """Renumbers groups by their smallest member."""
    order = {}
    for label in labels.tolist():
        if label not in order:
            order[label] = len(order)
    return np.array([order[label] for label in labels.tolist()], np.int64)


def _squared_distances(points, centroids):
    return (
        np.sum(points**2, axis=1)[:, None]
        - 2.0 * points @ centroids.T
        + np.sum(centroids**2, axis=1)[None, :]
    ).clip(min=0.0)


def _kmeans_plus_plus(points, k, rng):
    n = points.shape[0]
    chosen = [int(rng.integers(n))]
    closest = _squared_distances(points, points[chosen])[:, 0]
    for _ in range(1, k):
        total = closest.sum()
        if total <= 0:
            # Every point sits on a centre: take the first unchosen point.
            index = next(i for i in range(n) if i not in chosen)
        else:
            index = int(rng.choice(n, p=closest / total))
        chosen.append(index)
        closest = np.minimum(
            closest, _squared_distances(points, points[[index]])[:, 0]
        )
    return points[chosen].copy()


def _fill_empty(points, labels, centroids, k):
    """Moves the worst-fitting points of crowded clusters to empty ones."""
    labels = labels.copy()
    for cluster in range(k):
        if np.any(labels == cluster):
            continue
        counts = np.bincount(labels, minlength=k)
        distances = _squared_distances(points, centroids)[
            np.arange(len(points)), labels
        ]
        distances[counts[labels] <= 1] = -1.0  # never empty another cluster
        index = int(np.argmax(distances))
        labels[index] = cluster
        centroids[cluster] = points[index]
    return labels


def _kmeans(points, k, rng):
    """Best of several k-means++ runs; never leaves a cluster empty."""
    best = None
    for _ in range(_KMEANS_RESTARTS):
        centroids = _kmeans_plus_plus(points, k, rng)
        labels = None
        for _ in range(_KMEANS_ITERATIONS):
            new = np.argmin(_squared_distances(points, centroids), axis=1)
            new = _fill_empty(points, new, centroids, k)
            if labels is not None and np.array_equal(new, labels):
                break
            labels = new
            centroids = np.stack(
                [points[labels == c].mean(axis=0) for c in range(k)]
            )
        inertia = _squared_distances(points, centroids)[
            np.arange(len(points)), labels
        ].sum()
        if best is None or inertia < best[0] - 1e-12:
            best = (inertia, labels, centroids)
    return best[1], best[2]


def _balanced_kmeans(points, centroids):
    """Lloyd iterations whose assignment step is a balanced min-cost one."""
    k = centroids.shape[0]
    labels = None
    for _ in range(_KMEANS_ITERATIONS):
        new = balanced_assignment(_squared_distances(points, centroids))
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        centroids = np.stack(
            [points[labels == c].mean(axis=0) for c in range(k)]
        )
    return labels


def balanced_assignment(cost):
    """Exact min-cost assignment of items to equally sized groups.

    Every group gets `floor` or `ceil(num_items / num_groups)` items. Solved
    exactly with the Hungarian algorithm on `ceil(num_items / num_groups)`
    slots per group, the first `floor(...)` of which carry a large bonus so
    that they are always filled.

    Args:
        cost: array-like `[num_items, num_groups]` of finite numbers, with
            `num_groups <= num_items`: the cost of putting item i in group j.

    Returns:
        int64 array `[num_items]`: the group of every item.

    Example:

    >>> balanced_assignment([[0.0, 1.0], [0.0, 2.0], [0.0, 3.0]]).tolist()
    [1, 0, 0]
    """
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2 or not 1 <= cost.shape[1] <= cost.shape[0]:
        raise ValueError(
            f"Received: cost of shape {cost.shape}. Expected [num_items, "
            "num_groups] with 1 <= num_groups <= num_items."
        )
    if not np.all(np.isfinite(cost)):
        raise ValueError("Received: cost with NaN or infinite entries.")
    n, k = cost.shape
    low, extra = divmod(n, k)
    slots_per_group = low + (extra > 0)
    # Columns: slot s of group g is column g * slots_per_group + s.
    bonus = (np.abs(cost).max() + 1.0) * (n + 1)
    slot_costs = np.repeat(cost, slots_per_group, axis=1)
    mandatory = np.tile(np.arange(slots_per_group) < low, k)
    slot_costs = slot_costs - bonus * mandatory[None, :]
    columns = _hungarian(slot_costs)
    return (columns // slots_per_group).astype(np.int64)


def _hungarian(cost):
    """Min-cost assignment of every row to a distinct column (rows <= cols).

    The shortest-augmenting-path Hungarian algorithm with potentials,
    O(rows^2 * cols), deterministic (ties go to the lowest column).
    """
    n, m = cost.shape
    infinity = np.inf
    u = np.zeros(n + 1)
    v = np.zeros(m + 1)
    match = np.zeros(m + 1, np.int64)  # match[j]: row (1-based) of column j
    way = np.zeros(m + 1, np.int64)
    padded = np.zeros((n + 1, m + 1))
    padded[1:, 1:] = cost
    for row in range(1, n + 1):
        match[0] = row
        column = 0
        min_slack = np.full(m + 1, infinity)
        used = np.zeros(m + 1, bool)
        while True:
            used[column] = True
            current = match[column]
            slack = padded[current, 1:] - u[current] - v[1:]
            free = ~used[1:]
            better = free & (slack < min_slack[1:])
            min_slack[1:][better] = slack[better]
            way[1:][better] = column
            candidates = np.where(free, min_slack[1:], infinity)
            nxt = int(np.argmin(candidates)) + 1
            delta = candidates[nxt - 1]
            used_columns = np.nonzero(used)[0]
            u[match[used_columns]] += delta
            v[used_columns] -= delta
            min_slack[1:][free] -= delta
            column = nxt
            if match[column] == 0:
                break
        while column:
            previous = way[column]
            match[column] = match[previous]
            column = previous
    assignment = np.zeros(n, np.int64)
    for j in range(1, m + 1):
        if match[j]:
            assignment[match[j] - 1] = j - 1
    return assignment
