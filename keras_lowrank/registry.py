"""The method registry: one `Method` object per adapter method.

A method is declared once, beside its code (each module of
`keras_lowrank.methods` ends with `register(Method(...))`), and everything
else reads that declaration:

- its typed options are its layer class's `OPTIONS` (`keras_lowrank.options`):
  validation, `get_config`, the summary and the docs' option tables all come
  from them;
- `layer_class` is the adapter layer it puts on each Dense/EinsumDense;
- `shared_state` (a `keras_lowrank.shared.SharedState` subclass, or `None`)
  is its model-level state, created before its layers are injected and held
  once by the model;
- `training` lists its training-time parts (`keras_lowrank.training`):
  where each runs inside the compiled train step;
- `export_forms` lists what `save_adapter` can convert it to (`"lora"`);
- the promises the adapter-contract suite checks: no-op at start, merge and
  unmerge, the trainable-parameter formula, the base storages it composes
  with. The suite is parametrized over this registry, so a method is tested
  the day it is registered.
"""

import dataclasses
from typing import Callable

from keras_lowrank import options as opt

#: frozen-base storages a method composes with unless it says otherwise
ALL_BASES = ("float", "nf4", "int8", "int4")


@dataclasses.dataclass(frozen=True)
class Method:
    """One adapter method (see the module docstring)."""

    name: str
    layer_class: type
    summary: str
    #: trainable parameters of one layer: f(geometry, options)
    trainable_count: Callable
    #: "exact", "roundoff" (float32 round-off), or "no"
    noop_at_init: str = "exact"
    mergeable: bool = True
    unmergeable: bool = True
    bases: tuple = ALL_BASES
    shared_state: type = None
    training: tuple = ()
    export_forms: tuple = ()
    #: the learning rate the method wants, relative to LoRA's (the
    #: singular-value methods train a few numbers on the scale of σ and
    #: want a much larger one: spec §14, §15, §19)
    lr_scale: float = 1.0
    #: values for the options that have no default (AdaLoRA's
    #: `total_steps`): what a minimal example passes; the contract suite
    #: uses them
    example_options: dict = dataclasses.field(default_factory=dict)
    #: section of the method spec it implements
    spec: str = ""
    status: str = "stable"

    @property
    def options(self):
        """The method's `Option` declarations (its layer class's `OPTIONS`)."""
        return self.layer_class.OPTIONS

    @property
    def defaults(self):
        return {o.name: o.default for o in self.options}

    @property
    def rank_bounded(self):
        """Whether `rank` must be <= min(n_in, n_out)."""
        return bool(getattr(self.layer_class, "rank_bounded", False))

    def validate_options(self, options, where="enable_adapter"):
        """Check and complete `options` (unknown names, types and values)."""
        return opt.validate(self.options, options, where, self.name)

    def options_table(self):
        """The options as a Markdown table (name, default, allowed, meaning)."""
        rows = ["| option | default | allowed | meaning |", "|---|---|---|---|"]
        for o in self.options:
            rows.append(f"| `{o.name}` | `{o.default!r}` | {o.check_fn!r} | {o.doc} |")
        return "\n".join(rows)


_REGISTRY = {}


def register(method):
    """Add `method` to the registry (once per name)."""
    if method.name in _REGISTRY:
        raise ValueError(f"Method {method.name!r} is already registered.")
    if method.layer_class.method != method.name:
        raise ValueError(
            f"Method {method.name!r}: its layer class {method.layer_class.__name__} "
            f"says method={method.layer_class.method!r}."
        )
    _REGISTRY[method.name] = method
    return method


def get(name):
    """The `Method` registered as `name`."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(
            f"Unknown adapter method {name!r}; available methods: {sorted(_REGISTRY)}."
        )
    return _REGISTRY[name]


def lowrank_count(geometry, options):
    """`r (n_in + n_out)` per matrix: LoRA and its relatives."""
    return geometry.n_shared * options["rank"] * (geometry.n_in + geometry.n_out)


def methods():
    """Names of the registered adapter methods.

    Examples:

        >>> import keras_lowrank
        >>> "lora" in keras_lowrank.methods()
        True
    """
    return sorted(_REGISTRY)
