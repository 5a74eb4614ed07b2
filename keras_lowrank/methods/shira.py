"""SHiRA: sparse high-rank adapters (Bhardwaj et al., NeurIPS 2024,
arXiv 2406.13175; PEFT's `SHIRA`).

A fixed set `Ω` of entries of the matrix view `K: (n_in, n_out)` trains,
the rest stays frozen: `K' = K + S`, `S` zero outside `Ω`. `|Ω| = r (n_in +
n_out)`, the parameters of a rank-r LoRA, but the update is not low-rank.
The entries are `shira_index: (2, |Ω|)` (int32: the input row, then the
output column of each) and their values `shira_weight: (|Ω|,)`, zero at the
start (PEFT's `init_weights=True`), so the layer starts as a no-op.

`Ω` is PEFT's random mask: `|Ω|` distinct entries drawn uniformly, here
with NumPy from `seed` (PEFT's `random_seed`; torch's generator cannot be
reproduced), listed in PEFT's order (row-major over the torch weight
`(n_out, n_in)`), so `shira_weight` lines up with PEFT's tensor. The
indices are variables: `.keras` files, adapter files and PEFT directories
carry them, and a loaded adapter keeps its entries whatever the seed. PEFT
refuses an `r` with `r (n_in + n_out) > n_in n_out`; here such a kernel
trains every entry (`|Ω| = n_in n_out`, with a warning), so any `r` up to
`min(n_in, n_out)` fits any kernel (such an adapter has no PEFT form).

Forward: `y = x K + b + x S`. `x S` is computed from the entries: the input
columns at the rows of `Ω`, times the weights, summed into their output
columns (`N |Ω|` products for `N` rows, no dense `S`), when that is smaller
than `S` (`N |Ω| <= n_in n_out`, with `N` known when the graph is traced);
otherwise `S` is scattered into a dense matrix and multiplied, as PEFT
computes it. Merge `K' = K + S`, exact.
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

#: what users call (the rest is the method's machinery)
__all__ = ["random_indices", "entry_count"]


def entry_count(rank, n_in, n_out):
    """`|Ω|`: `r (n_in + n_out)` (a rank-r LoRA's parameters), at most
    every entry of the kernel.

    Examples:

        >>> entry_count(2, 16, 32), entry_count(2, 5, 3)
        (96, 15)
    """
    return min(rank * (n_in + n_out), n_in * n_out)


def random_indices(n_in, n_out, count, seed):
    """PEFT's random mask: `count` distinct entries of an `(n_in, n_out)`
    matrix view, drawn uniformly with NumPy from `seed`, in PEFT's order
    (row-major over the torch weight `(n_out, n_in)`). Returns `(2, count)`
    int32: the input row and the output column of each entry.

    Examples:

        >>> idx = random_indices(4, 3, 5, seed=0)
        >>> idx.shape, len({(int(i), int(o)) for i, o in idx.T})
        ((2, 5), 5)
    """
    rng = np.random.default_rng(seed)
    flat = np.sort(rng.choice(n_in * n_out, size=count, replace=False))
    out_idx, in_idx = np.divmod(flat, n_in)
    return np.stack([in_idx, out_idx]).astype("int32")


def reference_merged(adapter, w):
    """SHiRA: `W + S`, `S[i, o] = shira_weight` at each entry `(i, o)` of
    `shira_index`."""
    rows, cols = np.asarray(ops.convert_to_numpy(adapter.shira_index)).astype("int64")
    s = np.zeros(w.shape)
    np.add.at(s, (rows, cols), reference.value(adapter, "shira_weight"))
    return w + s


class _MaskInitializer:
    """The random mask of every slice of a (possibly batched) kernel: slice
    `i` from `seed + i` (`seed=None`: a seed drawn from NumPy's global
    generator, which `keras.utils.set_random_seed` seeds)."""

    def __init__(self, n_in, n_out, count, slices, seed):
        self.n_in, self.n_out, self.count, self.slices, self.seed = n_in, n_out, count, slices, seed

    def __call__(self, shape, dtype=None):
        seed = self.seed if self.seed is not None else int(np.random.randint(0, 2**31 - 1))
        idx = np.stack([random_indices(self.n_in, self.n_out, self.count, seed + i)
                        for i in range(self.slices)])
        return ops.convert_to_tensor(idx.reshape(tuple(shape)), dtype="int32")


# ----------------------------------------------------------------------
# PEFT's format
class ShiraFormat(peft_codec.Format):
    """PEFT's `SHIRA` adapter type: each module's `shira_weight (|Ω|,)` and
    `shira_indices (2, |Ω|)` (torch weight rows, then columns), read into
    `shira` and written from it. PEFT's SHiRA has one `r` for every module
    (no patterns) and torch `nn.Linear` layers only (no `fan_in_fan_out`)."""

    peft_type = "SHIRA"
    parts = ("shira_weight", "shira_indices")
    index_parts = ("shira_indices",)
    splittable = False
    writes = ("shira",)

    def method(self, config):
        return "shira"

    def options(self, config):
        seed = config.get("random_seed")
        if seed is not None:
            seed = peft_codec.config_value(config, "random_seed", None, "int")
        return {"seed": seed}

    def check_parts(self, parts, module, config):
        w, idx = parts["shira_weight"], parts["shira_indices"]
        if w.ndim != 1 or idx.ndim != 2 or idx.shape[0] != 2:
            raise ValueError(f"PEFT adapter module {module!r}: shira_weight {w.shape} and "
                             f"shira_indices {idx.shape}; SHiRA's are (n,) and (2, n).")
        peft_codec.same(module, ("shira_weight entries", w.shape[0]), ("shira_indices entries", idx.shape[1]))
        values = np.asarray(idx, np.float64)
        if values.size and (not np.all(values == np.round(values)) or values.min() < 0):
            raise ValueError(f"PEFT adapter module {module!r}: shira_indices are not "
                             "non-negative integers.")

    def rank(self, config, module, parts):
        return int(peft_codec.config_value(config, "r", 32, "int", low=1))

    def alpha(self, config, module):
        return None

    def torch_shape(self, parts):
        return None, None

    def state(self, parts, p_in, p_out, module):
        idx = np.asarray(parts["shira_indices"], np.float64).astype(np.int64)
        n_in, n_out = len(p_in), len(p_out)
        if idx.size and (idx[0].max() >= n_out or idx[1].max() >= n_in):
            raise ValueError(f"PEFT adapter module {module!r}: shira_indices reach entry "
                             f"({idx[0].max()}, {idx[1].max()}) of a {n_out}x{n_in} weight.")
        if len({(int(o), int(i)) for o, i in idx.T}) != idx.shape[1]:
            raise ValueError(f"PEFT adapter module {module!r}: shira_indices repeat an entry.")
        # torch (output o, input i) -> the matrix view's (row, column)
        inv_in, inv_out = np.argsort(p_in), np.argsort(p_out)
        return {"shira_index": np.stack([inv_in[idx[1]], inv_out[idx[0]]]).astype(np.int32),
                "shira_weight": np.asarray(parts["shira_weight"], np.float32)}

    # -- writing ------------------------------------------------------
    def export_entry(self, adapter, where):
        state = {"shira_index": np.asarray(ops.convert_to_numpy(adapter.shira_index)),
                 "shira_weight": adapter.read(adapter.shira_weight)}
        return {"kind": "shira", "state": state, "rank": adapter.rank, "alpha": 1.0,
                "rslora": False, "seed": adapter.seed, "where": where}

    def check_entries(self, entries):
        ranks = {e["rank"] for _, e in entries}
        if len(ranks) > 1:
            raise ValueError(
                "save_peft_adapter: PEFT's SHiRA has one r for every module; the model's "
                f"SHiRA layers have r in {sorted(ranks)}."
            )
        for target, e in entries:
            g = target.geometry
            if e["rank"] * (g.n_in + g.n_out) > g.n_in * g.n_out:
                raise ValueError(
                    f"save_peft_adapter: layer {e['where']!r} is a {g.matrix_text()} kernel, "
                    f"where r={e['rank']} trains every entry; PEFT's SHiRA refuses "
                    "r (n_in + n_out) > n_in n_out."
                )

    def write_module(self, name, group, layouts, n_in, n_out, whole):
        if not whole:
            raise ValueError(f"save_peft_adapter: module {name!r} is split over several "
                             "Keras layers, and a SHiRA update cannot be split.")
        (p_in, p_out), entry = layouts[0], group[0][1]
        idx = entry["state"]["shira_index"].reshape(2, -1)
        torch_idx = np.stack([np.asarray(p_out)[idx[1]], np.asarray(p_in)[idx[0]]]).astype(np.int32)
        return ({f"{name}.shira_indices": np.ascontiguousarray(torch_idx),
                 f"{name}.shira_weight": peft_codec.f32(entry["state"]["shira_weight"]).reshape(-1)},
                int(entry["rank"]), 1.0)

    def config(self, entries, common, rank, alpha):
        if common.get("fan_in_fan_out"):
            raise ValueError("save_peft_adapter: PEFT's SHiRA adapts torch nn.Linear layers "
                             "only; this model's weights are stored (n_in, n_out) (fan_in_fan_out).")
        seeds = {e["seed"] for _, e in entries}
        common = {k: v for k, v in common.items() if k not in ("rank_pattern", "alpha_pattern")}
        return {
            "peft_type": self.peft_type, **common,
            "mask_type": "random",
            "random_seed": seeds.pop() if len(seeds) == 1 else None,
            "init_weights": True,
            "modules_to_save": None,
        }


@registry.method(
    "SHiRA: a trained sparse update on r·(n_in + n_out) fixed random entries of the kernel",
    trainable_count=lambda g, o: g.n_shared * entry_count(o["rank"], g.n_in, g.n_out),
    reference=reference_merged,
    peft=ShiraFormat(),
    paper="https://arxiv.org/abs/2406.13175",
)
@keras.saving.register_keras_serializable(package="keras_lowrank")
class SHiRA(Adapter):
    """Sparse high-rank adapter (arXiv 2406.13175; PEFT's SHiRA).

    `K' = K + S`: `S` is zero except on `r (n_in + n_out)` fixed entries of
    the matrix view (`shira_index: (2, |Ω|)`, input row then output column;
    at most every entry), whose values `shira_weight: (|Ω|,)` train (zero
    at the start). The entries are PEFT's random mask, drawn with NumPy
    from `seed` (per slice `seed + i` on a batched kernel), and are saved
    with the adapter. The parameters of a rank-r LoRA, an update of any
    rank.

    Args:
        layer: the `Dense`/`EinsumDense` to adapt.
        rank: `r`, which sets the number of entries (PEFT's `r`, default
            32); at most `min(n_in, n_out)`.
        seed: seed of the random mask (PEFT's `random_seed`; `None`: drawn
            from NumPy's global generator).
        train_bias, activation, merged, enabled: see `Adapter`.

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> layer = keras_lowrank.layers.SHiRA(keras.layers.Dense(16), rank=2, seed=0)
        >>> tuple(layer(np.ones((3, 16), "float32")).shape)
        (3, 16)
        >>> layer.trainable_count()  # r (n_in + n_out), as a rank-r LoRA
        64
        >>> _ = layer.shira_weight.assign(np.random.default_rng(0).normal(size=64))
        >>> d = np.asarray(keras.ops.convert_to_numpy(layer.delta_matrix()))
        >>> int((d != 0).sum()), int(np.linalg.matrix_rank(d)) > 2  # sparse, not rank 2
        (64, True)
    """

    method = "shira"
    #: rank <= min(n_in, n_out): beyond it, every entry trains anyway
    rank_bounded = True
    OPTIONS = (
        opt.Option("rank", 32, opt.positive_int,
                   "r: the update has r·(n_in + n_out) entries (PEFT's r), not rank r"),
    ) + Adapter.OPTIONS

    def entries(self, geometry):
        return entry_count(self.rank, geometry.n_in, geometry.n_out)

    def rank_warnings(self, geometry):
        n, full = self.rank * (geometry.n_in + geometry.n_out), geometry.n_in * geometry.n_out
        if n > full and self.rank <= geometry.rank_limit:
            return [f"rank={self.rank} asks for {n} SHiRA entries of a {geometry.matrix_text()} "
                    f"kernel, which has {full}: every entry trains (PEFT refuses this rank)"]
        return []

    def variable_specs(self, geometry):
        batch, n = geometry.batch_shape, self.entries(geometry)
        mask = _MaskInitializer(geometry.n_in, geometry.n_out, n, geometry.n_shared if batch else 1,
                                self.seed)
        return [
            VariableSpec("shira_index", batch + (2, n), mask, trainable=False, dtype="int32"),
            VariableSpec("shira_weight", batch + (n,), "zeros"),
        ]

    # Adapter files hold float tensors: the indices go as float32 (exact:
    # every index is below 2**24, as PEFT writes them on Windows)
    def file_tensors(self):
        g = self.geometry
        if max(g.n_in, g.n_out) > 2**24:
            raise ValueError(f"Layer {self.name!r}: a {g.matrix_text()} kernel has indices above "
                             "2**24, which an adapter file's float32 tensors cannot hold exactly.")
        out = dict(self.file_state())
        out["shira_index"] = ops.cast(self.shira_index.value, "float32")
        return out

    def load_file_tensors(self, tensors):
        index = np.asarray(ops.convert_to_numpy(tensors["shira_index"]))
        g = self.geometry
        if (not np.all(index == np.round(index)) or index.min(initial=0) < 0
                or index[..., 0, :].max(initial=0) >= g.n_in or index[..., 1, :].max(initial=0) >= g.n_out):
            raise ValueError(f"Layer {self.name!r}: the file's shira_index is not a set of entries "
                             f"of its {g.matrix_text()} kernel.")
        for name, var in self.file_state().items():
            var.assign(index.astype("int32") if name == "shira_index" else tensors[name])

    # ------------------------------------------------------------------
    def _slices(self):
        return self.geometry.n_shared if self.geometry.batch_shape else 1

    def use_entries(self, rows):
        """Whether `x S` is computed from the entries (`N |Ω|` products for
        `N` rows known now) rather than through a dense `S`."""
        g = self.geometry
        n_rows = rows.shape[-2]
        return n_rows is not None and n_rows * self.shira_weight.shape[-1] <= g.n_in * g.n_out

    def sparse_rows(self, rows, weight, index):
        """`rows S` for rows `batch + (N, n_in)`, from the entries: the
        input columns at the entries' rows, times their weights, summed
        into their output columns."""
        g, s = self.geometry, self._slices()
        rows3 = ops.reshape(rows, (s, -1, g.n_in))
        idx = ops.reshape(index, (s, 2, -1))
        n = idx.shape[-1]
        n_rows = ops.shape(rows3)[1]
        take = ops.broadcast_to(ops.expand_dims(idx[:, 0, :], 1), (s, n_rows, n))
        h = ops.take_along_axis(rows3, take, axis=-1) * ops.reshape(weight, (s, 1, n))
        h = ops.reshape(ops.transpose(h, (0, 2, 1)), (s * n, -1))  # (S·|Ω|, N)
        offsets = ops.expand_dims(ops.arange(s, dtype="int32") * g.n_out, -1)
        out = ops.segment_sum(h, ops.reshape(idx[:, 1, :] + offsets, (-1,)), num_segments=s * g.n_out)
        out = ops.transpose(ops.reshape(out, (s, g.n_out, -1)), (0, 2, 1))
        return ops.reshape(out, ops.shape(rows)[:-1] + (g.n_out,))

    def dense_update(self, weight, index):
        """`S` as a dense `batch + (n_in, n_out)` matrix (a scatter of the
        entries; traceable and differentiable)."""
        g, s = self.geometry, self._slices()
        idx = ops.reshape(index, (s, 2, -1))
        offsets = ops.expand_dims(ops.arange(s, dtype="int32") * (g.n_in * g.n_out), -1)
        flat = ops.reshape(idx[:, 0, :] * g.n_out + idx[:, 1, :] + offsets, (-1,))
        d = ops.segment_sum(ops.reshape(weight, (-1,)), flat, num_segments=s * g.n_in * g.n_out)
        return ops.reshape(d, g.batch_shape + (g.n_in, g.n_out))

    def adapter_output(self, x, y, training):
        rows = self.geometry.inputs_to_rows(x)
        weight = ops.cast(self.shira_weight, rows.dtype)
        index = ops.convert_to_tensor(self.shira_index.value)
        if self.use_entries(rows):
            out = self.sparse_rows(rows, weight, index)
        else:
            out = ops.matmul(rows, self.dense_update(weight, index))
        return self.add_rows(x, y, out)

    def delta_matrix(self):
        return self.dense_update(self.read(self.shira_weight), ops.convert_to_tensor(self.shira_index.value))
