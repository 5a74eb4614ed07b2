"""AdaLoRA: an SVD-shaped update whose rank budget moves to where it
matters (arXiv 2303.10512).

Each adapted matrix holds `ΔK = c · A diag(λ) B` with `A: (n_in, r)`
(stored transposed, `lora_a: (r, n_in)`, PEFT's `lora_A`), `λ: (r,)`
(`lora_e`) and `B: (r, n_out)` (`lora_b`, PEFT's `lora_Bᵀ`), where
`c = alpha / (r + 1e-5)`. Training adds three things, all inside the
compiled train step of `model.fit`, with any Keras optimizer:

- the orthogonality regularizer `γ · mean over matrices of ‖AᵀA − I‖_F,
  ‖B Bᵀ − I‖_F` (un-squared, as both reference codes), added to the loss by
  each layer (`add_loss`) in training mode;
- after every optimizer step, the importance of every entry of `A, λ, B`,
  `I = |w · ∂L/∂w|`, smoothed into the sensitivity and uncertainty EMAs
  (`β1`, `β2`); a component's score is
  `S_i = s(λ_i) + mean_j s(A[j, i]) + mean_j s(B[i, j])` with `s = Ī · Ū`;
- the cubic budget schedule (`tinit`, `tfinal`, `total_steps`, `delta_t`):
  every `delta_t` steps the components below the global `b(t)`-th best
  score get `λ_i = 0` (they may regrow until the next mask); at
  `total_steps − tfinal` the final mask is stored (the *rank pattern*),
  the EMAs are reset, and from then on the stored mask is re-applied after
  every step.

The importance, the schedule and the masking are an `OptimizerHook`
(`RankAllocator`): `model.compile` wraps the user's optimizer
(`keras_lowrank.training.AdapterOptimizer`), and the EMAs and the stored
mask are that optimizer's variables, saved in `.keras` files with it, so a
reloaded model resumes mid-schedule. This follows PEFT's
`update_and_allocate(step)` step for step, without the call a user has to
remember. The step is the optimizer's `iterations` (0-based, the step just
taken), as PEFT's loop counter.

`rank_report(model)` shows the rank each matrix keeps. An adapter file keeps
only the components whose `λ` is nonzero (the rank pattern, after the final
mask), so it shrinks with the budget and loads back exactly.
"""

import functools
import math

import keras
import numpy as np
from keras import ops

from keras_lowrank import options as opt
from keras_lowrank import registry
from keras_lowrank import shared
from keras_lowrank import training
from keras_lowrank import tree
from keras_lowrank import peft_codec
from keras_lowrank.adapter import Adapter
from keras_lowrank.adapter import VariableSpec
from keras_lowrank.methods.lora import ALPHA
from keras_lowrank.methods.lora import check_init as check_lora_init
from keras_lowrank.methods.lora import DROPOUT
from keras_lowrank.methods import reference

#: what users call (the rest is the method's machinery)
__all__ = ["RankReport", "rank_report"]

#: the options that define the one budget schedule all AdaLoRA layers of a
#: model share
SCHEDULE = ("target_rank", "tinit", "tfinal", "total_steps", "delta_t", "beta1", "beta2", "orth_reg_weight")


# ----------------------------------------------------------------------
# The budget schedule (PEFT's `RankAllocator.budget_schedule`)
def budget(step, init_budget, target_budget, tinit, tfinal, total_steps):
    """`(b(step), mask_now)` exactly as PEFT computes them, in Python
    (float64): `b0` up to `tinit`, then
    `int((b0 − bT) (1 − (t − tinit)/(T − tfinal − tinit))³ + bT)`, then `bT`
    after `T − tfinal`. `mask_now` ignores `delta_t` (see `Schedule`)."""
    if step <= tinit:
        return init_budget, False
    if step > total_steps - tfinal:
        return target_budget, True
    mul = 1 - (step - tinit) / (total_steps - tfinal - tinit)
    return int((init_budget - target_budget) * (mul**3) + target_budget), True


@functools.lru_cache(maxsize=64)
def change_points(init_budget, target_budget, tinit, tfinal, total_steps):
    """The steps at which `budget` drops, one per unit of budget: step `t`
    of the decreasing phase has budget `b0 − #{points <= t}`. Found by
    bisection on PEFT's own float64 formula, so the compiled step gets the
    same integers as PEFT without float64 on the device."""
    lo0, hi0 = tinit + 1, total_steps - tfinal
    points = []
    for value in range(init_budget - 1, target_budget - 1, -1):
        lo, hi = lo0, hi0  # the first step whose budget is <= value
        while lo < hi:
            mid = (lo + hi) // 2
            if budget(mid, init_budget, target_budget, tinit, tfinal, total_steps)[0] <= value:
                hi = mid
            else:
                lo = mid + 1
        points.append(lo)
    return tuple(points)


def reference_merged(adapter, w):
    """AdaLoRA: `W + c A diag(λ) B`, `c = alpha / (r + 1e-5)`."""
    c = adapter.alpha / (adapter.rank + 1e-5)
    a = reference.factor_a(adapter) * reference.value(adapter, "lora_e")[..., None, :]
    return w + c * a @ reference.value(adapter, "lora_b")


class Schedule:
    """One model's AdaLoRA schedule: budgets in triplets (rank components)."""

    def __init__(self, init_budget, target_budget, tinit, tfinal, total_steps, delta_t):
        self.init_budget = int(init_budget)
        self.target_budget = int(target_budget)
        self.tinit, self.tfinal = int(tinit), int(tfinal)
        self.total_steps, self.delta_t = int(total_steps), int(delta_t)

    @property
    def final_step(self):
        """`T − tfinal`: the step of the final mask."""
        return self.total_steps - self.tfinal

    def budget(self, step):
        """`b(step)` (Python; PEFT's formula)."""
        return budget(step, self.init_budget, self.target_budget, self.tinit, self.tfinal, self.total_steps)[0]

    def budget_tensor(self, step):
        """`b(step)` as an int32 tensor, for a step tensor."""
        points = change_points(
            self.init_budget, self.target_budget, self.tinit, self.tfinal, self.total_steps
        )
        if not points:
            return ops.convert_to_tensor(self.init_budget, "int32")
        drops = ops.sum(ops.cast(ops.convert_to_tensor(np.asarray(points, "int32")) <= step, "int32"))
        return ops.where(step <= self.tinit, self.init_budget, self.init_budget - drops)


# ----------------------------------------------------------------------
# The rank allocator (PEFT's `RankAllocator` + `update_and_allocate`)
def _flat(tensors):
    return ops.concatenate([ops.reshape(ops.cast(t, "float32"), (-1,)) for t in tensors], axis=0)


def allocate(schedule, beta1, beta2, step, params, grads, ema_ipt, ema_unc, mask):
    """One step of AdaLoRA's allocation, in `keras.ops` (traceable).

    Every layer's entries are handled as one flat vector, so the step costs
    a fixed few dozen ops plus a few per layer, whatever the model.

    Args:
        schedule: a `Schedule`.
        beta1, beta2: the EMA factors.
        step: the 0-based index of the optimizer step just taken (tensor).
        params: per layer, `(a, e, b)` values after the update
            (`(..., r, n_in)`, `(..., r)`, `(..., r, n_out)`).
        grads: the step's gradients of the same (`None`: zero).
        ema_ipt, ema_unc: the EMAs of every entry, flat `(P,)`: layer after
            layer, `a`, `e`, `b` each flattened.
        mask: the stored mask, flat `(C,)`: each layer's `λ` flattened, in
            order (1 kept, 0 masked).

    Returns:
        `(e, ema_ipt, ema_unc, mask, budget)`: the new `λ` of each layer and
        the new state.
    """
    step = ops.cast(step, "int32")
    final = schedule.final_step
    p = _flat([t for layer in params for t in layer])
    g = _flat([ops.zeros_like(t) if d is None else d
               for layer, dl in zip(params, grads) for t, d in zip(layer, dl)])
    # a step with a non-finite gradient (skipped by a loss-scale optimizer)
    # leaves the allocator's state as it is
    finite = ops.all(ops.isfinite(g))
    update = ops.logical_and(step < final, finite)
    b_now = schedule.budget_tensor(step)
    decreasing = ops.logical_and(ops.logical_and(step > schedule.tinit, update),
                                 ops.equal(step % schedule.delta_t, 0))
    at_final = ops.equal(step, final)
    mask_now = ops.logical_and(ops.logical_or(decreasing, at_final), finite)
    after_final = step > final

    ipt, unc = ops.cast(ema_ipt, "float32"), ops.cast(ema_unc, "float32")
    i = ops.where(finite, ops.abs(p * g), 0.0)
    ipt2 = beta1 * ipt + (1.0 - beta1) * i
    unc2 = beta2 * unc + (1.0 - beta2) * ops.abs(i - ipt2)
    ipt2 = ops.where(update, ipt2, ipt)
    unc2 = ops.where(update, unc2, unc)
    score = ipt2 * unc2
    # the final mask resets the EMAs (PEFT's reset_ipt)
    reset = ops.logical_and(at_final, finite)
    new_ipt = ops.where(reset, ops.zeros_like(ipt2), ipt2)
    new_unc = ops.where(reset, ops.zeros_like(unc2), unc2)

    # component scores: s(λ_i) + mean_j s(A[j, i]) + mean_j s(B[i, j])
    components, offset = [], 0
    for layer in params:
        part = []
        for t in layer:
            shape = tuple(t.shape)
            n = math.prod(shape)
            part.append(ops.reshape(score[offset:offset + n], shape))
            offset += n
        s_a, s_e, s_b = part
        components.append(ops.reshape(s_e + ops.mean(s_a, axis=-1) + ops.mean(s_b, axis=-1), (-1,)))
    scores = ops.concatenate(components, axis=0)
    k = schedule.init_budget - b_now  # mask the k lowest (torch.kthvalue)
    kth = ops.take(ops.sort(scores), ops.maximum(k - 1, 0))
    threshold = ops.where(k > 0, kth, ops.convert_to_tensor(-np.inf, "float32"))
    fresh = ops.cast(scores > threshold, "float32")
    stored = ops.where(mask_now, fresh, ops.cast(mask, "float32"))
    e = _flat([layer[1] for layer in params])
    applied = ops.where(ops.logical_or(mask_now, after_final), e * stored, e)
    new_e, offset = [], 0
    for layer in params:
        shape = tuple(layer[1].shape)
        n = math.prod(shape)
        new_e.append(ops.reshape(applied[offset:offset + n], shape))
        offset += n
    return new_e, new_ipt, new_unc, stored, b_now


@keras.saving.register_keras_serializable(package="keras_lowrank")
class RankAllocator(training.OptimizerHook):
    """AdaLoRA's importance, budget and masking, run by the optimizer after
    every update (see the module docstring).

    Args:
        layers: per AdaLoRA layer, `{"path", "a", "e", "b", "shape"}`: the
            layer's path, the paths of its three variables and the shape of
            `λ` (`batch + (r,)`).
        target_rank, tinit, tfinal, total_steps, delta_t, beta1, beta2: the
            schedule (see `AdaLoRA`).
    """

    def __init__(self, layers, target_rank, tinit, tfinal, total_steps, delta_t, beta1, beta2):
        self.layers = [dict(L, shape=tuple(L["shape"])) for L in layers]
        self.target_rank, self.tinit, self.tfinal = int(target_rank), int(tinit), int(tfinal)
        self.total_steps, self.delta_t = int(total_steps), int(delta_t)
        self.beta1, self.beta2 = float(beta1), float(beta2)
        init_budget = sum(math.prod(L["shape"]) for L in self.layers)
        matrices = sum(math.prod(L["shape"][:-1]) for L in self.layers)
        self.schedule = Schedule(
            init_budget, self.target_rank * matrices, self.tinit, self.tfinal, self.total_steps, self.delta_t
        )

    def build(self, optimizer, var_list):
        by_path = {v.path: v for v in var_list}
        self.variables = []
        for L in self.layers:
            missing = [L[k] for k in "aeb" if L[k] not in by_path]
            if missing:
                raise ValueError(
                    f"AdaLoRA layer {L['path']!r}: the optimizer does not train "
                    f"{missing}; were the adapter variables frozen after compile?"
                )
            self.variables.append(tuple(by_path[L[k]] for k in "aeb"))
        entries = sum(math.prod(v.shape) for three in self.variables for v in three)
        components = sum(math.prod(L["shape"]) for L in self.layers)
        self.ipt = optimizer.add_variable((entries,), "zeros", name="adalora_sensitivity")
        self.unc = optimizer.add_variable((entries,), "zeros", name="adalora_uncertainty")
        self.mask = optimizer.add_variable((components,), "ones", name="adalora_mask")

    def after_apply(self, optimizer, step, grads, variables):
        grad_of = {id(v): g for v, g in zip(variables, grads)}
        params = [tuple(ops.convert_to_tensor(v) for v in three) for three in self.variables]
        grad3 = [tuple(grad_of.get(id(v)) for v in three) for three in self.variables]
        new_e, ipt, unc, mask, _ = allocate(
            self.schedule, self.beta1, self.beta2, step, params, grad3,
            ops.convert_to_tensor(self.ipt), ops.convert_to_tensor(self.unc),
            ops.convert_to_tensor(self.mask),
        )
        for three, e in zip(self.variables, new_e):
            three[1].assign(e)
        self.ipt.assign(ipt)
        self.unc.assign(unc)
        self.mask.assign(mask)

    def masks(self):
        """`{layer path: stored mask}` (NumPy, each layer's `λ` shape), after
        `build`."""
        if getattr(self, "mask", None) is None:
            return {}
        flat = np.asarray(ops.convert_to_numpy(self.mask))
        out, offset = {}, 0
        for L in self.layers:
            n = math.prod(L["shape"])
            out[L["path"]] = flat[offset:offset + n].reshape(L["shape"])
            offset += n
        return out

    def get_config(self):
        return {
            "layers": [dict(L, shape=list(L["shape"])) for L in self.layers],
            "target_rank": self.target_rank, "tinit": self.tinit, "tfinal": self.tfinal,
            "total_steps": self.total_steps, "delta_t": self.delta_t,
            "beta1": self.beta1, "beta2": self.beta2,
        }


class Allocation(training.TrainingPart):
    """The optimizer part of AdaLoRA: a `RankAllocator` over every AdaLoRA
    layer of the model."""

    def __init__(self):
        super().__init__(
            "optimizer",
            "after each update: importance EMAs from the step's gradients, the cubic budget, "
            "global top-b masking of λ, the final rank pattern",
        )

    def optimizer_hook(self, model):
        layers = [(e.path, e.layer) for e in tree.walk(model)
                  if tree.is_adapter(e.layer) and e.layer.method == "adalora" and not e.layer.merged]
        if not layers:
            return None
        first = layers[0][1]
        spec = [{
            "path": path, "a": a.lora_a.path, "e": a.lora_e.path, "b": a.lora_b.path,
            "shape": tuple(a.lora_e.shape),
        } for path, a in layers]
        return RankAllocator(spec, **{k: getattr(first, k) for k in SCHEDULE if k != "orth_reg_weight"})


# ----------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="keras_lowrank")
class AdaLoRAState(shared.SharedState):
    """What all AdaLoRA layers of a model share: the number of matrices
    (the regularizer averages over them) and the one schedule."""

    method = "adalora"

    @classmethod
    def config_for(cls, layer_plans, where):
        schedules = {tuple(lp.options[k] for k in SCHEDULE) for lp in layer_plans}
        if len(schedules) > 1:
            raise ValueError(
                f"{where}: AdaLoRA layers of one model share one budget schedule; "
                f"these layers ask for several ({sorted(schedules)}) of {SCHEDULE}."
            )
        return {
            "matrices": sum(lp.geometry.n_shared for lp in layer_plans),
            **{k: layer_plans[0].options[k] for k in SCHEDULE},
        }

    @property
    def matrices(self):
        return int(self.state_config["matrices"])


# ----------------------------------------------------------------------
# PEFT's format
class AdaLoRAFormat(peft_codec.Format):
    """PEFT's `ADALORA` adapter type (`lora_A`, `lora_E`, `lora_B` at each
    module's kept rank; the schedule's options), read into `adalora`
    (written as its LoRA form)."""

    peft_type = "ADALORA"
    parts = ("lora_A", "lora_B", "lora_E")

    def method(self, config):
        return "adalora"

    def check(self, config):
        check_lora_init(config)
        if not config.get("total_step"):
            raise ValueError("PEFT AdaLoRA adapter: total_step is not set; keras-lowrank's "
                             "AdaLoRA needs its schedule length.")
        super().check(config)

    def options(self, config):
        return {"total_steps": peft_codec.config_value(config, "total_step", None, "int", low=1),
                "target_rank": peft_codec.config_value(config, "target_r", 8, "int", low=1),
                "tinit": peft_codec.config_value(config, "tinit", 0, "int", low=0),
                "tfinal": peft_codec.config_value(config, "tfinal", 0, "int", low=0),
                "delta_t": peft_codec.config_value(config, "deltaT", 1, "int", low=1),
                "beta1": peft_codec.config_value(config, "beta1", 0.85, "number", low=0, high=1),
                "beta2": peft_codec.config_value(config, "beta2", 0.85, "number", low=0, high=1),
                "orth_reg_weight": peft_codec.config_value(config, "orth_reg_weight", 0.5, "number", low=0),
                "dropout": peft_codec.dropout_value(config, "lora_dropout")}

    def check_parts(self, parts, module, config):
        a = peft_codec.matrix(parts, "lora_A", module)
        b = peft_codec.matrix(parts, "lora_B", module)
        e = parts["lora_E"]
        if e.ndim not in (1, 2) or (e.ndim == 2 and e.shape[1] != 1):
            raise ValueError(f"PEFT adapter module {module!r}: lora_E has shape {e.shape}; "
                             "AdaLoRA's singular values are (r, 1).")
        peft_codec.same(module, ("lora_A rows", a.shape[0]), ("lora_E size", e.size), ("lora_B columns", b.shape[1]))

    def rank(self, config, module, parts):
        return int(parts["lora_A"].shape[0])

    def alpha(self, config, module):
        a = float(peft_codec.alpha_value(config, "lora_alpha", low=None) or 0)
        return a if a > 0 else None

    def torch_shape(self, parts):
        return parts["lora_B"].shape[0], parts["lora_A"].shape[1]

    def state(self, parts, p_in, p_out, module):
        return {"lora_a": parts["lora_A"][:, p_in], "lora_e": parts["lora_E"].reshape(-1),
                "lora_b": parts["lora_B"].T[:, p_out]}


@registry.method(
    "AdaLoRA: K + c A diag(λ) B with a global rank budget moved by importance",
    trainable_count=lambda g, o: g.n_shared * o["rank"] * (g.n_in + g.n_out + 1),
    example_options={"total_steps": 100},
    reference=reference_merged,
    peft=AdaLoRAFormat(),
)
@keras.saving.register_keras_serializable(package="keras_lowrank")
class AdaLoRA(Adapter):
    """AdaLoRA: `y = xK + b + c ((x A) ⊙ λ) B`, with a rank budget that
    training moves between layers (arXiv 2303.10512; see the module docstring).

    `A` and `B` start `N(0, 0.02²)`, `λ` at zero (a no-op at start);
    `c = alpha / (rank + 1e-5)`, `rank` being the initial rank (pruning
    does not rescale, as in both references). Trainable per matrix:
    `rank · (n_in + n_out + 1)`.

    Args:
        layer: the `Dense`/`EinsumDense` to adapt.
        rank: the initial rank `r` (PEFT's `init_r`, 12).
        target_rank: the average rank at the end (`target_r`; default
            `round(2 rank / 3)`, PEFT's 8 at the default rank 12).
        total_steps: the number of train steps (required, as in PEFT).
        tinit: warm-up steps at the full budget (0).
        tfinal: final steps at the target budget, ranks frozen (0).
        delta_t: steps between mask events (1).
        beta1, beta2: sensitivity and uncertainty EMA factors (0.85).
        orth_reg_weight: `γ` of the orthogonality regularizer (0.5).
        alpha: scaling numerator (default: the rank; PEFT's is 8).
        dropout, train_bias, seed, activation, merged, enabled: see `Adapter`.

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, name="hidden"),
        ...                           keras.layers.Dense(4, name="out")])
        >>> _ = keras_lowrank.enable_adapter(model, method="adalora", rank=4, target_rank=2,
        ...                                  total_steps=20)
        >>> model.compile(optimizer="adam", loss="mse")
        >>> x, y = np.ones((8, 8), "float32"), np.zeros((8, 4), "float32")
        >>> _ = model.fit(x, y, batch_size=4, epochs=10, verbose=0)
        >>> keras_lowrank.adalora.rank_report(model).budget  # "hidden" (the head is left out) x 2
        2
    """

    method = "adalora"
    model_state = AdaLoRAState
    training_parts = (
        training.TrainingPart("forward", "orthogonality regularizer γ·mean‖AᵀA−I‖, ‖BBᵀ−I‖ added to the loss"),
        Allocation(),
    )
    export_forms = ("lora",)
    #: its orthogonality regularizer is added where the layer is called
    serves_kernel = False
    OPTIONS = (
        opt.Option("rank", 12, opt.positive_int, "initial rank r (PEFT's init_r)"),
        opt.Option("target_rank", None, opt.positive_int_or_none,
                   "average rank at the end (PEFT's target_r; None: round(2r/3), 8 at r=12)"),
        opt.Option("total_steps", None, opt.positive_int_or_none, "train steps of the schedule (required)"),
        opt.Option("tinit", 0, opt.nonneg_int, "warm-up steps at the initial budget"),
        opt.Option("tfinal", 0, opt.nonneg_int, "final steps with the ranks frozen"),
        opt.Option("delta_t", 1, opt.positive_int, "steps between mask events"),
        opt.Option("beta1", 0.85, opt.beta, "sensitivity EMA factor"),
        opt.Option("beta2", 0.85, opt.beta, "uncertainty EMA factor"),
        opt.Option("orth_reg_weight", 0.5, opt.nonneg_float, "γ of the orthogonality regularizer"),
        ALPHA,
        DROPOUT,
    ) + Adapter.OPTIONS

    def validate_options(self):
        where = f"Layer {self.name!r} (adalora)"
        if self.total_steps is None:
            raise ValueError(
                f"{where}: total_steps is required (the budget schedule needs the "
                "number of train steps, as PEFT's total_step); received total_steps=None."
            )
        if self.target_rank is None:
            self.target_rank = max(1, int(round(2 * self.rank / 3)))
        if self.target_rank > self.rank:
            raise ValueError(
                f"{where}: target_rank={self.target_rank} is larger than rank={self.rank}; "
                "the budget can only shrink."
            )
        if self.tinit >= self.total_steps - self.tfinal:
            raise ValueError(
                f"{where}: tinit={self.tinit}, tfinal={self.tfinal} and "
                f"total_steps={self.total_steps} leave no step for the budget to "
                "decrease (need tinit < total_steps - tfinal)."
            )
        if self.alpha is None:
            self.alpha = float(self.rank)

    @property
    def scaling(self):
        """`c = alpha / (r + 1e-5)` (PEFT's `scaling / (ranknum + 1e-5)`)."""
        return self.alpha / (self.rank + 1e-5)

    def standalone_state(self, geometry):
        return AdaLoRAState({"matrices": geometry.n_shared, **{k: getattr(self, k) for k in SCHEDULE}})

    def variable_specs(self, geometry):
        batch, n_in, n_out, r = geometry.batch_shape, geometry.n_in, geometry.n_out, self.rank
        init = keras.initializers.RandomNormal(stddev=0.02, seed=self.seed)
        init_b = keras.initializers.RandomNormal(
            stddev=0.02, seed=None if self.seed is None else self.seed + 1
        )
        return [
            VariableSpec("lora_a", batch + (r, n_in), init),
            VariableSpec("lora_e", batch + (r,), "zeros"),
            VariableSpec("lora_b", batch + (r, n_out), init_b),
        ]

    def _matrices(self):
        state = self.shared_state()
        return state.matrices if state is not None else self.geometry.n_shared

    def orthogonality(self):
        """`Σ over this layer's matrices of ‖A Aᵀ − I‖_F + ‖B Bᵀ − I‖_F`
        (stored layouts; both `r × r`), in float32."""
        eye = ops.eye(self.rank, dtype="float32")
        total = 0.0
        for var in (self.lora_a, self.lora_b):
            m = ops.cast(ops.convert_to_tensor(var), "float32")
            gram = ops.matmul(m, ops.swapaxes(m, -1, -2))
            total = total + ops.sum(ops.sqrt(ops.sum(ops.square(gram - eye), axis=(-2, -1))))
        return total

    def adapter_output(self, x, y, training):
        if training and self.orth_reg_weight > 0:
            self.add_loss(self.orth_reg_weight * self.orthogonality() / (2 * self._matrices()))
        x = self.adapter_input(x, training)
        e = ops.convert_to_tensor(self.lora_e)
        scale = self.scaling * ops.expand_dims(ops.cast(e, "float32"), -2)  # (..., 1, r)
        return self.add_lowrank(x, y, self.lora_a, self.lora_b, scale)

    def delta_matrix(self):
        a = ops.swapaxes(self.read(self.lora_a), -1, -2)
        e = self.read(self.lora_e)
        return self.scaling * ops.matmul(a * ops.expand_dims(e, -2), self.read(self.lora_b))

    # Rank pattern and shrunk adapter files -------------------------------
    def kept(self):
        """Per component (row of `A`, `λ`, `B`), whether any matrix of the
        layer keeps it (`λ != 0`), as a NumPy bool array `(r,)`. A layer
        whose `λ` are all zero (untrained) keeps every component: dropping
        them would lose `A` and `B`, and with them the gradient of `λ`."""
        e = np.asarray(ops.convert_to_numpy(self.read(self.lora_e)))
        nonzero = np.any(e.reshape(-1, self.rank) != 0, axis=0)
        return nonzero if nonzero.any() else np.ones_like(nonzero)

    def file_shapes(self, geometry):
        batch, n_in, n_out = geometry.batch_shape, geometry.n_in, geometry.n_out
        shapes = {
            "lora_a": batch + (None, n_in),
            "lora_e": batch + (None,),
            "lora_b": batch + (None, n_out),
            "rank_mask": (self.rank,),
        }
        full = super().file_shapes(geometry)
        shapes.update({k: v for k, v in full.items() if k not in shapes})
        return shapes

    def file_tensors(self):
        """The kept components only (`λ != 0`), and which ones they are:
        the file shrinks with the budget and loads back exactly."""
        keep = np.nonzero(self.kept())[0]
        out = dict(self.file_state())
        for name, axis in (("lora_a", -2), ("lora_e", -1), ("lora_b", -2)):
            value = np.asarray(ops.convert_to_numpy(self.read(out[name])))
            out[name] = np.take(value, keep, axis=axis)
        mask = np.zeros((self.rank,), "float32")
        mask[keep] = 1.0
        out["rank_mask"] = mask
        return out

    def load_file_tensors(self, tensors):
        mask = np.asarray(tensors["rank_mask"]).reshape(-1)
        keep = np.nonzero(mask > 0.5)[0]
        for name, axis in (("lora_a", -2), ("lora_e", -1), ("lora_b", -2)):
            var = self._adapter_vars[name]
            value = np.asarray(tensors[name], "float32")
            if value.shape[axis] != len(keep):
                raise ValueError(
                    f"Layer {self.name!r}: the adapter file's {name} keeps "
                    f"{value.shape[axis]} components but its rank_mask marks {len(keep)}."
                )
            full = np.zeros(tuple(var.shape), "float32")
            index = [slice(None)] * full.ndim
            index[axis] = keep
            full[tuple(index)] = value
            var.assign(full)
        for name, var in self.file_state().items():
            if name not in ("lora_a", "lora_e", "lora_b"):
                var.assign(tensors[name])

    def as_lora_state(self):
        """The kept components as a plain LoRA of that rank:
        `A' = A[:, kept]`, `B' = c diag(λ) B[kept]` (alpha = rank: scale 1)."""
        keep = np.nonzero(self.kept())[0]
        a = np.take(np.asarray(ops.convert_to_numpy(self.read(self.lora_a))), keep, axis=-2)
        e = np.take(np.asarray(ops.convert_to_numpy(self.read(self.lora_e))), keep, axis=-1)
        b = np.take(np.asarray(ops.convert_to_numpy(self.read(self.lora_b))), keep, axis=-2)
        b = self.scaling * e[..., :, None] * b
        k = len(keep)
        return {"lora_a": a, "lora_b": b.astype("float32")}, {"rank": k, "alpha": float(k), "rslora": False}


# ----------------------------------------------------------------------
class RankReport:
    """The rank each AdaLoRA matrix keeps after (or during) training.

    Attributes:
        rows: per layer, `(path, initial rank, allocated rank, nonzero λ)`:
            the allocated rank is the allocator's stored mask (summed over
            the layer's matrices; `None` when the model has no compiled
            AdaLoRA optimizer), the nonzero count is what an adapter file
            keeps.
        budget: the schedule's budget at the optimizer's current step
            (`None` without one).
        step: the optimizer's step count (`None` without one).
    """

    def __init__(self, rows, budget, step):
        self.rows, self.budget, self.step = rows, budget, step

    def __str__(self):
        lines = [f"AdaLoRA ranks (step {self.step}, budget {self.budget})",
                 f"{'layer':<40} {'initial':>7} {'allocated':>9} {'nonzero':>7}"]
        for path, r0, alloc, nz in self.rows:
            lines.append(f"{path:<40} {r0:>7} {'-' if alloc is None else alloc:>9} {nz:>7}")
        return "\n".join(lines)

    __repr__ = __str__

    def plot(self, ax=None):
        """Bars of the allocated (or nonzero) rank per layer (matplotlib)."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(max(4, 0.4 * len(self.rows)), 3))
        names = [r[0] for r in self.rows]
        ax.bar(range(len(names)), [r[1] for r in self.rows], color="#ddd", label="initial")
        ax.bar(range(len(names)), [r[2] if r[2] is not None else r[3] for r in self.rows], label="kept")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=90, fontsize=7)
        ax.set_ylabel("rank")
        ax.legend()
        return ax


def allocator(model):
    """The `RankAllocator` of `model`'s optimizer (or `None`)."""
    optimizer = getattr(model, "optimizer", None)
    for hook in getattr(optimizer, "hooks", []):
        if isinstance(hook, RankAllocator) and getattr(hook, "mask", None) is not None:
            return hook
    return None


def rank_report(model):
    """A `RankReport` of the AdaLoRA layers of `model`."""
    layers = [(e.path, e.layer) for e in tree.walk(model)
              if tree.is_adapter(e.layer) and e.layer.method == "adalora"]
    if not layers:
        raise ValueError(f"Model {model.name!r} has no AdaLoRA adapters.")
    hook = allocator(model)
    masks = hook.masks() if hook is not None else {}
    rows = []
    for path, a in layers:
        e = np.asarray(ops.convert_to_numpy(a.read(a.lora_e)))
        m = masks.get(path)
        rows.append((path, int(e.size), None if m is None else int(m.sum()), int((e != 0).sum())))
    step = budget_now = None
    if hook is not None:
        step = int(ops.convert_to_numpy(model.optimizer.iterations))
        budget_now = hook.schedule.budget(max(step - 1, 0)) if step else hook.schedule.init_budget
    return RankReport(rows, budget_now, step)
