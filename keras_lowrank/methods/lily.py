"""Lily: low-rank interconnected adaptation across layers (Zhong et al.,
arXiv 2407.09946; PEFT's `LilyConfig`).

Lily ties its low-rank projectors across the layers of a model. The
adapted layers are grouped as PEFT groups them: layers of one kind (the
same path once the layer numbers are left out, e.g. every
`transformer_layer_#/self_attention/query`) and one kernel-matrix shape
form a group, taken in the model's order (layer 0, 1, 2, ...). Within a
group:

- every `stride_a` consecutive layers share one "low-dimension" projector
  `A: (n_in, r)` (PEFT's `lily_A`);
- all the layers share `num_b` "high-dimension" projectors
  `B_e: (r, n_out)`, `e = 1..num_b` (PEFT's `lily_B`, one tensor of
  `num_b · r` rows);
- each layer has its own router `R: (r, num_b)` (PEFT's `lily_router`).

For the rows `x` of one batch (every token of every sequence, in the
matrix view of the kernel), with `h = x A`:

    p = mean over the rows of softmax(h R),     ΔK = s · A (Σ_e p_e B_e),
    y = x K + bias + s · h (Σ_e p_e B_e),

`s` the `scaling` (a plain multiplier, no `alpha / r`). The mixture `p` of
the projectors is one vector per batch, so the update is one matrix for
the batch, but another on another batch. The layer keeps the mixture of
the last batch it computed outside training (`lily_mix`, uniform until
then): `delta_matrix`, `merge` and the `kernel` property use it, so a merge
right after a pass over a batch leaves that batch's output as it was (PEFT
refuses to merge Lily; call the model on the data you will serve before
merging).

The shared projectors are model-level state (`LilyProjectors`): variables
held once by the model (once in `model.weights`, one optimizer slot, once
in `.keras` and adapter files), read by every layer of the group, so they
stay tied through every save and load.

PEFT's init: `A` and `R` Kaiming-uniform (`U(±1/sqrt(n_in))`,
`U(±1/sqrt(r))`), `B = 0` (`init_weights=False`: `B` Kaiming-uniform over
`n_out`, not a no-op). PEFT directories with `LilyConfig` are read and
written (`keras_lowrank.save_peft_adapter`/`load_peft_adapter`).
"""

import math
import re

import keras
import numpy as np
from keras import ops

from keras_lowrank import options as opt
from keras_lowrank import peft_codec
from keras_lowrank import registry
from keras_lowrank import shared
from keras_lowrank.adapter import MAX_VARIABLE_ELEMENTS
from keras_lowrank.adapter import Adapter
from keras_lowrank.adapter import VariableSpec
from keras_lowrank.methods import reference

#: what users call (the rest is the method's machinery)
__all__ = ["groups"]


def _natural(text):
    """Sort key: digit runs compare as numbers (layer 10 after layer 9)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def kind_of(path):
    """The layer kind a path belongs to: the path without its numbers.

    Examples:

        >>> kind_of("transformer_layer_11/self_attention/query")
        'transformer_layer_#/self_attention/query'
    """
    return re.sub(r"\d+", "#", path)


def groups(paths, shapes, stride_a):
    """PEFT's sharing, for layers at `paths` with kernel-matrix `shapes`:
    `{path: (a_key, b_key)}`. Layers of one kind and shape form a group (in
    natural order); every `stride_a` consecutive ones share an `A`
    (`"<group>_<block>"`), all share the `B`s (`"<group>"`).

    Examples:

        >>> paths = ["l0/q", "l1/q", "l2/q", "l0/v", "l1/v", "l2/v"]
        >>> g = groups(paths, [(8, 8)] * 6, stride_a=2)
        >>> [g[p] for p in ("l0/q", "l1/q", "l2/q", "l0/v")]
        [('0_0', '0'), ('0_0', '0'), ('0_1', '0'), ('1_0', '1')]
    """
    by_group = {}
    for path, shape in zip(paths, shapes):
        by_group.setdefault((kind_of(path), tuple(shape)), []).append(path)
    out = {}
    for gi, key in enumerate(sorted(by_group, key=lambda k: (_natural(k[0]), k[1]))):
        for i, path in enumerate(sorted(by_group[key], key=_natural)):
            out[path] = (f"{gi}_{i // stride_a}", str(gi))
    return out


def reference_merged(adapter, w):
    """Lily: `W + s A (Σ_e p_e B_e)`, `p` the layer's recorded mixture."""
    a, b = (np.asarray(ops.convert_to_numpy(v)).astype("float64") for v in adapter.projectors())
    p = reference.value(adapter, "lily_mix")
    combined = np.einsum("...e,...ero->...ro", p, b)
    return w + adapter.scaling * a @ combined


def _kaiming(fan_in, seed):
    """PyTorch's `kaiming_uniform_(a=sqrt(5))`: `U(±1/sqrt(fan_in))`."""
    bound = 1.0 / math.sqrt(fan_in)
    return keras.initializers.RandomUniform(-bound, bound, seed=seed)


def _offset(seed, k):
    return None if seed is None else seed + 7919 * k


def _group_name(v):
    if v is None or (isinstance(v, str) and re.fullmatch(r"[0-9]+(_[0-9]+)?", v)):
        return v
    raise ValueError


GROUP = opt.Check("None or a group key such as '0_1'", _group_name)


@keras.saving.register_keras_serializable(package="keras_lowrank")
class LilyProjectors(shared.SharedState):
    """The projectors the Lily layers of a model share: `lily_a_<g>_<k>`
    (`(n_in, r)`, block `k` of group `g`) and `lily_b_<g>` (`(num_b, r,
    n_out)`), with leading batch axes for batched kernels. Trainable, held
    once by the model."""

    method = "lily"

    def __init__(self, state_config=None, **kwargs):
        kwargs.setdefault("trainable", True)
        super().__init__(state_config, **kwargs)

    @classmethod
    def config_for(cls, layer_plans, where):
        stride = {lp.options["stride_a"] for lp in layer_plans}
        if len(stride) > 1:
            raise ValueError(f"{where}: Lily layers of one model share projectors in blocks of "
                             f"one stride_a; received {sorted(stride)}.")
        keys = groups([lp.path for lp in layer_plans],
                      [tuple(lp.geometry.batch_shape) + (lp.geometry.n_in, lp.geometry.n_out)
                       for lp in layer_plans], stride.pop())
        a_groups, b_groups, seeds = {}, {}, set()
        for lp in layer_plans:
            g, o = lp.geometry, lp.options
            a_key, b_key = keys[lp.path]
            batch = list(g.batch_shape)
            size = max(g.n_in, o["num_b"] * g.n_out) * o["rank"] * g.n_shared
            if size > MAX_VARIABLE_ELEMENTS:
                raise ValueError(
                    f"Layer {lp.path!r}: Lily's shared projectors for its {g.matrix_text()} "
                    f"kernel would hold {size:,} elements with rank={o['rank']}, "
                    f"num_b={o['num_b']} (the limit is {MAX_VARIABLE_ELEMENTS:,}); nothing was allocated."
                )
            for table, key, want in (
                (a_groups, a_key, {"batch": batch, "n_in": g.n_in, "rank": o["rank"]}),
                (b_groups, b_key, {"batch": batch, "n_out": g.n_out, "rank": o["rank"],
                                   "num_b": o["num_b"], "init_weights": o["init_weights"]}),
            ):
                have = table.setdefault(key, want)
                if have != want:
                    raise ValueError(
                        f"{where}: Lily layer {lp.path!r} shares its projectors with other "
                        f"layers of its kind, which use {have}; it asks for {want}. Layers "
                        "sharing projectors need one rank, num_b and init_weights."
                    )
            lp.options["a_group"], lp.options["b_group"] = a_key, b_key
            lp.adapter.a_group, lp.adapter.b_group = a_key, b_key
            seeds.add(o["seed"])
        return {"a": a_groups, "b": b_groups, "seed": min(seeds, key=lambda s: (s is None, s))}

    def check_layers(self, layer_plans, where):
        for lp in layer_plans:
            a_key, b_key = lp.adapter.a_group, lp.adapter.b_group
            a, b = self.state_config["a"].get(a_key), self.state_config["b"].get(b_key)
            g, r = lp.geometry, lp.options["rank"]
            batch = list(g.batch_shape)
            if (a is None or b is None or a["n_in"] != g.n_in or b["n_out"] != g.n_out
                    or a["rank"] != r or b["rank"] != r or b["num_b"] != lp.options["num_b"]
                    or a["batch"] != batch or b["batch"] != batch):
                raise ValueError(
                    f"{where}: Lily layer {lp.path!r} ({g.matrix_text()}, rank={r}, "
                    f"num_b={lp.options['num_b']}) reads projectors {a_key!r}/{b_key!r}, "
                    f"which the model's Lily projectors {self.state_config} do not provide."
                )

    def check_fits(self, config, where):
        # the groups and their blocks are made from all the Lily layers at once
        raise ValueError(
            f"{where}: the model already has Lily projectors (groups "
            f"{sorted(self.state_config['b'])}); Lily layers share them across the "
            "model, so add every Lily layer in one enable_adapter call, or merge the "
            "existing ones first."
        )

    def build_state(self):
        a_vars, b_vars = {}, {}
        object.__setattr__(self, "a_vars", a_vars)
        object.__setattr__(self, "b_vars", b_vars)
        for key, c in sorted(self.state_config["a"].items()):
            a_vars[key] = self.add_weight(
                name=f"lily_a_{key}", shape=tuple(c["batch"]) + (c["n_in"], c["rank"]),
                initializer="zeros", trainable=True, dtype="float32")
        for key, c in sorted(self.state_config["b"].items()):
            b_vars[key] = self.add_weight(
                name=f"lily_b_{key}", shape=tuple(c["batch"]) + (c["num_b"], c["rank"], c["n_out"]),
                initializer="zeros", trainable=True, dtype="float32")

    def initialize(self):
        seed = self.state_config.get("seed")
        for i, (key, var) in enumerate(sorted(self.a_vars.items())):
            init = _kaiming(self.state_config["a"][key]["n_in"], _offset(seed, 2 + i))
            var.assign(init(tuple(var.shape), "float32"))
        for i, (key, var) in enumerate(sorted(self.b_vars.items())):
            c = self.state_config["b"][key]
            if not c["init_weights"]:
                init = _kaiming(c["n_out"], _offset(seed, 1000 + i))
                var.assign(init(tuple(var.shape), "float32"))

    def file_state(self):
        out = {f"lily_a_{k}": v for k, v in self.a_vars.items()}
        out.update({f"lily_b_{k}": v for k, v in self.b_vars.items()})
        return out


# ----------------------------------------------------------------------
# PEFT's format
def _suffix(module):
    return module.rsplit(".", 1)[-1]


def peft_groups(modules, shapes, config):
    """PEFT's own sharing of Lily modules (its `_post_injection_hook`): by
    the last `target_modules` name the module ends with (all together when
    `target_modules` is one regex) and the weight's shape, in the model's
    order; `{module: (A's first module, B's first module)}`."""
    targets = config.get("target_modules")
    stride = int(config.get("stride_A", 1))
    by_group = {}
    for module in sorted(modules, key=_natural):
        if isinstance(targets, str):
            key = targets
        else:
            key = None
            for suffix in targets or ():
                if module.endswith(suffix):
                    key = suffix
            key = key or module
        by_group.setdefault((key, tuple(shapes[module])), []).append(module)
    out = {}
    for members in by_group.values():
        for i, module in enumerate(members):
            out[module] = (members[(i // stride) * stride], members[0])
    return out


class LilyFormat(peft_codec.Format):
    """PEFT's `LILY` adapter type: each module's `lily_A.weight (r, n_in)`,
    `lily_B.weight (num_B·r, n_out)` and `lily_router.weight (num_B, r)`.
    PEFT ties `lily_A` and `lily_B` across modules and saves a copy under
    every module; reading checks that the copies agree with the sharing
    keras-lowrank makes (the same as PEFT's when `target_modules` lists
    module names), and writing repeats the shared projectors under each
    module, with `target_modules` the modules' last names so that PEFT ties
    them again."""

    peft_type = "LILY"
    parts = ("lily_A.weight", "lily_B.weight", "lily_router.weight")
    splittable = False
    writes = ("lily",)

    def method(self, config):
        return "lily"

    def options(self, config):
        return {
            "stride_a": peft_codec.config_value(config, "stride_A", 1, "int", low=1),
            "num_b": peft_codec.config_value(config, "num_B", 2, "int", low=1),
            "scaling": float(peft_codec.config_value(config, "scaling", 1.0, "number")),
            "init_weights": peft_codec.config_value(config, "init_weights", True, "bool"),
        }

    def check_parts(self, parts, module, config):
        a = peft_codec.matrix(parts, "lily_A.weight", module)
        b = peft_codec.matrix(parts, "lily_B.weight", module)
        router = peft_codec.matrix(parts, "lily_router.weight", module)
        num_b = self.options(config)["num_b"]
        peft_codec.same(module, ("lily_A rows (r)", a.shape[0]), ("lily_router columns", router.shape[1]))
        peft_codec.same(module, ("num_B", num_b), ("lily_router rows", router.shape[0]))
        peft_codec.same(module, ("lily_B rows", b.shape[0]), ("num_B * r", num_b * a.shape[0]))

    def rank(self, config, module, parts):
        r = int(parts["lily_A.weight"].shape[0])
        expected = int(config.get("r", 32))
        if expected != r:
            raise ValueError(f"PEFT adapter module {module!r}: rank {r} in the weights, "
                             f"{expected} in the config.")
        return r

    def alpha(self, config, module):
        return None

    def torch_shape(self, parts):
        return parts["lily_B.weight"].shape[1], parts["lily_A.weight"].shape[1]

    def state(self, parts, p_in, p_out, module):
        return {"lily_router": np.ascontiguousarray(parts["lily_router.weight"].T)}

    def module_state(self, parts, p_in, p_out, module):
        """The module's copies of the shared projectors, in our layout."""
        a, b, r = parts["lily_A.weight"], parts["lily_B.weight"], parts["lily_A.weight"].shape[0]
        b3 = b.reshape(-1, r, b.shape[1])
        return {"module": module, "a": np.ascontiguousarray(a.T[p_in]),
                "b": np.ascontiguousarray(b3[:, :, p_out])}

    def check_module_state(self, held, targets, config):
        """Refuse a file whose copies are not tied as keras-lowrank ties them."""
        opts = self.options(config)
        paths = list(held)
        shapes = {p: (targets[p].geometry.n_in, targets[p].geometry.n_out) for p in paths}
        ours = groups(paths, [shapes[p] for p in paths], opts["stride_a"])
        modules = {held[p]["module"]: p for p in paths}
        theirs = peft_groups(list(modules), {m: shapes[modules[m]] for m in modules}, config)
        for side, index in (("lily_A", 0), ("lily_B", 1)):
            mine = {}
            for p in paths:
                mine.setdefault(ours[p][index], set()).add(held[p]["module"])
            peft_sets = {}
            for m, key in theirs.items():
                peft_sets.setdefault(key[index], set()).add(m)
            if sorted(map(sorted, mine.values())) != sorted(map(sorted, peft_sets.values())):
                raise ValueError(
                    f"PEFT Lily adapter: PEFT shares {side} among the modules "
                    f"{sorted(map(sorted, peft_sets.values()))} (its target_modules "
                    f"{config.get('target_modules')!r}, stride_A={opts['stride_a']}), and "
                    f"keras-lowrank would share it among {sorted(map(sorted, mine.values()))} "
                    "(one kind of layer per group); list the modules by name in target_modules."
                )
            name = "a" if index == 0 else "b"
            for members in mine.values():
                first = None
                for m in sorted(members, key=_natural):
                    value = held[modules[m]][name]
                    if first is None:
                        first = (m, value)
                    elif value.shape != first[1].shape or not np.array_equal(value, first[1]):
                        raise ValueError(
                            f"PEFT Lily adapter: modules {first[0]!r} and {m!r} share "
                            f"{side} in PEFT, but the file holds different values for them."
                        )

    def load_module_state(self, model, adapters, held):
        """Put each group's projectors into the model's Lily state."""
        state = shared.get(model, "lily")
        for path, adapter in adapters.items():
            state.a_vars[adapter.a_group].assign(held[path]["a"].astype(np.float32))
            state.b_vars[adapter.b_group].assign(held[path]["b"].astype(np.float32))

    # -- writing ------------------------------------------------------
    def export_entry(self, adapter, where):
        a, b = adapter.projectors()
        state = {"a": adapter.read(a), "b": adapter.read(b), "router": adapter.read(adapter.lily_router)}
        options = {k: getattr(adapter, k) for k in ("rank", "stride_a", "num_b", "scaling", "init_weights")}
        return {"kind": "lily", "state": state, "rank": adapter.rank, "alpha": None, "rslora": False,
                "options": options, "where": where}

    def check_entries(self, entries):
        first = entries[0][1]["options"]
        for _, e in entries:
            if e["options"] != first:
                raise ValueError(
                    "save_peft_adapter: PEFT's Lily has one r, stride_A, num_B, scaling and "
                    f"init_weights for every module; layer {e['where']!r} has {e['options']}, "
                    f"another {first}."
                )

    def write_module(self, name, group, layouts, n_in, n_out, whole):
        if not whole:
            raise ValueError(f"save_peft_adapter: module {name!r} is split over several "
                             "Keras layers, and Lily's shared projectors cannot be split.")
        peft_codec.identity(*layouts[0], name, "Lily's shared projectors")
        entry = group[0][1]
        state, num_b = entry["state"], entry["options"]["num_b"]
        a = peft_codec.f32(state["a"])
        b = peft_codec.f32(state["b"])
        tensors = {
            f"{name}.lily_A.weight": np.ascontiguousarray(a.T),
            f"{name}.lily_B.weight": np.ascontiguousarray(b.reshape(num_b * b.shape[1], b.shape[2])),
            f"{name}.lily_router.weight": np.ascontiguousarray(peft_codec.f32(state["router"]).T),
        }
        return tensors, int(entry["rank"]), 1.0

    def config(self, entries, common, rank, alpha):
        first = entries[0][1]["options"]
        if common.get("fan_in_fan_out"):
            raise ValueError("save_peft_adapter: PEFT's Lily adapts torch Linear modules only; "
                             "these modules store their weight (n_in, n_out) (fan_in_fan_out).")
        common = {k: v for k, v in common.items()
                  if k not in ("rank_pattern", "alpha_pattern", "fan_in_fan_out")}
        common["target_modules"] = sorted({_suffix(m) for m in common["target_modules"]})
        return {
            "peft_type": self.peft_type, **common,
            "stride_A": first["stride_a"],
            "num_B": first["num_b"],
            "scaling": first["scaling"],
            "init_weights": first["init_weights"],
            "modules_to_save": None,
        }


LILY_FORMAT = LilyFormat()


@registry.method(
    "Lily: low-rank projectors shared across layers, a per-layer router mixing num_b shared up-projections",
    trainable_count=lambda g, o: g.n_shared * o["rank"] * o["num_b"],
    reference=reference_merged,
    peft=LILY_FORMAT,
    paper="https://arxiv.org/abs/2407.09946",
)
@keras.saving.register_keras_serializable(package="keras_lowrank")
class Lily(Adapter):
    """Low-rank interconnected adaptation across layers (arXiv 2407.09946;
    PEFT's Lily).

    The layer reads two projectors it shares with other layers of the
    model (`projectors()`: `A: (n_in, r)`, shared by `stride_a` consecutive
    layers of its kind, and `B: (num_b, r, n_out)`, shared by all of them)
    and owns a router `lily_router: (r, num_b)`. With `h = x A`, the batch's
    mixture `p = mean_rows softmax(h R)` and `s = scaling`, it adds
    `s · h (Σ_e p_e B_e)`. `lily_mix` (not trained) keeps the mixture of the
    last batch it computed outside training; merging uses it.

    Args:
        layer: the `Dense`/`EinsumDense` to adapt.
        rank: the rank `r` of the projectors (PEFT's `r`, default 32).
        stride_a: consecutive layers of one kind sharing an `A` (PEFT's
            `stride_A`).
        num_b: number of shared `B` projectors (PEFT's `num_B`).
        scaling: the multiplier `s` of the update (PEFT's `scaling`).
        init_weights: start with `B = 0` (a no-op; PEFT's default), else
            Kaiming-uniform.
        a_group, b_group: the projectors this layer reads (set by
            `enable_adapter`, which groups the layers).
        train_bias, seed, activation, merged, enabled: see `Adapter`.

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> inp = keras.Input((8,))
        >>> h = inp
        >>> for i in range(4):
        ...     h = keras.layers.Dense(8, name=f"block_{i}")(h)
        >>> model = keras.Model(inp, keras.layers.Dense(2, name="head")(h))
        >>> s = keras_lowrank.enable_adapter(model, method="lily", rank=2, stride_a=2, num_b=2,
        ...                                  targets=["block_*"])
        >>> a0, b0 = model.get_layer("block_0").projectors()
        >>> a1, b1 = model.get_layer("block_1").projectors()
        >>> a2, b2 = model.get_layer("block_2").projectors()
        >>> a0 is a1, a0 is a2, b0 is b2
        (True, False, True)
        >>> s.trainable_params  # 2 A (8x2), one B (2x2x8), 4 routers (2x2)
        80
    """

    method = "lily"
    #: its router mixes the projectors over the whole batch
    per_example = None
    model_state = LilyProjectors
    serves_kernel = False
    #: embedding tables are refused by name (`check_geometry`)
    refuses_embeddings = True
    OPTIONS = (
        opt.Option("rank", 32, opt.positive_int, "rank r of the projectors (PEFT's r)"),
        opt.Option("stride_a", 1, opt.positive_int,
                   "consecutive layers of one kind sharing a low-dimension projector A (PEFT's stride_A)"),
        opt.Option("num_b", 2, opt.positive_int,
                   "number of high-dimension projectors B shared by the layers of one kind (PEFT's num_B)"),
        opt.Option("scaling", 1.0, opt.finite_float, "multiplier of the update (PEFT's scaling)"),
        opt.Option("init_weights", True, opt.boolean, "start with B = 0 (a no-op), else Kaiming-uniform"),
        opt.Option("a_group", None, GROUP, "the shared A this layer reads (set by enable_adapter)"),
        opt.Option("b_group", None, GROUP, "the shared Bs this layer reads (set by enable_adapter)"),
    ) + Adapter.OPTIONS

    def check_geometry(self, geometry, where=None):
        if getattr(geometry, "discrete", False):
            raise ValueError(
                f"Layer {where or self.name!r} is an embedding table, which Lily does not "
                "adapt (PEFT's Lily adapts linear layers only): the mixture of its projectors "
                "is one per batch of rows, and a table read by token and reused as a tied "
                "output head has no such batch. Adapt the linear layers, or use another "
                "method on the embedding."
            )
        super().check_geometry(geometry, where)

    def standalone_state(self, geometry):
        self.a_group = self.a_group or "0_0"
        self.b_group = self.b_group or "0"
        batch = list(geometry.batch_shape)
        return LilyProjectors({
            "a": {self.a_group: {"batch": batch, "n_in": geometry.n_in, "rank": self.rank}},
            "b": {self.b_group: {"batch": batch, "n_out": geometry.n_out, "rank": self.rank,
                                 "num_b": self.num_b, "init_weights": self.init_weights}},
            "seed": self.seed,
        })

    def variable_specs(self, geometry):
        batch = geometry.batch_shape
        return [
            VariableSpec("lily_router", batch + (self.rank, self.num_b), _kaiming(self.rank, self.seed)),
            VariableSpec("lily_mix", batch + (self.num_b,),
                         keras.initializers.Constant(1.0 / self.num_b), trainable=False),
        ]

    def projectors(self):
        """`(A, B)`: the shared variables this layer reads, `A: batch +
        (n_in, r)` and `B: batch + (num_b, r, n_out)`."""
        state = self.shared_state()
        if state is None:
            raise ValueError(
                f"Lily layer {self.name!r} is not bound to its model's projectors: load it "
                "through its model (keras.saving.load_model or keras_lowrank.load_adapter)."
            )
        return state.a_vars[self.a_group], state.b_vars[self.b_group]

    def linked_variables(self):
        return list(self.projectors())

    def adapter_output(self, x, y, training):
        rows = self.geometry.inputs_to_rows(self.adapter_input(x, training))
        dtype = rows.dtype
        a, b = (ops.cast(v, dtype) for v in self.projectors())
        h = ops.matmul(rows, a)
        probs = ops.softmax(ops.matmul(h, ops.cast(self.lily_router, dtype)), axis=-1)
        mix = ops.mean(probs, axis=-2)
        combined = ops.einsum("...e,...ero->...ro", mix, b)
        if not training:
            self.lily_mix.assign(ops.cast(mix, self.lily_mix.dtype))
        out = ops.matmul(h, combined) * ops.cast(self.scaling, dtype)
        return self.add_rows(x, y, out)

    def delta_matrix(self):
        a, b = (self.read(v) for v in self.projectors())
        router = self.read(self.lily_router)
        combined = ops.einsum("...e,...ero->...ro", self.read(self.lily_mix), b)
        d = self.scaling * ops.matmul(a, combined)
        # a non-finite router is a non-finite adapter, though the recorded
        # mixture does not read it
        finite = ops.all(ops.isfinite(router))
        return ops.where(finite, d, ops.full_like(d, float("nan")))
