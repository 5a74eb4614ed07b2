"""Merge, unmerge, and switching adapters off and on."""

import contextlib

from keras import ops

from keras_lowrank import adapted_model
from keras_lowrank import adapter_set
from keras_lowrank import arguments
from keras_lowrank import bases
from keras_lowrank import compiled
from keras_lowrank import experts
from keras_lowrank import named
from keras_lowrank import options as opt
from keras_lowrank import tree


def _adapter_entries(model, walked=None):
    """The entries of the adapters of `model` (`walked`: a `tree.walk(model)`
    already made); a model without adapters is refused."""
    walked = tree.walk(model) if walked is None else walked
    entries = [e for e in walked if tree.is_adapter(e.layer)]
    if not entries:
        raise ValueError(f"Model {model.name!r} has no adapters.")
    return entries


def _all_or_nothing(entries, step):
    """Run `step(adapter)` on every adapter; if one fails, put every adapter
    (kernel and variables) back bit for bit and re-raise."""
    snapshots = []
    try:
        for e in entries:
            snapshots.append((e.layer, e.layer.snapshot()))
            step(e.layer)
    except BaseException:
        for adapter, snap in reversed(snapshots):
            adapter.restore(snap)
        raise


def _scope(adapter, path):
    """The name scope of the merged layer: that of the float layer it
    replaces, so its variables get the paths a plain build's have."""
    base = adapter.layer if bases.base_kind(adapter.layer) == "float" else None
    return tree.scope_of(base, path)


def _build_plain(adapter, path, names=None):
    plain, kernel = adapter.to_plain_layer() if names is None else adapter.to_plain_layer(names)
    input_shape = bases.build_input_shape(adapter.layer)
    if input_shape is None:
        input_shape = (None, adapter.geometry.n_in)
    with _scope(adapter, path):
        plain.build(input_shape)
    bases.assign_kernel(plain, kernel)
    bias = adapter.bias_value()
    if bias is not None:
        plain.bias.assign(bias)
    plain.trainable = False
    return plain


def _requantized(adapter, path, names=None):
    """The merged adapter as a stand-alone layer in its base's storage, and
    the re-quantization error of its kernel."""
    kind = bases.base_kind(adapter.layer)
    target = kind if kind != "float" else "nf4"
    plain = _build_plain(adapter, path, names)
    exact = bases.read_kernel(plain)
    with _scope(adapter, path):
        q = bases.STORAGES[target].convert(
            plain, double_quant=getattr(adapter.layer, "double_quant", True)
        )
    err = ops.abs(bases.read_kernel(q) - exact)
    report = {
        "storage": target,
        "max_abs_error": float(ops.convert_to_numpy(ops.max(err))),
        "mean_abs_error": float(ops.convert_to_numpy(ops.mean(err))),
    }
    return q, report


def merge(model, unload=True, requantize=False, adapter_names=None):
    """Fold every adapter into its base kernel.

    With named adapters (`keras_lowrank.named`), `merge` folds the active
    ones (or `adapter_names`, which must all be active: merging an inactive
    adapter is an error that names it) into plain layers, and drops the
    others. Named adapters merge with `unload=True` only.

    With `unload=True` (default) each adapter layer is replaced, in place, by
    a plain `Dense`/`EinsumDense` holding the merged kernel: the model then
    has no keras-lowrank layer left, and saves and loads without
    `keras_lowrank`. With `unload=False` the adapters stay, with their update
    folded into the kernel, and `unmerge(model)` takes it out again.

    A quantized base (NF4, int8, int4) merges into a float kernel by default.
    With `requantize=True` the merged kernel is quantized again, into the
    base's storage (NF4 for a float base), as a stand-alone layer, and
    `merge` returns `{path: {"storage", "max_abs_error", "mean_abs_error"}}`,
    the re-quantization error of each kernel: never a silent loss.

    Raises `FloatingPointError` (model unchanged) if a merge produces NaN/inf.

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, name="hidden"),
        ...                           keras.layers.Dense(4, name="logits")])
        >>> _ = keras_lowrank.enable_adapter(model, rank=2)
        >>> keras_lowrank.merge(model)
        >>> [type(l).__name__ for l in model.layers]
        ['Dense', 'Dense']
    """
    walked = tree.walk(model)
    entries = _adapter_entries(model, walked)
    holders = _holders(walked, entries)
    names = _merge_names(model, walked, holders, adapter_names)
    if holders and not unload:
        raise ValueError(
            "merge(unload=False) keeps each adapter with its update folded into its "
            "own kernel; named adapters share one kernel per layer. merge(model) folds "
            f"the active ones {names} into plain layers."
        )
    arguments.check("merge", "unload", unload, opt.boolean)
    arguments.check("merge", "requantize", requantize, opt.boolean)
    if requantize and not unload:
        raise ValueError("merge(requantize=True) replaces the adapters; it needs unload=True.")
    if not unload:
        for e in entries:
            if not e.layer.merged:
                e.layer.refuse_in_place("merge")
                if not e.layer.adapter_enabled:
                    raise ValueError(
                        f"Layer {e.path!r} has its adapter disabled; enable it "
                        "(set_adapter_enabled(model, True)) before merging in place."
                    )
        _all_or_nothing(entries, lambda a: a.merge_in_place())
        compiled.reset_compiled_functions(model)
        return
    report = {}
    entries = [e for e in entries if e.holder is None] + list(holders.values())
    if requantize:
        plains = []
        for e in entries:
            q, report[e.path] = _requantized(e.layer, e.path, names if id(e.layer) in holders else None)
            plains.append((e, q))
    else:
        plains = [(e, _build_plain(e.layer, e.path, names if id(e.layer) in holders else None))
                  for e in entries]
    for e, plain in plains:
        adapter = e.layer
        # Give the wrapped layer its activation back, in case the user holds it.
        adapter.layer.activation = adapter.activation
        adapter.layer.activity_regularizer = adapter.activity_regularizer
        tree.replace_layer(model, e, plain)
    experts.fold_back_model(model)  # expert weights back into their banks
    adapted_model.mark_adapted(model)
    compiled.after_change(model)
    return report if requantize else None


def _holders(walked, entries):
    """`{id(set): its entry}` of the sets holding named adapters (`walked`:
    the model's `tree.walk`, `entries` its adapters)."""
    if not any(e.holder is not None for e in entries):
        return {}
    return {id(e.layer): e for e in walked if tree.is_adapter_set(e.layer)}


def _merge_names(model, walked, holders, adapter_names):
    if not holders:
        if adapter_names is not None:
            raise ValueError(
                f"merge: adapter_names={adapter_names!r} was given, but model "
                f"{model.name!r} has no named adapters."
            )
        return None
    active = adapter_set.names_in(adapter_set.sets(model, walked), active=True)
    if adapter_names is None:
        return active
    names = named.names_arg(model, adapter_names, "merge")
    inactive = [n for n in names if n not in active]
    if inactive:
        raise ValueError(
            f"merge: adapter {inactive[0]!r} is not active (the active adapters are "
            f"{active}); set_active(model, ...) to include it before merging it."
        )
    return names


def unmerge(model):
    """Take the update of adapters merged with `merge(model, unload=False)`
    back out of their kernels."""
    entries = _adapter_entries(model)
    _all_or_nothing(entries, lambda a: a.unmerge_in_place())
    compiled.reset_compiled_functions(model)


def set_adapter_enabled(model, enabled):
    """Switch every adapter of `model` on or off (the base output)."""
    entries = _adapter_entries(model)
    arguments.check("set_adapter_enabled", "enabled", enabled, opt.boolean)
    if not enabled:
        merged = [e.path for e in entries if e.layer.merged]
        if merged:
            raise ValueError(
                f"Adapters {merged} are merged into their kernels; "
                "unmerge(model) before disabling them."
            )
    for e in entries:
        e.layer.adapter_enabled = bool(enabled)
        if e.holder is not None:
            e.holder.adapter_enabled = bool(enabled)
    compiled.reset_compiled_functions(model)


@contextlib.contextmanager
def disable_adapter(model):
    """Context manager: inside it, the model computes its base output.

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="dense")])
        >>> _ = keras_lowrank.enable_adapter(model, targets=["dense"], rank=2)
        >>> with keras_lowrank.disable_adapter(model):
        ...     y_base = model(np.ones((1, 8), "float32"))
    """
    entries = _adapter_entries(model)
    before = [(e.layer, e.layer.adapter_enabled) for e in entries]
    before += [(s, s.adapter_enabled) for s in {id(e.holder): e.holder for e in entries if e.holder is not None}.values()]
    set_adapter_enabled(model, False)
    try:
        yield model
    finally:
        for adapter, enabled in before:
            adapter.adapter_enabled = enabled
        compiled.reset_compiled_functions(model)


def remove_adapters(model, paths=None):
    """Take adapters out without merging: each gives back the layer it wraps,
    with its activation, its kernel as it is and its own storage (used by
    `keras_lowrank.lora_drop` between its stages). Adapters that rewrote the
    kernel (PiSSA, ...) or are merged are refused, nothing changed."""
    entries = [e for e in _adapter_entries(model) if paths is None or e.path in paths]
    for e in entries:
        if e.holder is not None:
            raise ValueError(
                f"Layer {e.path!r} holds named adapters; delete_adapter(model, name) "
                "takes one out."
            )
        if e.layer.merged or e.layer.rewrites_kernel:
            raise ValueError(
                f"Layer {e.path!r}: a {e.layer.method!r} adapter that is merged or "
                "rewrote its kernel cannot be removed without merging."
            )
    for e in entries:
        adapter = e.layer
        adapter.layer.activation = adapter.activation
        adapter.layer.activity_regularizer = adapter.activity_regularizer
        tree.replace_layer(model, e, adapter.layer)
    experts.fold_back_model(model)
    adapted_model.mark_adapted(model)
    compiled.after_change(model)

