"""GraLoRA: granular low-rank adaptation (Jung et al., NeurIPS 2025,
arXiv 2505.20355).

The matrix view `K: (n_in, n_out)` is split into `k × k` blocks (input
blocks `I_i`, output blocks `O_j`), each with its own rank-`r/k` pair, for
the parameters of one rank-r LoRA. The pairs are slices of two matrices,
`A: (n_in, r)` (`gralora_a`) and `B: (r, n_out)` (`gralora_b`), PEFT's
layout: block `(i, j)` is

    ΔK[I_i, O_j] = s · A[I_i, S_j] B[S_i, O_j],   S_j = rank columns j·r/k .. (j+1)·r/k,

so the update has rank up to `k · r`. PEFT's hybrid GraLoRA adds a plain
LoRA over the whole kernel, `s · Hᵀ G` (`hybrid_a = H: (h, n_in)`, `hybrid_b
= G: (h, n_out)`, `h = hybrid_rank`), with the same `s = alpha / (r + h)`.

The forward never builds `ΔK`: the input rows are cut into the `k` input
blocks, multiplied by their `A` rows (`k` products `r` wide), the `r/k`-wide
pieces are regrouped by output block, and each output block is one product
with its columns of `B` (PEFT's computation). PEFT needs `k` to divide
`n_in` and `n_out`; here blocks follow `numpy.array_split` when it does not
(the first `n mod k` blocks one unit wider), computed with block masks, so
any kernel with `n_in, n_out >= k` takes it. Such an adapter has no PEFT
form.

PEFT's init: each block's `A` rows `U(±1/sqrt(n_in/k))` (Kaiming-uniform
over the block), the hybrid's `H` `U(±1/sqrt(n_in))`, `B = G = 0`: a no-op
at start. Merge `K' = K + ΔK`, exact; `save_adapter(..., as_lora=True)`
writes the exact rank-`(k·r + h)` LoRA (one rank-`r/k` pair per block).
"""

import math

import keras
import numpy as np
from keras import ops

from keras_lowrank import options as opt
from keras_lowrank import peft_codec
from keras_lowrank import registry
from keras_lowrank.adapter import Adapter
from keras_lowrank.adapter import VariableSpec
from keras_lowrank.methods import reference
from keras_lowrank.methods.lora import DROPOUT

def block_sizes(n, k):
    """The sizes of the `k` contiguous blocks `n` units are split into:
    equal when `k` divides `n` (PEFT's case), else `numpy.array_split`'s
    (the first `n mod k` blocks one unit wider).

    Examples:

        >>> block_sizes(12, 2), block_sizes(5, 2), block_sizes(6, 4)
        ([6, 6], [3, 2], [2, 2, 1, 1])
    """
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def _masks(n, k):
    """`(k, n)` float32: row `i` is 1 on the units of block `i`."""
    m = np.zeros((k, n), np.float32)
    start = 0
    for i, size in enumerate(block_sizes(n, k)):
        m[i, start : start + size] = 1.0
        start += size
    return m


def _kaiming(fan_in, seed):
    """PyTorch's `kaiming_uniform_(a=sqrt(5))`: `U(±1/sqrt(fan_in))`."""
    bound = 1.0 / math.sqrt(fan_in)
    return keras.initializers.RandomUniform(-bound, bound, seed=seed)


def reference_merged(adapter, w):
    """GraLoRA: `W + s (Σ_blocks A[I_i, S_j] B[S_i, O_j] + Hᵀ G)`, block by
    block, with `numpy.array_split` blocks."""
    a, b = reference.value(adapter, "gralora_a"), reference.value(adapter, "gralora_b")
    n_in, n_out = w.shape[-2:]
    k, s = adapter.gralora_k, adapter.rank // adapter.gralora_k
    delta = np.zeros(w.shape)
    for i, rows in enumerate(np.array_split(np.arange(n_in), k)):
        for j, cols in enumerate(np.array_split(np.arange(n_out), k)):
            block = a[..., rows, j * s : (j + 1) * s] @ b[..., i * s : (i + 1) * s, cols]
            delta[..., rows[:, None], cols[None, :]] = block
    if adapter.hybrid_rank:
        delta = delta + reference.factor_a(adapter, "hybrid_a") @ reference.value(adapter, "hybrid_b")
    return w + adapter.scaling * delta


# ----------------------------------------------------------------------
# PEFT's format
_HYBRID = ("gralora_A_general.weight", "gralora_B_general.weight")


class GraLoRAFormat(peft_codec.Format):
    """PEFT's `GRALORA` adapter type: each module's stacked block factors
    `gralora_A (k, n_in/k, r)` and `gralora_B (k, r, n_out/k)` and, with
    `hybrid_r > 0`, the hybrid LoRA's `gralora_A_general.weight (h, n_in)`
    and `gralora_B_general.weight (n_out, h)`; read into `gralora` and
    written from it. PEFT's GraLoRA has one `r`, `alpha`, `gralora_k` and
    `hybrid_r` for every module (no patterns), needs `k` to divide both
    sizes, and its blocks follow the torch weight's own order (a layer that
    KerasHub's converter reorders or splits is refused)."""

    peft_type = "GRALORA"
    parts = ("gralora_A", "gralora_B") + _HYBRID
    splittable = False
    writes = ("gralora",)

    def method(self, config):
        return "gralora"

    def _hybrid(self, config):
        return peft_codec.config_value(config, "hybrid_r", 0, "int", low=0)

    def required(self, config):
        return {"gralora_A", "gralora_B"} | (set(_HYBRID) if self._hybrid(config) else set())

    def options(self, config):
        return {"gralora_k": peft_codec.config_value(config, "gralora_k", 2, "int", low=1),
                "hybrid_rank": self._hybrid(config),
                "dropout": peft_codec.dropout_value(config, "gralora_dropout")}

    def check_parts(self, parts, module, config):
        if set(parts) != self.required(config):
            raise ValueError(f"PEFT adapter module {module!r}: expected "
                             f"{sorted(self.required(config))}, found {sorted(parts)}.")
        a, b = parts["gralora_A"], parts["gralora_B"]
        for name, value in (("gralora_A", a), ("gralora_B", b)):
            if value.ndim != 3:
                raise ValueError(f"PEFT adapter module {module!r}: {name} has shape {value.shape}; "
                                 "GraLoRA's stacked block factors are 3-D.")
        k = self.options(config)["gralora_k"]
        peft_codec.same(module, ("gralora_k", k), ("gralora_A blocks", a.shape[0]),
                        ("gralora_B blocks", b.shape[0]))
        peft_codec.same(module, ("gralora_A rank", a.shape[2]), ("gralora_B rank", b.shape[1]))
        if self._hybrid(config):
            h_a = peft_codec.matrix(parts, _HYBRID[0], module)
            h_b = peft_codec.matrix(parts, _HYBRID[1], module)
            peft_codec.same(module, ("hybrid_r", self._hybrid(config)),
                            (f"{_HYBRID[0]} rows", h_a.shape[0]), (f"{_HYBRID[1]} columns", h_b.shape[1]))
            peft_codec.same(module, (f"{_HYBRID[0]} columns", h_a.shape[1]),
                            ("gralora_A inputs", a.shape[0] * a.shape[1]))
            peft_codec.same(module, (f"{_HYBRID[1]} rows", h_b.shape[0]),
                            ("gralora_B outputs", b.shape[0] * b.shape[2]))

    def rank(self, config, module, parts):
        r = int(parts["gralora_A"].shape[2])
        expected = int(config.get("r", 32))
        if expected != r:
            raise ValueError(f"PEFT adapter module {module!r}: rank {r} in the weights, "
                             f"{expected} in the config.")
        return r

    def alpha(self, config, module):
        return float(peft_codec.config_value(config, "alpha", 64, "number", low=0, low_open=True))

    def torch_shape(self, parts):
        a, b = parts["gralora_A"], parts["gralora_B"]
        return b.shape[0] * b.shape[2], a.shape[0] * a.shape[1]

    def state(self, parts, p_in, p_out, module):
        peft_codec.identity(p_in, p_out, module, "GraLoRA's block structure")
        a, b = parts["gralora_A"], parts["gralora_B"]
        r = a.shape[2]
        out = {"gralora_a": a.reshape(-1, r),
               "gralora_b": np.transpose(b, (1, 0, 2)).reshape(r, -1)}
        if _HYBRID[0] in parts:
            out["hybrid_a"] = parts[_HYBRID[0]]
            out["hybrid_b"] = parts[_HYBRID[1]].T
        return out

    # -- writing ------------------------------------------------------
    def export_entry(self, adapter, where):
        state = {name: adapter.read(var) for name, var in adapter.adapter_variables().items()}
        options = {k: getattr(adapter, k) for k in ("rank", "alpha", "gralora_k", "hybrid_rank", "dropout")}
        return {"kind": "gralora", "state": state, "rank": adapter.rank, "alpha": adapter.alpha,
                "rslora": False, "options": options, "where": where}

    def check_entries(self, entries):
        first = entries[0][1]["options"]
        for target, e in entries:
            if e["options"] != first:
                raise ValueError(
                    "save_peft_adapter: PEFT's GraLoRA has one r, alpha, gralora_k, hybrid_r and "
                    f"gralora_dropout for every module; layer {e['where']!r} has {e['options']}, "
                    f"another {first}."
                )
            g, k = target.geometry, e["options"]["gralora_k"]
            if g.n_in % k or g.n_out % k:
                raise ValueError(
                    f"save_peft_adapter: layer {e['where']!r} is a {g.matrix_text()} kernel, which "
                    f"gralora_k={k} does not divide; PEFT's GraLoRA needs equal blocks."
                )

    def write_module(self, name, group, layouts, n_in, n_out, whole):
        if not whole:
            raise ValueError(f"save_peft_adapter: module {name!r} is split over several "
                             "Keras layers, and a GraLoRA update cannot be split.")
        peft_codec.identity(*layouts[0], name, "GraLoRA's block structure")
        entry = group[0][1]
        state, k, r = entry["state"], entry["options"]["gralora_k"], int(entry["rank"])
        a = peft_codec.f32(state["gralora_a"]).reshape(k, n_in // k, r)
        b = np.transpose(peft_codec.f32(state["gralora_b"]).reshape(r, k, n_out // k), (1, 0, 2))
        tensors = {f"{name}.gralora_A": np.ascontiguousarray(a),
                   f"{name}.gralora_B": np.ascontiguousarray(b)}
        if "hybrid_a" in state:
            tensors[f"{name}.{_HYBRID[0]}"] = peft_codec.f32(state["hybrid_a"])
            tensors[f"{name}.{_HYBRID[1]}"] = np.ascontiguousarray(peft_codec.f32(state["hybrid_b"]).T)
        return tensors, r, float(entry["alpha"])

    def config(self, entries, common, rank, alpha):
        first = entries[0][1]["options"]
        common = {k: v for k, v in common.items() if k not in ("rank_pattern", "alpha_pattern")}
        return {
            "peft_type": self.peft_type, **common, "alpha": alpha,
            "gralora_k": first["gralora_k"],
            "hybrid_r": first["hybrid_rank"],
            "gralora_dropout": float(first["dropout"]),
            "bias": "none",
            "modules_to_save": None,
            "init_weights": True,
        }


GRALORA_FORMAT = GraLoRAFormat()


def _offset(seed, k):
    """Distinct, reproducible seeds for a layer's several initializers."""
    return None if seed is None else seed + 7919 * k


@registry.method(
    "GraLoRA: k×k blocks of the kernel, each its own rank-r/k pair (+ hybrid LoRA)",
    trainable_count=lambda g, o: g.n_shared * (o["rank"] + o["hybrid_rank"]) * (g.n_in + g.n_out),
    reference=reference_merged,
    peft=GRALORA_FORMAT,
    paper="https://arxiv.org/abs/2505.20355",
)
@keras.saving.register_keras_serializable(package="keras_lowrank")
class GraLoRA(Adapter):
    """Granular low-rank adaptation (arXiv 2505.20355; PEFT's GraLoRA).

    The matrix view is split into `gralora_k × gralora_k` blocks; block
    `(i, j)` gets the rank-`r/k` pair `A[I_i, S_j]`, `B[S_i, O_j]` of
    `gralora_a = A: (n_in, r)` and `gralora_b = B: (r, n_out)` (PEFT's
    `gralora_A`/`gralora_B`, unstacked), so the update has rank up to `k·r`
    for `r (n_in + n_out)` parameters. With `hybrid_rank = h > 0`, a plain
    LoRA over the whole kernel is added (`hybrid_a: (h, n_in)`, `hybrid_b:
    (h, n_out)`, PEFT's `gralora_{A,B}_general`). Both parts are scaled by
    `s = alpha / (r + h)`. Blocks are equal when `k` divides the sizes
    (PEFT's case), `numpy.array_split`'s otherwise (`block_sizes`).

    Args:
        layer: the `Dense`/`EinsumDense` to adapt.
        rank: the total rank `r` of the block pairs (PEFT's `r`, default
            32); `gralora_k` must divide it.
        alpha: scaling numerator (default `rank + hybrid_rank`, scale 1;
            PEFT's default is 64).
        gralora_k: the number of blocks along each side.
        hybrid_rank: the rank of the hybrid LoRA (PEFT's `hybrid_r`; 0: none).
        dropout: dropout rate on the adapter's input (drawn separately for
            the hybrid part, as PEFT does).
        train_bias, seed, activation, merged, enabled: see `Adapter`.

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> layer = keras_lowrank.layers.GraLoRA(keras.layers.Dense(16), rank=2, gralora_k=2)
        >>> tuple(layer(np.ones((3, 16), "float32")).shape)
        (3, 16)
        >>> layer.trainable_count()  # r (n_in + n_out), as a rank-r LoRA
        64
        >>> _ = layer.gralora_b.assign(np.random.default_rng(0).normal(size=(2, 16)))
        >>> d = np.asarray(keras.ops.convert_to_numpy(layer.delta_matrix()))
        >>> int(np.linalg.matrix_rank(d))  # a rank-1 pair per block: rank k·r, not r
        4
    """

    method = "gralora"
    export_forms = ("lora",)
    OPTIONS = (
        opt.Option("rank", 32, opt.positive_int, "total rank r of the block pairs (PEFT's r); gralora_k divides it"),
        opt.Option("alpha", None, opt.positive_float_or_none,
                   "scaling numerator, s = alpha/(rank + hybrid_rank) (None: scale 1; PEFT's default 64)"),
        opt.Option("gralora_k", 2, opt.positive_int, "k: the kernel is split into k x k blocks, each a rank-r/k pair"),
        opt.Option("hybrid_rank", 0, opt.nonneg_int,
                   "rank of an added plain LoRA over the whole kernel (PEFT's hybrid_r)"),
        DROPOUT,
    ) + Adapter.OPTIONS

    def validate_options(self):
        if self.rank % self.gralora_k:
            raise ValueError(
                f"rank={self.rank} for {self.name!r} must be divisible by "
                f"gralora_k={self.gralora_k} (each of the k x k blocks has rank r/k)."
            )
        if self.alpha is None:
            self.alpha = float(self.rank + self.hybrid_rank)

    @property
    def scaling(self):
        return self.alpha / (self.rank + self.hybrid_rank)

    def check_geometry(self, geometry, where=None):
        if self.gralora_k > geometry.rank_limit:
            raise ValueError(
                f"gralora_k={self.gralora_k} is larger than layer {where or self.name!r} "
                f"allows: its kernel is a {geometry.matrix_text()} matrix, so at most "
                f"{geometry.rank_limit} blocks along each side."
            )
        super().check_geometry(geometry, where)

    def variable_specs(self, geometry):
        batch, n_in, n_out, r = geometry.batch_shape, geometry.n_in, geometry.n_out, self.rank
        specs = [
            VariableSpec("gralora_a", batch + (n_in, r), _kaiming(n_in / self.gralora_k, self.seed)),
            VariableSpec("gralora_b", batch + (r, n_out), "zeros"),
        ]
        if self.hybrid_rank:
            h = self.hybrid_rank
            specs += [
                VariableSpec("hybrid_a", batch + (h, n_in), _kaiming(n_in, _offset(self.seed, 1))),
                VariableSpec("hybrid_b", batch + (h, n_out), "zeros"),
            ]
        return specs

    # ------------------------------------------------------------------
    def even(self):
        """Whether `gralora_k` divides both sizes (PEFT's equal blocks)."""
        g = self.geometry
        return g.n_in % self.gralora_k == 0 and g.n_out % self.gralora_k == 0

    def _masked(self, a, b):
        """`A` per input block `(.., k, n_in, r)` and `B` per output block
        `(.., k, r, n_out)`, zero outside the block."""
        g, k = self.geometry, self.gralora_k
        m_in = ops.cast(_masks(g.n_in, k), a.dtype)
        m_out = ops.cast(_masks(g.n_out, k), b.dtype)
        return (ops.expand_dims(a, -3) * ops.expand_dims(m_in, -1),
                ops.expand_dims(b, -3) * ops.expand_dims(m_out, -2))

    def block_rows(self, rows, a, b, scale):
        """`scale · x ΔK_blocks` for rows `batch + (N, n_in)` of the matrix
        view, never building `ΔK`: `k` products per row into `r`-wide
        pieces, regrouped by output block, then one product per output
        block (PEFT's order)."""
        g, k, r = self.geometry, self.gralora_k, self.rank
        batch, s = g.batch_shape, r // k
        if self.even():
            x = ops.reshape(rows, batch + (-1, k, g.n_in // k))
            a3 = ops.reshape(a, batch + (k, g.n_in // k, r))
            h = ops.einsum("...nic,...icr->...nir", x, a3)
        else:
            a_blocks, b_blocks = self._masked(a, b)
            h = ops.einsum("...nd,...idr->...nir", rows, a_blocks)
        if not (isinstance(scale, (int, float)) and scale == 1.0):
            h = h * ops.cast(scale, h.dtype)
        # h[n, i, j·s + t] -> [n, j, i·s + t]: input block i's piece for output block j
        h = ops.reshape(ops.swapaxes(ops.reshape(h, batch + (-1, k, k, s)), -2, -3), batch + (-1, k, r))
        if self.even():
            b3 = ops.reshape(b, batch + (r, k, g.n_out // k))
            out = ops.einsum("...njr,...rjo->...njo", h, b3)
            return ops.reshape(out, batch + (-1, g.n_out))
        return ops.einsum("...njr,...jro->...no", h, b_blocks)

    def block_matrix(self, a, b):
        """`Σ_blocks A[I_i, S_j] B[S_i, O_j]` as a `batch + (n_in, n_out)`
        matrix."""
        g, k, r = self.geometry, self.gralora_k, self.rank
        batch, s = g.batch_shape, r // k
        if self.even():
            a4 = ops.reshape(a, batch + (k, g.n_in // k, k, s))  # [i, c, j, t]
            b4 = ops.reshape(b, batch + (k, s, k, g.n_out // k))  # [i, t, j, o]
            d = ops.einsum("...icjt,...itjo->...icjo", a4, b4)
            return ops.reshape(d, batch + (g.n_in, g.n_out))
        a_blocks, b_blocks = self._masked(a, b)
        a5 = ops.reshape(a_blocks, batch + (k, g.n_in, k, s))  # [i, d, j, t]
        b5 = ops.reshape(b_blocks, batch + (k, k, s, g.n_out))  # [j, i, t, o]
        return ops.einsum("...idjt,...jito->...do", a5, b5)

    def adapter_output(self, x, y, training):
        x_in = self.adapter_input(x, training)
        rows = self.geometry.inputs_to_rows(x_in)
        dtype = rows.dtype
        out = self.block_rows(rows, ops.cast(self.gralora_a, dtype), ops.cast(self.gralora_b, dtype),
                              self.scaling)
        if self.hybrid_rank:
            # PEFT draws the hybrid part's dropout separately
            out = out + self.lowrank_rows(self.adapter_input(x, training), self.hybrid_a,
                                          self.hybrid_b, self.scaling)
        return self.add_rows(x, y, out)

    def delta_matrix(self):
        d = self.block_matrix(self.read(self.gralora_a), self.read(self.gralora_b))
        if self.hybrid_rank:
            d = d + ops.matmul(ops.swapaxes(self.read(self.hybrid_a), -1, -2), self.read(self.hybrid_b))
        return self.scaling * d

    def as_lora_state(self):
        """The update as an exact LoRA of rank `k·r + h` (scale 1): one
        rank-`r/k` pair per block, zero outside its block, then the hybrid
        pair, the scale folded into `A`."""
        g, k, r = self.geometry, self.gralora_k, self.rank
        batch, s, nb = g.batch_shape, r // k, len(g.batch_shape)
        a_blocks, b_blocks = self._masked(self.read(self.gralora_a), self.read(self.gralora_b))
        a5 = ops.reshape(a_blocks, batch + (k, g.n_in, k, s))  # [i, d, j, t]
        b5 = ops.reshape(b_blocks, batch + (k, k, s, g.n_out))  # [j, i, t, o]
        lead = list(range(nb))
        lora_a = ops.reshape(ops.transpose(a5, lead + [nb, nb + 2, nb + 3, nb + 1]), batch + (k * r, g.n_in))
        lora_b = ops.reshape(ops.transpose(b5, lead + [nb + 1, nb, nb + 2, nb + 3]), batch + (k * r, g.n_out))
        if self.hybrid_rank:
            lora_a = ops.concatenate([lora_a, self.read(self.hybrid_a)], axis=-2)
            lora_b = ops.concatenate([lora_b, self.read(self.hybrid_b)], axis=-2)
        rank = k * r + self.hybrid_rank
        return {"lora_a": lora_a * self.scaling, "lora_b": lora_b}, {
            "rank": rank, "alpha": float(rank), "rslora": False,
        }
