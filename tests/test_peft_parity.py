"""Parity with Hugging Face PEFT (run in PyTorch beside the Keras backend
under test) on the same weights: LoRA+'s optimizer step, VeRA's forward,
OLoRA's init."""

import keras
import numpy as np
import pytest

import keras_lowrank as kl

from conftest import to_np

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

N_IN, N_OUT, R = 5, 6, 2
X = np.random.RandomState(0).normal(size=(8, N_IN)).astype("float32")
T = np.random.RandomState(1).normal(size=(8, N_OUT)).astype("float32")


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(N_IN, N_OUT)

    def forward(self, x):
        return self.lin(x)


def _torch_net(seed=0):
    torch.manual_seed(seed)
    return _Net()


def _keras_twin(net):
    """A Keras Dense with the torch Linear's weights (kernel = weightᵀ)."""
    inp = keras.Input((N_IN,))
    model = keras.Model(inp, keras.layers.Dense(N_OUT, name="lin")(inp))
    model.get_layer("lin").set_weights(
        [net.lin.weight.detach().numpy().T.copy(), net.lin.bias.detach().numpy().copy()]
    )
    return model


def test_loraplus_adam_step_matches_peft():
    """One Adam step: PEFT's `create_loraplus_optimizer` (B and the trainable
    bias at λ·lr) and LoRA+ through `model.compile` + `fit`, on the same
    weights, data and loss."""
    from peft import LoraConfig
    from peft import get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    lr, ratio = 1e-2, 16.0
    net = _torch_net()
    model = _keras_twin(net)
    pm = get_peft_model(net, LoraConfig(r=R, lora_alpha=4, target_modules=["lin"], bias="lora_only"))
    lin = pm.base_model.model.lin
    rng = np.random.RandomState(2)
    a = rng.normal(size=(R, N_IN)).astype("float32")
    b = rng.normal(size=(N_OUT, R)).astype("float32") * 0.1
    with torch.no_grad():
        lin.lora_A["default"].weight.copy_(torch.tensor(a))
        lin.lora_B["default"].weight.copy_(torch.tensor(b))
    opt = create_loraplus_optimizer(pm, torch.optim.Adam, lr=lr, loraplus_lr_ratio=ratio, eps=1e-8)
    loss = torch.nn.functional.mse_loss(pm(torch.tensor(X)), torch.tensor(T))
    loss.backward()
    opt.step()

    kl.enable_adapter(model, method="loraplus", rank=R, alpha=4.0, targets=["lin"], train_bias=True, lr_ratio=ratio)
    layer = model.get_layer("lin")
    layer.lora_a.assign(a)
    layer.lora_b.assign(b.T)
    model.compile(optimizer=keras.optimizers.Adam(lr, epsilon=1e-8), loss="mse")
    model.fit(X, T, epochs=1, batch_size=len(X), verbose=0, shuffle=False)
    np.testing.assert_allclose(to_np(layer.lora_a), lin.lora_A["default"].weight.detach().numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(to_np(layer.lora_b), lin.lora_B["default"].weight.detach().numpy().T, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(to_np(layer.layer.bias), lin.base_layer.bias.detach().numpy(), rtol=1e-4, atol=1e-6)


def test_vera_forward_matches_peft_on_the_same_projections_and_vectors():
    from peft import VeraConfig
    from peft import get_peft_model

    net = _torch_net(1)
    model = _keras_twin(net)
    pm = get_peft_model(net, VeraConfig(r=4, target_modules=["lin"], projection_prng_key=0, d_initial=0.1))
    lin = pm.base_model.model.lin
    rng = np.random.RandomState(3)
    d = rng.normal(size=4).astype("float32")
    bv = rng.normal(size=N_OUT).astype("float32")
    with torch.no_grad():
        lin.vera_lambda_d["default"].copy_(torch.tensor(d))
        lin.vera_lambda_b["default"].copy_(torch.tensor(bv))
    vera_a = lin.vera_A["default"].detach().numpy()  # (r, N_in)
    vera_b = lin.vera_B["default"].detach().numpy()  # (N_out, r)
    want = pm(torch.tensor(X)).detach().numpy()

    kl.enable_adapter(model, method="vera", rank=4, targets=["lin"])
    layer = model.get_layer("lin")
    # PEFT's projections have the same distribution as ours (Kaiming-uniform)
    ours = to_np(layer.shared_state().vera_a)
    assert ours.shape == vera_a.T.shape and np.abs(ours).max() <= np.sqrt(6 / N_IN)
    assert np.abs(vera_a).max() <= np.sqrt(6 / N_IN)
    layer.shared_state().vera_a.assign(vera_a.T)
    layer.shared_state().vera_b.assign(vera_b.T)
    layer.vera_lambda_d.assign(d)
    layer.vera_lambda_b.assign(bv)
    np.testing.assert_allclose(to_np(model(X)), want, rtol=1e-5, atol=1e-5)
    kl.merge(model)
    np.testing.assert_allclose(to_np(model(X)), want, rtol=1e-5, atol=1e-5)


def test_olora_init_matches_peft():
    from peft import LoraConfig
    from peft import get_peft_model

    net = _torch_net(2)
    model = _keras_twin(net)
    pm = get_peft_model(net, LoraConfig(r=R, lora_alpha=8, target_modules=["lin"], init_lora_weights="olora"))
    lin = pm.base_model.model.lin
    kl.enable_adapter(model, method="olora", rank=R, alpha=8.0, targets=["lin"])
    layer = model.get_layer("lin")
    np.testing.assert_allclose(to_np(layer.lora_a), lin.lora_A["default"].weight.detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(to_np(layer.lora_b), lin.lora_B["default"].weight.detach().numpy().T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(to_np(layer.layer.kernel), lin.base_layer.weight.detach().numpy().T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(to_np(model(X)), pm(torch.tensor(X)).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_lora_fa_adamw_step_matches_peft(monkeypatch):
    """One AdamW step of LoRA-FA with the v2 gradient correction: PEFT's
    `create_lorafa_optimizer` against `lora_fa` through `compile` + `fit`
    with Keras's AdamW (same betas, eps 1e-6, weight decay), on the same
    weights, data and loss. PEFT computes ĝ_B under bfloat16 autocast where
    bfloat16 is available; that rounding is switched off for the comparison.
    Keras decays the weight before the Adam update and PEFT after it; with
    lr·wd = 1e-4 the difference is far below the tolerance."""
    from peft import LoraConfig
    from peft import get_peft_model
    from peft.optimizers import create_lorafa_optimizer
    from peft.optimizers import lorafa

    monkeypatch.setattr(lorafa, "is_bf16_available", lambda *a, **k: False)
    lr, wd, alpha = 1e-2, 1e-2, 4
    net = _torch_net(4)
    model = _keras_twin(net)
    pm = get_peft_model(net, LoraConfig(r=R, lora_alpha=alpha, target_modules=["lin"]))
    lin = pm.base_model.model.lin
    rng = np.random.RandomState(5)
    a = rng.uniform(-0.4, 0.4, size=(R, N_IN)).astype("float32")
    b = rng.normal(size=(N_OUT, R)).astype("float32") * 0.1
    with torch.no_grad():
        lin.lora_A["default"].weight.copy_(torch.tensor(a))
        lin.lora_B["default"].weight.copy_(torch.tensor(b))
    opt = create_lorafa_optimizer(pm, r=R, lora_alpha=alpha, lr=lr, weight_decay=wd)
    loss = torch.nn.functional.mse_loss(pm(torch.tensor(X)), torch.tensor(T))
    loss.backward()
    opt.step()
    assert lin.lora_A["default"].weight.grad is None  # frozen in PEFT too

    kl.enable_adapter(model, method="lora_fa", rank=R, alpha=float(alpha), targets=["lin"])
    layer = model.get_layer("lin")
    assert not layer.lora_a.trainable
    layer.lora_a.assign(a)
    layer.lora_b.assign(b.T)
    model.compile(
        optimizer=keras.optimizers.AdamW(lr, weight_decay=wd, beta_1=0.9, beta_2=0.999, epsilon=1e-6),
        loss="mse",
    )
    model.fit(X, T, epochs=1, batch_size=len(X), verbose=0, shuffle=False)
    np.testing.assert_array_equal(to_np(layer.lora_a), a)
    want = lin.lora_B["default"].weight.detach().numpy().T
    np.testing.assert_allclose(to_np(layer.lora_b), want, rtol=1e-4, atol=1e-6)
    # and the correction is what moved it: without it, B moves elsewhere
    moved = want - b.T
    assert np.abs(moved).max() > 1e-3


def _adalora_torch(init_r, target_r, total, tinit, tfinal, delta_t):
    from peft import AdaLoraConfig
    from peft import get_peft_model

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Linear(N_IN, N_OUT)
            self.q = torch.nn.Linear(N_OUT, 4)

        def forward(self, x):
            return self.q(self.p(x))

    torch.manual_seed(0)
    config = AdaLoraConfig(
        init_r=init_r, target_r=target_r, total_step=total, tinit=tinit, tfinal=tfinal,
        deltaT=delta_t, beta1=0.85, beta2=0.85, target_modules=["p", "q"],
    )
    return get_peft_model(Two(), config)


@pytest.mark.parametrize("schedule", [(4, 2, 14, 2, 3, 1), (4, 1, 12, 0, 0, 3), (3, 2, 9, 1, 2, 2)])
def test_adalora_allocation_matches_peft_rank_allocator(schedule):
    """PEFT's `update_and_allocate(step)` and our allocator, fed the same
    parameter values and gradients at every step (random, so that the
    scores differ): the same budget, the same masked λ and the same rank
    pattern at every step, through warm-up, the cubic decrease, the final
    mask (EMAs reset) and the frozen phase."""
    from keras import ops

    from keras_lowrank.methods import adalora

    init_r, target_r, total, tinit, tfinal, delta_t = schedule
    pm = _adalora_torch(*schedule)
    mods = [pm.base_model.model.p, pm.base_model.model.q]
    dims = [(N_IN, N_OUT), (N_OUT, 4)]
    sched = adalora.Schedule(init_r * 2, target_r * 2, tinit, tfinal, total, delta_t)
    allocator = pm.base_model.rankallocator
    for step in range(total + 3):
        assert sched.budget(step) == allocator.budget_schedule(step)[0], step
    entries = sum(init_r * (n + 1 + m) for n, m in dims)
    ipt, unc = np.zeros(entries, "float32"), np.zeros(entries, "float32")
    mask = np.ones(init_r * len(dims), "float32")
    rng = np.random.RandomState(7)
    for step in range(total + 2):
        params, grads = [], []
        for mod, (n, m) in zip(mods, dims):
            a, e, b = (rng.normal(size=s).astype("float32") for s in ((init_r, n), (init_r,), (init_r, m)))
            ga, ge, gb = (rng.normal(size=s).astype("float32") for s in ((init_r, n), (init_r,), (init_r, m)))
            with torch.no_grad():
                mod.lora_A["default"].copy_(torch.tensor(a))
                mod.lora_E["default"].copy_(torch.tensor(e[:, None]))
                mod.lora_B["default"].copy_(torch.tensor(b.T))
            mod.lora_A["default"].grad = torch.tensor(ga)
            mod.lora_E["default"].grad = torch.tensor(ge[:, None])
            mod.lora_B["default"].grad = torch.tensor(gb.T.copy())
            params.append((a, e, b))
            grads.append((ga, ge, gb))
        pm.base_model.update_and_allocate(step)
        new_e, ipt, unc, mask, b_now = adalora.allocate(
            sched, 0.85, 0.85, ops.convert_to_tensor(step, "int32"), params, grads, ipt, unc, mask)
        ipt, unc, mask = to_np(ipt), to_np(unc), to_np(mask)
        masks = np.split(mask, len(dims))
        for mod, e, m in zip(mods, new_e, masks):
            np.testing.assert_array_equal(to_np(e), mod.lora_E["default"].detach().numpy()[:, 0], err_msg=f"step {step}")
        pattern = pm.peft_config["default"].rank_pattern
        if pattern:
            got = [m.astype(bool).tolist() for m in masks]
            want = [pattern[k] for k in sorted(pattern)]
            assert got == want, (step, got, want)
    assert pm.peft_config["default"].rank_pattern  # the final mask happened
    assert sum(int(m.sum()) for m in masks) == 2 * target_r
