"""PEFT adapter formats: what a method declares to read and write PEFT.

A method that PEFT also has declares its format beside its code
(`registry.method(..., peft=SomeFormat())`): a `Format` subclass that says
how one PEFT adapter type maps onto the method, in both directions, per
module and in torch's `nn.Linear` layout. `keras_lowrank.peft_format` does
the rest once for every format: it maps PEFT modules onto KerasHub layers
(through KerasHub's own converter), turns torch rows and columns into the
matrix view of the Keras kernel, reads and checks the directory, plans the
adapters and writes directories back.

The checks here read a PEFT config's options and a module's tensors with one
wording: every fault is a `ValueError` (`TypeError` for a value of the wrong
type) that names the module, the tensor or the option.

Examples:

    >>> from keras_lowrank import peft_codec
    >>> peft_codec.pattern_value({"q_proj": 4}, "model.layers.0.self_attn.q_proj", 8)
    4
"""

import re

import numpy as np

from keras_lowrank import arguments

#: what the messages about the options of a PEFT adapter config call it
CONFIG_WHERE = "PEFT adapter config"


# ----------------------------------------------------------------------
# Checked reads of a config and of a module's tensors
def config_value(config, key, default, kind, low=None, high=None, low_open=False):
    """`config[key]` (or `default`), checked: `kind` "int" (not a bool),
    "number" (finite) or "bool"; within `[low, high]` (`(low, ...` when
    `low_open`)."""
    value = config.get(key, default)
    if value is None:
        value = default
    if kind == "bool":
        return arguments.flag(CONFIG_WHERE, key, value)
    return arguments.number(CONFIG_WHERE, key, value, low, high, low_open=low_open,
                            integer=kind == "int")


def alpha_value(config, key, low=0):
    """A scaling numerator: a finite number (`> 0` unless `low` is None)."""
    return config_value(config, key, 8, "number", low=low, low_open=low is not None)


def dropout_value(config, key):
    """A dropout rate of the config, in [0, 1]."""
    return float(config_value(config, key, 0.0, "number", low=0.0, high=1.0))


def pattern_value(patterns, module, default):
    r"""PEFT's rule: the value of the first key `k` with
    `re.match(rf"(.*\.)?({k})$", module)`, else `default`."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def matrix(parts, name, module):
    """A module's 2-D tensor `name`, or a clear error."""
    value = parts[name]
    if value.ndim != 2:
        raise ValueError(f"PEFT adapter module {module!r}: {name} has shape {value.shape}; "
                         "a 2-D matrix was expected.")
    return value


def same(module, *sizes):
    """Raise unless every `(what, size)` has the same size."""
    if len({int(n) for _, n in sizes}) > 1:
        raise ValueError(
            f"PEFT adapter module {module!r}: "
            + ", ".join(f"{what} {int(n)}" for what, n in sizes)
            + " should be equal (the adapter's rank or size)."
        )


def identity(p_in, p_out, module, what):
    """Refuse a layout that reorders the weight, for an update (`what`)
    that cannot be reordered."""
    if not (np.array_equal(p_in, np.arange(len(p_in))) and np.array_equal(p_out, np.arange(len(p_out)))):
        raise ValueError(
            f"PEFT adapter module {module!r}: KerasHub's converter reorders this "
            f"weight, and {what} cannot be reordered."
        )


def f32(x):
    """A C-contiguous float32 NumPy copy of a tensor or array."""
    from keras import ops

    return np.ascontiguousarray(np.asarray(ops.convert_to_numpy(x)).astype(np.float32))


# ----------------------------------------------------------------------
class Format:
    """How one PEFT adapter type maps onto keras-lowrank methods.

    Reading (`load_peft_adapter`): `check` the config's own options,
    `method` and `options` for `enable_adapter`, and per module
    `check_parts`, `rank`, `alpha`, `torch_shape` and `state` (the module's
    tensors, in torch's layout, as our variables in the matrix view).
    Model-wide tensors (`shared`, e.g. VeRA's projections) are checked by
    `check_shared` before the model changes and loaded by `load_shared`.

    Writing (`save_peft_adapter`): `writes` names the methods the format
    writes as they are, and `writes_lora_forms` says that it also writes
    every method with a plain-LoRA form; `export_entry` takes one adapter's
    state, `check_entries` refuses what one directory cannot hold,
    `write_module` gives a module's tensors and `config` the directory's
    `adapter_config.json`.
    """

    peft_type = None
    #: tensor name suffixes of one module
    parts = ()
    #: tensor names of the whole model (`base_model.<name>`)
    shared = ()
    #: tensor name suffixes PEFT saves as integers (SHiRA's indices); every
    #: other tensor of a directory must be a float
    index_parts = ()
    #: whether a weight KerasHub splits over several layers (GPT-2's fused
    #: `c_attn`) can take this update part by part
    splittable = True
    #: methods written as they are
    writes = ()
    #: whether every method with a plain-LoRA form is written (as a LoRA)
    writes_lora_forms = False

    # -- reading ------------------------------------------------------
    def check(self, config):
        """Check the format's own options (types, ranges) before anything
        is loaded."""
        self.options(config)

    def check_parts(self, parts, module, config):
        """Check the tensors of one module against each other (ranks and
        sizes) and against the config, before they are indexed."""

    def method(self, config):
        """The keras-lowrank method the adapter loads into."""
        raise NotImplementedError

    def options(self, config):
        """`enable_adapter` options for every module."""
        return {}

    def rank(self, config, module, parts):
        return int(pattern_value(config.get("rank_pattern"), module, config.get("r", 8)))

    def alpha(self, config, module):
        return float(pattern_value(config.get("alpha_pattern"), module, alpha_value(config, "alpha")))

    def torch_shape(self, parts):
        """`(n_out, n_in)` of the module's weight (either may be `None`:
        the size of the layers the weight fills)."""
        raise NotImplementedError

    def state(self, parts, p_in, p_out, module):
        """`{variable name: array}` of our adapter."""
        raise NotImplementedError

    def required(self, config):
        return set(self.parts)

    def part_name(self, suffix):
        """The name a module's tensor suffix is known by in `parts`."""
        return suffix

    def check_shared(self, tensors, targets, ranks):
        """Check the model-wide tensors against the adapted layers
        (`targets`, each with its `geometry`) and the modules' `ranks`."""

    def load_shared(self, model, tensors):
        """Put the model-wide tensors into the model's method state."""

    def module_state(self, parts, p_in, p_out, module):
        """What of one module's tensors goes to the model-level state rather
        than to its adapter (Lily's projectors, which PEFT ties across
        modules and saves under each): `{}` for most formats."""
        return {}

    def check_module_state(self, held, targets, config):
        """Check the modules' `module_state`s (`{Keras path: state}`, the
        adapted layers in `targets`, by path) before the model changes."""

    def load_module_state(self, model, adapters, held):
        """Put the modules' `module_state`s into the model's method state
        (`adapters`: `{Keras path: adapter}`)."""

    # -- writing ------------------------------------------------------
    def export_entry(self, adapter, where):
        """`{"kind", "state", "rank", "alpha", "rslora"}` of one adapter
        (`kind`: the form it is written in)."""
        raise NotImplementedError

    def check_entries(self, entries):
        """Refuse adapters one directory cannot hold together (`entries`:
        `(target, entry)` pairs)."""

    def write_module(self, name, group, layouts, n_in, n_out, whole):
        """`(tensors, rank, alpha)` of one PEFT module named `name`, from the
        `(target, entry)` pairs of the Keras layers its weight fills and
        their `(p_in, p_out)` layouts (`whole`: one layer holds the whole
        weight)."""
        raise NotImplementedError

    def config(self, entries, common, rank, alpha):
        """The `adapter_config.json` of the directory, from the options
        every format shares (`common`) and the most common rank and alpha."""
        raise NotImplementedError
