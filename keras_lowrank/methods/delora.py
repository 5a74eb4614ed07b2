"""DeLoRA: decoupled low-rank adaptation (Bini et al., ICLR 2025, arXiv
2503.18225; PEFT's DeLoRA).

A rank-r update whose direction and strength are trained apart. Each of the
`r` rank-one terms `A_kᵀ B_k` is normalized, so the update's size is set by
one trainable scalar, `λ` (the variable `bound`, PEFT's `delora_lambda`;
the option `delora_lambda` is its starting value), and is tied to the size of the
frozen weight. In the matrix view `K: (n_in, n_out)`, with `A: (r, n_in)`
(`delora_a`, PEFT's `delora_A`) and `B: (r, n_out)` (`delora_b`, PEFT's
`delora_B` transposed):

    ΔK = diag(‖K_i‖) Aᵀ diag(λ / (r ‖A_k‖ ‖B_k‖)) B

where `‖K_i‖` is the norm of input row `i` of the base kernel (PEFT's
`delora_w_norm`: the norms of the torch weight's columns), taken once when
the adapter is created and stored with it (a non-trainable variable, saved
in adapter files and PEFT directories), and `‖A_k‖`, `‖B_k‖` the norms of
the rank-`k` vectors, each floored at 1e-4 as PEFT does. The Frobenius norm
of `ΔK` is at most `|λ| · max_i ‖K_i‖`: the bound that keeps the fine-tuned
layer near the base one.

The forward never builds `ΔK`: the input is scaled by the stored norms,
multiplied by `A`, scaled by the `r` factors and multiplied by `B` (PEFT's
order; here the norms are folded into `A` and the factors into `B`). Init as
PEFT's: `A` Kaiming-uniform, `B = 0` (a no-op), `λ = delora_lambda`. Over a
quantized base the stored norms are the dequantized kernel's. The update is
additive: merge `K' = K + ΔK`, exact, and unmerge subtracts it;
`save_adapter(..., as_lora=True)` writes the exact rank-r LoRA.
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

#: PEFT's floor of the rank vectors' norms
NORM_FLOOR = 1e-4


def _safe_norm(m, axis=-1):
    """`max(‖m‖, 1e-4)` along `axis`, with a finite gradient at zero (the
    floor is applied to the square, so no `sqrt(0)` is differentiated)."""
    return ops.sqrt(ops.maximum(ops.sum(ops.square(m), axis=axis), NORM_FLOOR**2))


def reference_merged(adapter, w):
    """DeLoRA: `W + diag(w_norm) Aᵀ diag(λ / (r ‖A_k‖ ‖B_k‖)) B`, norms
    floored at 1e-4."""
    a = reference.value(adapter, "delora_a")  # (r, n_in)
    b = reference.value(adapter, "delora_b")  # (r, n_out)
    lam = reference.value(adapter, "bound")
    w_norm = reference.value(adapter, "delora_w_norm")
    a_n = np.maximum(np.linalg.norm(a, axis=-1), NORM_FLOOR)
    b_n = np.maximum(np.linalg.norm(b, axis=-1), NORM_FLOOR)
    factor = lam / adapter.rank / (a_n * b_n)  # (r,)
    delta = (w_norm[..., :, None] * np.swapaxes(a, -1, -2)) @ (factor[..., :, None] * b)
    return w + delta


def _refuse_fan_in_fan_out(common, name):
    """PEFT's MiSS or DeLoRA adapts `nn.Linear` weights `(n_out, n_in)` only."""
    if common.get("fan_in_fan_out"):
        raise ValueError(
            f"save_peft_adapter: these modules store their weight (n_in, n_out) (GPT-2's Conv1D), "
            f"and PEFT's {name} adapts torch Linear layers only."
        )


# ----------------------------------------------------------------------
# PEFT's format
_PARTS = ("delora_A", "delora_B", "delora_lambda", "delora_w_norm")


class DeloraFormat(peft_codec.Format):
    """PEFT's `DELORA` adapter type: each module's `delora_A (r, n_in)`,
    `delora_B (n_out, r)`, `delora_lambda (1,)` and the stored norms
    `delora_w_norm (n_in,)`, read into `delora` and written from it; ranks
    per module through `rank_pattern`. `delora_lambda` in the config is
    only λ's starting value (the trained one is in the weights). A weight
    that KerasHub's converter splits over several layers is refused (the
    norms of `B` run over all of its outputs)."""

    peft_type = "DELORA"
    parts = _PARTS
    splittable = False
    writes = ("delora",)

    def method(self, config):
        return "delora"

    def options(self, config):
        return {"delora_lambda": float(peft_codec.config_value(config, "delora_lambda", 15, "number")),
                "dropout": peft_codec.dropout_value(config, "module_dropout")}

    def check_parts(self, parts, module, config):
        a = peft_codec.matrix(parts, "delora_A", module)
        b = peft_codec.matrix(parts, "delora_B", module)
        lam, norm = parts["delora_lambda"], parts["delora_w_norm"]
        peft_codec.same(module, ("delora_A rows", a.shape[0]), ("delora_B columns", b.shape[1]))
        if lam.size != 1:
            raise ValueError(f"PEFT adapter module {module!r}: delora_lambda has shape {lam.shape}; "
                             "one value was expected.")
        if norm.ndim != 1:
            raise ValueError(f"PEFT adapter module {module!r}: delora_w_norm has shape {norm.shape}; "
                             "one norm per input was expected.")
        peft_codec.same(module, ("delora_A columns", a.shape[1]), ("delora_w_norm size", norm.shape[0]))

    def rank(self, config, module, parts):
        r = int(parts["delora_A"].shape[0])
        expected = int(peft_codec.pattern_value(config.get("rank_pattern"), module, config.get("r", 8)))
        if expected != r:
            raise ValueError(f"PEFT adapter module {module!r}: rank {r} in the weights, "
                             f"{expected} in the config.")
        return r

    def alpha(self, config, module):
        return None  # DeLoRA's scale is its trained lambda

    def torch_shape(self, parts):
        return parts["delora_B"].shape[0], parts["delora_A"].shape[1]

    def state(self, parts, p_in, p_out, module):
        return {"delora_a": parts["delora_A"][:, p_in],
                "delora_b": parts["delora_B"].T[:, p_out],
                "bound": parts["delora_lambda"].reshape(1),
                "delora_w_norm": parts["delora_w_norm"][p_in]}

    # -- writing ------------------------------------------------------
    def export_entry(self, adapter, where):
        state = {name: adapter.read(var) for name, var in adapter.adapter_variables().items()}
        return {"kind": "delora", "state": state, "rank": adapter.rank, "alpha": 1.0, "rslora": False,
                "options": {"dropout": adapter.dropout, "delora_lambda": adapter.delora_lambda},
                "where": where}

    def check_entries(self, entries):
        first = entries[0][1]["options"]
        for _, e in entries:
            if e["options"]["dropout"] != first["dropout"]:
                raise ValueError(
                    "save_peft_adapter: PEFT's DeLoRA has one module_dropout for every module; "
                    f"layer {e['where']!r} has dropout={e['options']['dropout']}, another "
                    f"{first['dropout']}."
                )

    def write_module(self, name, group, layouts, n_in, n_out, whole):
        if not whole:
            raise ValueError(f"save_peft_adapter: module {name!r} is split over several "
                             "Keras layers, and a DeLoRA update cannot be split (B's norms "
                             "run over all outputs).")
        (_, entry), (p_in, p_out) = group[0], layouts[0]
        state, r = entry["state"], int(entry["rank"])
        a = np.zeros((r, n_in), np.float32)
        a[:, p_in] = peft_codec.f32(state["delora_a"]).reshape(r, n_in)
        b = np.zeros((n_out, r), np.float32)
        b[p_out, :] = peft_codec.f32(state["delora_b"]).reshape(r, n_out).T
        norm = np.zeros((n_in,), np.float32)
        norm[p_in] = peft_codec.f32(state["delora_w_norm"]).reshape(n_in)
        return {f"{name}.delora_A": a, f"{name}.delora_B": b,
                f"{name}.delora_lambda": peft_codec.f32(state["bound"]).reshape(1),
                f"{name}.delora_w_norm": norm}, r, 1.0

    def config(self, entries, common, rank, alpha):
        first = entries[0][1]["options"]
        _refuse_fan_in_fan_out(common, "DeLoRA")
        common = {k: v for k, v in common.items() if k not in ("alpha_pattern", "fan_in_fan_out")}
        return {
            "peft_type": self.peft_type, **common,
            "delora_lambda": first["delora_lambda"],
            "lambda_pattern": {},
            "module_dropout": float(first["dropout"]),
            "bias": "none",
            "modules_to_save": None,
            "init_weights": True,
        }


DELORA_FORMAT = DeloraFormat()


def _kaiming(fan_in, seed):
    """PyTorch's `kaiming_uniform_(a=sqrt(5))`: `U(±1/sqrt(fan_in))`."""
    bound = 1.0 / math.sqrt(fan_in)
    return keras.initializers.RandomUniform(-bound, bound, seed=seed)


@registry.method(
    "DeLoRA: normalized rank-one terms scaled by a trained bound lambda and the base's input norms",
    trainable_count=lambda g, o: g.n_shared * (o["rank"] * (g.n_in + g.n_out) + 1),
    reference=reference_merged,
    peft=DELORA_FORMAT,
    paper="https://arxiv.org/abs/2503.18225",
)
@keras.saving.register_keras_serializable(package="keras_lowrank")
class DeLoRA(Adapter):
    """Decoupled low-rank adaptation (arXiv 2503.18225; PEFT's DeLoRA).

    `ΔK = diag(w_norm) Aᵀ diag(λ / (r ‖A_k‖ ‖B_k‖)) B`, with `delora_a = A:
    (r, n_in)`, `delora_b = B: (r, n_out)`, the trainable scalar
    `bound = λ` (PEFT's `delora_lambda`), and `delora_w_norm` the norms of the base kernel's
    input rows, stored when the adapter is made (not trained). Each rank-one
    term is normalized, so `λ` alone sets the size of the update: its
    Frobenius norm is at most `|λ| · max(w_norm)`.

    Args:
        layer: the layer to adapt.
        rank: the rank `r` (PEFT's `r`, default 8).
        delora_lambda: λ's starting value (PEFT's `delora_lambda`, default 15).
        dropout: dropout rate on the adapter's input (PEFT's `module_dropout`).
        train_bias, seed, activation, merged, enabled: see `Adapter`.

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> layer = keras_lowrank.layers.DeLoRA(keras.layers.Dense(6), rank=2)
        >>> tuple(layer(np.ones((3, 5), "float32")).shape)
        (3, 6)
        >>> layer.trainable_count()  # r (n_in + n_out) + 1 (lambda)
        23
        >>> _ = layer.delora_b.assign(np.random.default_rng(0).normal(size=(2, 6)))
        >>> d = np.asarray(keras.ops.convert_to_numpy(layer.delta_matrix()))
        >>> w_norm = np.linalg.norm(np.asarray(layer.layer.kernel), axis=1)
        >>> bool(np.linalg.norm(d) <= 15.0 * w_norm.max())  # the bound
        True
    """

    method = "delora"
    export_forms = ("lora",)
    OPTIONS = (
        opt.Option("rank", 8, opt.positive_int, "rank r (PEFT's r)"),
        opt.Option("delora_lambda", 15.0, opt.finite_float,
                   "starting value of the trained bound lambda (PEFT's delora_lambda)"),
        DROPOUT,
    ) + Adapter.OPTIONS

    def variable_specs(self, geometry):
        batch, n_in, n_out, r = geometry.batch_shape, geometry.n_in, geometry.n_out, self.rank
        return [
            VariableSpec("delora_a", batch + (r, n_in), _kaiming(n_in, self.seed)),
            VariableSpec("delora_b", batch + (r, n_out), "zeros"),
            VariableSpec("bound", batch + (1,), keras.initializers.Constant(self.delora_lambda)),
            # the base's input-row norms, taken once (`initialize_from_base`)
            VariableSpec("delora_w_norm", batch + (n_in,), "ones", trainable=False),
        ]

    def initialize_from_base(self):
        w = self.base_matrix()
        self.delora_w_norm.assign(ops.sqrt(ops.sum(ops.square(w), axis=-1)))

    # ------------------------------------------------------------------
    def factors(self, a, b, lam, w_norm):
        """`(A ⊙ w_norm, diag(λ / (r ‖A_k‖ ‖B_k‖)) B)`: the two factors of
        `ΔK = (A ⊙ w_norm)ᵀ (…) B`, the `r` scales folded into `B` (whose
        rows they normalize: each entry stays below `|λ| / (r ‖A_k‖)`, in
        range in half precision, where `1 / ‖B_k‖` alone is not)."""
        factor = lam / self.rank / (_safe_norm(a) * _safe_norm(b))  # (…, r)
        return a * ops.expand_dims(w_norm, -2), b * ops.expand_dims(factor, -1)

    def adapter_output(self, x, y, training):
        x_in = self.adapter_input(x, training)
        a_t, b = self.factors(*(ops.cast(v, "float32") for v in (
            self.delora_a, self.delora_b, self.bound, self.delora_w_norm)))
        return self.add_lowrank(x_in, y, a_t, b, 1.0)

    def delta_matrix(self):
        a_t, b = self.factors(*(self.read(v) for v in (
            self.delora_a, self.delora_b, self.bound, self.delora_w_norm)))
        return ops.matmul(ops.swapaxes(a_t, -1, -2), b)

    def as_lora_state(self):
        """The update as an exact LoRA of rank `r` (scale 1): `A ⊙ w_norm`
        and `diag(λ / (r ‖A_k‖ ‖B_k‖)) B`."""
        a_t, b = self.factors(*(self.read(v) for v in (
            self.delora_a, self.delora_b, self.bound, self.delora_w_norm)))
        return {"lora_a": a_t, "lora_b": b}, {"rank": self.rank, "alpha": float(self.rank), "rslora": False}
