"""The plan: which adapter goes on which layer, validated once, applied once.

`enable_adapter`, `load_adapter` and the `.keras` reload all go through a
`Plan`:

1. building the plan resolves every layer and validates every option, the
   geometry, the storage and (for adapter files) every tensor, and changes
   nothing in the model;
2. `plan.prepare()` constructs the adapters and allocates their own
   variables (still nothing in the model changes);
3. `plan.apply(init, fill)` attaches them, initializes them (or fills them
   from a file), swaps the adapters into the model and freezes the rest,
   each step recording how to undo it in one `UndoLog`: if anything fails
   on the way, `apply` puts back every layer, kernel, variable, gate and
   trainable flag it touched. Then it moves the frozen kernels to their
   storage, one at a time.

What a saved plan holds is read in `keras_lowrank.saved_plan`, the class
that carries the plan across `.keras` round trips is made in
`keras_lowrank.adapted_model` (its deserializer, `AdaptedModel`, is here),
and freezing is `keras_lowrank.freezing`. Layers are keyed by `tree` keys,
which are the same for every build of the same architecture.
"""

import dataclasses
import functools
import gc
import re
import warnings

import keras

from keras_lowrank import _compat
from keras_lowrank import adapter_set
from keras_lowrank import bases
from keras_lowrank import compiled
from keras_lowrank import experts
from keras_lowrank import freezing
from keras_lowrank import registry
from keras_lowrank import saved_plan
from keras_lowrank import shared
from keras_lowrank import svd
from keras_lowrank import targeting
from keras_lowrank import tree
from keras_lowrank.adapted_model import mark_adapted
from keras_lowrank.geometry import EquationError
from keras_lowrank.geometry import KernelGeometry
from keras_lowrank.undo import UndoLog

#: float kernel bytes converted between two garbage collections in
#: `Plan._convert_bases` (the process holds at most this much more)
GC_BYTES = 16 << 20


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
        #: expert weights exposed for this plan (`keras_lowrank.experts`):
        #: those left without an adapter go back into their banks after `apply`
        self.exposed = []
        self.warnings = []
        #: method -> (state, is_new) for methods with model-level state
        self.states = {}
        #: method -> {variable name: array}, its state's tensors in an
        #: adapter file
        self.state_tensors = {}

    # ------------------------------------------------------------------
    # Build
    @classmethod
    def for_model(cls, model, method, options, targets=None, exclude=None,
                  rank_pattern=None, alpha_pattern=None, trainable_layers=None,
                  base=None, double_quant=True, adapter_name=None, train_task_layers=True,
                  entries=None):
        """The plan of `enable_adapter(model, method, ...)` (`entries`: a
        `tree.walk(model)` already made, to read instead of walking the
        model again)."""
        spec = registry.get(method)
        check_model(model)
        if not isinstance(train_task_layers, bool):
            raise ValueError(
                f"enable_adapter: train_task_layers must be True or False; received {train_task_layers!r}."
            )
        if adapter_name is None and entries is None:
            entries = tree.walk(model)
        if adapter_name is not None or adapter_set.has_named(model, entries):
            adapter_name = adapter_set.check_name(adapter_set.DEFAULT if adapter_name is None else adapter_name)
        bases.check_base(base, double_quant)
        base = base or "float"
        if base not in spec.base_kinds:
            raise ValueError(
                f"Method {method!r} cannot run over a {base!r} base; it supports {spec.base_kinds}."
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
        entries = tree.walk(model) if entries is None else entries
        chosen, heads, rule = targeting.select(model, targets, exclude, entries)
        targeting.matching_entries(entries, keep, "trainable_layers")
        task = freezing.task_entries(model, entries) if train_task_layers else []
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
        version = saved_plan.read_version(config, where)
        # the stacked expert weights a saved plan may name (`keras_lowrank.experts`)
        exposed = experts.expose_model(model)
        try:
            plan = cls._from_saved(model, config, where, tensors, version)
        except BaseException:
            experts.fold_back_model(model, only=exposed)
            raise
        plan.exposed = exposed
        return plan

    @classmethod
    def _from_saved(cls, model, config, where, tensors, version):
        entries = tree.walk(model)
        by_key = saved_plan.keyed(entries, version)
        if version >= 2:
            config, tensors = saved_plan.rerooted(model, entries, config, tensors, where)
        layers = []
        for name, raw in config["layers"].items():
            saved = saved_plan.read_layer(name, raw, version, by_key, model, entries, where)
            lp = _saved_layer(saved, where, tensors is not None)
            saved_plan.check_kernel_shape(saved, lp.geometry, where)
            layers.append(lp)
        pats = saved_plan.trainable_patterns(config, entries, where)
        active = saved_plan.read_active(config, [lp.adapter_name for lp in layers], where)
        plan = cls(model, layers, _pattern_sources(pats), entries, active=active)
        plan.plan_shared_states(saved_plan.shared_configs(config, where), where)
        if tensors is not None:
            plan.check_tensors(tensors, where)
        return plan

    def plan_shared_states(self, saved=None, where="enable_adapter"):
        """Create (or reuse the model's) model-level state of each method
        that has one, and bind the planned adapters to it. Nothing is
        attached to the model yet."""
        by_method = {}
        for lp in self.layers:
            if lp.spec.model_state is not None:
                by_method.setdefault(lp.spec.name, []).append(lp)
        for name, lps in by_method.items():
            cls_ = lps[0].spec.model_state
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
                # the variables' paths: a TensorFlow root scope may not start with "_"
                with tree.path_scope(shared.ATTRIBUTE.lstrip("_") + "/x"):
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
                "are allowed, but add parameters without adding rank.",
                stacklevel=4,
            )

    def check_tensors(self, tensors, where):
        """Every tensor belongs to a planned layer, and every layer gets
        exactly the tensors its adapter has, as finite floats of the right
        shape (`saved_plan.read_tensors`)."""
        per_layer, self.state_tensors, self.full_tensors = saved_plan.read_tensors(
            self.layers, self.states, self.entries, self.trainable_layers, tensors, where)
        for lp in self.layers:
            lp.tensors = per_layer[lp.key]

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
        then move the frozen bases into their storage (see `_convert_bases`).

        Each step that changes the model records how to undo it in one
        `UndoLog`; if a step fails, the log puts everything back, the last
        step first, and the error is raised again."""
        model = self.model
        log = UndoLog()
        n_svd = sum(1 for lp in self.layers if lp.adapter.uses_svd and not lp.existing)
        with svd.progress(n_svd if init or fill is not None else 0):
            try:
                pending = self._apply_steps(init, fill, log)
            except BaseException:
                log.rollback()
                experts.fold_back_model(model, only=self.exposed)
                mark_adapted(model)
                compiled.after_change(model)
                raise
            # the adapters forget what an undo needed, which pins every float layer
            log.commit()
            try:
                self._convert_bases(pending, init)
            finally:
                experts.fold_back_model(model, only=self.exposed)
                compiled.after_change(model)
        return [lp.adapter for lp in self.layers]

    def _apply_steps(self, init, fill, log):
        """Every step of `apply` before the bases move, each recorded in
        `log`; returns the `(layer plan, converter)` of the bases to move."""
        model = self.model
        log.record(functools.partial(freezing.restore_trainable_flags, freezing.trainable_flags(model)))
        for _, s in adapter_set.sets(model, self.entries):
            log.record(functools.partial(s.restore_gates, s.gate_values()))
        pending = self._apply_layers(init, fill, log)
        for var, value in self.full_tensors:  # layers the file trains in full
            log.record(functools.partial(var.assign, _compat.copy_value(var)))
            var.assign(value)
        placed = {}
        for lp in self.layers:
            if lp.existing:
                continue
            if lp.adapter_name is None:
                tree.replace_layer(model, lp.entry, lp.adapter)
                back = tree.Entry(lp.path, lp.adapter, lp.entry.parents, lp.key)
                log.record(functools.partial(tree.replace_layer, model, back, lp.entry.layer))
            else:
                self._place_member(lp, placed, log)
        entries = tree.walk(model)
        if self.active is not None:
            unnamed = [e for e in entries if tree.is_adapter(e.layer) and e.holder is None]
            for e in unnamed:
                self._new_set(e, None, log)  # unnamed: "default"
            if unnamed:
                entries = tree.walk(model)
        freezing.freeze(model, self.trainable_layers, entries)
        if self.active is not None:
            adapter_set.activate(adapter_set.sets(model, entries), self.active)
        mark_adapted(model, self.trainable_layers, entries)
        return pending

    def _new_set(self, spot, lp, log):
        """An `AdapterSet` in place of `spot`'s layer: an unnamed adapter
        (it becomes the adapter "default") or the frozen layer `lp`'s new
        adapter was just attached to (its activation moved onto it)."""
        current = spot.layer
        owner = current if tree.is_adapter(current) else lp.adapter
        frozen = current.layer if tree.is_adapter(current) else current
        activation, regularizer = owner.activation, owner.activity_regularizer
        members = {adapter_set.DEFAULT: current} if tree.is_adapter(current) else {}
        with tree.path_scope(spot.path):
            new = adapter_set.AdapterSet(frozen, members=members, active=[], activation=activation,
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

        log.record(back)
        return new

    def _place_member(self, lp, placed, log):
        """Put the named adapter of `lp` into the set at its layer (made on
        the first named adapter there)."""
        holder = placed.get(lp.spot.key)
        if holder is None:
            current = lp.spot.layer
            holder = current if tree.is_adapter_set(current) else self._new_set(lp.spot, lp, log)
            placed[lp.spot.key] = holder
        lp.adapter.activation, lp.adapter.activity_regularizer = keras.activations.linear, None
        with tree.path_scope(lp.spot.path):
            holder.add_member(lp.adapter_name, lp.adapter, active=False)
        log.record(functools.partial(holder.remove_member, lp.adapter_name))
        log.record(functools.partial(setattr, holder, "adapter_enabled", holder.adapter_enabled))
        holder.adapter_enabled = lp.enabled

    def _apply_layers(self, init, fill, log):
        """Model-level states, then each layer: attach, init or fill (each
        recorded in `log`). Returns the `(layer plan, converter)` of the
        bases to move into another storage."""
        model = self.model
        for method, (state, is_new) in self.states.items():
            tensors = self.state_tensors.get(method)
            if is_new:
                if init or tensors is None:
                    state.initialize()
                shared.attach(model, state)
                log.record(functools.partial(shared.detach, model, method))
            elif tensors is not None:
                log.record(functools.partial(_restore_state, state, {
                    k: _compat.copy_value(v) for k, v in state.file_state().items()}))
            if tensors is not None:
                for name, var in state.file_state().items():
                    var.assign(tensors[name])
        pending = []
        for lp in self.layers:
            with svd.layer_label(lp.path):
                convert = self._apply_layer(lp, init, fill, log)
            if convert is not None:
                pending.append((lp, convert))
        return pending

    @staticmethod
    def _apply_layer(lp, init, fill, log):
        """Attach (or, for an adapter already in the model, snapshot) and
        init or fill one adapter; returns the converter of its base, if it
        moves into another storage."""
        a = lp.adapter
        if lp.existing:
            log.record(functools.partial(a.restore, a.snapshot()))
            if fill is not None:
                fill(lp)
            return None
        convert = None
        if bases.base_kind(a.layer) != lp.base and lp.base != "float":
            convert = bases.converter(lp.base, lp.double_quant)
        # `detach` puts back whatever part of `attach` ran
        log.record(a.detach, commit=a.commit)
        with tree.path_scope(lp.path):
            # a base to convert is initialized in `_convert_bases`, on its
            # full-precision kernel or its new storage as the method needs
            a.attach(init=init and convert is None)
        if fill is not None:
            fill(lp)
        a.merged, a.adapter_enabled = lp.merged, lp.enabled
        return convert

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
                svd.tick(lp.path, kind="quantize")
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
            svd.tick(lp.path, kind="quantize")


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
    if (bases.is_conv(layer) or bases.is_embedding(layer)) and base not in (None, "float"):
        raise ValueError(
            f"Layer {path!r} ({type(layer).__name__}): its base stays float "
            f"(base={base!r} quantizes Dense, EinsumDense and expert stacks). "
            "Exclude it, or adapt it with base=None."
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
    adapter.managed_by_plan()
    adapter.check_geometry(geometry, path)
    return LayerPlan(entry, spec, options, base, double_quant, adapter=adapter, geometry=geometry)


def _new_member(spot, spec, options, base, double_quant, name, where=None):
    """The plan of a named adapter `name` on the layer of entry `spot` (a
    plain layer, an unnamed adapter, or a set of named adapters)."""
    layer = spot.layer
    if tree.is_adapter_set(layer):
        frozen, present = layer.layer, dict(layer.members)
    elif tree.is_adapter(layer):
        frozen, present = layer.layer, {adapter_set.DEFAULT: layer}
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
        if kind not in spec.base_kinds:
            raise ValueError(
                f"Layer {spot.path!r} has a {kind} base, which method {spec.name!r} "
                f"(adapter {name!r}) does not support; it supports {spec.base_kinds}."
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


def _pattern_sources(pats):
    if not pats:
        return None
    return [("re:" + p.source.pattern) if isinstance(p.source, re.Pattern) else p.source
            for p in pats]


def _saved_layer(saved, where, loading):
    """The layer plan of a `saved_plan.SavedLayer` (`loading`: an adapter
    file, with its tensors)."""
    entry, spot, spec, options, fields = saved.entry, saved.spot, saved.spec, saved.options, saved.fields
    if entry is not None and tree.is_adapter(entry.layer):
        lp = _existing_layer(entry, spec, options, where, loading)
    else:
        if loading and fields["merged"]:
            raise ValueError(f"{where}: layer {saved.here!r} is saved as merged.")
        if saved.adapter_name is None and not tree.is_adapter_set(entry.layer):
            lp = _new_layer(entry, spec, options, fields["base"], fields["double_quant"], entry.path, where)
        else:
            lp = _new_member(entry or spot, spec, options, fields["base"], fields["double_quant"],
                             saved.adapter_name or adapter_set.DEFAULT, where)
    lp.merged, lp.enabled = fields["merged"], fields["enabled"]
    return lp


def _restore_state(state, values):
    for name, var in state.file_state().items():
        var.assign(values[name])


# ----------------------------------------------------------------------
# Reading a `.keras` file
@keras.saving.register_keras_serializable(package="keras_lowrank", name="AdaptedModel")
class AdaptedModel:
    """Deserializer of models that carry adapters (what the name they
    serialize as, `adapted_model.REGISTERED_NAME`, resolves to).

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
