"""RandLoRA (`method="randlora"`): parity with Hugging Face PEFT's RandLoRA
(forward, merged kernel, init, the bases' shapes) on a torch `nn.Linear`
and its Keras twin, PEFT's bases copied over (torch's generator is not
reproduced); PEFT directories both ways on a tiny Hugging Face Llama
converted by KerasHub; and what the adapter contract does not cover: the
bases tied through `.keras` and adapter files, the seeded draws, the exact
LoRA form, batched EinsumDense kernels, the refusals. PEFT runs in PyTorch
beside the Keras backend under test."""

import json
import os

import keras
import numpy as np
import pytest

import keras_lowrank as kl
from keras_lowrank import shared
from keras_lowrank.methods import randlora

from conftest import REFERENCE_MERGED
from conftest import perturb
from conftest import to_np

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
keras_hub = pytest.importorskip("keras_hub")

from peft_models import ALL
from peft_models import close as _close
from peft_models import hf_model
from peft_models import keras_backbone as _backbone
from peft_models import keras_logits as _keras_logits
from peft_models import load_hf as _hf
from peft_models import torch_logits as _torch_logits


def _dense(n_in, n_out):
    inp = keras.Input((n_in,))
    return keras.Model(inp, keras.layers.Dense(n_out, name="lin")(inp))


def _copy_bases(pm, model):
    """PEFT's shared bases into the model's RandLoRA state."""
    state = shared.get(model, "randlora")
    state.randlora_a.assign(pm.base_model.randlora_A["default"].float().numpy()[:, 0, :])
    state.randlora_b.assign(pm.base_model.randlora_B["default"].float().numpy())


# ----------------------------------------------------------------------
# A torch Linear and its Keras twin
def _pair(n_in, n_out, r, alpha, seed=0):
    """PEFT's RandLoRA on a torch Linear with nonzero scalers, and the Keras
    Dense twin with the same weights and PEFT's bases."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(n_in, n_out))
    model = _dense(n_in, n_out)
    model.get_layer("lin").set_weights(
        [net[0].weight.detach().numpy().T.copy(), net[0].bias.detach().numpy().copy()])
    pm = peft.get_peft_model(net, peft.RandLoraConfig(r=r, randlora_alpha=alpha, target_modules=["0"]))
    lin = pm.base_model.model[0]
    kl.enable_adapter(model, method="randlora", rank=r, alpha=alpha, targets=["lin"])
    layer = model.get_layer("lin")
    _copy_bases(pm, model)
    rng = np.random.RandomState(seed + 1)
    lam = rng.normal(scale=0.5, size=tuple(lin.randlora_lambda["default"].shape)).astype("float32")
    gam = rng.normal(scale=0.5, size=tuple(lin.randlora_gamma["default"].shape)).astype("float32")
    with torch.no_grad():
        lin.randlora_lambda["default"].copy_(torch.tensor(lam))
        lin.randlora_gamma["default"].copy_(torch.tensor(gam))
    layer.randlora_lambda.assign(lam)
    layer.randlora_gamma.assign(gam)
    return pm.eval(), model, layer


@pytest.mark.parametrize("n_in,n_out,r", [(8, 12, 3), (12, 8, 4), (10, 10, 4)])
def test_forward_and_merged_kernel_match_peft(n_in, n_out, r):
    pm, model, layer = _pair(n_in, n_out, r, alpha=2.0 * r)
    lin = pm.base_model.model[0]
    assert layer.scaling == pytest.approx(lin.scaling["default"])
    x = np.random.RandomState(0).normal(size=(5, n_in)).astype("float32")
    with torch.no_grad():
        want = pm(torch.tensor(x)).numpy()
        base = lin.base_layer(torch.tensor(x)).numpy()
    assert np.abs(want - base).max() > 1e-2  # the update is not trivial
    _close(to_np(model(x)), want)
    delta = lin.get_delta_weight("default").detach().numpy().T
    _close(to_np(layer.delta_matrix()), delta)
    assert np.linalg.matrix_rank(delta.astype("float64")) == min(n_in, n_out)  # full rank
    merged = pm.merge_and_unload()[0].weight.detach().numpy().T
    kl.merge(model)
    _close(to_np(model.get_layer("lin").kernel), merged)
    _close(to_np(model(x)), want)


def test_init_and_bases_are_peft_s():
    """λ = 0, γ = 1/max(k, n) (PEFT's init_weights=True), the trainable
    parameters and the bases' shapes PEFT's; the bases uniform with unit
    standard deviation (PEFT's Kaiming draw divided by its std)."""
    n_in, n_out, r = 24, 40, 4
    model = _dense(n_in, n_out)
    kl.enable_adapter(model, method="randlora", rank=r, targets=["lin"])
    layer = model.get_layer("lin")
    torch.manual_seed(0)
    pm = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(n_in, n_out)),
                             peft.RandLoraConfig(r=r, target_modules=["0"]))
    lin = pm.base_model.model[0]
    np.testing.assert_array_equal(to_np(layer.randlora_lambda), lin.randlora_lambda["default"].detach().numpy())
    np.testing.assert_allclose(to_np(layer.randlora_gamma), lin.randlora_gamma["default"].detach().numpy())
    assert layer.trainable_count() == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    defaults = peft.RandLoraConfig()
    assert layer.scaling == 20.0 == defaults.randlora_alpha / defaults.r  # PEFT's default ratio
    state = shared.get(model, "randlora")
    theirs_a = pm.base_model.randlora_A["default"].float().numpy()
    theirs_b = pm.base_model.randlora_B["default"].float().numpy()
    ours_a, ours_b = to_np(state.randlora_a), to_np(state.randlora_b)
    assert theirs_a.shape == (r, 1) + ours_a.shape[1:] and ours_a.shape == (r, n_in)
    assert theirs_b.shape == ours_b.shape == (n_out, n_in // r, r)
    for ours, theirs in ((ours_a, theirs_a), (ours_b, theirs_b)):
        assert ours.std(ddof=1) == pytest.approx(1.0, rel=1e-4)
        assert np.abs(ours).max() <= np.sqrt(3.0) * 1.05
        assert theirs.std() == pytest.approx(1.0, rel=2e-2)


@pytest.mark.parametrize("option,sparsity", [("sparse", 3.0), ("very_sparse", np.sqrt(24))])
def test_sparse_bases_are_ternary(option, sparsity):
    model = _dense(24, 40)
    kl.enable_adapter(model, method="randlora", rank=4, projection_seed=2, targets=["lin"], **{option: True})
    state = shared.get(model, "randlora")
    for value in (to_np(state.randlora_a), to_np(state.randlora_b)):
        levels = np.unique(value)
        assert len(levels) == 3 and levels[1] == 0 and levels[0] == -levels[2]
        assert value.std(ddof=1) == pytest.approx(1.0, rel=1e-4)
    b = to_np(state.randlora_b)
    assert (b != 0).mean() == pytest.approx(1.0 / sparsity, abs=0.05)
    a, b2 = randlora.bases(4, 24, 40, 2, sparsity)
    np.testing.assert_array_equal(to_np(state.randlora_a), a)
    np.testing.assert_array_equal(b, b2)


# ----------------------------------------------------------------------
# What the contract does not cover
def _mlp():
    inp = keras.Input((6,))
    h = keras.layers.Dense(10, name="up")(inp)
    return keras.Model(inp, keras.layers.Dense(4, name="down")(keras.layers.Dense(10, name="mid")(h)))


def test_bases_are_stored_once_and_stay_tied(tmp_path):
    """One pair of bases for the model, sized by the largest layers
    (N_min = min(10, 10), N_max = 10); a .keras reload and an adapter file
    (with and without the bases) bring back the same bases, shared by every
    layer."""
    x = np.random.RandomState(0).normal(size=(3, 6)).astype("float32")
    model = _mlp()
    base_weights = [to_np(w).copy() for w in model.weights]
    kl.enable_adapter(model, method="randlora", rank=3, projection_seed=5, targets=["up", "mid", "down"])
    state = shared.get(model, "randlora")
    assert tuple(state.randlora_a.shape) == (3, 10) and tuple(state.randlora_b.shape) == (10, 4, 3)
    assert all(a.shared_state() is state for _, a in kl.adapters(model))
    assert sum(v.path.endswith("randlora_a") for v in model.weights) == 1
    for _, a in kl.adapters(model):
        perturb(a)
    y = to_np(model(x))
    model.save(str(tmp_path / "m.keras"))
    loaded = keras.saving.load_model(str(tmp_path / "m.keras"))
    again = shared.get(loaded, "randlora")
    assert all(a.shared_state() is again for _, a in kl.adapters(loaded))
    assert sum(v.path.endswith("randlora_a") for v in loaded.weights) == 1
    np.testing.assert_array_equal(to_np(again.randlora_b), to_np(state.randlora_b))
    np.testing.assert_allclose(to_np(loaded(x)), y, rtol=1e-5, atol=1e-5)
    for save_projection in (True, False):
        other = _mlp()
        for w, v in zip(other.weights, base_weights):
            w.assign(v)
        kl.enable_adapter(other, method="randlora", rank=3, projection_seed=5, save_projection=save_projection,
                          targets=["up", "mid", "down"])
        for (_, a), (_, b) in zip(kl.adapters(other), kl.adapters(model)):
            a.randlora_lambda.assign(to_np(b.randlora_lambda))
            a.randlora_gamma.assign(to_np(b.randlora_gamma))
        f = tmp_path / f"a{save_projection}.safetensors"
        kl.save_adapter(other, f)
        fresh = _mlp()
        for w, v in zip(fresh.weights, base_weights):
            w.assign(v)
        kl.load_adapter(fresh, f)
        np.testing.assert_allclose(to_np(fresh(x)), y, rtol=1e-5, atol=1e-5)


def test_the_lora_form_is_exact(tmp_path):
    """save_adapter(as_lora=True): the update as a LoRA of rank k·r."""
    x = np.random.RandomState(1).normal(size=(4, 6)).astype("float32")
    model = _mlp()
    weights = [to_np(w) for w in model.weights]
    kl.enable_adapter(model, method="randlora", rank=4, targets=["up", "down"])
    for _, a in kl.adapters(model):
        perturb(a)
    y = to_np(model(x))
    f = tmp_path / "lora.safetensors"
    kl.save_adapter(model, f, as_lora=True)
    fresh = _mlp()
    for w, v in zip(fresh.weights, weights):
        w.assign(v)
    kl.load_adapter(fresh, f)
    assert {(p, a.method, a.rank) for p, a in kl.adapters(fresh)} == {("up", "lora", 8), ("down", "lora", 4)}
    _close(to_np(fresh(x)), y)


@pytest.mark.parametrize("h", [4, 9])
def test_batched_einsum_kernel(h):
    """A kernel with an axis shared by input and output (`n`): one λ and γ
    per slice of the matrix view, the bases shared by every slice."""
    x = np.random.RandomState(2).normal(size=(2, 3, 4, 6)).astype("float32")
    inp = keras.Input((3, 4, 6))
    out = keras.layers.EinsumDense("btnd,ndh->btnh", output_shape=(3, 4, h), name="target")(inp)
    model = keras.Model(inp, out)
    kl.enable_adapter(model, method="randlora", rank=2, targets=["target"])
    layer = model.get_layer("target")
    n = min(6, h)
    assert tuple(layer.randlora_lambda.shape) == (4, 2, n // 2)
    assert tuple(layer.randlora_gamma.shape) == (4, n // 2, n)
    perturb(layer)
    k0 = to_np(layer.layer.kernel).astype("float64")
    merged = np.stack([REFERENCE_MERGED["randlora"](_Slice(layer, i), k0[i]) for i in range(4)])
    want = np.einsum("btnd,ndh->btnh", x, merged)
    _close(to_np(model(x)), want)
    _close(to_np(layer.delta_matrix()), merged - k0)
    kl.merge(model)
    _close(to_np(model(x)), want)


class _Slice:
    """Slice `i` of a batched adapter, as the reference reads adapters."""

    def __init__(self, adapter, i):
        self.scaling = adapter.scaling
        self.randlora_lambda = to_np(adapter.randlora_lambda)[i]
        self.randlora_gamma = to_np(adapter.randlora_gamma)[i]
        self._state = adapter.shared_state()

    def shared_state(self):
        return self._state


def test_refusals_change_nothing():
    model = _mlp()
    kl.enable_adapter(model, method="randlora", rank=2, targets=["up"])
    before = [to_np(w).copy() for w in model.weights]
    for kwargs, match in [
        (dict(rank=2, projection_seed=1, targets=["mid"]), r"seed=0.*1"),
        (dict(rank=3, targets=["mid"]), r"rank=2.*3"),
        (dict(rank=2, targets=["mid"]), r"sizes up to 6 and 10.*10 inputs"),
        (dict(rank=2, alpha=0.0, targets=["down"]), r"alpha"),
    ]:
        with pytest.raises(ValueError, match=match):
            kl.enable_adapter(model, method="randlora", **kwargs)
        assert [p for p, _ in kl.adapters(model)] == ["up"]
        for w, v in zip(model.weights, before):
            np.testing.assert_array_equal(to_np(w), v)


# ----------------------------------------------------------------------
# PEFT directories on a KerasHub model converted from Hugging Face
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return hf_model("llama", str(tmp_path_factory.mktemp("llama")), layers=1)


def test_peft_directory_loads_with_the_same_logits(llama_dir, tmp_path):
    pm = peft.get_peft_model(_hf(llama_dir), peft.RandLoraConfig(
        r=4, randlora_alpha=12, randlora_dropout=0.1, projection_prng_key=3, target_modules=ALL))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "randlora_" in name:
                p.copy_(0.3 * torch.randn_like(p))
    pm.save_pretrained(str(tmp_path / "ad"))
    expected = _torch_logits(pm.eval())
    assert np.abs(_torch_logits(_hf(llama_dir)) - expected).max() > 1e-3  # not a no-op
    backbone = _backbone(llama_dir)
    kl.load_peft_adapter(backbone, str(tmp_path / "ad"), llama_dir)
    layers = dict(kl.adapters(backbone))
    assert len(layers) == 7 and {a.method for a in layers.values()} == {"randlora"}
    assert {(a.rank, a.alpha, a.dropout, a.projection_seed) for a in layers.values()} == {(4, 12.0, 0.1, 3)}
    state = shared.get(backbone, "randlora")
    np.testing.assert_array_equal(to_np(state.randlora_b), pm.base_model.randlora_B["default"].float().numpy())
    _close(_keras_logits(backbone), expected)


def test_save_peft_adapter_loads_in_peft(llama_dir, tmp_path):
    backbone = _backbone(llama_dir)
    kl.enable_adapter(backbone, method="randlora", rank=4, alpha=6.0, projection_seed=1)
    for _, a in kl.adapters(backbone):
        perturb(a)
    expected = _keras_logits(backbone)
    out = str(tmp_path / "peft")
    kl.save_peft_adapter(backbone, out, llama_dir)
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    assert config["peft_type"] == "RANDLORA"
    assert (config["r"], config["randlora_alpha"], config["projection_prng_key"], config["save_projection"]) == \
        (4, 6.0, 1, True)
    pm = peft.PeftModel.from_pretrained(_hf(llama_dir), out).eval()
    assert isinstance(pm.peft_config["default"], peft.RandLoraConfig)
    ours = to_np(shared.get(backbone, "randlora").randlora_a)
    np.testing.assert_array_equal(pm.base_model.randlora_A["default"].float().numpy()[:, 0, :], ours)
    got = _torch_logits(pm)
    assert np.abs(got - _torch_logits(_hf(llama_dir))).max() > 1e-3
    _close(got, expected)
    fresh = _backbone(llama_dir)  # and back, the base model from the config
    kl.load_peft_adapter(fresh, out)
    _close(_keras_logits(fresh), expected)


def test_what_peft_directories_cannot_hold_is_refused(llama_dir, tmp_path):
    backbone = _backbone(llama_dir)
    kl.enable_adapter(backbone, method="randlora", rank=2, dropout=0.1, targets=["*/query"])
    kl.enable_adapter(backbone, method="randlora", rank=2, targets=["*/value"])
    with pytest.raises(ValueError, match="one r, randlora_alpha, dropout"):
        kl.save_peft_adapter(backbone, str(tmp_path / "x"), llama_dir)
    assert not os.path.exists(tmp_path / "x")
    pm = peft.get_peft_model(_hf(llama_dir), peft.RandLoraConfig(r=2, save_projection=False, target_modules=["q_proj"]))
    pm.save_pretrained(str(tmp_path / "ad"))
    fresh = _backbone(llama_dir)
    with pytest.raises(ValueError, match="save_projection=False"):
        kl.load_peft_adapter(fresh, str(tmp_path / "ad"), llama_dir)
    assert not kl.adapters(fresh)
