"""Training dynamics (contract point 8): each method's training parts act
inside the compiled train step of `model.fit`, on every backend, and resume
after a `.keras` reload."""

import keras
import numpy as np
import pytest

import keras_lowrank as kl
from keras_lowrank import registry
from keras_lowrank.training import AdapterOptimizer

from conftest import needs
from conftest import MLP_X
from conftest import MLP_Y
from conftest import mlp_model
from conftest import to_np

METHODS = kl.methods()
X, Y = MLP_X, MLP_Y
_model = mlp_model


def _fit_steps(model, steps):
    """`steps` optimizer steps through `model.fit` (one batch per call, so
    the weights can be read between steps; the compiled step is reused)."""
    for _ in range(steps):
        model.fit(X, Y, epochs=1, batch_size=len(X), verbose=0, shuffle=False)


def _values(variables):
    return {v.path: to_np(v).copy() for v in variables}


# ----------------------------------------------------------------------
# LoRA+: B and 1-D variables at λ x the learning rate, any optimizer
def check_loraplus_in_fit():
    schedule = keras.optimizers.schedules.ExponentialDecay(1e-2, decay_steps=1, decay_rate=0.5)
    for make_opt in (lambda: keras.optimizers.Adam(schedule), lambda: keras.optimizers.SGD(0.05, momentum=0.9)):
        updates = {}
        for method, extra in (("lora", {}), ("loraplus", {"lr_ratio": 4.0})):
            model = _model()
            kl.enable_adapter(model, method=method, **needs(method, model), rank=2, train_bias=True, seed=3, **extra)
            for _, a in kl.adapters(model):
                a.lora_b.assign(np.full(a.lora_b.shape, 0.1, "float32"))
            model.compile(optimizer=make_opt(), loss="mse")
            assert isinstance(model.optimizer, AdapterOptimizer) == (method == "loraplus")
            before = _values(model.trainable_variables)
            _fit_steps(model, 1)  # same weights, so the same gradients
            after = _values(model.trainable_variables)
            updates[method] = {p: after[p] - before[p] for p in before}
        for path, d in updates["lora"].items():
            name = path.split("/")[-1]
            ratio = 4.0 if name in ("lora_b", "bias") else 1.0
            np.testing.assert_allclose(updates["loraplus"][path], ratio * d, rtol=2e-4, atol=1e-7, err_msg=path)


# ----------------------------------------------------------------------
# DyLoRA: one rank per step for the whole model, drawn in the compiled step
def _changed_components(before, after):
    out = {}
    for path in before:
        name = path.split("/")[-1]
        if name in ("lora_a", "lora_b"):
            rows = np.nonzero(np.abs(after[path] - before[path]).sum(axis=-1) > 0)[0]
            out[path] = tuple(int(i) for i in rows)
    return out


def check_dylora_in_fit():
    model = _model()
    kl.enable_adapter(model, method="dylora", rank=4, seed=7)
    for _, a in kl.adapters(model):
        a.lora_b.assign(np.random.RandomState(2).normal(size=a.lora_b.shape).astype("float32") * 0.1)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    state = kl.shared.get(model, "dylora")
    seen = []
    for _ in range(8):
        before = _values(model.trainable_variables)
        _fit_steps(model, 1)
        changed = _changed_components(before, _values(model.trainable_variables))
        ranks = set(changed.values())
        # frozen: one component per factor, the same in every layer
        assert len(ranks) == 1 and len(next(iter(ranks))) == 1, changed
        index = next(iter(ranks))[0]
        assert int(to_np(state.train_rank)) == index + 1
        seen.append(index)
    assert len(set(seen)) >= 2, seen  # drawn anew each step, inside fit
    assert int(to_np(state.eval_rank)) == 4  # inference stays at full rank
    # reading the training flag left no call context behind (JAX calls the
    # model's `call` outside `__call__`)
    from keras.src.backend.common import global_state

    assert global_state.get_global_attribute("current_call_ctx") is None


# ----------------------------------------------------------------------
# LoRA-FA: A frozen; B's gradient corrected inside the backward pass
def check_lora_fa_in_fit():
    """One SGD step in `fit`: with the correction, B moves by
    `P = (1/s²) pinv(AᵀA + 1e-8 I)` times the uncorrected step; A never
    moves."""
    moves = {}
    for correction in (False, True):
        model = _model()
        kl.enable_adapter(model, method="lora_fa", rank=2, seed=3, correction=correction)
        for _, a in kl.adapters(model):
            a.lora_b.assign(np.full(a.lora_b.shape, 0.1, "float32"))
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        frozen = {p: to_np(a.lora_a).copy() for p, a in kl.adapters(model)}
        before = {p: to_np(a.lora_b).copy() for p, a in kl.adapters(model)}
        _fit_steps(model, 1)
        for p, a in kl.adapters(model):
            np.testing.assert_array_equal(to_np(a.lora_a), frozen[p])
        moves[correction] = {p: to_np(a.lora_b) - before[p] for p, a in kl.adapters(model)}
        adapters = dict(kl.adapters(model))
    for p, a in adapters.items():
        a_t = to_np(a.lora_a).astype("float64")
        gram = a_t @ a_t.T
        proj = np.linalg.pinv(gram + 1e-8 * np.eye(len(gram))) / a.scaling**2
        np.testing.assert_allclose(moves[True][p], proj @ moves[False][p], rtol=1e-3, atol=1e-6, err_msg=p)
        assert np.abs(moves[True][p] - moves[False][p]).max() > 1e-4


# ----------------------------------------------------------------------
# Delta-LoRA: the kernel in effect moves by λ s Δ(AB) from start_step on
def simulate_delta_lora(k, bias, a, b, x, y, lr, scale, ratio, start, steps):
    """Spec §7 literally, in NumPy (float64): one Dense layer, MSE, SGD; the
    kernel itself is updated after every step t >= start. Returns the
    effective kernel `K_t + s A_t B_t` after each step."""
    out = []
    for t in range(steps):
        pred = x @ (k + scale * a @ b) + bias
        dy = 2.0 * (pred - y) / pred.size
        g_a = scale * x.T @ dy @ b.T
        g_b = scale * (x @ a).T @ dy
        a_new, b_new = a - lr * g_a, b - lr * g_b
        if t >= start:
            k = k + ratio * scale * (a_new @ b_new - a @ b)
        a, b = a_new, b_new
        out.append(k + scale * a @ b)
    return out


def check_delta_lora_in_fit():
    """Step by step against the NumPy simulation: the effective kernel
    (what `merge` folds) after each `fit` step, before and after
    start_step; the frozen kernel variable is never written."""
    inp = keras.Input((5,))
    model = keras.Model(inp, keras.layers.Dense(3, name="out")(inp))
    kl.enable_adapter(model, method="delta_lora", rank=2, alpha=4.0, update_ratio=2.0,
                      start_step=2, targets=["out"], seed=1)
    layer = model.get_layer("out")
    rng = np.random.RandomState(4)
    layer.lora_b.assign(rng.normal(size=layer.lora_b.shape).astype("float32") * 0.3)
    k0 = to_np(layer.layer.kernel).astype("float64")
    bias = to_np(layer.layer.bias).astype("float64")
    a0 = to_np(layer.lora_a).astype("float64").T
    b0 = to_np(layer.lora_b).astype("float64")
    lr, steps = 0.1, 6
    want = simulate_delta_lora(k0, bias, a0, b0, X.astype("float64"), Y.astype("float64"),
                               lr, layer.scaling, 2.0, 2, steps)
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    state = kl.shared.get(model, "delta_lora")
    for t in range(steps):
        _fit_steps(model, 1)
        assert int(to_np(state.steps)) == t + 1
        got = k0 + to_np(layer.delta_matrix())
        np.testing.assert_allclose(got, want[t], rtol=1e-4, atol=1e-5, err_msg=f"step {t}")
        # the layer computes with that kernel: its output is x K_t + b
        np.testing.assert_allclose(to_np(model(X)), X @ want[t] + bias, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(to_np(layer.layer.kernel), k0.astype("float32"))
    # the kernel moved more than LoRA alone would move it
    lora_only = k0 + layer.scaling * to_np(layer.factor_a()) @ to_np(layer.lora_b)
    assert np.abs(want[-1] - lora_only).max() > 1e-3


# ----------------------------------------------------------------------
# AdaLoRA: importance, budget and masks inside fit
def check_adalora_in_fit():
    """The schedule runs in `fit`: at the full budget through warm-up, then
    λ components are zeroed inside the step down to the target budget, the
    stored mask (an optimizer variable) follows, and the orthogonality term
    is part of the loss `fit` reports."""
    model = _model()
    kl.enable_adapter(model, method="adalora", rank=3, target_rank=1, total_steps=8, tinit=2,
                      tfinal=2, seed=2)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    assert isinstance(model.optimizer, AdapterOptimizer)
    n_layers = len(kl.adapters(model))
    nonzero = []
    for _ in range(9):
        _fit_steps(model, 1)
        nonzero.append(sum(int((to_np(a.lora_e) != 0).sum()) for _, a in kl.adapters(model)))
    hook = kl.adalora.allocator(model)
    budgets = [hook.schedule.budget(t) for t in range(9)]
    assert nonzero[:3] == [3 * n_layers] * 3, nonzero  # warm-up: nothing masked
    for t in range(3, 9):
        assert nonzero[t] == budgets[t], (t, nonzero, budgets)
    assert nonzero[-1] == n_layers  # the target: rank 1 per layer on average
    assert sum(int(m.sum()) for m in hook.masks().values()) == n_layers
    # the regularizer: with γ = 0.5 the loss fit reports is the task loss
    # plus γ · mean over the matrices of ‖AAᵀ − I‖ and ‖BBᵀ − I‖
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    task = float(np.mean((to_np(model(X)) - Y) ** 2))
    reported = model.fit(X, Y, epochs=1, batch_size=len(X), verbose=0).history["loss"][0]
    reg = 0.5 * sum(float(to_np(a.orthogonality())) for _, a in kl.adapters(model)) / (2 * n_layers)
    assert reg > 0
    np.testing.assert_allclose(reported, task + reg, rtol=1e-4)


IN_STEP_CHECKS = {
    "loraplus": check_loraplus_in_fit,
    "dylora": check_dylora_in_fit,
    "lora_fa": check_lora_fa_in_fit,
    "delta_lora": check_delta_lora_in_fit,
    "adalora": check_adalora_in_fit,
}


@pytest.mark.parametrize("method", METHODS)
def test_training_parts_act_inside_fit(method):
    """Contract point 8. A method with training parts has a check here that
    runs them in `model.fit`; a method without leaves the user's optimizer
    as it is and changes nothing but its trainable variables in a step."""
    spec = registry.get(method)
    if spec.training_parts:
        assert method in IN_STEP_CHECKS, f"add an in-step check for {method}"
        IN_STEP_CHECKS[method]()
        return
    assert method not in IN_STEP_CHECKS
    model = _model()
    kl.enable_adapter(model, method=method, **needs(method, model), rank=2)
    optimizer = keras.optimizers.Adam(1e-2)
    model.compile(optimizer=optimizer, loss="mse")
    assert model.optimizer is optimizer
    frozen = {v.path: to_np(v).copy() for v in model.non_trainable_weights}
    _fit_steps(model, 1)
    for v in model.non_trainable_weights:
        np.testing.assert_array_equal(to_np(v), frozen[v.path], err_msg=v.path)


# ----------------------------------------------------------------------
# Resume after a .keras reload: the same result as an uninterrupted run
RESUMABLE = {
    "loraplus": {},
    "dylora": {},
    "delta_lora": {"start_step": 2},
    "lora_fa": {},
    # the cut falls in the middle of the budget's decrease
    "adalora": {"target_rank": 1, "total_steps": 6, "tinit": 1, "tfinal": 1},
}


@pytest.mark.parametrize("method", sorted(RESUMABLE))
def test_training_resumes_after_a_keras_reload(method, tmp_path):
    def fresh():
        model = _model()
        kl.enable_adapter(model, method=method, rank=3, seed=5, **RESUMABLE[method])
        for _, a in kl.adapters(model):
            a.lora_b.assign(np.full(a.lora_b.shape, 0.05, "float32"))
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
        return model

    straight = fresh()
    _fit_steps(straight, 6)
    first = fresh()
    _fit_steps(first, 3)
    path = str(tmp_path / "half.keras")
    first.save(path)
    resumed = keras.saving.load_model(path)
    assert type(resumed.optimizer).__name__ == type(first.optimizer).__name__
    assert int(to_np(resumed.optimizer.iterations)) == 3
    _fit_steps(resumed, 3)
    want = _values(straight.weights)
    got = _values(resumed.weights)
    assert sorted(got) == sorted(want)
    for p in want:
        np.testing.assert_allclose(got[p], want[p], rtol=1e-5, atol=1e-6, err_msg=p)
    if method == "dylora":
        a, b = kl.shared.get(straight, "dylora"), kl.shared.get(resumed, "dylora")
        np.testing.assert_array_equal(to_np(a.seed_generator.state), to_np(b.seed_generator.state))
    if method == "adalora":
        want, got = kl.adalora.allocator(straight).masks(), kl.adalora.allocator(resumed).masks()
        assert sorted(got) == sorted(want)
        for p in want:
            np.testing.assert_array_equal(got[p], want[p], err_msg=p)
        assert sum(int(m.sum()) for m in want.values()) == len(kl.adapters(straight))  # target 1 each
        # the optimizer state (EMAs, masks) resumed too
        for v, w in zip(resumed.optimizer.variables, straight.optimizer.variables):
            np.testing.assert_allclose(to_np(v), to_np(w), rtol=1e-5, atol=1e-6, err_msg=v.path)
