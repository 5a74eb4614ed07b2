"""Loading a new adapter into an existing slot of a compiled model, without
a retrace.

`hotswap_adapter(model, source, adapter_name)` writes the weights of an
adapter file or a PEFT directory into the variables of the named adapter
`adapter_name` (the slot): the layers, variables and shapes stay as they
are, so every compiled function (a `predict_function`, a KerasHub
`generate_function`, a `torch.compile`d call) runs on with the new weights.

A slot takes an adapter of its own method, on the same layers, whose
variables have the slot's shapes; LoRA and DoRA slots also take any lower
rank: the factors are zero-padded to the slot's rank and the file's scale
(`alpha / r`, or `/ √r` for rsLoRA) is folded into `A` against the slot's,
so the slot computes the file's update exactly (PEFT pads the same way and
keeps the scale in a tensor; folding it keeps the slot an ordinary LoRA
that saves, merges and exports as one). Declare the largest rank you will
swap in by making the slot with it: `enable_adapter(..., rank=max_rank,
adapter_name=...)`. Every check runs before a variable changes; a file that
does not fit is refused naming the layer and the value.
"""

import math
import os

import numpy as np
from keras import ops

from keras_lowrank import _compat
from keras_lowrank import adapter_set
from keras_lowrank import arguments
from keras_lowrank import shared
from keras_lowrank import tree
from keras_lowrank.saved_plan import SEP

#: options that only shape training or the init (they may differ)
_FREE = {"seed", "dropout", "init", "lr_ratio"}
_RANKED = {"rank", "alpha", "rslora"}


def _slot(model, adapter_name):
    """`{base layer key: (path, member)}` of the slot."""
    found = {}
    for e in tree.walk(model):
        if not tree.is_adapter(e.layer):
            continue
        if adapter_name is None:
            if e.holder is None:
                found[e.key] = (e.path, e.layer)
        elif e.adapter_name == adapter_name:
            suffix = tree.member_suffix(adapter_name)
            found[e.key[: -len(suffix)]] = (e.path[: -len(suffix)], e.layer)
    return found


def _np(x):
    return np.asarray(ops.convert_to_numpy(x))


def _scale(options):
    rank = options["rank"]
    alpha = options.get("alpha")
    alpha = float(rank) if alpha is None else float(alpha)
    return alpha / (math.sqrt(rank) if options.get("rslora") else rank)


def _values(member, path, method, options, state, where, peft=False):
    """The values of `member`'s variables that make it compute the file's
    layer (`method`, `options`, `state`: name -> array), or a `ValueError`.
    A PEFT directory (`peft`) lacks the non-trainable bookkeeping of a
    merge (DoRA's `merge_norm`): those variables keep their values."""
    if member.method != method:
        raise ValueError(f"hotswap_adapter: layer {path!r} holds a {member.method!r} adapter in "
                         f"the slot; {where} holds a {method!r} adapter there.")
    if member.merged:
        raise ValueError(f"hotswap_adapter: layer {path!r}: the slot is merged into the kernel "
                         "(unmerge it first).")
    if getattr(member, "rewrites_kernel", False) or adapter_set.rewrites(member):
        raise ValueError(
            f"hotswap_adapter: layer {path!r}: a {method!r} adapter rewrites the frozen kernel at "
            "its init, so another one needs another kernel; hot-swap its plain-LoRA form "
            "(save_adapter(..., as_lora=True)) into a LoRA slot.")
    if "base_bias" in state:
        raise ValueError(f"hotswap_adapter: layer {path!r}: {where} trains the layer's bias "
                         "(train_bias), which the slot's layer shares with its other adapters.")
    mine = member.options()
    padded = getattr(member, "hotswap_pads_rank", False)
    free = _FREE | (_RANKED if padded else set())
    for key in sorted(set(mine) | set(options)):
        if key in free or options.get(key) is None:  # None: the file leaves it to the default
            continue
        if mine.get(key) != options.get(key):
            raise ValueError(
                f"hotswap_adapter: layer {path!r}: the slot's {method} has {key}={mine.get(key)!r}, "
                f"{where} has {key}={options.get(key)!r}.")
    state_held = member.shared_state()
    if state_held is not None and not getattr(state_held, "hotswap_compares", False):
        raise ValueError(
            f"hotswap_adapter: layer {path!r}: {method} adapters keep a model-level state "
            "that a hot-swap cannot replace; load the adapter with load_adapter.")
    variables = member.file_state()
    if peft:
        variables = {k: v for k, v in variables.items() if k in state or v.trainable}
    if set(state) != set(variables):
        raise ValueError(f"hotswap_adapter: layer {path!r} needs {sorted(variables)}; {where} "
                         f"holds {sorted(state)}.")
    out = {}
    if padded:
        r_slot, r_file = member.rank, int(options["rank"])
        if r_file > r_slot:
            raise ValueError(
                f"hotswap_adapter: layer {path!r}: {where} has rank {r_file}, above the slot's "
                f"rank {r_slot}; make the slot with the largest rank to swap in "
                "(enable_adapter(..., rank=max_rank, adapter_name=...)).")
        ratio = _scale(options) / _scale(mine)
        for name in ("lora_a", "lora_b"):
            value = np.asarray(state[name], "float32")
            if name == "lora_a":
                value = value * np.float32(ratio)
            pad = [(0, 0)] * (value.ndim - 2) + [(0, r_slot - r_file), (0, 0)]
            out[name] = np.pad(value, pad)
        rest = {k: v for k, v in state.items() if k not in out}
    else:
        rest = state
    for name, value in rest.items():
        out[name] = np.asarray(value)
    for name, value in out.items():
        want = tuple(variables[name].shape)
        if tuple(value.shape) != want:
            raise ValueError(
                f"hotswap_adapter: layer {path!r}: {name} has shape {tuple(value.shape)} in {where}; "
                f"the slot's is {want}.")
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            raise ValueError(f"hotswap_adapter: layer {path!r}: {name} in {where} holds NaN or inf.")
    return out


def _from_file(path, where):
    """`({base layer key: (method, options, state)}, shared tensors)`."""
    from keras_lowrank.saving import read_adapter_file

    _, config, tensors = read_adapter_file(path)
    names = sorted({c.get("adapter_name") or "" for c in config["layers"].values()})
    if len(names) != 1:
        raise ValueError(
            f"hotswap_adapter: {where} holds the adapters {names}; save one "
            "(save_adapter(model, path, adapter_name=...)) to swap it in.")
    layers, held = {}, {}
    suffixes = {}
    for key, cfg in config["layers"].items():
        base = key
        if cfg.get("adapter_name"):
            base = key[: -len(tree.member_suffix(cfg["adapter_name"]))]
        suffixes[key] = base
        layers[base] = (cfg["method"], dict(cfg["options"]), {})
    for name, value in tensors.items():
        layer, sep, var = name.partition(SEP)
        if layer.startswith(shared.FILE_PREFIX):
            held.setdefault(layer[len(shared.FILE_PREFIX):], {})[var] = value
        elif layer in suffixes:
            layers[suffixes[layer]][2][var] = value
        else:
            raise ValueError(f"hotswap_adapter: {where}: tensor {name!r} belongs to no layer "
                             "the file trains with an adapter (a layer trained in full cannot "
                             "be hot-swapped).")
    return layers, held


def _from_peft(model, path, adapter_name, base_model, where):
    from keras_lowrank import peft_format

    config, tensors = peft_format.read_dir(path)
    fmt = peft_format.check_config(config)
    if fmt.shared:
        raise ValueError(
            f"hotswap_adapter: {where} is a PEFT {fmt.method(config)} adapter, whose projections "
            "are shared by the whole model; load it with load_peft_adapter.")
    method, options, plan, _, held = peft_format.read_modules(
        model, path, base_model, adapter_name, config, tensors, fmt, placed=True)
    if held:
        raise ValueError(f"hotswap_adapter: {where}: a PEFT {method} adapter keeps module state the "
                         "whole model shares; load it with load_peft_adapter.")
    keys = {e.path: e.key for e in tree.walk(model)}
    layers = {}
    for layer_path, (rank, alpha, state) in plan.items():
        layer_options = {**options, "rank": rank, **({"alpha": alpha} if alpha is not None else {})}
        layers[keys.get(layer_path, layer_path)] = (method, layer_options, state)
    return layers, {}


def hotswap_adapter(model, source, adapter_name=None, base_model=None):
    """Replace the weights of the adapter `adapter_name` (the slot) with
    those of an adapter file or a PEFT directory, without a retrace.

    Args:
        model: a model holding the slot (compiled or not).
        source: a file written by `save_adapter` holding one adapter, or a
            PEFT adapter directory (as `load_peft_adapter` reads; the model
            is then the KerasHub model of its checkpoint).
        adapter_name: the slot: a named adapter of `model`; `None` for the
            adapters of a model without named adapters.
        base_model: for a PEFT directory, as in `load_peft_adapter`.

    The source must adapt the slot's layers, each with the slot's method
    and options (those that shape only training or the init may differ);
    LoRA and DoRA may have any rank up to the slot's (see the module
    docstring). Methods whose init rewrites the frozen kernel (PiSSA,
    OLoRA, ...) and model-level state other than VeRA's and RandLoRA's
    frozen bases (which must be equal) are refused by name.

    Examples:

        >>> import keras, numpy as np, tempfile, os
        >>> import keras_lowrank
        >>> def build():
        ...     keras.utils.set_random_seed(0)
        ...     return keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="out")])
        >>> trained = build()
        >>> _ = keras_lowrank.enable_adapter(trained, targets=["out"], rank=2, adapter_name="task")
        >>> f = os.path.join(tempfile.mkdtemp(), "task.safetensors")
        >>> keras_lowrank.save_adapter(trained, f, adapter_name="task")
        >>> served = build()
        >>> _ = keras_lowrank.enable_adapter(served, targets=["out"], rank=8, adapter_name="slot")
        >>> keras_lowrank.hotswap_adapter(served, f, "slot")
        >>> x = np.ones((2, 8), "float32")
        >>> bool(np.allclose(served.predict(x, verbose=0), trained.predict(x, verbose=0), atol=1e-6))
        True
    """
    if adapter_name is not None:
        adapter_set.check_name(adapter_name)
    slot = _slot(model, adapter_name)
    if not slot:
        what = f"adapter named {adapter_name!r}" if adapter_name else "unnamed adapters"
        raise ValueError(f"hotswap_adapter: model {model.name!r} has no {what} to swap into.")
    name = arguments.path("hotswap_adapter", "source", source)
    if os.path.isdir(name):
        where = f"PEFT directory {name}"
        layers, held = _from_peft(model, name, adapter_name, base_model, where)
        peft = True
    else:
        peft = False
        where = f"adapter file {name}"
        layers, held = _from_file(name, where)
    missing = sorted(slot[k][0] for k in slot if k not in layers)
    extra = sorted(k for k in layers if k not in slot)
    if extra:
        raise ValueError(f"hotswap_adapter: {where} adapts {extra}, which the slot "
                         f"{adapter_name!r} does not hold.")
    if missing:
        raise ValueError(f"hotswap_adapter: {where} has no adapter for the slot's layers {missing}.")
    writes = []
    for key, (method, options, state) in layers.items():
        path, member = slot[key]
        for var_name, value in _values(member, path, method, options, state, where, peft).items():
            writes.append((member.file_state()[var_name], value))
    states = shared.states(model)
    for method, values in held.items():
        state = states.get(method)
        if state is None or not getattr(state, "hotswap_compares", False):
            raise ValueError(f"hotswap_adapter: {where} holds {method}'s model-level state, "
                             "which a hot-swap cannot replace; load it with load_adapter.")
        for var_name, var in state.file_state().items():
            if var_name not in values or not np.array_equal(_np(var), np.asarray(values[var_name])):
                raise ValueError(
                    f"hotswap_adapter: {where} was made with other {method} projections than the "
                    f"model's ({var_name} differs: another seed or projection size).")
    before = [(var, _compat.copy_value(var)) for var, _ in writes]
    try:
        for var, value in writes:
            var.assign(value.astype(np.dtype(var.dtype)) if hasattr(value, "astype") else value)
    except BaseException:
        for var, value in before:
            var.assign(value)
        raise
