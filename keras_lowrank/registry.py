"""The method registry: one `Method` object per adapter method.

A method is declared once, in its module of `keras_lowrank.methods`: its
layer class (a subclass of `keras_lowrank.adapter.Adapter`) carries what the
method *is* (its capabilities, as class attributes that subclasses inherit
and refine), and the decorator `@registry.method(summary, ...)` on that
class adds what is *said about* it (its one-line summary, its
trainable-parameter formula, the NumPy reference the contract suite checks
it against, its PEFT format, its paper). Everything else reads `Method`:

- its typed options are its layer class's `OPTIONS` (`keras_lowrank.options`):
  validation, `get_config`, the summary and the docs' option tables all come
  from them;
- `layer_class` is the adapter layer it puts on each Dense/EinsumDense;
- its capabilities (`CAPABILITIES`, each documented on `Adapter`) are read
  from the layer class: e.g. `model_state` (a `keras_lowrank.shared.SharedState`
  subclass, or `None`, held once by the model), `training_parts` (its
  training-time parts, `keras_lowrank.training`), `export_forms` (what
  `save_adapter` can convert it to), and the promises the adapter-contract
  suite checks: no-op at start, merge and unmerge, the base storages it
  composes with. The suite is parametrized over this registry, so a method
  is tested the day it is registered.
"""

import dataclasses
from typing import Any
from typing import Callable

import keras_lowrank_cli_common
from keras_lowrank import options as opt


class _Capability:
    """A `Method` attribute read from its layer class (not stored twice)."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, method, owner=None):
        if method is None:
            return self
        return getattr(method.layer_class, self.name)


@dataclasses.dataclass(frozen=True)
class Method:
    """One adapter method (see the module docstring)."""

    name: str
    layer_class: type
    summary: str
    #: trainable parameters of one layer: f(geometry, options)
    trainable_count: Callable
    #: values for the options that have no default (AdaLoRA's
    #: `total_steps`): what a minimal example passes; the contract suite
    #: uses them
    example_options: dict = dataclasses.field(default_factory=dict)
    #: the NumPy statement of its formula the adapter-contract suite checks
    #: the layer against: `reference(adapter, w)` is the merged matrix view
    #: (float64) for the base matrix `w`, from the layer's own variables
    #: (`keras_lowrank.methods.reference`)
    reference: Callable = None
    #: its PEFT adapter type (a `keras_lowrank.peft_codec.Format`), if PEFT
    #: has it: how PEFT directories load into it and it is written to them
    peft: Any = None
    #: where the method comes from (a paper's address)
    paper: str = ""
    status: str = "stable"

    # What the method is: read from its layer class, which declares each
    # as a class attribute (`Adapter` documents them and sets the defaults).
    noop_at_init = _Capability()
    mergeable = _Capability()
    unmergeable = _Capability()
    base_kinds = _Capability()
    model_state = _Capability()
    training_parts = _Capability()
    export_forms = _Capability()
    lr_scale = _Capability()
    rank_bounded = _Capability()
    rewrites_kernel = _Capability()
    init_on_full_precision = _Capability()
    uses_svd = _Capability()
    nested_factors = _Capability()
    serves_kernel = _Capability()
    calibration = _Capability()

    @property
    def options(self):
        """The method's `Option` declarations (its layer class's `OPTIONS`)."""
        return self.layer_class.OPTIONS

    @property
    def defaults(self):
        return {o.name: o.default for o in self.options}

    def validate_options(self, options, where="enable_adapter"):
        """Check and complete `options` (unknown names, types and values)."""
        return opt.validate(self.options, options, where, self.name)

    def options_table(self):
        """The options as a Markdown table (name, default, allowed, meaning)."""
        rows = ["| option | default | allowed | meaning |", "|---|---|---|---|"]
        for o in self.options:
            rows.append(f"| `{o.name}` | `{o.default!r}` | {o.check_fn!r} | {o.doc} |")
        return "\n".join(rows)


#: the capabilities a method declares on its layer class (`Method` reads
#: them from there under the same names)
CAPABILITIES = tuple(n for n, v in vars(Method).items() if isinstance(v, _Capability))

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


def method(summary, trainable_count=None, **declaration):
    """Class decorator: register the decorated adapter layer class as the
    method its `method` attribute names, with `summary` (one line: what it
    trains), its trainable-parameter formula (default: LoRA's
    `r (n_in + n_out)`) and the other `Method` fields. Its capabilities are
    the class's own attributes (`CAPABILITIES`), not arguments here.

    Examples:

        >>> import keras
        >>> from keras_lowrank import registry
        >>> from keras_lowrank.methods.lora import LoRA
        >>> @registry.method("LoRA at twice the scale (an example)")
        ... @keras.saving.register_keras_serializable(package="klr_docs")
        ... class DoubleLoRA(LoRA):
        ...     method = "double_lora_example"
        >>> registry.get("double_lora_example").layer_class is DoubleLoRA
        True
        >>> registry.unregister("double_lora_example")
    """

    def decorate(cls):
        register(Method(
            name=cls.method, layer_class=cls, summary=summary,
            trainable_count=lowrank_count if trainable_count is None else trainable_count,
            **declaration,
        ))
        return cls

    return decorate


def unregister(name):
    """Take method `name` out of the registry (for methods made in tests or
    examples)."""
    _REGISTRY.pop(name, None)


def peft_formats():
    """`{PEFT adapter type: Format}` of every registered method that has one."""
    out = {}
    for m in _REGISTRY.values():
        if m.peft is not None:
            out.setdefault(m.peft.peft_type, m.peft)
    return out


#: the plain-LoRA form (`save_adapter(..., as_lora=True)`, PEFT's LoRA,
#: `combine`): a method that can be written as a LoRA lists it in its
#: `export_forms`
LORA_FORM = "lora"

#: the method `enable_adapter` uses when none is named
DEFAULT_METHOD = LORA_FORM

_FORMS = {}


def export_form(name):
    """Decorator: register `fn(adapter) -> (method, state, options)` as the
    export form `name`: the method an adapter is written as, its file
    state and its options (declared by the method the form writes)."""

    def decorate(fn):
        _FORMS[name] = fn
        return fn

    return decorate


def convert(adapter, form, where):
    """`(method, state, options)`: `adapter` in the export form `form`, or a
    `ValueError` naming `where` when its method has no such form."""
    if form not in get(adapter.method).export_forms:
        raise ValueError(
            f"{where} has a {adapter.method!r} adapter, which has no {form} form; "
            "save it as it is."
        )
    return _FORMS[form](adapter)


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
    """Names of the registered adapter methods, sorted.

    `keras_lowrank.method_info(name)` describes one: what it does, and its
    options with their defaults, allowed values and meaning (on the command
    line: `keras-lowrank methods [NAME]`).

    Examples:

        >>> import keras_lowrank
        >>> "lora" in keras_lowrank.methods()
        True
    """
    return sorted(_REGISTRY)


@dataclasses.dataclass(frozen=True)
class OptionInfo:
    """One option of a method, as `method_info` describes it.

    Attributes:
        name: the keyword to pass to `enable_adapter`.
        default: the value used when it is not passed.
        allowed: the values it takes, in words.
        meaning: what it does.
    """

    name: str
    default: Any
    allowed: str
    meaning: str


@dataclasses.dataclass(frozen=True)
class MethodInfo:
    """What an adapter method does and which options it takes (see
    `method_info`). `print(info)` shows it as a table.

    Attributes:
        name: the method's name (`enable_adapter(model, method=name)`).
        description: one line: what the method trains.
        options: its options (`OptionInfo`), in declaration order.
        lr_scale: the learning rate it wants, relative to LoRA's.
        as_lora: whether `save_adapter(..., as_lora=True)` can write it as
            a plain LoRA.
    """

    name: str
    description: str
    options: tuple
    lr_scale: float = 1.0
    as_lora: bool = False

    @property
    def defaults(self):
        """`{option name: default}`."""
        return {o.name: o.default for o in self.options}

    def to_dict(self):
        """The description as plain JSON-able values (defaults as their
        Python `repr`)."""
        return {
            "name": self.name,
            "description": self.description,
            "lr_scale": self.lr_scale,
            "as_lora": self.as_lora,
            "options": [{"name": o.name, "default": repr(o.default), "allowed": o.allowed,
                         "meaning": o.meaning} for o in self.options],
        }

    def __str__(self):
        return keras_lowrank_cli_common.format_method(self.to_dict())


def method_info(name):
    """What the adapter method `name` does, and its options.

    Args:
        name: a method name, from `keras_lowrank.methods()`.

    Returns:
        A `MethodInfo`: the method's one-line description, and each option's
        name, default, allowed values and meaning. `print()` shows it as a
        table; the command line shows the same with
        `keras-lowrank methods NAME`.

    Raises:
        ValueError: `name` is not a registered method (the message lists
            the methods).

    Examples:

        >>> import keras_lowrank
        >>> info = keras_lowrank.method_info("lora")
        >>> info.defaults["rank"], info.defaults["alpha"]
        (8, None)
        >>> [o.allowed for o in info.options if o.name == "init"]
        ["one of ('kaiming', 'gaussian', 'orthogonal')"]
    """
    m = get(name)
    return MethodInfo(
        name=m.name,
        description=m.summary,
        options=tuple(OptionInfo(o.name, o.default, repr(o.check_fn), o.doc) for o in m.options),
        lr_scale=float(m.lr_scale),
        as_lora=LORA_FORM in m.export_forms,
    )
