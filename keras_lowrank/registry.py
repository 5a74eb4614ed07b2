"""The method registry: method name -> layer class, options and promises.

Every method declares here what the shared machinery and the test suite need
to know: its options with their defaults, whether it starts as a no-op and how
exactly, whether it merges and unmerges, and its trainable-parameter formula.
The adapter-contract suite is parametrized over this registry, so a method is
tested the day it is registered.
"""

import dataclasses
from typing import Callable

from keras_lowrank import methods as _m
from keras_lowrank import options as opt


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    name: str
    layer_class: type
    summary: str
    #: "exact", "roundoff" (float32 round-off), or "no"
    noop_at_init: str
    mergeable: bool
    unmergeable: bool
    #: rank must be <= min(n_in, n_out)
    rank_bounded: bool
    #: trainable parameters of one layer: f(n_in, n_out, n_batch, rank, options)
    trainable_count: Callable
    #: frozen-base storages the method composes with
    bases: tuple = ("float", "nf4", "int8", "int4")
    status: str = "stable"

    @property
    def options(self):
        """The method's `Option` declarations."""
        return self.layer_class.OPTIONS

    @property
    def defaults(self):
        return {o.name: o.default for o in self.options}

    def validate_options(self, options, where="enable_adapter"):
        """Check and complete `options` (unknown names, types and values)."""
        return opt.validate(self.options, options, where, self.name)


_REGISTRY = {}


def register(spec):
    if spec.name in _REGISTRY:
        raise ValueError(f"Method {spec.name!r} is already registered.")
    _REGISTRY[spec.name] = spec
    return spec


def get(name):
    if name not in _REGISTRY:
        raise ValueError(
            f"Unknown adapter method {name!r}; available methods: {sorted(_REGISTRY)}."
        )
    return _REGISTRY[name]


def _lora_count(n_in, n_out, n_batch, rank, options):
    return n_batch * rank * (n_in + n_out)


register(
    MethodSpec(
        name="lora",
        layer_class=_m.LoRA,
        summary="LoRA: y = xK + b + s(xA)B, s = alpha/r (rslora: alpha/sqrt(r))",
        noop_at_init="exact",
        mergeable=True,
        unmergeable=True,
        rank_bounded=False,
        trainable_count=_lora_count,
    )
)

register(
    MethodSpec(
        name="dora",
        layer_class=_m.DoRA,
        summary="DoRA: magnitude m times the normalized direction K + sAB",
        noop_at_init="exact",
        mergeable=True,
        unmergeable=True,
        rank_bounded=False,
        trainable_count=lambda n_in, n_out, nb, r, o: nb * (r * (n_in + n_out) + n_out),
    )
)

register(
    MethodSpec(
        name="pissa",
        layer_class=_m.PiSSA,
        summary="PiSSA: LoRA from the top-r SVD triplets, residual frozen base",
        noop_at_init="roundoff",
        mergeable=True,
        unmergeable=True,
        rank_bounded=True,
        trainable_count=_lora_count,
    )
)


def methods():
    """Names of the registered adapter methods.

    Example:

    >>> import keras_lowrank
    >>> "lora" in keras_lowrank.methods()
    True
    """
    return sorted(_REGISTRY)
