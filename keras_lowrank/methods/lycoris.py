"""The LyCORIS family: LoHa (arXiv 2108.06098) and LoKr (arXiv 2309.14859).

Both add a structured update to the frozen kernel's matrix view and train
PEFT's factors, stored in the Keras layout (an input-side factor `A` is kept
transposed, `(r, n_in)`, PEFT's `*_b` layout; an output-side factor `B` is
`(r, n_out)`, PEFT's `*_a` transposed).

- LoHa: `ΔK = s (A1ᵀ B1) ⊙ (A2ᵀ B2)`, `s = alpha / r`, rank(ΔK) ≤ r².
- LoKr: `ΔK = s kron(F1, F2)`, with `n_in = in_m · in_n`, `n_out = out_l ·
  out_k` chosen by `factorization`, and F2 (the large factor) low-rank
  `A2ᵀ B2` unless the rank is at least half its larger side (PEFT's rule).

Both take PEFT's training extras: `rank_dropout` drops whole output columns
of the update for a step (LoHa always rescales by the kept fraction; LoKr
when `rank_dropout_scale`), `module_dropout` skips the whole update for a
step. Neither needs anything outside the layer's own call, so both run
inside any compiled train step.
"""

import math

import keras
import numpy as np
from keras import ops

from keras_lowrank import options as opt
from keras_lowrank import registry
from keras_lowrank import peft_codec
from keras_lowrank.adapter import Adapter
from keras_lowrank.adapter import VariableSpec
from keras_lowrank.methods.lora import ALPHA
from keras_lowrank.methods.lora import RANK
from keras_lowrank.methods import reference

FORMS = ("auto", "factorized", "materialized")


def kaiming(fan_in, seed):
    """PyTorch's `kaiming_uniform_(a=sqrt(5))` (PEFT's default init):
    `U(±1/sqrt(fan_in))`."""
    bound = 1.0 / math.sqrt(fan_in)
    return keras.initializers.RandomUniform(-bound, bound, seed=seed)


def factorization(dimension, factor=-1):
    """Split `dimension` into `(m, n)`, `m <= n`, `m * n == dimension`
    (PEFT's LoKr rule, arXiv 2309.14859).

    With `factor > 0` dividing `dimension`, the pair is `factor` and its
    cofactor. Otherwise divisors are tried in increasing order, each
    accepted while the sum `m + n` does not grow and `m <= factor`
    (`factor=-1`: no bound), which ends near `sqrt(dimension)`.

    Examples:

        >>> [factorization(d) for d in (4096, 768, 128, 127)]
        [(64, 64), (24, 32), (8, 16), (1, 127)]
        >>> factorization(128, factor=4)
        (4, 32)
    """
    if not isinstance(dimension, int) or dimension < 1:
        raise ValueError(f"factorization needs a positive int; received {dimension!r}.")
    if factor > 0 and dimension % factor == 0:
        return tuple(sorted((factor, dimension // factor)))
    bound = dimension if factor <= 0 else factor
    m, n = 1, dimension
    while m < n:
        d = m + 1
        while dimension % d:
            d += 1
        if d + dimension // d > m + n or d > bound:
            break
        m, n = d, dimension // d
    return (m, n) if m <= n else (n, m)


def lokr_layout(n_in, n_out, rank, decompose_both=False, decompose_factor=-1, spatial=1):
    """LoKr's factor shapes for an `n_in x n_out` matrix (PEFT's rule). For a
    convolution (`spatial`: the kernel's volume, its rows `(in, k...)`),
    PEFT factors the input channels and keeps the spatial offsets in the
    second factor: `in_n` is then `channels_n * spatial`.

    Returns a dict: `in_m, in_n, out_l, out_k` and whether F1 and F2 are
    full matrices (`full_1`, `full_2`).

    Examples:

        >>> lokr_layout(768, 768, 8)["full_2"], lokr_layout(768, 768, 16)["full_2"]
        (False, True)
    """
    in_m, in_n = factorization(n_in // spatial, decompose_factor)
    out_l, out_k = factorization(n_out, decompose_factor)
    return {
        "in_m": in_m, "in_n": in_n * spatial, "out_l": out_l, "out_k": out_k,
        "full_1": not (decompose_both and rank < max(out_l, in_m) / 2),
        "full_2": not (rank < max(out_k, in_n) / 2),
    }


def _spatial(geometry):
    """The kernel volume of a convolution's matrix view (1 otherwise)."""
    return math.prod(getattr(geometry, "kernel_size", ()) or (1,))


def lokr_count(geometry, options):
    """Trainable parameters of one LoKr layer."""
    p = lokr_layout(geometry.n_in, geometry.n_out, options["rank"],
                    options["decompose_both"], options["decompose_factor"], _spatial(geometry))
    r = options["rank"]
    n1 = p["in_m"] * p["out_l"] if p["full_1"] else r * (p["in_m"] + p["out_l"])
    n2 = p["in_n"] * p["out_k"] if p["full_2"] else r * (p["in_n"] + p["out_k"])
    return geometry.n_shared * (n1 + n2)


def _factor(v):
    if isinstance(v, bool) or not isinstance(v, int) or (v != -1 and v < 1):
        raise ValueError
    return v


RANK_DROPOUT = opt.Option(
    "rank_dropout", 0.0, opt.rate, "training: drop whole output columns of the update with this rate"
)
MODULE_DROPOUT = opt.Option(
    "module_dropout", 0.0, opt.rate, "training: skip the whole update for a step with this rate"
)


def reference_loha(adapter, w):
    """LoHa: `W + s (P1 Q1) ⊙ (P2 Q2)`, `P = Aᵀ`."""
    p1, p2 = reference.factor_a(adapter, "loha_a1"), reference.factor_a(adapter, "loha_a2")
    q1, q2 = reference.value(adapter, "loha_b1"), reference.value(adapter, "loha_b2")
    return w + adapter.scaling * (p1 @ q1) * (p2 @ q2)


def reference_lokr(adapter, w):
    """LoKr: `W + s kron(F1, F2)`, each factor full or `Aᵀ B`."""

    def factor(i):
        if getattr(adapter, f"lokr_f{i}", None) is not None:
            return reference.value(adapter, f"lokr_f{i}")
        return reference.factor_a(adapter, f"lokr_a{i}") @ reference.value(adapter, f"lokr_b{i}")

    return w + adapter.scaling * np.kron(factor(1), factor(2))


class _LycorisAdapter(Adapter):
    """What LoHa and LoKr share: `alpha / r` scaling and the two dropouts."""

    def __init__(self, layer, **kwargs):
        super().__init__(layer, **kwargs)
        if self.rank_dropout > 0 or self.module_dropout > 0:
            self.seed_generator = keras.random.SeedGenerator(self.seed)

    def validate_options(self):
        if self.alpha is None:
            self.alpha = float(self.rank)

    @property
    def scaling(self):
        return self.alpha / self.rank

    def update_output(self, x, y, delta_rows, training):
        """`y + delta` for `delta_rows` (rows of the matrix view), with the
        training-time dropouts applied (rank dropout scales each output
        column by `keep / mean(keep)`; module dropout multiplies the whole
        update by 0 or 1)."""
        if training and self.rank_dropout > 0:
            shape = self.geometry.batch_shape + (self.geometry.n_out,)
            u = keras.random.uniform(shape, seed=self.seed_generator)
            keep = ops.cast(u > self.rank_dropout, "float32")
            if self.rescale_rank_dropout():
                # PEFT divides by the mean of the mask; all-dropped gives 0, not NaN
                keep = keep / ops.maximum(ops.mean(keep, axis=-1, keepdims=True), 1e-12)
            delta_rows = delta_rows * ops.cast(ops.expand_dims(keep, -2), delta_rows.dtype)
        if training and self.module_dropout > 0:
            u = keras.random.uniform((), seed=self.seed_generator)
            on = ops.cast(u > self.module_dropout, delta_rows.dtype)
            delta_rows = delta_rows * on
        return self.add_rows(x, y, delta_rows)

    def rescale_rank_dropout(self):
        return True

    def adapter_output(self, x, y, training):
        rows = self.geometry.inputs_to_rows(x)
        return self.update_output(x, y, self.delta_rows(rows), training)


# ----------------------------------------------------------------------
# PEFT's format
class LoHaFormat(peft_codec.Format):
    """PEFT's `LOHA` adapter type (`hada_w1_a`, `hada_w1_b`, `hada_w2_a`,
    `hada_w2_b`), read into `loha` (written as its exact LoRA form)."""

    peft_type = "LOHA"
    parts = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

    def method(self, config):
        return "loha"

    def options(self, config):
        return {"rank_dropout": peft_codec.dropout_value(config, "rank_dropout"),
                "module_dropout": peft_codec.dropout_value(config, "module_dropout")}

    def check_parts(self, parts, module, config):
        w = {k: peft_codec.matrix(parts, k, module) for k in self.parts}
        for i in (1, 2):
            peft_codec.same(module, (f"hada_w{i}_a columns", w[f"hada_w{i}_a"].shape[1]),
                  (f"hada_w{i}_b rows", w[f"hada_w{i}_b"].shape[0]))
        peft_codec.same(module, ("hada_w1_a rows", w["hada_w1_a"].shape[0]), ("hada_w2_a rows", w["hada_w2_a"].shape[0]))
        peft_codec.same(module, ("hada_w1_b columns", w["hada_w1_b"].shape[1]), ("hada_w2_b columns", w["hada_w2_b"].shape[1]))

    def torch_shape(self, parts):
        return parts["hada_w1_a"].shape[0], parts["hada_w1_b"].shape[1]

    def state(self, parts, p_in, p_out, module):
        return {"loha_a1": parts["hada_w1_b"][:, p_in], "loha_b1": parts["hada_w1_a"].T[:, p_out],
                "loha_a2": parts["hada_w2_b"][:, p_in], "loha_b2": parts["hada_w2_a"].T[:, p_out]}

LOHA_FORMAT = LoHaFormat()


class LoKrFormat(peft_codec.Format):
    """PEFT's `LOKR` adapter type (full or decomposed `lokr_w1`, `lokr_w2`),
    read into `lokr` and written from it."""

    peft_type = "LOKR"
    splittable = False
    writes = ("lokr",)
    parts = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")

    def method(self, config):
        return "lokr"

    def required(self, config):
        return set()

    def options(self, config):
        return {"decompose_both": peft_codec.config_value(config, "decompose_both", False, "bool"),
                "decompose_factor": peft_codec.config_value(config, "decompose_factor", -1, "int", low=-1),
                "rank_dropout": peft_codec.dropout_value(config, "rank_dropout"),
                "module_dropout": peft_codec.dropout_value(config, "module_dropout"),
                "rank_dropout_scale": peft_codec.config_value(config, "rank_dropout_scale", False, "bool")}

    def check_parts(self, parts, module, config):
        for i in (1, 2):
            if f"lokr_w{i}" in parts:
                peft_codec.matrix(parts, f"lokr_w{i}", module)
                if f"lokr_w{i}_a" in parts or f"lokr_w{i}_b" in parts:
                    raise ValueError(f"PEFT adapter module {module!r}: LoKr factor {i} is given "
                                     "both whole and as a product.")
            elif f"lokr_w{i}_a" in parts and f"lokr_w{i}_b" in parts:
                a, b = peft_codec.matrix(parts, f"lokr_w{i}_a", module), peft_codec.matrix(parts, f"lokr_w{i}_b", module)
                peft_codec.same(module, (f"lokr_w{i}_a columns", a.shape[1]), (f"lokr_w{i}_b rows", b.shape[0]))
            else:
                raise ValueError(f"PEFT adapter module {module!r}: LoKr factor {i} is missing "
                                 f"(found {sorted(parts)}).")

    @staticmethod
    def _factor(parts, i, module):
        full = parts.get(f"lokr_w{i}")
        if full is not None:
            return full
        a, b = parts.get(f"lokr_w{i}_a"), parts.get(f"lokr_w{i}_b")
        if a is None or b is None:
            raise ValueError(f"PEFT adapter module {module!r}: LoKr factor {i} is missing "
                             f"(found {sorted(parts)}).")
        return a @ b

    def torch_shape(self, parts):
        w1 = self._factor(parts, 1, "?")
        w2 = self._factor(parts, 2, "?")
        return w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]

    def state(self, parts, p_in, p_out, module):
        peft_codec.identity(p_in, p_out, module, "a Kronecker product")
        out = {}
        for i in (1, 2):
            if f"lokr_w{i}" in parts:
                out[f"lokr_f{i}"] = parts[f"lokr_w{i}"].T
            else:
                out[f"lokr_a{i}"] = parts[f"lokr_w{i}_b"]
                out[f"lokr_b{i}"] = parts[f"lokr_w{i}_a"].T
        return out

    # -- writing ------------------------------------------------------
    def export_entry(self, adapter, where):
        state = {v.name: adapter.read(v) for v in adapter.trainable_variables
                 if v.name.startswith("lokr_")}
        options = {k: getattr(adapter, k) for k in
                   ("decompose_both", "decompose_factor", "rank_dropout", "module_dropout",
                    "rank_dropout_scale")}
        return {"kind": "lokr", "state": state, "rank": adapter.rank, "alpha": adapter.alpha,
                "rslora": False, "options": options, "where": where}

    def check_entries(self, entries):
        first = entries[0][1]["options"]
        for _, e in entries:
            mine = e["options"]
            if (mine["decompose_both"], mine["decompose_factor"]) != (first["decompose_both"], first["decompose_factor"]):
                raise ValueError(
                    "save_peft_adapter: PEFT's LoKr has one decompose_both and one "
                    f"decompose_factor for every module; layer {e['where']!r} differs."
                )

    def write_module(self, name, group, layouts, n_in, n_out, whole):
        if not whole:
            raise ValueError(f"save_peft_adapter: module {name!r} is split over several "
                             "Keras layers, and a LoKr update cannot be split.")
        peft_codec.identity(*layouts[0], name, "a Kronecker product")
        entry = group[0][1]
        state, tensors = entry["state"], {}
        for i in (1, 2):
            if f"lokr_f{i}" in state:
                tensors[f"{name}.lokr_w{i}"] = peft_codec.f32(peft_codec.f32(state[f"lokr_f{i}"]).T)
            else:
                tensors[f"{name}.lokr_w{i}_a"] = peft_codec.f32(peft_codec.f32(state[f"lokr_b{i}"]).T)
                tensors[f"{name}.lokr_w{i}_b"] = peft_codec.f32(state[f"lokr_a{i}"])
        return tensors, int(entry["rank"]), float(entry["alpha"])

    def config(self, entries, common, rank, alpha):
        first = entries[0][1]["options"]
        return {
            "peft_type": self.peft_type, **common, "alpha": alpha,
            "rank_dropout": first["rank_dropout"],
            "module_dropout": first["module_dropout"],
            "rank_dropout_scale": first["rank_dropout_scale"],
            "decompose_both": first["decompose_both"],
            "decompose_factor": first["decompose_factor"],
            "init_weights": True,
        }


LOKR_FORMAT = LoKrFormat()


@registry.method(
    "LoHa: ΔK = s (A1ᵀB1) ⊙ (A2ᵀB2), rank up to r² (FedPara / LyCORIS)",
    trainable_count=lambda g, o: g.n_shared * 2 * o["rank"] * (g.n_in + g.n_out),
    reference=reference_loha,
    peft=LOHA_FORMAT,
)
@keras.saving.register_keras_serializable(package="keras_lowrank")
class LoHa(_LycorisAdapter):
    """Low-rank Hadamard product (arXiv 2108.06098, FedPara; PEFT's LoHa).

    `y = x K + b + s · x ((A1ᵀ B1) ⊙ (A2ᵀ B2))`, `s = alpha / r`, so the
    update has rank up to r² for `2r (n_in + n_out)` parameters. Variables:
    `loha_a1`, `loha_a2` of shape `(r, n_in)` (PEFT's `hada_w{1,2}_b`) and
    `loha_b1`, `loha_b2` of shape `(r, n_out)` (PEFT's `hada_w{1,2}_a`
    transposed). PEFT's init: `A1 ~ U(±1/sqrt(n_in))`, `B1, B2 ~
    U(±1/sqrt(r))`, `A2 = 0`, so the layer starts as a no-op.

    The forward never builds the update as PEFT does when `2 r² <
    min(n_in, n_out)`: it uses the Khatri–Rao form `s (x (A1 • A2)) (B1 ∗
    B2)` with `r²`-wide factors; otherwise it builds `ΔK` (`form` forces
    either).

    Args:
        layer: the `Dense`/`EinsumDense` to adapt.
        rank: the rank `r` of each of the two factor pairs.
        alpha: scaling numerator (default `rank`, so `s = 1`).
        rank_dropout: training only: drop whole output columns of the
            update, then rescale by the kept fraction (PEFT's).
        module_dropout: training only: skip the update for a whole step.
        form: `"auto"`, `"factorized"` or `"materialized"`.
        train_bias, seed, activation, merged, enabled: see `Adapter`.

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> layer = keras_lowrank.layers.LoHa(keras.layers.Dense(6), rank=2)
        >>> tuple(layer(np.ones((3, 4), "float32")).shape)
        (3, 6)
        >>> layer.trainable_count()  # 2 r (n_in + n_out)
        40
    """

    method = "loha"
    per_example = "factors"
    export_forms = ("lora",)
    OPTIONS = (
        RANK,
        ALPHA,
        RANK_DROPOUT,
        MODULE_DROPOUT,
        opt.Option("form", "auto", opt.choice(*FORMS),
                   "factorized Khatri-Rao form when 2r² < min(n_in, n_out) (auto), or force one"),
    ) + Adapter.OPTIONS

    def variable_specs(self, geometry):
        batch, n_in, n_out, r = geometry.batch_shape, geometry.n_in, geometry.n_out, self.rank
        return [
            VariableSpec("loha_a1", batch + (r, n_in), kaiming(n_in, self.seed)),
            VariableSpec("loha_b1", batch + (r, n_out), kaiming(r, _offset(self.seed, 1))),
            VariableSpec("loha_a2", batch + (r, n_in), "zeros"),
            VariableSpec("loha_b2", batch + (r, n_out), kaiming(r, _offset(self.seed, 2))),
        ]

    def factorized(self):
        """Whether the forward uses the Khatri–Rao form."""
        if self.form == "auto":  # the crossover measured in benchmarks/loha_forms.py
            return 2 * self.rank**2 < self.geometry.rank_limit
        return self.form == "factorized"

    @staticmethod
    def khatri_rao(a1, b1, a2, b2):
        """`(A1 • A2)ᵀ: (r², n_in)` and `B1 ∗ B2: (r², n_out)`: `ΔK/s` is
        the product of the first transposed and the second."""
        r = a1.shape[-2]
        p = ops.expand_dims(a1, -2) * ops.expand_dims(a2, -3)  # (.., r, r, n_in)
        q = ops.expand_dims(b1, -2) * ops.expand_dims(b2, -3)  # (.., r, r, n_out)
        lead = tuple(a1.shape[:-2])
        return (ops.reshape(p, lead + (r * r, a1.shape[-1])),
                ops.reshape(q, lead + (r * r, b1.shape[-1])))

    def delta_rows(self, rows):
        dtype = rows.dtype
        a1, b1, a2, b2 = (ops.cast(v, dtype) for v in
                          (self.loha_a1, self.loha_b1, self.loha_a2, self.loha_b2))
        if self.factorized():
            p_t, q = self.khatri_rao(a1, b1, a2, b2)
            h = ops.matmul(rows, ops.swapaxes(p_t, -1, -2)) * ops.cast(self.scaling, dtype)
            return ops.matmul(h, q)
        w1 = ops.matmul(ops.swapaxes(a1, -1, -2), b1)
        w2 = ops.matmul(ops.swapaxes(a2, -1, -2), b2)
        return ops.matmul(rows, w1 * w2 * ops.cast(self.scaling, dtype))

    def delta_matrix(self):
        a1, b1, a2, b2 = (self.read(v) for v in
                          (self.loha_a1, self.loha_b1, self.loha_a2, self.loha_b2))
        w1 = ops.matmul(ops.swapaxes(a1, -1, -2), b1)
        w2 = ops.matmul(ops.swapaxes(a2, -1, -2), b2)
        return self.scaling * w1 * w2

    def as_lora_state(self):
        """The update as an exact rank-r² LoRA (scale 1): `A = s (A1 • A2)`,
        `B = B1 ∗ B2`."""
        p_t, q = self.khatri_rao(*(self.read(v) for v in
                                   (self.loha_a1, self.loha_b1, self.loha_a2, self.loha_b2)))
        r2 = self.rank**2
        return {"lora_a": p_t * self.scaling, "lora_b": q}, {
            "rank": r2, "alpha": float(r2), "rslora": False,
        }


@registry.method(
    "LoKr: ΔK = s kron(F1, F2), F2 low-rank (LyCORIS)",
    trainable_count=lokr_count,
    reference=reference_lokr,
    peft=LOKR_FORMAT,
)
@keras.saving.register_keras_serializable(package="keras_lowrank")
class LoKr(_LycorisAdapter):
    """Kronecker-product adaptation (arXiv 2309.14859, LyCORIS; PEFT's LoKr).

    `ΔK = s · kron(F1, F2)`, `s = alpha / r`, with `F1: (in_m, out_l)` and
    `F2: (in_n, out_k)` from `factorization` of `n_in` and `n_out`. F2 is
    low-rank, `A2ᵀ B2` (`lokr_a2: (r, in_n)`, `lokr_b2: (r, out_k)`), unless
    `r >= max(in_n, out_k) / 2`, then a full `lokr_f2`; F1 is a full
    `lokr_f1` unless `decompose_both` and `r < max(in_m, out_l) / 2`, then
    `A1ᵀ B1`. PEFT's init (`init="peft"`): F1 (or `B1`) zero, the rest
    Kaiming-uniform, so the layer starts as a no-op; `init="lycoris"`: F1
    Kaiming, F2 (or `A2`) zero.

    The forward never builds the Kronecker product: with `X` the input rows
    reshaped to `(in_m, in_n)`, `Δy = s · vec(F1ᵀ X F2)`.

    Args:
        layer: the `Dense`/`EinsumDense` to adapt.
        rank: the rank of the low-rank factor(s).
        alpha: scaling numerator (default `rank`).
        decompose_both: make F1 low-rank too (when the rank is small enough).
        decompose_factor: the `factor` of `factorization` (-1: near sqrt).
        rank_dropout: training only: drop whole output columns of the update.
        rank_dropout_scale: rescale the kept columns by the kept fraction.
        module_dropout: training only: skip the update for a whole step.
        init: `"peft"` or `"lycoris"`.
        train_bias, seed, activation, merged, enabled: see `Adapter`.

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> layer = keras_lowrank.layers.LoKr(keras.layers.Dense(16), rank=2)
        >>> tuple(layer(np.ones((3, 8), "float32")).shape)
        (3, 16)
        >>> layer.layout()["in_m"], layer.layout()["out_l"]
        (2, 4)
    """

    method = "lokr"
    OPTIONS = (
        RANK,
        ALPHA,
        opt.Option("decompose_both", False, opt.boolean, "make F1 low-rank too, when r < max(F1's sides)/2"),
        opt.Option("decompose_factor", -1, opt.Check("-1 or an int > 0", _factor), "the factor of factorization"),
        RANK_DROPOUT,
        opt.Option("rank_dropout_scale", False, opt.boolean, "rescale kept columns by the kept fraction"),
        MODULE_DROPOUT,
        opt.Option("init", "peft", opt.choice("peft", "lycoris"), "which factor starts at zero"),
    ) + Adapter.OPTIONS

    def rank_warnings(self, geometry):
        return []  # a rank past PEFT's bound makes the factor full, by design

    def layout(self, geometry=None):
        g = geometry or self.geometry
        cached = getattr(self, "_layout_cache", None)
        if cached is not None and cached[0] == (g.n_in, g.n_out):
            return cached[1]  # the forward asks every step (torch runs it eagerly)
        p = lokr_layout(g.n_in, g.n_out, self.rank, self.decompose_both, self.decompose_factor, _spatial(g))
        object.__setattr__(self, "_layout_cache", ((g.n_in, g.n_out), p))
        return p

    def variable_specs(self, geometry):
        p = self.layout(geometry)
        batch, r, lyc = geometry.batch_shape, self.rank, self.init == "lycoris"
        seed = lambda k: _offset(self.seed, k)  # noqa: E731
        specs = []
        if p["full_1"]:
            specs.append(VariableSpec("lokr_f1", batch + (p["in_m"], p["out_l"]),
                                      kaiming(p["in_m"], seed(0)) if lyc else "zeros"))
        else:
            specs += [
                VariableSpec("lokr_a1", batch + (r, p["in_m"]), kaiming(p["in_m"], seed(0))),
                VariableSpec("lokr_b1", batch + (r, p["out_l"]), kaiming(r, seed(1)) if lyc else "zeros"),
            ]
        if p["full_2"]:
            specs.append(VariableSpec("lokr_f2", batch + (p["in_n"], p["out_k"]),
                                      "zeros" if lyc else kaiming(p["in_n"], seed(2))))
        else:
            specs += [
                VariableSpec("lokr_a2", batch + (r, p["in_n"]), "zeros" if lyc else kaiming(p["in_n"], seed(2))),
                VariableSpec("lokr_b2", batch + (r, p["out_k"]), kaiming(r, seed(3))),
            ]
        return specs

    def rescale_rank_dropout(self):
        return self.rank_dropout_scale

    def factors(self, read):
        """`(F1, F2)` in the Keras layout, each read through `read`."""
        v = self._adapter_vars
        if "lokr_f1" in v:
            f1 = read(v["lokr_f1"])
        else:
            f1 = ops.matmul(ops.swapaxes(read(v["lokr_a1"]), -1, -2), read(v["lokr_b1"]))
        if "lokr_f2" in v:
            f2 = read(v["lokr_f2"])
        else:
            f2 = ops.matmul(ops.swapaxes(read(v["lokr_a2"]), -1, -2), read(v["lokr_b2"]))
        return f1, f2

    def delta_rows(self, rows):
        dtype = rows.dtype
        p = self.layout()
        batch = self.geometry.batch_shape
        lead = "z" if batch else ""
        x = ops.reshape(rows, batch + (-1, p["in_m"], p["in_n"]))
        v = self._adapter_vars
        cast = lambda t: ops.cast(t, dtype)  # noqa: E731
        if "lokr_f2" in v:
            t = ops.einsum(f"{lead}nij,{lead}jq->{lead}niq", x, cast(v["lokr_f2"]))
        else:
            t = ops.einsum(f"{lead}nij,{lead}rj->{lead}nir", x, cast(v["lokr_a2"]))
            t = ops.einsum(f"{lead}nir,{lead}rq->{lead}niq", t, cast(v["lokr_b2"]))
        if "lokr_f1" in v:
            f1 = cast(v["lokr_f1"])
        else:
            f1 = ops.matmul(ops.swapaxes(cast(v["lokr_a1"]), -1, -2), cast(v["lokr_b1"]))
        out = ops.einsum(f"{lead}niq,{lead}ip->{lead}npq", t, f1 * ops.cast(self.scaling, dtype))
        return ops.reshape(out, batch + (-1, self.geometry.n_out))

    def delta_matrix(self):
        f1, f2 = self.factors(self.read)
        batch = self.geometry.batch_shape
        lead = "z" if batch else ""
        k = ops.einsum(f"{lead}ip,{lead}jq->{lead}ijpq", f1, f2)
        return self.scaling * ops.reshape(k, batch + (self.geometry.n_in, self.geometry.n_out))


def _offset(seed, k):
    """Distinct, reproducible seeds for a layer's several initializers."""
    return None if seed is None else seed + 7919 * k
