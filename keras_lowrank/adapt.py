"""`enable_adapter`: put adapter layers into any Keras model.

Targeting, validation, installation, freezing, the parameter summary, and the
model-level record that lets a `.keras` file rebuild the adapters on load
(KerasHub layers rebuild their sublayers in `build()`, so the adapters must
be re-applied after the model is rebuilt from its config).
"""

import fnmatch
import math
import re
import warnings

import keras

from keras_lowrank import _compat
from keras_lowrank import bases
from keras_lowrank import registry
from keras_lowrank import tree
from keras_lowrank.adapter import Adapter
from keras_lowrank.adapter import check_rank
from keras_lowrank.geometry import EquationError
from keras_lowrank.geometry import KernelGeometry

#: layer names treated as an output head when `targets=None`
HEAD_NAMES = ("logits", "lm_head", "classifier", "head", "output_head", "predictions")

_MISSING = object()


# ----------------------------------------------------------------------
# Targeting
def _pattern_kind(pattern):
    if isinstance(pattern, re.Pattern):
        return "regex"
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"A target must be a non-empty string or a regex; received {pattern!r}.")
    if pattern.startswith("re:"):
        return "regex"
    if any(c in pattern for c in "*?["):
        return "glob"
    return "name"


def match(pattern, entry):
    """Whether a target pattern matches a layer.

    - `"query"`: a layer name, a full path, or a path suffix
      (`"attention/query"`);
    - `"*/attention/*"`: a glob on the path;
    - `"re:.*_(query|value)$"` or `re.compile(...)`: a regex (fullmatch) on
      the path.
    """
    kind = _pattern_kind(pattern)
    path = entry.path
    if kind == "regex":
        rx = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern[3:])
        return rx.fullmatch(path) is not None
    if kind == "glob":
        return fnmatch.fnmatchcase(path, pattern)
    return path == pattern or path.endswith("/" + pattern) or entry.layer.name == pattern


def _as_list(patterns):
    if patterns is None:
        return []
    if isinstance(patterns, (str, re.Pattern)):
        return [patterns]
    return list(patterns)


def head_paths(model, entries):
    heads = set()
    outputs = getattr(model, "_outputs", None) or []
    try:
        flat = keras.tree.flatten(outputs)
    except Exception:
        flat = []
    producers = set()
    for t in flat:
        history = getattr(t, "_keras_history", None)
        if history is not None:
            producers.add(id(history[0]))
    for e in entries:
        if id(e.layer) in producers or e.layer.name in HEAD_NAMES:
            heads.add(e.path)
    return heads


def _is_candidate(layer):
    return bases.is_linear_layer(layer) or isinstance(layer, Adapter)


def resolve_targets(model, targets=None, exclude=None, entries=None):
    """The entries `enable_adapter` would adapt, in model order."""
    entries = tree.walk(model) if entries is None else entries
    candidates = [e for e in entries if _is_candidate(e.layer)]
    available = [e.path for e in candidates]
    if targets is None or targets == "all-linear":
        heads = head_paths(model, candidates)
        chosen = [e for e in candidates if e.path not in heads]
    else:
        chosen_ids = set()
        for pattern in _as_list(targets):
            if pattern == "all-linear":
                heads = head_paths(model, candidates)
                hits = [e for e in candidates if e.path not in heads]
            else:
                kind = _pattern_kind(pattern)
                hits = [e for e in entries if match(pattern, e)]
                bad = [e for e in hits if not _is_candidate(e.layer)]
                if kind == "name" and bad:
                    e = bad[0]
                    raise TypeError(
                        f"Target {pattern!r} matches layer {e.path!r} of type "
                        f"{type(e.layer).__name__}; adapters wrap Dense and "
                        "EinsumDense layers only."
                    )
                hits = [e for e in hits if _is_candidate(e.layer)]
            if not hits:
                raise ValueError(
                    f"Target {pattern!r} matches no Dense/EinsumDense layer. "
                    f"Layer paths that exist: {available}."
                )
            chosen_ids.update(id(e.layer) for e in hits)
        chosen = [e for e in candidates if id(e.layer) in chosen_ids]
    for pattern in _as_list(exclude):
        hits = [e for e in candidates if match(pattern, e)]
        if not hits:
            raise ValueError(
                f"Exclude pattern {pattern!r} matches no Dense/EinsumDense "
                f"layer. Layer paths that exist: {available}."
            )
        ids = {id(e.layer) for e in hits}
        chosen = [e for e in chosen if id(e.layer) not in ids]
    if not chosen:
        raise ValueError(
            f"No layer left to adapt after targets={targets!r}, exclude={exclude!r}. "
            f"Layer paths that exist: {available}."
        )
    return chosen


def _per_layer(entry, patterns, default):
    value = default
    for pattern, v in (patterns or {}).items():
        if match(pattern, entry):
            value = v
    return value


# ----------------------------------------------------------------------
# Summary
class AdapterSummary:
    """What `enable_adapter` did: the adapted layers and parameter counts.

    Prints as a table; `rows`, `trainable_params`, `total_params` and
    `adapted_paths` hold the same data.
    """

    def __init__(self, method, rows, trainable_params, total_params):
        self.method = method
        self.rows = rows
        self.trainable_params = trainable_params
        self.total_params = total_params

    @property
    def adapted_paths(self):
        return [r["path"] for r in self.rows]

    @property
    def trainable_fraction(self):
        return self.trainable_params / max(self.total_params, 1)

    def __str__(self):
        head = ("layer", "method", "rank", "matrix", "trainable")
        body = [
            (r["path"], r["method"], str(r["rank"]), r["matrix"], f"{r['trainable']:,}")
            for r in self.rows
        ]
        widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
        out = [line(head), line(["-" * w for w in widths])]
        out += [line(b) for b in body]
        out.append(
            f"adapted layers: {len(self.rows)}   trainable params: "
            f"{self.trainable_params:,} / {self.total_params:,} "
            f"({100 * self.trainable_fraction:.3f}%)"
        )
        return "\n".join(out)

    __repr__ = __str__


def count(variables):
    return int(sum(math.prod(v.shape) for v in variables))


def summarize(model, method=None):
    rows = []
    for entry in tree.walk(model):
        if isinstance(entry.layer, Adapter):
            a = entry.layer
            g = a.geometry
            rows.append(
                {
                    "path": entry.path,
                    "method": a.method,
                    "rank": a.rank,
                    "matrix": ("" if not g.batch_shape else f"{g.n_shared}x") + f"{g.n_in}x{g.n_out}",
                    "trainable": a.trainable_count(),
                }
            )
    return AdapterSummary(
        method,
        rows,
        count(model.trainable_weights),
        count(model.weights),
    )


def adapters(model):
    """`(path, adapter layer)` for every adapter in `model`."""
    return [(e.path, e.layer) for e in tree.walk(model) if isinstance(e.layer, Adapter)]


# ----------------------------------------------------------------------
# Installation
def _construct(spec, layer, options, init):
    adapter = spec.layer_class(layer, **options)
    adapter._init_from_base = init
    return adapter


def _build_adapter(adapter, path):
    with tree.path_scope(path):
        adapter.build(None)
    shapes = getattr(adapter.layer, "_build_shapes_dict", None)
    if shapes:
        adapter._build_shapes_dict = dict(shapes)


def _install(model, plan, init, base=None, double_quant=True):
    """Wrap each `(entry, spec, options)` of `plan`; all or nothing.

    With `base` (e.g. `"nf4"`), the frozen kernels move to that storage, the
    data-dependent init running before (SVD inits) or after it.
    """
    convert = bases.converter(base, double_quant)
    created = []
    try:
        for entry, spec, options in plan:
            adapter = _construct(spec, entry.layer, options, init and convert is None)
            created.append((entry, adapter))
            _build_adapter(adapter, entry.path)
            # (a model rebuilt from a config may already hold the storage)
            if convert is not None and bases.base_kind(adapter.layer) != base:
                with tree.path_scope(entry.path + "/" + adapter.layer.name):
                    adapter.attach_base(convert, init)
    except Exception:
        for entry, adapter in created:
            _undo_construct(entry.layer, adapter)
        raise
    for entry, adapter in created:
        tree.replace_layer(model, entry, adapter)
    return [a for _, a in created]


def _undo_construct(layer, adapter):
    """Give `layer` (the original float layer) back its state."""
    if adapter.built and bases.base_kind(layer) == "float":
        w = adapter.geometry.kernel_to_matrix(bases.read_kernel(layer))
        w = adapter.original_matrix(w)
        bases.assign_kernel(layer, adapter.geometry.matrix_to_kernel(w))
    layer.activation = adapter.activation
    bases.freeze_kernel(layer, trainable=True)
    bias = bases.bias_variable(layer)
    if bias is not None:
        bias.trainable = True


def freeze(model, trainable_layers=None):
    """Freeze everything but the adapters (and the layers the user names)."""
    entries = tree.walk(model)
    keep = []
    for pattern in _as_list(trainable_layers):
        hits = [e for e in entries if match(pattern, e)]
        if not hits:
            raise ValueError(
                f"trainable_layers pattern {pattern!r} matches no layer. "
                f"Layer paths that exist: {[e.path for e in entries]}."
            )
        keep.extend(hits)
    model.trainable = True
    for layer in [model] + [e.layer for e in entries]:
        if isinstance(layer, Adapter):
            continue
        for v in layer._trainable_variables:
            v.trainable = False
    for entry in keep:
        entry.layer.trainable = True
        for sub in entry.layer._flatten_layers():
            for v in sub._trainable_variables:
                v.trainable = True
    for entry in entries:
        if isinstance(entry.layer, Adapter):
            entry.layer.trainable = True
            entry.layer.freeze_base()


def _after_change(model):
    _compat.refresh_torch_params(tree.all_layers_with_root(model))
    reset_compiled_functions(model)


def reset_compiled_functions(model):
    """Drop traced train/test/predict functions; if the optimizer was already
    built on the old trainable variables, recompile with a fresh copy of it
    (same class and config) and the same loss and metrics."""
    for attr in ("train_function", "test_function", "predict_function"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    optimizer = getattr(model, "optimizer", None)
    if not getattr(model, "compiled", False) or not getattr(optimizer, "built", False):
        return
    compile_config = getattr(model, "_compile_config", None)
    try:
        kwargs = dict(compile_config.config)
        kwargs["optimizer"] = type(optimizer).from_config(optimizer.get_config())
        # The base compile: task models with a custom compile() resolved their
        # "auto" arguments already, and these are the resolved ones.
        keras.Model.compile(model, **kwargs)
    except Exception as e:  # keep the user informed, never silent
        warnings.warn(
            "The model was compiled before its adapters changed and could not "
            f"be recompiled automatically ({e}); call model.compile(...) again "
            "before training."
        )


def enable_adapter(
    model,
    method="lora",
    rank=8,
    alpha=None,
    targets=None,
    exclude=None,
    dropout=0.0,
    rank_pattern=None,
    alpha_pattern=None,
    train_bias=False,
    trainable_layers=None,
    base=None,
    double_quant=True,
    verbose=False,
    **options,
):
    """Replace the `Dense`/`EinsumDense` layers of `model` with adapters.

    Args:
        model: a built Keras model (KerasHub backbone or task model,
            Functional, Sequential or subclassed).
        method: a name from `keras_lowrank.methods()`.
        rank: adapter rank (per-layer overrides: `rank_pattern`).
        alpha: scaling numerator; `None` means `rank` (per-layer overrides:
            `alpha_pattern`).
        targets: `None` or `"all-linear"` (every Dense/EinsumDense except the
            output head), or a list of layer names, paths, path suffixes,
            globs (`"*/attention/*"`) or regexes (`"re:..."`).
        exclude: patterns to leave out, in the same forms.
        dropout: dropout on the adapter input.
        rank_pattern, alpha_pattern: `{pattern: value}` per-layer overrides.
        train_bias: keep the adapted layers' biases trainable.
        trainable_layers: patterns of further layers to keep trainable
            (e.g. a classifier head or the norms).
        base: storage of the frozen kernels: `None`/`"float"` (as they are),
            `"nf4"` (4-bit NormalFloat, QLoRA's base), or `"int8"`/`"int4"`
            (Keras's own quantizers). SVD inits decompose the full-precision
            kernel and quantize the residual. A model already quantized with
            `model.quantize("int8"|"int4")` is adapted over its quantized
            kernels as it is.
        double_quant: with `base="nf4"`, also quantize the block constants
            (4.127 instead of 4.5 bits per parameter).
        verbose: print the summary table.
        **options: method options (see `keras_lowrank.methods()` and the
            method's layer class).

    Returns:
        An `AdapterSummary` (prints as a table).

    Example:

    >>> import keras, numpy as np
    >>> import keras_lowrank
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, name="hidden"),
    ...                           keras.layers.Dense(4, name="logits")])
    >>> summary = keras_lowrank.enable_adapter(model, method="lora", rank=2)
    >>> summary.adapted_paths
    ['hidden']
    """
    spec = registry.get(method)
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"enable_adapter needs a Keras model; received {type(model).__name__}.")
    if not model.built:
        raise ValueError(
            f"Model {model.name!r} is not built; call it on data or build it "
            "before enable_adapter."
        )
    check_rank(rank, "enable_adapter")
    bases.check_base(base, double_quant)
    if base not in (None, "float") and base not in spec.bases:
        raise ValueError(
            f"Method {method!r} cannot run over a {base!r} base; it supports {spec.bases}."
        )
    base_options = spec.validate_options(
        {"dropout": dropout, "train_bias": train_bias, **options}
    )
    entries = tree.walk(model)
    chosen = resolve_targets(model, targets, exclude, entries)

    # Validate everything before touching the model.
    plan = []
    for entry in chosen:
        layer = entry.layer
        if isinstance(layer, Adapter):
            raise ValueError(
                f"Layer {entry.path!r} already has a {layer.method!r} adapter; "
                "merge it (keras_lowrank.merge) before adding another."
            )
        bases.check_supported(layer, entry.path)
        mode = bases.quantization_mode(layer)
        if mode is not None and spec.layer_class.init_on_full_precision:
            raise ValueError(
                f"Layer {entry.path!r} is already quantized by Keras (mode={mode!r}); "
                f"method {method!r} decomposes the full-precision kernel and "
                f"rewrites it, which a {mode} kernel cannot give back. Adapt the "
                f"float model with base={mode!r} instead."
            )
        r = _per_layer(entry, rank_pattern, rank)
        check_rank(r, entry.path)
        a = _per_layer(entry, alpha_pattern, alpha)
        try:
            geometry = KernelGeometry.from_layer(layer)
        except EquationError as e:
            raise ValueError(f"Layer {entry.path!r}: {e}") from None
        if spec.rank_bounded and r > geometry.rank_limit:
            raise ValueError(
                f"rank={r} is larger than layer {entry.path!r} allows for "
                f"method {method!r}: its kernel is a {geometry.n_in}x"
                f"{geometry.n_out} matrix, so rank <= {geometry.rank_limit}."
            )
        opts = dict(base_options, rank=r, alpha=a)
        plan.append((entry, spec, opts))

    _install(model, plan, init=True, base=base, double_quant=double_quant)
    freeze(model, trainable_layers)
    mark_adapted(model, trainable_layers)
    _after_change(model)
    summary = summarize(model, method)
    if verbose:
        print(summary)
    return summary


# ----------------------------------------------------------------------
# Persistence: the model remembers its adapters across `.keras` round trips
_ADAPTED_CLASSES = {}


@keras.saving.register_keras_serializable(package="keras_lowrank", name="AdaptedModel")
class AdaptedModel:
    """Deserializer of models that carry adapters.

    A model with adapters serializes as `keras_lowrank>AdaptedModel` with its
    original serialization under `"base"` and the adapter plan under
    `"adapters"`. Loading rebuilds the original model, then re-applies the
    adapters (structure only; the variables come from the file).
    """

    @classmethod
    def from_config(cls, config, custom_objects=None):
        base = keras.saving.deserialize_keras_object(config["base"], custom_objects=custom_objects)
        if not base.built:
            raise ValueError(
                f"Cannot rebuild the adapters of {base.name!r}: the model did "
                "not build from its config."
            )
        apply_plan(base, config["adapters"])
        return base

    def get_config(self):
        return {}


def plan_of(model):
    layers = {}
    for path, a in adapters(model):
        layers[path] = {
            "method": a.method,
            "merged": a.merged,
            "base": bases.base_kind(a.layer),
            "double_quant": getattr(a.layer, "double_quant", True),
            **a.adapter_config(),
        }
    return {
        "layers": layers,
        "trainable_layers": getattr(model, "_klr_trainable_layers", None),
    }


def apply_plan(model, plan):
    """Re-create adapters (without data-dependent init) as a plan describes."""
    entries = {e.path: e for e in tree.walk(model)}
    groups = {}
    for path, cfg in plan["layers"].items():
        entry = entries.get(path)
        if entry is None:
            raise ValueError(
                f"The saved adapters name layer {path!r}, which this model "
                f"does not have. Layer paths that exist: {sorted(entries)}."
            )
        cfg = dict(cfg)
        spec = registry.get(cfg.pop("method"))
        base = cfg.pop("base", "float")
        double_quant = cfg.pop("double_quant", True)
        if isinstance(entry.layer, Adapter):
            if entry.layer.method != spec.name:
                raise ValueError(
                    f"Layer {path!r} has a {entry.layer.method!r} adapter, "
                    f"the saved plan a {spec.name!r} one."
                )
            continue
        groups.setdefault((base, double_quant), []).append((entry, spec, cfg))
    for (base, double_quant), todo in groups.items():
        _install(model, todo, init=False, base=base, double_quant=double_quant)
    freeze(model, plan.get("trainable_layers"))
    mark_adapted(model, plan.get("trainable_layers"))
    _after_change(model)


def _adapted_class(base_cls):
    if getattr(base_cls, "_klr_base_class", None) is not None:
        return base_cls
    cls = _ADAPTED_CLASSES.get(base_cls)
    if cls is not None:
        return cls

    def get_config(self):
        adapted = type(self)
        self.__class__ = adapted._klr_base_class
        try:
            base = keras.saving.serialize_keras_object(self)
        finally:
            self.__class__ = adapted
        base.pop("compile_config", None)
        return {"base": base, "adapters": plan_of(self)}

    def from_config(klass, config, custom_objects=None):
        return AdaptedModel.from_config(config, custom_objects)

    cls = type(
        base_cls.__name__,
        (base_cls,),
        {
            "get_config": get_config,
            "from_config": classmethod(from_config),
            "_klr_base_class": base_cls,
            "__module__": base_cls.__module__,
            "__doc__": base_cls.__doc__,
        },
    )
    keras.saving.register_keras_serializable("keras_lowrank", "AdaptedModel")(cls)
    # Keep the name resolving to the generic deserializer.
    keras.saving.register_keras_serializable("keras_lowrank", "AdaptedModel")(AdaptedModel)
    _ADAPTED_CLASSES[base_cls] = cls
    return cls


def mark_adapted(model, trainable_layers=_MISSING):
    """Give `model` the class that serializes its adapters (or take it back
    when none is left)."""
    if trainable_layers is not _MISSING:
        object.__setattr__(model, "_klr_trainable_layers", trainable_layers)
    has = bool(adapters(model))
    base_cls = getattr(type(model), "_klr_base_class", None)
    if has and base_cls is None:
        model.__class__ = _adapted_class(type(model))
    elif not has and base_cls is not None:
        model.__class__ = base_cls
