"""Training dynamics (contract point 8): each method's training parts act
inside the compiled train step of `model.fit`, on every backend, and resume
after a `.keras` reload."""

import keras
import numpy as np
import pytest

import keras_lowrank as kl
from keras_lowrank import registry
from keras_lowrank.training import AdapterOptimizer

from conftest import to_np

METHODS = kl.methods()
X = np.random.RandomState(0).normal(size=(8, 5)).astype("float32")
Y = np.random.RandomState(1).normal(size=(8, 3)).astype("float32")


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((5,))
    h = keras.layers.Dense(6, activation="tanh", name="ffn")(inp)
    h = keras.layers.EinsumDense("bd,dk->bk", output_shape=(6,), bias_axes="k", name="proj")(h)
    return keras.Model(inp, keras.layers.Dense(3, name="out")(h))


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
            kl.enable_adapter(model, method=method, rank=2, train_bias=True, seed=3, **extra)
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


IN_STEP_CHECKS = {"loraplus": check_loraplus_in_fit, "dylora": check_dylora_in_fit}


@pytest.mark.parametrize("method", METHODS)
def test_training_parts_act_inside_fit(method):
    """Contract point 8. A method with training parts has a check here that
    runs them in `model.fit`; a method without leaves the user's optimizer
    as it is and changes nothing but its trainable variables in a step."""
    spec = registry.get(method)
    if spec.training:
        assert method in IN_STEP_CHECKS, f"add an in-step check for {method}"
        IN_STEP_CHECKS[method]()
        return
    assert method not in IN_STEP_CHECKS
    model = _model()
    kl.enable_adapter(model, method=method, rank=2)
    optimizer = keras.optimizers.Adam(1e-2)
    model.compile(optimizer=optimizer, loss="mse")
    assert model.optimizer is optimizer
    frozen = {v.path: to_np(v).copy() for v in model.non_trainable_weights}
    _fit_steps(model, 1)
    for v in model.non_trainable_weights:
        np.testing.assert_array_equal(to_np(v), frozen[v.path], err_msg=v.path)


# ----------------------------------------------------------------------
# Resume after a .keras reload: the same result as an uninterrupted run
@pytest.mark.parametrize("method", ["loraplus", "dylora"])
def test_training_resumes_after_a_keras_reload(method, tmp_path):
    def fresh():
        model = _model()
        kl.enable_adapter(model, method=method, rank=3, seed=5)
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
