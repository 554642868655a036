"""Capacities of MoNE's nested experts for a compute budget (numpy only).

Jain et al., "Mixture of Nested Experts: Adaptive Processing of Visual
Tokens", NeurIPS 2024 (arXiv 2407.19985), Sec. 3.3. Nested expert j
(j = 1..E, smallest first) uses the first d_j = D / 2^(E-j) features of every
weight matrix, so a token it processes costs a fraction w_j = 1 / 2^(E-j) of
the full model's linear-layer compute. Given a compute budget e_c (that
fraction averaged over the tokens), the capacities c_j (the share of tokens
each expert takes) solve

    maximise    sum_j c_j delta^(j-1)  -  beta sum_j c_j log c_j
    subject to  sum_j c_j = 1,  sum_j c_j w_j = e_c,  0 <= c_j <= 1.

The paper solves this with SLSQP. It is a strictly concave problem with two
linear equality constraints, so we solve its KKT conditions exactly: with
multipliers lambda (for sum c = 1) and mu (for the budget),

    c_j = exp((delta^(j-1) - lambda - mu w_j) / beta - 1),

which stays in (0, 1) by itself (the box constraint is never active inside
the feasible range). Eliminating lambda through sum c = 1 gives
c(mu) = softmax((delta^(j-1) - mu w_j) / beta), and the budget
g(mu) = sum_j c_j(mu) w_j is strictly decreasing in mu (g' = -Var_c(w) / beta),
so the one remaining equation g(mu) = e_c has a unique root, found by Newton's
method safeguarded by bisection, to machine precision. At the two ends of the
feasible range [1 / 2^(E-1), 1] the solution is degenerate (every token on the
smallest, resp. the largest, expert) and is returned exactly.
"""

import math

import numpy as np

from keras_mobile_moe.validation import check_int


def expert_cost_fractions(num_experts):
    """The compute fraction w_j = 1 / 2^(E-j) of each nested expert.

    Args:
        num_experts: int. Number of nested experts E.

    Returns:
        float64 array `[E]`, smallest expert first, the last one 1.

    Example:

    >>> expert_cost_fractions(4).tolist()
    [0.125, 0.25, 0.5, 1.0]
    """
    check_int("num_experts", num_experts, minimum=1)
    return 2.0 ** (np.arange(num_experts) - (num_experts - 1))


def check_positive(name, value):
    if isinstance(value, bool) or not isinstance(
        value, (int, float, np.number)
    ):
        raise ValueError(f"Received: {name}={value!r}. Expected a float > 0.")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"Received: {name}={value!r}. Expected a float > 0.")
    return float(value)


def check_capacity_budget(capacity_budget, num_experts):
    """Raises `ValueError` unless the budget is feasible for `num_experts`."""
    lowest = 1.0 / 2 ** (num_experts - 1)
    if (
        isinstance(capacity_budget, bool)
        or not isinstance(capacity_budget, (int, float, np.number))
        or not (lowest - 1e-12 <= capacity_budget <= 1.0 + 1e-12)
    ):
        raise ValueError(
            f"Received: capacity_budget={capacity_budget!r} with "
            f"num_experts={num_experts}. Expected a float in "
            f"[1/2^(num_experts-1), 1] = [{lowest}, 1.0]: the fraction of "
            "the full model's linear-layer compute, from every token on the "
            "smallest expert to every token on the full one."
        )
    return min(max(float(capacity_budget), lowest), 1.0)


def _softmax(logits):
    z = logits - np.max(logits)
    e = np.exp(z)
    return e / np.sum(e)


def capacity_distribution(capacity_budget, num_experts=4, beta=10.0, delta=2.0):
    """The share of tokens c_1..c_E of each nested expert for a budget.

    Jain et al., "Mixture of Nested Experts", NeurIPS 2024, Sec. 3.3: the
    capacities maximise `sum_j c_j delta^(j-1) - beta sum_j c_j log c_j`
    subject to `sum_j c_j = 1`, `sum_j c_j / 2^(E-j) = capacity_budget` and
    `0 <= c_j <= 1`. Solved exactly through its KKT conditions (see the
    module docstring), not with a general-purpose optimiser.

    Args:
        capacity_budget: float in `[1 / 2^(num_experts-1), 1]`. The compute
            budget e_c: the fraction of the full model's linear-layer
            compute to spend, averaged over the tokens.
        num_experts: int >= 1. Number of nested experts E.
        beta: float > 0. Weight of the entropy term (10 in the paper): larger
            values spread the tokens more evenly over the experts.
        delta: float > 0. Preference for bigger experts (2 in the paper).

    Returns:
        float64 array `[num_experts]`, smallest expert first, summing to 1,
        with `sum_j c_j / 2^(E-j) == capacity_budget` to ~1e-15.

    Example:

    >>> c = capacity_distribution(0.5)
    >>> [round(float(v), 4) for v in c]
    [0.2268, 0.2346, 0.2511, 0.2875]
    >>> round(float(c @ expert_cost_fractions(4)), 12)
    0.5
    """
    check_int("num_experts", num_experts, minimum=1)
    beta = check_positive("beta", beta)
    delta = check_positive("delta", delta)
    budget = check_capacity_budget(capacity_budget, num_experts)
    w = expert_cost_fractions(num_experts)
    capacities = np.zeros(num_experts)
    if num_experts == 1 or budget >= 1.0:
        capacities[-1] = 1.0
        return capacities
    if budget <= w[0]:
        capacities[0] = 1.0
        return capacities
    preference = delta ** np.arange(num_experts) / beta

    def budget_at(mu):
        c = _softmax(preference - mu * w / beta)
        spent = float(c @ w)
        return c, spent, float(c @ (w - spent) ** 2)

    # Bracket the root: g decreases from 1 (mu -> -inf) to w_1 (mu -> +inf).
    low, high = -1.0, 1.0
    while budget_at(low)[1] < budget:
        low *= 2.0
    while budget_at(high)[1] > budget:
        high *= 2.0
    mu = 0.0 if low < 0.0 < high else 0.5 * (low + high)
    for _ in range(200):
        c, spent, variance = budget_at(mu)
        error = spent - budget
        if error > 0:
            low = mu
        else:
            high = mu
        if abs(error) <= 1e-15:
            break
        slope = -variance / beta
        step = mu - error / slope if slope < 0 else None
        # Newton inside the bracket, bisection otherwise.
        mu = (
            step
            if step is not None and low < step < high
            else 0.5 * (low + high)
        )
        if high - low <= 1e-15 * max(1.0, abs(mu)):
            c = budget_at(mu)[0]
            break
    return c


def expert_token_counts(
    capacity_budget, num_tokens, num_experts=4, beta=10.0, delta=2.0
):
    """How many of an image's tokens each nested expert processes.

    Expert Preferred Routing gives expert j (for j = E down to 2)
    `floor(c_j * num_tokens)` tokens and the rest to the smallest expert, so
    the counts are static Python ints that sum to `num_tokens`.

    Args:
        capacity_budget: float. See `capacity_distribution`.
        num_tokens: int >= 1. Tokens per image N.
        num_experts: int. Number of nested experts E.
        beta: float. See `capacity_distribution`.
        delta: float. See `capacity_distribution`.

    Returns:
        A tuple of `num_experts` ints, smallest expert first.

    Example:

    >>> expert_token_counts(0.5, 49)
    (12, 11, 12, 14)
    >>> expert_token_counts(1.0, 49)
    (0, 0, 0, 49)
    """
    check_int("num_tokens", num_tokens, minimum=1)
    capacities = capacity_distribution(
        capacity_budget, num_experts, beta, delta
    )
    # A tiny slack so that c * N = 49 computed as 48.999... still gives 49.
    counts = [int(math.floor(c * num_tokens + 1e-9)) for c in capacities[1:]]
    return (num_tokens - sum(counts), *counts)
