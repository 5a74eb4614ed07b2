"""Several named adapters in one model (PEFT's `adapter_name`).

`enable_adapter(model, ..., adapter_name="a")` puts a named adapter on each
targeted layer, beside the adapters already there (any methods, the same or
other targets). A layer with named adapters is held by an `AdapterSet`: the
frozen base once, each named adapter on that base, and one non-trainable
0/1 gate per name. The layer computes PEFT's sum over the active adapters,

    y = y0 + Σ_active (adapter_i(x) - y0)

where `y0` is the frozen base's output. Adapters that rewrite the frozen
kernel (PiSSA, OLoRA, MiLoRA, SVD-training...) give back their part of the
original kernel while inactive, so every combination of active adapters
computes what those adapters alone would on the original model.

Which adapters are active is model-wide (`set_active`), a value of the gate
variables: switching needs no retrace of a compiled `predict`/`evaluate` on
any backend. By default the active adapters are also the trainable ones (as
in PEFT), which needs a new train step; `set_active(..., trainable=False)`
only switches.

Once a model has named adapters, every adapter in it is a named one: an
unnamed adapter already there becomes the adapter `"default"`.
"""

import re

import keras
import numpy as np
from keras import ops

from keras_lowrank import _compat
from keras_lowrank import arguments
from keras_lowrank import bases
from keras_lowrank import compiled
from keras_lowrank import options as opt
from keras_lowrank import tree
from keras_lowrank.adapter import Adapter
from keras_lowrank.adapter import adapter_policy_name
from keras_lowrank.adapter import check_finite

#: the name of an adapter added without `adapter_name` (PEFT's default)
DEFAULT = "default"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")


def check_name(name, where="adapter_name"):
    """`name` if it can name an adapter (it becomes part of layer keys and
    variable paths), else a `ValueError`."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"{where} must be a non-empty string of letters, digits, '_' and '-' "
            f"(not starting with '-'); received {name!r}."
        )
    return name


def rewrites(member):
    """Whether `member`'s base output differs from the frozen layer's (it
    rewrote the kernel and gives its part back while inactive)."""
    return type(member).base_output is not Adapter.base_output


class _Ref:
    """A reference Keras neither tracks nor saves."""

    __slots__ = ("target",)

    def __init__(self, target):
        self.target = target


def holder_of(adapter):
    """The `AdapterSet` holding `adapter`, or `None`."""
    ref = getattr(adapter, "_klr_holder", None)
    return None if ref is None else ref.target


@keras.saving.register_keras_serializable(package="keras_lowrank")
class AdapterSet(keras.layers.Layer):
    """Named adapters on one frozen `Dense`/`EinsumDense` layer.

    Made by `enable_adapter(..., adapter_name=...)`; not built by hand. The
    output is `activation(y0 + Σ_active (adapter_i(x) - y0))` (see
    `keras_lowrank.named`).

    Args:
        layer: the frozen layer (its activation lives here).
        members: `{name: adapter}`, adapters built on `layer`.
        active: the names whose gate starts at 1.
        activation: the layer's activation.
        enabled: `False` computes the original layer (`disable_adapter`).

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="out")])
        >>> _ = keras_lowrank.enable_adapter(model, targets=["out"], rank=2, adapter_name="a")
        >>> _ = keras_lowrank.enable_adapter(model, targets=["out"], rank=1, adapter_name="b")
        >>> type(model.layers[0]).__name__, list(model.layers[0].members)
        ('AdapterSet', ['a', 'b'])
        >>> keras_lowrank.active_adapters(model)
        ['b']
    """

    _klr_is_adapter_set = True

    def __init__(self, layer, members=None, active=None, activation=None, enabled=True, **kwargs):
        kwargs.setdefault("name", layer.name)
        kwargs.setdefault("dtype", adapter_policy_name(layer))
        super().__init__(**kwargs)
        self.layer = layer
        self.members = {}
        self.activation = keras.activations.get(activation)
        self.adapter_enabled = bool(enabled)
        self.supports_masking = True
        self._gates = {}
        active = set(members or {}) if active is None else set(active)
        for name, member in (members or {}).items():
            self.add_member(name, member, name in active)

    def klr_layer_kind(self):
        """The class of the layer this set stands for (stable keys)."""
        return tree.layer_kind(self.layer)

    # ------------------------------------------------------------------
    def add_member(self, name, member, active):
        """Hold `member` (built on this set's layer) under `name`."""
        check_name(name)
        if name in self.members:
            raise ValueError(f"Layer {self.name!r} already has an adapter named {name!r}.")
        with _compat.unlocked(self):
            self.members[name] = member
            gate = self.add_weight(
                name=f"gate_{name}", shape=(), trainable=False, dtype="float32",
                initializer=keras.initializers.Constant(1.0 if active else 0.0),
            )
        self._gates[name] = gate
        object.__setattr__(member, "_klr_holder", _Ref(self))
        object.__setattr__(member, "adapter_name", name)
        if member.built:
            record_trainable(member)

    def remove_member(self, name):
        """Let go of the adapter `name` (and its gate)."""
        member = self.members.pop(name)
        gate = self._gates.pop(name)
        self._untrack_variable(gate)
        object.__setattr__(member, "_klr_holder", None)
        return member

    def replace_base(self, old, new):
        """Put `new` in place of the frozen layer `old`, here and in every
        member (a base moved into another storage)."""
        tree.replace_child(self, old, new)
        for member in self.members.values():
            if member.layer is old:
                tree.replace_child(member, old, new)
                member.geometry = bases.geometry_of(new)
        self.apply_trainable()

    def gate(self, name):
        return self._gates[name]

    def is_active(self, name):
        return bool(np.asarray(ops.convert_to_numpy(self._gates[name].value)) > 0.5)

    def active_names(self):
        return [n for n in self.members if self.is_active(n)]

    def set_gates(self, names):
        for name, gate in self._gates.items():
            gate.assign(1.0 if name in names else 0.0)

    def apply_trainable(self):
        """The active adapters train, the others are frozen; the base bias
        trains if an active adapter has `train_bias`."""
        bias_trains = False
        for name, member in self.members.items():
            on = self.is_active(name)
            for var_name in getattr(member, "_klr_trainable_names", ()):
                member._adapter_vars[var_name].trainable = on
            bias_trains = bias_trains or (on and member.train_bias)
        bases.freeze_kernel(self.layer)
        bias = bases.bias_variable(self.layer)
        if bias is not None:
            bias.trainable = bias_trains

    def freeze_base(self):
        self.apply_trainable()

    # ------------------------------------------------------------------
    def build(self, input_shape=None):
        if not self.layer.built:
            self.layer.build(input_shape)
        for member in self.members.values():
            if not member.built:
                member.build(input_shape)
                record_trainable(member)
        self.built = True

    @property
    def geometry(self):
        return bases.geometry_of(self.layer)

    def call(self, inputs, training=None):
        y0 = self.layer(inputs)
        y = y0
        for name, member in self.members.items():
            kept = member.base_output(inputs, y0) if rewrites(member) else None
            if kept is not None:
                y = y + (kept - y0)
            if self.adapter_enabled:
                gate = ops.cast(self._gates[name].value, y0.dtype)
                out = member.adapter_output(inputs, y0, training)
                y = y + gate * (out - (y0 if kept is None else kept))
        if self.activation is not None:
            y = self.activation(y)
        return y

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    @property
    def kernel(self):
        """The kernel this layer computes with (as `call`: each member's
        update weighted by its gate), in the frozen layer's kernel layout
        and compute dtype: for a parent that reads `layer.kernel` instead
        of calling the layer (see `Adapter.kernel`)."""
        k = self.base_matrix()
        w = k
        for name, member in self.members.items():
            kept = member.original_matrix(k) if rewrites(member) else k
            w = w + (kept - k)
            if self.adapter_enabled:
                gate = ops.cast(self._gates[name].value, w.dtype)
                w = w + gate * (member.merged_matrix(k) - kept)
        return ops.cast(self.geometry.matrix_to_kernel(w), self.layer.compute_dtype)

    @property
    def bias(self):
        """The frozen layer's bias variable (`None` without one)."""
        return bases.bias_variable(self.layer)

    # ------------------------------------------------------------------
    def base_matrix(self):
        return self.geometry.kernel_to_matrix(bases.read_kernel(self.layer))

    def effective_matrix(self, names=None):
        """The kernel matrix the layer computes with `names` active (default:
        the active set), in float32."""
        names = self.active_names() if names is None else names
        k = self.base_matrix()
        w = k
        for name, member in self.members.items():
            if self.adapter_enabled and name in names:
                w = w + (member.merged_matrix(k) - k)
            elif rewrites(member):
                w = w + (member.original_matrix(k) - k)
        return w

    def bias_value(self):
        bias = bases.bias_variable(self.layer)
        if bias is None:
            return None
        with _compat.no_autocast():
            return ops.cast(_compat.as_tensor(bias.value), "float32")

    def to_plain_layer(self, names=None):
        """A plain (unbuilt) Dense/EinsumDense and the kernel that folds
        `names` (default: the active set) into the base."""
        w = self.effective_matrix(names)
        check_finite(w, self.name, "merge")
        kernel = self.geometry.matrix_to_kernel(w)
        plain = bases.plain_layer(self.layer, self.activation, self.name, self.activity_regularizer)
        return plain, kernel

    # ------------------------------------------------------------------
    def get_config(self):
        config = super().get_config()
        config.update({
            "layer": keras.saving.serialize_keras_object(self.layer),
            "members": [
                {"adapter_name": name,
                 "adapter": _member_config(member)}
                for name, member in self.members.items()
            ],
            "active": self.active_names(),
            "activation": keras.activations.serialize(self.activation),
            "enabled": self.adapter_enabled,
        })
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        layer = keras.saving.deserialize_keras_object(config.pop("layer"), custom_objects=custom_objects)
        members = {}
        for item in config.pop("members"):
            adapter_cls = keras.saving.get_registered_object(
                item["adapter"]["registered_name"], custom_objects=custom_objects
            )
            if adapter_cls is None:
                raise ValueError(
                    f"Layer {config.get('name')!r}: adapter {item['adapter_name']!r} is a "
                    f"{item['adapter']['registered_name']!r}, which is not registered."
                )
            member = adapter_cls(layer, **item["adapter"]["config"])
            member._init_from_base = False  # the variables come from the file
            member._standalone = False  # the plan binds model-level state
            members[item["adapter_name"]] = member
        return cls(layer, members=members, **config)

    def save_own_variables(self, store):
        for name, gate in self._gates.items():
            store[f"gate:{name}"] = gate

    def load_own_variables(self, store):
        want = {f"gate:{name}" for name in self._gates}
        if set(store.keys()) != want:
            raise ValueError(
                f"Layer {self.name!r} holds the adapters {list(self._gates)}; the file "
                f"holds gates {sorted(store.keys())}."
            )
        for name, gate in self._gates.items():
            gate.assign(store[f"gate:{name}"])
        self.apply_trainable()


def _member_config(member):
    serialized = keras.saving.serialize_keras_object(member)
    config = dict(serialized["config"])
    config.pop("layer", None)
    return {"registered_name": serialized.get("registered_name") or keras.saving.get_registered_name(type(member)),
            "config": config}


def record_trainable(member):
    """Remember which of `member`'s variables train when it is active."""
    object.__setattr__(member, "_klr_trainable_names",
                       tuple(n for n, v in member._adapter_vars.items() if v.trainable))


# ----------------------------------------------------------------------
# Model-wide views and switches
def sets(model):
    """`[(path, AdapterSet)]` of `model`."""
    return [(e.path, e.layer) for e in tree.walk(model) if tree.is_adapter_set(e.layer)]


def has_named(model):
    return bool(sets(model))


def adapter_names(model):
    """Every adapter name in `model`: each layer's names in the order they
    were added there, the layers in model order."""
    names = []
    for _, s in sets(model):
        for name in s.members:
            if name not in names:
                names.append(name)
    return names


def active_adapters(model):
    """The names of the active adapters of `model` (`set_active`).

    Examples:

        >>> import keras
        >>> import keras_lowrank
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="out")])
        >>> _ = keras_lowrank.enable_adapter(model, targets=["out"], rank=2, adapter_name="a")
        >>> keras_lowrank.active_adapters(model)
        ['a']
    """
    found = sets(model)
    if not found:
        return []
    names = []
    for _, s in found:
        for name in s.active_names():
            if name not in names:
                names.append(name)
    return names


def _names_arg(model, names, what):
    known = adapter_names(model)
    if not known:
        raise ValueError(
            f"{what}: model {model.name!r} has no named adapters; add them with "
            "enable_adapter(..., adapter_name=...)."
        )
    if names is None:
        return []
    if isinstance(names, str):
        names = [names]
    try:
        names = list(names)
    except TypeError:
        raise ValueError(f"{what}: expected a name, a list of names or None; received {names!r}.") from None
    for name in names:
        if not isinstance(name, str) or name not in known:
            raise ValueError(f"{what}: the model has no adapter named {name!r}; it has {known}.")
    return names


def set_active(model, names, trainable=True):
    """Make `names` (a name, a list of names, or `None` for none) the active
    adapters of `model`; the others stop contributing.

    Switching assigns the gate variables: a compiled `predict`/`evaluate`
    runs on with the new set, on every backend. With `trainable=True`
    (default, as in PEFT) the active adapters are also the trainable ones;
    when that changes which variables train, the train step is rebuilt on
    the next `fit` (the optimizer starts afresh, as after `compile`).
    `trainable=False` leaves what trains as it is (switching for serving).

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="out")])
        >>> _ = keras_lowrank.enable_adapter(model, targets=["out"], rank=2, adapter_name="a")
        >>> _ = keras_lowrank.enable_adapter(model, targets=["out"], method="dora", rank=2, adapter_name="b")
        >>> keras_lowrank.set_active(model, ["a", "b"])
        >>> keras_lowrank.active_adapters(model)
        ['a', 'b']
    """
    names = _names_arg(model, names, "set_active")
    arguments.check("set_active", "trainable", trainable, opt.boolean)
    found = sets(model)
    before = _trainable_flags(found)
    for _, s in found:
        s.set_gates(names)
        if trainable:
            s.apply_trainable()
    if _trainable_flags(found) != before:
        compiled.reset_compiled_functions(model)


def _trainable_flags(found):
    return [v.trainable for _, s in found for m in s.members.values() for v in m._adapter_vars.values()] + [
        bases.bias_variable(s.layer).trainable for _, s in found if bases.bias_variable(s.layer) is not None
    ]


def delete_adapter(model, name):
    """Take the adapter `name` out of every layer of `model` (not merged).

    An adapter that rewrote its frozen kernel (PiSSA, ...) gives its part
    back first, so the other adapters keep computing what they computed. A
    layer left with no adapter becomes its plain layer again.

    Examples:

        >>> import keras
        >>> import keras_lowrank
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="out")])
        >>> _ = keras_lowrank.enable_adapter(model, targets=["out"], rank=2, adapter_name="a")
        >>> _ = keras_lowrank.enable_adapter(model, targets=["out"], rank=2, adapter_name="b")
        >>> keras_lowrank.delete_adapter(model, "a")
        >>> keras_lowrank.adapter_names(model)
        ['b']
    """
    from keras_lowrank import plan as plan_lib

    _names_arg(model, [name], "delete_adapter")
    entries = [e for e in tree.walk(model) if tree.is_adapter_set(e.layer) and name in e.layer.members]
    for e in entries:
        member = e.layer.members[name]
        if member.merged:
            raise ValueError(f"Layer {e.path!r}: adapter {name!r} is merged; unmerge it first.")
    for e in entries:
        s = e.layer
        member = s.members[name]
        if rewrites(member):
            original = member.original_matrix(s.base_matrix())
            check_finite(original, e.path, "delete_adapter")
            bases.assign_kernel(s.layer, s.geometry.matrix_to_kernel(original))
        s.remove_member(name)
        if not s.members:  # the frozen layer, as a merge would leave it
            s.layer.activation = s.activation
            s.layer.activity_regularizer = s.activity_regularizer
            tree.replace_layer(model, e, s.layer)
        else:
            s.apply_trainable()
    plan_lib.mark_adapted(model)
    compiled.after_change(model)


def activate(model, names):
    """Set every set's gates to `names` and let exactly those train."""
    for _, s in sets(model):
        s.set_gates(names)
        s.apply_trainable()


# ----------------------------------------------------------------------
# Weighted combination (PEFT's `add_weighted_adapter`)
COMBINE_METHODS = ("linear", "cat", "svd")


def _lora_form(member, where):
    """`(Aᵀ, B, scale)` of `member` as the plain LoRA of its contribution
    (float64, so that a weighted combination cannot overflow before it is
    checked)."""
    from keras_lowrank import registry

    if member.method != "lora" and "lora" not in registry.get(member.method).export_forms:
        raise ValueError(
            f"combine: layer {where!r} has a {member.method!r} adapter, which has no "
            "plain-LoRA form; combine it with method='svd'."
        )
    state, info = member.as_lora_state()
    scale = info["alpha"] / (info["rank"] ** 0.5 if info["rslora"] else info["rank"])
    return (_np(state["lora_a"]).astype("float64"), _np(state["lora_b"]).astype("float64"),
            float(scale))


def _np(x):
    return np.asarray(ops.convert_to_numpy(x), dtype="float32")


def _contribution(member, k):
    """What `member` adds to the kernel matrix `k` when active."""
    return _np(member.merged_matrix(k)) - _np(member.original_matrix(k))


def _svd_factors(delta, rank, where):
    """`(Aᵀ, B)` of the best rank-`rank` LoRA of `delta` (scale 1)."""
    from keras_lowrank import svd

    u, s, v = svd.decompose(delta, rank, where=where)
    root = np.sqrt(s)[..., None, :]
    return np.swapaxes(u * root, -1, -2), np.swapaxes(v * root, -1, -2)


def combine(model, weights, adapter_name, method="svd", rank=None):
    """Add `adapter_name`, a weighted combination of named adapters
    (PEFT's `add_weighted_adapter`); it becomes the active adapter.

    On each layer holding any of the adapters in `weights`:

    - `"svd"`: the rank-`rank` truncated SVD of `Σ w_i Δ_i`, where `Δ_i` is
      what adapter `i` adds to the kernel when active (any method); `rank`
      defaults to the largest rank combined there. A LoRA.
    - `"cat"`: the LoRA of rank `Σ r_i` whose factors are the adapters'
      LoRA forms side by side: exactly `Σ w_i Δ_i`. Every adapter needs a
      plain-LoRA form.
    - `"linear"`: SVF adapters combine their multipliers, `z = Σ w_i z_i`
      (Transformer²'s composition, as `keras_lowrank.svf.compose`);
      LoRA forms of one rank combine as PEFT does, `A = Σ √(w_i s_i) A_i`,
      `B = Σ √(w_i s_i) B_i` (`s_i` the scale; not exactly `Σ w_i Δ_i`
      unless the adapters share a factor).

    Args:
        model: a model with named adapters.
        weights: `{name: weight}`.
        adapter_name: the new adapter's name.
        method: `"svd"` (default, as PEFT), `"cat"` or `"linear"`.
        rank: the rank of an `"svd"` combination.

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="out")])
        >>> _ = keras_lowrank.enable_adapter(model, targets=["out"], rank=2, adapter_name="a")
        >>> _ = keras_lowrank.enable_adapter(model, targets=["out"], rank=2, adapter_name="b")
        >>> keras_lowrank.combine(model, {"a": 0.7, "b": 0.3}, "ab", method="cat")
        >>> model.layers[0].members["ab"].rank
        4
    """
    from keras_lowrank import adapt

    if not isinstance(weights, dict) or not weights:
        raise ValueError(f"combine: weights must be a non-empty {{name: weight}} dict; received {weights!r}.")
    names = _names_arg(model, list(weights), "combine")
    for name in names:
        w = weights[name]
        if isinstance(w, bool) or not isinstance(w, (int, float, np.floating, np.integer)) or not np.isfinite(w):
            raise ValueError(f"combine: the weight of {name!r} must be a finite number; received {w!r}.")
    check_name(adapter_name)
    if adapter_name in adapter_names(model):
        raise ValueError(f"combine: the model already has an adapter named {adapter_name!r}.")
    if method not in COMBINE_METHODS:
        raise ValueError(f"combine: method must be one of {COMBINE_METHODS}; received {method!r}.")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"combine: rank must be a positive int; received {rank!r}.")
    plans = {}  # path -> new variables
    svf_options = None
    for path, s in sets(model):
        present = [(n, s.members[n]) for n in names if n in s.members]
        if not present:
            continue
        where = path
        g = s.geometry
        if method == "linear" and all(m.method == "svf" for _, m in present):
            options = {k: v for k, v in present[0][1].options().items() if k != "seed"}
            if options.get("parametrization") != "paper" or any(
                {k: v for k, v in m.options().items() if k != "seed"} != options for _, m in present
            ):
                raise ValueError(
                    f"combine: layer {where!r}: SVF adapters combine linearly with one set "
                    "of options and parametrization='paper' (the multiplier z)."
                )
            svf_options = options
            z = sum(weights[n] * _np(m.read(m.svf_z)).astype("float64") for n, m in present)
            plans[path] = ("svf", _combined(z, where, weights))
            continue
        if method == "svd":
            k = s.base_matrix()
            delta = _combined(sum(weights[n] * _contribution(m, k).astype("float64") for n, m in present),
                              where, weights)
            ranks = [m.summary_rank() for _, m in present if m.summary_rank() is not None]
            r = rank if rank is not None else (max(ranks) if ranks else None)
            if r is None:
                raise ValueError(
                    f"combine: layer {where!r}: the adapters {[n for n, _ in present]} have no "
                    "rank; give rank=... for the SVD combination."
                )
            a_t, b = _svd_factors(delta, min(r, g.rank_limit), where)
        else:
            forms = [(float(weights[n]), *_lora_form(m, where)) for n, m in present]
            if method == "cat":
                a_t = np.concatenate([w * sc * a for w, a, _, sc in forms], axis=-2)
                b = np.concatenate([bb for _, _, bb, _ in forms], axis=-2)
            else:
                if len({a.shape for _, a, _, _ in forms}) != 1:
                    raise ValueError(
                        f"combine: layer {where!r}: method='linear' needs adapters of one rank; "
                        f"they have ranks {[a.shape[-2] for _, a, _, _ in forms]} (use 'cat' or 'svd')."
                    )
                if any(w * sc < 0 for w, _, _, sc in forms):
                    raise ValueError(
                        f"combine: layer {where!r}: method='linear' takes √(weight·scale) and needs "
                        "weights >= 0 (use 'cat' or 'svd')."
                    )
                a_t = sum(np.sqrt(w * sc) * a for w, a, _, sc in forms)
                b = sum(np.sqrt(w * sc) * bb for w, _, bb, sc in forms)
        plans[path] = ("lora", (_combined(a_t, where, weights), _combined(b, where, weights)))
    kinds = {kind for kind, _ in plans.values()}
    if len(kinds) > 1:
        raise ValueError(
            "combine: method='linear' found SVF adapters on some layers and others on "
            "other layers; combine them with 'cat' or 'svd'."
        )
    paths = list(plans)
    if kinds == {"svf"}:
        adapt.enable_adapter(model, method="svf", targets=paths, adapter_name=adapter_name, **svf_options)
        for path, (_, z) in plans.items():
            member = _member(model, path, adapter_name)
            member.svf_z.assign(z)
    else:
        ranks = {p: int(v[1][0].shape[-2]) for p, v in plans.items()}
        adapt.enable_adapter(
            model, method="lora", targets=paths, rank=max(ranks.values()),
            rank_pattern=ranks, alpha_pattern={p: float(r) for p, r in ranks.items()},
            adapter_name=adapter_name,
        )
        for path, (_, (a_t, b)) in plans.items():
            member = _member(model, path, adapter_name)
            member.lora_a.assign(a_t)
            member.lora_b.assign(b)


def _combined(value, where, weights):
    """A combined tensor as float32, or a `ValueError` when the weights make
    it overflow (or NaN): checked before the new adapter is made."""
    value = np.asarray(value, "float64")
    if not np.all(np.abs(value) <= np.finfo(np.float32).max):
        raise ValueError(
            f"combine: layer {where!r}: the weights {weights} make the combined "
            "adapter overflow float32 (NaN or inf); nothing was added."
        )
    return value.astype("float32")


def _member(model, path, name):
    for e in tree.walk(model):
        if e.path == path:
            return e.layer.members[name]
    raise KeyError(path)
