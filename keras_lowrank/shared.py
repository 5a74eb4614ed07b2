"""Model-level state: variables and behaviour one method shares across layers.

Some methods need state that belongs to no single layer: VeRA's frozen
random projections (one pair for the whole model), DyLoRA's rank for the
current step (one draw for every layer). Such state is a `SharedState`
layer, one per method and model:

- it is created by the plan *before* the method's adapters are injected
  (`config_for` reads what it needs from the planned layers), and every
  adapter of the method is bound to it (`Adapter.bind_shared`);
- the model holds it once, under the attribute `_klr_shared` (a tracked
  dict, method name -> state): its variables appear once in `model.weights`,
  get one optimizer slot if trainable, and are saved once in a `.keras` file;
  adapter files carry `file_state()` once, under `@<method>::<name>`;
- a reload (`.keras` or `load_adapter` onto a fresh model) creates it again
  from the saved plan and binds the new adapters to it, so the layers stay
  tied; `merge` and unloading the last adapter of the method drop it.
- `begin_call(training)` runs once per forward pass of the model that holds
  it, before any layer (see `keras_lowrank.training`).
"""

import keras

from keras_lowrank import _compat

#: the model attribute holding the states
ATTRIBUTE = "_klr_shared"
#: prefix of a shared state's tensors in adapter files
FILE_PREFIX = "@"


@keras.saving.register_keras_serializable(package="keras_lowrank")
class SharedState(keras.layers.Layer):
    """Base class of model-level method state (see the module docstring).

    Args:
        state_config: what the state is made of (dimensions, seeds); two
            plans can share one state only if `check_fits` accepts.
    """

    method = None
    #: `keras_lowrank.tree` does not walk into states (they are not layers
    #: of the model, and `freeze` must not touch trainable ones)
    _klr_is_shared_state = True

    def __init__(self, state_config=None, **kwargs):
        kwargs.setdefault("name", f"{self.method}_shared_state")
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        self.state_config = dict(state_config or {})

    @classmethod
    def config_for(cls, layer_plans, where):
        """The state config the planned layers need (`None`: they need no
        state, e.g. LoRA-drop layers that all have their own pair)."""
        raise NotImplementedError

    def check_layers(self, layer_plans, where):
        """Raise a clear error if this state (new, from a file, or the
        model's) cannot serve the planned layers."""

    def check_fits(self, config, where):
        """Raise a clear error if this state cannot serve layers that need
        `config` (the model already holds it, from an earlier call)."""
        if config != self.state_config:
            raise ValueError(
                f"{where}: the model's {self.method} state was made with "
                f"{self.state_config}, these layers need {config}. Add all "
                f"{self.method} layers in one enable_adapter call, or merge the "
                "existing ones first."
            )

    def build(self, input_shape=None):
        self.build_state()
        self.built = True

    def build_state(self):
        """Create the state's variables."""

    def initialize(self):
        """Give the variables their initial values (a new state, not a reload)."""

    def file_state(self):
        """Name -> variable of what adapter files carry."""
        return {}

    def begin_call(self, training):
        """Runs once per forward pass of the model holding the state."""

    def get_config(self):
        config = super().get_config()
        config["state_config"] = dict(self.state_config)
        return config


def states(model):
    """`{method: state}` held by `model`."""
    held = getattr(model, ATTRIBUTE, None)
    return dict(held) if held else {}


def get(model, method):
    return states(model).get(method)


def attach(model, state):
    """Hold `state` in `model` (tracked: its variables are the model's)."""
    with _compat.unlocked(model):
        if getattr(model, ATTRIBUTE, None) is None:
            setattr(model, ATTRIBUTE, {})
        getattr(model, ATTRIBUTE)[state.method] = state


def detach(model, method):
    """Drop the state of `method` from `model`."""
    held = getattr(model, ATTRIBUTE, None)
    if held and method in held:
        with _compat.unlocked(model):
            held.pop(method)


def with_state_variables(model, found, kind):
    """`found` (the model's `weights` or `variables`) and the variables of
    its states that are not in it yet: a Sequential model keeps its layer
    list apart from what it tracks, so its states are added here (once)."""
    held = states(model)
    if not held:
        return found
    seen = {id(v) for v in found}
    out = list(found)
    for state in held.values():
        for v in getattr(state, kind):
            if id(v) not in seen:
                seen.add(id(v))
                out.append(v)
    return out


def begin_call(model, training):
    """Run every state's per-forward-pass hook."""
    for state in states(model).values():
        state.begin_call(training)
