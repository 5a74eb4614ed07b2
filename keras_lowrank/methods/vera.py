"""VeRA: vector-based random matrix adaptation (arXiv 2310.11454).

One pair of frozen random projections is shared by every VeRA layer of the
model: `A_sh: (N_in, r)` and `B_sh: (r, N_out)`, `N_in`/`N_out` the largest
input/output sizes of the adapted layers' matrix views. Each layer slices
`A = A_sh[:n_in]`, `B = B_sh[:, :n_out]` and trains two vectors only,
`d ∈ R^r` (starts at `d_initial`) and `b ∈ R^n_out` (starts at 0):

    y = xK + bias + b ⊙ ((d ⊙ (dropout(x) A)) B),   ΔK = A diag(d) B diag(b).

The projections are model-level state (`VeRAProjections`): created once,
before the layers, from `projection_seed` with NumPy (`A_sh ~ U(±√(6/N_in))`,
`B_sh ~ U(±√(6/r))`, PEFT's Kaiming-uniform bounds, generated in PyTorch's
layouts `(r, N_in)` then `(N_out, r)`), so every backend gets the same
numbers. `.keras` files store them once; adapter files store them once
too, unless `save_projection=False`, in which case loading regenerates them
from the seed.
"""

import math

import keras
import numpy as np
from keras import ops

from keras_lowrank import options as opt
from keras_lowrank import registry
from keras_lowrank import shared
from keras_lowrank import peft_codec
from keras_lowrank.adapter import Adapter
from keras_lowrank.adapter import VariableSpec
from keras_lowrank.methods.lora import DROPOUT
from keras_lowrank.methods import reference

#: what users call (the rest is the method's machinery)
__all__ = ["projections"]


def projections(rank, n_in, n_out, seed):
    """The shared projections as NumPy float32 arrays, Keras layout:
    `A_sh (n_in, rank)`, `B_sh (rank, n_out)`."""
    rng = np.random.default_rng(seed)
    bound_a = math.sqrt(6.0 / n_in)
    bound_b = math.sqrt(6.0 / rank)
    a_t = rng.uniform(-bound_a, bound_a, size=(rank, n_in))  # PyTorch's vera_A
    b_t = rng.uniform(-bound_b, bound_b, size=(n_out, rank))  # PyTorch's vera_B
    return a_t.T.astype("float32"), b_t.T.astype("float32")


def reference_merged(adapter, w):
    """VeRA: `W + A diag(d) B diag(b)`, `A` and `B` sliced from the shared pair."""
    n_in, n_out = w.shape
    state = adapter.shared_state()
    a = reference.value(state, "vera_a")[:n_in]
    b = reference.value(state, "vera_b")[:, :n_out]
    d = reference.value(adapter, "vera_lambda_d")
    bv = reference.value(adapter, "vera_lambda_b")
    return w + (a * d[None, :]) @ b * bv[None, :]


@keras.saving.register_keras_serializable(package="keras_lowrank")
class VeRAProjections(shared.SharedState):
    """The frozen random projections every VeRA layer of a model shares."""

    method = "vera"
    #: frozen random projections: a hot-swapped file must have made the same ones
    hotswap_compares = True

    @classmethod
    def config_for(cls, layer_plans, where):
        ranks = {lp.options["rank"] for lp in layer_plans}
        seeds = {lp.options["projection_seed"] for lp in layer_plans}
        saves = {lp.options["save_projection"] for lp in layer_plans}
        for name, values in (("rank", ranks), ("projection_seed", seeds), ("save_projection", saves)):
            if len(values) > 1:
                raise ValueError(
                    f"{where}: VeRA layers share one pair of projections, so they "
                    f"need one {name}; received {sorted(values, key=str)}."
                )
        return {
            "rank": ranks.pop(),
            "n_in": max(lp.geometry.n_in for lp in layer_plans),
            "n_out": max(lp.geometry.n_out for lp in layer_plans),
            "seed": seeds.pop(),
            "save_projection": saves.pop(),
        }

    def check_fits(self, config, where):
        mine = self.state_config
        for key in ("rank", "seed", "save_projection"):
            if config[key] != mine[key]:
                raise ValueError(
                    f"{where}: the model's VeRA projections have {key}={mine[key]!r}; "
                    f"these layers ask for {config[key]!r}. VeRA layers of one model "
                    "share one pair of projections."
                )
        if config["n_in"] > mine["n_in"] or config["n_out"] > mine["n_out"]:
            raise ValueError(
                f"{where}: the model's VeRA projections are {mine['n_in']}x{mine['rank']} "
                f"and {mine['rank']}x{mine['n_out']}; these layers need "
                f"{config['n_in']} inputs and {config['n_out']} outputs. Add all VeRA "
                "layers in one enable_adapter call."
            )

    def build_state(self):
        c = self.state_config
        self.vera_a = self.add_weight(
            name="vera_a", shape=(c["n_in"], c["rank"]), initializer="zeros",
            trainable=False, dtype="float32",
        )
        self.vera_b = self.add_weight(
            name="vera_b", shape=(c["rank"], c["n_out"]), initializer="zeros",
            trainable=False, dtype="float32",
        )

    def initialize(self):
        c = self.state_config
        a, b = projections(c["rank"], c["n_in"], c["n_out"], c["seed"])
        self.vera_a.assign(a)
        self.vera_b.assign(b)

    def file_state(self):
        if not self.state_config.get("save_projection", True):
            return {}
        return {"vera_a": self.vera_a, "vera_b": self.vera_b}


# ----------------------------------------------------------------------
# PEFT's format
class VeRAFormat(peft_codec.Format):
    """PEFT's `VERA` adapter type: each module's `vera_lambda_b`,
    `vera_lambda_d`, and the model's shared `vera_A`, `vera_B` (saved with
    `save_projection=True`), read into `vera` (written as its LoRA form)."""

    peft_type = "VERA"
    splittable = False
    parts = ("vera_lambda_b", "vera_lambda_d")
    shared = ("vera_A", "vera_B")

    def method(self, config):
        return "vera"

    def check(self, config):
        if not config.get("save_projection", True):
            raise ValueError(
                "PEFT VeRA adapter saved with save_projection=False: its projections "
                "come from torch's generator at projection_prng_key, which keras-lowrank "
                "does not reproduce; re-save it with save_projection=True."
            )
        super().check(config)

    def options(self, config):
        return {"d_initial": peft_codec.config_value(config, "d_initial", 0.1, "number"),
                "dropout": peft_codec.dropout_value(config, "vera_dropout")}

    def check_parts(self, parts, module, config):
        for name in self.parts:
            if parts[name].ndim != 1:
                raise ValueError(f"PEFT adapter module {module!r}: {name} has shape "
                                 f"{parts[name].shape}; VeRA's scaling vectors are 1-D.")

    def rank(self, config, module, parts):
        return int(parts["vera_lambda_d"].shape[0])

    def alpha(self, config, module):
        return None

    def torch_shape(self, parts):
        return parts["vera_lambda_b"].shape[0], None

    def state(self, parts, p_in, p_out, module):
        peft_codec.identity(p_in, p_out, module, "VeRA's shared projections")
        return {"vera_lambda_d": parts["vera_lambda_d"], "vera_lambda_b": parts["vera_lambda_b"]}

    def check_shared(self, tensors, targets, ranks):
        n_in_max = max(t.geometry.n_in for t in targets)
        n_out_max = max(t.geometry.n_out for t in targets)
        a_t, b_t = tensors["vera_A"], tensors["vera_B"]
        for name, value in (("vera_A", a_t), ("vera_B", b_t)):
            if value.ndim != 2:
                raise ValueError(f"PEFT VeRA adapter: {name} has shape {value.shape}; "
                                 "a 2-D projection was expected.")
        ranks = sorted(set(ranks))
        if ranks != [a_t.shape[0]] or b_t.shape[1] != a_t.shape[0]:
            raise ValueError(
                f"PEFT VeRA adapter: the shared projections vera_A {a_t.shape} and vera_B "
                f"{b_t.shape} have rank {a_t.shape[0]}/{b_t.shape[1]}, the modules' "
                f"vera_lambda_d {ranks}: every rank must be the same."
            )
        if a_t.shape[1] != n_in_max or b_t.shape[0] != n_out_max:
            raise ValueError(
                f"PEFT VeRA adapter: projections {a_t.shape} and {b_t.shape} do not fit "
                f"the adapted layers (largest input {n_in_max}, output {n_out_max})."
            )

    def load_shared(self, model, tensors):
        projections = shared.get(model, "vera")
        projections.vera_a.assign(np.ascontiguousarray(tensors["vera_A"].T))
        projections.vera_b.assign(np.ascontiguousarray(tensors["vera_B"].T))


@registry.method(
    "VeRA: shared frozen random projections, trained scaling vectors d and b",
    trainable_count=lambda g, o: g.n_shared * (o["rank"] + g.n_out),
    reference=reference_merged,
    peft=VeRAFormat(),
)
@keras.saving.register_keras_serializable(package="keras_lowrank")
class VeRA(Adapter):
    """Vector-based random matrix adaptation (arXiv 2310.11454).

    Args:
        layer: the `Dense`/`EinsumDense` to adapt.
        rank: the rank `r` of the shared projections (PEFT's default 256).
        d_initial: the start value of `d`.
        projection_seed: seed of the shared projections (PEFT's
            `projection_prng_key`).
        save_projection: store the projections in adapter files (else they
            are regenerated from the seed when loading).
        dropout, train_bias, seed, activation, merged, enabled: see `Adapter`.

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, name="hidden"),
        ...                           keras.layers.Dense(16, name="hidden2"), keras.layers.Dense(4, name="out")])
        >>> s = keras_lowrank.enable_adapter(model, method="vera", rank=4)
        >>> [r["trainable"] for r in s.rows]  # r + n_out each
        [20, 20]
    """

    method = "vera"
    per_example = "factors"
    model_state = VeRAProjections
    export_forms = ("lora",)
    OPTIONS = (
        opt.Option("rank", 256, opt.positive_int, "rank r of the shared projections"),
        DROPOUT,
        opt.Option("d_initial", 0.1, opt.finite_float, "start value of the scaling vector d"),
        opt.Option("projection_seed", 0, opt.seed, "seed of the shared projections (NumPy)"),
        opt.Option("save_projection", True, opt.boolean, "store the projections in adapter files"),
    ) + Adapter.OPTIONS

    def standalone_state(self, geometry):
        return VeRAProjections({
            "rank": self.rank, "n_in": geometry.n_in, "n_out": geometry.n_out,
            "seed": self.projection_seed, "save_projection": self.save_projection,
        })

    def rank_warnings(self, geometry):
        return []  # r above the layer's size is VeRA's normal case

    def variable_specs(self, geometry):
        batch = geometry.batch_shape
        return [
            VariableSpec("vera_lambda_d", batch + (self.rank,), keras.initializers.Constant(self.d_initial)),
            VariableSpec("vera_lambda_b", batch + (geometry.n_out,), "zeros"),
        ]

    def _projections(self, dtype=None):
        state = self.shared_state()
        if state is None:
            raise ValueError(
                f"VeRA layer {self.name!r} has no projections: load it through its "
                "model (keras.saving.load_model or keras_lowrank.load_adapter)."
            )
        g = self.geometry
        a = state.vera_a[: g.n_in, :]
        b = state.vera_b[:, : g.n_out]
        if dtype is not None:
            return ops.cast(a, dtype), ops.cast(b, dtype)
        return self.read_value(a), self.read_value(b)

    def adapter_output(self, x, y, training):
        x = self.adapter_input(x, training)
        rows = self.geometry.inputs_to_rows(x)
        a, b = self._projections(rows.dtype)
        d = ops.cast(ops.expand_dims(self.vera_lambda_d, -2), rows.dtype)
        bv = ops.cast(ops.expand_dims(self.vera_lambda_b, -2), rows.dtype)
        return self.add_rows(x, y, ops.matmul(ops.matmul(rows, a) * d, b) * bv)

    def read_value(self, value):
        return ops.cast(value, "float32")

    def delta_matrix(self):
        a, b = self._projections()
        d = ops.expand_dims(self.read(self.vera_lambda_d), -2)
        bv = ops.expand_dims(self.read(self.vera_lambda_b), -2)
        return ops.matmul(a * d, b) * bv

    def as_lora_state(self):
        """The update as a plain rank-r LoRA (scale 1): `A' = A diag(d)`,
        `B' = B diag(b)`."""
        a, b = self._projections()
        d = ops.expand_dims(self.read(self.vera_lambda_d), -2)
        bv = ops.expand_dims(self.read(self.vera_lambda_b), -2)
        lora_a = ops.swapaxes(a * d, -1, -2)
        lora_b = b * bv
        return {"lora_a": lora_a, "lora_b": lora_b}, {
            "rank": self.rank, "alpha": float(self.rank), "rslora": False,
        }
