"""LoRA: `y = x K + b + s (dropout(x) A) B` (arXiv 2106.09685)."""

import math

import keras
import numpy as np
from keras import ops

from keras_lowrank import options as opt
from keras_lowrank import peft_codec
from keras_lowrank import registry
from keras_lowrank import training
from keras_lowrank.adapter import Adapter
from keras_lowrank.adapter import VariableSpec
from keras_lowrank.methods import reference

INITS = ("kaiming", "gaussian", "orthogonal")

#: the options of every low-rank (A, B) method
RANK = opt.Option("rank", 8, opt.positive_int, "adapter rank r")
ALPHA = opt.Option(
    "alpha", None, opt.positive_float_or_none, "scaling numerator (None: the rank, scale 1)"
)
DROPOUT = opt.Option("dropout", 0.0, opt.rate, "dropout rate on the adapter's input")
RSLORA = opt.Option("rslora", False, opt.boolean, "scale by alpha/sqrt(r) instead of alpha/r")


def lora_a_initializer(init, n_in, rank, seed=None):
    """PEFT's inits of the down-projection (`U(±1/sqrt(n_in))` or
    `N(0, 1/r²)`)."""
    if init == "kaiming":
        bound = 1.0 / math.sqrt(n_in)
        return keras.initializers.RandomUniform(-bound, bound, seed=seed)
    return keras.initializers.RandomNormal(stddev=1.0 / rank, seed=seed)


def orthogonal_factors(x, draw_a, draw_b):
    """PEFT's `init_lora_weights="orthogonal"` from its three Gaussian draws:
    `x: (r, r)`, `draw_a: (n_in, r/2)`, `draw_b: (r/2, n_out)`. With
    `Q = qr(x).Q`, `A = draw_a Q[0::2] / 10` and `B = Q[1::2]ᵀ draw_b / 10`:
    both start nonzero, yet `A B = draw_a Q[0::2] Q[1::2]ᵀ draw_b / 100 = 0`
    (distinct rows of `Q` are orthogonal), so the layer starts unchanged (to
    round-off). Returns `(Aᵀ (r, n_in), B (r, n_out))`, float32 NumPy.

    Examples:

        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> a_t, b = orthogonal_factors(rng.normal(size=(4, 4)), rng.normal(size=(6, 2)),
        ...                             rng.normal(size=(2, 5)))
        >>> float(np.abs(a_t.T @ b).max()) < 1e-6, float(np.abs(b).max()) > 0
        (True, True)
    """
    q, _ = np.linalg.qr(np.asarray(x, "float64"))
    a = np.asarray(draw_a, "float64") @ q[0::2] / 10.0  # (n_in, r)
    b = q[1::2].T @ np.asarray(draw_b, "float64") / 10.0  # (r, n_out)
    return a.T.astype("float32"), b.astype("float32")


# ----------------------------------------------------------------------
#: PEFT's `init_lora_weights` values that change the base weights at init
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def check_init(config):
    """Refuse a PEFT LoRA-family config whose `init_lora_weights` changed
    the base weights, which its directory does not carry."""
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise ValueError(
            f"PEFT adapter init_lora_weights={init!r}: the adapter expects a base "
            "changed at init, which its directory does not hold; convert it to "
            "plain LoRA in PEFT first (path_initial_model_for_weight_conversion)."
        )


# PEFT's LoRA (and DoRA: `use_dora`)
class LoRAFormat(peft_codec.Format):
    """PEFT's `LORA` adapter type: `lora_A (r, n_in)`, `lora_B (n_out, r)`
    and, with `use_dora`, DoRA's `lora_magnitude_vector (n_out,)`. Read into
    `lora` or `dora`; written for LoRA and DoRA as they are and for every
    method with a plain-LoRA form (`as_lora_state`) as that LoRA."""

    peft_type = "LORA"
    parts = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "lora_magnitude_vector.weight",
             "lora_embedding_A", "lora_embedding_B")
    #: PEFT's names of an embedding's factors (`nn.Embedding`: `lora_embedding_A
    #: (r, vocabulary)`, `lora_embedding_B (dim, r)`, the layouts of
    #: `lora_A.weight` and `lora_B.weight` for its table)
    EMBEDDING_PARTS = {"lora_embedding_A": "lora_A.weight", "lora_embedding_B": "lora_B.weight"}
    writes = ("lora", "dora")
    writes_lora_forms = True

    def method(self, config):
        return "dora" if config.get("use_dora") else "lora"

    def check(self, config):
        check_init(config)
        super().check(config)

    def part_name(self, suffix):
        if suffix in self.EMBEDDING_PARTS:
            return self.EMBEDDING_PARTS[suffix]
        return "lora_magnitude_vector" if suffix == "lora_magnitude_vector.weight" else suffix

    def required(self, config):
        return {"lora_A.weight", "lora_B.weight"} | ({"lora_magnitude_vector"} if config.get("use_dora") else set())

    def options(self, config):
        peft_codec.config_value(config, "use_dora", False, "bool")
        return {"rslora": peft_codec.config_value(config, "use_rslora", False, "bool"),
                "dropout": peft_codec.dropout_value(config, "lora_dropout")}

    def check_parts(self, parts, module, config):
        if set(parts) != self.required(config):
            raise ValueError(
                f"PEFT adapter module {module!r}: expected {sorted(self.required(config))}, "
                f"found {sorted(parts)}."
            )
        a = peft_codec.matrix(parts, "lora_A.weight", module)
        b = peft_codec.matrix(parts, "lora_B.weight", module)
        peft_codec.same(module, ("lora_A.weight rows", a.shape[0]), ("lora_B.weight columns", b.shape[1]))
        m = parts.get("lora_magnitude_vector")
        if m is not None:
            peft_codec.same(module, ("lora_magnitude_vector size", m.size), ("lora_B.weight rows", b.shape[0]))

    def rank(self, config, module, parts):
        r = int(parts["lora_A.weight"].shape[0])
        expected = super().rank(config, module, parts)
        if expected != r:
            raise ValueError(f"PEFT adapter module {module!r}: rank {r} in the weights, "
                             f"{expected} in the config.")
        return r

    def alpha(self, config, module):
        return float(peft_codec.pattern_value(config.get("alpha_pattern"), module,
                                              peft_codec.alpha_value(config, "lora_alpha")))

    def torch_shape(self, parts):
        return parts["lora_B.weight"].shape[0], parts["lora_A.weight"].shape[1]

    def state(self, parts, p_in, p_out, module):
        a, b = parts["lora_A.weight"], parts["lora_B.weight"]
        out = {"lora_a": a[:, p_in], "lora_b": b.T[:, p_out]}
        m = parts.get("lora_magnitude_vector")
        if m is not None:
            out["magnitude"] = m.reshape(-1)[p_out]
        return out

    # -- writing ------------------------------------------------------
    def export_entry(self, adapter, where):
        if adapter.method in self.writes:
            state = {"lora_a": adapter.read(adapter.lora_a), "lora_b": adapter.read(adapter.lora_b)}
            if adapter.method == "dora":
                state["magnitude"] = adapter.read(adapter.magnitude)
            return {"kind": adapter.method, "state": state, "rank": adapter.rank,
                    "alpha": adapter.alpha, "rslora": adapter.rslora}
        state, lora = adapter.as_lora_state()
        return {"kind": "lora", "state": state, "rank": lora["rank"], "alpha": lora["alpha"],
                "rslora": lora["rslora"]}

    def check_entries(self, entries):
        kinds = {e["kind"] for _, e in entries}
        rslora = {e["rslora"] for _, e in entries}
        if len(kinds) > 1 or len(rslora) > 1:
            raise ValueError(
                "save_peft_adapter: a PEFT directory has one adapter type, one use_dora and "
                f"one use_rslora for every module; the model mixes {sorted(kinds)} adapters"
                f"{' with and without rslora' if len(rslora) > 1 else ''}."
            )

    def write_module(self, name, group, layouts, n_in, n_out, whole):
        tensors = {}
        if whole:
            (_, entry), (p_in, p_out) = group[0], layouts[0]
            rank = int(entry["rank"])
            lora_a = np.empty((rank, n_in), np.float32)
            lora_a[:, p_in] = peft_codec.f32(entry["state"]["lora_a"]).reshape(rank, n_in)
            lora_b = np.empty((n_out, rank), np.float32)
            lora_b[p_out, :] = peft_codec.f32(entry["state"]["lora_b"]).reshape(rank, n_out).T
            if entry["kind"] == "dora":
                mag = np.empty((n_out,), np.float32)
                mag[p_out] = peft_codec.f32(entry["state"]["magnitude"]).reshape(-1)
                tensors[f"{name}.lora_magnitude_vector"] = mag
            alpha = float(entry["alpha"])
        else:
            # A fused weight (GPT-2's c_attn) split over several layers: one
            # LoRA of the summed rank, block by block, each block's scale
            # folded into its B (the module's scale is then 1).
            if any(e["kind"] == "dora" for _, e in group):
                raise ValueError(
                    f"save_peft_adapter: module {name!r} is split over several Keras "
                    "layers, and a DoRA update cannot be joined into one."
                )
            rank = sum(int(e["rank"]) for _, e in group)
            lora_a = np.zeros((rank, n_in), np.float32)
            lora_b = np.zeros((n_out, rank), np.float32)
            k = 0
            for (_, e), (p_in, p_out) in zip(group, layouts):
                r = int(e["rank"])
                scale = e["alpha"] / (math.sqrt(r) if e["rslora"] else r)
                lora_a[k : k + r, p_in] = peft_codec.f32(e["state"]["lora_a"]).reshape(r, n_in)
                lora_b[p_out, k : k + r] = scale * peft_codec.f32(e["state"]["lora_b"]).reshape(r, -1).T
                k += r
            alpha = math.sqrt(rank) if group[0][1]["rslora"] else float(rank)
        tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(lora_a)
        tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(lora_b)
        return tensors, rank, alpha

    def config(self, entries, common, rank, alpha):
        first = entries[0][1]
        return {
            "peft_type": self.peft_type, **common, "lora_alpha": alpha,
            "use_rslora": bool(first["rslora"]),
            "use_dora": first["kind"] == "dora",
            "lora_dropout": 0.0,
            "bias": "none",
            "modules_to_save": None,
            "init_lora_weights": True,
        }


#: PEFT's LoRA type, for LoRA and DoRA
LORA_FORMAT = LoRAFormat()


@registry.export_form(registry.LORA_FORM)
def as_plain_lora(adapter):
    """`("lora", state, options)`: an adapter with a plain-LoRA form
    (`as_lora_state`) as the LoRA layer that computes the same update."""
    state, lora = adapter.as_lora_state()
    options = {
        "rank": lora["rank"],
        "alpha": lora["alpha"],
        "rslora": lora["rslora"],
        "init": getattr(adapter, "init", "kaiming") if adapter.method == "lora" else "kaiming",
        "dropout": getattr(adapter, "dropout", 0.0),
        "train_bias": adapter.train_bias,
        "seed": adapter.seed,
    }
    return "lora", state, options


@registry.method(
    "LoRA: y = xK + b + s(xA)B, s = alpha/r (rslora: alpha/sqrt(r))",
    reference=reference.lora,
    peft=LORA_FORMAT,
)
@keras.saving.register_keras_serializable(package="keras_lowrank")
class LoRA(Adapter):
    """Low-rank adaptation of a `Dense` or `EinsumDense` layer.

    `y = x K + b + s (dropout(x) A) B` with `A: (n_in, r)`, `B: (r, n_out)`
    in the matrix view of the kernel, `s = alpha / r` (or `alpha / sqrt(r)`
    with `rslora=True`). The variable `lora_a` holds `Aᵀ`, shape `(r, n_in)`
    (PEFT's `lora_A` layout, faster to train); `lora_b` holds `B`,
    shape `(r, n_out)`. `A` starts `U(±1/sqrt(n_in))` (PEFT's default,
    `init="kaiming"`) or `N(0, 1/r²)` (`init="gaussian"`), `B` starts at zero,
    so the layer starts as a no-op. `init="orthogonal"` (PEFT's, even ranks)
    starts both nonzero with `A B = 0` (to round-off; `orthogonal_factors`).

    Args:
        layer: the `Dense`/`EinsumDense` to adapt.
        rank: the rank `r`.
        alpha: scaling numerator (default `rank`).
        rslora: use `alpha / sqrt(rank)`.
        init: `"kaiming"`, `"gaussian"` or `"orthogonal"`.
        dropout: dropout rate on the adapter's input.
        train_bias: keep the wrapped layer's bias trainable.
        seed: seed of the random initializers and of dropout.
        activation: see `Adapter`.
        merged: see `Adapter`.
        enabled: see `Adapter`.

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> layer = keras_lowrank.layers.LoRA(keras.layers.Dense(6), rank=2)
        >>> tuple(layer(np.ones((3, 4), "float32")).shape)
        (3, 6)
    """

    method = "lora"
    export_forms = ("lora",)
    per_example = "factors"
    #: a hot-swap may pad a lower-rank file to this rank (`keras_lowrank.hotswap`)
    hotswap_pads_rank = True
    OPTIONS = (
        RANK,
        ALPHA,
        DROPOUT,
        RSLORA,
        opt.Option("init", "kaiming", opt.choice(*INITS),
                   "init of A: PEFT's kaiming-uniform or gaussian (B = 0), or orthogonal (A, B != 0, AB = 0)"),
    ) + Adapter.OPTIONS

    def validate_options(self):
        if self.alpha is None:
            self.alpha = float(self.rank)
        if getattr(self, "init", "kaiming") == "orthogonal" and self.rank % 2:
            raise ValueError(
                f"rank={self.rank} for {self.name!r}: init='orthogonal' needs an even rank "
                "(A and B take alternate rows of one orthogonal matrix)."
            )

    def initialize_from_base(self):
        if getattr(self, "init", "kaiming") != "orthogonal":
            return
        g, r = self.geometry, self.rank
        rng = np.random.default_rng(self.seed)
        a_t, b = [], []
        for _ in range(max(1, int(np.prod(g.batch_shape)))):
            pair = orthogonal_factors(rng.normal(size=(r, r)), rng.normal(size=(g.n_in, r // 2)),
                                      rng.normal(size=(r // 2, g.n_out)))
            a_t.append(pair[0])
            b.append(pair[1])
        shape = g.batch_shape
        self.lora_a.assign(np.reshape(np.stack(a_t), shape + (r, g.n_in)))
        self.lora_b.assign(np.reshape(np.stack(b), shape + (r, g.n_out)))

    @property
    def scaling(self):
        if self.rslora:
            return self.alpha / math.sqrt(self.rank)
        return self.alpha / self.rank

    def variable_specs(self, geometry):
        batch, n_in, n_out, r = geometry.batch_shape, geometry.n_in, geometry.n_out, self.rank
        a_init = lora_a_initializer(getattr(self, "init", "kaiming"), n_in, r, self.seed)
        return [
            VariableSpec("lora_a", batch + (r, n_in), a_init),
            VariableSpec("lora_b", batch + (r, n_out), "zeros"),
        ]

    def adapter_output(self, x, y, training):
        x = self.adapter_input(x, training)
        return self.add_lowrank(x, y, self.lora_a, self.lora_b, self.scaling)

    def pair(self):
        """`(Aᵀ, B)`: the variables this layer's update is made of."""
        return self.lora_a, self.lora_b

    def update_rows(self, x):
        """`s (x A) B` for the layer input `x`, in rows of the matrix view."""
        a_t, b = self.pair()
        return self.lowrank_rows(x, a_t, b, self.scaling)

    def factor_a(self):
        """`A` in the Keras layout `(n_in, r)`, float32."""
        return ops.swapaxes(self.read(self.lora_a), -1, -2)

    def delta_matrix(self):
        return self.scaling * ops.matmul(self.factor_a(), self.read(self.lora_b))

    def as_lora_state(self):
        """The adapter as a plain LoRA: `(state, {"rank", "alpha"})`."""
        return {"lora_a": self.read(self.lora_a), "lora_b": self.read(self.lora_b)}, {
            "rank": self.rank, "alpha": self.alpha, "rslora": self.rslora,
        }


@registry.method(
    "LoRA+: LoRA with B learning lr_ratio times faster (any optimizer)",
    reference=reference.lora,
)
@keras.saving.register_keras_serializable(package="keras_lowrank")
class LoRAPlus(LoRA):
    """LoRA+ (arXiv 2402.12354): LoRA whose `B` (and every trainable 1-D variable of
    the model, as PEFT groups them) learns at `lr_ratio` times the
    optimizer's learning rate.

    The layer is LoRA's; the ratio is a training part that
    `model.compile` puts in place by wrapping the optimizer
    (`keras_lowrank.training.AdapterOptimizer`), under any Keras optimizer
    and learning-rate schedule. Merges as LoRA; `save_adapter(...,
    as_lora=True)` and `save_peft_adapter` write it as a LoRA.

    Takes `LoRA`'s arguments (`layer`, `rank`, `alpha`, `rslora`, `init`, `dropout`, `train_bias`,
    `seed`, `activation`, `merged` and `enabled`), and:

    Args:
        lr_ratio: `η_B / η_A` (λ ≥ 1; the paper's default 16).

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, name="hidden"),
        ...                           keras.layers.Dense(4, name="out")])
        >>> _ = keras_lowrank.enable_adapter(model, method="loraplus", rank=2, lr_ratio=16.0)
        >>> model.compile(optimizer="adam", loss="mse")
        >>> type(model.optimizer).__name__
        'AdapterOptimizer'
    """

    method = "loraplus"
    training_parts = (training.LearningRateRatio("loraplus"),)
    OPTIONS = LoRA.OPTIONS + (
        opt.Option("lr_ratio", 16.0, opt.float_at_least(1.0), "learning rate of B (and 1-D variables) / that of A"),
    )
