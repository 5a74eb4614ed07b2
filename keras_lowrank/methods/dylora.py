"""DyLoRA: one LoRA trained at every rank at once (arXiv 2210.07558).

A DyLoRA adapter holds LoRA factors of rank `r` (`A: (n_in, r)`,
`B: (r, n_out)`) and computes, at an active rank `ℓ`,
`y = xK + b + (alpha/ℓ) (x A[:, :ℓ]) B[:ℓ]`.

Training draws one `ℓ ~ U{1..r}` per step **for the whole model**, inside
the compiled train step: the model-level `DyLoRAState` draws it (with a
`SeedGenerator`) when the adapted model's forward pass begins, and every
layer reads it. With `frozen=True` (the reference trainer) only the `ℓ`-th
component of `A` and `B` receives gradients that step (the first `ℓ-1` are
held by `stop_gradient`); with `frozen=False` all of the first `ℓ` do.
Components above `ℓ` are unused. Masks keep every shape static, so the
step compiles once.

At inference the layers use the model's evaluation rank: `r` unless
`set_rank(model, ℓ)` chose another (no recompile: it is a variable).
`merge` folds the update at that rank, and `save_adapter(as_lora=True)`
writes the rank-`ℓ` LoRA. `evaluate_ranks(model, x, y)` evaluates the
model at every rank. The state (both ranks and the random generator's
state) is saved in `.keras` files, so training resumes with the same
sequence of ranks.

A layer whose `rank` differs from the model's largest `R` uses
`ceil(ℓ r / R)`.
"""

import keras
from keras import ops

from keras_lowrank import options as opt
from keras_lowrank import registry
from keras_lowrank import shared
from keras_lowrank import training
from keras_lowrank import tree
from keras_lowrank.adapter import Adapter
from keras_lowrank.methods.lora import ALPHA
from keras_lowrank.methods.lora import DROPOUT
from keras_lowrank.methods.lora import INITS
from keras_lowrank.methods.lora import RANK
from keras_lowrank.methods.lora import LoRA
from keras_lowrank.methods import reference

#: what users call (the rest is the method's machinery)
__all__ = ["evaluate_ranks", "fix_train_rank", "get_rank", "set_rank"]


def reference_merged(adapter, w):
    """DyLoRA at its inference rank ℓ: `W + (alpha/ℓ) A[:, :ℓ] B[:ℓ]`."""
    ell = adapter.eval_rank()
    a = reference.factor_a(adapter)[:, :ell]
    return w + (adapter.alpha / ell) * a @ reference.value(adapter, "lora_b")[:ell]


@keras.saving.register_keras_serializable(package="keras_lowrank")
class DyLoRAState(shared.SharedState):
    """The model-level rank of DyLoRA: `train_rank` (drawn once per training
    forward pass), `eval_rank` (`set_rank`), and the generator drawing it."""

    method = "dylora"

    @classmethod
    def config_for(cls, layer_plans, where):
        seeds = [lp.options["seed"] for lp in layer_plans if lp.options["seed"] is not None]
        return {
            "max_rank": max(lp.options["rank"] for lp in layer_plans),
            "seed": seeds[0] if seeds else None,
        }

    def check_fits(self, config, where):
        if config["max_rank"] > self.state_config["max_rank"]:
            raise ValueError(
                f"{where}: the model's DyLoRA layers have ranks up to "
                f"{self.state_config['max_rank']}; a rank of {config['max_rank']} "
                "needs its own model-level rank. Add all DyLoRA layers in one "
                "enable_adapter call."
            )

    @property
    def max_rank(self):
        return int(self.state_config["max_rank"])

    def build_state(self):
        self.train_rank = self.add_weight(
            name="train_rank", shape=(), dtype="int32", trainable=False,
            initializer=keras.initializers.Constant(self.max_rank),
        )
        self.eval_rank = self.add_weight(
            name="eval_rank", shape=(), dtype="int32", trainable=False,
            initializer=keras.initializers.Constant(self.max_rank),
        )
        # 0: draw a rank every training step; ℓ > 0: train at ℓ (federated
        # clients train at the rank their server broadcasts). Not saved: a
        # reloaded model draws again.
        self.fixed_rank = self.add_weight(
            name="fixed_rank", shape=(), dtype="int32", trainable=False,
            initializer=keras.initializers.Constant(0),
        )
        self.seed_generator = keras.random.SeedGenerator(self.state_config.get("seed"))

    def initialize(self):
        self.train_rank.assign(self.max_rank)
        self.eval_rank.assign(self.max_rank)

    def begin_call(self, training):
        if training:
            rank = keras.random.randint(
                (), 1, self.max_rank + 1, dtype="int32", seed=self.seed_generator
            )
            fixed = ops.convert_to_tensor(self.fixed_rank)
            self.train_rank.assign(ops.where(fixed > 0, fixed, rank))

    def rank(self, training):
        """The active rank `ℓ` (a scalar int32 tensor)."""
        return ops.convert_to_tensor(self.train_rank if training else self.eval_rank)

    def file_state(self):
        return {"eval_rank": self.eval_rank}

    # The generator's state is a variable that Keras does not save itself.
    def save_own_variables(self, store):
        store["train_rank"] = self.train_rank
        store["eval_rank"] = self.eval_rank
        store["seed_generator_state"] = self.seed_generator.state

    def load_own_variables(self, store):
        self.train_rank.assign(store["train_rank"])
        self.eval_rank.assign(store["eval_rank"])
        self.seed_generator.state.assign(store["seed_generator_state"])


@registry.method(
    "DyLoRA: LoRA trained at a random rank per step, usable at any rank",
    reference=reference_merged,
)
@keras.saving.register_keras_serializable(package="keras_lowrank")
class DyLoRA(LoRA):
    """Dynamic, search-free LoRA: trained at a random rank every step, used
    at any rank after (arXiv 2210.07558).

    Takes `LoRA`'s arguments (`layer`, `rank`, `alpha`, `dropout`, `init`,
    `train_bias`, `seed`, `activation`, `merged` and `enabled`; `rank` is the
    largest rank `r`, and the scale at rank `ℓ` is `alpha / ℓ`), and:

    Args:
        frozen: train only the `ℓ`-th component each step (the reference);
            `False` trains all of the first `ℓ`.

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, name="hidden"),
        ...                           keras.layers.Dense(4, name="out")])
        >>> _ = keras_lowrank.enable_adapter(model, method="dylora", rank=4)
        >>> keras_lowrank.dylora.set_rank(model, 2)
        >>> int(keras_lowrank.dylora.get_rank(model))
        2
    """

    method = "dylora"
    hotswap_pads_rank = False  # its ranks are nested (a trained order), not padding
    model_state = DyLoRAState
    training_parts = (
        training.TrainingPart("model_call", "one rank ℓ ~ U{1..r} per train step for the whole model"),
        training.TrainingPart(
            "forward", "components above ℓ masked; with frozen=True only the ℓ-th gets gradients"
        ),
    )
    #: each training step samples the rank where the layer is called
    serves_kernel = False
    OPTIONS = (
        RANK,
        ALPHA,
        DROPOUT,
        opt.Option("init", "kaiming", opt.choice(*INITS), "init of A: PEFT's kaiming-uniform or gaussian"),
        opt.Option("frozen", True, opt.boolean, "train only the ℓ-th component each step (the reference)"),
    ) + Adapter.OPTIONS
    rslora = False

    #: the factors whose rank components are ordered, so that cut to any
    #: rank ℓ they remain a working adapter (the federated exchange sends a
    #: client only the first `layer_rank(ℓ)` components)
    nested_factors = ("lora_a", "lora_b")

    def standalone_state(self, geometry):
        return DyLoRAState({"max_rank": self.rank, "seed": self.seed})

    def nested_rank_limit(self):
        """The largest model-level rank `ℓ` (`layer_rank` maps it to this
        layer's rank)."""
        return self.shared_state().max_rank if self.shared_state() is not None else self.rank

    def layer_rank(self, ell):
        """This layer's rank for the model-level rank `ell`."""
        big = self.shared_state().max_rank if self.shared_state() is not None else self.rank
        if big == self.rank:
            return ell
        return ops.minimum(self.rank, (ell * self.rank + big - 1) // big)

    def active_rank(self, training):
        if self.shared_state() is None:
            return ops.convert_to_tensor(self.rank, "int32")
        return self.layer_rank(self.shared_state().rank(bool(training)))

    def adapter_output(self, x, y, training):
        x = self.adapter_input(x, training)
        ell = self.active_rank(training)
        rows = self.geometry.inputs_to_rows(x)
        a = ops.cast(self.lora_a, rows.dtype)
        b = ops.cast(self.lora_b, rows.dtype)
        h = ops.matmul(rows, ops.swapaxes(a, -1, -2))  # (..., N, r)
        idx = ops.arange(self.rank, dtype="int32")
        if training and self.frozen:
            before = ops.cast(idx < ell - 1, h.dtype)
            current = ops.cast(ops.equal(idx, ell - 1), h.dtype)
            h = ops.stop_gradient(h) * before + h * current
            b = ops.stop_gradient(b) * ops.expand_dims(before, -1) + b * ops.expand_dims(current, -1)
        else:
            h = h * ops.cast(idx < ell, h.dtype)
        # y + (alpha/ℓ) h B
        scale = -self.alpha / ops.cast(ell, h.dtype)
        return self.add_negated_rows(x, y, ops.matmul(h * ops.cast(scale, h.dtype), b))

    def eval_rank(self):
        """This layer's inference rank, as a Python int."""
        return int(ops.convert_to_numpy(self.active_rank(False)))

    def delta_matrix(self):
        ell = self.eval_rank()
        a = self.factor_a()[..., :, :ell]
        b = self.read(self.lora_b)[..., :ell, :]
        return (self.alpha / ell) * ops.matmul(a, b)

    def as_lora_state(self):
        """The adapter at its inference rank `ℓ` as a plain rank-`ℓ` LoRA."""
        ell = self.eval_rank()
        state = {
            "lora_a": self.read(self.lora_a)[..., :ell, :],
            "lora_b": self.read(self.lora_b)[..., :ell, :],
        }
        return state, {"rank": ell, "alpha": self.alpha, "rslora": False}


def _states(model):
    state = shared.get(model, "dylora")
    if state is None:
        raise ValueError(f"Model {model.name!r} has no DyLoRA adapters.")
    return state


def set_rank(model, rank):
    """Use the DyLoRA adapters of `model` at rank `rank` for inference and
    merging (1 <= rank <= the largest rank). It is a variable: compiled
    predict and evaluate functions pick it up without recompiling."""
    state = _states(model)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= state.max_rank:
        raise ValueError(
            f"set_rank: rank must be an int in [1, {state.max_rank}]; received rank={rank!r}."
        )
    merged = [e.path for e in tree.walk(model) if tree.is_adapter(e.layer)
              and e.layer.method == "dylora" and e.layer.merged]
    if merged:
        raise ValueError(
            f"set_rank: the DyLoRA adapters {merged} are merged at the current rank; "
            "unmerge(model) first."
        )
    state.eval_rank.assign(rank)


def fix_train_rank(model, rank):
    """Train the DyLoRA adapters of `model` at rank `rank` every step
    instead of drawing one per step; `None` draws again. Federated clients
    use it: their server draws the rank of each round (DP-DyLoRA). It is a
    variable: a compiled train step picks it up without recompiling."""
    state = _states(model)
    if rank is None:
        state.fixed_rank.assign(0)
        return
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= state.max_rank:
        raise ValueError(
            f"fix_train_rank: rank must be None or an int in [1, {state.max_rank}]; "
            f"received rank={rank!r}."
        )
    state.fixed_rank.assign(rank)


def get_rank(model):
    """The inference rank of the DyLoRA adapters of `model`."""
    return int(ops.convert_to_numpy(_states(model).eval_rank))


def evaluate_ranks(model, x=None, y=None, ranks=None, **evaluate_kwargs):
    """`{rank: metrics}` of `model.evaluate(x, y, ...)` at every rank (or at
    `ranks`); the model is compiled by the caller. The inference rank is
    put back afterwards.

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, name="hidden"),
        ...                           keras.layers.Dense(4, name="out")])
        >>> _ = keras_lowrank.enable_adapter(model, method="dylora", rank=3)
        >>> model.compile(loss="mse")
        >>> x, y = np.ones((4, 8), "float32"), np.zeros((4, 4), "float32")
        >>> sorted(keras_lowrank.dylora.evaluate_ranks(model, x, y, verbose=0))
        [1, 2, 3]
    """
    state = _states(model)
    ranks = list(range(1, state.max_rank + 1)) if ranks is None else list(ranks)
    before = get_rank(model)
    evaluate_kwargs.setdefault("return_dict", True)
    out = {}
    try:
        for r in ranks:
            set_rank(model, r)
            out[r] = model.evaluate(x, y, **evaluate_kwargs)
    finally:
        state.eval_rank.assign(before)
    return out
