"""HiRA: Hadamard high-rank adaptation (Huang et al., ICLR 2025).

The update is the frozen kernel itself, modulated element by element by a
rank-r product: in the matrix view `K0: (n_in, n_out)`,

    ΔK = K0 ⊙ (A B),   y = x K0 + b + dropout(x) (K0 ⊙ (A B)),

with `A: (n_in, r)` (stored transposed, `hira_a: (r, n_in)`, PEFT's
`hira_A`) and `B: (r, n_out)` (`hira_b`, PEFT's `hira_B: (n_out, r)`
transposed). There is no scaling factor (PEFT's HiRA has none). The rank of
`ΔK` is up to `rank(K0) · r`, for `r (n_in + n_out)` parameters.

PEFT's init: `A ~ U(±1/sqrt(n_in))` (`init="kaiming"`, PyTorch's
`kaiming_uniform_(a=sqrt(5))`) or `N(0, 1/r²)` (`init="gaussian"`), `B = 0`,
so the layer starts as a no-op.

`K0` is the frozen base as the layer computes with it: a quantized base
(NF4, int8, int4) is dequantized, as for DoRA's column norms. Merging gives
`K' = K0 ⊙ (1 + A B)`; unmerging divides by the same `1 + A B` (computed the
same way, so it gives `K0` back to float32 round-off without keeping a copy
of it; a `1 + A B` with an exact zero, where `K0` is lost, is refused).
"""

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
from keras_lowrank.methods.lora import INITS
from keras_lowrank.methods.lora import lora_a_initializer


def reference_merged(adapter, w):
    """HiRA: `W + W ⊙ (A B)`, `A = hira_aᵀ`, `B = hira_b`."""
    m = reference.factor_a(adapter, "hira_a") @ reference.value(adapter, "hira_b")
    return w + w * m


# ----------------------------------------------------------------------
# PEFT's format
class HiRAFormat(peft_codec.Format):
    """PEFT's `HIRA` adapter type: each module's `hira_A (r, n_in)` and
    `hira_B (n_out, r)` (torch's layout), read into `hira` and written from
    it. PEFT's HiRA has no alpha.

    Ranks: PEFT 0.21 builds every HiRA module at the config's `r`, whatever
    its `rank_pattern` says (its module dispatch reads `r` only), so a PEFT
    directory's weights may have `r` where the pattern names another rank.
    Reading takes each module's rank from its weights (the pattern's rank or
    `r`; anything else is refused). Writing pads every module with zero
    factors to the largest rank (`A B` is unchanged) and writes no
    `rank_pattern`, so PEFT loads it exactly. A weight KerasHub splits over
    several layers (GPT-2's fused `c_attn`) is written as one HiRA whose rank
    is the sum of the layers' (the Hadamard product with the base is linear
    in `A B`, so the joined factors are exact), and read back part by
    part."""

    peft_type = "HIRA"
    parts = ("hira_A", "hira_B")
    writes = ("hira",)

    def method(self, config):
        return "hira"

    def options(self, config):
        return {"dropout": peft_codec.dropout_value(config, "hira_dropout")}

    def check_parts(self, parts, module, config):
        a = peft_codec.matrix(parts, "hira_A", module)
        b = peft_codec.matrix(parts, "hira_B", module)
        peft_codec.same(module, ("hira_A rows", a.shape[0]), ("hira_B columns", b.shape[1]))

    def rank(self, config, module, parts):
        r = int(parts["hira_A"].shape[0])
        expected = {super().rank(config, module, parts), int(config.get("r", 8))}
        if r not in expected:
            raise ValueError(f"PEFT adapter module {module!r}: rank {r} in the weights, "
                             f"{' or '.join(map(str, sorted(expected)))} in the config.")
        return r

    def alpha(self, config, module):
        return None

    def torch_shape(self, parts):
        return parts["hira_B"].shape[0], parts["hira_A"].shape[1]

    def state(self, parts, p_in, p_out, module):
        return {"hira_a": parts["hira_A"][:, p_in], "hira_b": parts["hira_B"].T[:, p_out]}

    # -- writing ------------------------------------------------------
    def export_entry(self, adapter, where):
        return {"kind": "hira", "rank": adapter.rank, "alpha": 1.0, "rslora": False,
                "dropout": adapter.dropout, "where": where,
                "state": {"hira_a": adapter.read(adapter.hira_a),
                          "hira_b": adapter.read(adapter.hira_b)}}

    def check_entries(self, entries):
        rates = {e["dropout"] for _, e in entries}
        if len(rates) > 1:
            raise ValueError(
                "save_peft_adapter: PEFT's HiRA has one hira_dropout for every module; "
                f"the model's HiRA layers have {sorted(rates)}."
            )
        # the rank every module is written at: the largest (a split weight's
        # layers summed), the others padded with zero factors
        ranks = {}
        for target, e in entries:
            ranks[target.module] = ranks.get(target.module, 0) + int(e["rank"])
        for _, e in entries:
            e["written_rank"] = max(ranks.values())

    def write_module(self, name, group, layouts, n_in, n_out, whole):
        rank = group[0][1]["written_rank"]
        hira_a = np.zeros((rank, n_in), np.float32)
        hira_b = np.zeros((n_out, rank), np.float32)
        k = 0
        for (_, e), (p_in, p_out) in zip(group, layouts):
            r = int(e["rank"])
            hira_a[k : k + r, p_in] = peft_codec.f32(e["state"]["hira_a"]).reshape(r, n_in)
            hira_b[p_out, k : k + r] = peft_codec.f32(e["state"]["hira_b"]).reshape(r, -1).T
            k += r
        tensors = {f"{name}.hira_A": np.ascontiguousarray(hira_a),
                   f"{name}.hira_B": np.ascontiguousarray(hira_b)}
        return tensors, rank, 1.0

    def config(self, entries, common, rank, alpha):
        common = {k: v for k, v in common.items() if k != "alpha_pattern"}  # HiRA has no alpha
        return {
            "peft_type": self.peft_type, **common,
            "hira_dropout": float(entries[0][1]["dropout"]),
            "modules_to_save": None,
            "init_weights": True,
        }


HIRA_FORMAT = HiRAFormat()


@registry.method(
    "HiRA: ΔK = K0 ⊙ (AB), the frozen kernel modulated by a rank-r product (high rank)",
    reference=reference_merged,
    peft=HIRA_FORMAT,
    paper="https://openreview.net/forum?id=TwJrTz9cRS",
)
@keras.saving.register_keras_serializable(package="keras_lowrank")
class HiRA(Adapter):
    """Hadamard high-rank adaptation (Huang et al., ICLR 2025; PEFT's HiRA).

    `y = x K0 + b + dropout(x) (K0 ⊙ (A B))` in the matrix view of the
    kernel: the frozen kernel `K0` (dequantized when the base is quantized)
    modulated element-wise by a rank-r product, so the update has rank up to
    `rank(K0) · r` for `r (n_in + n_out)` parameters. No scaling. The
    variable `hira_a` holds `Aᵀ`, shape `(r, n_in)` (PEFT's `hira_A`);
    `hira_b` holds `B`, shape `(r, n_out)` (PEFT's `hira_B` transposed).
    `A` starts `U(±1/sqrt(n_in))` (`init="kaiming"`, PEFT's default) or
    `N(0, 1/r²)` (`init="gaussian"`), `B` at zero: a no-op at start.

    Args:
        layer: the `Dense`/`EinsumDense` to adapt.
        rank: the rank `r` of `A B` (PEFT's default 32).
        dropout: dropout rate on the adapter's input.
        init: `"kaiming"` or `"gaussian"`.
        train_bias, seed, activation, merged, enabled: see `Adapter`.

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> layer = keras_lowrank.layers.HiRA(keras.layers.Dense(6), rank=2)
        >>> x = np.ones((3, 4), "float32")
        >>> tuple(layer(x).shape)
        (3, 6)
        >>> layer.trainable_count()  # r (n_in + n_out)
        20
        >>> _ = layer.hira_b.assign(np.ones((2, 6), "float32"))
        >>> a = np.asarray(keras.ops.convert_to_numpy(layer.hira_a)).T
        >>> k0 = np.asarray(keras.ops.convert_to_numpy(layer.layer.kernel))
        >>> want = x @ (k0 * (1.0 + a @ np.ones((2, 6))))
        >>> bool(np.allclose(keras.ops.convert_to_numpy(layer(x)), want, atol=1e-5))
        True
    """

    method = "hira"
    OPTIONS = (
        opt.Option("rank", 32, opt.positive_int, "rank r of the product A B (PEFT's default 32)"),
        DROPOUT,
        opt.Option("init", "kaiming", opt.choice(*INITS), "init of A: PEFT's kaiming-uniform or gaussian"),
    ) + Adapter.OPTIONS

    def variable_specs(self, geometry):
        batch, n_in, n_out, r = geometry.batch_shape, geometry.n_in, geometry.n_out, self.rank
        return [
            VariableSpec("hira_a", batch + (r, n_in), lora_a_initializer(self.init, n_in, r, self.seed)),
            VariableSpec("hira_b", batch + (r, n_out), "zeros"),
        ]

    def modulation(self, read=None, dtype=None):
        """`A B`, `batch_shape + (n_in, n_out)`: read in float32 (`read`,
        e.g. `self.read`) or cast to `dtype`."""
        if read is None:
            a, b = ops.cast(self.hira_a, dtype), ops.cast(self.hira_b, dtype)
        else:
            a, b = read(self.hira_a), read(self.hira_b)
        return ops.matmul(ops.swapaxes(a, -1, -2), b)

    def adapter_output(self, x, y, training):
        x = self.adapter_input(x, training)
        rows = self.geometry.inputs_to_rows(x)
        dtype = rows.dtype
        k0 = ops.cast(self.base_matrix(), dtype)
        out = ops.matmul(rows, k0 * self.modulation(dtype=dtype))
        return self.add_rows(x, y, out)

    def merged_matrix(self, matrix):
        return matrix * (1.0 + self.modulation(self.read))

    def unmerged_matrix(self, matrix):
        # The same `1 + A B` the merge multiplied by: K0 back to round-off.
        # An exact zero there lost K0: 0/0 is NaN, which the caller refuses.
        return matrix / (1.0 + self.modulation(self.read))

    def delta_matrix(self):
        """`K0 ⊙ (A B)`, the additive update on the unmerged base."""
        k = self.base_matrix()
        k0 = self.unmerged_matrix(k) if self.merged else k
        return k0 * self.modulation(self.read)
