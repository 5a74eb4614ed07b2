"""Adapter-only files: every variable an adapter changed, and the layers the
model trains in full (`trainable_layers`, a KerasHub task's own layers), in
safetensors.

The file's metadata holds the plan (method, options, base storage and kernel
shape per layer), so loading can rebuild the adapters on a fresh copy of the
base model and refuse a file made for another model. Layers are keyed by
their `tree` key: the names you or the library gave them, and their position
among siblings where Keras made the name up (`dense_3` → `dense[1]`), so a
file loads onto any build of the same architecture, in this process or
another.

Loading checks the whole file before it changes anything: its format, the
plan (each layer's options are validated like `enable_adapter`'s
arguments), that every tensor is a finite float tensor of a variable the
adapter has, with its shape, and that no tensor belongs to a layer outside
the plan.
"""

import json
import os
import tempfile

import numpy as np
from keras import ops

from keras_lowrank import adapt
from keras_lowrank import adapted_model
from keras_lowrank import arguments
from keras_lowrank import named
from keras_lowrank import options as opt
from keras_lowrank import plan as plan_lib
from keras_lowrank import registry
from keras_lowrank import saved_plan
from keras_lowrank import shared
from keras_lowrank import tree
from keras_lowrank.saved_plan import SEP

FORMAT = "keras_lowrank.adapter"
#: "1": layers keyed by path, options beside the other fields;
#: "2": layers keyed by stable key, options nested
VERSION = str(saved_plan.FORMAT_VERSION)


def _np(x):
    return np.asarray(ops.convert_to_numpy(x))


def _contiguous(x):
    """A C-contiguous NumPy copy that keeps 0-d arrays 0-d
    (`np.ascontiguousarray` makes them 1-d)."""
    return np.array(_np(x), order="C", copy=True)


def save_adapter(model, path, as_lora=False, adapter_name=None):
    """Save only the adapters of `model` to a safetensors file.

    The file is written beside `path` first and renamed into place, so a
    failed write never leaves a half-written file.

    Args:
        model: a model with adapters.
        path: file path (conventionally `*.safetensors`).
        as_lora: save every adapter whose method has a plain-LoRA form
            (`Method.export_forms`) as a plain LoRA: PiSSA and OLoRA as the
            rank-2r LoRA that applies to the *original* base kernel (spec
            §16), DyLoRA at its inference rank, VeRA as `A diag(d)`,
            `B diag(b)`, LoRA+ as LoRA.
        adapter_name: save only the named adapter of that name (it loads
            as the active one). By default the file holds every named
            adapter and which ones are active.

    Examples:

        >>> import keras, numpy as np, tempfile, os
        >>> import keras_lowrank
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="dense")])
        >>> _ = keras_lowrank.enable_adapter(model, targets=["dense"], rank=2)
        >>> f = os.path.join(tempfile.mkdtemp(), "a.safetensors")
        >>> keras_lowrank.save_adapter(model, f)
    """
    from safetensors.numpy import save_file

    arguments.check("save_adapter", "as_lora", as_lora, opt.boolean)
    found = {e.key: e.layer for e in tree.walk(model) if tree.is_adapter(e.layer)}
    if not found:
        raise ValueError(f"Model {model.name!r} has no adapters to save.")
    config = adapted_model.plan_config(model)
    if adapter_name is not None:
        named.names_arg(model, [adapter_name], "save_adapter")
        config["layers"] = {k: c for k, c in config["layers"].items()
                            if c.get("adapter_name") == adapter_name}
        config["active"] = [adapter_name]
        in_use = {c["method"] for c in config["layers"].values()}
        config["shared"] = {m: c for m, c in config["shared"].items() if m in in_use}
    tensors = {}
    converted = set()
    for key, cfg in config["layers"].items():
        a = found[key]
        state = a.file_tensors()
        if as_lora:
            method, lora_state, options = registry.convert(a, registry.LORA_FORM, f"as_lora=True: layer {cfg['path']!r}")
            extra = {k: v for k, v in state.items() if k == "base_bias"}
            state = {**lora_state, **extra}
            converted.add(a.method)
            cfg["method"], cfg["options"] = method, options
            cfg["trainable"] = int(sum(np.prod(tuple(v.shape)) for v in lora_state.values()))
        for name, value in state.items():
            tensors[f"{key}{SEP}{name}"] = _contiguous(value)
    for name, var in saved_plan.full_variables(model).items():  # trained in full
        tensors[name] = _contiguous(var)
    for method in converted:
        config["shared"].pop(method, None)
    for method, shared_state in shared.states(model).items():
        if method in config["shared"]:
            for name, value in shared_state.file_state().items():
                tensors[f"{shared.FILE_PREFIX}{method}{SEP}{name}"] = _contiguous(value)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": type(model).__name__,
        "plan": json.dumps(config),
    }
    path = os.path.abspath(arguments.path("save_adapter", "path", path))
    write_files(os.path.dirname(path), {
        os.path.basename(path): lambda tmp: save_file(tensors, tmp, metadata=meta),
    })


def write_files(folder, writers):
    """Write files into `folder` all or nothing.

    `writers` maps each file name to `write(tmp_path)`, which writes the
    whole file to a temporary path beside it. Only when every file is
    written are they renamed into place; a failure on the way (a writer's
    error, a full disk, an interrupt) removes the temporary files and puts
    back the files the folder had, so it never holds a mix of old and new
    files or a half-written one."""
    os.makedirs(folder, exist_ok=True)
    temps, moved = {}, []
    try:
        for name, write in writers.items():
            fd, tmp = tempfile.mkstemp(prefix=".klr-", suffix=".tmp", dir=folder)
            os.close(fd)
            temps[name] = tmp
            write(tmp)
        for name, tmp in temps.items():
            target = os.path.join(folder, name)
            backup = None
            if os.path.exists(target):
                fd, backup = tempfile.mkstemp(prefix=".klr-", suffix=".old", dir=folder)
                os.close(fd)
                os.replace(target, backup)
            moved.append((target, backup))
            os.replace(tmp, target)
    except BaseException:
        for target, backup in reversed(moved):
            if backup is not None:
                os.replace(backup, target)
            elif os.path.exists(target):
                os.remove(target)
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    for _, backup in moved:
        if backup is not None:
            os.remove(backup)


def read_adapter_file(path, tensors=True):
    """`(metadata, plan, tensors)` of an adapter file, every part checked.

    Raises `FileNotFoundError` for a missing file and `ValueError` naming
    the file and the fault for anything malformed. With `tensors=False` only
    the metadata is read (no tensor is loaded).
    """
    from safetensors import safe_open

    name = arguments.path("read_adapter_file", "path", path)
    if not os.path.exists(name):
        raise FileNotFoundError(f"No such adapter file: {name}")
    if not os.path.isfile(name):
        raise ValueError(f"{name} is not a file.")
    try:
        with safe_open(name, framework="np") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
            if meta.get("format") != FORMAT:
                raise ValueError(
                    f"{name} is a safetensors file but not a keras_lowrank adapter "
                    "file (its metadata has no format 'keras_lowrank.adapter')."
                )
            values = {k: f.get_tensor(k) for k in keys} if tensors else None
    except ValueError:
        raise
    except Exception as e:  # safetensors' own errors: not a safetensors file
        raise ValueError(
            f"{name} is not a readable safetensors adapter file ({type(e).__name__}: {e})."
        ) from None
    version = meta.get("version")
    if version not in ("1", VERSION):
        raise ValueError(
            f"{name} is adapter format {version!r}; this keras-lowrank reads "
            f"formats '1' and {VERSION!r}. Upgrade keras-lowrank."
        )
    if "plan" not in meta:
        raise ValueError(f"{name} has no adapter plan in its metadata.")
    try:
        plan = json.loads(meta["plan"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: the adapter plan is not valid JSON ({e}).") from None
    if not isinstance(plan, dict) or not isinstance(plan.get("layers"), dict):
        raise ValueError(f"{name}: the adapter plan is malformed (no 'layers' mapping).")
    if version == "1":
        plan = dict(plan, format_version=1)
    elif plan.get("format_version") != saved_plan.FORMAT_VERSION:
        raise ValueError(f"{name}: the plan's format_version does not match the file's version.")
    if values is not None:
        for key, value in values.items():
            if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
                raise ValueError(
                    f"{name}: tensor {key!r} holds NaN or inf values (nothing was loaded)."
                )
    return meta, plan, values


def load_adapter(model, path):
    """Load an adapter file into `model`: a fresh copy of the base model (in
    this process or another), or the same model with the same adapters.

    Every check runs before the model is touched: the layers must exist
    (matched by key, see the module docstring), each layer's config must be
    valid for its method, the kernel shapes must match, and every variable
    must be in the file as a finite float tensor of the right shape. A
    refused file leaves the model as it was.

    Examples:

        >>> import keras, numpy as np, tempfile, os
        >>> import keras_lowrank
        >>> build = lambda: keras.Sequential([keras.Input((8,)), keras.layers.Dense(16),
        ...                                   keras.layers.Dense(4)])
        >>> src = build()
        >>> _ = keras_lowrank.enable_adapter(src, rank=2)
        >>> f = os.path.join(tempfile.mkdtemp(), "a.safetensors")
        >>> keras_lowrank.save_adapter(src, f)
        >>> fresh = build()  # Keras names its layers dense_2, dense_3
        >>> keras_lowrank.load_adapter(fresh, f).adapted_paths == [fresh.layers[0].name]
        True
    """
    where = f"adapter file {arguments.path('load_adapter', 'path', path)}"
    _, config, tensors = read_adapter_file(path)
    plan = plan_lib.Plan.from_saved(model, config, where, tensors=tensors)
    plan.prepare()

    def fill(lp):
        a = lp.adapter
        original = a.original_matrix(a.base_matrix())
        if a.derived and not lp.existing:
            a.derive(original, lp.tensors)
        a.load_file_tensors(lp.tensors)
        a.rebase(original)

    plan.apply(init=False, fill=fill)
    return adapt.summarize(model)
