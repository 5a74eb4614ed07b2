"""MiSS: matrix shard sharing (Kang et al., arXiv 2409.15371; PEFT's MiSS,
formerly Bone).

One small trainable matrix is shared by every shard of the kernel. In the
matrix view `K: (n_in, n_out)` the input rows are cut into shards of `r`
rows, and every shard receives the same update, `miss_block = D: (r, n_out)`:

    ΔK[i, o] = D[i mod r, o]

(a last, shorter shard takes the first rows of `D`, as PEFT pads the input
with zeros). The forward never builds `ΔK`: the input's `r`-wide pieces are
summed, `h = Σ_c x[c·r : (c+1)·r]`, and `h D` is added to the output, so a
step costs `n_in` additions and one `r × n_out` product.

PEFT's three variants, by its `init_weights`, are the `mode` option:

- `"miss"` (PEFT's default, `init_weights=True`): the above, `r · n_out`
  parameters.
- `"mini"`: `D` is itself shared along the outputs, `miss_block: (r,
  mini_rank)` repeated `n_out / mini_rank` times (`ΔK[i, o] = D[i mod r, o
  mod mini_rank]`); `mini_rank` must divide `n_out`.
- `"bat"`: the kernel is cut into `r × r` blocks and the update of block
  `(c, a)` (input shard `c`, output shard `a`) depends on the block itself,
  one `r × r` matrix `D_a` per output shard (`miss_block: (n_out/r, r,
  r)`): in PEFT's torch layout `W_{ac} → W_{ac} (I + D_a) + D_a`, in the
  Keras layout `K_{ca} → (I + D_aᵀ) K_{ca} + D_aᵀ`. The update is not
  additive; the forward builds it from the frozen kernel (dequantized for a
  quantized base), as PEFT's does, and unmerging solves with `I + D_aᵀ`.
  `r` must divide both sizes.

Every mode starts at zero: a no-op. PEFT's `init_weights=False` (a random
start, not a no-op) is not offered; a PEFT directory saved with it loads as
`"miss"` (its weights are what they are).
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

MODES = ("miss", "bat", "mini")


# ----------------------------------------------------------------------
# The NumPy statement of the formula (PEFT's torch layout, block by block)
def reference_merged(adapter, w):
    """MiSS on the base matrix `w` (`(..., n_in, n_out)`): the shared shard
    added to every input shard (`miss`, `mini`), or each `r × r` block of
    torch's `W = wᵀ` mapped to `W_b (I + D_a) + D_a` (`bat`)."""
    d = reference.value(adapter, "miss_block")
    n_in, n_out = w.shape[-2:]
    r = adapter.rank
    if adapter.mode == "bat":
        out = np.array(w, dtype="float64", copy=True)
        for a in range(n_out // r):
            for c in range(n_in // r):
                blk = np.swapaxes(w[..., c * r:(c + 1) * r, a * r:(a + 1) * r], -1, -2)  # W_ac
                new = blk @ d[..., a, :, :] + d[..., a, :, :] + blk
                out[..., c * r:(c + 1) * r, a * r:(a + 1) * r] = np.swapaxes(new, -1, -2)
        return out
    if adapter.mode == "mini":
        d = np.concatenate([d] * (n_out // adapter.mini_rank), axis=-1)
    return w + d[..., np.arange(n_in) % r, :]


def _refuse_fan_in_fan_out(common, name):
    """PEFT's MiSS or DeLoRA adapts `nn.Linear` weights `(n_out, n_in)` only."""
    if common.get("fan_in_fan_out"):
        raise ValueError(
            f"save_peft_adapter: these modules store their weight (n_in, n_out) (GPT-2's Conv1D), "
            f"and PEFT's {name} adapts torch Linear layers only."
        )


# ----------------------------------------------------------------------
# PEFT's format
class MissFormat(peft_codec.Format):
    """PEFT's `MISS` adapter type: one tensor per module, `miss_block`,
    `(r, out_features)` for the default mode, `(r, mini_r)` for `"mini"`,
    `(out_features/r, r, r)` for `"bat"`, read into `miss` and written from
    it. PEFT's MiSS has one `r`, `init_weights`, `mini_r` and dropout for
    every module (no patterns). The shards follow the torch weight's input
    order (and, for `"mini"` and `"bat"`, its output order): a layer that
    KerasHub's converter reorders that way is refused."""

    peft_type = "MISS"
    parts = ("miss_block",)
    splittable = False
    writes = ("miss",)

    def method(self, config):
        return "miss"

    def _mode(self, config):
        value = config.get("init_weights", True)
        if value is True or value is False:  # False: PEFT's random start, the same layer
            return "miss"
        if value in ("bat", "mini"):
            return value
        raise ValueError(f"{peft_codec.CONFIG_WHERE}: init_weights={value!r} is not one of "
                         "PEFT's MiSS modes (true, false, 'bat', 'mini').")

    def options(self, config):
        return {"mode": self._mode(config),
                "mini_rank": peft_codec.config_value(config, "mini_r", 1, "int", low=1),
                "dropout": peft_codec.dropout_value(config, "miss_dropout")}

    def check_parts(self, parts, module, config):
        block = parts["miss_block"]
        mode = self._mode(config)
        ndim = 3 if mode == "bat" else 2
        if block.ndim != ndim:
            raise ValueError(f"PEFT adapter module {module!r}: miss_block has shape {block.shape}; "
                             f"MiSS's {mode!r} mode stores a {ndim}-D block.")
        if mode == "bat":
            peft_codec.same(module, ("miss_block rows", block.shape[1]),
                            ("miss_block columns", block.shape[2]))
        if mode == "mini":
            peft_codec.same(module, ("mini_r", self.options(config)["mini_rank"]),
                            ("miss_block columns", block.shape[1]))

    def rank(self, config, module, parts):
        block = parts["miss_block"]
        r = int(block.shape[-1] if block.ndim == 3 else block.shape[0])
        expected = int(config.get("r", 64))
        if expected != r:
            raise ValueError(f"PEFT adapter module {module!r}: rank {r} in the weights, "
                             f"{expected} in the config.")
        return r

    def alpha(self, config, module):
        return None  # MiSS has no scale

    def torch_shape(self, parts):
        block = parts["miss_block"]
        if block.ndim == 3:
            return block.shape[0] * block.shape[1], None
        # (r, n_out) or, "mini", (r, mini_r): the layer's own sizes (the
        # block's shape is then checked against the layer's)
        return None, None

    def state(self, parts, p_in, p_out, module):
        block = parts["miss_block"]
        if block.ndim == 2 and len(p_out) == block.shape[1]:
            # the default mode: the outputs may be reordered, the shards not
            peft_codec.identity(p_in, np.arange(len(p_out)), module, "MiSS's input shards")
            return {"miss_block": block[:, p_out]}
        peft_codec.identity(p_in, p_out, module, "MiSS's shards")
        return {"miss_block": block}

    # -- writing ------------------------------------------------------
    def export_entry(self, adapter, where):
        options = {k: getattr(adapter, k) for k in ("rank", "mode", "mini_rank", "dropout")}
        return {"kind": "miss", "state": {"miss_block": adapter.read(adapter.miss_block)},
                "rank": adapter.rank, "alpha": 1.0, "rslora": False, "options": options,
                "where": where}

    def check_entries(self, entries):
        first = entries[0][1]["options"]
        for _, e in entries:
            if e["options"] != first:
                raise ValueError(
                    "save_peft_adapter: PEFT's MiSS has one r, init_weights (mode), mini_r and "
                    f"miss_dropout for every module; layer {e['where']!r} has {e['options']}, "
                    f"another {first}."
                )

    def write_module(self, name, group, layouts, n_in, n_out, whole):
        if not whole:
            raise ValueError(f"save_peft_adapter: module {name!r} is split over several "
                             "Keras layers, and a MiSS update cannot be split.")
        (_, entry), (p_in, p_out) = group[0], layouts[0]
        block = peft_codec.f32(entry["state"]["miss_block"])
        if entry["options"]["mode"] == "miss":
            peft_codec.identity(p_in, np.arange(len(p_out)), name, "MiSS's input shards")
            out = np.zeros_like(block)
            out[:, p_out] = block
            block = out
        else:
            peft_codec.identity(p_in, p_out, name, "MiSS's shards")
        return {f"{name}.miss_block": np.ascontiguousarray(block)}, int(entry["rank"]), 1.0

    def config(self, entries, common, rank, alpha):
        first = entries[0][1]["options"]
        _refuse_fan_in_fan_out(common, "MiSS")
        common = {k: v for k, v in common.items()
                  if k not in ("rank_pattern", "alpha_pattern", "fan_in_fan_out")}
        return {
            "peft_type": self.peft_type, **common,
            "init_weights": True if first["mode"] == "miss" else first["mode"],
            "mini_r": first["mini_rank"],
            "miss_dropout": float(first["dropout"]),
            "bias": "none",
            "modules_to_save": None,
        }


MISS_FORMAT = MissFormat()


def _count(g, o):
    per_slice = o["rank"] * (o["mini_rank"] if o["mode"] == "mini" else g.n_out)
    return g.n_shared * per_slice


@registry.method(
    "MiSS: one shard D shared by every r-row shard of the kernel (PEFT's miss/bat/mini)",
    trainable_count=_count,
    reference=reference_merged,
    peft=MISS_FORMAT,
    paper="https://arxiv.org/abs/2409.15371",
)
@keras.saving.register_keras_serializable(package="keras_lowrank")
class MiSS(Adapter):
    """Matrix shard sharing (arXiv 2409.15371; PEFT's MiSS).

    The input rows of the matrix view are cut into shards of `rank` rows,
    and every shard gets the same trainable update `miss_block = D: (r,
    n_out)`: `ΔK[i, o] = D[i mod r, o]`. The forward sums the input's
    `r`-wide pieces and multiplies by `D` (no `ΔK` is built). `mode="mini"`
    also shares `D` along the outputs (`(r, mini_rank)`, repeated);
    `mode="bat"` updates each `r × r` block from the block itself, `K_{ca}
    → (I + D_aᵀ) K_{ca} + D_aᵀ` with one `D_a` per output shard (`(n_out/r,
    r, r)`). Every mode starts as a no-op (`D = 0`); the update has no
    scale (PEFT's MiSS has none).

    Args:
        layer: the layer to adapt.
        rank: the shard size `r` (PEFT's `r`, default 64); at most `n_in`;
            for `"bat"` it divides `n_in` and `n_out`.
        mode: `"miss"` (PEFT's default), `"mini"` or `"bat"` (PEFT's
            `init_weights`).
        mini_rank: the output shard size of `"mini"` (PEFT's `mini_r`); it
            divides `n_out`.
        dropout: dropout rate on the adapter's input.
        train_bias, seed, activation, merged, enabled: see `Adapter`.

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> layer = keras_lowrank.layers.MiSS(keras.layers.Dense(6), rank=2)
        >>> tuple(layer(np.ones((3, 5), "float32")).shape)
        (3, 6)
        >>> layer.trainable_count()  # r · n_out
        12
        >>> _ = layer.miss_block.assign(np.arange(12.0).reshape(2, 6))
        >>> d = np.asarray(keras.ops.convert_to_numpy(layer.delta_matrix()))
        >>> bool((d[0] == d[2]).all() and (d[1] == d[3]).all() and (d[4] == d[0]).all())
        True
    """

    method = "miss"
    OPTIONS = (
        opt.Option("rank", 64, opt.positive_int, "shard size r (PEFT's r): rows of the input per shard"),
        opt.Option("mode", "miss", opt.choice(*MODES),
                   "PEFT's init_weights: 'miss' (True, the default), 'mini' or 'bat'"),
        opt.Option("mini_rank", 1, opt.positive_int,
                   "output shard size of mode='mini' (PEFT's mini_r); divides n_out"),
        DROPOUT,
    ) + Adapter.OPTIONS

    def check_geometry(self, geometry, where=None):
        where = where or self.name
        r, n_in, n_out = self.rank, geometry.n_in, geometry.n_out
        if r > n_in:
            raise ValueError(
                f"rank={r} is larger than layer {where!r} allows for method 'miss': its kernel "
                f"is a {geometry.matrix_text()} matrix, and a shard has at most n_in={n_in} rows."
            )
        if self.mode == "bat" and (n_in % r or n_out % r):
            raise ValueError(
                f"rank={r} for layer {where!r} with mode='bat': the {geometry.matrix_text()} kernel "
                f"must split into {r}x{r} blocks (r divides both sizes)."
            )
        if self.mode == "mini" and n_out % self.mini_rank:
            raise ValueError(
                f"mini_rank={self.mini_rank} for layer {where!r} with mode='mini' must divide "
                f"n_out={n_out} (its kernel is a {geometry.matrix_text()} matrix)."
            )
        super().check_geometry(geometry, where)

    def variable_specs(self, geometry):
        batch, r = geometry.batch_shape, self.rank
        if self.mode == "bat":
            shape = batch + (geometry.n_out // r, r, r)
        elif self.mode == "mini":
            shape = batch + (r, self.mini_rank)
        else:
            shape = batch + (r, geometry.n_out)
        return [VariableSpec("miss_block", shape, "zeros")]

    # ------------------------------------------------------------------
    def shared_block(self, block):
        """`D` as `(…, r, n_out)` (mode "mini": repeated along the outputs)."""
        if self.mode == "mini":
            reps = self.geometry.n_out // self.mini_rank
            return ops.tile(block, (1,) * (len(block.shape) - 1) + (reps,))
        return block

    def fold(self, rows):
        """`Σ_c rows[..., c·r:(c+1)·r]`: the sum of the input's `r`-wide
        shards (zero-padded to a multiple of `r`, as PEFT)."""
        r, n_in = self.rank, self.geometry.n_in
        pad = (-n_in) % r
        if pad:
            rows = ops.pad(rows, [(0, 0)] * (len(rows.shape) - 1) + [(0, pad)])
        pieces = ops.reshape(rows, self.geometry.batch_shape + (-1, (n_in + pad) // r, r))
        return ops.sum(pieces, axis=-2)

    def bat_delta(self, matrix, block):
        """Mode "bat": `ΔK_{ca} = D_aᵀ K_{ca} + D_aᵀ` for every `r × r`
        block of `matrix` (`batch + (n_in, n_out)`)."""
        g, r = self.geometry, self.rank
        batch = g.batch_shape
        k4 = ops.reshape(matrix, batch + (g.n_in // r, r, g.n_out // r, r))  # [c, s, a, q]
        d = ops.cast(block, k4.dtype)  # [a, s, p]
        delta = ops.einsum("...asp,...csaq->...cpaq", d, k4)
        delta = delta + ops.expand_dims(ops.einsum("...aqp->...paq", d), -4)
        return ops.reshape(delta, batch + (g.n_in, g.n_out))

    def adapter_output(self, x, y, training):
        x_in = self.adapter_input(x, training)
        rows = self.geometry.inputs_to_rows(x_in)
        if self.mode == "bat":
            # PEFT's bat builds the block update from the weight itself
            delta = self.bat_delta(self.base_matrix(), self.read(self.miss_block))
            out = ops.matmul(rows, ops.cast(delta, rows.dtype))
            return self.add_rows(x, y, out)
        block = ops.cast(self.miss_block, rows.dtype)
        h = self.fold(rows)
        if self.mode == "mini":  # h D on the mini_rank outputs, then repeated
            reps = self.geometry.n_out // self.mini_rank
            out = ops.matmul(h, block)
            out = ops.tile(out, (1,) * (len(out.shape) - 1) + (reps,))
        else:
            out = ops.matmul(h, block)
        return self.add_rows(x, y, out)

    def shard_matrix(self):
        """`ΔK` of modes "miss" and "mini": `D` repeated down the rows."""
        g, r = self.geometry, self.rank
        d = self.shared_block(self.read(self.miss_block))
        reps = -(-g.n_in // r)
        full = ops.tile(d, (1,) * (len(d.shape) - 2) + (reps, 1))
        return full[..., : g.n_in, :]

    def delta_matrix(self):
        """`K' - K` on the current base (mode "bat": it depends on the base)."""
        if self.mode == "bat":
            return self.bat_delta(self.base_matrix(), self.read(self.miss_block))
        return self.shard_matrix()

    def merged_matrix(self, matrix):
        if self.mode == "bat":
            return matrix + self.bat_delta(matrix, self.read(self.miss_block))
        return matrix + self.shard_matrix()

    def unmerged_matrix(self, matrix):
        if self.mode != "bat":
            return matrix - self.shard_matrix()
        # K_ca = (I + D_aᵀ)⁻¹ (K'_ca - D_aᵀ)
        g, r = self.geometry, self.rank
        batch = g.batch_shape
        d = self.read(self.miss_block)
        dt = ops.swapaxes(d, -1, -2)  # [a, p, s]
        inverse = ops.inv(ops.eye(r, dtype=dt.dtype) + dt)
        k4 = ops.reshape(matrix, batch + (g.n_in // r, r, g.n_out // r, r))  # [c, s, a, q]
        shifted = k4 - ops.expand_dims(ops.einsum("...aqp->...paq", d), -4)
        k4 = ops.einsum("...aps,...csaq->...cpaq", inverse, shifted)
        return ops.reshape(k4, batch + (g.n_in, g.n_out))
