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
