"""Argument checks of the public functions, written once.

Every refusal names the function, the argument and the value received,
`"<function>: <argument> must be ...; received <argument>=<value>."`: a
`TypeError` for a value of the wrong kind (a string, a bool, `None` where a
number is needed, `2.5` where an int is), a `ValueError` for a number that
is not finite or out of range. A public function runs them before it
changes anything.

Examples:

    >>> from keras_lowrank import arguments
    >>> arguments.number("cem_search", "generations", 3, 1, None, integer=True)
    3
    >>> arguments.number("cem_search", "generations", -1, 1, None, integer=True)
    Traceback (most recent call last):
    ...
    ValueError: cem_search: generations must be an int >= 1; received generations=-1.
"""

import math
import numbers
import os

import numpy as np


def _is_bool(value):
    return isinstance(value, (bool, np.bool_))


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not _is_bool(value)


def _is_real(value):
    return isinstance(value, numbers.Real) and not _is_bool(value)


def _bound(x):
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e6:
        x = int(x)
    return f"{x:g}" if isinstance(x, float) else str(x)


def _range_text(low, high, low_open, high_open):
    if low is not None and high is not None:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        return f"in {left}{_bound(low)}, {_bound(high)}{right}"
    if low is not None:
        return f"{'>' if low_open else '>='} {_bound(low)}"
    if high is not None:
        return f"{'<' if high_open else '<='} {_bound(high)}"
    return ""


def number(where, name, value, low=None, high=None, low_open=False, high_open=False,
           integer=False, none=False):
    """`value` checked and normalized (an `int` or a finite `float`).

    Args:
        where: the public function, named in the message.
        name: the argument's name.
        low, high: the bounds (`None`: unbounded); `low_open`/`high_open`
            exclude them.
        integer: an int (Python or NumPy; not a bool, not `2.0`).
        none: `None` is accepted (and returned).
    """
    if value is None and none:
        return None
    kind = "an int" if integer else "a finite number"
    text = " ".join(p for p in (kind, _range_text(low, high, low_open, high_open)) if p)
    if none:
        text = f"None or {text}"
    message = f"{where}: {name} must be {text}; received {name}={value!r}."
    if not (_is_int(value) if integer else _is_real(value)):
        raise TypeError(message)
    value = int(value) if integer else float(value)
    if not integer and not math.isfinite(value):
        raise ValueError(message)
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(message)
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(message)
    return value


def flag(where, name, value):
    """`value` as a bool (`True`/`False` only)."""
    if not _is_bool(value):
        raise TypeError(f"{where}: {name} must be True or False; received {name}={value!r}.")
    return bool(value)


def choice(where, name, value, allowed):
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{where}: {name} must be one of {tuple(allowed)}; received {name}={value!r}.")
    return value


def function(where, name, value, none=False):
    if value is None and none:
        return None
    if not callable(value):
        text = "None or a callable" if none else "a callable"
        raise TypeError(f"{where}: {name} must be {text}; received {name}={value!r}.")
    return value


def path(where, name, value, suffixes=(), none=False):
    """`value` as a `str` path (from a `str` or an `os.PathLike`), ending in
    one of `suffixes` when given; `None` when `none` allows it."""
    if value is None and none:
        return None
    text = "a path (str or os.PathLike)"
    if suffixes:
        text = f"a path ending in {' or '.join(suffixes)}"
    if none:
        text = f"None or {text}"
    try:
        value_ = os.fspath(value)
    except TypeError:
        value_ = None
    if not isinstance(value_, str):
        raise TypeError(f"{where}: {name} must be {text}; received {name}={value!r}.")
    if suffixes and not value_.endswith(tuple(suffixes)):
        raise ValueError(f"{where}: {name} must be {text}; received {name}={value!r}.")
    return value_


def check(where, name, value, check_):
    """`value` checked with an `options.Check` (the checks method options
    use): the normalized value, or a `ValueError` in the same words as
    the other checks here.

    Examples:

        >>> from keras_lowrank import arguments, options
        >>> arguments.check("set_active", "trainable", 1, options.boolean)
        Traceback (most recent call last):
        ...
        ValueError: set_active: trainable must be True or False; received trainable=1.
    """
    try:
        return check_(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{where}: {name} must be {check_!r}; received {name}={value!r}.") from None
