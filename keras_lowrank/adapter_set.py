"""The layer that holds several named adapters on one frozen layer.

A layer with named adapters (`enable_adapter(..., adapter_name=...)`, see
`keras_lowrank.named` for the operations on them) is held by an
`AdapterSet`: the frozen base once, each named adapter on that base, and
one non-trainable 0/1 gate per name. The layer computes PEFT's sum over the
active adapters,

    y = y0 + Σ_active (adapter_i(x) - y0)

where `y0` is the frozen base's output. Adapters that rewrite the frozen
kernel (PiSSA, OLoRA, MiLoRA, SVD-training...) give back their part of the
original kernel while inactive, so every combination of active adapters
computes what those adapters alone would on the original model.

This module sits below the plan (`keras_lowrank.plan` builds and places the
sets); it also holds the model-wide views of the sets the plan and the
operations read (`sets`, `names_in`, `activate`).
"""

import re

import keras
import numpy as np
from keras import ops

from keras_lowrank import _compat
from keras_lowrank import bases
from keras_lowrank import per_example
from keras_lowrank import tree
from keras_lowrank.adapter import Adapter
from keras_lowrank.adapter import rewrites
from keras_lowrank.adapter import adapter_policy_name
from keras_lowrank.adapter_merge import check_finite

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


@keras.saving.register_keras_serializable(package="keras_lowrank")
class AdapterSet(keras.layers.Layer):
    """Named adapters on one frozen `Dense`/`EinsumDense` layer.

    Made by `enable_adapter(..., adapter_name=...)`; not built by hand. The
    output is `activation(y0 + Σ_active (adapter_i(x) - y0))` (see the
    module docstring; the operations are in `keras_lowrank.named`).

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
        member.join_set(self)

    def remove_member(self, name):
        """Let go of the adapter `name` (and its gate)."""
        member = self.members.pop(name)
        gate = self._gates.pop(name)
        self._untrack_variable(gate)
        member.leave_set()
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

    def gate_values(self):
        """`{name: copy of its gate's value}`, for `restore_gates`."""
        return {name: _compat.copy_value(gate) for name, gate in self._gates.items()}

    def restore_gates(self, values):
        """Put back the gates `gate_values` saw (bit for bit)."""
        for name, value in values.items():
            self._gates[name].assign(value)

    def apply_trainable(self):
        """The active adapters train, the others are frozen; the base bias
        trains if an active adapter has `train_bias`."""
        bias_trains = False
        for name, member in self.members.items():
            on = self.is_active(name)
            for var_name in member.trainable_names():
                member.adapter_variables()[var_name].trainable = on
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
                member.record_trainable()
        self.built = True

    @property
    def geometry(self):
        return bases.geometry_of(self.layer)

    def call(self, inputs, training=None, reverse=False):
        if reverse:  # a tied embedding's output head reads the adapted table
            return bases.reverse_output(self.layer, inputs, self.kernel)
        y0 = self.layer(inputs)
        selection = per_example.current()
        if selection is not None and self.adapter_enabled:  # an adapter per example
            y = per_example.mixed_output(self, inputs, y0, selection, training)
            return y if self.activation is None else self.activation(y)
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

    def compute_output_spec(self, inputs, training=None, reverse=False):
        if reverse:  # a tied embedding's output head (symbolic calls)
            return self.layer.compute_output_spec(inputs, reverse=True)
        return super().compute_output_spec(inputs, training=training)

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
            member.filled_from_file()  # the plan binds model-level state
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


# ----------------------------------------------------------------------
# Model-wide views (the operations on them are in `keras_lowrank.named`)
def sets(model, entries=None):
    """`[(path, AdapterSet)]` of `model` (`entries`: a `tree.walk(model)`
    already made)."""
    entries = tree.walk(model) if entries is None else entries
    return [(e.path, e.layer) for e in entries if tree.is_adapter_set(e.layer)]


def has_named(model, entries=None):
    """Whether `model` holds named adapters."""
    return bool(sets(model, entries))


def names_in(found, active=False):
    """The adapter names of the sets `found` (`sets(model)`), or only the
    active ones: each layer's names in the order they were added there, the
    layers in model order, each name once."""
    names = []
    for _, s in found:
        for name in (s.active_names() if active else s.members):
            if name not in names:
                names.append(name)
    return names


def activate(found, names):
    """Set the gates of every set in `found` to `names` and let exactly
    those adapters train."""
    for _, s in found:
        s.set_gates(names)
        s.apply_trainable()
