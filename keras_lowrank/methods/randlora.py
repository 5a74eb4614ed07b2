"""RandLoRA: full-rank updates from shared random bases (Albert et al.,
ICLR 2025, arXiv 2502.00987; PEFT's `RANDLORA`).

Every RandLoRA layer of a model shares two frozen random bases: `A_sh:
(r, N_min)` and `B_sh: (N_max, M, r)`, `N_min`/`N_max` the smaller/larger of
the largest input and output sizes over the adapted layers' matrix views,
`M = ceil(N_min / r)` (PEFT's `randlora_A (r, 1, N_min)` and `randlora_B`).
A layer with `n = min(n_in, n_out)`, `m = max(n_in, n_out)` uses
`k = ceil(n / r)` bases: `A = A_sh[:, :n]` (one for all) and `B_k =
B_sh[:m, k, :]`, and trains two matrices of scalers, `λ: (r, k)` (zeros at
the start) and `γ: (k, n)` (`1 / max(k, n)`):

    Q = (λ[j, k] A[j, :] ⊙ γ[k, :]) flattened over (j, k), (r·k, n)
    P = B_sh[:m, :k, :] flattened over (k, j),                (m, k·r)
    ΔK = s P Q      (n_in > n_out),      ΔK = s (P Q)ᵀ      (n_in <= n_out),

`s = alpha / r`. The flattenings are PEFT's (the pairing of `P`'s columns
with `Q`'s rows follows them). `k·r >= n` random rank-`r` pieces: an update
of full rank `n` from `r·k + k·n` trained numbers per layer. The forward
never builds `ΔK`: `((x Qᵀ) Pᵀ)` or `((x P) Q)`, a rank-`k·r` product.

The bases are model-level state (`RandLoRABases`): made once, before the
layers, from `projection_seed` with NumPy (PEFT's draws: Kaiming-uniform,
then each basis divided by its standard deviation, so the bounds cancel:
uniform with unit standard deviation; `sparse`/`very_sparse` draw PEFT's
ternary `{-1, 0, 1}` bases, also divided by their standard deviation), so
every backend gets the same numbers. Torch's generator cannot be
reproduced: PEFT's own bases come with its directories (`save_projection`),
and are read from them. `.keras` files store the bases once; adapter files
once too, unless `save_projection=False` (then they are made again from
the seed).
"""

import math

import keras
import numpy as np
from keras import ops

from keras_lowrank import options as opt
from keras_lowrank import peft_codec
from keras_lowrank import registry
from keras_lowrank import shared
from keras_lowrank.adapter import Adapter
from keras_lowrank.adapter import VariableSpec
from keras_lowrank.methods import reference
from keras_lowrank.methods.lora import DROPOUT

#: what users call (the rest is the method's machinery)
__all__ = ["bases", "n_bases"]


def n_bases(n, rank):
    """`ceil(n / r)`: the bases a layer of smaller size `n` needs for a
    full-rank update (PEFT's `num_bases`).

    Examples:

        >>> n_bases(16, 4), n_bases(10, 4), n_bases(3, 8)
        (4, 3, 1)
    """
    return -(-n // rank)


def _unit_std(x):
    std = x.std(ddof=1) if x.size > 1 else 0.0
    return x / std if std > 0 else x


def bases(rank, n_in, n_out, seed, sparsity=None):
    """The shared bases as NumPy float32 arrays: `A_sh (rank, N_min)` and
    `B_sh (N_max, M, rank)`, `N_min, N_max = sorted((n_in, n_out))`, `M =
    n_bases(N_min, rank)`, for the largest sizes `n_in`, `n_out`.

    `sparsity=None`: uniform (PEFT's Kaiming-uniform draw), each of `B`'s
    `M` bases drawn in turn; `sparsity=s`: PEFT's ternary draw, `-1` and
    `1` each with probability `1/(2s)`. Both are then divided by their
    standard deviation (PEFT's normalization)."""
    rng = np.random.default_rng(seed)
    n_min, n_max = min(n_in, n_out), max(n_in, n_out)
    m = n_bases(n_min, rank)
    if sparsity is None:
        a = rng.uniform(-1.0, 1.0, size=(rank, n_min))
        b = np.stack([rng.uniform(-1.0, 1.0, size=(n_max, rank)) for _ in range(m)], axis=1)
    else:
        cut = 1.0 / (2.0 * sparsity)
        a_u, b_u = rng.uniform(size=(rank, n_min)), rng.uniform(size=(n_max, m, rank))
        a = np.where(a_u < cut, -1.0, np.where(a_u > 1.0 - cut, 1.0, 0.0))
        b = np.where(b_u < cut, -1.0, np.where(b_u > 1.0 - cut, 1.0, 0.0))
    return _unit_std(a).astype("float32"), _unit_std(b).astype("float32")


def reference_merged(adapter, w):
    """RandLoRA: `W + s P Q` (or its transpose when `n_in <= n_out`), `Q`'s
    row `j·k + i` = `λ[j, i] A[j] ⊙ γ[i]`, `P`'s column `i·r + j` = `B_i[:, j]`."""
    n_in, n_out = w.shape
    n, m = min(n_in, n_out), max(n_in, n_out)
    state = adapter.shared_state()
    lam, gam = reference.value(adapter, "randlora_lambda"), reference.value(adapter, "randlora_gamma")
    r, k = lam.shape
    a = reference.value(state, "randlora_a")[:, :n]
    b = reference.value(state, "randlora_b")[:m, :k, :]
    q = np.zeros((r * k, n))
    p = np.zeros((m, k * r))
    for j in range(r):
        for i in range(k):
            q[j * k + i] = lam[j, i] * a[j] * gam[i]
            p[:, i * r + j] = b[:, i, j]
    delta = p @ q
    return w + adapter.scaling * (delta if n_in > n_out else delta.T)


def _sparsity(sparse, very_sparse, n_min):
    """PEFT's choice: `very_sparse` (1/√N_min) over `sparse` (1/3)."""
    if very_sparse:
        return math.sqrt(n_min)
    return 3.0 if sparse else None


@keras.saving.register_keras_serializable(package="keras_lowrank")
class RandLoRABases(shared.SharedState):
    """The frozen random bases every RandLoRA layer of a model shares."""

    method = "randlora"
    #: frozen random bases: a hot-swapped file must have made the same ones
    hotswap_compares = True
    KEYS = ("rank", "seed", "sparse", "very_sparse", "save_projection")

    @classmethod
    def config_for(cls, layer_plans, where):
        values = {}
        for key, option in zip(cls.KEYS, ("rank", "projection_seed", "sparse", "very_sparse",
                                          "save_projection")):
            found = {lp.options[option] for lp in layer_plans}
            if len(found) > 1:
                raise ValueError(
                    f"{where}: RandLoRA layers share one pair of bases, so they need one "
                    f"{option}; received {sorted(found, key=str)}."
                )
            values[key] = found.pop()
        values["n_in"] = max(lp.geometry.n_in for lp in layer_plans)
        values["n_out"] = max(lp.geometry.n_out for lp in layer_plans)
        return values

    def check_fits(self, config, where):
        mine = self.state_config
        for key in self.KEYS:
            if config[key] != mine[key]:
                raise ValueError(
                    f"{where}: the model's RandLoRA bases have {key}={mine[key]!r}; these "
                    f"layers ask for {config[key]!r}. RandLoRA layers of one model share "
                    "one pair of bases."
                )
        n_min, n_max = self.sizes()
        if min(config["n_in"], config["n_out"]) > n_min or max(config["n_in"], config["n_out"]) > n_max:
            raise ValueError(
                f"{where}: the model's RandLoRA bases serve sizes up to {n_min} and {n_max}; "
                f"these layers need {config['n_in']} inputs and {config['n_out']} outputs. "
                "Add all RandLoRA layers in one enable_adapter call."
            )

    def sizes(self):
        """`(N_min, N_max)` of the bases."""
        c = self.state_config
        return min(c["n_in"], c["n_out"]), max(c["n_in"], c["n_out"])

    def build_state(self):
        c = self.state_config
        n_min, n_max = self.sizes()
        self.randlora_a = self.add_weight(
            name="randlora_a", shape=(c["rank"], n_min), initializer="zeros",
            trainable=False, dtype="float32",
        )
        self.randlora_b = self.add_weight(
            name="randlora_b", shape=(n_max, n_bases(n_min, c["rank"]), c["rank"]),
            initializer="zeros", trainable=False, dtype="float32",
        )

    def initialize(self):
        c = self.state_config
        n_min, _ = self.sizes()
        a, b = bases(c["rank"], c["n_in"], c["n_out"], c["seed"],
                     _sparsity(c["sparse"], c["very_sparse"], n_min))
        self.randlora_a.assign(a)
        self.randlora_b.assign(b)

    def file_state(self):
        if not self.state_config.get("save_projection", True):
            return {}
        return {"randlora_a": self.randlora_a, "randlora_b": self.randlora_b}


# ----------------------------------------------------------------------
# PEFT's format
_OPTIONS = ("rank", "alpha", "dropout", "projection_seed", "sparse", "very_sparse")


class RandLoRAFormat(peft_codec.Format):
    """PEFT's `RANDLORA` adapter type: each module's `randlora_lambda (r,
    k)` and `randlora_gamma (k, n)`, and the model's shared `randlora_A (r,
    1, N_min)` and `randlora_B (N_max, M, r)` (saved with
    `save_projection=True`; PEFT also saves a copy under each module), read
    into `randlora` and written from it. PEFT's RandLoRA has one `r`,
    `randlora_alpha` and dropout for every module, and its bases serve
    weights in their own order (a weight KerasHub reorders or splits is
    refused)."""

    peft_type = "RANDLORA"
    parts = ("randlora_lambda", "randlora_gamma")
    shared = ("randlora_A", "randlora_B")
    splittable = False
    writes = ("randlora",)

    def method(self, config):
        return "randlora"

    def check(self, config):
        if not peft_codec.config_value(config, "save_projection", True, "bool"):
            raise ValueError(
                "PEFT RandLoRA adapter saved with save_projection=False: its bases come "
                "from torch's generator at projection_prng_key, which keras-lowrank does "
                "not reproduce; re-save it with save_projection=True."
            )
        super().check(config)

    def options(self, config):
        return {"projection_seed": peft_codec.config_value(config, "projection_prng_key", 0, "int"),
                "sparse": peft_codec.config_value(config, "sparse", False, "bool"),
                "very_sparse": peft_codec.config_value(config, "very_sparse", False, "bool"),
                "dropout": peft_codec.dropout_value(config, "randlora_dropout")}

    def check_parts(self, parts, module, config):
        lam, gam = parts["randlora_lambda"], parts["randlora_gamma"]
        for name, value in (("randlora_lambda", lam), ("randlora_gamma", gam)):
            if value.ndim != 2:
                raise ValueError(f"PEFT adapter module {module!r}: {name} has shape {value.shape}; "
                                 "RandLoRA's scalers are 2-D.")
        peft_codec.same(module, ("randlora_lambda bases", lam.shape[1]), ("randlora_gamma bases", gam.shape[0]))

    def rank(self, config, module, parts):
        r = int(parts["randlora_lambda"].shape[0])
        expected = int(peft_codec.config_value(config, "r", 32, "int", low=1))
        if expected != r:
            raise ValueError(f"PEFT adapter module {module!r}: rank {r} in the weights, "
                             f"{expected} in the config.")
        return r

    def alpha(self, config, module):
        return float(peft_codec.config_value(config, "randlora_alpha", 640, "number", low=0, low_open=True))

    def torch_shape(self, parts):
        return None, None

    def state(self, parts, p_in, p_out, module):
        peft_codec.identity(p_in, p_out, module, "RandLoRA's shared bases")
        return {"randlora_lambda": parts["randlora_lambda"], "randlora_gamma": parts["randlora_gamma"]}

    def check_shared(self, tensors, targets, ranks):
        a, b = tensors["randlora_A"], tensors["randlora_B"]
        n_in = max(t.geometry.n_in for t in targets)
        n_out = max(t.geometry.n_out for t in targets)
        n_min, n_max = min(n_in, n_out), max(n_in, n_out)
        ranks = sorted(set(ranks))
        r = ranks[0]
        want_a, want_b = (r, 1, n_min), (n_max, n_bases(n_min, r), r)
        if len(ranks) > 1 or tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise ValueError(
                f"PEFT RandLoRA adapter: the shared bases randlora_A {tuple(a.shape)} and "
                f"randlora_B {tuple(b.shape)} do not fit the adapted layers (rank {ranks}, "
                f"largest sizes {n_min} and {n_max}: {want_a} and {want_b} expected)."
            )

    def load_shared(self, model, tensors):
        state = shared.get(model, "randlora")
        state.randlora_a.assign(np.ascontiguousarray(np.asarray(tensors["randlora_A"], np.float32)[:, 0, :]))
        state.randlora_b.assign(np.ascontiguousarray(np.asarray(tensors["randlora_B"], np.float32)))

    # -- writing ------------------------------------------------------
    def export_entry(self, adapter, where):
        state = {name: adapter.read(var) for name, var in adapter.adapter_variables().items()}
        bases_ = adapter.shared_state()
        state["randlora_a"] = adapter.read(bases_.randlora_a)
        state["randlora_b"] = adapter.read(bases_.randlora_b)
        options = {k: getattr(adapter, k) for k in _OPTIONS}
        return {"kind": "randlora", "state": state, "rank": adapter.rank, "alpha": adapter.alpha,
                "rslora": False, "options": options, "where": where}

    def check_entries(self, entries):
        first = entries[0][1]["options"]
        for _, e in entries:
            if e["options"] != first:
                raise ValueError(
                    "save_peft_adapter: PEFT's RandLoRA has one r, randlora_alpha, dropout, "
                    f"projection_prng_key and sparsity for every module; layer {e['where']!r} "
                    f"has {e['options']}, another {first}."
                )

    def write_module(self, name, group, layouts, n_in, n_out, whole):
        if not whole:
            raise ValueError(f"save_peft_adapter: module {name!r} is split over several "
                             "Keras layers, and a RandLoRA update cannot be split.")
        peft_codec.identity(*layouts[0], name, "RandLoRA's shared bases")
        entry = group[0][1]
        state = entry["state"]
        a = peft_codec.f32(state["randlora_a"])[:, None, :]
        b = peft_codec.f32(state["randlora_b"])
        tensors = {f"{name}.randlora_lambda": peft_codec.f32(state["randlora_lambda"]),
                   f"{name}.randlora_gamma": peft_codec.f32(state["randlora_gamma"]),
                   # PEFT saves the bases under each module and once for the model
                   f"{name}.randlora_A": a, f"{name}.randlora_B": b,
                   "base_model.randlora_A": a, "base_model.randlora_B": b}
        return tensors, int(entry["rank"]), float(entry["alpha"])

    def config(self, entries, common, rank, alpha):
        first = entries[0][1]["options"]
        common = {k: v for k, v in common.items() if k not in ("rank_pattern", "alpha_pattern")}
        return {
            "peft_type": self.peft_type, **common,
            "randlora_alpha": alpha,
            "randlora_dropout": float(first["dropout"]),
            "projection_prng_key": first["projection_seed"],
            "save_projection": True,
            "sparse": first["sparse"],
            "very_sparse": first["very_sparse"],
            "bias": "none",
            "modules_to_save": None,
            "init_weights": True,
        }


def _count(g, o):
    n = min(g.n_in, g.n_out)
    k = n_bases(n, o["rank"])
    return g.n_shared * (o["rank"] * k + k * n)


@registry.method(
    "RandLoRA: full-rank update from shared frozen random bases, trained diagonal scalers",
    trainable_count=_count,
    reference=reference_merged,
    peft=RandLoRAFormat(),
    paper="https://arxiv.org/abs/2502.00987",
)
@keras.saving.register_keras_serializable(package="keras_lowrank")
class RandLoRA(Adapter):
    """Full-rank updates from shared random bases (arXiv 2502.00987; PEFT's
    RandLoRA).

    `ΔK = s P Q` (or `s (P Q)ᵀ` when `n_in <= n_out`): `P` the layer's
    `k = ceil(n / r)` frozen rank-`r` bases `B_i` side by side, `Q` the
    shared `A` scaled per basis by the trained `λ[:, i]` (rows) and `γ[i]`
    (columns), `n = min(n_in, n_out)`, `s = alpha / r`. See the module
    docstring for the exact layout (PEFT's).

    Args:
        layer: the `Dense`/`EinsumDense` to adapt.
        rank: the rank `r` of each random basis (PEFT's `r`, default 32).
        alpha: scaling numerator, `s = alpha / r` (default `20 r`, PEFT's
            ratio: its `randlora_alpha=640` at `r=32`).
        projection_seed: seed of the shared bases (PEFT's
            `projection_prng_key`).
        sparse: ternary bases, `±1` each with probability 1/6 (PEFT's
            `sparse`).
        very_sparse: ternary bases, `±1` each with probability
            `1/(2√N_min)` (PEFT's `very_sparse`; over `sparse`).
        save_projection: store the bases in adapter files (else they are
            made again from the seed when loading).
        dropout, train_bias, seed, activation, merged, enabled: see `Adapter`.

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, name="hidden"),
        ...                           keras.layers.Dense(16, name="hidden2"), keras.layers.Dense(4, name="out")])
        >>> s = keras_lowrank.enable_adapter(model, method="randlora", rank=4)
        >>> [r["trainable"] for r in s.rows]  # r·k + k·n, k = n/r bases
        [24, 80]
        >>> layer = model.get_layer("hidden2")
        >>> rng = np.random.default_rng(0)
        >>> _ = layer.randlora_lambda.assign(rng.normal(size=(4, 4)))
        >>> _ = layer.randlora_gamma.assign(rng.normal(size=(4, 16)))
        >>> d = np.asarray(keras.ops.convert_to_numpy(layer.delta_matrix()))
        >>> int(np.linalg.matrix_rank(d)) > 4  # more than the bases' rank 4
        True
    """

    method = "randlora"
    model_state = RandLoRABases
    export_forms = ("lora",)
    OPTIONS = (
        opt.Option("rank", 32, opt.positive_int, "rank r of each shared random basis (PEFT's r)"),
        opt.Option("alpha", None, opt.positive_float_or_none,
                   "scaling numerator, s = alpha/rank (None: 20·rank, PEFT's randlora_alpha=640 at r=32)"),
        DROPOUT,
        opt.Option("projection_seed", 0, opt.seed, "seed of the shared bases (NumPy)"),
        opt.Option("sparse", False, opt.boolean, "ternary bases, ±1 each with probability 1/6"),
        opt.Option("very_sparse", False, opt.boolean,
                   "ternary bases, ±1 each with probability 1/(2·sqrt(N_min))"),
        opt.Option("save_projection", True, opt.boolean, "store the bases in adapter files"),
    ) + Adapter.OPTIONS

    def validate_options(self):
        if self.alpha is None:
            self.alpha = 20.0 * self.rank

    @property
    def scaling(self):
        return self.alpha / self.rank

    def standalone_state(self, geometry):
        return RandLoRABases({
            "rank": self.rank, "n_in": geometry.n_in, "n_out": geometry.n_out,
            "seed": self.projection_seed, "sparse": self.sparse, "very_sparse": self.very_sparse,
            "save_projection": self.save_projection,
        })

    def rank_warnings(self, geometry):
        return []  # r above the layer's size gives one basis (PEFT allows it too)

    def variable_specs(self, geometry):
        batch, n = geometry.batch_shape, min(geometry.n_in, geometry.n_out)
        k = n_bases(n, self.rank)
        return [
            VariableSpec("randlora_lambda", batch + (self.rank, k), "zeros"),
            VariableSpec("randlora_gamma", batch + (k, n), keras.initializers.Constant(1.0 / max(k, n))),
        ]

    # ------------------------------------------------------------------
    def _bases(self, dtype):
        """`A: (r, n)` and `P: (m, k·r)` for this layer, in `dtype`."""
        state = self.shared_state()
        if state is None:
            raise ValueError(
                f"RandLoRA layer {self.name!r} has no bases: load it through its model "
                "(keras.saving.load_model or keras_lowrank.load_adapter)."
            )
        g = self.geometry
        n, m = min(g.n_in, g.n_out), max(g.n_in, g.n_out)
        k = n_bases(n, self.rank)
        a = ops.cast(state.randlora_a[:, :n], dtype)
        p = ops.reshape(ops.cast(state.randlora_b[:m, :k, :], dtype), (m, k * self.rank))
        return a, p

    def _q(self, a, lam, gam):
        """`Q: batch + (r·k, n)`, row `j·k + i` = `λ[j, i] A[j] ⊙ γ[i]`."""
        q = ops.expand_dims(lam, -1) * ops.expand_dims(a, -2) * ops.expand_dims(gam, -3)
        return ops.reshape(q, self.geometry.batch_shape + (-1, a.shape[-1]))

    def adapter_output(self, x, y, training):
        x = self.adapter_input(x, training)
        rows = self.geometry.inputs_to_rows(x)
        dtype = rows.dtype
        a, p = self._bases(dtype)
        q = self._q(a, ops.cast(self.randlora_lambda, dtype), ops.cast(self.randlora_gamma, dtype))
        g = self.geometry
        if g.n_in > g.n_out:  # ΔK = s P Q
            h = ops.matmul(rows, p) * ops.cast(self.scaling, dtype)
            out = ops.matmul(h, q)
        else:  # ΔK = s Qᵀ Pᵀ
            h = ops.matmul(rows, ops.swapaxes(q, -1, -2)) * ops.cast(self.scaling, dtype)
            out = ops.matmul(h, ops.transpose(p))
        return self.add_rows(x, y, out)

    def _factors(self):
        """`(L, R)` with `ΔK = L R` (float32): `(s P, Q)` or `(s Qᵀ, Pᵀ)`."""
        a, p = self._bases("float32")
        q = self._q(a, self.read(self.randlora_lambda), self.read(self.randlora_gamma))
        if self.geometry.n_in > self.geometry.n_out:
            return p * self.scaling, q
        return ops.swapaxes(q, -1, -2) * self.scaling, ops.transpose(p)

    def delta_matrix(self):
        left, right = self._factors()
        return ops.matmul(left, right)

    def as_lora_state(self):
        """The update as a plain LoRA of rank `k·r` (scale 1), the scale
        folded into `A`."""
        left, right = self._factors()
        batch = self.geometry.batch_shape
        right = ops.broadcast_to(right, batch + tuple(right.shape[-2:]))
        left = ops.broadcast_to(left, batch + tuple(left.shape[-2:]))
        rank = int(right.shape[-2])
        return {"lora_a": ops.swapaxes(left, -1, -2), "lora_b": right}, {
            "rank": rank, "alpha": float(rank), "rslora": False,
        }
