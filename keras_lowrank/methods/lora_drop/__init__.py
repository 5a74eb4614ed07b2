"""LoRA-drop's layers: LoRA with one pair tied across layers (arXiv 2402.07721).

LoRA-drop keeps its own LoRA pair `(A_i, B_i)` on the layers whose LoRA
output matters most and makes all the other layers of one kernel shape
share **one** pair `(A_sh, B_sh)`. The selection is
`keras_lowrank.lora_drop(model, sample_data, ...)`; this module is the
adapter it puts in place, which `enable_adapter(method="lora_drop")` also
gives directly:

- `tied=False`: the layer is a LoRA layer with its own `lora_a`, `lora_b`;
- `tied=True` (the default): the layer trains no variable of its own and
  reads the pair of its matrix shape (`"n_in x n_out"`, with a leading
  batch for per-head kernels) from the model-level state `LoRADropPairs`.

The shared pairs are variables of that state, held once by the model: they
appear once in `model.weights`, get one optimizer slot, are stored once in
`.keras` and adapter files, and every layer that reads them sees a change
made through any of them. Merging folds each layer's own scaling of the
pair it reads into its kernel, exactly.
"""

import keras
import numpy as np
from keras import ops

from keras_lowrank import options as opt
from keras_lowrank import registry
from keras_lowrank import shared
from keras_lowrank.adapter import MAX_VARIABLE_ELEMENTS
from keras_lowrank.methods.lora import LoRA
from keras_lowrank.methods.lora import lora_a_initializer


def group_key(geometry):
    """The name of the shared pair a layer of this geometry reads."""
    return geometry.matrix_text()


def reference_merged(adapter, w):
    """LoRA-drop: `W + s A B` with the layer's own pair or its shape's tied pair."""
    a_t, b = (np.asarray(ops.convert_to_numpy(v)).astype("float64") for v in adapter.pair())
    return w + adapter.scaling * np.swapaxes(a_t, -1, -2) @ b


@keras.saving.register_keras_serializable(package="keras_lowrank")
class LoRADropPairs(shared.SharedState):
    """The LoRA pairs that the `tied=True` LoRA-drop layers of a model
    read, one per kernel-matrix shape: `a_<shape>` (`(r, n_in)`, `Aᵀ` as in
    `LoRA`) and `b_<shape>` (`(r, n_out)`). Trainable, held once."""

    method = "lora_drop"

    def __init__(self, state_config=None, **kwargs):
        kwargs.setdefault("trainable", True)
        super().__init__(state_config, **kwargs)

    @classmethod
    def config_for(cls, layer_plans, where):
        groups = {}
        seeds = set()
        for lp in layer_plans:
            if not lp.options["tied"]:
                continue
            g, o = lp.geometry, lp.options
            key = group_key(g)
            want = {"batch": list(g.batch_shape), "n_in": g.n_in, "n_out": g.n_out,
                    "rank": o["rank"], "init": o["init"]}
            size = max(g.n_in, g.n_out) * o["rank"] * g.n_shared
            if size > MAX_VARIABLE_ELEMENTS:
                raise ValueError(
                    f"Layer {lp.path!r}: the tied lora_drop pair for its {key} kernel "
                    f"matrix would hold {size:,} elements per factor with "
                    f"rank={o['rank']} (the limit is {MAX_VARIABLE_ELEMENTS:,}); "
                    "nothing was allocated."
                )
            have = groups.setdefault(key, want)
            if have != want:
                raise ValueError(
                    f"{where}: LoRA-drop layer {lp.path!r} shares the {key} pair, "
                    f"which other layers use with rank={have['rank']}, "
                    f"init={have['init']!r}; it asks for rank={o['rank']}, "
                    f"init={o['init']!r}. Layers sharing a pair need one rank and init."
                )
            seeds.add(o["seed"])
        if not groups:
            return None  # every layer has its own pair: no model-level state
        return {"groups": groups, "seed": min(seeds, key=lambda s: (s is None, s))}

    def check_layers(self, layer_plans, where):
        groups = self.state_config.get("groups", {})
        for lp in layer_plans:
            if not lp.options["tied"]:
                continue
            key = group_key(lp.geometry)
            group = groups.get(key)
            if group is None or group["rank"] != lp.options["rank"]:
                raise ValueError(
                    f"{where}: LoRA-drop layer {lp.path!r} reads the shared {key} "
                    f"pair of rank {lp.options['rank']}, but the model's shared "
                    f"pairs are {sorted(groups)} "
                    f"(ranks {[g['rank'] for g in groups.values()]})."
                )

    def check_fits(self, config, where):
        if config != self.state_config:
            raise ValueError(
                f"{where}: the model already has LoRA-drop shared pairs "
                f"{sorted(self.state_config['groups'])}; these layers need "
                f"{sorted(config['groups'])}. Put every shared LoRA-drop layer "
                "in one enable_adapter call (keras_lowrank.lora_drop does), or "
                "merge the existing ones first."
            )

    def build_state(self):
        pairs = {}
        # a plain dict (Keras tracks each variable once, through add_weight)
        object.__setattr__(self, "pairs", pairs)
        for key, g in sorted(self.state_config["groups"].items()):
            batch, r = tuple(g["batch"]), g["rank"]
            a = self.add_weight(name=f"a_{key}", shape=batch + (r, g["n_in"]),
                                initializer="zeros", trainable=True, dtype="float32")
            b = self.add_weight(name=f"b_{key}", shape=batch + (r, g["n_out"]),
                                initializer="zeros", trainable=True, dtype="float32")
            pairs[key] = (a, b)

    def initialize(self):
        seed = self.state_config.get("seed")
        for i, (key, (a, _)) in enumerate(sorted(self.pairs.items())):
            g = self.state_config["groups"][key]
            init = lora_a_initializer(g["init"], g["n_in"], g["rank"],
                                      None if seed is None else seed + i)
            a.assign(init(tuple(a.shape), "float32"))

    def file_state(self):
        out = {}
        for key, (a, b) in self.pairs.items():
            out[f"a_{key}"] = a
            out[f"b_{key}"] = b
        return out


@registry.method(
    "LoRA-drop: LoRA on the important layers, one tied pair per kernel shape for the rest",
    trainable_count=lambda g, o: 0 if o["tied"] else registry.lowrank_count(g, o),
    reference=reference_merged,
)
@keras.saving.register_keras_serializable(package="keras_lowrank")
class LoRADrop(LoRA):
    """LoRA-drop's adapter (arXiv 2402.07721): a LoRA layer that either has its own
    pair (`tied=False`) or reads the pair its kernel shape shares with the
    model's other `tied=True` LoRA-drop layers.

    `keras_lowrank.lora_drop(model, sample_data, ...)` decides which layers
    keep their own pair; `enable_adapter(model, method="lora_drop")` makes
    every targeted layer share (`tied=False` on some targets, in a second
    call, gives them their own).

    Takes `LoRA`'s arguments (`layer`, `rank`, `alpha`, `rslora`, `init`, `dropout`, `train_bias`,
    `seed`, `activation`, `merged` and `enabled`; layers sharing one pair need one
    `rank` and `init`, while `alpha`, `rslora` and `dropout` stay per layer),
    and:

    Args:
        tied: read the model's tied pair for this kernel shape.

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8, name="a"),
        ...                           keras.layers.Dense(8, name="b"), keras.layers.Dense(4, name="out")])
        >>> s = keras_lowrank.enable_adapter(model, method="lora_drop", rank=2)
        >>> s.adapter_params  # one 8x8 pair for both layers: 2 * (8 + 8)
        32
        >>> model.get_layer("a").pair()[0] is model.get_layer("b").pair()[0]
        True
    """

    method = "lora_drop"
    model_state = LoRADropPairs
    OPTIONS = LoRA.OPTIONS + (
        opt.Option("tied", True, opt.boolean, "read the pair tied across the model's layers of this kernel shape"),
    )

    def standalone_state(self, geometry):
        if not self.tied:
            return None
        return LoRADropPairs({
            "groups": {group_key(geometry): {
                "batch": list(geometry.batch_shape), "n_in": geometry.n_in,
                "n_out": geometry.n_out, "rank": self.rank, "init": self.init}},
            "seed": self.seed,
        })

    def variable_specs(self, geometry):
        if self.tied:
            return []
        return super().variable_specs(geometry)

    def pair(self):
        """`(Aᵀ, B)` this layer reads: its own, or its shape's shared pair."""
        if not self.tied:
            return self.lora_a, self.lora_b
        state = self.shared_state()
        if state is None:
            raise ValueError(
                f"LoRA-drop layer {self.name!r} reads a shared pair but is not "
                "bound to its model's pairs: load it through its model "
                "(keras.saving.load_model or keras_lowrank.load_adapter)."
            )
        return state.pairs[group_key(self.geometry)]

    def linked_variables(self):
        return list(self.pair()) if self.tied else []

    def adapter_output(self, x, y, training):
        a_t, b = self.pair()
        x = self.adapter_input(x, training)
        return self.add_lowrank(x, y, a_t, b, self.scaling)

    def factor_a(self):
        return ops.swapaxes(self.read(self.pair()[0]), -1, -2)

    def delta_matrix(self):
        return self.scaling * ops.matmul(self.factor_a(), self.read(self.pair()[1]))

    def as_lora_state(self):
        a_t, b = self.pair()
        return {"lora_a": self.read(a_t), "lora_b": self.read(b)}, {
            "rank": self.rank, "alpha": self.alpha, "rslora": self.rslora,
        }
