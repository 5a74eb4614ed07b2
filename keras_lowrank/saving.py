"""Adapter-only files: every variable an adapter changed, in safetensors.

The file's metadata holds the plan (method and options per layer path) and
the base kernel shape of each layer, so loading can rebuild the adapters on a
fresh copy of the base model and refuse a file made for another model.
"""

import json

import numpy as np
from keras import ops

from keras_lowrank import adapt
from keras_lowrank import bases
from keras_lowrank import registry
from keras_lowrank import tree
from keras_lowrank.adapter import Adapter

FORMAT = "keras_lowrank.adapter"
VERSION = "1"
SEP = "::"


def _np(x):
    return np.asarray(ops.convert_to_numpy(x))


def save_adapter(model, path, as_lora=False):
    """Save only the adapters of `model` to a safetensors file.

    Args:
        model: a model with adapters.
        path: file path (conventionally `*.safetensors`).
        as_lora: save SVD-initialized adapters (PiSSA) as a plain rank-2r
            LoRA that applies to the *original* base kernel (spec §16).

    Example:

    >>> import keras, numpy as np, tempfile, os
    >>> import keras_lowrank
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="dense")])
    >>> _ = keras_lowrank.enable_adapter(model, targets=["dense"], rank=2)
    >>> f = os.path.join(tempfile.mkdtemp(), "a.safetensors")
    >>> keras_lowrank.save_adapter(model, f)
    """
    from safetensors.numpy import save_file

    tensors = {}
    layers = {}
    found = adapt.adapters(model)
    if not found:
        raise ValueError(f"Model {model.name!r} has no adapters to save.")
    for lpath, a in found:
        cfg = {"method": a.method, **a.adapter_config()}
        state = {name: var for name, var in a.adapter_state().items()}
        if as_lora and a.method != "lora":
            if not hasattr(a, "as_lora_state"):
                raise ValueError(
                    f"as_lora=True: layer {lpath!r} has a {a.method!r} adapter, "
                    "which has no plain-LoRA form; save it as it is."
                )
            lora_state, overrides = a.as_lora_state()
            extra = {k: v for k, v in state.items() if k == "base_bias"}
            state = {**lora_state, **extra}
            cfg = {
                "method": "lora",
                "rank": overrides["rank"],
                "alpha": overrides["alpha"],
                "rslora": a.rslora,
                "init": "kaiming",
                "dropout": a.dropout,
                "train_bias": a.train_bias,
                "seed": a.seed,
            }
        cfg["base"] = bases.base_kind(a.layer)
        cfg["double_quant"] = getattr(a.layer, "double_quant", True)
        cfg["kernel_shape"] = list(a.geometry.kernel_shape)
        cfg["equation"] = a.geometry.equation
        layers[lpath] = cfg
        for name, value in state.items():
            tensors[f"{lpath}{SEP}{name}"] = np.ascontiguousarray(_np(value))
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": type(model).__name__,
        "plan": json.dumps({"layers": layers, "trainable_layers": getattr(model, "_klr_trainable_layers", None)}),
    }
    save_file(tensors, str(path), metadata=meta)


def read_adapter_file(path):
    """`(plan, tensors)` of an adapter file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a keras_lowrank adapter file.")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return json.loads(meta["plan"]), tensors


def load_adapter(model, path):
    """Load an adapter file into `model` (a fresh copy of the base model, or
    the same model with the same adapters).

    Every check runs before the model is touched: the layer paths must exist,
    the kernel shapes and the methods must match, and every variable must be
    in the file with the right shape.
    """
    plan, tensors = read_adapter_file(path)
    entries = {e.path: e for e in tree.walk(model)}
    todo = []
    for lpath, cfg in plan["layers"].items():
        cfg = dict(cfg)
        kernel_shape = tuple(cfg.pop("kernel_shape"))
        cfg.pop("equation", None)
        base = cfg.pop("base", "float")
        double_quant = cfg.pop("double_quant", True)
        bases.check_base(base, double_quant)
        entry = entries.get(lpath)
        if entry is None:
            raise ValueError(
                f"Adapter file {path} was saved for a different model: it "
                f"names layer {lpath!r}, which {model.name!r} does not have. "
                f"Layer paths that exist: {sorted(entries)}."
            )
        spec = registry.get(cfg["method"])
        layer = entry.layer
        if isinstance(layer, Adapter):
            if layer.method != spec.name:
                raise ValueError(
                    f"Layer {lpath!r} has a {layer.method!r} adapter; the file "
                    f"holds a {spec.name!r} adapter."
                )
            have = layer.geometry.kernel_shape
        else:
            bases.check_supported(layer, lpath)
            mode = bases.quantization_mode(layer)
            if mode is not None and spec.layer_class.init_on_full_precision:
                raise ValueError(
                    f"Layer {lpath!r} is quantized by Keras (mode={mode!r}); a "
                    f"{spec.name!r} adapter rewrites its full-precision kernel. "
                    "Load the file into the float model (the saved base storage "
                    "is re-applied)."
                )
            have = bases.float_kernel_shape(layer)
        if tuple(have) != kernel_shape:
            raise ValueError(
                f"Layer {lpath!r} has a kernel of shape {tuple(have)}; the "
                f"adapter file was made for shape {kernel_shape}."
            )
        todo.append((entry, spec, cfg, base, double_quant))

    # Build the adapters we need (not yet in the model) and check the tensors.
    fresh = []
    for entry, spec, cfg, _, _ in todo:
        if not isinstance(entry.layer, Adapter):
            options = {k: v for k, v in cfg.items() if k not in ("method",)}
            fresh.append((entry, spec, options))
    created = adapt._install(model, fresh, init=False) if fresh else []
    try:
        current = {e.path: e.layer for e in tree.walk(model)}
        for entry, spec, cfg, _, _ in todo:
            a = current[entry.path]
            state = a.adapter_state()
            names = {k.split(SEP, 1)[1] for k in tensors if k.split(SEP, 1)[0] == entry.path}
            if names != set(state):
                raise ValueError(
                    f"Adapter file {path}: layer {entry.path!r} ({spec.name}) "
                    f"needs {sorted(state)}, the file holds {sorted(names)}."
                )
            for name, var in state.items():
                value = tensors[f"{entry.path}{SEP}{name}"]
                if tuple(value.shape) != tuple(var.shape):
                    raise ValueError(
                        f"Adapter file {path}: {entry.path}{SEP}{name} has "
                        f"shape {tuple(value.shape)}, the layer needs "
                        f"{tuple(var.shape)}."
                    )
    except Exception:
        # Take the freshly installed adapters out again.
        for a in created:
            e = tree.find(model, _path_of(model, a))
            a.layer.activation = a.activation
            tree.replace_layer(model, e, a.layer)
            bases.freeze_kernel(a.layer, trainable=True)
            if bases.bias_variable(a.layer) is not None:
                bases.bias_variable(a.layer).trainable = True
        raise
    fresh_ids = {id(a) for a in created}
    for entry, spec, cfg, base, double_quant in todo:
        a = current[entry.path]
        original = a.original_matrix(a.base_matrix())
        for name, var in a.adapter_state().items():
            var.assign(tensors[f"{entry.path}{SEP}{name}"])
        a.rebase(original)
        # A fresh float base moves to the saved storage after the rebase, so
        # that an SVD residual is quantized from full precision, as at save.
        convert = bases.converter(base, double_quant)
        if id(a) in fresh_ids and convert is not None:
            a.attach_base(convert, init=False)
    adapt.freeze(model, plan.get("trainable_layers"))
    adapt.mark_adapted(model, plan.get("trainable_layers"))
    adapt._after_change(model)
    return adapt.summarize(model)


def _path_of(model, layer):
    for e in tree.walk(model):
        if e.layer is layer:
            return e.path
    return None
