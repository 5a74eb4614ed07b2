"""LoRA with different training dynamics: LoRA-FA (arXiv 2308.03303) and
Delta-LoRA (arXiv 2309.02411).

Both are LoRA's layer, `y = x K + b + s (x A) B`; what changes is what a
train step does.

- **LoRA-FA** keeps `A` frozen (a non-trainable variable), so the backward
  pass needs only the r-wide activation `x A` for the adapter, not `x`.
  With `correction=True` (PEFT's `LoraFAOptimizer`, the paper's v2) the
  gradient of `B` is replaced by `ĝ_B = (1/s²) pinv(AᵀA + 1e-8 I) g_B`
  before any optimizer sees it.
- **Delta-LoRA** also moves the frozen kernel by `λ s Δ(A B)` after every
  optimizer step from `start_step` on. The update telescopes,
  `K_t = K_start + λ s (A_t B_t − A_start B_start)`, so the layer computes
  it in the forward pass from a snapshot of `A, B` taken at `start_step`,
  instead of writing the kernel: the frozen kernel is never modified, which
  is also what lets it work over NF4/int8/int4 bases.

Both take effect inside the compiled train step of `model.fit` (forward
parts: see `keras_lowrank.training`), with any Keras optimizer.
"""

import keras
from keras import ops

from keras_lowrank import options as opt
from keras_lowrank import registry
from keras_lowrank import shared
from keras_lowrank import training
from keras_lowrank.adapter import Adapter
from keras_lowrank.adapter import VariableSpec
from keras_lowrank.methods.lora import ALPHA
from keras_lowrank.methods.lora import DROPOUT
from keras_lowrank.methods.lora import INITS
from keras_lowrank.methods.lora import RANK
from keras_lowrank.methods.lora import RSLORA
from keras_lowrank.methods.lora import LoRA
from keras_lowrank.methods.lora import lora_a_initializer
from keras_lowrank.methods import reference

#: the ridge PEFT adds to AᵀA before the pseudo-inverse
RIDGE = 1e-8


def pinv_psd(m):
    """Pseudo-inverse of a batch of symmetric positive semi-definite
    matrices, with `torch.linalg.pinv`'s default cutoff (singular values
    below `max(m, n) · eps · σ_max` are dropped), in float32."""
    m = ops.cast(m, "float32")
    w, q = ops.eigh(m)
    n = m.shape[-1]
    cutoff = n * 1.1920929e-07 * ops.max(ops.abs(w), axis=-1, keepdims=True)
    inv = ops.where(ops.abs(w) > cutoff, 1.0 / ops.where(w == 0, 1.0, w), 0.0)
    return ops.matmul(q * ops.expand_dims(inv, -2), ops.swapaxes(q, -1, -2))


def corrected(b, a_t, scaling):
    """`B` whose gradient is LoRA-FA's `ĝ_B = (1/s²) pinv(AᵀA + εI) g_B`.

    `sg(B) + P (B − sg(B))` has the value of `B` (bit for bit: the second
    term is exactly zero) and, `P` being symmetric, the gradient `P g_B`:
    the correction happens inside the backward pass of any train step,
    under any optimizer."""
    a_t = ops.cast(ops.stop_gradient(a_t), "float32")
    gram = ops.matmul(a_t, ops.swapaxes(a_t, -1, -2))  # AᵀA: (r, r)
    eye = ops.eye(gram.shape[-1], dtype="float32")
    p = ops.stop_gradient(pinv_psd(gram + RIDGE * eye) / (scaling**2))
    fixed = ops.stop_gradient(b)
    return fixed + ops.matmul(ops.cast(p, b.dtype), b - fixed)


def reference_delta_lora(adapter, w):
    """Delta-LoRA: `K_t + s A B` with `K_t = K + λ s (A B − A_start B_start)`
    once the step count is past `start_step`."""
    ab = reference.factor_a(adapter) @ reference.value(adapter, "lora_b")
    out = w + adapter.scaling * ab
    steps = int(ops.convert_to_numpy(adapter.shared_state().steps))
    if steps > adapter.start_step:
        ab0 = reference.factor_a(adapter, "delta_a0") @ reference.value(adapter, "delta_b0")
        out = out + adapter.update_ratio * adapter.scaling * (ab - ab0)
    return out


@registry.method(
    "LoRA-FA: LoRA with A frozen (only B trains), optional v2 gradient correction",
    trainable_count=lambda g, o: g.n_shared * o["rank"] * g.n_out,
    reference=reference.lora,
)
@keras.saving.register_keras_serializable(package="keras_lowrank")
class LoRAFA(LoRA):
    """LoRA-FA: LoRA with a frozen, random `A` (arXiv 2308.03303).

    Only `B` (`r · n_out` per matrix) trains. `A` is a non-trainable
    variable, so the backward pass keeps the r-wide activation `x A`, not the
    layer input. With `correction=True` (default; PEFT's
    `create_lorafa_optimizer`, the paper's v2) `B`'s gradient becomes
    `(1/s²) pinv(AᵀA + 1e-8 I) g_B`, the closest low-rank step to full
    fine-tuning's, before the optimizer (any Keras optimizer) sees it;
    `correction=False` is the paper's v1. Merges and exports as LoRA.

    Takes `LoRA`'s arguments (`layer`, `rank`, `alpha`, `rslora`, `init`, `dropout`, `train_bias`,
    `seed`, `activation`, `merged` and `enabled`), and:

    Args:
        correction: apply the v2 gradient correction to `B`.

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, name="hidden"),
        ...                           keras.layers.Dense(4, name="out")])
        >>> summary = keras_lowrank.enable_adapter(model, method="lora_fa", rank=2)
        >>> summary.adapter_params  # B of "hidden" only (the head is left out): 2 * 16
        32
    """

    method = "lora_fa"
    training_parts = (
        training.TrainingPart(
            "forward", "with correction=True, B's gradient becomes (1/s²) pinv(AᵀA + 1e-8 I) g_B"
        ),
    )
    OPTIONS = LoRA.OPTIONS + (
        opt.Option("correction", True, opt.boolean, "v2 gradient correction of B (PEFT's LoraFAOptimizer)"),
    )

    @classmethod
    def serves_kernel_with(cls, options):
        # the v2 correction of B's gradient happens where the layer is called
        return not options.get("correction", True)

    def variable_specs(self, geometry):
        batch, n_in, n_out, r = geometry.batch_shape, geometry.n_in, geometry.n_out, self.rank
        a_init = lora_a_initializer(self.init, n_in, r, self.seed)
        return [
            VariableSpec("lora_a", batch + (r, n_in), a_init, trainable=False),
            VariableSpec("lora_b", batch + (r, n_out), "zeros"),
        ]

    def adapter_output(self, x, y, training):
        x = self.adapter_input(x, training)
        b = self.lora_b
        if training and self.correction:
            b = corrected(_tensor(b), _tensor(self.lora_a), self.scaling)
        return self.add_lowrank(x, y, self.lora_a, b, self.scaling)


def _tensor(var):
    return ops.convert_to_tensor(var)


# ----------------------------------------------------------------------
# Delta-LoRA
@keras.saving.register_keras_serializable(package="keras_lowrank")
class DeltaLoRAState(shared.SharedState):
    """Delta-LoRA's step counter: `steps`, the number of training forward
    passes of the model so far (one per train step), advanced once per
    forward pass before any layer runs."""

    method = "delta_lora"

    @classmethod
    def config_for(cls, layer_plans, where):
        return {}

    def build_state(self):
        self.steps = self.add_weight(
            name="steps", shape=(), dtype="int32", trainable=False, initializer="zeros"
        )

    def initialize(self):
        self.steps.assign(0)

    def begin_call(self, training):
        if training:
            self.steps.assign_add(1)

    def file_state(self):
        return {"steps": self.steps}


@registry.method(
    "Delta-LoRA: LoRA whose frozen kernel also moves by λ s Δ(AB) per step",
    reference=reference_delta_lora,
)
@keras.saving.register_keras_serializable(package="keras_lowrank")
class DeltaLoRA(LoRA):
    """Delta-LoRA: LoRA whose frozen kernel also moves by `λ s Δ(A B)`
    after every optimizer step from `start_step` on (arXiv 2309.02411).

    The kernel in effect at train step `t` is
    `K_t = K + λ s (A_t B_t − A_start B_start)` for `t >= start_step`
    (and `K` before): the paper's per-step update
    `K_{t+1} = K_t + λ s (A_{t+1} B_{t+1} − A_t B_t)`, summed. The layer
    snapshots `A, B` (`delta_a0`, `delta_b0`) at step `start_step` and adds
    the telescoped term in its forward pass, without a gradient: `A` and `B`
    get exactly LoRA's gradients, and the frozen kernel variable is never
    written, so the method works over quantized bases too. The step is the
    model's count of training forward passes (`DeltaLoRAState.steps`, saved
    with the model). Dropout must be 0 (the paper removes it, so that the
    gradient of `A B` is the kernel's). Merging folds
    `s A B + λ s (A B − A_start B_start)` exactly.

    Takes `LoRA`'s arguments (`layer`, `rank`, `alpha`, `rslora`, `init`,
    `train_bias`, `seed`, `activation`, `merged` and `enabled`), and:

    Args:
        update_ratio: `λ` (the paper's 2).
        start_step: the train step from which the kernel moves (the
            paper's "a few hundred", 500).
        dropout: must be 0.

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> def make():
        ...     return keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, name="hidden"),
        ...                              keras.layers.Dense(4, name="out")])
        >>> model = make()
        >>> _ = keras_lowrank.enable_adapter(model, method="delta_lora", rank=2, start_step=1)
        >>> model.compile(optimizer="adam", loss="mse")
        >>> x, y = np.ones((8, 8), "float32"), np.zeros((8, 4), "float32")
        >>> _ = model.fit(x, y, batch_size=4, epochs=2, verbose=0)
        >>> model.get_layer("hidden").kernel_shift() is not None  # the kernel moved
        True
        >>> keras_lowrank.enable_adapter(make(), method="delta_lora", dropout=0.1)
        Traceback (most recent call last):
        ...
        ValueError: ...dropout=0.1...
    """

    method = "delta_lora"
    model_state = DeltaLoRAState
    training_parts = (
        training.TrainingPart("model_call", "the model's train-step counter advances once per step"),
        training.TrainingPart(
            "forward",
            "snapshot of A, B at start_step; from then on the kernel in effect is "
            "K + λ s (A B − A_start B_start)",
        ),
    )
    #: each training step moves the kernel where the layer is called
    serves_kernel = False
    OPTIONS = (
        RANK,
        ALPHA,
        DROPOUT,
        RSLORA,
        opt.Option("init", "kaiming", opt.choice(*INITS), "init of A: PEFT's kaiming-uniform or gaussian"),
        opt.Option("update_ratio", 2.0, opt.positive_float, "λ: the kernel moves by λ s Δ(AB) per step"),
        opt.Option("start_step", 500, opt.nonneg_int, "the train step from which the kernel moves"),
    ) + Adapter.OPTIONS

    def validate_options(self):
        super().validate_options()
        if self.dropout != 0:
            raise ValueError(
                f"Layer {self.name!r}: Delta-LoRA needs dropout=0 (received "
                f"dropout={self.dropout!r}): the paper removes dropout so that the "
                "gradient of A B is the kernel's, which the kernel update relies on."
            )

    def standalone_state(self, geometry):
        return DeltaLoRAState({})

    def variable_specs(self, geometry):
        batch, n_in, n_out, r = geometry.batch_shape, geometry.n_in, geometry.n_out, self.rank
        return super().variable_specs(geometry) + [
            VariableSpec("delta_a0", batch + (r, n_in), "zeros", trainable=False),
            VariableSpec("delta_b0", batch + (r, n_out), "zeros", trainable=False),
        ]

    def _steps(self):
        state = self.shared_state()
        return ops.convert_to_tensor(state.steps) if state is not None else ops.convert_to_tensor(0, "int32")

    def adapter_output(self, x, y, training):
        rows = self.geometry.inputs_to_rows(x)
        a, b = _tensor(self.lora_a), _tensor(self.lora_b)
        a0, b0 = _tensor(self.delta_a0), _tensor(self.delta_b0)
        steps = self._steps()
        if training:
            t = steps - 1  # this step's index: `steps` already counts it
            now = ops.equal(t, self.start_step)
            a0 = ops.where(now, ops.stop_gradient(a), a0)
            b0 = ops.where(now, ops.stop_gradient(b), b0)
            self.delta_a0.assign(a0)
            self.delta_b0.assign(b0)
            gate = t >= self.start_step
        else:
            gate = steps > self.start_step
        s = self.scaling
        ls = ops.cast(gate, "float32") * (self.update_ratio * s)
        dtype = rows.dtype
        u = ops.matmul(ops.matmul(rows, ops.swapaxes(ops.cast(a, dtype), -1, -2)), ops.cast(b, dtype))
        u0 = ops.matmul(ops.matmul(rows, ops.swapaxes(ops.cast(a0, dtype), -1, -2)), ops.cast(b0, dtype))
        ls = ops.cast(ls, dtype)
        # y + s u + λ s (sg(u) − u0)
        return self.add_negated_rows(x, y, u * (-s) - ls * (ops.stop_gradient(u) - u0))

    def kernel_shift(self):
        """`λ s (A B − A_start B_start)` once the kernel moves (else 0):
        what the paper's updates have added to the kernel so far."""
        steps = int(ops.convert_to_numpy(self._steps()))
        if steps <= self.start_step:
            return None
        ab = ops.matmul(self.factor_a(), self.read(self.lora_b))
        ab0 = ops.matmul(ops.swapaxes(self.read(self.delta_a0), -1, -2), self.read(self.delta_b0))
        return (self.update_ratio * self.scaling) * (ab - ab0)

    def delta_matrix(self):
        d = super().delta_matrix()
        shift = self.kernel_shift()
        return d if shift is None else d + shift

    def as_lora_state(self):
        if self.kernel_shift() is not None:
            raise ValueError(
                f"Layer {self.name!r}: this Delta-LoRA adapter has moved its kernel "
                "(it trained past start_step), which a plain LoRA cannot express; "
                "save it as it is or merge it."
            )
        return super().as_lora_state()
