"""The plan: which adapter goes on which layer, validated once, applied once.

`enable_adapter`, `load_adapter` and the `.keras` reload all go through a
`Plan`:

1. building the plan resolves every layer and validates every option, the
   geometry, the storage and (for adapter files) every tensor, and changes
   nothing in the model;
2. `plan.prepare()` constructs the adapters and allocates their own
   variables (still nothing in the model changes);
3. `plan.apply(init, fill)` attaches them, initializes them (or fills them
   from a file), moves frozen kernels to their storage, swaps the adapters
   into the model and freezes the rest. If anything fails on the way, `apply`
   puts back every layer, kernel, variable and trainable flag it touched.

The model carries its plan across `.keras` round trips: a model with
adapters serializes as `keras_lowrank>AdaptedModel`, its original
serialization under `"base"` and `plan_config(model)` under `"adapters"`.
Layers are keyed by `tree` keys, which are the same for every build of the
same architecture.
"""

import dataclasses
import gc
import re
import warnings

import keras

from keras_lowrank import _compat
from keras_lowrank import bases
from keras_lowrank import compiled
from keras_lowrank import named
from keras_lowrank import registry
from keras_lowrank import shared
from keras_lowrank import svd
from keras_lowrank import targeting
from keras_lowrank import training
from keras_lowrank import tree
from keras_lowrank.geometry import EquationError
from keras_lowrank.geometry import KernelGeometry

#: version of the saved plan (adapter files and `.keras` adapter plans);
#: 1 keyed layers by path and kept the options beside the other fields
FORMAT_VERSION = 2

#: fields of a saved layer entry besides its options
_LAYER_FIELDS = ("path", "method", "base", "double_quant", "merged", "enabled",
                 "kernel_shape", "equation", "options", "matrix", "trainable", "adapter_name")


@dataclasses.dataclass
class LayerPlan:
    """One adapter of a plan."""

    entry: tree.Entry
    spec: registry.Method
    options: dict
    base: str = "float"
    double_quant: bool = True
    merged: bool = False
    enabled: bool = True
    adapter: object = None
    existing: bool = False
    geometry: KernelGeometry = None
    #: variable name -> array, for a plan read from an adapter file
    tensors: dict = None
    #: a named adapter (`keras_lowrank.named`): its name, and the entry of
    #: the layer it goes on (a plain layer, an unnamed adapter or a set)
    adapter_name: str = None
    spot: tree.Entry = None

    @property
    def path(self):
        return self.entry.path

    @property
    def key(self):
        return self.entry.key


class Plan:
    """Validated adapters for a model (see the module docstring)."""

    def __init__(self, model, layers, trainable_layers=None, entries=None,
                 heads=(), head_rule=None, active=None, task_layers=()):
        self.model = model
        #: paths of the task's own layers kept trainable (`train_task_layers`)
        self.task_layers = list(task_layers)
        #: `(variable, value)` of the layers an adapter file trains in full
        self.full_tensors = []
        #: the model's active adapter names after `apply` (`None`: no
        #: named adapters)
        self.active = active
        self.layers = layers
        self.trainable_layers = trainable_layers
        self.entries = entries
        self.heads = list(heads)
        self.head_rule = head_rule
        self.warnings = []
        #: method -> (state, is_new) for methods with model-level state
        self.states = {}

    # ------------------------------------------------------------------
    # Build
    @classmethod
    def for_model(cls, model, method, options, targets=None, exclude=None,
                  rank_pattern=None, alpha_pattern=None, trainable_layers=None,
                  base=None, double_quant=True, adapter_name=None, train_task_layers=True):
        """The plan of `enable_adapter(model, method, ...)`."""
        spec = registry.get(method)
        check_model(model)
        if not isinstance(train_task_layers, bool):
            raise ValueError(
                f"enable_adapter: train_task_layers must be True or False; received {train_task_layers!r}."
            )
        if adapter_name is not None or named.has_named(model):
            adapter_name = named.check_name(named.DEFAULT if adapter_name is None else adapter_name)
        bases.check_base(base, double_quant)
        base = base or "float"
        if base not in spec.bases:
            raise ValueError(
                f"Method {method!r} cannot run over a {base!r} base; it supports {spec.bases}."
            )
        names = {o.name for o in spec.options}
        for option, value in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
            if value and option.split("_")[0] not in names:
                raise ValueError(
                    f"{option} is given, but method {method!r} has no "
                    f"{option.split('_')[0]!r} option."
                )
        base_options = spec.validate_options(options, "enable_adapter")
        rank_pairs = targeting.pattern_dict(rank_pattern, "rank_pattern")
        alpha_pairs = targeting.pattern_dict(alpha_pattern, "alpha_pattern")
        keep = targeting.patterns(trainable_layers, "trainable_layers")
        entries = tree.walk(model)
        chosen, heads, rule = targeting.select(model, targets, exclude, entries)
        targeting.matching_entries(entries, keep, "trainable_layers")
        task = task_entries(model, entries) if train_task_layers else []
        if task:
            inside = {id(layer): t for t in task for layer in t.layer._flatten_layers()}
            if targets is None or targets == "all-linear":
                # the task's own layers train in full, without adapters
                chosen = [e for e in chosen if id(e.layer) not in inside]
            else:  # a task layer the user targets gets adapters instead
                adapted = {id(inside[id(e.layer)].layer) for e in chosen if id(e.layer) in inside}
                task = [t for t in task if id(t.layer) not in adapted]
            if not chosen:
                raise ValueError(
                    f"No layer left to adapt: the Dense/EinsumDense layers of {model.name!r} "
                    f"outside its backbone ({[t.path for t in task]}) train in full "
                    "(train_task_layers=False adapts them instead)."
                )
            keep = keep + [targeting.Pattern("re:" + re.escape(t.path), "trainable_layers") for t in task]
        layers = []
        for entry in chosen:
            if tree.is_adapter(entry.layer) and adapter_name is None:
                raise ValueError(
                    f"Layer {entry.path!r} already has a {entry.layer.method!r} adapter; "
                    "merge it (keras_lowrank.merge) before adding another, or give "
                    "adapter_name=... to add a named adapter beside it."
                )
            layer_options = dict(base_options)
            if rank_pairs:
                layer_options["rank"] = targeting.per_layer(entry, rank_pairs, layer_options["rank"])
            if alpha_pairs:
                layer_options["alpha"] = targeting.per_layer(entry, alpha_pairs, layer_options["alpha"])
            if adapter_name is None:
                layers.append(_new_layer(entry, spec, layer_options, base, double_quant, entry.path))
            else:
                layers.append(_new_member(entry, spec, layer_options, base, double_quant, adapter_name))
        plan = cls(model, layers, _pattern_sources(keep), entries, heads, rule,
                   active=None if adapter_name is None else [adapter_name],
                   task_layers=[t.path for t in task])
        plan.plan_shared_states()
        plan.collect_warnings()
        return plan

    @classmethod
    def from_saved(cls, model, config, where, tensors=None):
        """The plan a saved config describes (an adapter file's, with its
        `tensors`, or a `.keras` file's). Everything is checked before
        anything changes: the layers exist, the options are valid for the
        method, the kernels have the saved shapes, and every tensor is the
        float tensor of a variable the adapter has, with its shape."""
        check_model(model)
        if not isinstance(config, dict) or not isinstance(config.get("layers"), dict):
            raise ValueError(f"{where}: the adapter plan is malformed (no 'layers' mapping).")
        version = config.get("format_version", 1)
        if version not in (1, FORMAT_VERSION):
            raise ValueError(
                f"{where} was written in adapter format {version!r}; this "
                f"keras-lowrank reads formats 1 and {FORMAT_VERSION}. Upgrade keras-lowrank."
            )
        entries = tree.walk(model)
        by_key = {(e.key if version >= 2 else e.path): e for e in entries}
        if version >= 2:
            config, tensors = _rerooted(model, entries, config, tensors, where)
        layers = []
        for name, raw in config["layers"].items():
            fields = _saved_fields(raw, name, version, where)
            adapter_name = fields["adapter_name"]
            spot_key, at, suffix = name.rpartition("@") if "@" in name else (name, "", "")
            if adapter_name is not None:
                named.check_name(adapter_name, f"{where}: the adapter_name of layer {name!r}")
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
            if base not in spec.bases:
                raise ValueError(
                    f"{where}: layer {here!r} holds a {spec.name!r} adapter "
                    f"over a {base!r} base, which the method does not support."
                )
            for flag in ("merged", "enabled"):
                if not isinstance(fields[flag], bool):
                    raise ValueError(f"{where}: layer {here!r}: {flag!r} must be true or false.")
            if entry is not None and tree.is_adapter(entry.layer):
                lp = _existing_layer(entry, spec, options, where, tensors is not None)
            else:
                if tensors is not None and fields["merged"]:
                    raise ValueError(f"{where}: layer {here!r} is saved as merged.")
                if adapter_name is None and not tree.is_adapter_set(entry.layer):
                    lp = _new_layer(entry, spec, options, base, double_quant, entry.path, where)
                else:
                    lp = _new_member(entry or spot, spec, options, base, double_quant,
                                     adapter_name or named.DEFAULT, where)
            lp.merged, lp.enabled = fields["merged"], fields["enabled"]
            shape = fields.get("kernel_shape")
            if shape is not None and tuple(lp.geometry.kernel_shape) != tuple(shape):
                raise ValueError(
                    f"Layer {here!r} has a kernel of shape "
                    f"{tuple(lp.geometry.kernel_shape)}; {where} was made for shape "
                    f"{tuple(shape)}."
                )
            layers.append(lp)
        keep = config.get("trainable_layers")
        pats = targeting.patterns(keep, f"trainable_layers of {where}")
        targeting.matching_entries(entries, pats, f"trainable_layers of {where}")
        active = config.get("active")
        if active is not None and (not isinstance(active, list) or not all(isinstance(n, str) for n in active)):
            raise ValueError(f"{where}: the plan's 'active' entry is not a list of adapter names.")
        if active is None and any(lp.adapter_name is not None for lp in layers):
            active = sorted({lp.adapter_name for lp in layers if lp.adapter_name is not None})
        plan = cls(model, layers, _pattern_sources(pats), entries, active=active)
        saved_states = config.get("shared") or {}
        if not isinstance(saved_states, dict):
            raise ValueError(f"{where}: the plan's 'shared' entry is not a mapping.")
        plan.plan_shared_states(saved_states, where)
        if tensors is not None:
            plan.check_tensors(tensors, where)
        return plan

    def plan_shared_states(self, saved=None, where="enable_adapter"):
        """Create (or reuse the model's) model-level state of each method
        that has one, and bind the planned adapters to it. Nothing is
        attached to the model yet."""
        by_method = {}
        for lp in self.layers:
            if lp.spec.shared_state is not None:
                by_method.setdefault(lp.spec.name, []).append(lp)
        for name, lps in by_method.items():
            cls_ = lps[0].spec.shared_state
            if saved is not None and name in saved:
                config = saved[name]
                if not isinstance(config, dict):
                    raise ValueError(f"{where}: the {name} shared state config is malformed.")
            else:
                config = cls_.config_for(lps, where)
                if config is None:
                    continue
            state = shared.get(self.model, name)
            if state is not None:
                state.check_fits(config, where)
                is_new = False
            else:
                state = cls_(config)
                with tree.path_scope(shared.ATTRIBUTE + "/x"):
                    state.build()
                is_new = True
            state.check_layers(lps, where)
            self.states[name] = (state, is_new)
            for lp in lps:
                lp.adapter.bind_shared(state)

    def collect_warnings(self):
        for lp in self.layers:
            for text in lp.adapter.rank_warnings(lp.geometry):
                self.warnings.append(f"{lp.path}: {text}")
        if self.warnings:
            shown = "; ".join(self.warnings[:5])
            more = f" (and {len(self.warnings) - 5} more)" if len(self.warnings) > 5 else ""
            warnings.warn(
                f"Adapter ranks above what the kernel can use: {shown}{more}. They "
                "are allowed (as in PEFT), but add parameters without adding rank.",
                stacklevel=4,
            )

    def check_tensors(self, tensors, where):
        """Every tensor belongs to a planned layer, and every layer gets
        exactly the tensors its adapter has, as finite floats of the right
        shape."""
        by_layer = {}
        known = {lp.key: lp for lp in self.layers} | {lp.path: lp for lp in self.layers}
        state_tensors = {}
        full = {n: v for n, v in tensors.items() if n.startswith(FULL_PREFIX)}
        self.full_tensors = _full_tensors(self.entries, self.trainable_layers, full, where)
        for name in tensors:
            if name in full:
                continue
            layer_name, sep, var = name.partition(SEP)
            if sep and layer_name.startswith(shared.FILE_PREFIX):
                method = layer_name[len(shared.FILE_PREFIX):]
                if method not in self.states:
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
        for lp in self.layers:
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
            lp.tensors = have
        for method, (state, _) in self.states.items():
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
        self.state_tensors = state_tensors

    # ------------------------------------------------------------------
    # Apply
    def prepare(self):
        """Construct and build the new adapters (their variables only)."""
        for lp in self.layers:
            if lp.existing or lp.adapter.built:
                continue
            with tree.path_scope(lp.path):
                lp.adapter.build(None)
            shapes = _compat.build_shapes(lp.entry.layer)
            if shapes:
                _compat.set_build_shapes(lp.adapter, shapes)

    def apply(self, init, fill=None):
        """Attach, initialize or `fill`, swap and freeze (all or nothing),
        then move the frozen bases into their storage (see `_convert_bases`)."""
        model = self.model
        flags = trainable_flags(model)
        attached, swapped, snapshots, new_states, state_snaps = [], [], [], [], []
        pending, full_snaps = [], []
        gates = [(g, _compat.copy_value(g)) for _, st in named.sets(model) for g in st._gates.values()]
        n_svd = sum(1 for lp in self.layers if lp.adapter.uses_svd and not lp.existing)
        with svd.progress(n_svd if init or fill is not None else 0):
            try:
                self._apply_layers(init, fill, attached, snapshots, new_states, state_snaps, pending)
                for var, value in self.full_tensors:  # layers the file trains in full
                    full_snaps.append((var, _compat.copy_value(var)))
                    var.assign(value)
                placed = {}
                for lp in self.layers:
                    if lp.existing:
                        continue
                    if lp.adapter_name is None:
                        tree.replace_layer(model, lp.entry, lp.adapter)
                        back = tree.Entry(lp.path, lp.adapter, lp.entry.parents, lp.key)
                        swapped.append(lambda back=back, lp=lp: tree.replace_layer(model, back, lp.entry.layer))
                    else:
                        self._place_member(lp, placed, swapped)
                if self.active is not None:
                    for e in tree.walk(model):
                        if tree.is_adapter(e.layer) and e.holder is None:
                            self._new_set(e, None, swapped)  # unnamed: "default"
                freeze(model, self.trainable_layers)
                if self.active is not None:
                    named.activate(model, self.active)
                mark_adapted(model, self.trainable_layers)
            except BaseException:
                for undo in reversed(swapped):
                    undo()
                for g, value in gates:
                    g.assign(value)
                for a in reversed(attached):
                    a.detach()
                for a, snap in snapshots:
                    a.restore(snap)
                for state, values in state_snaps:
                    for name, var in state.file_state().items():
                        var.assign(values[name])
                for var, value in full_snaps:
                    var.assign(value)
                for method in new_states:
                    shared.detach(model, method)
                restore_trainable_flags(flags)
                mark_adapted(model)
                compiled.after_change(model)
                raise
            for a in attached:
                a.commit()
            # what a rollback needed pins every float layer: let it go
            flags = swapped = snapshots = state_snaps = attached = gates = full_snaps = None
            try:
                self._convert_bases(pending, init)
            finally:
                compiled.after_change(model)
        return [lp.adapter for lp in self.layers]

    def _new_set(self, spot, lp, undo):
        """An `AdapterSet` in place of `spot`'s layer: an unnamed adapter
        (it becomes the adapter "default") or the frozen layer `lp`'s new
        adapter was just attached to (its activation moved onto it)."""
        current = spot.layer
        owner = current if tree.is_adapter(current) else lp.adapter
        frozen = current.layer if tree.is_adapter(current) else current
        activation, regularizer = owner.activation, owner.activity_regularizer
        members = {named.DEFAULT: current} if tree.is_adapter(current) else {}
        with tree.path_scope(spot.path):
            new = named.AdapterSet(frozen, members=members, active=[], activation=activation,
                                   activity_regularizer=regularizer)
            new.build(None)
        shapes = _compat.build_shapes(frozen)
        if shapes:
            _compat.set_build_shapes(new, shapes)
        owner.activation, owner.activity_regularizer = keras.activations.linear, None
        tree.replace_layer(self.model, spot, new)

        def back():
            tree.replace_layer(self.model, tree.Entry(spot.path, new, spot.parents, spot.key), current)
            for name in list(new.members):
                new.remove_member(name)
            owner.activation, owner.activity_regularizer = activation, regularizer

        undo.append(back)
        return new

    def _place_member(self, lp, placed, undo):
        """Put the named adapter of `lp` into the set at its layer (made on
        the first named adapter there)."""
        holder = placed.get(lp.spot.key)
        if holder is None:
            current = lp.spot.layer
            holder = current if tree.is_adapter_set(current) else self._new_set(lp.spot, lp, undo)
            placed[lp.spot.key] = holder
        lp.adapter.activation, lp.adapter.activity_regularizer = keras.activations.linear, None
        with tree.path_scope(lp.spot.path):
            holder.add_member(lp.adapter_name, lp.adapter, active=False)
        holder.adapter_enabled = lp.enabled
        undo.append(lambda: holder.remove_member(lp.adapter_name) and None)

    def _apply_layers(self, init, fill, attached, snapshots, new_states, state_snaps, pending):
        """Model-level states, then each layer: attach, init or fill."""
        model = self.model
        for method, (state, is_new) in self.states.items():
            tensors = getattr(self, "state_tensors", {}).get(method)
            if is_new:
                if init or tensors is None:
                    state.initialize()
                shared.attach(model, state)
                new_states.append(method)
            elif tensors is not None:
                state_snaps.append((state, {k: _compat.copy_value(v) for k, v in state.file_state().items()}))
            if tensors is not None:
                for name, var in state.file_state().items():
                    var.assign(tensors[name])
        for lp in self.layers:
            with svd.layer_label(lp.path):
                self._apply_layer(lp, init, fill, attached, snapshots, pending)

    @staticmethod
    def _apply_layer(lp, init, fill, attached, snapshots, pending):
        a = lp.adapter
        if lp.existing:
            snapshots.append((a, a.snapshot()))
            if fill is not None:
                fill(lp)
            return
        convert = None
        if bases.base_kind(a.layer) != lp.base and lp.base != "float":
            convert = bases.converter(lp.base, lp.double_quant)
        with tree.path_scope(lp.path):
            # a base to convert is initialized in `_convert_bases`, on its
            # full-precision kernel or its new storage as the method needs
            a.attach(init=init and convert is None)
        attached.append(a)
        if fill is not None:
            fill(lp)
        if convert is not None:
            pending.append((lp, convert))
        a.merged, a.adapter_enabled = lp.merged, lp.enabled

    def _convert_bases(self, pending, init):
        """Move each frozen base into its storage (NF4, Keras int8/int4), one
        layer at a time, and let go of its float kernel before the next: the
        process never holds more than the float model, the quantized kernels
        so far and one kernel in flight (`gc.collect`, every `GC_BYTES` of
        float kernels, frees the float layers: Keras's trackers keep them in
        reference cycles; on torch, the ancestors' `ParameterDict`s let go of
        the old tensors as each layer is done).

        This runs after the adapters are in place and final: a float kernel
        cannot come back once freed. The inputs were checked before anything
        changed (`bases.check_finite_kernel`); if it is interrupted anyway, the
        layers before the one named hold their new storage and the rest keep
        their float bases, every adapter working."""
        self.entries = None  # the plan no longer needs the float layers
        leaving = {id(lp.adapter.layer) for lp, _ in pending}  # never hold on to these
        holders = _compat.torch_param_holders(
            [layer for layer in tree.all_layers_with_root(self.model) if id(layer) not in leaving]
        ) if pending else []
        unfreed = 0
        kinds = "/".join(sorted({lp.base.upper() for lp, _ in pending}))
        with svd.progress(len(pending), f"{kinds} conversion", kind="quantize"):
            self._convert_each(pending, init, holders, unfreed)

    @staticmethod
    def _convert_each(pending, init, holders, unfreed):
        for i, (lp, convert) in enumerate(pending):
            a = lp.adapter
            if bases.base_kind(a.layer) == lp.base:
                svd._tick(lp.path, kind="quantize")
                continue  # moved with another named adapter on the same layer
            unfreed += bases.kernel_bytes(a.layer)
            old_variables = list(a.layer.variables)
            try:
                with svd.layer_label(lp.path), tree.path_scope(lp.path + "/" + a.layer.name):
                    a.attach_base(convert, init)
            except BaseException as e:
                if hasattr(e, "add_note"):
                    e.add_note(
                        f"keras-lowrank: {i} of {len(pending)} frozen bases were moved to "
                        f"{lp.base!r} before {lp.path!r}; that layer and the rest keep "
                        "their float bases (the adapters are in place)."
                    )
                raise
            lp.entry = tree.Entry(lp.path, a, lp.entry.parents, lp.key)
            _compat.forget_torch_variables(holders, old_variables)
            del old_variables
            if unfreed >= GC_BYTES:  # a collection costs time: not for small kernels
                gc.collect()
                unfreed = 0
            svd._tick(lp.path, kind="quantize")


SEP = "::"
#: prefix of the tensors of layers trained in full, in adapter files
#: (`+<layer key>::<variable name>`)
FULL_PREFIX = "+"


def _inside(entry, roots):
    return any(entry.path == r.path or entry.path.startswith(r.path + "/") for r in roots)


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
#: float kernel bytes converted between two garbage collections in
#: `Plan._convert_bases` (the process holds at most this much more)
GC_BYTES = 16 << 20


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


def _rerooted(model, entries, config, tensors, where):
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


def task_entries(model, entries):
    """The layers a KerasHub task adds around its backbone that hold
    weights (a classifier's head), as top-level entries of `entries`; none
    for any other model. A causal LM's head is its backbone's tied
    embedding, so it has none."""
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, keras.layers.Layer) or backbone is model:
        return []
    inside = {id(layer) for layer in backbone._flatten_layers()}
    return [e for e in entries if "/" not in e.path and id(e.layer) not in inside
            and not isinstance(e.layer, keras.layers.InputLayer) and e.layer.weights]


def check_model(model):
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"keras_lowrank needs a Keras model; received {type(model).__name__}.")
    if not model.built:
        raise ValueError(
            f"Model {model.name!r} is not built; call it on data or build it "
            "before adding adapters."
        )


def _new_layer(entry, spec, options, base, double_quant, label, where=None, name=None):
    layer = entry.layer
    path = entry.path
    bases.check_supported(layer, path)
    bases.check_finite_kernel(layer, path)
    mode = bases.quantization_mode(layer)
    if mode is not None and spec.layer_class.rewrites_kernel:
        if where is None:
            raise ValueError(
                f"Layer {path!r} is already quantized by Keras (mode={mode!r}); "
                f"method {spec.name!r} decomposes the full-precision kernel and "
                f"rewrites it, which a {mode} kernel cannot give back. Adapt the "
                f"float model with base={mode!r} instead."
            )
        raise ValueError(
            f"Layer {path!r} is quantized by Keras (mode={mode!r}); a "
            f"{spec.name!r} adapter rewrites its full-precision kernel. Load "
            f"{where} into the float model (the saved base storage is re-applied)."
        )
    kind = bases.base_kind(layer)
    if kind != "float" and base not in ("float", kind):
        raise ValueError(
            f"Layer {path!r} is already stored as {kind}; base={base!r} would "
            "quantize it a second time. Adapt it as it is (base=None)."
        )
    try:
        geometry = bases.geometry_of(layer)
    except EquationError as e:
        raise ValueError(f"Layer {path!r}: {e}") from None
    options = spec.validate_options(options, label)
    adapter = spec.layer_class(layer, **options) if name is None else spec.layer_class(layer, name=name, **options)
    adapter._managed = True
    adapter.check_geometry(geometry, path)
    return LayerPlan(entry, spec, options, base, double_quant, adapter=adapter, geometry=geometry)


def _new_member(spot, spec, options, base, double_quant, name, where=None):
    """The plan of a named adapter `name` on the layer of entry `spot` (a
    plain layer, an unnamed adapter, or a set of named adapters)."""
    layer = spot.layer
    if tree.is_adapter_set(layer):
        frozen, present = layer.layer, dict(layer.members)
    elif tree.is_adapter(layer):
        frozen, present = layer.layer, {named.DEFAULT: layer}
    else:
        frozen, present = layer, {}
    if name in present:
        raise ValueError(
            f"Layer {spot.path!r} already has an adapter named {name!r} "
            f"({present[name].method}); choose another adapter_name, or "
            f"delete_adapter(model, {name!r}) first."
        )
    if any(a.merged for a in present.values()):
        raise ValueError(
            f"Layer {spot.path!r} has an adapter merged into its kernel; unmerge it "
            "before adding a named adapter beside it."
        )
    if present:
        kind = bases.base_kind(frozen)
        if kind not in spec.bases:
            raise ValueError(
                f"Layer {spot.path!r} has a {kind} base, which method {spec.name!r} "
                f"(adapter {name!r}) does not support; it supports {spec.bases}."
            )
        if base not in ("float", kind):
            raise ValueError(
                f"Layer {spot.path!r} holds adapters over a {kind} base; the adapters "
                f"of one layer share its frozen base, so base={base!r} cannot apply to "
                f"adapter {name!r} (give base=None)."
            )
        base = kind
    suffix = tree.member_suffix(name)
    entry = tree.Entry(spot.path + suffix, frozen, spot.parents, spot.key + suffix,
                       adapter_name=name)
    lp = _new_layer(entry, spec, options, base, double_quant, entry.path, where,
                    name=f"{frozen.name}-{name}")
    lp.adapter_name, lp.spot = name, spot
    return lp


def _existing_layer(entry, spec, options, where, loading):
    a = entry.layer
    if a.method != spec.name:
        raise ValueError(
            f"Layer {entry.path!r} has a {a.method!r} adapter; {where} holds a "
            f"{spec.name!r} adapter."
        )
    if loading:
        if a.merged:
            raise ValueError(
                f"Layer {entry.path!r} has its adapter merged into the kernel; "
                f"call keras_lowrank.unmerge(model) before loading {where}, or load "
                "it onto a fresh copy of the base model."
            )
        mine = {k: v for k, v in a.options().items() if k != "seed"}
        theirs = {k: v for k, v in options.items() if k != "seed"}
        if mine != theirs:
            raise ValueError(
                f"Layer {entry.path!r} has a {spec.name!r} adapter with options "
                f"{mine}; {where} was saved with {theirs}. Load it onto a fresh "
                "copy of the base model."
            )
    return LayerPlan(entry, spec, options, bases.base_kind(a.layer),
                     getattr(a.layer, "double_quant", True), a.merged, a.adapter_enabled,
                     adapter=a, existing=True, geometry=a.geometry,
                     adapter_name=entry.adapter_name)


def _saved_fields(raw, name, version, where):
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: the entry of layer {name!r} is not a mapping.")
    raw = dict(raw)
    if version >= 2:
        unknown = sorted(set(raw) - set(_LAYER_FIELDS))
        if unknown:
            raise ValueError(f"{where}: layer {name!r} has unknown fields {unknown}.")
        options = raw.get("options", {})
        if not isinstance(options, dict):
            raise ValueError(f"{where}: the options of layer {name!r} are not a mapping.")
    else:  # format 1: the options beside the other fields
        options = {k: v for k, v in raw.items() if k not in _LAYER_FIELDS}
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


def _pattern_sources(pats):
    if not pats:
        return None
    return [("re:" + p.source.pattern) if isinstance(p.source, re.Pattern) else p.source
            for p in pats]


# ----------------------------------------------------------------------
# Freezing
def trainable_flags(model):
    layers = tree.all_layers_with_root(model)
    return (
        [(layer, layer.trainable) for layer in layers],
        [(v, v.trainable) for layer in layers for v in _compat.created_trainable(layer)],
    )


def restore_trainable_flags(flags):
    layer_flags, var_flags = flags
    for layer, value in layer_flags:
        layer.trainable = value
    for v, value in var_flags:
        v.trainable = value


def freeze(model, trainable_layers=None):
    """Freeze everything but the adapters (and the layers the user names)."""
    entries = tree.walk(model)
    keep = targeting.matching_entries(
        entries, targeting.patterns(trainable_layers, "trainable_layers"), "trainable_layers"
    )
    model.trainable = True
    for layer in [model] + [e.layer for e in entries]:
        if tree.is_adapter(layer):
            continue
        for v in _compat.created_trainable(layer):
            v.trainable = False
    for entry in keep:
        entry.layer.trainable = True
        for sub in [entry.layer] + [e.layer for e in tree.walk(entry.layer, into_adapters=True)]:
            for v in _compat.created_trainable(sub):
                v.trainable = True
    for entry in entries:
        if tree.is_adapter(entry.layer):
            entry.layer.trainable = True
            entry.layer.freeze_base()
    for entry in entries:
        if tree.is_adapter_set(entry.layer):
            entry.layer.apply_trainable()


# ----------------------------------------------------------------------
# The model remembers its plan across `.keras` round trips
def adapters(model):
    """`(path, adapter layer)` for every adapter in `model`."""
    return [(e.path, e.layer) for e in tree.walk(model) if tree.is_adapter(e.layer)]


def plan_config(model):
    """The saved form of the model's adapters, keyed by layer key. The
    matrix, trainable and parameter counts are for readers of the file
    (`keras-lowrank inspect`); loading ignores them."""
    layers = {}
    for e in tree.walk(model):
        a = e.layer
        if not tree.is_adapter(a):
            continue
        cfg = {
            "path": e.path,
            "method": a.method,
            "base": bases.base_kind(a.layer),
            "double_quant": getattr(a.layer, "double_quant", True),
            "merged": a.merged,
            "enabled": a.adapter_enabled,
            "options": a.options(),
            "kernel_shape": list(a.geometry.kernel_shape),
            "equation": a.geometry.equation,
            "matrix": a.geometry.matrix_text(),
            "trainable": int(a.trainable_count()),
        }
        if e.holder is not None:
            cfg["adapter_name"] = e.adapter_name
            cfg["enabled"] = e.holder.adapter_enabled
        layers[e.key] = cfg
    return {
        "format_version": FORMAT_VERSION,
        "layers": layers,
        "shared": {m: dict(st.state_config) for m, st in shared.states(model).items()},
        "active": named.active_adapters(model) if named.has_named(model) else None,
        "trainable_layers": getattr(model, "_klr_trainable_layers", None),
        "total_params": bases.count_params(model),
        "trainable_params": bases.count_params(model, trainable_only=True),
    }


_ADAPTED_CLASSES = {}


@keras.saving.register_keras_serializable(package="keras_lowrank", name="AdaptedModel")
class AdaptedModel:
    """Deserializer of models that carry adapters.

    Loading rebuilds the original model, then re-applies the adapters
    (structure only; the variables come from the file).
    """

    @classmethod
    def from_config(cls, config, custom_objects=None):
        base = keras.saving.deserialize_keras_object(config["base"], custom_objects=custom_objects)
        if not base.built:
            raise ValueError(
                f"Cannot rebuild the adapters of {base.name!r}: the model did "
                "not build from its config."
            )
        plan = Plan.from_saved(base, config["adapters"], "the .keras file")
        plan.prepare()
        plan.apply(init=False)
        return base

    def get_config(self):
        return {}


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
        return {"base": base, "adapters": plan_config(self)}

    def from_config(klass, config, custom_objects=None):
        return AdaptedModel.from_config(config, custom_objects)

    def compile(self, *args, **kwargs):
        base_cls.compile(self, *args, **kwargs)
        training.after_compile(self)

    def compile_from_config(self, config):
        # Keras skips this for a class that overrides compile(); ours only
        # adds the adapters' optimizer parts, so do what Keras would do for
        # the base class.
        if base_cls.compile is not keras.Model.compile:
            return base_cls.compile_from_config(self, config)
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built and getattr(self, "optimizer", None) is not None:
            self.optimizer.build(self.trainable_variables)

    def weights(self):
        return shared.with_state_variables(self, base_cls.weights.fget(self), "weights")

    def variables(self):
        return shared.with_state_variables(self, base_cls.variables.fget(self), "variables")

    def call(self, *args, **kwargs):
        training_flag = kwargs.get("training")
        if training_flag is None:
            training_flag = _compat.call_context_training()
        shared.begin_call(self, bool(training_flag))
        return base_cls.call(self, *args, **kwargs)

    cls = type(
        base_cls.__name__,
        (base_cls,),
        {
            "get_config": get_config,
            "from_config": classmethod(from_config),
            "compile": compile,
            "compile_from_config": compile_from_config,
            "call": call,
            "weights": property(weights, doc=base_cls.weights.__doc__),
            "variables": property(variables, doc=base_cls.variables.__doc__),
            "_klr_base_class": base_cls,
            # Not the base class's module: Keras imports a keras/keras_hub
            # module named in a file and would find the plain class there,
            # which cannot read this config. Named here, a file loaded
            # without `import keras_lowrank` fails with Keras's "make sure
            # custom classes are imported" and this module's name.
            "__module__": __name__,
            "__qualname__": base_cls.__qualname__,
            "__doc__": base_cls.__doc__,
        },
    )
    keras.saving.register_keras_serializable("keras_lowrank", "AdaptedModel")(cls)
    # Keep the name resolving to the generic deserializer.
    keras.saving.register_keras_serializable("keras_lowrank", "AdaptedModel")(AdaptedModel)
    _ADAPTED_CLASSES[base_cls] = cls
    return cls


def mark_adapted(model, trainable_layers=dataclasses.MISSING):
    """Give `model` the class that serializes its adapters (or take it back
    when none is left)."""
    if trainable_layers is not dataclasses.MISSING:
        object.__setattr__(model, "_klr_trainable_layers", trainable_layers)
    found = adapters(model)
    has = bool(found)
    in_use = {a.method for _, a in found}
    for method in list(shared.states(model)):
        if method not in in_use:
            shared.detach(model, method)
    base_cls = getattr(type(model), "_klr_base_class", None)
    if has and base_cls is None:
        model.__class__ = _adapted_class(type(model))
    elif not has and base_cls is not None:
        model.__class__ = base_cls

