"""Reading a saved plan: the adapter plan an adapter file or a `.keras` file
carries, and the tensors of an adapter file.

`keras_lowrank.plan.Plan.from_saved` builds its plan from what is read
here: every field of every layer entry checked (the layer exists, the
method and its options, the base storage, the flags, the kernel shape),
the file re-keyed between a KerasHub task and its backbone, and every
tensor checked against the variable it loads into. Nothing here changes
the model.

Tensors in adapter files are named `<layer key>::<variable>`, those of a
method's model-level state `@<method>::<variable>` (`shared.FILE_PREFIX`)
and those of a layer trained in full `+<layer key>::<variable>`.
"""

import dataclasses

from keras_lowrank import _compat
from keras_lowrank import adapter_set
from keras_lowrank import bases
from keras_lowrank import registry
from keras_lowrank import shared
from keras_lowrank import targeting
from keras_lowrank import tree

#: version of the saved plan (adapter files and `.keras` adapter plans);
#: 1 keyed layers by path and kept the options beside the other fields
FORMAT_VERSION = 2

#: fields of a saved layer entry besides its options
LAYER_FIELDS = ("path", "method", "base", "double_quant", "merged", "enabled",
                "kernel_shape", "equation", "options", "matrix", "trainable", "adapter_name")

#: between a layer key and a variable name in a tensor's name
SEP = "::"
#: prefix of the tensors of layers trained in full, in adapter files
#: (`+<layer key>::<variable name>`)
FULL_PREFIX = "+"


@dataclasses.dataclass
class SavedLayer:
    """One layer entry of a saved plan, checked."""

    #: the entry's key in the file
    name: str
    #: its fields (`read_layer`), the options not yet validated
    fields: dict
    #: the layer of that key, if the model has it
    entry: tree.Entry
    #: for a named adapter's key `<key>@<name>`: the layer of `<key>`
    spot: tree.Entry
    spec: registry.Method
    #: the validated options
    options: dict
    #: the layer as messages name it
    here: str

    @property
    def adapter_name(self):
        return self.fields["adapter_name"]


def read_version(config, where):
    """The format version of a saved plan `config`, which must be a mapping
    with a `layers` mapping in a format this version reads."""
    if not isinstance(config, dict) or not isinstance(config.get("layers"), dict):
        raise ValueError(f"{where}: the adapter plan is malformed (no 'layers' mapping).")
    version = config.get("format_version", 1)
    if version not in (1, FORMAT_VERSION):
        raise ValueError(
            f"{where} was written in adapter format {version!r}; this "
            f"keras-lowrank reads formats 1 and {FORMAT_VERSION}. Upgrade keras-lowrank."
        )
    return version


def keyed(entries, version):
    """`{saved name: entry}`: format 2 names layers by key, format 1 by path."""
    return {(e.key if version >= 2 else e.path): e for e in entries}


def read_layer(name, raw, version, by_key, model, entries, where):
    """The `SavedLayer` of the entry `name: raw` of a saved plan, or a
    `ValueError` naming the layer and the fault."""
    fields = _saved_fields(raw, name, version, where)
    adapter_name = fields["adapter_name"]
    spot_key, at, suffix = name.rpartition("@") if "@" in name else (name, "", "")
    if adapter_name is not None:
        adapter_set.check_name(adapter_name, f"{where}: the adapter_name of layer {name!r}")
    if at and adapter_name != suffix:
        raise ValueError(f"{where}: layer {name!r} has adapter_name {adapter_name!r}.")
    entry = by_key.get(name)
    spot = by_key.get(spot_key)
    if entry is None and (not at or spot is None):
        raise ValueError(_missing_layer_message(where, spot_key, version, model, entries))
    spec = registry.get(fields["method"]) if isinstance(fields["method"], str) else None
    here = (entry or spot).path + ("" if entry is not None else "@" + suffix)
    if spec is None:
        raise ValueError(f"{where}: layer {here!r} has no valid 'method'.")
    label = f"{here!r} in {where}"
    options = spec.validate_options(fields["options"], label)
    base, double_quant = fields["base"], fields["double_quant"]
    try:
        bases.check_base(base, double_quant)
    except ValueError as e:
        raise ValueError(f"{where}: layer {here!r}: {e}") from None
    if base not in spec.base_kinds:
        raise ValueError(
            f"{where}: layer {here!r} holds a {spec.name!r} adapter "
            f"over a {base!r} base, which the method does not support."
        )
    for flag in ("merged", "enabled"):
        if not isinstance(fields[flag], bool):
            raise ValueError(f"{where}: layer {here!r}: {flag!r} must be true or false.")
    return SavedLayer(name, fields, entry, spot, spec, options, here)


def check_kernel_shape(saved, geometry, where):
    """The layer's kernel has the shape the file was made for."""
    shape = saved.fields.get("kernel_shape")
    if shape is not None and tuple(geometry.kernel_shape) != tuple(shape):
        raise ValueError(
            f"Layer {saved.here!r} has a kernel of shape "
            f"{tuple(geometry.kernel_shape)}; {where} was made for shape "
            f"{tuple(shape)}."
        )


def trainable_patterns(config, entries, where):
    """The patterns of the plan's `trainable_layers`, each matching a layer."""
    pats = targeting.patterns(config.get("trainable_layers"), f"trainable_layers of {where}")
    targeting.matching_entries(entries, pats, f"trainable_layers of {where}")
    return pats


def read_active(config, adapter_names, where):
    """The plan's active adapter names (`None`: no named adapters); a file
    without them has every named adapter of its layers (`adapter_names`)
    active."""
    active = config.get("active")
    if active is not None and (not isinstance(active, list) or not all(isinstance(n, str) for n in active)):
        raise ValueError(f"{where}: the plan's 'active' entry is not a list of adapter names.")
    if active is None and any(n is not None for n in adapter_names):
        active = sorted({n for n in adapter_names if n is not None})
    return active


def shared_configs(config, where):
    """`{method: config}` of the plan's model-level states."""
    saved = config.get("shared") or {}
    if not isinstance(saved, dict):
        raise ValueError(f"{where}: the plan's 'shared' entry is not a mapping.")
    return saved


def read_tensors(layers, states, entries, trainable_layers, tensors, where):
    """`(per layer, per state, full)`: an adapter file's `tensors` sorted
    by what they load into, each checked. Every tensor belongs to a planned
    layer (`layers`, `LayerPlan`s), a planned model-level state (`states`,
    `{method: (state, is_new)}`) or a layer the file trains in full, and
    every layer and state gets exactly the tensors it has, as finite floats
    of the right shape. `per layer` is `{layer key: {variable: value}}`,
    `per state` `{method: {variable: value}}`, `full` `[(variable,
    value)]`."""
    by_layer = {}
    known = {lp.key: lp for lp in layers} | {lp.path: lp for lp in layers}
    state_tensors = {}
    full = {n: v for n, v in tensors.items() if n.startswith(FULL_PREFIX)}
    full_tensors = _full_tensors(entries, trainable_layers, full, where)
    for name in tensors:
        if name in full:
            continue
        layer_name, sep, var = name.partition(SEP)
        if sep and layer_name.startswith(shared.FILE_PREFIX):
            method = layer_name[len(shared.FILE_PREFIX):]
            if method not in states:
                raise ValueError(
                    f"{where}: tensor {name!r} belongs to no shared state of the file's plan."
                )
            state_tensors.setdefault(method, {})[var] = tensors[name]
            continue
        if not sep or layer_name not in known:
            raise ValueError(
                f"{where}: tensor {name!r} belongs to no layer of the file's plan."
            )
        by_layer.setdefault(known[layer_name].key, {})[var] = tensors[name]
    per_layer = {}
    for lp in layers:
        want = lp.adapter.file_shapes(lp.geometry)
        have = by_layer.get(lp.key, {})
        if set(have) != set(want):
            raise ValueError(
                f"{where}: layer {lp.path!r} ({lp.spec.name}) needs "
                f"{sorted(want)}, the file holds {sorted(have)}."
            )
        for var, value in have.items():
            if not _shape_fits(tuple(value.shape), tuple(want[var])):
                raise ValueError(
                    f"{where}: {lp.path}{SEP}{var} has shape {tuple(value.shape)}, "
                    f"the layer needs {tuple(want[var])}."
                )
            _check_kind(value, "float32", f"{lp.path}{SEP}{var}", where)
        per_layer[lp.key] = have
    for method, (state, _) in states.items():
        want = {k: tuple(v.shape) for k, v in state.file_state().items()}
        have = state_tensors.get(method, {})
        if set(have) != set(want):
            raise ValueError(
                f"{where}: the {method} shared state needs {sorted(want)}, the "
                f"file holds {sorted(have)}."
            )
        variables = state.file_state()
        for var, value in have.items():
            if tuple(value.shape) != want[var]:
                raise ValueError(
                    f"{where}: {shared.FILE_PREFIX}{method}{SEP}{var} has shape "
                    f"{tuple(value.shape)}, the state needs {want[var]}."
                )
            _check_kind(value, variables[var].dtype, f"{shared.FILE_PREFIX}{method}{SEP}{var}", where)
    return per_layer, state_tensors, full_tensors


def full_variables(model):
    """`{tensor name: variable}` of what `model` trains in full besides its
    adapters: the layers its `trainable_layers` patterns name (the task's
    own layers included), each non-adapter layer inside them with its own
    trainable variables, named `+<layer key>::<variable name>`."""
    pats = targeting.patterns(getattr(model, "_klr_trainable_layers", None), "trainable_layers")
    if not pats:
        return {}
    entries = tree.walk(model)
    roots = [e for p in pats for e in entries if p.matches(e)]
    out = {}
    for e in entries:
        if tree.is_adapter(e.layer) or tree.is_adapter_set(e.layer) or not _inside(e, roots):
            continue
        for var in _compat.created_trainable(e.layer):
            if var.trainable:
                out[f"{FULL_PREFIX}{e.key}{SEP}{var.name}"] = var
    return out


def rerooted(model, entries, config, tensors, where):
    """`(config, tensors)` with the layer keys of a file saved from a
    KerasHub task model moved onto its backbone, or the reverse: a file
    saved from `lm.backbone` loads onto `lm` and one saved from `lm` onto
    `lm.backbone` (keys that all exist are kept as they are)."""
    keys = {e.key for e in entries}
    names = list(config["layers"])

    def found(name):
        return name in keys or ("@" in name and name.rpartition("@")[0] in keys)

    if not names or all(found(n) for n in names):
        return config, tensors
    move = None
    backbone = getattr(model, "backbone", None)
    prefix = next((e.key for e in entries if e.layer is backbone), None) if backbone is not model else None
    if prefix and all(found(f"{prefix}/{n}") for n in names):
        def move(key):
            return f"{prefix}/{key}"
    else:
        first = {n.split("/")[0] for n in names}
        head = first.pop() if len(first) == 1 else None
        if head and all("/" in n and found(n[len(head) + 1:]) for n in names):
            full = sorted(n for n in (tensors or {}) if n.startswith(FULL_PREFIX)
                          and not n[len(FULL_PREFIX):].startswith(head + "/"))
            if full:
                trained = sorted({n[len(FULL_PREFIX):].rpartition(SEP)[0] for n in full})
                raise ValueError(
                    f"{where} was saved from a task model around a backbone, and it trains "
                    f"the task's own layers {trained} in full, "
                    f"which {model.name!r} does not have: load it onto the task model, or "
                    "save the backbone's adapters alone with save_adapter(task.backbone, path)."
                )

            def move(key):
                return key[len(head) + 1:]
    if move is None:
        return config, tensors
    config = dict(config, layers={move(k): v for k, v in config["layers"].items()})
    if tensors is not None:
        def rename(name):
            if name.startswith(shared.FILE_PREFIX):
                return name
            if name.startswith(FULL_PREFIX):
                return FULL_PREFIX + move(name[len(FULL_PREFIX):])
            return move(name)

        tensors = {rename(n): v for n, v in tensors.items()}
    return config, tensors


# ----------------------------------------------------------------------
def _saved_fields(raw, name, version, where):
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: the entry of layer {name!r} is not a mapping.")
    raw = dict(raw)
    if version >= 2:
        unknown = sorted(set(raw) - set(LAYER_FIELDS))
        if unknown:
            raise ValueError(f"{where}: layer {name!r} has unknown fields {unknown}.")
        options = raw.get("options", {})
        if not isinstance(options, dict):
            raise ValueError(f"{where}: the options of layer {name!r} are not a mapping.")
    else:  # format 1: the options beside the other fields
        options = {k: v for k, v in raw.items() if k not in LAYER_FIELDS}
    shape = raw.get("kernel_shape")
    if shape is not None and (
        not isinstance(shape, list) or not all(isinstance(d, int) and d > 0 for d in shape)
    ):
        raise ValueError(f"{where}: layer {name!r} has a malformed kernel_shape {shape!r}.")
    return {
        "method": raw.get("method"),
        "base": raw.get("base", "float"),
        "double_quant": raw.get("double_quant", True),
        "merged": raw.get("merged", False),
        "enabled": raw.get("enabled", True),
        "adapter_name": raw.get("adapter_name"),
        "kernel_shape": shape,
        "options": options,
    }


def _missing_layer_message(where, name, version, model, entries):
    if version >= 2:
        return (
            f"{where} was saved for a different model: it names layer {name!r} "
            f"(a layer key: names given by you or the library, positions where "
            f"Keras made the name up), which {model.name!r} does not have. "
            f"Layer keys that exist: {sorted(e.key for e in entries)}."
        )
    return (
        f"{where} was saved for a different model: it names layer {name!r}, which "
        f"{model.name!r} does not have. Layer paths that exist: "
        f"{sorted(e.path for e in entries)}. (This file is in format 1, which keyed "
        "layers by their names, including names Keras made up and numbers per "
        "process: load it onto a model whose layers have those names, e.g. built "
        "first in a fresh process, then save it again with this version, whose "
        "keys do not depend on such names.)"
    )


def _inside(entry, roots):
    return any(entry.path == r.path or entry.path.startswith(r.path + "/") for r in roots)


def _full_tensors(entries, sources, tensors, where):
    """`[(variable, value)]` for an adapter file's `+<key>::<name>` tensors:
    each names a variable of a layer inside the file's `trainable_layers`,
    with its shape, as a float tensor."""
    if not tensors:
        return []
    pats = targeting.patterns(sources, "trainable_layers")
    roots = [e for p in pats for e in entries if p.matches(e)]
    by_key = {e.key: e for e in entries}
    out = []
    for name, value in tensors.items():
        key, sep, var_name = name[len(FULL_PREFIX):].rpartition(SEP)
        entry = by_key.get(key)
        if not sep or entry is None or tree.is_adapter(entry.layer) or not _inside(entry, roots):
            raise ValueError(
                f"{where}: tensor {name!r} belongs to no layer the file trains in full "
                f"(its trainable_layers: {sources})."
            )
        found = [v for v in _compat.created_trainable(entry.layer) if v.name == var_name]
        if len(found) != 1:
            raise ValueError(f"{where}: layer {entry.path!r} has no variable {var_name!r} (tensor {name!r}).")
        if tuple(value.shape) != tuple(found[0].shape):
            raise ValueError(
                f"{where}: tensor {name!r} has shape {tuple(value.shape)}; layer "
                f"{entry.path!r} needs {tuple(found[0].shape)}."
            )
        _check_kind(value, found[0].dtype, name, where)
        out.append((found[0], value))
    return out


def _shape_fits(shape, want):
    """Whether a file tensor's `shape` is the `want`ed one (`None`: any size)."""
    return len(shape) == len(want) and all(w is None or s == w for s, w in zip(shape, want))


def _check_kind(value, dtype, name, where):
    """A file tensor goes into a variable of the same kind (float or int),
    never cast across: an int or bool tensor for a float variable is an
    error, not a silent conversion."""
    want = "f" if "float" in str(dtype) else "i"
    have = {"f": "f", "i": "i", "u": "i"}.get(value.dtype.kind, value.dtype.kind)
    if have != want:
        raise ValueError(
            f"{where}: tensor {name!r} has dtype {value.dtype}; the variable it "
            f"loads into is {dtype} (nothing was loaded)."
        )
