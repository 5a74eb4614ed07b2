"""The class of a model with adapters: it carries its plan across `.keras`
round trips.

A model with adapters gets a subclass of its own class (made once per
class, `mark_adapted`) that serializes as `keras_lowrank>AdaptedModel`:
its original serialization under `"base"` and `plan_config(model)` under
`"adapters"`. That name resolves to `keras_lowrank.plan.AdaptedModel`,
which rebuilds the base model and applies the saved plan; this module only
hands it the config (through Keras's registry of serializable objects, as
a `.keras` file does), so it sits below the plan. The subclass also adds
the adapters' optimizer parts to `compile` and the methods' model-level
state to `weights`, `variables` and `call`. Layers are keyed by `tree`
keys, which are the same for every build of the same architecture.
"""

import dataclasses

import keras

from keras_lowrank import _compat
from keras_lowrank import adapter_set
from keras_lowrank import bases
from keras_lowrank import saved_plan
from keras_lowrank import shared
from keras_lowrank import training
from keras_lowrank import tree

#: what models with adapters serialize as
REGISTERED_NAME = "keras_lowrank>AdaptedModel"


def adapters(model):
    """`(path, adapter layer)` for every adapter in `model`."""
    return _adapters_in(tree.walk(model))


def _adapters_in(entries):
    return [(e.path, e.layer) for e in entries if tree.is_adapter(e.layer)]


def plan_config(model):
    """The saved form of the model's adapters, keyed by layer key. The
    matrix, trainable and parameter counts are for readers of the file
    (`keras-lowrank inspect`); loading ignores them."""
    layers = {}
    entries = tree.walk(model)
    for e in entries:
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
    found = adapter_set.sets(model, entries)
    return {
        "format_version": saved_plan.FORMAT_VERSION,
        "layers": layers,
        "shared": {m: dict(st.state_config) for m, st in shared.states(model).items()},
        "active": adapter_set.names_in(found, active=True) if found else None,
        "trainable_layers": getattr(model, "_klr_trainable_layers", None),
        "total_params": bases.count_params(model),
        "trainable_params": bases.count_params(model, trainable_only=True),
    }


def mark_adapted(model, trainable_layers=dataclasses.MISSING, entries=None):
    """Give `model` the class that serializes its adapters (or take it back
    when none is left), and let go of the model-level states no adapter
    uses any more. `entries`: a `tree.walk(model)` already made, to read
    instead of walking the model again."""
    if trainable_layers is not dataclasses.MISSING:
        object.__setattr__(model, "_klr_trainable_layers", trainable_layers)
    found = adapters(model) if entries is None else _adapters_in(entries)
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


_ADAPTED_CLASSES = {}


def _deserializer():
    """What `REGISTERED_NAME` resolves to: `keras_lowrank.plan.AdaptedModel`."""
    return keras.saving.get_registered_object(REGISTERED_NAME)


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
        return _deserializer().from_config(config, custom_objects)

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
            # custom classes are imported" and this module's name. (Keras
            # finds a registered class by its registered name first, so
            # files that name the module this code was in before load too.)
            "__module__": __name__,
            "__qualname__": base_cls.__qualname__,
            "__doc__": base_cls.__doc__,
        },
    )
    deserializer = _deserializer()
    keras.saving.register_keras_serializable("keras_lowrank", "AdaptedModel")(cls)
    # Keep the name resolving to the deserializer.
    keras.saving.register_keras_serializable("keras_lowrank", "AdaptedModel")(deserializer)
    _ADAPTED_CLASSES[base_cls] = cls
    return cls
