"""Training dynamics: the third axis, beside the method and the base storage.

Methods that change what happens during training (schedules, rank
sampling, masks, learning-rate ratios, base updates) declare *training
parts* (`Adapter.training_parts`). Each kind of part has one home, chosen so that
it runs inside the compiled train step of `model.fit` on JAX (under
`jax.jit`, where the trainer holds its own copy of the state), TensorFlow
(in a `tf.function`) and PyTorch alike:

- `"forward"`: in an adapter's `call(training=True)`. Randomness comes from
  `keras.random` with a `SeedGenerator`; extra losses go through
  `add_loss`; state is a non-trainable variable written there. (Writes to
  non-trainable variables in `call` are threaded through the JAX step.)
- `"model_call"`: in the method's `SharedState.begin_call(training)`, which
  the adapted model class runs once per forward pass of the model, before
  any layer: one value for every layer of the step (DyLoRA's rank).
- `"optimizer"`: in `AdapterOptimizer`, a wrapper around the user's
  optimizer that owns its variables and serializes the inner one. It is put
  in place automatically: after `enable_adapter`, `model.compile(optimizer=
  <any Keras optimizer>)` wraps it, and so does the recompile that
  `enable_adapter` runs on an already-compiled model. An optimizer never
  writes a model variable it is not updating (that fails on JAX).
- never in a callback: a callback that assigns variables without the JAX
  trainer's state sync is lost on JAX.

State of every part lives in Keras variables (adapter, shared-state or
optimizer variables), so it is saved in `.keras` files and resumes after a
reload.
"""

import keras
from keras import ops

from keras_lowrank import _compat
from keras_lowrank import registry
from keras_lowrank import tree

#: what users meet (the rest is how methods declare their training parts)
__all__ = ["AdapterOptimizer"]

KINDS = ("forward", "model_call", "optimizer")


class TrainingPart:
    """A method's training-time behaviour: its kind (where it runs, see the
    module docstring) and one line saying what it does."""

    def __init__(self, kind, doc):
        if kind not in KINDS:
            raise ValueError(f"Unknown training part kind {kind!r}; kinds: {KINDS}.")
        self.kind = kind
        self.doc = doc

    def learning_rate_multipliers(self, model):
        """`{variable path: factor}` for the optimizer (optimizer parts)."""
        return {}

    def optimizer_hook(self, model):
        """An `OptimizerHook` that runs inside every optimizer step of
        `model` (optimizer parts that need the step's gradients), or `None`."""
        return None

    def __repr__(self):
        return f"{type(self).__name__}({self.kind!r}: {self.doc})"


class LearningRateRatio(TrainingPart):
    """LoRA+: the listed adapter variables (and, with `one_dimensional`,
    every trainable 1-D variable of the model, as PEFT's
    `create_loraplus_optimizer` groups them) learn at `ratio` times the
    optimizer's learning rate, `ratio` being the adapter option `option`."""

    def __init__(self, method, option="lr_ratio", variables=("lora_b",), one_dimensional=True):
        super().__init__(
            "optimizer",
            f"{', '.join(variables)}"
            + (" and every trainable 1-D variable" if one_dimensional else "")
            + f" learn at {option} x the learning rate, under any optimizer and schedule",
        )
        self.method = method
        self.option = option
        self.variables = tuple(variables)
        self.one_dimensional = one_dimensional

    def learning_rate_multipliers(self, model):
        out = {}
        ratios = []
        for e in tree.walk(model):
            a = e.layer
            if not tree.is_adapter(a) or a.method != self.method:
                continue
            ratio = float(getattr(a, self.option))
            ratios.append(ratio)
            for name in self.variables:
                var = a.adapter_state().get(name)
                if var is not None and var.trainable:
                    out[var.path] = ratio
        if self.one_dimensional and ratios:
            ratio = max(ratios)
            for v in model.trainable_variables:
                if len(v.shape) == 1:
                    out.setdefault(v.path, ratio)
        return out


class OptimizerHook:
    """Work an optimizer part does inside every optimizer step.

    `AdapterOptimizer` calls `build` once (the hook creates its state with
    `optimizer.add_variable`: optimizer variables, saved with the optimizer
    and written safely inside the compiled step on every backend), then, in
    each step, `after_apply(optimizer, step, grads, variables)` right after
    the inner optimizer has updated the variables: `step` is the 0-based
    index of the step just taken, `grads` the step's gradients, `variables`
    the updated trainable variables (a hook may write those, never other
    model variables: on JAX the optimizer sees only these). A hook is
    serializable (`get_config`/`from_config`), so a reloaded model rebuilds
    it and resumes with its saved state.
    """

    def build(self, optimizer, var_list):
        pass

    def after_apply(self, optimizer, step, grads, variables):
        pass

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def parts(model, kind=None):
    """The training parts of the methods in `model` (of one `kind`)."""
    seen, out = set(), []
    for e in tree.walk(model):
        if tree.is_adapter(e.layer) and e.layer.method not in seen:
            seen.add(e.layer.method)
            out.extend(p for p in registry.get(e.layer.method).training_parts
                       if kind is None or p.kind == kind)
    return out


def learning_rate_multipliers(model):
    """`{variable path: factor}` of every optimizer part in `model`."""
    out = {}
    for part in parts(model, "optimizer"):
        for path, factor in part.learning_rate_multipliers(model).items():
            out.setdefault(path, factor)
    return out


def optimizer_hooks(model):
    """The `OptimizerHook`s of the optimizer parts in `model`."""
    hooks = (part.optimizer_hook(model) for part in parts(model, "optimizer"))
    return [h for h in hooks if h is not None]


@keras.saving.register_keras_serializable(package="keras_lowrank")
class AdapterOptimizer(keras.optimizers.Optimizer):
    """Any Keras optimizer, with the optimizer parts of the model's adapters.

    Each variable named in `learning_rate_multipliers` is updated by the
    inner optimizer's own rule at `factor x` its learning rate (and weight
    decay), every step: whatever the optimizer and the learning-rate
    schedule, exactly as with a parameter group of that learning rate in
    PyTorch. `model.compile` puts it in place for methods that need it; it
    can also be built by hand.

    It also runs the adapters' `OptimizerHook`s (AdaLoRA's importance and
    budget) right after each update, with the step's gradients.

    Args:
        inner_optimizer: a Keras optimizer (instance, name or config).
        learning_rate_multipliers: `{variable path: factor}`.
        hooks: `OptimizerHook`s (instances or serialized configs).

    Examples:

        >>> import keras
        >>> from keras_lowrank.training import AdapterOptimizer
        >>> opt = AdapterOptimizer(keras.optimizers.Adam(1e-3), {"dense/lora_b": 16.0})
        >>> round(float(opt.learning_rate), 6)
        0.001
    """

    def __init__(self, inner_optimizer, learning_rate_multipliers=None, hooks=(), name=None, **kwargs):
        super().__init__(learning_rate=0.0, name=name or "adapter_optimizer", **kwargs)
        self.inner_optimizer = keras.optimizers.get(inner_optimizer)
        self.learning_rate_multipliers = {
            str(k): float(v) for k, v in dict(learning_rate_multipliers or {}).items()
        }
        self.hooks = [
            h if isinstance(h, OptimizerHook) else keras.saving.deserialize_keras_object(h)
            for h in hooks
        ]
        self._factors = {}

    def build(self, var_list):
        if self.built:
            return
        self.inner_optimizer.build(var_list)
        self._factors = {
            id(v): self.learning_rate_multipliers.get(v.path, 1.0) for v in var_list
        }
        super().build(var_list)
        for hook in self.hooks:
            hook.build(self, var_list)

    @property
    def variables(self):
        return self._variables + self.inner_optimizer.variables

    def apply(self, grads, trainable_variables=None):
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
        variables = trainable_variables
        if variables is None:
            variables = self._trainable_variables
        innermost = _compat.innermost_optimizer(self.inner_optimizer)
        factors = self._factors
        # the index of the step about to be taken (a copy: torch updates the
        # counter in place)
        step = ops.cast(ops.convert_to_tensor(self.inner_optimizer.iterations), "int32") + 0
        if any(f != 1.0 for f in factors.values()):
            with _compat.per_variable_learning_rate(innermost, lambda v: factors.get(id(v), 1.0)):
                self.inner_optimizer.apply(grads, variables)
        else:
            self.inner_optimizer.apply(grads, variables)
        if self.hooks:
            grads = _compat.unscaled_gradients(self.inner_optimizer, grads)
            for hook in self.hooks:
                hook.after_apply(self, step, list(grads), list(variables))

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, value):
        if hasattr(self, "inner_optimizer"):
            self.inner_optimizer.learning_rate = value

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def get_config(self):
        return {
            "name": self.name,
            "inner_optimizer": keras.optimizers.serialize(self.inner_optimizer),
            "learning_rate_multipliers": dict(self.learning_rate_multipliers),
            "hooks": [keras.saving.serialize_keras_object(h) for h in self.hooks],
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.optimizers.deserialize(config.pop("inner_optimizer"), custom_objects=custom_objects)
        return cls(inner, **config)


def unwrap(optimizer):
    """The user's optimizer inside an `AdapterOptimizer` (or `optimizer`)."""
    return optimizer.inner_optimizer if isinstance(optimizer, AdapterOptimizer) else optimizer


def after_compile(model):
    """Put the optimizer parts of the model's adapters in place (or take
    them out when there are none): called by the adapted model's `compile`."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        return
    multipliers = learning_rate_multipliers(model)
    hooks = optimizer_hooks(model)
    inner = unwrap(optimizer)
    new = AdapterOptimizer(inner, multipliers, hooks) if multipliers or hooks else inner
    if new is not optimizer:
        _compat.set_optimizer(model, new)
