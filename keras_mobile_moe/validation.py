"""Argument checks shared by the public layers and models.

Every message names the argument, the value received and what is accepted.
"""


def check_int(name, value, minimum=None, maximum=None):
    """Raises `ValueError` unless `value` is an int in [minimum, maximum]."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    too_small = is_int and minimum is not None and value < minimum
    too_big = is_int and maximum is not None and value > maximum
    if not is_int or too_small or too_big:
        bounds = []
        if minimum is not None:
            bounds.append(f">= {minimum}")
        if maximum is not None:
            bounds.append(f"<= {maximum}")
        accepted = "an int" + (" " + " and ".join(bounds) if bounds else "")
        raise ValueError(f"Received: {name}={value!r}. Expected {accepted}.")
    return value


def check_rate(name, value):
    """Raises `ValueError` unless `value` is a float in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"Received: {name}={value!r}. Expected a float in [0, 1)."
        )
    if not 0.0 <= value < 1.0:
        raise ValueError(
            f"Received: {name}={value!r}. Expected a float in [0, 1)."
        )
    return float(value)


def check_choice(name, value, choices):
    """Raises `ValueError` unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(
            f"Received: {name}={value!r}. Expected one of {list(choices)}."
        )
    return value
