"""Typed method options: one declaration per option.

A method declares each of its options once, as an `Option` (name, default,
check, one line of documentation). The same declaration validates the
arguments of `enable_adapter`, the per-layer config of an adapter file and of
a `.keras` file, and the arguments of an adapter layer built by hand; it
gives `get_config` its keys and the documentation its table.

Examples:

    >>> from keras_lowrank.options import Option, positive_int
    >>> rank = Option("rank", 8, positive_int, "adapter rank")
    >>> rank.check(4, "dense")
    4
    >>> rank.check(0, "dense")
    Traceback (most recent call last):
    ...
    ValueError: rank for 'dense' must be a positive int; received rank=0.
"""

import dataclasses
import math
import numbers
from typing import Any
from typing import Callable

import numpy as np


class Check:
    """A validator: `check(value)` returns the normalized value or raises
    `TypeError`/`ValueError` with a sentence saying what is expected."""

    def __init__(self, expected, fn):
        self.expected = expected
        self.fn = fn

    def __call__(self, value):
        return self.fn(value)

    def __repr__(self):
        return self.expected


def _is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v):
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def _positive_int(v):
    if not _is_int(v) or int(v) <= 0:
        raise ValueError
    return int(v)


def _nonneg_int_or_none(v):
    if v is None:
        return None
    if not _is_int(v) or int(v) < 0:
        raise ValueError
    return int(v)


def _nonneg_int(v):
    if not _is_int(v) or int(v) < 0:
        raise ValueError
    return int(v)


def _positive_int_or_none(v):
    return None if v is None else _positive_int(v)


def _unit_interval_open(v):
    if not _is_real(v) or not 0.0 <= float(v) < 1.0:
        raise ValueError
    return float(v)


def _nonneg_float(v):
    if not _is_real(v) or not math.isfinite(float(v)) or float(v) < 0:
        raise ValueError
    return float(v)


def _int_or_none(v):
    if v is None:
        return None
    if not _is_int(v):
        raise ValueError
    return int(v)


def _boolean(v):
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    raise ValueError


def _positive_float_or_none(v):
    if v is None:
        return None
    if not _is_real(v) or not math.isfinite(float(v)) or float(v) <= 0:
        raise ValueError
    return float(v)


def _positive_float(v):
    if not _is_real(v) or not math.isfinite(float(v)) or float(v) <= 0:
        raise ValueError
    return float(v)


def _rate(v):
    if not _is_real(v) or not (0.0 <= float(v) < 1.0):
        raise ValueError
    return float(v)


positive_int = Check("a positive int", _positive_int)
nonneg_int_or_none = Check("None or an int >= 0", _nonneg_int_or_none)
nonneg_int = Check("an int >= 0", _nonneg_int)
positive_int_or_none = Check("None or a positive int", _positive_int_or_none)
beta = Check("a float in [0, 1)", _unit_interval_open)
nonneg_float = Check("a finite float >= 0", _nonneg_float)
seed = Check("None or an int", _int_or_none)
boolean = Check("True or False", _boolean)
positive_float = Check("a finite float > 0", _positive_float)
positive_float_or_none = Check("None or a finite float > 0", _positive_float_or_none)
rate = Check("a float in [0, 1)", _rate)


def choice(*allowed):
    def fn(v):
        if isinstance(v, str) and v in allowed:
            return v
        raise ValueError

    return Check(f"one of {allowed}", fn)


def _finite_float(v):
    if not _is_real(v) or not math.isfinite(float(v)):
        raise ValueError
    return float(v)


finite_float = Check("a finite float", _finite_float)


def float_at_least(low):
    def fn(v):
        if not _is_real(v) or not math.isfinite(float(v)) or float(v) < low:
            raise ValueError
        return float(v)

    return Check(f"a finite float >= {low}", fn)


@dataclasses.dataclass(frozen=True)
class Option:
    """One option of a method: its name, default, check and documentation."""

    name: str
    default: Any
    check_fn: Callable
    doc: str = ""

    def check(self, value, where):
        try:
            return self.check_fn(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(
                f"{self.name} for {where!r} must be {self.check_fn!r}; "
                f"received {self.name}={value!r}."
            ) from None


#: PEFT's `LoraConfig` names and what keras-lowrank calls them (an option of
#: the method, or an argument of `enable_adapter`)
PEFT_NAMES = {
    "r": "rank",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "target_modules": "targets",
    "exclude_modules": "exclude",
    "modules_to_save": "trainable_layers",
    "use_rslora": "rslora",
}


def peft_hint(name):
    """`"'r' is PEFT's name; keras-lowrank calls it 'rank'"`, or `""` for a
    name that is not one of PEFT's.

    Examples:

        >>> from keras_lowrank.options import peft_hint
        >>> peft_hint("lora_alpha")
        "'lora_alpha' is PEFT's name; keras-lowrank calls it 'alpha'"
    """
    ours = PEFT_NAMES.get(name) if isinstance(name, str) else None
    return f"{name!r} is PEFT's name; keras-lowrank calls it {ours!r}" if ours else ""


def validate(declared, values, where, method=None):
    """Check `values` (a dict) against the `Option`s in `declared` and fill
    in the defaults. Unknown keys are an error that lists the valid ones
    (and says which of ours a PEFT name is)."""
    by_name = {o.name: o for o in declared}
    if not isinstance(values, dict):
        raise ValueError(f"The options for {where!r} must be a dict; received {values!r}.")
    unknown = sorted(set(values) - set(by_name), key=str)
    if unknown:
        label = f"method {method!r}" if method else "this adapter"
        hints = [h for h in map(peft_hint, unknown) if h]
        if hints:  # PEFT's names: say which of ours each one is
            raise ValueError(
                f"Unknown option(s) {unknown} for {label} ({where}): {'. '.join(hints)}. "
                f"Valid options: {sorted(by_name)}."
            )
        raise ValueError(
            f"Unknown option(s) {unknown} for {label} ({where}); valid "
            f"options: {sorted(by_name)}."
        )
    out = {}
    for o in declared:
        out[o.name] = o.check(values[o.name], where) if o.name in values else o.default
    return out

