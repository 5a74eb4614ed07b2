"""PEFT adapter directories on KerasHub models converted from Hugging Face.

A PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`)
names torch modules (`model.layers.3.self_attn.q_proj`) and stores their
factors in torch's `nn.Linear` layout. KerasHub loads the base checkpoint
through one converter per model family, which says, weight by weight, which
Keras variable a Hugging Face weight goes to and how its layout changes
(`port_weight(variable, key, hook_fn)`). This module runs that same
converter with a recorder in place of the checkpoint reader, so a PEFT
module maps onto exactly the KerasHub layer its base weight went to, for
every family whose converter ports its projections this way (Gemma, Llama,
Mistral, Qwen, ...).

The layout follows from the converter too: passing arrays of torch row and
column indices through the converter's `hook_fn` and then into the matrix
view of the Keras kernel (`KernelGeometry`) gives, for each row and column
of the matrix view, the torch input and output unit it holds. Head-split
`EinsumDense` kernels (`(heads, d_model, head_dim)`) come out as index
permutations; a hook that scales or mixes values is refused.

Formats: each method that PEFT also has declares its PEFT adapter type
beside its code (`keras_lowrank.peft_codec.Format`, registered with the
method): LoRA and DoRA (PEFT's `LORA`), LoHa, LoKr, AdaLoRA and VeRA. This
module does what every format shares: the module mapping and the layouts,
reading and checking the directory, planning the adapters before the model
changes, and writing a directory (every method with a plain-LoRA form as
PEFT's LoRA when its own type is not written).
"""

import json
import os
import re

import numpy as np

from keras_lowrank import adapter_set
from keras_lowrank import arguments
from keras_lowrank import bases
from keras_lowrank import experts
from keras_lowrank import linalg
from keras_lowrank import named
from keras_lowrank import peft_codec
from keras_lowrank import peft_experts
from keras_lowrank import registry
from keras_lowrank import saving
from keras_lowrank import tree

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."

#: PEFT LoRA options we honour; any other option set away from PEFT's
#: default is refused by name.
_DEFAULTS = {
    "bias": "none",
    "lora_bias": False,
    "modules_to_save": None,
    "layer_replication": None,
    "trainable_token_indices": None,
    "use_qalora": False,
    "use_bdlora": None,
    "alora_invocation_tokens": None,
    "megatron_config": None,
}


class _Unrecordable(Exception):
    pass


class _KernelRef:
    """What the converter sees as the `kernel` of a layer that already holds
    an adapter (its shape is the float kernel's)."""

    def __init__(self, adapter, layer):
        self.adapter = adapter
        self.shape = tuple(bases.float_kernel_shape(layer))


class _Proxy:
    """A layer as the converter sees it: attribute reads go to the layer,
    an adapter answers for its base layer, and an adapted kernel is a
    `_KernelRef`."""

    def __init__(self, obj):
        object.__setattr__(self, "_obj", obj)

    def __getattr__(self, name):
        obj = self._obj
        if tree.is_adapter(obj) or tree.is_adapter_set(obj):
            if name == "kernel" or (name == "embeddings" and bases.is_embedding(obj.layer)):
                return _KernelRef(obj, obj.layer)
            obj = obj.layer
        return _wrap(getattr(obj, name))

    def __setattr__(self, name, value):
        raise _Unrecordable(f"the converter sets {name!r}")


class _VariableRef:
    """A variable as the converter sees it: readable, and `assign` does
    nothing (the converter's writes of stacked expert weights are not
    recorded: `keras_lowrank.peft_experts` maps those)."""

    def __init__(self, variable):
        self.variable = variable

    def __getattr__(self, name):
        return getattr(self.variable, name)

    def assign(self, value):
        pass


def _wrap(value):
    import keras

    if isinstance(value, (keras.Variable, experts.ExpertSlot)):
        return _VariableRef(value)
    if isinstance(value, keras.layers.Layer):
        return _Proxy(value)
    if isinstance(value, (list, tuple)) and value and all(
        isinstance(v, keras.layers.Layer) for v in value
    ):
        return type(value)(_Proxy(v) for v in value)
    if callable(value) and not isinstance(value, type):
        def call(*args, **kwargs):
            return _wrap(value(*args, **kwargs))

        return call
    return value


class _Recorder:
    """Stands in for KerasHub's `SafetensorLoader`: records each
    `port_weight` instead of reading the checkpoint."""

    def __init__(self, shapes=None):
        self.ports = {}
        #: `{checkpoint key: shape}`, or `None` without a checkpoint
        self.shapes = shapes

    def port_weight(self, keras_variable, hf_weight_key, hook_fn=None):
        keras_variable = getattr(keras_variable, "variable", keras_variable)
        self.ports.setdefault(hf_weight_key, []).append((keras_variable, hook_fn))

    def get_tensor(self, hf_weight_key):
        """A weight the converter reads itself (MoE expert stacks): zeros of
        its shape, one byte each and all one value until stacked, so the
        converter goes on to the next layers."""
        if self.shapes is None or hf_weight_key not in self.shapes:
            raise _Unrecordable(f"the converter reads {hf_weight_key!r} itself")
        return np.broadcast_to(np.zeros((), np.uint8), self.shapes[hf_weight_key])

    def __getattr__(self, name):
        raise _Unrecordable(f"the converter uses loader.{name}")


# ----------------------------------------------------------------------
# The model side: which layer each Hugging Face module went to
def _backbone(model):
    return getattr(model, "backbone", None) or model


def _hf_config(base_model, adapter_config=None):
    """The Hugging Face `config.json` of the base model, as a dict."""
    if isinstance(base_model, dict):
        return base_model
    if base_model is None and adapter_config is not None:
        candidate = adapter_config.get("base_model_name_or_path")
        if candidate and os.path.isfile(os.path.join(str(candidate), "config.json")):
            base_model = candidate
    if base_model is None:
        raise ValueError(
            "base_model: give the Hugging Face model directory the KerasHub model "
            "was converted from (its config.json names KerasHub's converter), or "
            "that config as a dict."
        )
    path = os.path.join(arguments.path("load_peft_adapter", "base_model", base_model), "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"base_model={base_model!r}: there is no config.json in it.")
    return _json_object(path, "a Hugging Face model config")


def _json_object(path, what):
    """The JSON object in the file `path`, or a `ValueError` naming the
    file: not JSON, or JSON that is not an object (`what` it should be)."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}).") from None
    if not isinstance(value, dict):
        raise ValueError(
            f"{path} must hold a JSON object ({what}); it holds "
            f"{'null' if value is None else 'a JSON ' + type(value).__name__}."
        )
    return value


def _converter(hf_config):
    try:
        from keras_hub.src.utils.transformers.preset_loader import TransformersPresetLoader
    except ImportError as e:  # pragma: no cover - keras-hub is an extra
        raise ImportError("PEFT adapters need keras-hub: pip install keras-lowrank[hub]") from e
    if "model_type" not in hf_config:
        raise ValueError("base_model: the Hugging Face config has no 'model_type'.")
    try:
        return TransformersPresetLoader(None, hf_config).converter
    except ValueError as e:
        raise ValueError(
            f"PEFT adapters: KerasHub has no converter for model_type "
            f"{hf_config['model_type']!r}, so its modules cannot be mapped ({e})"
        ) from None


class _Target:
    """One Hugging Face module and the Keras layer its weight went to."""

    def __init__(self, module, path, layer, adapter, hook):
        self.module, self.path, self.layer, self.adapter = module, path, layer, adapter
        self.geometry = bases.geometry_of(layer)
        self.hook = hook
        #: an embedding table (PEFT: `lora_embedding_A/B`, stored (vocabulary, dim))
        self.embedding = bases.is_embedding(layer)

    def layout(self, n_out, n_in, transposed=False):
        """`(p_in, p_out)`: the torch input unit of each row of the matrix
        view and the torch output unit of each of its columns, for a
        Hugging Face weight of `n_out × n_in` units stored `(n_out, n_in)`
        (a torch Linear) or, `transposed`, `(n_in, n_out)` (GPT-2's Conv1D,
        PEFT's `fan_in_fan_out`). `p_in` covers every input; `p_out` may be
        a part of the outputs (a fused projection that the converter
        splits into several layers)."""
        g = self.geometry
        where = f"module {self.module!r} (Keras layer {self.path!r})"
        if g.batch_shape:
            raise ValueError(f"PEFT adapters: {where} has a batched kernel ({g.matrix_text()}), "
                             "which a torch Linear does not have.")
        shape = tuple(g.kernel_shape)

        def through(values):
            if transposed:
                values = np.ascontiguousarray(values.T)
            try:
                out = values if self.hook is None else self.hook(values, list(shape))
                out = np.asarray(out, np.float64)
            except ValueError:
                out = None
            if out is None or out.shape != shape:
                raise ValueError(
                    f"PEFT adapters: {where}: KerasHub's converter does not turn a "
                    f"{'(n_in, n_out)' if transposed else '(n_out, n_in)'} weight of "
                    f"{n_out} outputs and {n_in} inputs into the kernel's shape {shape}."
                )
            return np.transpose(out, g.perm).reshape(g.matrix_shape)

        rows = through(np.repeat(np.arange(n_out, dtype=np.float64)[:, None], n_in, 1))
        cols = through(np.repeat(np.arange(n_in, dtype=np.float64)[None, :], n_out, 0))
        p_out, p_in = rows[0].astype(np.int64), cols[:, 0].astype(np.int64)
        if not (np.array_equal(rows, np.broadcast_to(p_out[None, :], rows.shape))
                and np.array_equal(cols, np.broadcast_to(p_in[:, None], cols.shape))
                and len(np.unique(p_out)) == len(p_out)
                and np.array_equal(np.sort(p_in), np.arange(n_in))):
            raise ValueError(
                f"PEFT adapters: {where}: KerasHub's converter does more than reorder "
                "or split the weight's rows and columns (it mixes or rescales "
                "values), which this layout mapping does not cover."
            )
        return p_in, p_out

    def oriented_layout(self, n_out, n_in, transposed=None):
        """`(p_in, p_out, transposed)`, trying the torch Linear layout first
        when `transposed` is `None`."""
        if transposed is not None:
            return (*self.layout(n_out, n_in, transposed), transposed)
        try:
            return (*self.layout(n_out, n_in, False), False)
        except ValueError:
            return (*self.layout(n_out, n_in, True), True)


def _checkpoint_shapes(base_model):
    """`{weight name: shape}` of the base model's safetensors checkpoint
    (read from the file headers), or `None` when there is none to read."""
    if isinstance(base_model, dict) or base_model is None:
        return None
    from safetensors import safe_open

    folder = os.fspath(base_model)
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        return None
    shapes = {}
    for name in files:
        with safe_open(os.path.join(folder, name), framework="np") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def _checkpoint_keys(base_model):
    """The weight names in the base model's safetensors checkpoint (read from
    the file headers), or `None` when there is no checkpoint to read."""
    shapes = _checkpoint_shapes(base_model)
    return None if shapes is None else set(shapes)


def _module_names(targets, base_model):
    """`{converter key: module name}`: KerasHub's converters may name a
    weight without the prefix its checkpoint has (`h.0.attn.c_attn` for
    GPT-2's `transformer.h.0.attn.c_attn`); the checkpoint says which."""
    keys = _checkpoint_keys(base_model)
    names = {}
    for module in targets:
        name = module
        if keys is not None and module + ".weight" not in keys:
            found = [k for k in keys if k.endswith("." + module + ".weight")]
            if len(found) == 1:
                name = found[0][: -len(".weight")]
        names[module] = name
    return names


def module_map(model, base_model, checkpoint=None):
    """`{module name: [_Target, ...]}`: the Dense/EinsumDense layers of
    `model` (a KerasHub backbone or task model) that KerasHub's converter
    for `base_model` (a Hugging Face model directory or its config dict)
    fills from each Hugging Face `<module>.weight` (several layers for a
    fused projection the converter splits). `checkpoint`: the model
    directory whose weight shapes the converter may read, when `base_model`
    is a config dict."""
    hf_config = _hf_config(base_model)
    converter = _converter(hf_config)
    backbone = _backbone(model)
    if not isinstance(backbone, converter.backbone_cls):
        raise ValueError(
            f"PEFT adapters: the base model is a {hf_config['model_type']!r} checkpoint, "
            f"which KerasHub converts to {converter.backbone_cls.__name__}; the model's "
            f"backbone is a {type(backbone).__name__}."
        )
    recorder = _Recorder(_checkpoint_shapes(base_model if checkpoint is None else checkpoint))
    try:
        converter.convert_weights(_Proxy(backbone), recorder, hf_config)
    except _Unrecordable:
        pass  # what was recorded before stays usable; the rest is unmapped
    owners = {}
    for e in tree.walk(model):
        layer = e.layer
        if (tree.is_adapter(layer) or tree.is_adapter_set(layer)) and e.holder is None:
            owners[id(layer)] = (e.path, layer.layer, layer)
        elif bases.is_linear_layer(layer):
            var = bases.kernel_variable(layer)
            if var is not None:
                owners[id(var)] = (e.path, layer, None)
    targets = {}
    for key, ports in recorder.ports.items():
        if not key.endswith(".weight"):
            continue
        module = key[: -len(".weight")]
        for var, hook in ports:
            owner = owners.get(id(var.adapter) if isinstance(var, _KernelRef) else id(var))
            if owner is not None:
                targets.setdefault(module, []).append(
                    _Target(module, owner[0], owner[1], owner[2], hook))
    return targets


# ----------------------------------------------------------------------
# Reading a PEFT directory
def read_dir(path):
    """`(config, tensors)` of a PEFT adapter directory, checked as files: the
    config is a JSON object, the weights a readable safetensors file of
    finite float tensors."""
    path = arguments.path("load_peft_adapter", "path", path)
    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path!r} is not a PEFT adapter directory: no {CONFIG_FILE}.")
    config = _json_object(cfg_path, "PEFT's adapter config")
    weights = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        extra = " (adapter_model.bin is a torch pickle; re-save it with safetensors)" if \
            os.path.isfile(os.path.join(path, "adapter_model.bin")) else ""
        raise FileNotFoundError(f"{path!r}: no {WEIGHTS_FILE}{extra}.")
    from safetensors.numpy import load_file

    try:
        tensors = load_file(weights)
    except Exception as e:  # safetensors' own errors (truncated, not safetensors, bfloat16)
        raise ValueError(
            f"{weights} is not a readable safetensors file of float32/float16 tensors "
            f"({type(e).__name__}: {e})."
        ) from None
    # index tensors a format declares (SHiRA's entries) are integers
    index_parts = {p for f in registry.peft_formats().values() for p in f.index_parts}
    for name, value in tensors.items():
        if value.dtype.kind != "f" and not (value.dtype.kind in "iu" and name.split(".")[-1] in index_parts):
            raise ValueError(f"{weights}: tensor {name!r} has dtype {value.dtype}; PEFT factors are floats.")
        if not linalg.all_finite(value):
            raise ValueError(f"{weights}: tensor {name!r} holds NaN or inf values (nothing was loaded).")
    return config, tensors


def _pattern_config(config, key, kind):
    """`config[key]` as `{regex: value}`: a JSON object whose keys are valid
    regular expressions and whose values are ranks (`kind` "int") or
    alphas (finite numbers)."""
    value = config.get(key) or {}
    if not isinstance(value, dict):
        raise ValueError(
            f"PEFT adapter config: {key} must be a JSON object {{module regex: value}}; "
            f"received {value!r}."
        )
    for regex, v in value.items():
        try:
            re.compile(regex)
        except re.error as e:
            raise ValueError(f"PEFT adapter config: {key} key {regex!r} is not a valid regular expression ({e}).") from None
        peft_codec.config_value({key: v}, key, None, kind, low=0, low_open=True)
    return value


def check_config(config):
    formats = registry.peft_formats()
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type not in formats:
        raise ValueError(
            f"PEFT adapter: peft_type {peft_type!r} is not supported; keras-lowrank "
            f"reads {', '.join(sorted(formats))}."
        )
    for name, default in _DEFAULTS.items():
        value = config.get(name, default)
        if value != default and value not in (None, False, [], {}):
            raise ValueError(
                f"PEFT adapter option {name}={value!r} is not supported (only "
                f"{default!r}): keras-lowrank cannot load it faithfully."
            )
    peft_codec.config_value(config, "r", 8, "int", low=0, low_open=True)
    peft_codec.config_value(config, "fan_in_fan_out", False, "bool")
    _pattern_config(config, "rank_pattern", "int")
    _pattern_config(config, "alpha_pattern", "number")
    formats[peft_type].check(config)
    return formats[peft_type]


def _group(tensors, fmt):
    """`({module: {part: array}}, {shared name: array})` from PEFT's tensor
    names."""
    modules, shared_ = {}, {}
    for name, value in tensors.items():
        key = name[len(PREFIX):] if name.startswith(PREFIX) else name
        if name.startswith("base_model.") and name.split(".")[-1] in fmt.shared:
            shared_[name.split(".")[-1]] = value
            continue
        for suffix in sorted(fmt.parts, key=len, reverse=True):
            if key.endswith("." + suffix):
                modules.setdefault(key[: -len(suffix) - 1], {})[fmt.part_name(suffix)] = value
                break
        else:
            raise ValueError(
                f"PEFT adapter: tensor {name!r} is not a {fmt.peft_type} factor (a whole "
                "weight saved with the adapter, by modules_to_save or "
                "save_embedding_layers); keras-lowrank does not load those."
            )
    missing = [s for s in fmt.shared if s not in shared_]
    if missing:
        raise ValueError(f"PEFT {fmt.peft_type} adapter: the shared tensors {missing} are missing.")
    return modules, shared_


def _embedding_extras(targets, config, tensors):
    """`tensors` less what PEFT saves beside an embedding's LoRA: the table
    itself (`...embed_tokens.base_layer.weight`, refused unless it is the
    model's), and, for a tied table (`ensure_weight_tying`), the output
    head's LoRA, which must be the embedding's, transposed. A LoRA on a
    table that KerasHub ties to its output head, saved without
    `ensure_weight_tying`, changed the lookup only in PEFT: refused."""
    tensors = dict(tensors)
    tied = bool(config.get("ensure_weight_tying", False))
    embeddings = {}
    for name in list(tensors):
        key = name[len(PREFIX):] if name.startswith(PREFIX) else name
        if not key.endswith(".base_layer.weight"):
            continue
        found = _find_target(targets, key[: -len(".base_layer.weight")])
        if not found and key == "lm_head.base_layer.weight":  # a tied head: the table
            found = [t for ts in targets.values() for t in ts
                     if t.embedding and getattr(t.layer, "tie_weights", False)]
        if not found or not found[0].embedding:
            continue
        table = peft_codec.f32(bases.read_kernel(found[0].layer))
        if not np.allclose(np.asarray(tensors[name], np.float32), np.asarray(table), rtol=1e-5, atol=1e-6):
            raise ValueError(
                f"PEFT adapter tensor {name!r} is an embedding table that differs from the "
                f"model's {found[0].path!r}: the adapter was trained with a changed table, "
                "which keras-lowrank does not load."
            )
        del tensors[name]
    for name in tensors:
        key = name[len(PREFIX):] if name.startswith(PREFIX) else name
        for part in ("lora_embedding_A", "lora_embedding_B"):
            if key.endswith("." + part):
                found = _find_target(targets, key[: -len(part) - 1])
                if found and getattr(found[0].layer, "tie_weights", False):
                    embeddings.setdefault(key[: -len(part) - 1], {})[part] = np.asarray(tensors[name])
    if embeddings and not tied:
        module = sorted(embeddings)[0]
        raise ValueError(
            f"PEFT adapter module {module!r}: KerasHub ties this table to the output head, "
            "and the adapter was saved without ensure_weight_tying, so in PEFT it changed "
            "the lookup only; keras-lowrank adapts the one table both use. Save it from "
            "PEFT with target_modules=[..., 'lm_head'] and ensure_weight_tying=True."
        )
    for module, parts in embeddings.items():
        head_a, head_b = PREFIX + "lm_head.lora_A.weight", PREFIX + "lm_head.lora_B.weight"
        if head_a in tensors:
            same = np.allclose(tensors[head_a], parts["lora_embedding_B"].T) and np.allclose(
                tensors[head_b], parts["lora_embedding_A"].T)
            if not same:
                raise ValueError(
                    f"PEFT adapter: the output head's LoRA is not {module!r}'s transposed, "
                    "though the table is tied."
                )
            del tensors[head_a], tensors[head_b]
    return tensors


def _find_target(targets, module):
    """The targets of a PEFT module name: the converter's key may lack a
    prefix the module has (`transformer.h.0.attn.c_attn` vs
    `h.0.attn.c_attn`), or have one it lacks (a base model's names)."""
    if module in targets:
        return targets[module]
    matches = [k for k in targets if module.endswith("." + k) or k.endswith("." + module)]
    return targets[max(matches, key=len)] if matches else None


def _expected_shapes(method, layer, options):
    """The variable shapes an adapter of `method` with `options` would have
    on `layer` (checked before the model changes)."""
    probe = registry.get(method).layer_class(layer, **options)
    return {spec.name: tuple(spec.shape) for spec in probe.variable_specs(bases.geometry_of(layer))}


def load_peft_adapter(model, path, base_model=None, base=None, verbose=False, adapter_name=None):
    """Put a PEFT adapter onto a KerasHub model.

    The model is the KerasHub backbone or task model converted from the
    Hugging Face checkpoint the adapter was trained on
    (`from_preset(<that checkpoint's directory>)`). Each PEFT module goes to
    the layer KerasHub's own converter filled from its weight. PEFT's LoRA
    (`r`, `lora_alpha`, `use_rslora`, `use_dora`, `rank_pattern`,
    `alpha_pattern`, `lora_dropout`), LoHa, LoKr, AdaLoRA and VeRA formats
    are read into the methods of the same names; the modules are those in
    the adapter's weights (its `target_modules`). Options that change what
    the adapter computes and that keras-lowrank does not load
    (`modules_to_save`, a LoRA bias, ...) are refused by name. A fused
    projection that KerasHub splits into several layers (GPT-2's `c_attn`)
    gives each layer its part of the update, and `fan_in_fan_out` (GPT-2's
    Conv1D layout) is honoured. Everything is checked before the model
    changes.

    Args:
        model: a KerasHub backbone or task model without adapters on the
            layers the adapter targets.
        path: the PEFT adapter directory.
        base_model: the Hugging Face model directory (or its `config.json`
            as a dict); `None` uses the adapter's `base_model_name_or_path`
            when that is a local directory.
        base: the frozen base's storage, as in `enable_adapter` (`"nf4"` puts
            a QLoRA adapter back on a 4-bit base).
        verbose: print the summary.
        adapter_name: load it as a named adapter, beside the model's
            adapters (`enable_adapter`'s `adapter_name`).

    Returns:
        the `AdapterSummary` of `enable_adapter`.

    Example: see `save_peft_adapter` (a round trip through a directory).
    """
    config, tensors = read_dir(path)
    fmt = check_config(config)
    # expert weights are layers while the file is placed (`keras_lowrank.experts`)
    exposed = experts.expose_model(model)
    try:
        return _load(model, path, base_model, base, verbose, adapter_name, config, tensors, fmt)
    finally:
        experts.fold_back_model(model, only=exposed)


def read_modules(model, path, base_model, adapter_name, config, tensors, fmt, placed=False):
    """`(method, options, {layer path: (rank, alpha, state)}, shared tensors,
    held module state)` of a PEFT directory's modules on `model`, each
    checked against the layer it goes to (`placed`: the layers hold adapters
    already, as for a hot-swap)."""
    hf_config = _hf_config(base_model, config)
    folder = base_model if base_model is not None else config.get("base_model_name_or_path")
    targets = module_map(model, hf_config, checkpoint=folder if isinstance(folder, (str, os.PathLike)) and os.path.isdir(folder) else None)
    # PEFT's target_parameters: stacked expert weights and routers
    plan, tensors = peft_experts.read(model, hf_config, config, tensors)
    tensors = _embedding_extras(targets, config, tensors)
    modules, shared_tensors = _group(tensors, fmt)
    method = fmt.method(config)
    options = fmt.options(config)
    transposed = bool(config.get("fan_in_fan_out", False))
    held = {}  # the modules' parts that the model-level state holds
    for module, parts in sorted(modules.items()):
        found = _find_target(targets, module)
        if found is None:
            raise ValueError(
                f"PEFT adapter module {module!r}: KerasHub's converter maps no "
                f"Dense/EinsumDense layer of {model.name!r} from '{module}.weight' "
                "(embeddings and the tied output head cannot hold an adapter here)."
            )
        missing = fmt.required(config) - set(parts)
        if missing:
            raise ValueError(
                f"PEFT adapter module {module!r}: expected {sorted(fmt.required(config))}, "
                f"found {sorted(parts)}."
            )
        fmt.check_parts(parts, module, config)
        r = fmt.rank(config, module, parts)
        alpha = fmt.alpha(config, module)
        for target in found:  # several layers: a fused projection, split
            if (not placed and target.adapter is not None and adapter_name is None
                    and not adapter_set.has_named(model)):
                raise ValueError(
                    f"PEFT adapter module {module!r}: Keras layer {target.path!r} already "
                    "holds an adapter."
                )
            n_out, n_in = fmt.torch_shape(parts)
            if n_in is None:  # the input size is the layer's
                n_in = target.geometry.n_in
            if n_out is None:  # the output size is the layers' filled from this weight
                n_out = sum(t.geometry.n_out for t in found)
            if target.embedding and method != registry.LORA_FORM:
                raise ValueError(
                    f"PEFT adapter module {module!r} is an embedding: keras-lowrank reads "
                    f"PEFT's embedding LoRA, not {method!r} (PEFT's embedding DoRA scales "
                    "each token's row, where keras-lowrank's scales each column)."
                )
            # a table is stored (vocabulary, dim): the (n_in, n_out) orientation
            p_in, p_out = target.layout(int(n_out), int(n_in), transposed or target.embedding)
            if not fmt.splittable and len(p_out) != n_out:
                raise ValueError(
                    f"PEFT adapter module {module!r}: KerasHub splits this weight over "
                    f"several layers, and {method} cannot be split."
                )
            state = fmt.state(parts, p_in, p_out, module)
            held_state = fmt.module_state(parts, p_in, p_out, module)
            if held_state:
                held[target.path] = held_state
            layer_options = {**options, "rank": r, **({"alpha": alpha} if alpha is not None else {})}
            expected = _expected_shapes(method, target.layer, layer_options)
            for name, value in state.items():
                if expected.get(name) != tuple(np.shape(value)):
                    raise ValueError(
                        f"PEFT adapter module {module!r}: {name} has shape {np.shape(value)} "
                        f"from the file, but keras-lowrank's {method} with {layer_options} "
                        f"makes {expected.get(name)} on {target.path!r}."
                    )
            plan[target.path] = (r, alpha, state)
    if not plan:
        raise ValueError(f"PEFT adapter {os.fspath(path)!r} holds no adapter modules.")
    if fmt.shared:
        adapted = [t for ts in targets.values() for t in ts if t.path in plan]
        fmt.check_shared(shared_tensors, adapted, [r for r, _, _ in plan.values()])
    if held:
        fmt.check_module_state(held, {t.path: t for ts in targets.values() for t in ts if t.path in held},
                               config)
    return method, options, plan, shared_tensors, held


def _load(model, path, base_model, base, verbose, adapter_name, config, tensors, fmt):
    from keras_lowrank.adapt import enable_adapter

    method, options, plan, shared_tensors, held = read_modules(
        model, path, base_model, adapter_name, config, tensors, fmt)
    ranks = [r for r, _, _ in plan.values()]
    alphas = [a for _, a, _ in plan.values()]
    rank = max(set(ranks), key=ranks.count)
    alpha = max(set(alphas), key=alphas.count) if None not in alphas else None
    summary = enable_adapter(
        model,
        method=method,
        rank=rank,
        alpha=alpha,
        targets=list(plan),
        rank_pattern={p: r for p, (r, _, _) in plan.items() if r != rank} or None,
        alpha_pattern={p: a for p, (_, a, _) in plan.items() if a != alpha} or None,
        base=base,
        verbose=verbose,
        adapter_name=adapter_name,
        **options,
    )
    found = {e.path: e.layer for e in tree.walk(model) if tree.is_adapter(e.layer)}
    member = adapter_name or (adapter_set.DEFAULT if adapter_set.has_named(model) else None)
    for path_, (_, _, state) in plan.items():
        adapter = found[path_ if member is None else path_ + tree.member_suffix(member)]
        for name, value in state.items():
            var = getattr(adapter, name)
            var.assign(np.asarray(value, dtype=np.float32).astype(var.dtype))
    if fmt.shared:
        fmt.load_shared(model, shared_tensors)
    if held:
        fmt.load_module_state(model, {p: found[p if member is None else p + tree.member_suffix(member)]
                                      for p in held}, held)
    return summary


# ----------------------------------------------------------------------
# Writing a PEFT directory
def _export_format(adapter, where):
    """The PEFT format that writes `adapter`: its method's own, if that
    writes it as it is, else the one that writes every plain-LoRA form."""
    if adapter.merged:
        raise ValueError(f"save_peft_adapter: layer {where!r} is merged; unmerge it first.")
    spec = registry.get(adapter.method)
    if spec.peft is not None and adapter.method in spec.peft.writes:
        return spec.peft
    if registry.LORA_FORM in spec.export_forms:
        for fmt in registry.peft_formats().values():
            if fmt.writes_lora_forms:
                return fmt
    raise ValueError(
        f"save_peft_adapter: layer {where!r} has a {adapter.method!r} adapter, which "
        "has no PEFT form (neither a PEFT type of its own nor a LoRA equivalent)."
    )


def save_peft_adapter(model, path, base_model, base_model_name_or_path=None, adapter_name=None):
    """Write the adapters of a KerasHub model as a PEFT adapter directory.

    `PeftModel.from_pretrained(hf_model, path)` then loads it onto the
    Hugging Face model the KerasHub model was converted from. LoRA and DoRA
    adapters are written as they are (rsLoRA as `use_rslora`); every method
    with an exact plain-LoRA form is written as that LoRA (PiSSA, OLoRA and
    MiLoRA as the rank-2r LoRA on the original base, VeRA, LoHa, AdaLoRA,
    DyLoRA, ... as their LoRA equivalents). Per-layer ranks and alphas go to
    `rank_pattern`/`alpha_pattern`.

    Args:
        model: a KerasHub backbone or task model with adapters.
        path: the directory to write (created if needed).
        base_model: the Hugging Face model directory the model was converted
            from, or its `config.json` as a dict.
        base_model_name_or_path: recorded in `adapter_config.json`
            (default: `base_model` when it is a path).
        adapter_name: which named adapter to write (a PEFT directory holds
            one); needed when the model has several.

    Examples:

        A tiny random Hugging Face Gemma, converted by KerasHub:

        >>> import os, tempfile, transformers, keras_hub, keras_lowrank
        >>> hf_dir, out = tempfile.mkdtemp(), tempfile.mkdtemp()
        >>> transformers.GemmaForCausalLM(transformers.GemmaConfig(
        ...     vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        ...     num_attention_heads=2, num_key_value_heads=1, head_dim=4)).save_pretrained(hf_dir)
        >>> backbone = keras_hub.models.Backbone.from_preset(hf_dir)
        >>> _ = keras_lowrank.enable_adapter(backbone, method="lora", rank=2)
        >>> keras_lowrank.save_peft_adapter(backbone, out, hf_dir)
        >>> sorted(os.listdir(out))
        ['adapter_config.json', 'adapter_model.safetensors']
        >>> fresh = keras_hub.models.Backbone.from_preset(hf_dir)
        >>> summary = keras_lowrank.load_peft_adapter(fresh, out)  # the base from the config
        >>> len(keras_lowrank.adapters(fresh))
        7
    """
    from safetensors.numpy import save_file

    targets = module_map(model, base_model)
    by_layer = {t.path: t for ts in targets.values() for t in ts if t.adapter is not None}
    param_slots = peft_experts.slots(model, _hf_config(base_model))
    by_param = {p for slot in param_slots for p, _ in slot.parts}
    param_entries = {}
    if adapter_set.has_named(model) or adapter_name is not None:
        names = named.adapter_names(model)
        if adapter_name is None and len(names) == 1:
            adapter_name = names[0]
        if adapter_name is None:
            raise ValueError(
                f"save_peft_adapter: model {model.name!r} has the named adapters {names}; a "
                "PEFT directory holds one: give adapter_name=..."
            )
        named.names_arg(model, [adapter_name], "save_peft_adapter")
        found = [(e.path[: -len(tree.member_suffix(adapter_name))], e.layer) for e in tree.walk(model)
                 if e.holder is not None and e.adapter_name == adapter_name]
    else:
        found = [(e.path, e.layer) for e in tree.walk(model) if tree.is_adapter(e.layer)]
    if not found:
        raise ValueError(f"save_peft_adapter: model {model.name!r} has no adapters.")
    entries, formats = [], set()
    for where, adapter in found:
        if where in by_param:  # an expert weight or a router: target_parameters
            entry = registry.peft_formats()["LORA"].export_entry(adapter, where)
            if entry["kind"] != registry.LORA_FORM:
                raise ValueError(
                    f"save_peft_adapter: layer {where!r} is a stacked expert weight or a "
                    f"router; PEFT's target_parameters hold plain LoRA, not {entry['kind']!r}."
                )
            param_entries[where] = entry
            continue
        target = by_layer.get(where)
        if target is None:
            raise ValueError(
                f"save_peft_adapter: layer {where!r} has no Hugging Face module: KerasHub's "
                "converter does not fill it from a '*.weight' of the base model."
            )
        if target.adapter is not adapter:  # a named adapter: the set's member
            target = _Target(target.module, target.path, target.layer, adapter, target.hook)
        fmt = _export_format(adapter, where)
        formats.add(fmt)
        entries.append((target, fmt.export_entry(adapter, where)))
    if param_entries:
        formats.add(registry.peft_formats()["LORA"])
        entries += [(None, e) for e in param_entries.values()]
    if len(formats) > 1:
        raise ValueError(
            "save_peft_adapter: a PEFT directory has one adapter type; the model's adapters "
            f"need {sorted(f.peft_type for f in formats)}."
        )
    fmt = formats.pop()
    fmt.check_entries(entries)
    entries = [(t, e) for t, e in entries if t is not None]
    groups = {}
    for e in entries:
        groups.setdefault(e[0].module, []).append(e)
    names = _module_names(groups, base_model)
    tensors, ranks, alphas, orientations = {}, {}, {}, set()
    tied_heads = []  # a tied table's output head: its LoRA is the table's, transposed
    param_tensors, param_ranks, param_alphas, target_parameters = peft_experts.write(
        param_slots, param_entries)
    tensors.update(param_tensors)
    for module, group in groups.items():
        # every layer filled from this weight: their outputs make its rows
        n_out = sum(t.geometry.n_out for t in targets[module])
        n_in = group[0][0].geometry.n_in
        layouts = []
        embedding = group[0][0].embedding
        for target, entry in group:
            if embedding:  # a table: stored (vocabulary, dim), PEFT's LoRA only
                if entry["kind"] != registry.LORA_FORM:
                    raise ValueError(
                        f"save_peft_adapter: layer {target.path!r} is an embedding; PEFT's "
                        f"embedding adapter is LoRA, not {entry['kind']!r}."
                    )
                p_in, p_out = target.layout(n_out, n_in, True)
            else:
                p_in, p_out, flipped = target.oriented_layout(n_out, n_in)
                orientations.add(flipped)
            layouts.append((p_in, p_out))
        whole = len(group) == 1 and len(layouts[0][1]) == n_out
        written, rank, alpha = fmt.write_module(PREFIX + names[module], group, layouts, n_in, n_out, whole)
        if embedding:
            written, tied = _embedding_tensors(written, group[0][0])
            if tied:
                tied_heads.append(("lm_head", int(rank), float(alpha)))
        tensors.update(written)
        ranks[names[module]], alphas[names[module]] = int(rank), float(alpha)
    if len(orientations) > 1:
        raise ValueError(
            "save_peft_adapter: some adapted modules store their weight (n_out, n_in) and "
            "others (n_in, n_out); PEFT has one fan_in_fan_out per directory."
        )
    fan_in_fan_out = orientations == {True}
    for head, rank_, alpha_ in tied_heads:
        ranks[head], alphas[head] = rank_, alpha_
    all_ranks = list(ranks.values()) + list(param_ranks.values())
    all_alphas = list(alphas.values()) + list(param_alphas.values())
    rank = max(set(all_ranks), key=all_ranks.count)
    alpha = max(set(all_alphas), key=all_alphas.count)
    if base_model_name_or_path is None and not isinstance(base_model, dict):
        base_model_name_or_path = base_model
    if isinstance(base_model_name_or_path, os.PathLike):
        base_model_name_or_path = os.fspath(base_model_name_or_path)
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise TypeError(
            "save_peft_adapter: base_model_name_or_path must be a str or os.PathLike "
            f"(PEFT records it as text); received {base_model_name_or_path!r}."
        )
    common = {
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "fan_in_fan_out": fan_in_fan_out,
        "target_modules": sorted(ranks),
        "rank_pattern": {re.escape(m): r for m, r in {**ranks, **param_ranks}.items() if r != rank},
        "alpha_pattern": {re.escape(m): a for m, a in {**alphas, **param_alphas}.items() if a != alpha},
        "inference_mode": True,
    }
    if target_parameters:
        common["target_parameters"] = target_parameters
    if tied_heads:
        common["ensure_weight_tying"] = True
    config = fmt.config(entries or [(None, e) for e in param_entries.values()], common, rank, alpha)
    # Everything is made before a file is touched (a config that is not
    # JSON, e.g. a base_model_name_or_path that is no string, fails here),
    # then both files replace the old ones together.
    text = json.dumps(config, indent=2)
    saving.write_files(arguments.path("save_peft_adapter", "path", path), {
        WEIGHTS_FILE: lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}),
        CONFIG_FILE: lambda tmp: _write_text(tmp, text),
    })


def _embedding_tensors(written, target):
    """An embedding's LoRA under PEFT's names (`lora_embedding_A (r,
    vocabulary)`, `lora_embedding_B (dim, r)`); a table KerasHub ties to its
    output head also gets the head's LoRA (`lm_head`, the same factors
    transposed), as PEFT's `ensure_weight_tying` keeps them. Returns
    `(tensors, tied)`."""
    out = {}
    for name, value in written.items():
        if name.endswith(".lora_A.weight"):
            a = value
            out[name[: -len("lora_A.weight")] + "lora_embedding_A"] = value
        elif name.endswith(".lora_B.weight"):
            b = value
            out[name[: -len("lora_B.weight")] + "lora_embedding_B"] = value
    tied = bool(getattr(target.layer, "tie_weights", False))
    if tied:
        out[PREFIX + "lm_head.lora_A.weight"] = np.ascontiguousarray(b.T)
        out[PREFIX + "lm_head.lora_B.weight"] = np.ascontiguousarray(a.T)
    return out, tied


def _write_text(path, text):
    with open(path, "w") as f:
        f.write(text)
