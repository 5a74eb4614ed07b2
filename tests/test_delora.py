"""DeLoRA (`method="delora"`): parity with Hugging Face PEFT's DeLoRA
(forward, delta, merged kernel, the stored norms and the init) on a torch
`nn.Linear` and its Keras twin; PEFT directories both ways on a tiny Hugging
Face Llama converted by KerasHub (with per-module ranks); and what the
adapter contract does not cover: the norm bound, the norms over a quantized
base, batched EinsumDense kernels, the refusals. PEFT runs in PyTorch beside
the Keras backend under test."""

import json
import os

import keras
import numpy as np
import pytest

import keras_lowrank as kl
from keras_lowrank import bases

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

N_IN, N_OUT = 8, 12
X = np.random.RandomState(0).normal(size=(5, N_IN)).astype("float32")


def _dense(n_in=N_IN, n_out=N_OUT):
    inp = keras.Input((n_in,))
    return keras.Model(inp, keras.layers.Dense(n_out, name="lin")(inp))


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(N_IN, N_OUT)

    def forward(self, x):
        return self.lin(x)


def _twin(seed=0):
    torch.manual_seed(seed)
    net = _Net()
    model = _dense()
    model.get_layer("lin").set_weights(
        [net.lin.weight.detach().numpy().T.copy(), net.lin.bias.detach().numpy().copy()])
    return net, model


@pytest.mark.parametrize("r, lam", [(3, 5.0), (1, 15.0)])
def test_forward_delta_and_merged_kernel_match_peft(r, lam):
    net, model = _twin()
    pm = peft.get_peft_model(net, peft.DeloraConfig(r=r, delora_lambda=lam, target_modules=["lin"]))
    lin = pm.base_model.model.lin
    kl.enable_adapter(model, method="delora", rank=r, delora_lambda=lam, targets=["lin"])
    layer = model.get_layer("lin")
    # the stored norms are the same (taken from the same weight)
    _close(to_np(layer.delora_w_norm), lin.delora_w_norm["default"].numpy())
    rng = np.random.RandomState(1)
    a = rng.normal(scale=0.5, size=(r, N_IN)).astype("float32")
    b = rng.normal(scale=0.5, size=(N_OUT, r)).astype("float32")
    b[:, 0] = 0.0 if r > 1 else b[:, 0]  # a zero rank vector: the 1e-4 floor
    lam_now = np.array([0.7 * lam], "float32")
    with torch.no_grad():
        lin.delora_A["default"].copy_(torch.tensor(a))
        lin.delora_B["default"].copy_(torch.tensor(b))
        lin.delora_lambda["default"].copy_(torch.tensor(lam_now))
    layer.delora_a.assign(a)
    layer.delora_b.assign(b.T)
    layer.bound.assign(lam_now)
    pm.eval()
    with torch.no_grad():
        want = pm(torch.tensor(X)).numpy()
        base = lin.base_layer(torch.tensor(X)).numpy()
    assert np.abs(want - base).max() > 1e-2
    _close(to_np(model(X)), want)
    _close(to_np(layer.delta_matrix()), lin.get_delta_weight("default").detach().numpy().T)
    merged = pm.merge_and_unload().lin.weight.detach().numpy().T
    kl.merge(model)
    _close(to_np(model.get_layer("lin").kernel), merged)
    _close(to_np(model(X)), want)


def test_init_is_peft_s():
    """A Kaiming-uniform, B = 0, λ = delora_lambda, the base's input-row
    norms stored (PEFT's DeloraConfig(init_weights=True)); PEFT's count of
    trainable values; the options round-trip through get_config."""
    n_in, n_out, r = 64, 48, 8
    inp = keras.Input((n_in,))
    model = keras.Model(inp, keras.layers.Dense(n_out, name="lin")(inp))
    kl.enable_adapter(model, method="delora", rank=r, delora_lambda=7.0, seed=3, targets=["lin"])
    layer = model.get_layer("lin")
    torch.manual_seed(0)
    lin = torch.nn.Linear(n_in, n_out)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(to_np(layer.layer.kernel).T))
    pm = peft.get_peft_model(torch.nn.Sequential(lin),
                             peft.DeloraConfig(r=r, delora_lambda=7, target_modules=["0"]))
    theirs = pm.base_model.model[0]
    ours_a, theirs_a = to_np(layer.delora_a), theirs.delora_A["default"].detach().numpy()
    bound = 1 / np.sqrt(n_in)
    assert ours_a.shape == theirs_a.shape
    assert np.abs(ours_a).max() <= bound and np.abs(theirs_a).max() <= bound
    assert ours_a.std() == pytest.approx(theirs_a.std(), rel=0.15)
    assert not to_np(layer.delora_b).any() and not theirs.delora_B["default"].detach().numpy().any()
    assert to_np(layer.bound).tolist() == theirs.delora_lambda["default"].detach().numpy().tolist() == [7.0]
    _close(to_np(layer.delora_w_norm), theirs.delora_w_norm["default"].numpy())
    assert layer.trainable_count() == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    back = type(layer).from_config(layer.get_config())
    assert (back.rank, back.delora_lambda) == (r, 7.0)


# ----------------------------------------------------------------------
# What the contract does not cover
def test_the_update_is_bounded_by_lambda():
    """‖ΔK‖_F <= |λ| · max_i ‖K_i‖, whatever A and B are."""
    model = _dense()
    kl.enable_adapter(model, method="delora", rank=4, delora_lambda=2.0, targets=["lin"])
    layer = model.get_layer("lin")
    for seed in range(3):
        perturb(layer, scale=3.0, seed=seed)
        lam = abs(float(to_np(layer.bound)[0]))
        delta = to_np(layer.delta_matrix())
        assert np.linalg.norm(delta) <= lam * to_np(layer.delora_w_norm).max() * (1 + 1e-5)


def test_norms_of_a_quantized_base_are_the_dequantized_kernel_s(tmp_path):
    """Over NF4 the stored norms are the dequantized kernel's; an adapter
    file brings them back as they are (not taken again)."""
    model = _dense()
    weights = [to_np(w).copy() for w in model.weights]
    kl.enable_adapter(model, method="delora", rank=2, base="nf4", targets=["lin"])
    layer = model.get_layer("lin")
    w = to_np(bases.read_kernel(layer.layer)).astype("float64")
    _close(to_np(layer.delora_w_norm), np.sqrt((w**2).sum(1)))
    perturb(layer)
    layer.delora_w_norm.assign(to_np(layer.delora_w_norm) * 1.5)  # not what a fresh init takes
    y = to_np(model(X))
    f = tmp_path / "a.safetensors"
    kl.save_adapter(model, f)
    fresh = _dense()
    for v, value in zip(fresh.weights, weights):
        v.assign(value)
    kl.load_adapter(fresh, f)
    assert bases.base_kind(fresh.get_layer("lin").layer) == "nf4"
    _close(to_np(fresh.get_layer("lin").delora_w_norm), to_np(layer.delora_w_norm))
    _close(to_np(fresh(X)), y)


def test_the_lora_form_is_exact(tmp_path):
    """save_adapter(as_lora=True): the norms and the r factors folded into
    a rank-r LoRA with the same outputs."""
    model = _dense()
    weights = [to_np(w) for w in model.weights]
    kl.enable_adapter(model, method="delora", rank=3, targets=["lin"])
    perturb(model.get_layer("lin"))
    y = to_np(model(X))
    f = tmp_path / "lora.safetensors"
    kl.save_adapter(model, f, as_lora=True)
    fresh = _dense()
    for w, v in zip(fresh.weights, weights):
        w.assign(v)
    kl.load_adapter(fresh, f)
    lora = fresh.get_layer("lin")
    assert lora.method == "lora" and lora.rank == 3
    _close(to_np(fresh(X)), y)


def test_batched_einsum_kernel():
    """A kernel with an axis shared by input and output (`n`): one DeLoRA
    (its own λ and norms) per slice of the `(n, 6, 3)` matrix view."""
    x = np.random.RandomState(2).normal(size=(2, 3, 4, 6)).astype("float32")
    inp = keras.Input((3, 4, 6))
    out = keras.layers.EinsumDense("btnd,ndh->btnh", output_shape=(3, 4, 3), name="target")(inp)
    model = keras.Model(inp, out)
    kl.enable_adapter(model, method="delora", rank=2, targets=["target"])
    layer = model.get_layer("target")
    assert tuple(layer.delora_a.shape) == (4, 2, 6) and tuple(layer.bound.shape) == (4, 1)
    k0 = to_np(layer.layer.kernel).astype("float64")
    _close(to_np(layer.delora_w_norm), np.sqrt((k0**2).sum(-1)))
    perturb(layer)
    merged = np.stack([REFERENCE_MERGED["delora"](_Slice(layer, i), k0[i]) for i in range(4)])
    want = np.einsum("btnd,ndh->btnh", x, merged)
    _close(to_np(model(x)), want)
    _close(to_np(layer.delta_matrix()), merged - k0)
    kl.merge(model)
    _close(to_np(model(x)), want)


class _Slice:
    def __init__(self, adapter, i):
        self.rank = adapter.rank
        for name in ("delora_a", "delora_b", "bound", "delora_w_norm"):
            setattr(self, name, to_np(getattr(adapter, name))[i])


def test_refusals_change_nothing():
    model = _dense()
    before = [to_np(w).copy() for w in model.weights]
    for kwargs, match in [
        (dict(rank=0), r"rank"),
        (dict(rank=2, delora_lambda=float("inf")), r"delora_lambda.*inf"),
        (dict(rank=2, delora_lambda="big"), r"delora_lambda.*'big'"),
        (dict(rank=2, dropout=1.0), r"dropout"),
    ]:
        with pytest.raises(ValueError, match=match):
            kl.enable_adapter(model, method="delora", targets=["lin"], **kwargs)
        assert not kl.adapters(model)
        for w, v in zip(model.weights, before):
            np.testing.assert_array_equal(to_np(w), v)


# ----------------------------------------------------------------------
# PEFT directories on a KerasHub model converted from Hugging Face
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return hf_model("llama", str(tmp_path_factory.mktemp("llama")), layers=1)


def test_peft_directory_loads_with_the_same_logits(llama_dir, tmp_path):
    pm = peft.get_peft_model(_hf(llama_dir), peft.DeloraConfig(
        r=4, delora_lambda=3, module_dropout=0.1, rank_pattern={"q_proj": 2}, target_modules=ALL))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "delora_" in name:
                p.copy_(0.3 * torch.randn_like(p))
    pm.save_pretrained(str(tmp_path / "ad"))
    expected = _torch_logits(pm.eval())
    assert np.abs(_torch_logits(_hf(llama_dir)) - expected).max() > 1e-3  # not a no-op
    backbone = _backbone(llama_dir)
    kl.load_peft_adapter(backbone, str(tmp_path / "ad"), llama_dir)
    layers = dict(kl.adapters(backbone))
    assert len(layers) == 7 and {a.method for a in layers.values()} == {"delora"}
    assert sorted(a.rank for a in layers.values()) == [2, 4, 4, 4, 4, 4, 4]
    assert {(a.delora_lambda, a.dropout) for a in layers.values()} == {(3.0, 0.1)}
    _close(_keras_logits(backbone), expected)


def test_save_peft_adapter_loads_in_peft(llama_dir, tmp_path):
    backbone = _backbone(llama_dir)
    kl.enable_adapter(backbone, method="delora", rank=4, delora_lambda=2.0, targets=["*feedforward*"])
    kl.enable_adapter(backbone, method="delora", rank=2, delora_lambda=2.0, targets=["*/query", "*/value"])
    for _, a in kl.adapters(backbone):
        perturb(a)
    expected = _keras_logits(backbone)
    out = str(tmp_path / "peft")
    kl.save_peft_adapter(backbone, out, llama_dir)
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    assert config["peft_type"] == "DELORA"
    assert (config["r"], config["delora_lambda"]) == (4, 2.0) and set(config["rank_pattern"].values()) == {2}
    pm = peft.PeftModel.from_pretrained(_hf(llama_dir), out).eval()
    assert isinstance(pm.peft_config["default"], peft.DeloraConfig)
    got = _torch_logits(pm)
    assert np.abs(got - _torch_logits(_hf(llama_dir))).max() > 1e-3
    _close(got, expected)
    fresh = _backbone(llama_dir)  # and back, the base model from the config
    kl.load_peft_adapter(fresh, out)
    _close(_keras_logits(fresh), expected)


def test_what_one_peft_directory_cannot_hold_is_refused(llama_dir, tmp_path):
    other = _backbone(llama_dir)
    kl.enable_adapter(other, method="delora", rank=2, dropout=0.1, targets=["*/query"])
    kl.enable_adapter(other, method="delora", rank=2, targets=["*/value"])
    with pytest.raises(ValueError, match="one module_dropout"):
        kl.save_peft_adapter(other, str(tmp_path / "x"), llama_dir)
    assert not os.path.exists(tmp_path / "x")
